"""Training: 2.5D and 3D segmentation and 2.5D slice-sequence classification.

``train(datalist, config, out)`` is the one entry point: the CLI (``slab train``), the bundles'
``train.json`` and the tests all call it. It validates the configuration and the data before any
training starts, then runs epochs of AdamW steps under a per-step cosine schedule with linear
warm-up, validates on whole volumes with the inference engine, and writes to ``out``:

``config.json``     the configuration used, every default filled in
``network.json``    the network and slab settings ``slab predict --network`` takes (segmentation)
``last.pt``         model, optimizer, scheduler, AMP scaler, epoch, config, RNG states, history
``best.pt``         the same at the best validation score, with ``threshold`` chosen on validation
                    (both links into ``state/``, switched together in one step: they never disagree)
``log.csv``         one row per epoch (rewritten whole, so a resumed run keeps one clean table)
``curves.png``      loss and metric curves
``tensorboard/``    the same scalars for TensorBoard

Determinism. Every random draw of an epoch comes from ``(seed, epoch)``: the global RNGs are
re-seeded at the start of each epoch and every training sample ``i`` of epoch ``e`` is drawn
under its own seed ``(seed, e, i)``. A sample is therefore the same whatever the number of
loader workers or processes, and a run resumed from ``last.pt`` at an epoch boundary repeats the
uninterrupted run exactly.

Distributed. Under ``torchrun`` every process takes its contiguous share of each *global* batch
(``batch_size`` is the global batch and must be a multiple of the number of processes), DDP
averages the gradients, and rank 0 alone writes files; the loss curve matches one process with
the same ``batch_size`` up to floating-point summation order (for 2.5D, when every slab of a batch
has one size: a ``patch_size`` or volumes whose planes share a size; otherwise each process pads
its share of the batch on its own). Validation volumes are split over the processes too.

The configuration schema, with defaults, is ``DEFAULTS`` (see :func:`validate_config`).
"""
from __future__ import annotations

import copy
import csv
import inspect
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn

from pipeline.device import amp_dtype, autocast, resolve_device
from pipeline.distributed import (
    DistInfo,
    all_reduce_mean,
    barrier,
    cleanup_distributed,
    init_distributed,
    process_device,
    rank_batch,
)
from transforms.checks import PLANES, read_json_object
from transforms.errors import SlabError, SlabWarning

TASKS = ("segmentation_2p5d", "segmentation_3d", "classification")
LOSSES = ("dice_bce", "dice_ce")
TTAS = ("none", "flips", "full")
SEG_METRICS = ("surface_dice_0", "surface_dice_tol", "dice")
CLS_METRICS = ("auc", "log_loss")
LOWER_IS_BETTER = ("log_loss", "val_loss")
# What a run directory holds (outputs that must not overwrite an input such as the datalist);
# last.pt, best.pt and state are links into states/.
RUN_FILES = ("config.json", "network.json", "states", "log.csv", "curves.png", "tensorboard")
# Keys that change how a run is executed, not what it computes: they may differ on resume.
RUNTIME_KEYS = ("num_workers", "progress")

# ---------------------------------------------------------------------------------------------
# Configuration schema

class _Spec:
    """One configuration value: its default and a check that returns the cleaned value."""

    def __init__(self, default: Any, check: Callable[[Any, str], Any], doc: str) -> None:
        self.default, self.check, self.doc = default, check, doc


