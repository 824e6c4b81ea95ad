"""A network that starts at the base rate: the output bias set to the logit of the foreground
prior of the training samples (``"output_bias": "prior"`` in the training config).

Why. A freshly initialised segmentation network gives every voxel a logit near 0, probability
0.5. AdamW moves a parameter by about the learning rate per step, so the output bias climbs to
the logit of a 15 % prior (-1.7) in well over a thousand steps, and the Dice term of the loss
barely pulls the voxels it already gets right (air in a head MRI) any lower. With the short
schedules a CPU affords (a few hundred steps), 2D and 2.5D models on MNI152 grey matter were left
giving the air a probability of 0.3-0.5 and over-segmenting at 0.5 (``benchmarks/bench_calibration.py``).
Starting from the prior (the initialisation RetinaNet uses for rare classes, Lin et al. 2017)
removes that bias before the first step instead of spending the schedule on it.

How. The prior is measured on ``SAMPLES`` training samples drawn as training draws them (crops,
positive fraction; their own seeds, so training's draws are untouched): per label the share of
foreground voxels (sigmoid outputs: ``logit(p)``), or per class against the background
(``dice_ce``'s softmax with the background logit fixed at 0: ``log(p_i / p_0)``). The network's
mean output on those samples is measured and the bias of the last layer with one output per label
is shifted by the difference; a second forward pass checks that the mean moved there (a network
whose last layer is not additive, e.g. a normalisation after it, is left as it is).

The samples' prior is not the volumes'. Training draws half its samples around foreground
(``pos_neg`` of 3D patches, ``positive_fraction`` of 2.5D slices and crops), so a foreground-
centred patch holds more foreground than the whole volumes prediction meets: MNI152 grey matter
is 13.5 % of the training block and 21.9 % of the 3D patches drawn from it. A network fitted to
the samples learns their prior and over-segments at prediction: the 3D models' best held-out
threshold was 0.7 (``benchmarks/bench_calibration.py``). With ``"logit_adjustment": true`` (the
default) the loss sees the network's logits plus ``delta = logit(samples' prior) -
logit(volumes' prior)`` (per label; per class against the background for exclusive classes),
so the network itself is fitted to the volumes' prior — the label-shift correction of Saerens
et al. (2002), applied in the loss as the logit adjustment of Menon et al. (2021): nothing
changes at prediction, in a checkpoint's weights or in a bundle. The samples' prior is measured
on ``SHARE_SAMPLES`` draws (their own seeds), the volumes' from the training labels' value
counts (:func:`slab.pipeline.data.stream.value_counts`); the network then starts at the volumes'
prior (``delta`` plus its start make the samples' prior, as without the adjustment).

Which way. With ``true`` (the default) only a raised prior is undone (``delta >= 0``). Samples
can also hold *less* foreground than the volumes: 2.5D slices padded to the patch and the draws
of slices without foreground. Whether that is a label shift depends on what those slices are,
which the share of the *body* (the image above Otsu's threshold) tells, as ``slab plan`` reports
it: MNI152 grey matter is 59.2 % of the body of the drawn slices and of the volumes —
its slices without grey matter are air and padding is no body, so nothing changes where the
network has to decide, and undoing the all-voxel difference (samples 7 %, volumes 13.5 %)
over-segmented (Dice at 0.5 0.906 -> 0.886, best threshold 0.6 -> 0.65). The vessel phantoms'
vessel-free slices are tissue: vessel is 3.3 % of the drawn body, 5.8 % of the volumes'; a 2D
model trained without undoing it crosses the diagonal of its reliability curve at 0.33 =
sigmoid(-0.72), the adjustment the loss would see, and its best threshold is 0.35. ``slab plan``
measures which from the dataset's slices and sets ``"both"`` for a 2.5D configuration where
drawing slices without foreground lowers a label's share of the body
(:func:`slab.pipeline.planning.plans.prior_adjustment`): the lowered prior is undone too, and the
vessel models' best threshold moves to 0.4-0.5, their crossing to 0.38 / 0.49 (2D / 2.5D), at a
cost of 0.006-0.009 Dice at the best threshold (``benchmarks/bench_calibration.py``, three seeds).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn


SAMPLES = 32  # drawn to measure the network's mean output at its start
SHARE_SAMPLES = 256  # drawn to measure the samples' foreground prior (labels only)
LIMIT = 8.0  # logits beyond +-8 (a prior below 3e-4): the class is all but absent; stop there


def share_logits(counts: np.ndarray, n_labels: int, exclusive: bool) -> torch.Tensor:
    """``(L,)`` logits of the foreground prior in a :func:`slab.pipeline.data.stream.value_counts`
    table ``(C, V)``: per binary channel ``logit(positives / voxels)`` (sigmoid), or per class of
    a one-channel class map ``log(n_i / n_0)`` (softmax, background logit 0); one pseudo-count each."""
    counts = np.asarray(counts, dtype=np.float64)
    if exclusive:
        row = np.zeros(n_labels + 1)
        width = min(counts.shape[1], n_labels + 1)
        row[:width] = counts[0, :width]
        row[n_labels] += counts[0, n_labels + 1:].sum()  # values past the last class counted as it
        share = (row + 1.0) / (row.sum() + n_labels + 1.0)
        logits = np.log(share[1:] / share[0])
    else:
        positive = counts[:n_labels, 1:].sum(axis=1)
        share = (positive + 1.0) / (counts[:n_labels].sum(axis=1) + 2.0)
        logits = np.log(share / (1.0 - share))
    return torch.from_numpy(np.clip(logits, -LIMIT, LIMIT)).float()


def prior_logits(labels: list, n_labels: int, exclusive: bool) -> torch.Tensor:
    """``(L,)`` logits of the foreground prior of training targets: float binary channels
    ``(L, ...)`` (sigmoid), or one-channel class maps (softmax, background logit 0)."""
    from slab.pipeline.data.stream import add_counts, value_counts

    counts = None
    for label in labels:
        part = value_counts(label)
        counts = part if counts is None else add_counts(counts, part)
    return share_logits(counts if counts is not None else np.zeros((max(1, n_labels), 2)), n_labels, exclusive)


def _output_layer(model: nn.Module, n_labels: int) -> nn.Module | None:
    """The last convolution (or linear layer), in registration order, with a bias and one
    output per label."""
    last = None
    for module in model.modules():
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor) and isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) \
                and bias.shape == (n_labels,):
            last = module
    return last


@torch.no_grad()
def set_output_bias(model: nn.Module, images: torch.Tensor, target: torch.Tensor) -> bool:
    """Shift the last layer's bias so that the mean logit of ``model`` over ``images`` is
    ``target`` (per output channel); True when done and checked, False (model unchanged) when the
    network has no such layer or its output does not move with it."""
    layer = _output_layer(model, int(target.numel()))
    if layer is None:
        return False
    dims = [0] + list(range(2, images.ndim))
    before = model(images).float().mean(dim=dims)
    if not torch.isfinite(before).all():  # a network whose output is not finite yet: leave it as it is
        return False
    shift = (target - before).to(layer.bias.dtype)
    layer.bias += shift
    after = model(images).float().mean(dim=dims)
    if not torch.allclose(after, target, atol=0.05 + 0.05 * float(shift.abs().max())):
        layer.bias -= shift
        return False
    return True


def init_output_bias(model: nn.Module, batch: dict, target: torch.Tensor) -> bool:
    """Set ``model``'s output bias so that its mean logit over a ``batch`` (``{"image", ...}`` as
    training collates them) is ``target``; whether it was done."""
    was_training = model.training
    model.eval()
    try:
        return set_output_bias(model, batch["image"].float(), target)
    finally:
        model.train(was_training)


def priors(samples: list, volumes: np.ndarray, n_labels: int, exclusive: bool, adjust: bool | str) -> dict:
    """The samples' and the volumes' prior logits (``samples``: training targets as drawn;
    ``volumes``: the training labels' value counts) and the loss's ``adjustment``: with ``adjust``
    true their difference where the samples' is the higher, else 0; ``"both"`` their difference
    either way; false none. As the run records them."""
    drawn = prior_logits(samples, n_labels, exclusive)
    whole = share_logits(volumes, n_labels, exclusive)
    if adjust == "both":
        delta = (drawn - whole).clamp(-LIMIT, LIMIT)
    else:
        delta = (drawn - whole).clamp(0.0, LIMIT) if adjust else torch.zeros_like(drawn)  # a raised prior only

    def rounded(values):
        return [round(float(v), 4) for v in values]

    return {"samples": rounded(drawn), "volumes": rounded(whole), "adjustment": rounded(delta),
            "start": rounded(drawn - delta), "n_samples": len(samples)}


__all__ = ["SAMPLES", "SHARE_SAMPLES", "init_output_bias", "prior_logits", "priors", "set_output_bias",
           "share_logits"]
