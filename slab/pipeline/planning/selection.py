"""Choosing on out-of-fold predictions: scores per case, the post-processing of each label, and
the no-network baseline.

The *target* of a label is surface dice at tolerance 0 when the label is tubular and Dice
otherwise (the plan's choice); a candidate's score is the mean over cases (NaN, both masks empty,
skipped) of the mean over labels. Every post-processing step is tried on top of the steps
already kept and kept only if it raises the cross-validated score:

1. the threshold (a sweep of ``LEVELS``, the centre of its flat optimum:
   :func:`~slab.pipeline.evaluation.metrics.choose_threshold`), then a hysteresis pair around it,
   kept only where it beats the threshold by more than that optimum's flatness
   (``PLATEAU``), the narrowest of the pairs within it;
2. removal of components smaller than a size (fractions of the smallest true object);
3. keeping the largest k components;
4. filling enclosed holes.

The baseline is an intensity window on the normalised image, ``low <= x < high`` on one channel,
chosen per label and per fold on the *training* cases of the fold (Dice, from histograms of
``BASELINE_BINS`` bins) and scored on its held-out cases: a network that does not beat it has
not learnt more than a threshold.
"""
from __future__ import annotations

import numpy as np

from slab.pipeline.evaluation.surface import nan_mean, tolerance_key
from slab.core.checks import THRESHOLD_LEVELS


LEVELS = THRESHOLD_LEVELS
BASELINE_BINS = 48
HYSTERESIS_LEVELS = tuple(round(0.1 * i, 1) for i in range(1, 10)) + (0.95, 0.98)


def case_scores(mask: np.ndarray, truth: np.ndarray, spacing, tolerance: float, tubular) -> list[dict]:
    """Per label of one case: ``dice``, ``surface_dice_0``, ``surface_dice_tol`` and, for tubular
    labels, ``cldice``, the Betti errors ``b0_error`` / ``b1_error`` and ``small_vessel_recall``
    (centreline recall where the true radius is at most 2 voxels); ``target`` is the label's
    target metric."""
    from slab.pipeline.evaluation.metrics import evaluate
    from slab.pipeline.evaluation.skeleton import cldice
    from slab.pipeline.evaluation.topology import radius_bins, topology_metrics

    tolerances = (0.0,) if tolerance == 0 else (0.0, float(tolerance))
    result = evaluate(np.asarray(mask, dtype=np.uint8), np.asarray(truth, dtype=np.uint8), spacing, tolerances)
    out = []
    for i, m in enumerate(result["classes"]):
        row = {"dice": m["dice"], "surface_dice_0": m["surface_dice"][tolerance_key(0.0)],
               "surface_dice_tol": m["surface_dice"][tolerance_key(tolerances[-1])]}
        if tubular[i]:
            row["cldice"] = cldice(mask[i], truth[i])["cldice"]
            topology = topology_metrics(mask[i], truth[i])
            row["b0_error"], row["b1_error"] = float(topology["b0_error"]), float(topology["b1_error"])
            small = [b for b in radius_bins(mask[i], truth[i])[:2] if b["truth_voxels"]]
            covered = sum(b["recall"] * b["truth_voxels"] for b in small)
            row["small_vessel_recall"] = covered / sum(b["truth_voxels"] for b in small) if small else float("nan")
        row["target"] = row["surface_dice_0"] if tubular[i] else row["dice"]
        out.append(row)
    return out


def mean_target(scores: list[list[dict]], label: int | None = None) -> float:
    """The mean target over cases (of one label, or the mean over labels)."""
    per_case = [s[label]["target"] if label is not None else nan_mean([r["target"] for r in s]) for s in scores]
    return nan_mean(per_case)


def summarize(scores: list[list[dict]], names: list[str]) -> dict:
    """Mean and std over cases of every metric, per label, and the overall target."""
    out = {"score": mean_target(scores), "labels": {}}
    for i, name in enumerate(names):
        metrics = {}
        for key in scores[0][i]:
            values = np.asarray([s[i][key] for s in scores], dtype=np.float64)
            values = values[~np.isnan(values)]
            metrics[key] = {"mean": float(values.mean()) if values.size else float("nan"),
                            "std": float(values.std()) if values.size else float("nan")}
        out["labels"][name] = metrics
    return out


