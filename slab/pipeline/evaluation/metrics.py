"""Segmentation metrics in physical units: surface dice (SenNet tolerance 0 and any tolerance in
mm), Dice, IoU, precision, recall, threshold sweeps, and MONAI cumulative metrics over them.

Masks are binary ``(X, Y, Z)`` volumes (or ``(L, X, Y, Z)`` with one channel per class): numpy
arrays, memory maps, :class:`~slab.io.lazy.LazyVolume` s or torch tensors (CPU or CUDA),
read a few slices at a time (:mod:`slab.pipeline.evaluation.surface` computes everything in one
streamed pass; its docs explain how, and the empty-mask conventions). Spacing is the voxel size
``(sx, sy, sz)`` in mm; tolerances are in mm.

SenNet discussions speak of the "hit rate", which is recall, and the "false-positive rate",
which there is 1 - precision (the fraction of predicted voxels outside the truth).
"""
from __future__ import annotations

import numpy as np
import torch
from monai.metrics import CumulativeIterationMetric
from monai.metrics.utils import do_metric_reduction

from slab.pipeline.evaluation.readers import Reader, check_pair, readers
from slab.pipeline.evaluation.surface import (
    OVERLAP_KEYS,
    channel_metrics,
    check_thresholds,
    check_tolerances,
    nan_mean,
    sweep_curves,
    tolerance_key,
)
from slab.core.checks import THRESHOLD_LEVELS, check_spacing
from slab.core.errors import SlabError

__all__ = [
    "surface_dice",
    "overlap_metrics",
    "evaluate",
    "threshold_sweep",
    "choose_threshold",
    "THRESHOLD_LEVELS",
    "plot_sweep",
    "SurfaceDiceMetric",
    "OverlapMetric",
]


def surface_dice(pred, truth, spacing=(1.0, 1.0, 1.0), tolerance: float = 0.0) -> float:
    """Surface dice of two binary masks at ``tolerance`` mm.

    Parameters
    ----------
    pred, truth : array-like, ``(X, Y, Z)`` or ``(1, X, Y, Z)``
        Binary masks (bool or 0/1 integers): numpy arrays, memory maps, LazyVolumes or torch
        tensors (CPU or CUDA). Read a few slices at a time.
    spacing : (sx, sy, sz)
        Voxel size in mm.
    tolerance : float
        Largest surface-to-surface distance (mm) that counts as a match; 0 is the SenNet
        definition (surface in the same 2x2x2 cell).

    Returns
    -------
    float
        Equal to ``surface_distance.compute_surface_dice_at_tolerance(
        compute_surface_distances(truth, pred, spacing), tolerance)``; NaN if both are empty.

    Example
    -------
    >>> a = np.zeros((8, 8, 8), bool); a[2:6, 2:6, 2:6] = True
    >>> surface_dice(a, a)
    1.0
    >>> round(surface_dice(a, np.roll(a, 1, axis=0), tolerance=1.0), 4)
    1.0
    """
    spacing = check_spacing(spacing)
    (tolerance,) = check_tolerances(tolerance)
    channels = check_pair(pred, truth)
    if len(channels) != 1:
        raise SlabError(f"pred: surface_dice takes one mask, got {len(channels)} channels; use evaluate")
    rp, rt = readers(pred, truth, channels[0], ("pred", "truth"))
    return channel_metrics(rp, rt, spacing, (tolerance,))["surface_dice"][tolerance_key(tolerance)]


