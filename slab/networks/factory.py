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

import numpy as np
import torch
import torch.nn as nn
from monai.networks import nets

from slab.core.errors import SlabError
from slab.networks import encoders
from slab.networks.sequence import SliceSequenceClassifier

encoders.register()  # FlexibleUNet's SE-ResNeXt backbones (MONAI's registry is global)

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


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


# Sizing options whose values must be positive integers (a stride may be one per axis).
_POSITIVE = {
    "unet": ("channels", "strides", "kernel_size", "up_kernel_size"),
    "basic_unet": ("features",),
    "flexible_unet": ("decoder_channels",),
    "segresnet": ("init_filters", "blocks_down", "blocks_up", "num_groups"),
    "swin_unetr": ("patch_size", "depths", "num_heads", "feature_size", "window_size"),
    "sequence_classifier": ("hidden_size", "num_layers"),
}
_NON_NEGATIVE = ("num_res_units",)


def _check_positive_ints(name: str, option: str, value, allow_zero: bool = False) -> None:
    """``value`` is a positive integer or a (nested) list of them; else a SlabError naming it."""
    items = value if isinstance(value, (list, tuple)) else [value]
    flat = [v for item in items for v in (item if isinstance(item, (list, tuple)) else [item])]
    low = 0 if allow_zero else 1
    if not flat or not all(_is_int(v) and v >= low for v in flat):
        what = "integers >= 0" if allow_zero else "positive integers"
        raise SlabError(f"network {name!r}: option {option} must be {what}, got {value!r}")


def _check(name, spatial_dims, options: dict[str, Any]) -> dict[str, Any]:
    """Validate name, dims and options; return the defaults merged with ``options``."""
    if not isinstance(name, str) or name not in _NETWORKS:
        raise SlabError(f"network name: unknown network {name!r}; expected one of {', '.join(NETWORK_NAMES)}")
    dims = _NETWORKS[name][2]
    if not _is_int(spatial_dims) or spatial_dims not in dims:
        raise SlabError(f"network {name!r}: spatial_dims must be one of {dims}, got {spatial_dims!r}")
    if options.get("pretrained"):
        raise SlabError(f"network {name!r}: pretrained weights are not downloaded; load local weights instead")
    options = {k: v for k, v in options.items() if k != "pretrained"}
    if name in ("flexible_unet", "sequence_classifier") and "encoder_weights" in options:
        # loaded by training (slab.networks.pretrained.load_encoder), never when a network is built: a
        # trained model's config carries the weights' provenance here and its checkpoint the weights
        weights = options.pop("encoder_weights")
        if weights is not None and not isinstance(weights, (str, dict)):
            raise SlabError(f"network {name!r}: encoder_weights must be null, \"imagenet\" or "
                            f"{{\"path\", \"sha256\"}}, got {weights!r}")
    valid = _valid_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise SlabError(
            f"network {name!r}: unknown option {', '.join(map(repr, unknown))}; valid options: {', '.join(valid)}"
        )
    for option in _POSITIVE.get(name, ()):
        if option in options:
            _check_positive_ints(name, option, options[option])
    for option in _NON_NEGATIVE:
        if option in options:
            _check_positive_ints(name, option, options[option], allow_zero=True)
    if name == "unet":
        channels = options.get("channels", _NETWORKS[name][1]["channels"])
        strides = options.get("strides", _NETWORKS[name][1]["strides"])
        if not isinstance(channels, (list, tuple)) or not isinstance(strides, (list, tuple)) or len(channels) < 2:
            raise SlabError(f"network 'unet': option channels must list two or more levels and strides one per step "
                            f"down, got channels {channels!r}, strides {strides!r}")
        if len(strides) != len(channels) - 1:
            raise SlabError(f"network 'unet': {len(strides)} strides for {len(channels)} channels; expected one "
                            "stride per down-sampling step (len(channels) - 1)")
    # JSON gives lists where MONAI documents tuples.
    merged = {**_NETWORKS[name][1], **options}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in merged.items()}


def _check_channels(in_channels, out_channels) -> None:
    for label, value in (("in_channels", in_channels), ("out_channels", out_channels)):
        if not _is_int(value) or value < 1:
            raise SlabError(f"network {label}: expected a positive integer, got {value!r}")


