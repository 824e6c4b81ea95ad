"""Dataset-level normalisation, resolved from a run's own training cases.

A training config may ask for statistics of the training set instead of each volume's own:
``{"scheme": "percentile", "lower": 0.5, "upper": 99.5, "dataset": true}`` (a fixed window of
the training cases' foreground percentiles, for CT-like data) or ``{"scheme": "zscore",
"dataset": true}`` (their foreground mean and std). :func:`resolve_dataset_normalize` reads the
training cases of the run's fold once (the held-out fold never contributes), samples up to
``SAMPLES_PER_CASE`` foreground voxels per case (seeded; the whole volume where a case has no
foreground) and returns the settings with fixed values, which the run stores (``config.json``,
every checkpoint's inference spec): prediction uses exactly those values.
"""
from __future__ import annotations

import numpy as np

from slab.core.errors import SlabError


SAMPLES_PER_CASE = 10_000


def wants_dataset_statistics(spec) -> bool:
    return isinstance(spec, dict) and spec.get("dataset") is True


def check_dataset_flag(spec) -> dict:
    """``spec`` without its ``dataset`` flag (checked to be true or false)."""
    if not isinstance(spec, dict) or "dataset" not in spec:
        return spec
    if not isinstance(spec["dataset"], bool):
        raise SlabError(f"config normalize.dataset: expected true or false, got {spec['dataset']!r}")
    rest = {k: v for k, v in spec.items() if k != "dataset"}
    fixed = ("low", "high") if rest.get("scheme", "percentile") == "percentile" else ("mean", "std")
    if spec["dataset"] and any(k in rest for k in fixed):
        raise SlabError(f"config normalize: dataset statistics replace {'/'.join(fixed)}; give one or the other")
    return rest


def foreground_samples(items: list[dict], seed: int = 0) -> np.ndarray:
    """``(C, n)`` float64 foreground voxels sampled from every item's image (label > 0)."""
    from slab.io.volumes import load_volume

    rng = np.random.default_rng(seed)
    parts = []
    for item in items:
        image = np.asarray(load_volume(item["image"]))
        where = np.any(np.asarray(load_volume(item["label"])) > 0, axis=0) if "label" in item else \
            np.zeros(image.shape[1:], bool)  # a classification study: its whole volume
        if not where.any():
            where = np.ones(image.shape[1:], bool)
        index = np.flatnonzero(where.reshape(-1))
        if index.size > SAMPLES_PER_CASE:
            index = np.sort(rng.choice(index, SAMPLES_PER_CASE, replace=False))
        parts.append(image.reshape(image.shape[0], -1)[:, index].astype(np.float64))
    if not parts:
        raise SlabError("normalize.dataset: no training cases to compute statistics from")
    samples = np.concatenate(parts, axis=1)
    if not np.isfinite(samples).all():
        raise SlabError("normalize.dataset: NaN or Inf in the training images' foreground")
    return samples


def resolve_dataset_normalize(spec: dict, items: list[dict], seed: int = 0) -> dict:
    """``spec`` with the training cases' statistics filled in (see the module docstring)."""
    rest = check_dataset_flag(spec)
    samples = foreground_samples(items, seed)
    if rest.get("scheme", "percentile") == "percentile":
        lower, upper = float(rest.pop("lower", 0.5)), float(rest.pop("upper", 99.5))
        rest.pop("channel_wise", None)
        q = np.percentile(samples, [lower, upper], axis=1)
        return {**rest, "scheme": "percentile", "low": [round(float(v), 6) for v in q[0]],
                "high": [round(float(v), 6) for v in q[1]]}
    std = samples.std(axis=1)
    return {**rest, "mean": [round(float(v), 6) for v in samples.mean(axis=1)],
            "std": [round(float(v), 6) if v > 0 else 1.0 for v in std]}