def evaluate(pred, truth, spacing=(1.0, 1.0, 1.0), tolerances=(0.0,), threshold: float | None = None,
             names=("pred", "truth")) -> dict:
    """All metrics of a prediction against the truth, per class and their mean.

    Parameters
    ----------
    pred : array-like, ``(X, Y, Z)`` or ``(L, X, Y, Z)``
        Binary masks, or probabilities when ``threshold`` is given (``pred > threshold``, as
        :class:`slab.transforms.post.Threshold` and ``slab postprocess --threshold`` binarise).
    truth : array-like, same shape
        Binary masks, one channel per class.
    spacing : (sx, sy, sz)
        Voxel size in mm.
    tolerances : sequence of float
        Surface dice tolerances in mm.
    threshold : float, optional
        Threshold for a probability map.
    names : (str, str)
        What error messages call ``pred`` and ``truth`` (the CLI gives the file names).

    Returns
    -------
    dict
        ``{"dice", "iou", "precision", "recall": mean over classes (NaN skipped),
        "surface_dice": {"<tolerance>": mean, ...},
        "classes": [{"class": i, "dice", "iou", "precision", "recall", "surface_dice",
        "volume_pred_voxels", "volume_truth_voxels", "volume_pred_mm3", "volume_truth_mm3"}, ...],
        "spacing": [sx, sy, sz], "tolerances": [...], "threshold": threshold}``.
        Undefined ratios (0/0) are NaN.
    """
    spacing = check_spacing(spacing)
    tolerances = check_tolerances(tolerances)
    channels = check_pair(pred, truth, names)
    classes = []
    for i, pair in enumerate(channels):
        rp, rt = readers(pred, truth, pair, names, threshold)
        classes.append({"class": i, **channel_metrics(rp, rt, spacing, tolerances)})
    result = {k: nan_mean([m[k] for m in classes]) for k in OVERLAP_KEYS}
    if tolerances:
        result["surface_dice"] = {
            tolerance_key(t): nan_mean([m["surface_dice"][tolerance_key(t)] for m in classes]) for t in tolerances
        }
    result.update(classes=classes, spacing=list(spacing), tolerances=list(tolerances), threshold=threshold)
    return result


def overlap_metrics(pred, truth, spacing=(1.0, 1.0, 1.0), threshold: float | None = None,
                    names=("pred", "truth")) -> dict:
    """Dice, IoU, precision, recall and volumes; :func:`evaluate` without surface dice.

    Recall is SenNet's "hit rate"; 1 - precision its "false-positive rate".

    Example
    -------
    >>> a = np.zeros((4, 4, 4), np.uint8); a[:2] = 1
    >>> b = np.zeros_like(a); b[1:3] = 1
    >>> m = overlap_metrics(a, b, spacing=(0.5, 0.5, 2.0))
    >>> m["dice"], m["iou"], m["classes"][0]["volume_pred_mm3"]
    (0.5, 0.3333333333333333, 16.0)
    """
    return evaluate(pred, truth, spacing, tolerances=(), threshold=threshold, names=names)


def threshold_sweep(prob, truth, thresholds, spacing=(1.0, 1.0, 1.0), tolerance=0.0, metric: str = "surface_dice",
                    names=("prob", "truth"), cldice: bool = False) -> dict:
    """Every metric at every threshold, and the best threshold.

    The probability map is read once; each chunk is thresholded at every level and coded
    against the truth, so overlap metrics and surface dice at tolerance 0 cost one pass.
    Tolerances above 0 take one more pass per threshold over the bounding box.

    Parameters
    ----------
    prob : array-like, ``(X, Y, Z)`` or ``(L, X, Y, Z)``
        Probabilities; a voxel is foreground when ``prob > threshold`` (as ``slab postprocess``).
    truth : array-like, same shape
        Binary masks.
    thresholds : sequence of float
    spacing : (sx, sy, sz)
    tolerance : float or sequence of float
        Surface dice tolerance(s) in mm.
    metric : str
        What "best" maximises: ``"surface_dice"`` (at the first tolerance), ``"dice"``,
        ``"iou"``, ``"precision"`` or ``"recall"``. Multi-class: the mean over classes.
    names : (str, str)
        What error messages call ``prob`` and ``truth``.
    cldice : bool
        Also clDice at every threshold (per class and mean; the volumes are read whole for the
        skeletons); ``metric="cldice"`` then picks the best by it.

    Returns
    -------
    dict
        ``{"thresholds": [...], "tolerances": [...], "dice": [...], "iou": [...],
        "precision": [...], "recall": [...], "surface_dice": {"<tolerance>": [...]},
        "best": {"metric", "threshold", "value"}, "classes": [per-class curves]}``; curves
        at the top level are means over classes.
    """
    spacing = check_spacing(spacing)
    tolerances = check_tolerances(tolerance)
    levels = check_thresholds(thresholds)
    valid = (*OVERLAP_KEYS, "surface_dice") + (("cldice",) if cldice else ())
    if metric not in valid:
        raise SlabError(f"metric: expected one of {', '.join(valid)}, got {metric!r}")
    pairs = check_pair(prob, truth, names)
    classes = [sweep_curves(*readers(prob, truth, pair, names), spacing, tolerances, levels) for pair in pairs]
    if cldice:
        from slab.pipeline.evaluation.skeleton import cldice as centreline_dice

        p_all = np.asarray(prob.load() if hasattr(prob, "load") else prob)
        t_all = np.asarray(truth.load() if hasattr(truth, "load") else truth)
        if p_all.ndim == 3:
            p_all, t_all = p_all[None], t_all[None]
        for c, curves in enumerate(classes):
            curves["cldice"] = [centreline_dice(p_all[c] > t, t_all[c] > 0)["cldice"] for t in levels]
    sweep = {"thresholds": levels.tolist(), "tolerances": list(tolerances)}
    for k in OVERLAP_KEYS:
        sweep[k] = [nan_mean(v) for v in zip(*(m[k] for m in classes))]
    sweep["surface_dice"] = {
        tolerance_key(t): [nan_mean(v) for v in zip(*(m["surface_dice"][tolerance_key(t)] for m in classes))]
        for t in tolerances
    }
    if cldice:
        sweep["cldice"] = [nan_mean(v) for v in zip(*(m["cldice"] for m in classes))]
    curve = sweep["surface_dice"][tolerance_key(tolerances[0])] if metric == "surface_dice" else sweep[metric]
    scores = np.asarray(curve, dtype=np.float64)
    best = int(np.nanargmax(scores)) if not np.isnan(scores).all() else 0
    name = f"surface_dice@{tolerance_key(tolerances[0])}" if metric == "surface_dice" else metric
    sweep["best"] = {"metric": name, "threshold": float(levels[best]), "value": float(scores[best])}
    sweep["classes"] = classes
    return sweep


