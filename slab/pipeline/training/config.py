"""The training configuration: one schema table (default, check, meaning per key), validated before
anything runs, every error naming the key (``config val.tolerance_mm: expected a number >= 0,
got -1``). ``slab train --show-config`` prints :func:`describe_config`."""
from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path
from typing import Any, Callable, Sequence


from slab.core.checks import PLANES, THRESHOLD_LEVELS, TTA_MODES, is_int, is_number, read_json_object
from slab.core.errors import SlabError


TASKS = ("segmentation_2p5d", "segmentation_3d", "classification")


LOSSES = ("dice_bce", "dice_ce")




SEG_METRICS = ("surface_dice_0", "surface_dice_tol", "dice", "cldice")


CLS_METRICS = ("auc", "log_loss")


LOWER_IS_BETTER = ("log_loss", "val_loss")


# Keys that change how a run is executed, not what it computes: they may differ on resume.
RUNTIME_KEYS = ("num_workers", "progress")


class _Spec:
    """One configuration value: its default and a check that returns the cleaned value."""

    def __init__(self, default: Any, check: Callable[[Any, str], Any], doc: str) -> None:
        self.default, self.check, self.doc = default, check, doc


def config_error(name: str, expected: str, value: Any) -> SlabError:
    return SlabError(f"config {name}: expected {expected}, got {value!r}")






