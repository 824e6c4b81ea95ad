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
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn


SAMPLES = 32
LIMIT = 8.0  # logits beyond +-8 (a prior below 3e-4): the class is all but absent; stop there


def prior_logits(labels: list[torch.Tensor], n_labels: int, exclusive: bool) -> torch.Tensor:
    """``(L,)`` logits of the foreground prior of training targets: float binary channels
    ``(L, ...)`` (sigmoid), or one-channel class maps (softmax, background logit 0)."""
    if exclusive:
        counts = torch.zeros(n_labels + 1, dtype=torch.float64)
        for label in labels:
            counts += torch.bincount(label.reshape(-1).long().clamp(0, n_labels), minlength=n_labels + 1).double()
        share = (counts + 1.0) / (counts.sum() + n_labels + 1.0)
        logits = torch.log(share[1:] / share[0])
    else:
        positive = torch.zeros(n_labels, dtype=torch.float64)
        total = 0
        for label in labels:
            positive += label.reshape(label.shape[0], -1).double().sum(dim=1)
            total += label[0].numel()
        share = (positive + 1.0) / (total + 2.0)
        logits = torch.log(share / (1.0 - share))
    return logits.clamp(-LIMIT, LIMIT).float()


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


def init_output_bias(model: nn.Module, batch: dict, n_labels: int, exclusive: bool) -> dict:
    """Set ``model``'s output bias to the prior of a ``batch`` (``{"image", "label"}`` as
    training collates them); what was done, for the run's log."""
    target = prior_logits(list(batch["label"]), n_labels, exclusive)
    was_training = model.training
    model.eval()
    try:
        done = set_output_bias(model, batch["image"].float(), target)
    finally:
        model.train(was_training)
    return {"prior_logits": [round(float(v), 4) for v in target], "applied": bool(done),
            "prior": [round(float(1 / (1 + np.exp(-v))), 4) for v in target]}


__all__ = ["SAMPLES", "prior_logits", "set_output_bias", "init_output_bias"]
