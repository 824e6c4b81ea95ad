"""A training checkpoint read back (``weights_only=True``: an untrusted file runs no code): below
training (resume, ``best.pt``) and inference (a run or a checkpoint as the model) both, so that
neither room imports the other for it."""
from __future__ import annotations

from pathlib import Path

import torch

from slab.core.errors import SlabError


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    """A checkpoint written by :func:`train` (read with ``weights_only=True``). With ``mmap`` its
    tensors are mapped, not read: what a reader of its spec alone (an ensemble's members, an
    install's check) asks for."""
    path = Path(path)
    if not path.is_file():
        raise SlabError(f"{path}: no such checkpoint")
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # a file of the legacy format
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's to fix
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise SlabError(f"{path}: not a readable checkpoint ({type(err).__name__}: {reason})") from err
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise SlabError(f"{path}: not a slab training checkpoint (no model/config)")
    return state


__all__ = ["load_checkpoint"]