def _int(lo: int | None = None, hi: int | None = None, optional: bool = False):
    def check(v, name):
        if v is None and optional:
            return None
        if not is_int(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
            raise config_error(name, f"an integer{_range(lo, hi)}" + (" or null" if optional else ""), v)
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


def float_check(lo=None, hi=None, open_lo=False, open_hi=False, optional=False):
    def check(v, name):
        if v is None and optional:
            return None
        ok = is_number(v)
        if ok and lo is not None:
            ok = v > lo if open_lo else v >= lo
        if ok and hi is not None:
            ok = v < hi if open_hi else v <= hi
        if not ok:
            raise config_error(name, f"a number{_range(lo, hi, open_lo, open_hi)}" + (" or null" if optional else ""), v)
        return float(v)

    return check


def _bool(v, name):
    if not isinstance(v, bool):
        raise config_error(name, "true or false", v)
    return v


def _adjustment_check(v, name):
    if v is not True and v is not False and v != "both":
        raise config_error(name, 'true, false or "both"', v)
    return v


def _choice(options: Sequence[str]):
    def check(v, name):
        if v not in options:
            raise config_error(name, f"one of {', '.join(options)}", v)
        return v

    return check


def _optional_choice(options: Sequence[str]):
    def check(v, name):
        return None if v is None else _choice(options)(v, name)

    return check


def _list(item, min_len=1, length=None, optional=False, unique=False, what="values"):
    def check(v, name):
        if v is None and optional:
            return None
        n = f"{length} " if length else (f"at least {min_len} " if min_len else "")
        if not isinstance(v, (list, tuple)) or len(v) < min_len or (length is not None and len(v) != length):
            raise config_error(name, f"a list of {n}{what}" + (" or null" if optional else ""), v)
        out = [item(x, f"{name}[{i}]") for i, x in enumerate(v)]
        if unique and len(set(out)) != len(out):
            raise config_error(name, f"distinct {what}", v)
        return out

    return check


def _dict(v, name):
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise config_error(name, "an object (JSON dict)", v)
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
                    "scheme percentile (default; lower/upper percentiles per volume, or a fixed low/high window "
                    "of dataset statistics, soft_clip_alpha) or zscore (per-volume mean/std, or fixed mean/std; "
                    "clip); dataset: true computes the window / mean-std from the training cases' foreground "
                    "(stored in the run); null: the image is used as stored"),
    "epochs": _s(10, _int(1), "training epochs"),
    "batch_size": _s(8, _int(1), "global batch size (all processes together)"),
    "samples_per_epoch": _s(256, _int(1, optional=True), "training samples per epoch; null: one pass (classification)"),
    "patch_size": _s(None, _list(_int(1), min_len=2, optional=True, what="positive integers"),
                     "2.5D: (H, W) random crop of each slab, null = whole slices; 3D: (X, Y, Z) patch, required"),
    "positive_fraction": _s(0.5, float_check(0, 1), "2.5D: share of slabs drawn from slices with foreground"),
    "pos_neg": _s([1.0, 1.0], _list(float_check(0), length=2, what="numbers >= 0"), "3D: RandCropByPosNegLabeld pos, neg"),
    "lr": _s(1e-3, float_check(0, open_lo=True), "AdamW learning rate (peak, after warm-up)"),
    "weight_decay": _s(1e-4, float_check(0), "AdamW weight decay"),
    "warmup_epochs": _s(1.0, float_check(0), "linear warm-up length in epochs (then cosine decay to 0, per step)"),
    "grad_clip": _s(None, float_check(0, open_lo=True, optional=True), "clip the gradient norm to this; null: no clipping"),
    "loss": _s("dice_bce", _choice(LOSSES),
               "dice_bce: Dice + BCE on sigmoid outputs (multi-label); dice_ce: Dice + CE on the softmax over "
               "(background logit 0, one logit per class) for exclusive classes (see DiceCE)"),
    "dice_weight": _s(1.0, float_check(0), "weight of the loss's Dice term against its cross-entropy (MONAI's "
                      "lambda_dice); 0: the cross-entropy alone, calibrated but less accurate (measured: "
                      "benchmarks/bench_calibration.py --set dice_weight=0)"),
    "dice_batch": _s(False, _bool, "the loss's Dice over the whole batch as one sample (nnU-Net's batch dice) "
                     "instead of per sample (measured: benchmarks/bench_calibration.py --set dice_batch=true)"),
    "output_bias": _s("prior", _optional_choice(("prior",)),
                      "prior: the network starts at the training samples' foreground prior (the output layer's bias "
                      "set to its logit, measured on samples drawn as training draws them; the volumes' prior with "
                      "logit_adjustment), not at probability 0.5 (see slab.pipeline.training.prior); null: the "
                      "network's own initialisation"),
    "logit_adjustment": _s(True, _adjustment_check,
                           "true: where foreground-centred draws raise the training samples' foreground prior above "
                           "the training volumes', the loss sees the logits shifted by the difference of their "
                           "log-odds, so that the network is calibrated to whole volumes; \"both\": a lowered prior "
                           "undone too (2.5D draws of slices without foreground that are tissue, not air: the plan "
                           "decides, see slab.pipeline.training.prior); false: calibrated to the samples, as models "
                           "trained before it were"),
    "shape_loss": {
        "surface_dice": _s(0.0, float_check(0), "weight of 1 - soft surface dice at tolerance 0 (2D contours for 2.5D "
                           "slabs, 3D surfaces for 3D patches), added to loss"),
        "cldice": _s(0.0, float_check(0), "weight of 1 - soft clDice (soft skeletons), added to loss"),
        "cldice_iterations": _s(3, _int(1, 20), "soft-skeleton iterations of the clDice term"),
    },
    "augment": _s({}, _dict, "2.5D: RandSlabAugmentd arguments; 3D: flip_prob 0.5, rot90_prob 0.5, scale_intensity 0.1, "
               "shift_intensity 0.1, intensity_prob 0.5 (AUGMENT_3D); null: no augmentation"),
    "num_workers": _s(0, _int(0), "DataLoader worker processes"),
    "stream": _s(False, _bool, "read training samples from the volumes on disk (zarr, HDF5, TIFF, slice stacks, "
                 "N5, NIfTI read lazily; other formats loaded) instead of holding the volumes: 2.5D the same slabs bit "
                 "for bit, 3D the same draw of patches as RandCropByPosNegLabeld; validation volumes predicted out of "
                 "core into the run folder and scored streaming, no report pictures (classification holds only its "
                 "slab sequences either way)"),
    "seed": _s(0, _int(0, 2**31 - 1), "seed of every random draw"),
    "amp": _s(True, _bool, "mixed precision on CUDA (bf16 where supported, else fp16 with a GradScaler); CPU: fp32"),
    "val_every": _s(1, _int(1), "validate every N epochs (and after the last)"),
    "progress": _s(True, _bool, "tqdm progress bars (only on a terminal)"),
    "report_volumes": _s(2, _int(0), "validation volumes drawn in report.html at each new best (sections of "
                         "prediction and truth outlines, per label; and each as a slab view page, report/valN.html, "
                         "linked); 0: the report without pictures"),
    "val": {
        "planes": _s(None, _list(_choice(PLANES), unique=True, optional=True, what="planes"),
                     "2.5D inference planes; null: the training planes"),
        "tta": _s("none", _choice(TTA_MODES), "test-time augmentation: none | flips | full"),
        "tolerance_mm": _s(1.0, float_check(0), "tolerance of surface_dice_tol, in mm"),
        "metric": _s("surface_dice_0", _choice(SEG_METRICS + CLS_METRICS + ("val_loss",)),
                     "best-checkpoint metric: surface_dice_0 | surface_dice_tol | dice | cldice (segmentation), "
                     "auc | log_loss | val_loss (classification)"),
        "thresholds": _s(list(THRESHOLD_LEVELS),
                         _list(float_check(0, 1, open_lo=True, open_hi=True), what="numbers in (0, 1)"),
                         "probability thresholds swept on validation: 0.02, 0.05, 0.1 ... 0.95, 0.98; the centre of "
                         "the flat optimum (scores within 0.005 of the best) is stored with the checkpoint"),
        "batch_size": _s(16, _int(1), "inference batch (slabs or 3D windows)"),
        "overlap": _s(0.25, float_check(0, 1, open_hi=True), "3D sliding-window overlap"),
        "max_volumes": _s(None, _int(1, optional=True), "validate on at most this many volumes; null: all"),
        "cldice": _s(False, _bool, "also clDice at every swept threshold (3D skeletons; costs a skeletonisation per "
                     "threshold and volume); selectable as val.metric cldice"),
    },
    "classification": {
        "n_slabs": _s(15, _int(1), "slabs per sequence (per target)"),
        "image_size": _s([128, 128], _list(_int(8), length=2, what="integers >= 8"), "slab size (H, W) after resizing"),
        "slice_weight": _s(15.0, float_check(0), "weight of the per-slice loss"),
        "seq_weight": _s(1.0, float_check(0), "weight of the per-sequence loss"),
        "pos_weight": _s(2.0, float_check(0, open_lo=True), "BCE weight of positive targets (competition: 2)"),
        "mixup_prob": _s(0.5, float_check(0, 1), "probability that a batch is mixed up"),
        "mixup_alpha": _s(1.0, float_check(0, open_lo=True), "Beta(alpha, alpha) of the mixup weight"),
        "shuffle_prob": _s(0.1, float_check(0, 1), "probability that a sequence's slab order is randomly permuted"),
        "plane": _s("xy", _choice(PLANES), "plane of the slabs; sequences run along its normal"),
        "crop_margin": _s(0.1, float_check(0, 1), "in-plane crop around a target's label, grown by this share per side"),
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
                raise config_error(name, "an object (JSON dict)", value)
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
        raise config_error("network.name", "a network name", net.get("name"))
    net.setdefault("name", "sequence_classifier" if task == "classification" else "unet")
    if task == "classification" and net["name"] != "sequence_classifier":
        raise config_error("network.name", "sequence_classifier for the classification task", net["name"])
    if task != "classification" and net["name"] == "sequence_classifier":
        raise config_error("network.name", f"a segmentation network for {task}", net["name"])
    want_dims = 3 if task == "segmentation_3d" else 2
    if net.get("spatial_dims", want_dims) != want_dims:
        raise config_error("network.spatial_dims", f"{want_dims} for {task} (or leave it out)", net["spatial_dims"])
    patch = cfg["patch_size"]
    if task == "segmentation_3d" and (patch is None or len(patch) != 3):
        raise config_error("patch_size", "3 integers (X, Y, Z) for segmentation_3d", patch)
    if task == "segmentation_2p5d" and patch is not None and len(patch) != 2:
        raise config_error("patch_size", "2 integers (H, W) or null for segmentation_2p5d", patch)
    if cfg["warmup_epochs"] > cfg["epochs"]:
        raise config_error("warmup_epochs", f"at most epochs ({cfg['epochs']})", cfg["warmup_epochs"])
    if cfg["samples_per_epoch"] is None and task != "classification":
        raise config_error("samples_per_epoch", "a positive integer for segmentation", None)
    if cfg["samples_per_epoch"] is not None and cfg["samples_per_epoch"] < cfg["batch_size"]:
        raise config_error("samples_per_epoch", f"at least batch_size ({cfg['batch_size']})", cfg["samples_per_epoch"])
    metric = cfg["val"]["metric"]
    if task == "classification" and metric not in CLS_METRICS + ("val_loss",):
        raise config_error("val.metric", f"one of {', '.join(CLS_METRICS + ('val_loss',))} for classification", metric)
    if task != "classification" and metric not in SEG_METRICS:
        raise config_error("val.metric", f"one of {', '.join(SEG_METRICS)} for segmentation", metric)
    if metric == "cldice" and not cfg["val"]["cldice"]:
        raise config_error("val.metric", "a computed metric: cldice needs val.cldice true", metric)
    if task == "segmentation_3d" and cfg["val"]["tta"] == "full":
        raise config_error("val.tta", "none or flips for segmentation_3d", "full")
    if task == "classification" and cfg["augment"]:
        raise config_error("augment", "{} or null for classification (its augmentation is mixup and shuffling, "
                    "see the classification section)", cfg["augment"])
    if task == "classification" and cfg["loss"] != "dice_bce":
        raise config_error("loss", "dice_bce (the BCE of the classification recipe)", cfg["loss"])
    if cfg["normalize"] is not None:
        from slab.pipeline.training.normalization import check_dataset_flag
        from slab.transforms.intensity import make_normalize

        try:
            make_normalize(check_dataset_flag(cfg["normalize"]))
        except SlabError as err:
            message = str(err)
            raise SlabError(f"config: {message}" if message.startswith("unknown") else
                            f"config {message}" if message.startswith("normalize") else
                            f"config normalize.{message}") from None
    if task == "segmentation_2p5d" and cfg["augment"] is not None:
        from slab.transforms.augment import RandSlabAugmentd

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
            check = float_check(0, 1) if key.endswith("prob") else float_check(0)
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

