"""A trained model, whole: what ``slab predict --model`` rebuilds from a training run, a checkpoint,
a cross-validated plan directory or an installed model.

Every training checkpoint carries its *inference spec* (:func:`inference_spec`): the network's
``build_network`` arguments, the slab offsets and planes (2.5D) or window (3D), the label names,
the normalisation it was trained with (the same settings object training used, read by the same
:func:`slab.transforms.intensity.make_normalize`), the TTA of its validation and the threshold chosen on
validation. A model directory (``slab cv``'s output, or ``slab install``'s) holds ``model.json``:
its members (checkpoints, grouped by configuration) and the post-processing chosen on the
out-of-fold predictions. :class:`Ensemble` averages its members' probabilities, one member in
memory at a time.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from slab.core.checks import read_json_object
from slab.core.errors import SlabError


MODEL_FILE = "model.json"


def inference_network(cfg: dict, network: Mapping, label_names=None) -> dict:
    """The ``network_config`` of :class:`Predictor` for a segmentation run: the ``build_network``
    arguments, the slab offsets and planes (2.5D) or the window (3D), and the label names."""
    config = dict(network)
    if cfg["task"] == "segmentation_2p5d":
        config.update(offsets=cfg["offsets"], planes=cfg["val"]["planes"] or cfg["planes"])
    else:
        config["roi_size"] = cfg["patch_size"]
    if label_names:
        config["labels"] = list(label_names)
    return config


def inference_spec(cfg: dict, network: Mapping, label_names=None, threshold=0.5) -> dict:
    """Everything :class:`Predictor` needs to predict as the run validated: JSON data, stored in
    every checkpoint as ``"inference"``. A run trained on exclusive classes (``dice_ce``) predicts
    a softmax and masks by argmax; others a sigmoid per label and the validation's threshold."""
    exclusive = cfg.get("loss") == "dice_ce"
    return {"network": inference_network(cfg, network, label_names), "normalize": cfg["normalize"],
            "tta": cfg["val"]["tta"], "activation": "softmax" if exclusive else "sigmoid",
            "postprocess": {"argmax": True} if exclusive else {"threshold": threshold}}


def _checkpoint(path: Path) -> dict:
    from slab.pipeline.checkpoints import load_checkpoint

    return load_checkpoint(path)


def spec_of_checkpoint(path) -> dict:
    """The inference spec of a training checkpoint (``best.pt``, ``last.pt``) or of an exported
    model file, read with ``weights_only=True``. Checkpoints written before specs were stored
    give one rebuilt from their config and network."""
    return spec_of_state(_checkpoint(Path(path)), path)


SPEC_TYPES = {"network": (dict,), "normalize": (dict, type(None)), "tta": (str,), "mode": (str,),
              "activation": (str,), "postprocess": (dict,)}


def spec_of_state(state: dict, path) -> dict:
    """:func:`spec_of_checkpoint` of a checkpoint already read (``path`` names it in errors);
    every part of a stored spec is checked for its type, so a doctored checkpoint is one line."""
    if not isinstance(state, dict):
        raise SlabError(f"{path}: expected a slab checkpoint (a dictionary), got {type(state).__name__}")
    spec = state.get("inference")
    if spec is not None:
        if not isinstance(spec, dict):
            raise SlabError(f"{path}: its inference spec is {type(spec).__name__}; expected an object")
        for key, types in SPEC_TYPES.items():
            if (key in spec or key == "network") and not isinstance(spec.get(key), types):
                raise SlabError(f"{path}: inference spec '{key}' is {spec.get(key)!r:.80}; expected "
                                + " or ".join("null" if t is type(None) else "an object" if t is dict else "a name"
                                              for t in types))
        return spec
    cfg, network = state.get("config"), state.get("network")
    if not isinstance(cfg, dict) or not isinstance(network, dict):
        raise SlabError(f"{path}: a checkpoint without an inference spec needs its 'config' and 'network' objects; "
                        f"found {type(cfg).__name__} and {type(network).__name__}")
    if cfg.get("task") == "classification":
        raise SlabError(f"{path}: a classification checkpoint; slab predict takes segmentation models "
                        "(score sequences with the spine bundle)")
    try:
        return inference_spec(cfg, network, threshold=state.get("threshold", 0.5))
    except (KeyError, TypeError) as err:
        raise SlabError(f"{path}: its 'config' lacks what prediction needs ({err})") from None