def build_network(name: str, spatial_dims: int, in_channels: int, out_channels: int, **options: Any) -> nn.Module:
    """Build a MONAI network by name.

    Parameters
    ----------
    name : str
        One of ``unet``, ``basic_unet``, ``flexible_unet``, ``segresnet``, ``swin_unetr``
        (2D and 3D) or ``sequence_classifier`` (2D encoder + LSTM, see
        :class:`slab.networks.sequence.SliceSequenceClassifier`).
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
    _check_channels(in_channels, out_channels)
    constructor = _NETWORKS[name][0]
    if name == "flexible_unet":
        kwargs["pretrained"] = False
    args = dict(spatial_dims=int(spatial_dims), in_channels=int(in_channels), out_channels=int(out_channels), **kwargs)
    try:
        _check_size(name, constructor, args)
        return torch_batch_norm_momentum(constructor(**args))
    except SlabError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure to build from user options is a config error
        reason = " ".join(str(err).split())[:300] or type(err).__name__
        raise SlabError(f"network {name!r}: cannot be built with these options ({reason})") from None


def torch_batch_norm_momentum(network: nn.Module) -> nn.Module:
    """Every batch norm of ``network`` at PyTorch's (and timm's) momentum 0.1, in place.

    MONAI's EfficientNets keep TensorFlow's 0.01: their running statistics then trail the weights
    by ~100 steps, and after a short schedule the network in eval mode is another network (measured:
    an encoder UNet trained 150 steps gave Dice 0.93 in train mode, 0.54 in eval mode at 0.01, 0.94
    at 0.1). Momentum is not in a state dict: checkpoints and prediction are unchanged."""
    for module in network.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.momentum is not None:
            module.momentum = 0.1
    return network


def _parameter_count(name: str, constructor, args: dict) -> int | None:
    """Parameters of the network ``args`` build, counted without allocating them (built on torch's
    meta device; SwinUNETR, which cannot be, from its stage widths); None where unknown."""
    if name == "swin_unetr":
        size, depths = int(args.get("feature_size", 24)), args.get("depths", (2, 2, 2, 2))
        return 2 * sum(12 * int(d) * (size * 2 ** i) ** 2 for i, d in enumerate(depths))
    try:
        with torch.device("meta"):
            network = constructor(**args)
    except Exception:  # noqa: BLE001 - the real build reports the problem
        return None
    return sum(p.numel() for p in network.parameters())


def parameter_count(name: str, spatial_dims: int, in_channels: int, out_channels: int, **options: Any) -> int | None:
    """Parameters of the network ``build_network`` would build, counted without allocating them;
    None where unknown. Bad options are the SlabErrors ``build_network`` gives."""
    kwargs = _check(name, spatial_dims, options)
    _check_channels(in_channels, out_channels)
    if name == "flexible_unet":
        kwargs["pretrained"] = False
    return _parameter_count(name, _NETWORKS[name][0], dict(spatial_dims=int(spatial_dims), in_channels=int(in_channels),
                                                           out_channels=int(out_channels), **kwargs))


def _check_size(name: str, constructor, args: dict) -> None:
    """Refuse a network whose weights would not fit in memory, before allocating them; the
    message names the option that sizes it (``channels`` / ``features`` / ``feature_size``)."""
    from slab.io.headers import check_memory

    count = _parameter_count(name, constructor, args)
    if count is not None:
        option = {"unet": "channels", "basic_unet": "features", "swin_unetr": "feature_size",
                  "segresnet": "init_filters"}.get(name, "its options")
        check_memory(4 * count, f"network {name!r} ({count:,} parameters)", f"; make {option} smaller")


def _option(name: str, kwargs: dict[str, Any], option: str) -> Any:
    """The value ``option`` takes: given, else the factory's default, else MONAI's."""
    if option in kwargs:
        return kwargs[option]
    return inspect.signature(_NETWORKS[name][0]).parameters[option].default


def network_min_size(name: str, spatial_dims: int, **options: Any) -> int:
    """The smallest size every spatial axis of an input must have for ``name``: twice its divisor.

    At the divisor itself the deepest feature map is one voxel wide, and instance or batch
    normalisation there (UNet, BasicUNet, SwinUNETR; FlexibleUNet in training) needs more than
    one value. Inference and training pad each axis to ``max(min_size, a multiple of the
    divisor)`` (:func:`padded_size`) and crop back.

    Example
    -------
    >>> network_min_size("unet", 2, strides=(2, 2, 2))
    16
    """
    divisor = network_divisor(name, spatial_dims, **options)
    return 1 if divisor == 1 else 2 * divisor


def padded_size(size: int, divisor: int, min_size: int = 1) -> int:
    """``size`` rounded up to a multiple of ``divisor``, at least ``min_size`` (itself a multiple).

    >>> padded_size(5, 8, 16), padded_size(17, 8, 16), padded_size(1, 1)
    (16, 24, 1)
    """
    return max(int(min_size), -(-int(size) // int(divisor)) * int(divisor))


def network_divisor(name: str, spatial_dims: int, **options: Any) -> int:
    """The multiple every input spatial size must be for ``name`` built with ``options``.

    Inference pads each spatial axis up to a multiple of this and crops back.

    Example
    -------
    >>> network_divisor("unet", 2, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2))
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
