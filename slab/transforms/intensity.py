"""Per-volume intensity normalisation, over exact percentiles
(:func:`slab.transforms.percentiles.volume_percentiles`).

:class:`PercentileNormalize` maps each channel's low percentile to 0 and high percentile to 1
over the whole volume (not per slice), clips below 0 and clips (or softly compresses) above 1;
with a fixed ``low``/``high`` window (dataset statistics) it computes nothing per volume.
:class:`ZScoreNormalize` standardises by each volume's mean/std or by fixed dataset ones.
:func:`make_normalize` builds either from JSON settings: training, prediction and bundles all
go through it, so a model sees at prediction the intensities it was trained on.
Channels are normalised independently: the four MRI contrasts of a BraTS case or a stack of
different stains have unrelated intensity scales, and a joint mapping would let one channel's
range flatten another.
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

from slab.core.errors import SlabError
from slab.transforms.percentiles import (percentiles_from_counts, is_lazy, lazy_counts, lazy_select, to_numpy,
                                         volume_percentiles)


def scale_intensity(x, low, high, soft_clip_alpha: float | None = None):
    """Map ``low`` to 0 and ``high`` to 1, clip below 0, and clip or soft-clip above 1.

    Parameters
    ----------
    x : numpy array or torch tensor ``(C, ...)``
    low, high : float or per-channel sequences of length C
        Where ``high <= low`` (a constant channel) the scale is 1, so the channel maps to 0.
    soft_clip_alpha : float, optional
        None clips above 1; a number ``a`` maps ``v > 1`` to ``(v - 1) * a + 1``.

    Returns
    -------
    float32 array or tensor of the same kind and shape (a MetaTensor keeps its meta).
    """
    low = np.asarray(low, dtype=np.float64).reshape(-1)
    high = np.asarray(high, dtype=np.float64).reshape(-1)
    width = high - low
    scale = np.where(width > 0, 1.0 / np.where(width > 0, width, 1.0), 1.0)
    shape = (-1,) + (1,) * (x.ndim - 1) if low.size > 1 else ()
    if isinstance(x, torch.Tensor):
        out = x.to(torch.float32, copy=True)
        lo = torch.as_tensor(low, dtype=torch.float32, device=x.device).reshape(shape)
        sc = torch.as_tensor(scale, dtype=torch.float32, device=x.device).reshape(shape)
        out.sub_(lo).mul_(sc).clamp_(min=0.0)
        if soft_clip_alpha is None:
            out.clamp_(max=1.0)
        else:
            out = torch.where(out > 1, (out - 1) * float(soft_clip_alpha) + 1, out)
        return out
    out = np.array(x, dtype=np.float32, copy=True)
    out -= low.astype(np.float32).reshape(shape)
    out *= scale.astype(np.float32).reshape(shape)
    np.maximum(out, 0.0, out=out)
    if soft_clip_alpha is None:
        np.minimum(out, 1.0, out=out)
    else:
        above = out > 1
        out[above] = (out[above] - 1) * np.float32(soft_clip_alpha) + 1
    return out


class PercentileNormalize(Transform):
    """Per-volume percentile normalisation, channel by channel.

    Each channel's ``lower`` percentile maps to 0 and its ``upper`` percentile to 1 (computed
    over the whole volume, or where ``mask`` is true); values below 0 are clipped; values above
    1 are clipped, or with ``soft_clip_alpha`` compressed as ``(v - 1) * alpha + 1``.

    Parameters
    ----------
    lower, upper : float
        Percentiles, ``0 <= lower < upper <= 100``.
    soft_clip_alpha : float, optional
        Slope above the upper percentile (None: hard clip at 1).
    channel_wise : bool
        True: percentiles per channel (default). False: one pair over all channels.
    low, high : number or per-channel list, optional
        A fixed window instead of each volume's percentiles: dataset statistics (the training
        set's foreground percentiles, as ``slab plan`` records for CT-like data).

    Example
    -------
    >>> v = np.arange(100, dtype=np.uint16).reshape(1, 100, 1, 1)
    >>> out = PercentileNormalize(lower=0, upper=99)(v)
    >>> float(out.min()), float(out.max()), out.dtype
    (0.0, 1.0, dtype('float32'))
    """

    backend = [MetaTensor.__name__]

    def __init__(self, lower: float = 0.5, upper: float = 99.5, soft_clip_alpha: float | None = None,
                 channel_wise: bool = True, low=None, high=None):
        self.low, self.high = _fixed_pair(low, high, "low", "high")
        for label, value in (("lower", lower), ("upper", upper)):
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise SlabError(f"{label}: expected a percentile in [0, 100], got {value!r}")
            if not 0 <= float(value) <= 100:
                raise SlabError(f"{label}: expected a percentile in [0, 100], got {value}")
        if float(lower) >= float(upper):
            raise SlabError(f"lower, upper: expected lower < upper, got {lower} >= {upper}")
        if soft_clip_alpha is not None and not (np.isfinite(soft_clip_alpha) and soft_clip_alpha >= 0):
            raise SlabError(f"soft_clip_alpha: expected a number >= 0 or None, got {soft_clip_alpha}")
        self.lower, self.upper = float(lower), float(upper)
        self.soft_clip_alpha = None if soft_clip_alpha is None else float(soft_clip_alpha)
        self.channel_wise = bool(channel_wise)

    def percentiles(self, img, mask=None, name: str = "image") -> tuple[np.ndarray, np.ndarray]:
        """The ``(low, high)`` values used for ``img``: arrays of length C (or 1 when not channel-wise).

        A LazyVolume is never read whole: integers of up to 16 bits are counted in one pass of
        blocks of slices, floats and wider integers selected in 1-4 passes (radix selection).
        """
        if self.low is not None:  # a fixed window (dataset statistics): nothing to compute
            return _per_channel(self.low, img, name), _per_channel(self.high, img, name)
        q = np.asarray([self.lower, self.upper])
        if mask is None and is_lazy(img):
            found = lazy_counts(img, name)
            if found is not None:
                counts, offset, dtype = found
                if not self.channel_wise:
                    counts = counts.sum(axis=0, keepdims=True)
                pairs = np.asarray([percentiles_from_counts(c, offset, dtype, q, f"{name} channel {i}")
                                    for i, c in enumerate(counts)])
                return pairs[:, 0], pairs[:, 1]
            channels = range(int(img.shape[0])) if self.channel_wise else [None]
            pairs = [lazy_select(img, q, name if c is None else f"{name} channel {c}", c) for c in channels]
            if pairs[0] is not None:
                pairs = np.asarray(pairs)
                return pairs[:, 0], pairs[:, 1]
        array = to_numpy(img)
        if array.ndim < 2:
            raise SlabError(f"{name}: expected a channel-first volume (C, ...), got shape {tuple(array.shape)}")
        m = None
        if mask is not None:
            m = to_numpy(mask).astype(bool, copy=False)
            if m.shape[1:] != array.shape[1:] or m.shape[0] not in (1, array.shape[0]):
                raise SlabError(f"mask: shape {tuple(m.shape)} does not match {name} {tuple(array.shape)}")
            m = np.broadcast_to(m, array.shape)
        if not self.channel_wise:
            p = volume_percentiles(array, q, None if m is None else np.ascontiguousarray(m), name=name)
            return p[:1], p[1:]
        pairs = [
            volume_percentiles(array[c], q, None if m is None else m[c], name=f"{name} channel {c}")
            for c in range(array.shape[0])
        ]
        pairs = np.asarray(pairs)
        return pairs[:, 0], pairs[:, 1]

    def block_transform(self, img, name: str = "image") -> Callable:
        """The transform of blocks of ``img`` (slabs, windows): its window computed once over the
        whole volume (a LazyVolume is read in blocks for it), then applied to any part."""
        low, high = self.percentiles(img, name=name)
        return functools.partial(scale_intensity, low=low, high=high, soft_clip_alpha=self.soft_clip_alpha)

    def spec(self) -> dict:
        """The settings as JSON data (:func:`make_normalize` builds the same transform from them)."""
        if self.low is not None:
            return {"scheme": "percentile", "low": list(self.low), "high": list(self.high),
                    "soft_clip_alpha": self.soft_clip_alpha}
        return {"scheme": "percentile", "lower": self.lower, "upper": self.upper,
                "soft_clip_alpha": self.soft_clip_alpha, "channel_wise": self.channel_wise}

    def __call__(self, img, mask=None):
        name = _source_name(img)
        low, high = self.percentiles(img, mask, name=name)
        return _keep_meta(img, scale_intensity(img, low, high, self.soft_clip_alpha))


def _source_name(img) -> str:
    source = getattr(img, "meta", {}).get("filename_or_obj") if hasattr(img, "meta") else None
    return ", ".join(map(str, source)) if isinstance(source, (list, tuple)) else str(source or "image")


def _keep_meta(img, out):
    if isinstance(img, MetaTensor) and not isinstance(out, MetaTensor):
        out = MetaTensor(out, affine=img.affine, meta=dict(img.meta))
    return out


def _fixed_pair(a, b, name_a: str, name_b: str, positive_b: bool = False):
    """Two fixed per-channel value lists (dataset statistics), both or neither; ``(None, None)``."""
    if a is None and b is None:
        return None, None
    if a is None or b is None:
        raise SlabError(f"{name_a}, {name_b}: give both (per-channel values) or neither")
    out = []
    for label, value in ((name_a, a), (name_b, b)):
        values = [value] if isinstance(value, (int, float, np.integer, np.floating)) else value
        if (not isinstance(values, (list, tuple)) or not values
                or not all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
                           and np.isfinite(v) for v in values)):
            raise SlabError(f"{label}: expected a finite number or a list of them (one per channel), got {value!r}")
        out.append(tuple(float(v) for v in values))
    if len(out[0]) != len(out[1]):
        raise SlabError(f"{name_a}, {name_b}: {len(out[0])} and {len(out[1])} values; expected one per channel each")
    if positive_b and not all(v > 0 for v in out[1]):
        raise SlabError(f"{name_b}: expected positive values, got {list(out[1])}")
    return out[0], out[1]


def _per_channel(values: tuple, img, name: str) -> np.ndarray:
    """Fixed values for the channels of ``img``: one for all, or one per channel."""
    channels = int(img.shape[0])
    if len(values) not in (1, channels):
        raise SlabError(f"{name}: {channels} channel(s); the normalisation has values for {len(values)}")
    return np.asarray(values if len(values) == channels else values * channels, dtype=np.float64)


def _moments(img, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation (float64), a LazyVolume read in blocks of slices."""
    channels, depth = int(img.shape[0]), int(img.shape[-1])
    total = np.zeros(channels)
    square = np.zeros(channels)
    count = 0
    if is_lazy(img):
        slice_bytes = max(1, int(np.prod(img.shape[:-1])) * 8)
        step = max(1, (64 << 20) // slice_bytes)
        blocks = (np.asarray(img[:, :, :, z:z + step]) for z in range(0, depth, step))
    else:
        blocks = [to_numpy(img)]
    for block in blocks:
        block = block.reshape(channels, -1).astype(np.float64)
        if not np.all(np.isfinite(block)):
            raise SlabError(f"{name}: contains NaN or Inf; clean the volume first")
        total += block.sum(axis=1)
        square += np.square(block).sum(axis=1)
        count += block.shape[1]
    if count == 0:
        raise SlabError(f"{name}: no voxels to compute the mean from (empty volume)")
    mean = total / count
    return mean, np.sqrt(np.maximum(square / count - mean ** 2, 0.0))


def standardize(x, mean, std, clip=None):
    """``(x - mean) / std`` per channel as float32 (a constant channel, std 0, maps to 0), then
    clipped to ``clip = (low, high)`` in standard deviations when given."""
    mean = np.asarray(mean, dtype=np.float64).reshape(-1)
    std = np.asarray(std, dtype=np.float64).reshape(-1)
    scale = np.where(std > 0, 1.0 / np.where(std > 0, std, 1.0), 0.0)
    shape = (-1,) + (1,) * (x.ndim - 1) if mean.size > 1 else ()
    if isinstance(x, torch.Tensor):
        out = x.to(torch.float32, copy=True)
        out.sub_(torch.as_tensor(mean, dtype=torch.float32, device=x.device).reshape(shape))
        out.mul_(torch.as_tensor(scale, dtype=torch.float32, device=x.device).reshape(shape))
        return out.clamp_(*clip) if clip is not None else out
    out = np.array(x, dtype=np.float32, copy=True)
    out -= mean.astype(np.float32).reshape(shape)
    out *= scale.astype(np.float32).reshape(shape)
    if clip is not None:
        np.clip(out, clip[0], clip[1], out=out)
    return out


class ZScoreNormalize(Transform):
    """Z-score normalisation, channel by channel: ``(x - mean) / std``.

    Without ``mean``/``std`` each volume's own statistics are used (MRI-like data, whose
    intensity scale differs between scans); with them, fixed dataset statistics (e.g. the
    training set's foreground, as a plan records). ``clip`` bounds the result, in standard
    deviations (e.g. ``[-5, 5]``).

    Example
    -------
    >>> v = np.asarray([0.0, 2.0], dtype=np.float32).reshape(1, 2, 1, 1)
    >>> ZScoreNormalize()(v).ravel().tolist()
    [-1.0, 1.0]
    """

    backend = [MetaTensor.__name__]

    def __init__(self, mean=None, std=None, clip=None):
        self.mean, self.std = _fixed_pair(mean, std, "mean", "std", positive_b=True)
        if clip is not None:
            if (not isinstance(clip, (list, tuple)) or len(clip) != 2
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in clip)
                    or clip[0] >= clip[1]):
                raise SlabError(f"clip: expected [low, high] with low < high, got {clip!r}")
            clip = (float(clip[0]), float(clip[1]))
        self.clip = clip

    def statistics(self, img, name: str = "image") -> tuple[np.ndarray, np.ndarray]:
        """The ``(mean, std)`` used for ``img``, per channel."""
        if self.mean is not None:
            return _per_channel(self.mean, img, name), _per_channel(self.std, img, name)
        return _moments(img, name)

    def block_transform(self, img, name: str = "image") -> Callable:
        mean, std = self.statistics(img, name)
        return functools.partial(standardize, mean=mean, std=std, clip=self.clip)

    def spec(self) -> dict:
        out = {"scheme": "zscore", "clip": None if self.clip is None else list(self.clip)}
        if self.mean is not None:
            out.update(mean=list(self.mean), std=list(self.std))
        return out

    def __call__(self, img):
        return _keep_meta(img, self.block_transform(img, _source_name(img))(img))


