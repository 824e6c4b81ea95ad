"""Build a segmentation or classification network by name, over MONAI's networks.

``build_network(name, spatial_dims, in_channels, out_channels, **options)`` is what a
``--network CONFIG.json`` or a bundle config holds. Options are the MONAI constructor's own
keyword arguments; an unknown one fails with the valid ones listed. Nothing is downloaded:
encoders are built with ``pretrained=False``.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable

import torch.nn as nn
from monai.networks import nets

from networks.sequence import SliceSequenceClassifier
from transforms.errors import SlabError

# Set by the factory itself; not options.
_FIXED = ("spatial_dims", "in_channels", "out_channels")


# name -> (constructor, defaults, supported spatial dims)
_NETWORKS: dict[str, tuple[Callable[..., nn.Module], dict[str, Any], tuple[int, ...]]] = {
    "unet": (nets.UNet, {"channels": (16, 32, 64, 128), "strides": (2, 2, 2), "num_res_units": 1}, (2, 3)),
    "basic_unet": (nets.BasicUNet, {}, (2, 3)),
    "flexible_unet": (nets.FlexibleUNet, {"backbone": "efficientnet-b0"}, (2, 3)),
    "segresnet": (nets.SegResNet, {}, (2, 3)),
    "swin_unetr": (nets.SwinUNETR, {"feature_size": 12}, (2, 3)),
    "sequence_classifier": (SliceSequenceClassifier, {}, (2,)),
}

NETWORK_NAMES = tuple(_NETWORKS)


def _valid_options(name: str) -> list[str]:
    params = inspect.signature(_NETWORKS[name][0]).parameters
    return [p for p in params if p not in _FIXED and p not in ("pretrained", "progress", "kwargs")]


def _check(name: str, spatial_dims: int, options: dict[str, Any]) -> dict[str, Any]:
    """Validate name, dims and option names; return the defaults merged with ``options``."""
    if name not in _NETWORKS:
        raise SlabError(f"network name: unknown network {name!r}; expected one of {', '.join(NETWORK_NAMES)}")
    dims = _NETWORKS[name][2]
    if spatial_dims not in dims:
        raise SlabError(f"network {name!r}: spatial_dims must be one of {dims}, got {spatial_dims!r}")
    if options.get("pretrained"):
        raise SlabError(f"network {name!r}: pretrained weights are not downloaded; load local weights instead")
    options = {k: v for k, v in options.items() if k != "pretrained"}
    valid = _valid_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise SlabError(
            f"network {name!r}: unknown option {', '.join(map(repr, unknown))}; valid options: {', '.join(valid)}"
        )
    # JSON gives lists where MONAI documents tuples.
    merged = {**_NETWORKS[name][1], **options}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in merged.items()}


def build_network(name: str, spatial_dims: int, in_channels: int, out_channels: int, **options: Any) -> nn.Module:
    """Build a MONAI network by name.

    Parameters
    ----------
    name : str
        One of ``unet``, ``basic_unet``, ``flexible_unet``, ``segresnet``, ``swin_unetr``
        (2D and 3D) or ``sequence_classifier`` (2D encoder + LSTM, see
        :class:`networks.sequence.SliceSequenceClassifier`).
    spatial_dims : int
        2 for slab (2.5D) networks, 3 for volumetric ones.
    in_channels : int
        Input channels; for a 2.5D network, the number of slab offsets times image channels.
    out_channels : int
        Output channels (logits, one per label).
    **options
        Keyword arguments of the MONAI constructor, e.g. ``channels``/``strides`` for ``unet``,
        ``features`` for ``basic_unet``, ``backbone`` for ``flexible_unet``, ``feature_size`` for
        ``swin_unetr``.

    Returns
    -------
    torch.nn.Module

    Example
    -------
    >>> net = build_network("unet", 2, in_channels=3, out_channels=1, channels=(4, 8), strides=(2,))
    >>> type(net).__name__
    'UNet'
    """
    kwargs = _check(name, spatial_dims, options)
    constructor = _NETWORKS[name][0]
    if name == "flexible_unet":
        kwargs["pretrained"] = False
    try:
        return constructor(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **kwargs)
    except (ValueError, TypeError, KeyError, AssertionError) as err:
        raise SlabError(f"network {name!r}: {' '.join(str(err).split())}") from err


def _option(name: str, kwargs: dict[str, Any], option: str) -> Any:
    """The value ``option`` takes: given, else the factory's default, else MONAI's."""
    if option in kwargs:
        return kwargs[option]
    return inspect.signature(_NETWORKS[name][0]).parameters[option].default


def network_divisor(name: str, spatial_dims: int, **options: Any) -> int:
    """The multiple every input spatial size must be for ``name`` built with ``options``.

    Inference pads each spatial axis up to a multiple of this and crops back.

    Example
    -------
    >>> network_divisor("unet", 2, strides=(2, 2, 2, 2))
    16
    """
    kwargs = _check(name, spatial_dims, options)
    if name == "unet":
        # A stride may be given per axis; the divisor must suit every axis.
        per_axis = [1] * spatial_dims
        for stride in kwargs["strides"]:
            steps = stride if isinstance(stride, (tuple, list)) else (stride,) * spatial_dims
            per_axis = [p * int(s) for p, s in zip(per_axis, steps)]
        return math.lcm(*per_axis)
    if name == "basic_unet":
        return 16
    if name == "flexible_unet":
        return 32
    if name == "segresnet":
        return 2 ** (len(_option(name, kwargs, "blocks_down")) - 1)
    if name == "swin_unetr":
        return int(_option(name, kwargs, "patch_size")) ** 5
    return 1  # sequence_classifier: global pooling takes any size