def _fail(name: str, expected: str, value: Any) -> SlabError:
    return SlabError(f"config {name}: expected {expected}, got {value!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


def _int(lo: int | None = None, hi: int | None = None, optional: bool = False):
    def check(v, name):
        if v is None and optional:
            return None
        if not _is_int(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
            raise _fail(name, f"an integer{_range(lo, hi)}" + (" or null" if optional else ""), v)
        return int(v)

    return check


def _range(lo, hi, open_lo=False, open_hi=False) -> str:
    if lo is not None and hi is not None:
        return f" in {'(' if open_lo else '['}{lo}, {hi}{')' if open_hi else ']'}"
    if lo is not None:
        return f" {'>' if open_lo else '>='} {lo}"
    if hi is not None:
        return f" {'<' if open_hi else '<='} {hi}"
    return ""


def _float(lo=None, hi=None, open_lo=False, open_hi=False, optional=False):
    def check(v, name):
        if v is None and optional:
            return None
        ok = _is_number(v)
        if ok and lo is not None:
            ok = v > lo if open_lo else v >= lo
        if ok and hi is not None:
            ok = v < hi if open_hi else v <= hi
        if not ok:
            raise _fail(name, f"a number{_range(lo, hi, open_lo, open_hi)}" + (" or null" if optional else ""), v)
        return float(v)

    return check


def _bool(v, name):
    if not isinstance(v, bool):
        raise _fail(name, "true or false", v)
    return v


def _choice(options: Sequence[str]):
    def check(v, name):
        if v not in options:
            raise _fail(name, f"one of {', '.join(options)}", v)
        return v

    return check


def _list(item, min_len=1, length=None, optional=False, unique=False, what="values"):
    def check(v, name):
        if v is None and optional:
            return None
        n = f"{length} " if length else (f"at least {min_len} " if min_len else "")
        if not isinstance(v, (list, tuple)) or len(v) < min_len or (length is not None and len(v) != length):
            raise _fail(name, f"a list of {n}{what}" + (" or null" if optional else ""), v)
        out = [item(x, f"{name}[{i}]") for i, x in enumerate(v)]
        if unique and len(set(out)) != len(out):
            raise _fail(name, f"distinct {what}", v)
        return out

    return check


def _dict(v, name):
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise _fail(name, "an object (JSON dict)", v)
    return dict(v)


def _s(default, check, doc):
    return _Spec(default, check, doc)


# The schema. Nested dicts are sections; their unknown keys are errors too.
SCHEMA: dict[str, Any] = {
    "task": _s("segmentation_2p5d", _choice(TASKS), "segmentation_2p5d | segmentation_3d | classification"),
    "network": _s(
        {"name": "unet"}, _dict,
        "build_network arguments: name plus MONAI options; spatial_dims, in_channels and out_channels are "
        "derived from the task and the data (given ones must agree)",
    ),
    "offsets": _s([-1, 0, 1], _list(_int(), unique=True, what="integers"),
                  "2.5D slab offsets (slices along the plane's normal)"),
    "planes": _s(list(PLANES), _list(_choice(PLANES), unique=True, what="planes"), "2.5D training planes: xy, zx, zy"),
    "normalize": _s({}, _dict,
                    "PercentileNormalize arguments (percentiles, soft clip); null: the image is used as stored"),
    "epochs": _s(10, _int(1), "training epochs"),
    "batch_size": _s(8, _int(1), "global batch size (all processes together)"),
    "samples_per_epoch": _s(256, _int(1, optional=True), "training samples per epoch; null: one pass (classification)"),
    "patch_size": _s(None, _list(_int(1), min_len=2, optional=True, what="positive integers"),
                     "2.5D: (H, W) random crop of each slab, null = whole slices; 3D: (X, Y, Z) patch, required"),
    "positive_fraction": _s(0.5, _float(0, 1), "2.5D: share of slabs drawn from slices with foreground"),
    "pos_neg": _s([1.0, 1.0], _list(_float(0), length=2, what="numbers >= 0"), "3D: RandCropByPosNegLabeld pos, neg"),
    "lr": _s(1e-3, _float(0, open_lo=True), "AdamW learning rate (peak, after warm-up)"),
    "weight_decay": _s(1e-4, _float(0), "AdamW weight decay"),
    "warmup_epochs": _s(1.0, _float(0), "linear warm-up length in epochs (then cosine decay to 0, per step)"),
    "grad_clip": _s(None, _float(0, open_lo=True, optional=True), "clip the gradient norm to this; null: no clipping"),
    "loss": _s("dice_bce", _choice(LOSSES),
               "dice_bce: Dice + BCE on sigmoid outputs (multi-label); dice_ce: Dice + CE on the softmax over "
               "(background logit 0, one logit per class) for exclusive classes (see DiceCE)"),
    "augment": _s({}, _dict, "2.5D: RandSlabAugmentd arguments; 3D: flip_prob 0.5, rot90_prob 0.5, scale_intensity 0.1, "
               "shift_intensity 0.1, intensity_prob 0.5 (AUGMENT_3D); null: no augmentation"),
    "num_workers": _s(0, _int(0), "DataLoader worker processes"),
    "seed": _s(0, _int(0, 2**31 - 1), "seed of every random draw"),
    "amp": _s(True, _bool, "mixed precision on CUDA (bf16 where supported, else fp16 with a GradScaler); CPU: fp32"),
    "val_every": _s(1, _int(1), "validate every N epochs (and after the last)"),
    "progress": _s(True, _bool, "tqdm progress bars (only on a terminal)"),
    "val": {
        "planes": _s(None, _list(_choice(PLANES), unique=True, optional=True, what="planes"),
                     "2.5D inference planes; null: the training planes"),
        "tta": _s("none", _choice(TTAS), "test-time augmentation: none | flips | full"),
        "tolerance_mm": _s(1.0, _float(0), "tolerance of surface_dice_tol, in mm"),
        "metric": _s("surface_dice_0", _choice(SEG_METRICS + CLS_METRICS + ("val_loss",)),
                     "best-checkpoint metric: surface_dice_0 | surface_dice_tol | dice (segmentation), "
                     "auc | log_loss | val_loss (classification)"),
        "thresholds": _s([round(0.1 * i, 1) for i in range(1, 10)],
                         _list(_float(0, 1, open_lo=True, open_hi=True), what="numbers in (0, 1)"),
                         "probability thresholds swept on validation; the best is stored with the checkpoint"),
        "batch_size": _s(16, _int(1), "inference batch (slabs or 3D windows)"),
        "overlap": _s(0.25, _float(0, 1, open_hi=True), "3D sliding-window overlap"),
        "max_volumes": _s(None, _int(1, optional=True), "validate on at most this many volumes; null: all"),
    },
    "classification": {
        "n_slabs": _s(15, _int(1), "slabs per sequence (per target)"),
        "image_size": _s([128, 128], _list(_int(8), length=2, what="integers >= 8"), "slab size (H, W) after resizing"),
        "slice_weight": _s(15.0, _float(0), "weight of the per-slice loss"),
        "seq_weight": _s(1.0, _float(0), "weight of the per-sequence loss"),
        "pos_weight": _s(2.0, _float(0, open_lo=True), "BCE weight of positive targets (competition: 2)"),
        "mixup_prob": _s(0.5, _float(0, 1), "probability that a batch is mixed up"),
        "mixup_alpha": _s(1.0, _float(0, open_lo=True), "Beta(alpha, alpha) of the mixup weight"),
        "shuffle_prob": _s(0.1, _float(0, 1), "probability that a sequence's slab order is randomly permuted"),
        "plane": _s("xy", _choice(PLANES), "plane of the slabs; sequences run along its normal"),
        "crop_margin": _s(0.1, _float(0, 1), "in-plane crop around a target's label, grown by this share per side"),
    },
}

AUGMENT_3D = {
    "flip_prob": 0.5,  # per axis, RandFlipd
    "rot90_prob": 0.5,  # RandRotate90d in the xy plane
    "scale_intensity": 0.1,  # RandScaleIntensityd factors, with probability intensity_prob
    "shift_intensity": 0.1,  # RandShiftIntensityd offsets, with probability intensity_prob
    "intensity_prob": 0.5,
}


# Defaults that differ by task (dotted keys), applied where the config does not set them.
TASK_DEFAULTS = {
    "classification": {"samples_per_epoch": None, "val.metric": "auc", "network.name": "sequence_classifier"},
}


def _defaults(schema: dict) -> dict:
    return {k: _defaults(v) if isinstance(v, dict) else copy.deepcopy(v.default) for k, v in schema.items()}


DEFAULTS: dict[str, Any] = _defaults(SCHEMA)


def _validate_section(given: dict, schema: dict, prefix: str) -> dict:
    unknown = sorted(set(given) - set(schema))
    if unknown:
        raise SlabError(
            f"config: unknown key {prefix + unknown[0]!r}"
            f"{f' (and {len(unknown) - 1} more)' if len(unknown) > 1 else ''}; valid keys: {', '.join(schema)}"
        )
    out = {}
    for key, spec in schema.items():
        name = f"{prefix}{key}"
        if isinstance(spec, dict):
            value = given.get(key, {})
            if not isinstance(value, dict):
                raise _fail(name, "an object (JSON dict)", value)
            out[key] = _validate_section(value, spec, name + ".")
        else:
            value = given.get(key, spec.default)
            # null switches normalisation / augmentation off; keep it distinguishable from {}
            if key in ("normalize", "augment") and value is None:
                out[key] = None
                continue
            out[key] = spec.check(copy.deepcopy(value), name)
    return out


def _check_kwargs(options: dict, cls: Any, name: str, skip: Sequence[str] = ("self", "keys")) -> None:
    """Unknown keyword arguments of ``cls`` named before anything is built."""
    params = inspect.signature(cls).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return
    valid = [p for p in params if p not in skip]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise SlabError(f"config: unknown key {name + '.' + unknown[0]!r}; valid keys: {', '.join(valid)}")


def validate_config(config: dict | str | Path | None = None) -> dict:
    """Check a training configuration and fill in every default.

    Parameters
    ----------
    config : dict, path to a JSON file, or None (all defaults)

    Returns
    -------
    dict
        A complete configuration (``DEFAULTS`` overridden by ``config``).

    Raises
    ------
    SlabError
        An unknown key or a value of the wrong type or out of range; the message names the key,
        e.g. ``config val.tolerance_mm: expected a number >= 0, got -1``.

    Example
    -------
    >>> cfg = validate_config({"epochs": 2, "val": {"tta": "flips"}})
    >>> cfg["epochs"], cfg["val"]["tta"], cfg["loss"]
    (2, 'flips', 'dice_bce')
    """
    if config is None:
        config = {}
    if isinstance(config, (str, Path)):
        config = read_config(config)
    if not isinstance(config, dict):
        raise SlabError(f"config: expected a JSON object, got {type(config).__name__}")
    config = copy.deepcopy(config)
    task = config.get("task")
    for dotted, value in (TASK_DEFAULTS.get(task, {}) if isinstance(task, str) else {}).items():
        *path, key = dotted.split(".")
        section = config
        for part in path:
            if not isinstance(section.get(part, {}), dict):
                break
            section = section.setdefault(part, {})
        else:
            section.setdefault(key, value)
    cfg = _validate_section(config, SCHEMA, "")
    task = cfg["task"]
    net = cfg["network"]
    if not isinstance(net.get("name", "unet"), str):
        raise _fail("network.name", "a network name", net.get("name"))
    net.setdefault("name", "sequence_classifier" if task == "classification" else "unet")
    if task == "classification" and net["name"] != "sequence_classifier":
        raise _fail("network.name", "sequence_classifier for the classification task", net["name"])
    if task != "classification" and net["name"] == "sequence_classifier":
        raise _fail("network.name", f"a segmentation network for {task}", net["name"])
    want_dims = 3 if task == "segmentation_3d" else 2
    if net.get("spatial_dims", want_dims) != want_dims:
        raise _fail("network.spatial_dims", f"{want_dims} for {task} (or leave it out)", net["spatial_dims"])
    patch = cfg["patch_size"]
    if task == "segmentation_3d" and (patch is None or len(patch) != 3):
        raise _fail("patch_size", "3 integers (X, Y, Z) for segmentation_3d", patch)
    if task == "segmentation_2p5d" and patch is not None and len(patch) != 2:
        raise _fail("patch_size", "2 integers (H, W) or null for segmentation_2p5d", patch)
    if cfg["warmup_epochs"] > cfg["epochs"]:
        raise _fail("warmup_epochs", f"at most epochs ({cfg['epochs']})", cfg["warmup_epochs"])
    if cfg["samples_per_epoch"] is None and task != "classification":
        raise _fail("samples_per_epoch", "a positive integer for segmentation", None)
    if cfg["samples_per_epoch"] is not None and cfg["samples_per_epoch"] < cfg["batch_size"]:
        raise _fail("samples_per_epoch", f"at least batch_size ({cfg['batch_size']})", cfg["samples_per_epoch"])
    metric = cfg["val"]["metric"]
    if task == "classification" and metric not in CLS_METRICS + ("val_loss",):
        raise _fail("val.metric", f"one of {', '.join(CLS_METRICS + ('val_loss',))} for classification", metric)
    if task != "classification" and metric not in SEG_METRICS:
        raise _fail("val.metric", f"one of {', '.join(SEG_METRICS)} for segmentation", metric)
    if task == "segmentation_3d" and cfg["val"]["tta"] == "full":
        raise _fail("val.tta", "none or flips for segmentation_3d", "full")
    if task == "classification" and cfg["augment"]:
        raise _fail("augment", "{} or null for classification (its augmentation is mixup and shuffling, "
                    "see the classification section)", cfg["augment"])
    if task == "classification" and cfg["loss"] != "dice_bce":
        raise _fail("loss", "dice_bce (the BCE of the classification recipe)", cfg["loss"])
    if cfg["normalize"] is not None:
        from transforms.intensity import PercentileNormalize

        _check_kwargs(cfg["normalize"], PercentileNormalize, "normalize")
        try:
            PercentileNormalize(**cfg["normalize"])
        except SlabError as err:
            raise SlabError(f"config normalize.{err}") from None
    if task == "segmentation_2p5d" and cfg["augment"] is not None:
        from transforms.augment import RandSlabAugmentd

        _check_kwargs(cfg["augment"], RandSlabAugmentd, "augment",
                      skip=("self", "keys", "label_keys", "allow_missing_keys"))
        try:
            RandSlabAugmentd(**cfg["augment"])
        except SlabError as err:
            raise SlabError(f"config augment.{err}") from None
    if task == "segmentation_3d" and cfg["augment"] is not None:
        unknown = sorted(set(cfg["augment"]) - set(AUGMENT_3D))
        if unknown:
            raise SlabError(f"config: unknown key {'augment.' + unknown[0]!r}; valid keys: {', '.join(AUGMENT_3D)}")
        aug = {**AUGMENT_3D, **cfg["augment"]}
        for key, value in aug.items():
            check = _float(0, 1) if key.endswith("prob") else _float(0)
            aug[key] = check(value, f"augment.{key}")
        cfg["augment"] = aug
    return cfg


def read_config(path: str | Path) -> dict:
    """A configuration from a JSON file (not yet validated)."""
    return read_json_object(path, "config")


def describe_config(schema: dict | None = None, prefix: str = "") -> str:
    """A plain-text table of every key, its default and what it does (for docs and ``--help``)."""
    lines = []
    for key, spec in (schema or SCHEMA).items():
        if isinstance(spec, dict):
            lines.append(describe_config(spec, f"{prefix}{key}."))
        else:
            lines.append(f"{prefix}{key} = {json.dumps(spec.default)}: {spec.doc}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Determinism


def derive_seed(*parts: int) -> int:
    """A 31-bit seed from integers (e.g. ``seed, epoch, index``), stable across runs and machines."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy, torch (CPU and CUDA) and MONAI's ``set_determinism`` (cuDNN deterministic)."""
    from monai.utils import set_determinism

    set_determinism(seed=seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block under ``seed`` for Python, NumPy and torch (CPU), then restore the outer states.

    A sample drawn inside depends on ``seed`` alone, not on what was drawn before it, in which
    process or in which loader worker.
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def rng_states() -> dict:
    """The global RNG states, in a form ``torch.load(weights_only=True)`` reads back."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]) + [random.getstate()[0]],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state: dict) -> None:
    """Restore what :func:`rng_states` saved."""
    *internal, version = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), None))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# Optimisation


class DiceCE(nn.Module):
    """Dice + cross-entropy over exclusive classes, the background logit fixed at 0.

    The network gives one logit per foreground class (as for ``dice_bce``); a zero background
    logit is put in front and MONAI's ``DiceCELoss(softmax=True)`` scores the softmax against a
    one-channel class map (0 = background). With one class this is Dice + BCE on the sigmoid, and
    the sigmoid of each logit — what inference reports — is that class's probability against the
    background, so trained networks run through the same inference path as ``dice_bce`` ones.
    """

    def __init__(self) -> None:
        super().__init__()
        from monai.losses import DiceCELoss

        self.loss = DiceCELoss(softmax=True, to_onehot_y=True, include_background=False)

    def forward(self, logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        background = torch.zeros_like(logits[:, :1])
        return self.loss(torch.cat([background, logits], dim=1), classes)


def build_loss(name: str) -> nn.Module:
    """``dice_bce``: MONAI ``DiceCELoss(sigmoid=True)`` (Dice + BCE-with-logits, multi-label,
    binary channel targets); ``dice_ce``: :class:`DiceCE` (exclusive classes, class-map target)."""
    from monai.losses import DiceCELoss

    if name == "dice_bce":
        return DiceCELoss(sigmoid=True)
    if name == "dice_ce":
        return DiceCE()
    raise _fail("loss", f"one of {', '.join(LOSSES)}", name)


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR factor at optimizer step ``step``: linear warm-up to 1, then cosine decay to 0.

    >>> f = warmup_cosine(10, 2)
    >>> [round(f(s), 3) for s in (0, 1, 2, 6, 9)]
    [0.5, 1.0, 1.0, 0.5, 0.038]
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup_steps, span) / span))

    return factor


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a DDP wrapper."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ---------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path: Path, state: dict) -> Path:
    """``torch.save`` through ``atomic_write``: an interrupted save never leaves a broken file."""
    from transforms.io import atomic_write

    with atomic_write(path) as tmp:
        torch.save(state, tmp)
    return path


def _fsynced_save(state: dict, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def _link(target: str, link: Path) -> None:
    """Point the symbolic link ``link`` at ``target`` in one step (a temporary link renamed over it)."""
    staged = link.with_name(f".{link.name}.slab-{os.getpid()}-link")
    staged.unlink(missing_ok=True)
    os.symlink(target, staged)
    os.replace(staged, link)


def save_epoch_state(out: Path, last: dict, best: dict | None) -> None:
    """Write one epoch's ``last.pt`` and ``best.pt`` so that they change together, atomically.

    Both go into a new folder ``states/epoch_NNNNN.*/`` (``best.pt`` hard-linked from the current
    state when the best did not change; no copy), which one rename of the symbolic link ``state``
    makes current. ``RUN/last.pt`` and ``RUN/best.pt`` are links into ``state/``, so a reader, a
    crash or a kill at any moment sees either the old pair or the new pair, never one of each.
    Older state folders are removed afterwards.
    """
    states = out / "states"
    states.mkdir(parents=True, exist_ok=True)
    current = (out / "state").resolve() if (out / "state").is_symlink() else None
    new = Path(tempfile.mkdtemp(prefix=f"epoch_{int(last['epoch']):05d}.", dir=states))
    try:
        _fsynced_save(last, new / "last.pt")
        if best is not None:
            _fsynced_save(best, new / "best.pt")
        elif current is not None and (current / "best.pt").is_file():
            os.link(current / "best.pt", new / "best.pt")
        elif (out / "best.pt").is_file() and not (out / "best.pt").is_symlink():  # a run from before states/
            shutil.copy2(out / "best.pt", new / "best.pt")
        _link(os.path.relpath(new, out), out / "state")
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    for name in ("last.pt", "best.pt"):
        if not (out / name).is_symlink():
            _link(os.path.join("state", name), out / name)
    for folder in states.iterdir():
        if folder != new:
            shutil.rmtree(folder, ignore_errors=True)


def check_epoch_state(out: Path, last: dict) -> None:
    """``--resume``'s check that ``best.pt`` is the best epoch ``last.pt`` records."""
    epoch = (last.get("best") or {}).get("epoch")
    best_path = out / "best.pt"
    if epoch is None:
        return
    if not best_path.is_file():
        raise SlabError(f"--resume: {best_path} is missing, but {out / 'last.pt'} records epoch {epoch} as the best")
    best = load_checkpoint(best_path)
    if best.get("epoch") != epoch:
        raise SlabError(f"--resume: {best_path} is from epoch {best.get('epoch')}, but {out / 'last.pt'} records "
                        f"epoch {epoch} as the best; the run's checkpoints disagree")


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by :func:`train` (read with ``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise SlabError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's to fix
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise SlabError(f"{path}: not a readable checkpoint ({type(err).__name__}: {reason})") from err
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise SlabError(f"{path}: not a slab training checkpoint (no model/config)")
    return state


def config_differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every value that differs (runtime-only keys ignored)."""
    out = []
    for key in sorted(set(a) | set(b)):
        if not prefix and key in RUNTIME_KEYS:
            continue
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict) and key not in ("network", "normalize", "augment"):
            out += config_differences(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {json.dumps(va)} -> {json.dumps(vb)}")
    return out


# ---------------------------------------------------------------------------------------------
# Logs


class RunLog:
    """``log.csv``, ``curves.png`` and TensorBoard scalars, written by rank 0 after every epoch.

    TensorBoard's x axis is the optimizer step for every scalar (per-step training loss, per-epoch
    rows at their epoch's last step).
    """

    def __init__(self, out: Path, enabled: bool, first_step: int) -> None:
        self.out, self.enabled, self.writer = out, enabled, None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops what a crashed run logged past the checkpoint it resumes from
            self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=first_step)

    def step(self, name: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(name, value, step)

    def epoch(self, history: list[dict], step: int) -> None:
        if not self.enabled or not history:
            return
        from transforms.io import atomic_write

        row = history[-1]
        if self.writer is not None:
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)) and value == value:
                    self.writer.add_scalar(f"epoch/{key}", value, step)
            self.writer.flush()
        columns: list[str] = []
        for r in history:
            columns += [k for k in r if k not in columns]
        with atomic_write(self.out / "log.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            for r in history:
                writer.writerow({k: _csv_value(r.get(k)) for k in columns})
        plot_curves(history, self.out / "curves.png")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    return f"{v:.6g}" if isinstance(v, float) else v


def plot_curves(history: list[dict], path: Path) -> Path:
    """Loss curves (left) and validation metrics (right) against the epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from transforms.io import atomic_write

    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    skip = {"epoch", "lr", "images_per_s", "epoch_s", "threshold"}
    for key in [k for k in history[-1] if k not in skip]:
        points = [(e, r.get(key)) for e, r in zip(epochs, history) if isinstance(r.get(key), (int, float))]
        if not points:
            continue
        ax = ax_loss if key.endswith("loss") else ax_metric
        ax.plot(*zip(*points), marker="o", label=key)
    for ax, title in ((ax_loss, "loss"), (ax_metric, "validation")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# The loop


class TrainTask:
    """What the training loop needs from a task (2.5D, 3D segmentation, classification).

    Attributes set by subclasses: ``model`` (built, on CPU), ``n_samples`` (samples per epoch),
    ``network`` (the ``build_network`` arguments, stored in checkpoints so that the checkpoint
    alone rebuilds the network).
    """

    model: nn.Module
    n_samples: int
    network: dict
    collate: Callable = staticmethod(torch.utils.data.default_collate)

    def sample(self, index: int, epoch: int) -> Any:
        """Training sample ``index`` of ``epoch``; called under :func:`seeded`, so it may draw freely."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
        """The batch's loss (the loop runs this under autocast)."""
        raise NotImplementedError

    def batch_images(self, batch: Any) -> int:
        """2D images (slabs) or 3D patches in a batch, for the throughput."""
        raise NotImplementedError

    def has_validation(self) -> bool:
        raise NotImplementedError

    def validate(self, model: nn.Module, device: torch.device, info: DistInfo) -> dict:
        """Validation metrics (same dict on every rank); ``threshold`` among them where chosen."""
        raise NotImplementedError


class _Samples(torch.utils.data.Dataset):
    """Sample ``i`` of epoch ``e`` drawn under seed ``(seed, e, i)``, in whichever process draws it."""

    def __init__(self, task: TrainTask, seed: int) -> None:
        self.task, self.seed, self.epoch = task, seed, 0

    def __len__(self) -> int:
        return self.task.n_samples

    def __getitem__(self, index: int) -> Any:
        from monai.data.utils import set_rnd

        sample_seed = derive_seed(self.seed, self.epoch, index)
        with seeded(sample_seed):
            set_rnd(self.task, sample_seed)  # MONAI transforms keep their own RandomState
            return self.task.sample(index, self.epoch)


class _RankBatches(torch.utils.data.Sampler):
    """This rank's share of each global batch ``[s*B, (s+1)*B)`` of sample indices."""

    def __init__(self, n_samples: int, batch_size: int, info: DistInfo) -> None:
        self.steps, self.batch_size, self.info = n_samples // batch_size, batch_size, info

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for step in range(self.steps):
            indices = range(step * self.batch_size, (step + 1) * self.batch_size)
            yield rank_batch(indices, self.info.rank, self.info.world_size)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _choose_best(best: dict, row: dict, epoch: int, validated: bool) -> tuple[dict, bool]:
    """``(best, improved)`` after an epoch's ``row``.

    The best checkpoint is the one with the best ``val.metric``. While that metric is undefined
    on every epoch (an AUC on a validation split without both classes, a Dice of empty masks),
    the lowest validation loss (else training loss) stands in, recorded as ``fallback`` and
    reported once; the first epoch with a defined metric takes over from it.
    """
    metric = best["metric"]
    key = metric if metric.startswith("val_") else f"val_{metric}"
    if not validated:
        return {**best, "epoch": epoch}, True  # no validation: the last epoch is the best
    if _finite(row.get(key)):
        if best.get("fallback") or _better(metric, row[key], best["value"]):
            return {"metric": metric, "value": row[key], "epoch": epoch}, True
        return best, False
    if best["value"] is not None and not best.get("fallback"):
        return best, False
    fallback = "val_loss" if _finite(row.get("val_loss")) and metric != "val_loss" else "train_loss"
    if not best.get("fallback"):
        warnings.warn(f"val.metric {metric} is undefined at epoch {epoch} (e.g. a validation split without both "
                      f"classes); the best checkpoint is chosen by {fallback} until it is defined", SlabWarning,
                      stacklevel=3)
    if best.get("fallback") and not _better(fallback, row.get(fallback), best.get("fallback_value")):
        return best, False
    return {"metric": metric, "value": None, "epoch": epoch, "fallback": fallback,
            "fallback_value": row.get(fallback)}, True


def epoch_line(row: dict, epochs: int) -> str:
    """One line per epoch: ``epoch 3/10  train_loss 0.4123  val_dice 0.8120  threshold 0.5  12.3 s``."""
    parts = [f"epoch {row['epoch']}/{epochs}"]
    for key, value in row.items():
        if key in ("epoch", "lr", "images_per_s", "epoch_s") or key.startswith("val_auc_"):
            continue
        if isinstance(value, float):
            parts.append(f"{key} {value:.4f}")
        elif isinstance(value, list):
            parts.append(f"{key} {','.join(f'{v:g}' for v in value)}")
    parts.append(f"{row['images_per_s']:.1f} img/s  {row['epoch_s']:.1f} s")
    return "  ".join(parts)


def _better(metric: str, value: float | None, best: float | None) -> bool:
    if value is None or value != value:
        return False
    if best is None:
        return True
    return value < best if metric in LOWER_IS_BETTER else value > best


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not (enabled and sys.stderr.isatty()), leave=False, dynamic_ncols=True)


def train(
    datalist: str | Path | dict,
    config: dict | str | Path | None = None,
    out: str | Path = "run",
    *,
    fold: int | None = None,
    resume: bool = False,
    device: str | torch.device | None = None,
    epochs: int | None = None,
) -> dict:
    """Train a segmentation or classification network; see the module docstring for the outputs.

    Parameters
    ----------
    datalist : path to a ``datalist.json`` (or the loaded dict)
        Decathlon style: ``training`` (and optional ``validation``) lists of ``{"image", "label"}``
        with a ``fold`` per case; paths relative to the datalist's directory.
    config : dict or path to a JSON file, optional
        The training configuration (:data:`DEFAULTS`, checked by :func:`validate_config`).
    out : path
        The run directory. It must not hold a run unless ``resume``.
    fold : int, optional
        Validate on the cases of this fold and train on the others; without it, train on every
        ``training`` case and validate on ``validation``.
    resume : bool
        Continue the run in ``out`` from ``last.pt``; the configuration must be the same.
    device : ``cpu``, ``cuda``, ``cuda:N`` or None (CUDA when available)
    epochs : int, optional
        Overrides ``config["epochs"]``.

    Returns
    -------
    dict
        ``history`` (one dict per epoch), ``best`` (metric, value, epoch), ``threshold``,
        ``best_checkpoint`` and ``last_checkpoint`` paths.

    Raises
    ------
    SlabError
        Bad configuration or data, or a resume that does not match the run: before any training.
    """
    if isinstance(config, (str, Path)):
        config = read_config(config)
    config = dict(config or {})
    if epochs is not None:
        config["epochs"] = epochs
    cfg = validate_config(config)
    device = resolve_device(device)
    joined = torch.distributed.is_available() and torch.distributed.is_initialized()
    info = init_distributed(device)
    try:
        return _train(datalist, cfg, Path(out), fold, resume, process_device(device, info), info)
    finally:
        if not joined:  # leave a process group the caller set up to the caller
            cleanup_distributed()


def inference_network(cfg: dict, task) -> dict:
    """What ``slab predict --network RUN/network.json --weights RUN/best.pt`` needs of a
    segmentation run: the ``build_network`` arguments, the slab offsets and planes (2.5D) or
    the window (3D), and the label names."""
    config = dict(task.network)
    if cfg["task"] == "segmentation_2p5d":
        config.update(offsets=cfg["offsets"], planes=cfg["val"]["planes"] or cfg["planes"])
    else:
        config["roi_size"] = cfg["patch_size"]
    if getattr(task, "label_names", None):
        config["labels"] = list(task.label_names)
    return config


def _resume_state(out: Path, cfg: dict, resume: bool) -> dict | None:
    last = out / "last.pt"
    if not resume:
        if last.exists():
            raise SlabError(f"{out}: already holds a run (last.pt); pass --resume to continue it "
                            "or choose another --out")
        return None
    if not last.exists():
        raise SlabError(f"--resume: {last} not found; nothing to resume")
    state = load_checkpoint(last)
    check_epoch_state(out, state)
    diff = config_differences(state["config"], cfg)
    if diff:
        raise SlabError(f"--resume: {out} was trained with another config ({'; '.join(diff[:4])})")
    return state


def _build_task(datalist, cfg: dict, fold: int | None, info: DistInfo) -> TrainTask:
    if cfg["task"] == "classification":
        from pipeline.train_cls import ClassificationTask

        return ClassificationTask(datalist, cfg, fold, info)
    if cfg["task"] == "segmentation_3d":
        return Segmentation3DTask(datalist, cfg, fold, info)
    return Segmentation2p5DTask(datalist, cfg, fold, info)


def _train(datalist, cfg: dict, out: Path, fold, resume: bool, device: torch.device, info: DistInfo) -> dict:
    state = _resume_state(out, cfg, resume)
    seed_everything(cfg["seed"])  # the model's initial weights
    task = _build_task(datalist, cfg, fold, info)
    if cfg["batch_size"] % info.world_size:
        raise _fail("batch_size", f"a multiple of the {info.world_size} processes", cfg["batch_size"])
    model = task.model.to(device)
    dtype = amp_dtype(device, cfg["amp"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    steps = task.n_samples // cfg["batch_size"]
    if steps == 0:
        raise _fail("batch_size", f"at most the {task.n_samples} training samples per epoch", cfg["batch_size"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(steps * cfg["epochs"], round(cfg["warmup_epochs"] * steps))
    )
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    history: list[dict] = []
    best = {"metric": cfg["val"]["metric"], "value": None, "epoch": None}
    threshold: Any = 0.5  # of the latest validation
    best_threshold: Any = 0.5
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        set_rng_states(state["rng"])
        history, best, start = list(state["history"]), dict(state["best"]), state["epoch"]
        threshold, best_threshold = state["threshold"], state["best_threshold"]
    if info.is_main:
        from transforms.io import atomic_write

        out.mkdir(parents=True, exist_ok=True)
        with atomic_write(out / "config.json") as tmp:
            tmp.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        if cfg["task"] != "classification":
            with atomic_write(out / "network.json") as tmp:
                tmp.write_text(json.dumps(inference_network(cfg, task), indent=2) + "\n", encoding="utf-8")
    barrier(info)
    net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if info.enabled else model
    samples = _Samples(task, cfg["seed"])
    loader = torch.utils.data.DataLoader(
        samples,
        batch_sampler=_RankBatches(task.n_samples, cfg["batch_size"], info),
        num_workers=cfg["num_workers"],
        collate_fn=task.collate,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg["seed"]),  # loader draws never touch the global RNG
    )
    log = RunLog(out, info.is_main, start * steps)
    try:
        for epoch in range(start, cfg["epochs"]):
            row = _epoch(net, task, loader, samples, optimizer, scheduler, scaler, cfg, epoch, device, dtype, info, log)
            if task.has_validation() and ((epoch + 1) % cfg["val_every"] == 0 or epoch + 1 == cfg["epochs"]):
                metrics = task.validate(unwrap(net), device, info)
                row.update({f"val_{k}" if not k.startswith("val_") and k != "threshold" else k: v
                            for k, v in metrics.items()})
                if "threshold" in metrics:
                    threshold = metrics["threshold"]
            history.append(row)
            best, improved = _choose_best(best, row, epoch + 1, task.has_validation())
            if improved:
                best_threshold = threshold
            if info.is_main:
                print(epoch_line(row, cfg["epochs"]), flush=True)
            if info.is_main:
                ckpt = {
                    "model": {k: v.detach().cpu() for k, v in unwrap(net).state_dict().items()},
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "epoch": epoch + 1,
                    "config": cfg,
                    "network": task.network,
                    "threshold": threshold,
                    "best_threshold": best_threshold,
                    "metrics": row,
                    "best": best,
                    "history": history,
                    "rng": rng_states(),
                }
                save_epoch_state(out, ckpt, ckpt if improved else None)
                log.epoch(history, (epoch + 1) * steps)
            barrier(info)
    finally:
        log.close()
    return {
        "history": history,
        "best": best,
        "threshold": best_threshold,
        "best_checkpoint": str(out / "best.pt"),
        "last_checkpoint": str(out / "last.pt"),
    }


def _epoch(net, task, loader, samples, optimizer, scheduler, scaler, cfg, epoch, device, dtype, info, log) -> dict:
    seed = derive_seed(cfg["seed"], epoch, info.rank)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    samples.epoch = epoch
    net.train()
    losses: list[float] = []
    images = 0
    lr = optimizer.param_groups[0]["lr"]
    start = time.perf_counter()
    bar = _progress(len(loader), cfg["progress"] and info.is_main, f"epoch {epoch + 1}/{cfg['epochs']}")
    for step, batch in enumerate(loader):
        with autocast(device, dtype):
            loss = task.loss(net, batch, device)
        if not torch.isfinite(loss):
            raise SlabError(f"training diverged at epoch {epoch + 1}, step {step + 1} (loss {float(loss)}); lower lr")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg["grad_clip"] is not None:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(net.parameters(), cfg["grad_clip"])
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        losses.append(float(loss.detach()))
        images += task.batch_images(batch) * info.world_size
        elapsed = time.perf_counter() - start
        bar.set_postfix(loss=f"{losses[-1]:.4f}", img_s=f"{images / max(elapsed, 1e-9):.1f}")
        bar.update()
        log.step("step/train_loss", losses[-1], epoch * len(loader) + step)
    bar.close()
    elapsed = time.perf_counter() - start
    train_loss = all_reduce_mean([float(np.mean(losses)) if losses else float("nan")], info)[0]
    return {
        "epoch": epoch + 1,
        "lr": lr,
        "train_loss": train_loss,
        "images_per_s": images / max(elapsed, 1e-9),
        "epoch_s": elapsed,
    }


# ---------------------------------------------------------------------------------------------
# Segmentation data


def split_items(datalist, fold: int | None) -> tuple[list[dict], list[dict], dict]:
    """``(training, validation, datalist)``: items with paths resolved and checked to exist
    (:func:`pipeline.datasets.load_datalist`), and the datalist itself (label names, format).

    With ``fold``, the items of that fold (from ``training`` and ``validation`` together) are the
    validation set; the folds group items by case, so no case is on both sides.
    """
    from pipeline.datasets import load_datalist

    train_items, val_items = load_datalist(datalist, fold=fold)
    data = datalist if isinstance(datalist, dict) else read_json_object(datalist, "datalist")
    if not train_items:
        raise SlabError(f"datalist: no training items{'' if fold is None else f' outside fold {fold}'}")
    return list(train_items), list(val_items), data


def label_layout(datalist: dict, label_channels: int) -> tuple[str, int]:
    """``(label_format, number of labels)``: ``channels`` (one binary channel per label) or
    ``values`` (one channel, value ``i + 1`` is label ``i``), as the datalist declares."""
    fmt = datalist.get("label_format", "channels")
    if fmt not in ("channels", "values"):
        raise SlabError(f"datalist label_format: expected channels or values, got {fmt!r}")
    names = datalist.get("labels")
    if fmt == "values":
        if not names:
            raise SlabError("datalist: label_format 'values' needs the 'labels' list naming values 1..N")
        return fmt, len(names)
    if names and len(names) != label_channels:
        raise SlabError(f"datalist labels: {len(names)} names for labels of {label_channels} channels")
    return fmt, label_channels


def seg_target(label: np.ndarray, fmt: str, n_labels: int, loss: str) -> np.ndarray:
    """The training target of a label volume ``(C, X, Y, Z)``: float32 binary channels for
    ``dice_bce``, a one-channel int64 class map for ``dice_ce`` (0 = background)."""
    if loss == "dice_ce":
        if fmt == "values":
            return label[:1].astype(np.int64)
        classes = np.zeros((1, *label.shape[1:]), np.int64)
        for i in range(label.shape[0]):
            classes[0][label[i] > 0] = i + 1
        return classes
    if fmt == "values":
        return np.stack([label[0] == i + 1 for i in range(n_labels)]).astype(np.float32)
    return (label > 0).astype(np.float32)


def truth_masks(label: np.ndarray, fmt: str, n_labels: int) -> np.ndarray:
    """Binary ``(L, X, Y, Z)`` masks (uint8) of a label volume, one channel per label."""
    if fmt == "values":
        return np.stack([label[0] == i + 1 for i in range(n_labels)]).astype(np.uint8)
    return (label > 0).astype(np.uint8)


def load_pair(item: dict, normalize: dict | None) -> tuple[torch.Tensor, np.ndarray, tuple[float, float, float]]:
    """``(image float32 (C, X, Y, Z) normalised, label (C', X, Y, Z), spacing)`` of a datalist item;
    image and label must share shape and geometry."""
    from transforms.intensity import PercentileNormalize
    from transforms.io import check_same_geometry, load_volume

    image = load_volume(item["image"])
    if "label" not in item:
        raise SlabError(f"{item['image']}: datalist item without a label")
    label = load_volume(item["label"])
    check_same_geometry(image, label, names=[str(item["image"]), str(item["label"])])
    spacing = tuple(float(s) for s in image.meta["spacing"])
    if normalize is not None:
        image = PercentileNormalize(**normalize)(image)
    array = torch.as_tensor(np.asarray(image, dtype=np.float32))
    if not torch.isfinite(array).all():
        raise SlabError(f"{item['image']}: NaN or Inf intensities; normalise or clean the volume first")
    return array, np.asarray(label), spacing


# ---------------------------------------------------------------------------------------------
# Segmentation validation


class SegValidation:
    """Whole validation volumes through the inference engine; surface dice at tolerance 0 and at
    ``val.tolerance_mm``, Dice, each swept over ``val.thresholds``.

    The threshold of each label is the one maximising the mean (over volumes) of the chosen
    metric; the reported metrics are means over volumes and labels at those thresholds.
    Volumes are sharded over ranks and the curves gathered.
    """

    def __init__(self, items: list[dict], cfg: dict, fmt: str, n_labels: int,
                 predict: Callable[[nn.Module, torch.Tensor, torch.device], np.ndarray], info: DistInfo) -> None:
        from pipeline.distributed import shard_items

        limit = cfg["val"]["max_volumes"]
        self.items = items[:limit] if limit else items
        self.cfg, self.predict = cfg, predict
        tol = cfg["val"]["tolerance_mm"]
        self.tolerances = [0.0] if tol == 0 else [0.0, tol]
        self.volumes = []
        for index, item in shard_items(list(enumerate(self.items)), info.rank, info.world_size):
            image, label, spacing = load_pair(item, cfg["normalize"])
            self.volumes.append((index, image, truth_masks(label, fmt, n_labels), spacing))

    def __call__(self, model: nn.Module, device: torch.device, info: DistInfo) -> dict:
        from pipeline.distributed import gather_objects
        from pipeline.metrics import threshold_sweep

        model.eval()
        curves = []
        for index, image, truth, spacing in self.volumes:
            prob = self.predict(model, image, device)
            sweep = threshold_sweep(prob, truth, self.cfg["val"]["thresholds"], spacing, self.tolerances)
            curves.append((index, sweep["thresholds"], [
                {"dice": c["dice"], "surface_dice_0": c["surface_dice"][str(0.0)],
                 "surface_dice_tol": c["surface_dice"][str(float(self.tolerances[-1]))]}
                for c in sweep["classes"]
            ]))
        gathered = sorted((c for part in gather_objects(curves, info) for c in part), key=lambda c: c[0])
        model.train()
        return summarize_sweeps(gathered, self.cfg["val"]["metric"])


def summarize_sweeps(curves: list, metric: str) -> dict:
    """Per-label thresholds maximising ``metric`` (mean over volumes) and the metrics there."""
    thresholds = curves[0][1]
    n_labels = len(curves[0][2])
    chosen, scores = [], {k: [] for k in SEG_METRICS}
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for c in range(n_labels):
                means = {k: np.nanmean(np.array([v[2][c][k] for v in curves], np.float64), axis=0) for k in SEG_METRICS}
                curve = means[metric]
                best = int(np.nanargmax(curve)) if not np.isnan(curve).all() else len(thresholds) // 2
                chosen.append(float(thresholds[best]))
                for k in SEG_METRICS:
                    scores[k].append(float(means[k][best]))
            out = {k: float(np.nanmean(v)) if not np.isnan(v).all() else float("nan") for k, v in scores.items()}
    out["threshold"] = chosen[0] if n_labels == 1 else chosen
    return out


# ---------------------------------------------------------------------------------------------
# Segmentation tasks


def _network_args(cfg: dict, spatial_dims: int, in_channels: int, out_channels: int) -> dict:
    """The ``build_network`` arguments: the config's, with dims and channels from the data."""
    net = dict(cfg["network"])
    for key, value in (("spatial_dims", spatial_dims), ("in_channels", in_channels), ("out_channels", out_channels)):
        if key in net and net[key] != value:
            raise _fail(f"network.{key}", f"{value} (from the task and the data)", net[key])
        net[key] = value
    return net


def _options(net: dict) -> dict:
    """The MONAI options of ``build_network`` arguments (all but name, dims and channels)."""
    return {k: v for k, v in net.items() if k not in ("name", "spatial_dims", "in_channels", "out_channels")}


def _build_model(net: dict) -> nn.Module:
    from networks import build_network

    try:
        return build_network(net["name"], net["spatial_dims"], net["in_channels"], net["out_channels"], **_options(net))
    except SlabError as err:
        raise SlabError(f"config {err}") from None


def _channels(path, name: str) -> int:
    """Channels of a volume file, from its header where the format allows."""
    from transforms.io import load_volume

    try:
        volume = load_volume(path, lazy=True)
    except SlabError:
        volume = load_volume(path)
    if len(volume.shape) != 4:
        raise SlabError(f"{path}: expected a (C, X, Y, Z) {name}, got shape {tuple(volume.shape)}")
    return int(volume.shape[0])


class _SegmentationTask(TrainTask):
    """Shared by 2.5D and 3D: data split, label layout, network, loss, validation."""

    spatial_dims = 2

    def __init__(self, datalist, cfg: dict, fold: int | None, info: DistInfo) -> None:
        from networks import network_divisor, network_min_size

        self.cfg = cfg
        train_items, val_items, data = split_items(datalist, fold)
        for item in train_items + val_items:
            if "label" not in item:
                raise SlabError(f"{item['image']}: datalist item without a label")
        self.train_items = train_items
        self.n_samples = cfg["samples_per_epoch"]
        self.loss_fn = build_loss(cfg["loss"])
        first = train_items[0]
        self.image_channels = sum(_channels(p, "image") for p in first["image"]) \
            if isinstance(first["image"], list) else _channels(first["image"], "image")
        self.label_channels = _channels(first["label"], "label")
        self.fmt, self.n_labels = label_layout(data, self.label_channels)
        names = data.get("labels")
        self.label_names = list(names) if isinstance(names, list) and len(names) == self.n_labels else None
        self.network = _network_args(cfg, self.spatial_dims, self.in_channels(), self.n_labels)
        self.model = _build_model(self.network)
        self.divisor = network_divisor(self.network["name"], self.spatial_dims, **_options(self.network))
        self.min_size = network_min_size(self.network["name"], self.spatial_dims, **_options(self.network))
        self.validation = None
        self.val_items = val_items
        self.info = info

    def start_validation(self) -> None:
        """Load (this rank's share of) the validation volumes; after the training data checks."""
        if self.val_items:
            self.validation = SegValidation(self.val_items, self.cfg, self.fmt, self.n_labels, self.predict, self.info)
            for _, image, truth, _ in self.validation.volumes:
                if image.shape[0] != self.image_channels or truth.shape[0] != self.n_labels:
                    raise SlabError(f"validation volumes: {image.shape[0]} image channels / {truth.shape[0]} labels; "
                                    f"training has {self.image_channels} / {self.n_labels}")

    def in_channels(self) -> int:
        raise NotImplementedError

    def label_transform(self, label) -> np.ndarray:
        return seg_target(np.asarray(label), self.fmt, self.n_labels, self.cfg["loss"])

    def check_channels(self, name: str, image_channels: int, label_channels: int) -> None:
        if image_channels != self.image_channels or label_channels != self.label_channels:
            raise SlabError(
                f"{name}: {image_channels} image / {label_channels} label channels; the first training "
                f"item has {self.image_channels} / {self.label_channels}"
            )

    def predict(self, model: nn.Module, image: torch.Tensor, device: torch.device) -> np.ndarray:
        raise NotImplementedError

    def loss(self, model, batch, device):
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        logits = model(images)
        return self.loss_fn(logits.float(), labels)

    def batch_images(self, batch) -> int:
        return int(batch["image"].shape[0])

    def has_validation(self) -> bool:
        return self.validation is not None

    def validate(self, model, device, info):
        return self.validation(model, device, info)


class _PadCollate:
    """Batch samples of different sizes: zero-pad images and labels to the largest, rounded up
    to the network's divisor and at least its minimum size (extra voxels after the data, so
    crops stay aligned)."""

    def __init__(self, divisor: int, min_size: int = 1) -> None:
        self.divisor, self.min_size = divisor, min_size

    def __call__(self, samples: list[dict]) -> dict:
        import torch.nn.functional as F

        from networks import padded_size

        dims = samples[0]["image"].ndim - 1
        size = [max(s["image"].shape[1 + d] for s in samples) for d in range(dims)]
        size = [padded_size(n, self.divisor, self.min_size) for n in size]
        out = {}
        for key in ("image", "label"):
            padded = []
            for s in samples:
                x = torch.as_tensor(s[key])
                pad = []
                for d in reversed(range(dims)):
                    pad += [0, size[d] - x.shape[1 + d]]
                padded.append(F.pad(x, pad) if any(pad) else x)
            out[key] = torch.stack(padded)
        return out


class Segmentation2p5DTask(_SegmentationTask):
    """2.5D slabs from :class:`pipeline.datasets.SlabDataset`: planes, offsets, positive-weighted
    slices, optional crop, :class:`transforms.augment.RandSlabAugmentd`; whole-volume validation
    through :func:`pipeline.infer.predict_2p5d` over ``val.planes`` with ``val.tta``."""

    def __init__(self, datalist, cfg, fold, info) -> None:
        super().__init__(datalist, cfg, fold, info)
        from pipeline.datasets import SlabDataset
        from transforms.augment import RandSlabAugmentd

        augment = None
        if cfg["augment"] is not None:
            try:
                augment = RandSlabAugmentd(**cfg["augment"])
            except SlabError as err:
                raise SlabError(f"config augment.{err}") from None
        self.dataset = SlabDataset(
            self.train_items, offsets=cfg["offsets"], planes=cfg["planes"], samples_per_epoch=self.n_samples,
            positive_fraction=cfg["positive_fraction"], patch_size=cfg["patch_size"], normalize=cfg["normalize"],
            augment=augment, label_transform=self.label_transform, seed=cfg["seed"],
        )
        targets = self.dataset.labels[0].shape[0]
        for name, image, label in zip(self.dataset.names, self.dataset.images, self.dataset.labels):
            if image.shape[0] != self.image_channels or label.shape[0] != targets:
                raise SlabError(f"{name}: {image.shape[0]} image channels / {label.shape[0]} label targets; the first "
                                f"training item has {self.image_channels} / {targets}")
        self.collate = _PadCollate(self.divisor, self.min_size)
        self.start_validation()

    def in_channels(self) -> int:
        return self.image_channels * len(self.cfg["offsets"])

    def sample(self, index: int, epoch: int):
        return self.dataset.sample(index, epoch)

    def predict(self, model, image, device):
        from pipeline.infer import predict_2p5d

        val = self.cfg["val"]
        prob = predict_2p5d(model, image, planes=val["planes"] or self.cfg["planes"], offsets=self.cfg["offsets"],
                            tta=val["tta"], batch_size=val["batch_size"], device=device, amp=self.cfg["amp"],
                            divisor=self.divisor, min_size=self.min_size)
        return np.asarray(prob)


class Segmentation3DTask(_SegmentationTask):
    """3D patches: ``RandCropByPosNegLabeld`` (pos/neg balance ``pos_neg``) from volumes held in
    memory, then RandFlipd (each axis), RandRotate90d (xy, square patches only),
    RandScaleIntensityd and RandShiftIntensityd (``AUGMENT_3D``)."""

    spatial_dims = 3

    def __init__(self, datalist, cfg, fold, info) -> None:
        super().__init__(datalist, cfg, fold, info)
        from monai.transforms import Compose, FgBgToIndicesd, SpatialPadd

        prepare = Compose([SpatialPadd(["image", "label"], cfg["patch_size"]), FgBgToIndicesd("label")])
        if any(p % self.divisor or p < self.min_size for p in cfg["patch_size"]):
            raise _fail("patch_size", f"multiples of the network's divisor {self.divisor}, each at least "
                        f"{self.min_size}", cfg["patch_size"])
        self.volumes = []
        for item in self.train_items:
            image, label, _ = load_pair(item, cfg["normalize"])
            self.check_channels(str(item["image"]), image.shape[0], label.shape[0])
            target = torch.as_tensor(self.label_transform(label))
            self.volumes.append(prepare({"image": image, "label": target}))
        self.transform = self._augmentation()
        self.start_validation()

    def in_channels(self) -> int:
        return self.image_channels

    def _augmentation(self):
        from monai.transforms import (Compose, RandCropByPosNegLabeld, RandFlipd, RandRotate90d,
                                      RandScaleIntensityd, RandShiftIntensityd)

        cfg, keys = self.cfg, ["image", "label"]
        pos, neg = cfg["pos_neg"]
        steps = [RandCropByPosNegLabeld(keys, "label", cfg["patch_size"], pos=pos, neg=neg, num_samples=1,
                                        fg_indices_key="label_fg_indices", bg_indices_key="label_bg_indices")]
        aug = cfg["augment"]
        if aug is not None:
            steps += [RandFlipd(keys, prob=aug["flip_prob"], spatial_axis=a) for a in range(3)]
            if cfg["patch_size"][0] == cfg["patch_size"][1]:
                steps.append(RandRotate90d(keys, prob=aug["rot90_prob"], spatial_axes=(0, 1)))
            steps += [RandScaleIntensityd("image", factors=aug["scale_intensity"], prob=aug["intensity_prob"]),
                      RandShiftIntensityd("image", offsets=aug["shift_intensity"], prob=aug["intensity_prob"])]
        return Compose(steps)

    def sample(self, index: int, epoch: int):
        # every volume equally often: a permutation per round of len(volumes) samples
        n = len(self.volumes)
        order = np.random.default_rng([self.cfg["seed"], epoch, index // n]).permutation(n)
        volume = self.volumes[order[index % n]]
        patch = self.transform(volume)[0]  # RandCropByPosNegLabeld gives a list of num_samples=1
        return {k: torch.as_tensor(patch[k]).as_subclass(torch.Tensor) for k in ("image", "label")}

    def predict(self, model, image, device):
        from pipeline.infer import predict_3d

        val = self.cfg["val"]
        prob = predict_3d(model, image, roi_size=self.cfg["patch_size"], overlap=val["overlap"], tta=val["tta"],
                          sw_batch_size=val["batch_size"], device=device, amp=self.cfg["amp"])
        return np.asarray(prob)
