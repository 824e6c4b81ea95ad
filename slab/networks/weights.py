"""Network weights from and to local files only, with errors that say what does not match."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from slab.core.errors import SlabError
from slab.core.outputs import atomic_write

# Wrappers that prefix every key: DistributedDataParallel / DataParallel and torch.compile.
_PREFIXES = ("module.", "_orig_mod.")
_SHOWN = 8  # keys named per list in an error message


def _unwrap(model: nn.Module) -> nn.Module:
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's wrapper
            model = model._orig_mod
        else:
            return model


def _strip_prefixes(state: dict) -> dict:
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f", ... (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")


def read_state_dict(path: str | Path | Mapping, key: str | None = None, name=None) -> dict[str, torch.Tensor]:
    """The state dict stored in ``path``: a raw state dict, or a checkpoint dict holding one
    under ``key`` (default: ``"model"``, else ``"state_dict"``). ``module.`` prefixes are removed.
    ``path`` may also be what such a file holds, already read (``name`` then names it in errors).
    """
    if isinstance(path, Mapping):
        obj, path = dict(path), name or "weights"
    else:
        path = Path(path)
        if not path.is_file():
            raise SlabError(f"{path}: no such weights file")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - the unpickler raises many kinds on a file that is not weights
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise SlabError(f"{path}: not a torch weights file ({reason[:200]})") from None
    if not isinstance(obj, dict):
        raise SlabError(f"{path}: expected a state dict or a checkpoint dict, found {type(obj).__name__}")
    if key is not None:
        if key not in obj:
            raise SlabError(f"{path}: no key {key!r} in the checkpoint; keys: {_listing(sorted(map(str, obj)))}")
        obj = obj[key]
    else:
        for candidate in ("model", "state_dict"):
            if isinstance(obj.get(candidate), dict):
                obj = obj[candidate]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SlabError(f"{path}: no state dict of tensors found (give the checkpoint key that holds it)")
    return _strip_prefixes(obj)


def load_weights(model: nn.Module, path: str | Path | Mapping, key: str | None = None, name=None) -> nn.Module:
    """Load weights from a local file into ``model`` (in place) and return it.

    Parameters
    ----------
    model : torch.nn.Module
        The network, built with the configuration the weights were trained with. A DDP- or
        ``torch.compile``-wrapped model is loaded through its wrapped module.
    path : str or Path
        A ``torch.save`` file: a state dict, or a checkpoint dict with the state dict under
        ``key`` (default ``"model"``, then ``"state_dict"``). Read with ``weights_only=True``.
        Or what such a file holds, already read (a checkpoint read once for its spec and its
        weights); ``name`` then names it in errors.
    key : str, optional
        The checkpoint key holding the state dict.

    Raises
    ------
    SlabError
        The file is missing or not a torch file, or its keys or shapes differ from the model's;
        the message names the missing and unexpected keys and the shape mismatches.
    """
    state = read_state_dict(path, key, name)
    path = (name or "weights") if isinstance(path, Mapping) else path
    target = _unwrap(model)
    expected = target.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        problems = []
        if missing:
            problems.append(f"missing keys [{_listing(missing)}]")
        if unexpected:
            problems.append(f"unexpected keys [{_listing(unexpected)}]")
        if shapes:
            problems.append(f"shape mismatches (file vs network) [{_listing(shapes)}]")
        raise SlabError(f"{path}: weights do not match the network: {'; '.join(problems)}")
    target.load_state_dict(state)
    return model


def save_weights(model: nn.Module, path: str | Path) -> Path:
    """Save ``model``'s state dict (without DDP/compile prefixes) to ``path`` atomically."""
    path = Path(path)
    state = {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()}
    with atomic_write(path) as tmp:
        torch.save(state, tmp)
    return path