NORMALIZE_SCHEMES = ("percentile", "zscore")


def make_normalize(spec):
    """The normalisation a spec (JSON data) describes, shared by training and prediction.

    ``None``: none (the image is used as stored). An object with ``"scheme"``:
    ``"percentile"`` (default; :class:`PercentileNormalize` arguments: ``lower``/``upper``
    percentiles of each volume, or a fixed ``low``/``high`` window of dataset statistics) or
    ``"zscore"`` (:class:`ZScoreNormalize`: each volume's mean/std, or fixed ``mean``/``std``).
    A transform object is returned as it is. Bad settings are one-line SlabErrors.
    """
    if spec is None or isinstance(spec, (PercentileNormalize, ZScoreNormalize)):
        return spec
    if not isinstance(spec, Mapping):
        raise SlabError(f"normalize: expected an object of settings or null, got {spec!r}")
    options = dict(spec)
    scheme = options.pop("scheme", "percentile")
    if scheme not in NORMALIZE_SCHEMES:
        raise SlabError(f"normalize scheme: expected one of {', '.join(NORMALIZE_SCHEMES)}, got {scheme!r}")
    cls = PercentileNormalize if scheme == "percentile" else ZScoreNormalize
    valid = [p for p in inspect.signature(cls).parameters if p != "self"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise SlabError(f"unknown key 'normalize.{unknown[0]}'; valid keys for scheme {scheme}: "
                        f"scheme, {', '.join(valid)}")
    return cls(**options)


class PercentileNormalized(MapTransform):
    """Dictionary form of :class:`PercentileNormalize`; ``mask_key`` names an optional mask."""

    backend = PercentileNormalize.backend

    def __init__(self, keys, lower: float = 0.5, upper: float = 99.5, soft_clip_alpha: float | None = None,
                 channel_wise: bool = True, mask_key: Hashable | None = None, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.normalize = PercentileNormalize(lower, upper, soft_clip_alpha, channel_wise)
        self.mask_key = mask_key

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        mask = None
        if self.mask_key is not None:
            if self.mask_key not in d:
                raise SlabError(f"{self.mask_key}: mask key missing from the data")
            mask = d[self.mask_key]
        for key in self.key_iterator(d):
            d[key] = self.normalize(d[key], mask)
        return d


__all__: Sequence[str] = ["scale_intensity", "standardize", "PercentileNormalize",
                          "PercentileNormalized", "ZScoreNormalize", "make_normalize", "NORMALIZE_SCHEMES"]
