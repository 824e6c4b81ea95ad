"""Segmentation losses selectable in the training config (``loss``)."""
from __future__ import annotations

import torch
import torch.nn as nn

from slab.pipeline.training.config import LOSSES, config_error


class DiceCE(nn.Module):
    """Dice + cross-entropy over exclusive classes, the background logit fixed at 0.

    The network gives one logit per foreground class (as for ``dice_bce``); a zero background
    logit is put in front and MONAI's ``DiceCELoss(softmax=True)`` scores the softmax against a
    one-channel class map (0 = background). With one class this is Dice + BCE on the sigmoid, and
    the sigmoid of each logit — what inference reports — is that class's probability against the
    background, so trained networks run through the same inference path as ``dice_bce`` ones.
    """

    def __init__(self, batch: bool = False, dice_weight: float = 1.0) -> None:
        super().__init__()
        from monai.losses import DiceCELoss

        self.loss = DiceCELoss(softmax=True, to_onehot_y=True, include_background=False, batch=batch,
                               lambda_dice=dice_weight)

    def forward(self, logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        background = torch.zeros_like(logits[:, :1])
        return self.loss(torch.cat([background, logits], dim=1), classes)


def build_loss(name: str, batch: bool = False, dice_weight: float = 1.0) -> nn.Module:
    """``dice_bce``: MONAI ``DiceCELoss(sigmoid=True)`` (Dice + BCE-with-logits, multi-label,
    binary channel targets); ``dice_ce``: :class:`DiceCE` (exclusive classes, class-map target).
    ``batch``: the Dice over the whole batch as one sample (nnU-Net's batch dice), not per sample;
    ``dice_weight``: the Dice term's weight against the cross-entropy's 1 (0: cross-entropy alone)."""
    from monai.losses import DiceCELoss

    if name == "dice_bce":
        return DiceCELoss(sigmoid=True, batch=batch, lambda_dice=dice_weight)
    if name == "dice_ce":
        return DiceCE(batch, dice_weight)
    raise config_error("loss", f"one of {', '.join(LOSSES)}", name)



def _measure_tables(dims: int, spacing=None):
    """MONAI's neighbour-code -> surface area (3D) / contour length (2D) table and its kernel,
    split into two halves of corners: ``(A (h, h), offsets_1, offsets_2)`` with ``A[i, j]`` the
    measure of the cell whose first-half corners are configuration ``i`` and second-half ``j``."""
    import itertools

    import numpy as np
    from monai.metrics.utils import get_code_to_measure_table

    table, kernel = get_code_to_measure_table(spacing or (1.0,) * dims)
    table = table.double().cpu().numpy().reshape(-1)
    weights = kernel.double().cpu().numpy().reshape((2,) * dims)
    corners = list(itertools.product((0, 1), repeat=dims))
    half = len(corners) // 2
    first, second = corners[:half], corners[half:]

    def codes(group):
        out = []
        for bits in itertools.product((0, 1), repeat=len(group)):
            out.append(sum(b * weights[c] for b, c in zip(bits, group)))
        return np.asarray(out, dtype=np.int64)

    a = table[codes(first)[:, None] + codes(second)[None, :]]
    return torch.as_tensor(a), first, second


def _joint(corner_probs: list[torch.Tensor]) -> torch.Tensor:
    """``(..., 2**m)``: the probability of every 0/1 configuration of m independent corners, the
    first corner the most significant (as :func:`itertools.product` enumerates them)."""
    out = None
    for p in corner_probs:
        q = torch.stack([1 - p, p], dim=-1)
        out = q if out is None else (out.unsqueeze(-1) * q.unsqueeze(-2)).flatten(-2)
    return out


class SoftSurfaceDiceLoss(nn.Module):
    """``1 - `` a differentiable surface dice at tolerance 0 (the SenNet metric), 2D or 3D.

    Every 2x2(x2) cell of the zero-padded volume has corners of probability ``p`` (independent);
    the expected surface area (3D; contour length in 2D) of the prediction in the cell is the
    marching-cubes table of surface-distance / MONAI averaged over all corner configurations,
    ``E[a_p] = sum_c P(c) a(c)``, computed exactly as ``P_first @ A @ P_second`` over the two
    halves of the corners. With a binary truth the score is

        ``sum_{cells with true surface} (E[a_p] + P(pred has surface) a_t) / (sum E[a_p] + sum a_t)``

    which on binary predictions is the metric itself (tested against it). Loss per sample and
    channel, averaged; a pair without any surface counts 0. Inputs are probabilities
    ``(B, C, spatial...)`` and binary targets of the same shape.
    """

    def __init__(self, dims: int = 3, spacing=None):
        super().__init__()
        table, self.first, self.second = _measure_tables(dims, spacing)
        self.register_buffer("table", table.float(), persistent=False)
        self.dims = dims

    def _corners(self, x: torch.Tensor, group) -> list[torch.Tensor]:
        padded = torch.nn.functional.pad(x, (1, 1) * self.dims)
        size = padded.shape[2:]
        out = []
        for corner in group:
            index = tuple(slice(o, o + s - 1) for o, s in zip(corner, size))
            out.append(padded[(slice(None), slice(None)) + index])
        return out

    def forward(self, probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if probs.shape != target.shape or probs.dim() != self.dims + 2:
            raise ValueError(f"expected probabilities and targets of one shape (B, C, {self.dims} axes), "
                             f"got {tuple(probs.shape)} and {tuple(target.shape)}")
        table = self.table.to(probs.dtype)
        p1, p2 = _joint(self._corners(probs, self.first)), _joint(self._corners(probs, self.second))
        t = target.to(probs.dtype)
        t1, t2 = _joint(self._corners(t, self.first)), _joint(self._corners(t, self.second))
        area_p = ((p1 @ table) * p2).sum(-1)
        area_t = ((t1 @ table) * t2).sum(-1)
        last = p1.shape[-1] - 1
        surface_p = 1 - p1[..., 0] * p2[..., 0] - p1[..., last] * p2[..., last]
        surface_t = 1 - t1[..., 0] * t2[..., 0] - t1[..., last] * t2[..., last]
        axes = tuple(range(2, probs.dim()))
        numerator = (surface_t * (area_p + surface_p * area_t)).sum(axes)
        denominator = area_p.sum(axes) + area_t.sum(axes)
        score = torch.where(denominator > 0, numerator / denominator.clamp_min(1e-12), torch.zeros_like(numerator))
        return 1 - score.mean()


def soft_skeleton(x: torch.Tensor, iterations: int = 3) -> torch.Tensor:
    """The soft skeleton of clDice (Shit et al., 2021): iterated min-pool erosions minus their
    max-pool openings, for ``(B, C, spatial...)`` probabilities in 2D or 3D."""
    pool = torch.nn.functional.max_pool3d if x.dim() == 5 else torch.nn.functional.max_pool2d

    def erode(v):
        return -pool(-v, 3, 1, 1)

    def dilate(v):
        return pool(v, 3, 1, 1)

    skeleton = torch.relu(x - dilate(erode(x)))
    for _ in range(iterations):
        x = erode(x)
        delta = torch.relu(x - dilate(erode(x)))
        skeleton = skeleton + torch.relu(delta - skeleton * delta)
    return skeleton


class SoftClDiceLoss(nn.Module):
    """``1 - `` soft clDice: topology precision ``|S(P) T| / |S(P)|`` and sensitivity
    ``|S(T) P| / |S(T)|`` from soft skeletons (:func:`soft_skeleton`), their harmonic mean."""

    def __init__(self, iterations: int = 3, smooth: float = 1.0):
        super().__init__()
        self.iterations, self.smooth = iterations, smooth

    def forward(self, probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        t = target.to(probs.dtype)
        sp, st = soft_skeleton(probs, self.iterations), soft_skeleton(t, self.iterations)
        axes = tuple(range(2, probs.dim()))
        precision = ((sp * t).sum(axes) + self.smooth) / (sp.sum(axes) + self.smooth)
        sensitivity = ((st * probs).sum(axes) + self.smooth) / (st.sum(axes) + self.smooth)
        return 1 - (2 * precision * sensitivity / (precision + sensitivity)).mean()


class CombinedLoss(nn.Module):
    """The base loss (on logits) plus weighted shape terms on the sigmoid probabilities:
    ``base + w_s (1 - soft surface dice) + w_c (1 - soft clDice)``."""

    def __init__(self, base: nn.Module, dims: int, surface_dice: float = 0.0, cldice: float = 0.0,
                 cldice_iterations: int = 3):
        super().__init__()
        self.base, self.w_surface, self.w_cldice = base, float(surface_dice), float(cldice)
        self.surface = SoftSurfaceDiceLoss(dims) if surface_dice else None
        self.cldice = SoftClDiceLoss(cldice_iterations) if cldice else None

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.base(logits, target)
        if self.surface is None and self.cldice is None:
            return loss
        probs = torch.sigmoid(logits)
        if target.shape != probs.shape:  # a class map (dice_ce): one binary channel per class
            target = torch.cat([(target == i + 1) for i in range(probs.shape[1])], dim=1)
        if self.surface is not None:
            loss = loss + self.w_surface * self.surface(probs, target)
        if self.cldice is not None:
            loss = loss + self.w_cldice * self.cldice(probs, target)
        return loss


def build_training_loss(cfg: dict, dims: int) -> nn.Module:
    """The config's ``loss`` with its ``shape_loss`` terms (none by default)."""
    base = build_loss(cfg["loss"], bool(cfg.get("dice_batch", False)), float(cfg.get("dice_weight", 1.0)))
    shape = cfg.get("shape_loss") or {}
    if not shape.get("surface_dice") and not shape.get("cldice"):
        return base
    return CombinedLoss(base, dims, shape.get("surface_dice", 0.0), shape.get("cldice", 0.0),
                        shape.get("cldice_iterations", 3))
