"""Whether probabilities mean what they say: the reliability curve and the expected calibration
error (ECE) of a probability map against its truth, over a region (the body).

A model is calibrated when, of the voxels it gives probability ``p``, a share ``p`` is truly
foreground. The reliability curve bins the probabilities (``BINS`` equal bins of [0, 1]) and
compares each bin's mean probability with the share of true voxels in it; the ECE is the mean
gap, weighted by the voxels in each bin (Guo et al. 2017, "On calibration of modern neural
networks"). The Brier score (mean squared error of the probabilities) is given beside it.

Counting is restricted to the *body* (:func:`body_mask`): in a head MRI three quarters of the
voxels are air that every model gets right, and counting them would hide a model's bias where it
matters. The body is the image's voxels above Otsu's threshold, with enclosed holes filled (the
ventricles and sulci inside a head, the lumen inside a body wall).
"""
from __future__ import annotations

import numpy as np


BINS = 10


def body_mask(image: np.ndarray) -> np.ndarray:
    """Boolean ``(X, Y, Z)``: the voxels of ``image`` (``(C, X, Y, Z)`` or ``(X, Y, Z)``; the
    first channel) above Otsu's threshold, enclosed holes filled. A constant image is all body."""
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    a = np.asarray(image[0] if np.ndim(image) == 4 else image, dtype=np.float32)
    finite = a[np.isfinite(a)]
    if finite.size == 0 or finite.min() == finite.max():
        return np.ones(a.shape, bool)
    sample = finite[:: max(1, finite.size // 1_000_000)]
    body = a > threshold_otsu(sample)
    return ndimage.binary_fill_holes(body) if body.any() else np.ones(a.shape, bool)


def reliability(prob, truth, region=None, bins: int = BINS) -> dict:
    """The reliability curve, ECE and Brier score of one label.

    Parameters
    ----------
    prob : array ``(X, Y, Z)`` of probabilities in [0, 1]
    truth : binary array of the same shape
    region : boolean array of the same shape, or None (every voxel)
    bins : equal-width bins of [0, 1]

    Returns
    -------
    ``{"ece", "brier", "voxels", "bins": [{"low", "high", "count", "probability", "observed"}]}``:
    per bin the voxels in it, their mean probability and the share of them that is true
    (NaN in an empty bin); ``ece`` NaN when the region is empty.

    Example
    -------
    >>> p = np.array([0.1, 0.1, 0.9, 0.9]); t = np.array([0, 0, 1, 0])
    >>> round(reliability(p, t)["ece"], 3)  # the 0.9 bin holds one true voxel of two
    0.25
    """
    p = np.asarray(prob, dtype=np.float64).reshape(-1)
    t = np.asarray(truth).reshape(-1) > 0
    if region is not None:
        keep = np.asarray(region, dtype=bool).reshape(-1)
        p, t = p[keep], t[keep]
    index = np.clip((p * bins).astype(np.int64), 0, bins - 1)
    count = np.bincount(index, minlength=bins).astype(np.float64)
    total = np.bincount(index, weights=p, minlength=bins)
    true = np.bincount(index, weights=t.astype(np.float64), minlength=bins)
    return _curve(count, total, true, float(np.sum((p - t) ** 2)))


def _curve(count: np.ndarray, total: np.ndarray, true: np.ndarray, squared: float) -> dict:
    """The curve, ECE and Brier score from per-bin voxel counts, summed probabilities, true
    voxels, and the summed squared error."""
    bins = len(count)
    n = float(count.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p, observed = total / count, true / count
    return {"ece": float(np.nansum(count * np.abs(mean_p - observed)) / n) if n else float("nan"),
            "brier": squared / n if n else float("nan"), "voxels": int(n),
            "bins": [{"low": b / bins, "high": (b + 1) / bins, "count": int(count[b]), "probability": float(mean_p[b]),
                      "observed": float(observed[b])} for b in range(bins)]}


def calibration(prob: np.ndarray, truth: np.ndarray, image=None, bins: int = BINS) -> list[dict]:
    """:func:`reliability` of every label of ``(L, X, Y, Z)`` probabilities against ``(L, X, Y,
    Z)`` truth, over the body of ``image`` (every voxel without one)."""
    region = body_mask(image) if image is not None else None
    return [reliability(prob[c], truth[c], region, bins) for c in range(prob.shape[0])]


def pooled(curves: list[dict]) -> dict:
    """One reliability curve of several (volumes): counts added, means weighted by counts."""
    count = np.array([[r["count"] for r in c["bins"]] for c in curves], np.float64)
    total = np.nan_to_num(np.array([[r["probability"] for r in c["bins"]] for c in curves])) * count
    true = np.nan_to_num(np.array([[r["observed"] for r in c["bins"]] for c in curves])) * count
    squared = sum(c["brier"] * c["voxels"] for c in curves if c["voxels"])
    return _curve(count.sum(0), total.sum(0), true.sum(0), squared)


def plot_reliability(curves: dict, png, title: str = "") -> None:
    """The reliability curves ``{name: curve}`` in one picture: mean probability against the
    share of true voxels per bin (the diagonal is perfect calibration), ECE in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from slab.core.outputs import atomic_write

    fig, ax = plt.subplots(figsize=(4.2, 4.0), dpi=100)
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1)
    for name, curve in curves.items():
        rows = [r for r in curve["bins"] if r["count"]]
        ax.plot([r["probability"] for r in rows], [r["observed"] for r in rows], marker="o", markersize=3,
                label=f"{name} (ECE {curve['ece']:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("predicted probability")
    ax.set_ylabel("share truly foreground")
    ax.set_title(title or "reliability over the body", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    with atomic_write(png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


__all__ = ["BINS", "body_mask", "reliability", "calibration", "pooled", "plot_reliability"]
