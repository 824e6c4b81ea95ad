"""The slice-sequence classifier of the RSNA 2022 cervical-spine winning recipe.

A 2D encoder embeds each slab (k neighbouring slices as channels) of a sequence into one
pooled feature vector; a bidirectional LSTM reads the sequence of vectors; one head scores
every slice and an attention-pooling head scores the whole sequence.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from monai.networks import nets

from slab.core.errors import SlabError

EFFICIENTNETS = tuple(f"efficientnet-b{i}" for i in range(8))
RESNETS = ("resnet10", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet200")
DENSENETS = ("densenet121", "densenet169", "densenet201", "densenet264")
BACKBONES = EFFICIENTNETS + RESNETS + DENSENETS


def build_encoder(backbone: str, in_channels: int, widen_factor: float = 1.0) -> tuple[nn.Module, int]:
    """A randomly initialised MONAI 2D classifier turned into a feature extractor.

    ``widen_factor`` scales a ResNet's stage widths (MONAI's own option: 0.25 gives 16..128
    channels, about 1/16 of the weights). Returns the encoder, mapping ``(B, in_channels, H, W)``
    to ``(B, F)`` globally pooled features, and ``F``.
    """
    if isinstance(widen_factor, bool) or not isinstance(widen_factor, (int, float)) or not (
            0 < widen_factor <= 8 and int(64 * widen_factor) >= 1):
        raise SlabError(f"widen_factor: expected a number in (0, 8] giving at least one channel, got {widen_factor!r}")
    if widen_factor != 1 and backbone not in RESNETS:
        raise SlabError(f"widen_factor: scales the ResNet backbones ({', '.join(RESNETS)}), not {backbone!r}")
    if backbone in EFFICIENTNETS:
        encoder = nets.EfficientNetBN(backbone, pretrained=False, spatial_dims=2, in_channels=in_channels)
        features = encoder._fc.in_features
        encoder._fc = nn.Identity()
    elif backbone in RESNETS:
        encoder = getattr(nets, backbone)(
            pretrained=False, spatial_dims=2, n_input_channels=in_channels, feed_forward=False,
            widen_factor=float(widen_factor),
        )
        features = encoder.in_planes  # channels of the last stage, which the forward pools
    elif backbone in DENSENETS:
        encoder = getattr(nets, backbone)(spatial_dims=2, in_channels=in_channels, out_channels=1, pretrained=False)
        features = encoder.class_layers.out.in_features
        encoder.class_layers.out = nn.Identity()
    else:
        raise SlabError(f"backbone: unknown encoder {backbone!r}; expected one of {', '.join(BACKBONES)}")
    return encoder, features


class SliceSequenceClassifier(nn.Module):
    """Score every slice of a sequence of slabs, and the sequence as a whole.

    Parameters
    ----------
    in_channels : int
        Channels of one slab (k slab offsets times image channels).
    out_channels : int
        Labels scored per slice and per sequence.
    backbone : str
        ``efficientnet-b0`` .. ``b7``, ``resnet10`` .. ``resnet200`` or ``densenet121`` ..
        ``densenet264`` (MONAI, random initialisation).
    hidden_size : int
        LSTM hidden size per direction.
    num_layers : int
        Stacked bidirectional LSTM layers.
    dropout : float
        Dropout between LSTM layers and before the heads.
    spatial_dims : int
        Must be 2: each slab is a 2D image; accepted so that ``build_network`` can pass it.
    widen_factor : float
        ResNet backbones only: their stage widths times this (MONAI's ``widen_factor``).

    Forward
    -------
    ``x`` of shape ``(B, N, C, H, W)`` gives ``(slice_logits, sequence_logits)``:
    ``(B, N)`` and ``(B, 1)`` when ``out_channels == 1``, else ``(B, N, out_channels)`` and
    ``(B, out_channels)``.

    Example
    -------
    >>> net = SliceSequenceClassifier(in_channels=3, backbone="resnet10", hidden_size=8)
    >>> s, q = net(torch.zeros(2, 5, 3, 32, 32))
    >>> tuple(s.shape), tuple(q.shape)
    ((2, 5), (2, 1))
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int = 1,
        backbone: str = "efficientnet-b0",
        hidden_size: int = 256,
        num_layers: int = 2,
        dropout: float = 0.1,
        spatial_dims: int = 2,
        widen_factor: float = 1.0,
    ) -> None:
        super().__init__()
        if spatial_dims != 2:
            raise SlabError(f"spatial_dims: the sequence classifier encodes 2D slabs, got {spatial_dims}")
        self.out_channels = out_channels
        self.encoder, features = build_encoder(backbone, in_channels, widen_factor)
        self.lstm = nn.LSTM(
            features,
            hidden_size,
            num_layers=num_layers,
            batch_first=True,
            bidirectional=True,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.dropout = nn.Dropout(dropout)
        self.slice_head = nn.Linear(2 * hidden_size, out_channels)
        self.attention = nn.Linear(2 * hidden_size, 1)
        self.sequence_head = nn.Linear(2 * hidden_size, out_channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.logits(x)

    def logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(slice_logits, sequence_logits)`` of ``x``: the forward of both heads, whatever
        ``forward`` returns (see :class:`SliceLogits`). Written for TorchScript too."""
        if x.ndim != 5:
            raise SlabError("input: expected (B, N, C, H, W), got " + str(x.ndim) + " dimensions")
        b, n = x.shape[0], x.shape[1]
        embedded = self.encoder(x.flatten(0, 1)).reshape(b, n, -1)
        states, _ = self.lstm(embedded)
        states = self.dropout(states)
        slice_logits = self.slice_head(states)
        weights = torch.softmax(self.attention(states), dim=1)  # (B, N, 1) over the sequence
        sequence_logits = self.sequence_head((weights * states).sum(dim=1))
        if self.out_channels == 1:
            slice_logits = slice_logits.squeeze(-1)
        return slice_logits, sequence_logits


class SliceLogits(SliceSequenceClassifier):
    """The classifier giving one tensor, the per-slice logits ``(B, N)`` (``(B, N, L)``): what
    MONAI's ``verify_net_in_out``, ``ckpt_export`` (TorchScript) and ``onnx_export`` expect of a
    bundle's ``network_def``. Same parameters and state dict as :class:`SliceSequenceClassifier`,
    so a classifier's weights load into it unchanged."""

    @classmethod
    def of(cls, classifier: SliceSequenceClassifier) -> "SliceLogits":
        """``classifier`` itself (same modules, same parameters), now giving the slice logits."""
        if not isinstance(classifier, SliceSequenceClassifier):
            raise SlabError(f"network: expected the sequence classifier, got {type(classifier).__name__}")
        classifier.__class__ = cls
        return classifier  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        slice_logits, _ = self.logits(x)
        return slice_logits