def models_home() -> Path:
    """Where ``slab install`` puts models: ``$SLAB_HOME/models`` (default ``~/.cache/slab/models``)."""
    home = os.environ.get("SLAB_HOME")
    return (Path(home) if home else Path.home() / ".cache" / "slab") / "models"


def resolve_model(name) -> Path:
    """A model path: a checkpoint file, a run directory (its ``best.pt``), a model directory
    (``model.json``), or the name of an installed model."""
    path = Path(name)
    if path.is_file():
        return path
    if path.is_dir():
        for candidate in (path / MODEL_FILE, path / "best.pt"):
            if candidate.is_file():
                return candidate
        raise SlabError(f"--model: {path} holds neither {MODEL_FILE} (slab cv, slab install) nor best.pt "
                        "(a training run)")
    installed = models_home() / str(name)
    if "/" not in str(name) and (installed / MODEL_FILE).is_file():
        return installed / MODEL_FILE
    raise SlabError(f"--model: {name} is not a checkpoint, a run or model directory, or an installed model "
                    f"(in {models_home()})")


def read_model_file(path) -> dict:
    """A ``model.json``, checked: ``members`` (a list of ``{"configuration", "checkpoint"}`` with
    paths relative to its folder), optional ``postprocess`` and ``tta``."""
    path = Path(path)
    data = read_json_object(path, "model file")
    members = data.get("members")
    if not isinstance(members, list) or not members or not all(
            isinstance(m, dict) and isinstance(m.get("checkpoint"), str) for m in members):
        raise SlabError(f"{path}: expected 'members', a list of objects with a 'checkpoint' path")
    for m in members:
        target = (path.parent / m["checkpoint"]).resolve()
        if not target.is_relative_to(path.parent.resolve()):
            raise SlabError(f"{path}: member {m['checkpoint']} lies outside the model's folder")
        if not target.is_file():
            raise SlabError(f"{path}: member checkpoint {m['checkpoint']} not found")
    if not isinstance(data.get("postprocess", {}), dict):
        raise SlabError(f"{path}: 'postprocess' must be an object")
    from slab.pipeline.inference.predictor import check_probability_thresholds
    from slab.transforms.post import make_postprocess

    try:
        make_postprocess(data.get("postprocess") or {})
        check_probability_thresholds(data.get("postprocess") or {})
    except SlabError as err:
        raise SlabError(f"{path}: {err}") from None
    return data


def _fold_of(member: Mapping):
    fold = member.get("fold")
    return fold if isinstance(fold, int) and not isinstance(fold, bool) else None


def load_model(name, *, folds=None, configurations=None, **overrides):
    """A :class:`Predictor` (one checkpoint) or an :class:`Ensemble` (a model directory) for
    ``name`` (see :func:`resolve_model`). ``overrides`` are :class:`Predictor` keyword arguments
    that win over the model's (None: the model's); a ``postprocess`` override is merged into
    the model's post-processing. ``folds`` / ``configurations`` pick members of an ensemble."""
    from slab.pipeline.inference.predictor import Predictor

    path = resolve_model(name)
    if path.name != MODEL_FILE:
        if folds is not None or configurations is not None:
            raise SlabError("--folds: a single checkpoint has no folds to choose from; give a model directory")
        spec = spec_of_checkpoint(path)
        return Predictor.from_spec(spec, path, **overrides)
    data = read_model_file(path)
    members = data["members"]
    if configurations is not None:
        members = [m for m in members if m.get("configuration") in configurations]
        if not members:
            raise SlabError(f"--configurations: {', '.join(configurations)} not among the model's "
                            f"{', '.join(sorted({str(m.get('configuration')) for m in data['members']}))}")
    if folds is not None:
        have = sorted({f for m in members if (f := _fold_of(m)) is not None})
        missing = [f for f in folds if f not in have]
        if missing:
            raise SlabError(f"--folds: fold {missing[0]} is not in the model (folds {', '.join(map(str, have))})")
        members = [m for m in members if _fold_of(m) in folds]
    if overrides.get("tta") is None and data.get("tta") is not None:
        overrides["tta"] = data["tta"]
    return Ensemble([path.parent / m["checkpoint"] for m in members], chosen=data.get("postprocess") or {},
                    **overrides)


