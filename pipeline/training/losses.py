"""Segmentation losses selectable in the training config (``loss``)."""
from __future__ import annotations

import torch
import torch.nn as nn

from pipeline.training.config import LOSSES, config_error


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
    raise config_error("loss", f"one of {', '.join(LOSSES)}", name)

