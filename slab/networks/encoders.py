"""SE-ResNeXt encoders for MONAI's ``FlexibleUNet`` (the SenNet 2024 write-up's
``seresnext50_32x4d``), built from MONAI's own ``SENet``.

MONAI registers EfficientNet and ResNet encoders for ``FlexibleUNet``; its SE-ResNeXt exists only
as a classifier. :class:`SEResNeXtEncoder` is that classifier's trunk returning the five feature
maps a ``FlexibleUNet`` decoder reads (strides 2, 4, 8, 16, 32: the stem before its max-pool, then
the four stages), registered under ``se_resnext50_32x4d`` and ``se_resnext101_32x4d`` (the names of
the published ImageNet files, Cadene's ``pretrainedmodels``; :mod:`slab.networks.pretrained` maps
their keys). :mod:`slab.networks.factory` registers them when it is imported, once.
"""
from __future__ import annotations

import torch
from monai.networks.blocks import BaseEncoder
from monai.networks.blocks.squeeze_and_excitation import SEResNeXtBottleneck
from monai.networks.nets.flexible_unet import FLEXUNET_BACKBONE
from monai.networks.nets.senet import SENet

# name -> blocks per stage (the published models': 50 and 101 layers, 32 groups of width 4)
SE_RESNEXTS = {"se_resnext50_32x4d": (3, 4, 6, 3), "se_resnext101_32x4d": (3, 4, 23, 3)}


class SEResNeXtEncoder(SENet, BaseEncoder):
    """MONAI's SE-ResNeXt (``SEResNext50``'s settings: 7x7 stem, 64 planes, 1x1 projections) as a
    ``FlexibleUNet`` encoder; the classifier head is dropped. ``pretrained`` must be False: slab
    loads published weights itself, every tensor accounted for."""

    backbone_names = list(SE_RESNEXTS)

    def __init__(self, model_name: str, spatial_dims: int, in_channels: int, pretrained: bool = False) -> None:
        if pretrained:
            raise ValueError("SEResNeXtEncoder: weights are loaded by slab.networks.pretrained, not downloaded")
        super().__init__(spatial_dims=spatial_dims, in_channels=in_channels, block=SEResNeXtBottleneck,
                         layers=SE_RESNEXTS[model_name], groups=32, reduction=16, dropout_prob=None, inplanes=64,
                         downsample_kernel_size=1, input_3x3=False)
        del self.last_linear, self.adaptive_avg_pool

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        stem = self.layer0.relu1(self.layer0.bn1(self.layer0.conv1(x)))
        features = [stem]
        x = self.layer0.pool(stem)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            features.append(x)
        return features

    @classmethod
    def get_encoder_parameters(cls) -> list[dict]:
        return [{"model_name": name, "spatial_dims": 2, "in_channels": 3, "pretrained": False}
                for name in cls.backbone_names]

    @classmethod
    def num_channels_per_output(cls) -> list[tuple[int, ...]]:
        return [(64, 256, 512, 1024, 2048)] * len(cls.backbone_names)

    @classmethod
    def num_outputs(cls) -> list[int]:
        return [5] * len(cls.backbone_names)

    @classmethod
    def get_encoder_names(cls) -> list[str]:
        return cls.backbone_names


def register() -> None:
    """Register the SE-ResNeXt encoders with ``FlexibleUNet`` (once; MONAI's registry is global)."""
    if not all(name in FLEXUNET_BACKBONE.register_dict for name in SE_RESNEXTS):
        FLEXUNET_BACKBONE.register_class(SEResNeXtEncoder)

__all__ = ["SE_RESNEXTS", "SEResNeXtEncoder", "register"]