PLATEAU = 0.005


def choose_threshold(thresholds, scores, plateau: float = PLATEAU) -> tuple[float, dict]:
    """The threshold to keep from a sweep: the centre of its flat optimum, not its sharpest peak.

    The *plateau* is the run of consecutive thresholds around the best score whose scores lie
    within ``plateau`` of it (a tie is a plateau of its own); the threshold chosen is that run's
    middle (the lower middle of an even run). A flat optimum is where a threshold chosen on
    validation cases still holds on others; the edge of a plateau, or a lone peak, is where the
    next case's optimum has moved away.

    Returns ``(threshold, info)``: ``info`` holds the plateau's ends, the best score and
    threshold, and the scores 0.1 below and above the choice (NaN off the sweep), to report how
    sensitive the choice is.

    Example
    -------
    >>> choose_threshold([0.3, 0.4, 0.5, 0.6, 0.7], [0.80, 0.899, 0.9, 0.898, 0.70])[0]
    0.5
    >>> choose_threshold([0.3, 0.4, 0.5, 0.6, 0.7], [0.80, 0.90, 0.90, 0.90, 0.901])[0]  # flat 0.4-0.7
    0.5
    """
    t = np.asarray(thresholds, dtype=np.float64)
    v = np.asarray(scores, dtype=np.float64)
    if t.size == 0:
        raise SlabError("thresholds: nothing to choose from")
    if np.isnan(v).all():
        middle = t[len(t) // 2]
        return float(middle), {"plateau": [float(middle), float(middle)], "best": float("nan"),
                               "best_threshold": float(middle), "below": float("nan"), "above": float("nan")}
    best = int(np.nanargmax(v))
    good = np.nan_to_num(v, nan=-np.inf) >= v[best] - plateau
    lo = hi = best
    while lo > 0 and good[lo - 1]:
        lo -= 1
    while hi < len(t) - 1 and good[hi + 1]:
        hi += 1
    chosen = float(t[(lo + hi) // 2])

    valid = ~np.isnan(v)

    def at(x):  # interpolated between swept thresholds, the end's score beyond the sweep
        return float(np.interp(x, t[valid], v[valid]))

    return chosen, {"plateau": [float(t[lo]), float(t[hi])], "best": float(v[best]), "best_threshold": float(t[best]),
                    "score": at(chosen), "below": at(round(chosen - 0.1, 6)), "above": at(round(chosen + 0.1, 6))}


def plot_sweep(sweep: dict, png) -> None:
    """Plot the curves of :func:`threshold_sweep` against the threshold into ``png`` (atomically)."""
    from matplotlib.figure import Figure  # no pyplot: no backend or global state to touch

    from slab.core.outputs import atomic_write

    thresholds = sweep["thresholds"]
    best = sweep["best"]
    fig = Figure(figsize=(6.4, 4.2), dpi=100, layout="tight")
    ax = fig.add_subplot()
    for key in OVERLAP_KEYS:
        ax.plot(thresholds, np.asarray(sweep[key], dtype=float), label=key)
    for key, values in sweep["surface_dice"].items():
        ax.plot(thresholds, np.asarray(values, dtype=float), "--", label=f"surface dice @ {key} mm")
    ax.axvline(best["threshold"], color="grey", lw=0.8)
    ax.set(xlabel="threshold (foreground: > threshold)", ylabel="score", ylim=(0, 1.02),
           title=f"best {best['metric']} = {best['value']:.4f} at {best['threshold']:g}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower center")
    with atomic_write(png) as tmp:
        fig.savefig(tmp, format="png")


class _BatchMetric(CumulativeIterationMetric):
    """Batch-first ``(B, C, X, Y, Z)`` binary inputs to a ``(B, C)`` score per iteration."""

    def __init__(self, spacing, include_background: bool, reduction, get_not_nans: bool):
        super().__init__()
        self.spacing = check_spacing(spacing)
        self.include_background = include_background
        self.reduction = reduction
        self.get_not_nans = get_not_nans

    def _score(self, pred: Reader, truth: Reader) -> float:
        raise NotImplementedError

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if y_pred.ndim != 5 or tuple(y_pred.shape) != tuple(y.shape):
            raise SlabError(
                f"y_pred: expected batch-first (B, C, X, Y, Z) like y, got {tuple(y_pred.shape)} and {tuple(y.shape)}"
            )
        first = 0 if self.include_background else 1
        scores = [
            [self._score(*readers(y_pred[b], y[b], (c, c), ("y_pred", "y"))) for c in range(first, y.shape[1])]
            for b in range(y.shape[0])
        ]
        return torch.tensor(scores, dtype=torch.float32, device=y_pred.device).reshape(y.shape[0], -1)

    def aggregate(self, reduction=None):
        """Reduce the buffered ``(N, C)`` scores; NaN (undefined) entries are skipped."""
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError("the data to aggregate must be PyTorch Tensor.")
        f, not_nans = do_metric_reduction(data, reduction or self.reduction)
        return (f, not_nans) if self.get_not_nans else f


class SurfaceDiceMetric(_BatchMetric):
    """Surface dice at ``tolerance`` mm as a MONAI cumulative metric (same code as :func:`surface_dice`).

    Example
    -------
    >>> metric = SurfaceDiceMetric(tolerance=1.0, spacing=(0.8, 0.8, 2.5))  # doctest: +SKIP
    >>> metric(y_pred=pred_onehot, y=label_onehot); metric.aggregate()  # doctest: +SKIP
    """

    def __init__(self, tolerance: float = 0.0, spacing=(1.0, 1.0, 1.0), include_background: bool = True,
                 reduction="mean", get_not_nans: bool = False):
        super().__init__(spacing, include_background, reduction, get_not_nans)
        (self.tolerance,) = check_tolerances(tolerance)

    def _score(self, pred, truth):
        return channel_metrics(pred, truth, self.spacing, (self.tolerance,))["surface_dice"][
            tolerance_key(self.tolerance)
        ]


class OverlapMetric(_BatchMetric):
    """Dice, IoU, precision or recall as a MONAI cumulative metric (same code as :func:`evaluate`).

    Unlike MONAI's ``DiceMetric`` (``ignore_empty=True``), an empty truth with a non-empty
    prediction scores 0, not NaN; both empty is NaN.
    """

    def __init__(self, name: str = "dice", include_background: bool = True, reduction="mean",
                 get_not_nans: bool = False):
        if name not in OVERLAP_KEYS:
            raise SlabError(f"name: expected one of {', '.join(OVERLAP_KEYS)}, got {name!r}")
        super().__init__((1.0, 1.0, 1.0), include_background, reduction, get_not_nans)
        self.name = name

    def _score(self, pred, truth):
        return channel_metrics(pred, truth, self.spacing, ())[self.name]