class Ensemble:
    """The mean probabilities of several checkpoints (folds, configurations), post-processed by
    the model's ``chosen`` post-processing (``postprocess`` among the overrides: settings given
    over it, as on the command line). Members are built one after the other: at most two
    networks are in memory (the first, which answers for the ensemble's settings, and the
    current one), and one float32 sum of the probabilities.

    It answers what :func:`slab.pipeline.inference.predict_file` asks of a :class:`Predictor`:
    ``__call__``, ``postprocess``, ``label_names``, ``check_input``, ``memory_budget``,
    ``fits_in_memory``. Every member must predict the same labels.
    """

    def __init__(self, checkpoints, chosen: Mapping | None = None, **overrides):
        if not checkpoints:
            raise SlabError("ensemble: no members")
        from slab.transforms.post import make_postprocess, merge_postprocess

        self.checkpoints = [Path(c) for c in checkpoints]
        self.specs = [spec_of_checkpoint(c) for c in self.checkpoints]
        self.postprocess_options = merge_postprocess(chosen, overrides.pop("postprocess", None))
        self.overrides = overrides
        # The first member, built now: it checks the settings and answers the questions about inputs.
        self.first = self._member(0)
        outputs = {(s["network"].get("out_channels"), tuple(s["network"].get("labels") or ()),
                    s.get("activation", "sigmoid")) for s in self.specs}
        if len(outputs) > 1:
            raise SlabError(f"ensemble: its members predict different labels or activations ({sorted(outputs)})")
        self.postprocess = make_postprocess(self.postprocess_options)
        self.memory_budget = self.first.memory_budget
        self.out_channels = self.first.out_channels
        self.activation = self.first.activation

    @property
    def exclusive(self) -> bool:
        return self.first.exclusive

    def _member(self, index: int):
        from slab.pipeline.inference.predictor import Predictor

        return Predictor.from_spec(self.specs[index], self.checkpoints[index], **self.overrides)

    def __len__(self) -> int:
        return len(self.checkpoints)

    def label_names(self) -> list[str]:
        return self.first.label_names()

    @property
    def label_map(self) -> dict:
        return self.first.label_map

    def check_input(self, info, name) -> None:
        """Each distinct network's channel check (the folds of one configuration share theirs)."""
        import json

        seen = set()
        for index, spec in enumerate(self.specs):
            key = json.dumps(spec["network"], sort_keys=True)
            if key not in seen:
                seen.add(key)
                (self.first if index == 0 else self._member(index)).check_input(info, name)

    def fits_in_memory(self, volume) -> bool:
        return self.first.fits_in_memory(volume)

    def __call__(self, volume) -> torch.Tensor:
        """The members' mean probabilities ``(L, X, Y, Z)`` (float32), summed one member at a time."""
        total = None
        for index in range(len(self)):
            member = self.first if index == 0 else self._member(index)
            probs = member(volume)
            if total is None:
                total = probs.float().clone() if probs.dtype != torch.float32 else probs.clone()
            else:
                total += probs.float()
            del member, probs
        if len(self) > 1:
            total /= len(self)
        return total


def slim_state(path) -> dict:
    """What a model needs of a training checkpoint: its weights and inference spec (no
    optimizer, no RNG states, no history), for ``slab export``."""
    state = _checkpoint(Path(path))
    return {"model": state["model"], "config": state["config"], "network": state["network"],
            "inference": spec_of_state(state, path), "epoch": state.get("epoch"),
            "threshold": state.get("threshold"), "metrics": state.get("metrics")}


def mean_probabilities(arrays) -> np.ndarray:
    """The mean of probability arrays, accumulated in float32 one at a time."""
    total = None
    count = 0
    for a in arrays:
        a = np.asarray(a, dtype=np.float32)
        total = a.copy() if total is None else total + a
        count += 1
    if total is None:
        raise SlabError("ensemble: nothing to average")
    return total / count
