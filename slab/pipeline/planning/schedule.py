"""The plan's clock: how long one training run of a configuration takes on the planning device.

A training step at the planned batch and an eval-mode forward pass are timed on the network
itself (:func:`trial_time`), and the scoring a validation does besides the network (the
threshold sweep and the calibration) on a synthetic case of the median shape
(:func:`trial_scoring`); :func:`expected_time` adds them up for a schedule and
:func:`fit_budget` scales a schedule to ``slab plan --budget`` minutes.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def trial_time(network: dict, dims: int, in_channels: int, out_channels: int, patch, batch: int,
               device: torch.device, repeats: int = 3) -> dict:
    """Seconds of one training step (forward, backward, AdamW step) at ``batch`` and of one
    forward pass per sample in eval mode, measured after a warm-up step: the plan's clock."""
    import time

    from slab.networks import build_network

    options = {k: v for k, v in network.items() if k != "name"}
    model = build_network(network["name"], dims, in_channels, out_channels, **options).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, in_channels, *patch, device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    steps = []
    for i in range(repeats + 1):
        sync()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        model(x).float().mean().backward()
        optimizer.step()
        sync()
        if i:  # the first step warms the allocator and kernels up
            steps.append(time.perf_counter() - start)
    model.eval()
    with torch.no_grad():
        model(x)
        sync()
        start = time.perf_counter()
        model(x)
        sync()
        forward = (time.perf_counter() - start) / batch
    del model, optimizer
    return {"step_s": float(np.median(steps)), "forward_s_per_sample": float(forward)}


SCORING_TRIAL_VOXELS = 1 << 21  # a larger median case is timed on a part of this size, scaled by its voxels


def trial_scoring(fp: dict, cfg: dict) -> float:
    """Seconds a validation spends scoring one median case besides the network: the threshold
    sweep (Dice and surface dice at every threshold and tolerance, as training's validation
    calls it) and the calibration, timed on a synthetic case of the median shape (a smooth
    probability field; truth where a shifted copy of it passes 0.5). A case of more than
    ``SCORING_TRIAL_VOXELS`` is timed on a part of that size (the longest axes halved) and the
    time scaled by the voxel ratio: the sweep's passes are linear in the voxels."""
    import time

    from scipy.ndimage import gaussian_filter

    from slab.pipeline.evaluation.calibration import calibration
    from slab.pipeline.evaluation.metrics import threshold_sweep

    full = [int(n) for n in fp["median_shape"]]
    shape = list(full)
    while math.prod(shape) > SCORING_TRIAL_VOXELS:
        axis = int(np.argmax(shape))
        shape[axis] = max(1, shape[axis] // 2)
    field = gaussian_filter(np.random.default_rng(0).standard_normal(shape).astype(np.float32), 2.0)
    prob = (1 / (1 + np.exp(-field / max(float(field.std()), 1e-6) * 3)))[None].astype(np.float32)
    truth = (np.roll(prob, 1, axis=1) > 0.5).astype(np.uint8)
    tolerance = float(cfg["val"]["tolerance_mm"])
    start = time.perf_counter()
    threshold_sweep(prob, truth, cfg["val"]["thresholds"], fp["median_spacing"], [0.0] if tolerance == 0 else
                    [0.0, tolerance])
    calibration(prob, truth, prob)
    return (time.perf_counter() - start) * math.prod(full) / math.prod(shape)


def validation_samples(fp: dict, cfg: dict, cases: int) -> int:
    """Network inputs one validation of ``cases`` median cases takes: slabs over the planes (and
    TTA views) for 2.5D, sliding windows for 3D."""
    shape = fp["median_shape"]
    views = {"none": 1, "flips": 8, "full": 16}[cfg["val"]["tta"]]
    if cfg["task"] == "segmentation_3d":
        step = [max(1, int(p * (1 - cfg["val"]["overlap"]))) for p in cfg["patch_size"]]
        windows = int(np.prod([max(1, math.ceil((n - p) / s) + 1) for n, p, s in zip(shape, cfg["patch_size"], step)]))
        return cases * windows * (8 if cfg["val"]["tta"] == "flips" else 1)
    axes = {"xy": 2, "zx": 1, "zy": 0}
    return cases * views * sum(shape[axes[p]] for p in cfg.get("val", {}).get("planes") or cfg["planes"])


def expected_time(fp: dict, cfg: dict, timing: dict, n_folds: int) -> dict:
    """Expected minutes of one training run of ``cfg`` (one fold): its steps at the measured step
    time, and its validations (the fold's share of the cases) at the measured forward rate plus
    the measured scoring of each case (``timing["score_s_per_case"]``, :func:`trial_scoring`)."""
    steps = cfg["epochs"] * (cfg["samples_per_epoch"] // cfg["batch_size"])
    validations = math.ceil(cfg["epochs"] / cfg.get("val_every", 1))
    held = max(1, round(fp["n_cases"] / max(1, n_folds)))
    train = steps * timing["step_s"]
    validation = validations * (validation_samples(fp, cfg, held) * timing["forward_s_per_sample"]
                                + held * timing.get("score_s_per_case", 0.0))
    return {"train_min": round(train / 60, 2), "validation_min": round(validation / 60, 2),
            "total_min": round((train + validation) / 60, 2), "steps": int(steps)}


def fit_budget(fp: dict, cfg: dict, timing: dict, n_folds: int, minutes: float) -> str:
    """Scale ``cfg``'s schedule (in place) so that one training run takes about ``minutes``:
    epochs first (up or down), then samples per epoch when even one epoch does not fit."""
    per_epoch = expected_time(fp, {**cfg, "epochs": 1, "val_every": 1}, timing, n_folds)
    per_epoch_train, per_val = per_epoch["train_min"], per_epoch["validation_min"]
    val_every = cfg.get("val_every", 1)
    epochs = int(minutes // max(per_epoch_train + per_val / val_every, 1e-9)) + 1
    while epochs >= 1 and expected_time(fp, {**cfg, "epochs": epochs}, timing, n_folds)["total_min"] > minutes:
        epochs -= 1  # the last epoch always validates: count the validations as the run makes them
    if epochs >= 1:
        cfg["epochs"] = epochs
        cfg["warmup_epochs"] = min(1.0, epochs / 10)
        return (f"--budget {minutes:g} min: {epochs} epochs of {per_epoch_train:.2f} min training and "
                f"{per_val:.2f} min validation every {val_every}")
    share = max(0.0, (minutes - per_val) / max(per_epoch_train, 1e-9))
    samples = max(cfg["batch_size"], int(cfg["samples_per_epoch"] * share) // cfg["batch_size"] * cfg["batch_size"])
    cfg.update(epochs=1, warmup_epochs=0.1, samples_per_epoch=samples)
    return (f"--budget {minutes:g} min: not one whole epoch fits ({per_epoch_train:.2f} min training, {per_val:.2f} "
            f"validation): 1 epoch of {samples} samples")


__all__ = ["expected_time", "fit_budget", "trial_scoring", "trial_time", "validation_samples"]