def _apply(prob: np.ndarray, options: dict) -> np.ndarray:
    from slab.transforms.post import make_postprocess

    return np.asarray(make_postprocess(options)(prob), dtype=np.uint8)


def _label_score(cases, label: int, options: dict, spacing_of, tolerance, tubular) -> float:
    """Mean target of one label over the cases, post-processed with ``options``."""
    from slab.pipeline.evaluation.metrics import evaluate

    values = []
    for name, prob, truth in cases():
        mask = _apply(prob[label:label + 1], options)
        m = evaluate(mask, truth[label:label + 1], spacing_of(name), (0.0,))["classes"][0]
        values.append(m["surface_dice"][tolerance_key(0.0)] if tubular else m["dice"])
    return nan_mean(values)


def sweep_label(cases, label: int, spacing_of, tubular) -> dict[float, float]:
    """The label's mean target at every level of ``LEVELS`` (one pass per case)."""
    from slab.pipeline.evaluation.metrics import threshold_sweep

    curves = []
    for name, prob, truth in cases():
        sweep = threshold_sweep(prob[label], truth[label], LEVELS, spacing_of(name), 0.0,
                                metric="surface_dice" if tubular else "dice")
        curves.append(sweep["surface_dice"][tolerance_key(0.0)] if tubular else sweep["dice"])
    return {t: nan_mean([c[j] for c in curves]) for j, t in enumerate(LEVELS)}


def choose_postprocessing(cases, n_labels: int, spacing_of, tolerance: float, tubular, smallest,
                          binarise: bool = True) -> dict:
    """The post-processing of every label, chosen on out-of-fold probabilities.

    Parameters
    ----------
    cases : callable returning an iterable of ``(name, prob (L, X, Y, Z), truth (L, X, Y, Z))``
        (called once per candidate, so the cases may be read from disk each time).
    spacing_of : ``name -> spacing``.
    tubular : per label, whether its target is surface dice at 0.
    smallest : per label, the smallest true component (voxels) of the fingerprint.
    binarise : choose the threshold and a hysteresis pair; False for masks already (exclusive
        classes' argmax): threshold 0.5, the component and hole steps only.

    Returns
    -------
    ``{"labels": [per-label Postprocess settings], "steps": [per label: what was tried, its
    score, kept or not], "score_before", "score_after"}`` (scores: the target at threshold 0.5
    and after every kept step).
    """
    from slab.pipeline.evaluation.metrics import PLATEAU, choose_threshold

    chosen, steps = [], []
    for label in range(n_labels):
        score = lambda options: _label_score(cases, label, options, spacing_of, tolerance, tubular[label])  # noqa: E731
        log = []
        if not binarise:
            best = score({"threshold": 0.5})
            current, base = {"threshold": 0.5}, best
            log.append({"step": "argmax", "score": best, "kept": True})
            _components(score, current, best, smallest[label], log, chosen, steps, label, base)
            continue
        sweep = sweep_label(cases, label, spacing_of, tubular[label])
        base = sweep[0.5]
        threshold, info = choose_threshold(LEVELS, [sweep[t] for t in LEVELS])
        current, best = {"threshold": threshold}, sweep[threshold]
        log.append({"step": "threshold", "value": threshold, "score": best, "gain": best - base, "kept": True,
                    "plateau": info["plateau"], "score_pm0.1": [info["below"], info["above"]]})
        pairs = {(low, high): score({"hysteresis": [low, high]})
                 for low, high in [(lo, threshold) for lo in HYSTERESIS_LEVELS if lo < threshold]
                 + [(threshold, hi) for hi in HYSTERESIS_LEVELS if hi > threshold]}
        top = max(pairs.values(), default=-np.inf)
        if top > best + PLATEAU:
            low, high = min((p for p, v in pairs.items() if v >= top - PLATEAU), key=lambda p: (p[1] - p[0], p))
            log.append({"step": "hysteresis", "value": [low, high], "score": pairs[(low, high)],
                        "gain": pairs[(low, high)] - best, "kept": True})
            current, best = {"hysteresis": [low, high]}, pairs[(low, high)]
        _components(score, current, best, smallest[label], log, chosen, steps, label, base)
    return {"labels": chosen, "steps": steps}


def _components(score, current: dict, best: float, smallest: int, log: list, chosen: list, steps: list, label: int,
                base: float) -> None:
    """The component and hole steps of one label on top of its binarisation, each kept only if it
    raises the score; appends the label's settings to ``chosen`` and its log to ``steps``."""
    candidates = sorted({max(2, int(smallest * f)) for f in (0.25, 0.5, 1.0)} | {10, 50, 200})
    for key, values in (("min_size", candidates), ("keep_largest", [1, 2, 3]), ("fill_holes", ["3d"])):
        trial = {v: score({**current, key: v}) for v in values}
        value = max(trial, key=trial.get)
        gain = trial[value] - best
        kept = gain > 1e-9
        log.append({"step": key, "value": value, "score": trial[value], "gain": gain, "kept": kept,
                    "tried": {str(k): v for k, v in trial.items()}})
        if kept:
            current, best = {**current, key: value}, trial[value]
    chosen.append(current)
    steps.append({"label": label, "score_at_0.5": base, "score": best, "steps": log})


def bin_edges(samples: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(samples, [0.5, 99.5])
    if hi <= lo:
        hi = lo + 1.0
    edges = np.linspace(lo, hi, BASELINE_BINS + 1)
    edges[0], edges[-1] = -np.inf, np.inf
    return edges


def window_histograms(image: np.ndarray, truth: np.ndarray, edges: list[np.ndarray]) -> np.ndarray:
    """``(C, L, 2, bins)``: per channel and label, counts of all voxels and of true voxels per bin."""
    out = np.zeros((image.shape[0], truth.shape[0], 2, BASELINE_BINS), np.int64)
    for c in range(image.shape[0]):
        bins = np.clip(np.searchsorted(edges[c], image[c].reshape(-1), side="right") - 1, 0, BASELINE_BINS - 1)
        every = np.bincount(bins, minlength=BASELINE_BINS)
        for lab in range(truth.shape[0]):
            out[c, lab, 0] = every
            out[c, lab, 1] = np.bincount(bins[truth[lab].reshape(-1) > 0], minlength=BASELINE_BINS)
    return out


def best_window(histograms: list[np.ndarray], label: int) -> tuple[int, int, int, float]:
    """``(channel, first bin, end bin, mean Dice)`` of the window that maximises the mean Dice of
    ``label`` over the cases' histograms (:func:`window_histograms`)."""
    best = (0, 0, BASELINE_BINS, -1.0)
    for c in range(histograms[0].shape[0]):
        every = np.stack([h[c, label, 0] for h in histograms]).astype(np.float64)
        true = np.stack([h[c, label, 1] for h in histograms]).astype(np.float64)
        ce = np.concatenate([np.zeros((len(histograms), 1)), np.cumsum(every, 1)], 1)
        ct = np.concatenate([np.zeros((len(histograms), 1)), np.cumsum(true, 1)], 1)
        total = ct[:, -1:]
        for i in range(BASELINE_BINS):
            tp = ct[:, i + 1:] - ct[:, i:i + 1]
            pred = ce[:, i + 1:] - ce[:, i:i + 1]
            with np.errstate(invalid="ignore", divide="ignore"):
                dice = np.where(pred + total > 0, 2 * tp / (pred + total), np.nan)
            mean = np.nanmean(dice, axis=0) if not np.isnan(dice).all() else np.full(dice.shape[1], -1.0)
            j = int(np.nanargmax(mean))
            if mean[j] > best[3]:
                best = (c, i, i + 1 + j, float(mean[j]))
    return best


def window_mask(image: np.ndarray, edges: list[np.ndarray], windows: list[tuple]) -> np.ndarray:
    """``(L, X, Y, Z)`` uint8: per label, ``edges[c][i] <= image[c] < edges[c][j]``."""
    masks = []
    for channel, first, end, _ in windows:
        masks.append((image[channel] >= edges[channel][first]) & (image[channel] < edges[channel][end]))
    return np.stack(masks).astype(np.uint8)


__all__ = ["LEVELS", "case_scores", "mean_target", "summarize", "choose_postprocessing", "window_histograms",
           "best_window", "window_mask", "bin_edges"]
