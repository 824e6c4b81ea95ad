"""2.5D slabs: k neighbouring slices of a volume stacked as the channels of a 2D image.

A plane is named by the two axes it spans and slabs are taken along the third
(``PLANE_AXIS``). The 2D image of a slab keeps the remaining spatial axes in volume order:
plane ``xy`` gives ``(X, Y)`` images, ``zx`` gives ``(X, Z)``, ``zy`` gives ``(Y, Z)``.

A slab of a ``(C, X, Y, Z)`` volume at slice ``i`` with offsets ``o_0..o_{k-1}`` has ``C*k``
channels, channel-major: channel ``c*k + j`` is image channel ``c`` at slice ``i + o_j``,
indices clamped to the volume. Centred offsets are ``-s, 0, +s`` (k = 3); forward offsets
``0, s, 2s`` are the UW-Madison GI Tract recipe. Only the slices a slab needs are read: numpy
and torch volumes are indexed with ``take``/``index_select``, a ``LazyVolume`` is read with
one basic-index read per batch, so no slab copies the volume.

``pad_to_divisor`` pads the last spatial axes to a multiple of a network's divisor (split
evenly, the extra voxel after) and ``unpad`` is its exact inverse.
"""
from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

from slab.core.checks import positive_int
from slab.core.errors import SlabError

PLANE_AXIS = {"xy": 2, "zx": 1, "zy": 0}
OFFSET_MODES = ("centred", "forward")
PAD_MODES = ("constant", "edge", "reflect")
_TORCH_PAD_MODE = {"constant": "constant", "edge": "replicate", "reflect": "reflect"}


# ---------------------------------------------------------------------------------------------
# Arguments


def plane_axis(plane: str) -> int:
    """The spatial axis (0, 1 or 2; channel axis excluded) that slabs of ``plane`` run along."""
    if plane not in PLANE_AXIS:
        raise SlabError(f"plane: expected one of {', '.join(PLANE_AXIS)}, got {plane!r}")
    return PLANE_AXIS[plane]




def slab_offsets(k: int = 3, stride: int = 1, mode: str = "centred") -> tuple[int, ...]:
    """Slice offsets of a slab of ``k`` slices, ``stride`` apart.

    ``mode="centred"``: ``-(k//2)*s .. (k-1-k//2)*s`` (k = 3, s = 2: ``(-2, 0, 2)``; an even k has
    one more slice before the centre). ``mode="forward"``: ``0, s, .., (k-1)*s`` (UW-Madison).

    Example
    -------
    >>> slab_offsets(3, 2), slab_offsets(3, 2, "forward")
    ((-2, 0, 2), (0, 2, 4))
    """
    k = positive_int(k, "k")
    stride = positive_int(stride, "stride")
    if mode in ("centred", "centered", "center", "centre"):
        first = -(k // 2)
    elif mode == "forward":
        first = 0
    else:
        raise SlabError(f"mode: expected one of {', '.join(OFFSET_MODES)}, got {mode!r}")
    return tuple((first + j) * stride for j in range(k))


def check_offsets(offsets) -> tuple[int, ...]:
    """Validate a list of slice offsets: non-empty, integers. Returns them as a tuple of ints."""
    try:
        items = list(offsets)
    except TypeError:
        raise SlabError(f"offsets: expected a non-empty list of integers, got {offsets!r}") from None
    if not items:
        raise SlabError("offsets: expected a non-empty list of integers, got an empty list")
    out = []
    for item in items:
        if isinstance(item, (bool, np.bool_)):
            raise SlabError(f"offsets: expected integers, got {item!r}")
        if isinstance(item, (float, np.floating)) and float(item).is_integer():
            item = int(item)
        if not isinstance(item, (int, np.integer)):
            raise SlabError(f"offsets: expected integers, got {item!r}")
        out.append(int(item))
    return tuple(out)


def _check_volume(volume) -> tuple[int, ...]:
    shape = tuple(int(s) for s in volume.shape)
    if len(shape) != 4:
        raise SlabError(f"volume: expected shape (C, X, Y, Z), got {shape}")
    return shape


def _check_index(index, size: int, plane: str) -> int:
    if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
        raise SlabError(f"index: expected an integer slice index, got {index!r}")
    if not 0 <= int(index) < size:
        raise SlabError(f"index: slice {int(index)} is out of range for plane {plane} (0..{size - 1})")
    return int(index)


def slab_indices(index, size: int, offsets) -> np.ndarray:
    """Clamped slice indices ``clip(index + offsets, 0, size - 1)``; ``index`` may be an array (B,) → (B, k)."""
    offsets = np.asarray(check_offsets(offsets), dtype=np.int64)
    return np.clip(np.asarray(index, dtype=np.int64)[..., None] + offsets, 0, size - 1)


# ---------------------------------------------------------------------------------------------
# Slabs


def _plain(volume):
    return volume.as_tensor() if isinstance(volume, MetaTensor) else volume


def _gather(volume, axis: int, local: np.ndarray):
    """``volume`` indexed with ``local`` (B, k) along spatial ``axis`` → (B, C*k, A, B)."""
    channels = volume.shape[0]
    batch, k = local.shape
    if isinstance(volume, torch.Tensor):
        index = torch.as_tensor(local.reshape(-1), device=volume.device)
        taken = volume.index_select(axis + 1, index)  # (C, .., B*k, ..)
        taken = taken.movedim(axis + 1, 1)  # (C, B*k, A, B)
        taken = taken.reshape(channels, batch, k, *taken.shape[2:]).transpose(0, 1)
        return taken.reshape(batch, channels * k, *taken.shape[3:])
    taken = np.take(volume, local.reshape(-1), axis=axis + 1)
    taken = np.moveaxis(taken, axis + 1, 1)
    taken = taken.reshape(channels, batch, k, *taken.shape[2:]).swapaxes(0, 1)
    return np.ascontiguousarray(taken.reshape(batch, channels * k, *taken.shape[3:]))


def _read_range(volume, axis: int, start: int, stop: int):
    """The slices ``start:stop`` along spatial ``axis`` of any volume, read without touching the rest."""
    index = [slice(None)] * 4
    index[axis + 1] = slice(start, stop)
    return volume[tuple(index)]


def _is_array_like(volume) -> bool:
    return isinstance(volume, (np.ndarray, torch.Tensor))


def extract_slab(volume, plane: str, index: int, offsets=(-1, 0, 1)):
    """The slab of ``volume`` at slice ``index`` of ``plane``.

    Parameters
    ----------
    volume : ``(C, X, Y, Z)`` numpy array, torch tensor (MetaTensor) or LazyVolume
    plane : ``"xy"``, ``"zx"`` or ``"zy"``
    index : int
        Slice index along ``PLANE_AXIS[plane]``.
    offsets : sequence of int
        Slice offsets; indices past the edges are clamped.

    ``plane`` and ``index`` may also be given as ``(volume, index, plane)``; the types tell them apart.

    Returns
    -------
    ``(C*k, A, B)`` numpy array (numpy or lazy input) or plain torch tensor (torch input, same
    device); channel ``c*k + j`` is channel ``c`` at slice ``clip(index + offsets[j])``.

    Example
    -------
    >>> v = np.arange(4).reshape(1, 1, 1, 4)
    >>> extract_slab(v, "xy", 0, (-1, 0, 1))[:, 0, 0].tolist()
    [0, 0, 1]
    """
    if isinstance(index, str) and not isinstance(plane, str):  # (volume, index, plane): same meaning
        plane, index = index, plane
    shape = _check_volume(volume)
    axis = plane_axis(plane)
    offsets = check_offsets(offsets)
    index = _check_index(index, shape[axis + 1], plane)
    wanted = slab_indices(np.asarray([index]), shape[axis + 1], offsets)
    return _slab_batch(volume, axis, wanted)[0]


def _slab_batch(volume, axis: int, wanted: np.ndarray):
    if _is_array_like(volume):
        return _gather(_plain(volume), axis, wanted)
    needed = np.unique(wanted)
    start, stop = int(needed[0]), int(needed[-1]) + 1
    if stop - start <= 2 * needed.size:  # nearly contiguous: one read of the span
        block = np.asarray(_read_range(volume, axis, start, stop))
        return _gather(block, axis, wanted - start)
    parts = [np.asarray(_read_range(volume, axis, int(i), int(i) + 1)) for i in needed]
    return _gather(np.concatenate(parts, axis=axis + 1), axis, np.searchsorted(needed, wanted))


def iter_slab_batches(volume, plane: str = "xy", offsets=(-1, 0, 1), batch_size: int = 8, start: int = 0,
                      stop: int | None = None, *, indices=None) -> Iterator[tuple[np.ndarray, object]]:
    """Yield ``(indices, slabs)`` over slices of ``plane``, ``batch_size`` at a time.

    Parameters
    ----------
    volume : ``(C, X, Y, Z)`` numpy array, torch tensor (MetaTensor) or LazyVolume
    plane, offsets : as :func:`extract_slab`
    batch_size : slabs per batch
    start, stop : the slices ``start:stop`` (default every slice of the plane)
    indices : instead of ``start:stop``, the slice indices to visit, in this order

    Yields
    ------
    (numpy.ndarray, array or tensor)
        The ``(b,)`` int64 slice indices of the batch and its ``(b, C*k, A, B)`` slabs: numpy for
        numpy or LazyVolume input (a LazyVolume reads just the slices the batch needs, in one
        block when they are nearly contiguous, so memory stays at a few slabs), a plain torch
        tensor on the volume's device for torch input.
    """
    shape = _check_volume(volume)
    axis = plane_axis(plane)
    offsets = check_offsets(offsets)
    batch_size = positive_int(batch_size, "batch_size")
    size = shape[axis + 1]
    if indices is None:
        stop = size if stop is None else stop
        integers = isinstance(start, (int, np.integer)) and isinstance(stop, (int, np.integer))
        if not (integers and 0 <= start <= stop <= size):
            raise SlabError(f"start, stop: expected integers, 0 <= start <= stop <= {size}; got {start!r}, {stop!r}")
        order = np.arange(int(start), int(stop), dtype=np.int64)
    else:
        order = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else list(np.ravel(indices)))
        if order.ndim != 1 or (order.size and order.dtype.kind not in "iu"):
            raise SlabError(f"indices: expected a list of integer slice indices, got {indices!r}")
        order = order.astype(np.int64)
        if order.size and (order.min() < 0 or order.max() >= size):
            raise SlabError(f"indices: slice indices must lie in 0..{size - 1} for plane {plane}")
    for first in range(0, order.size, batch_size):
        batch = order[first:first + batch_size]
        yield batch, _slab_batch(volume, axis, slab_indices(batch, size, offsets))


class SliceStack(Transform):
    """Array transform: ``(C, X, Y, Z)`` volume and a slice index → ``(C*k, A, B)`` slab.

    Example
    -------
    >>> v = np.arange(24).reshape(1, 2, 3, 4)
    >>> SliceStack("xy", slab_offsets(3, 1))(v, 3).shape
    (3, 2, 3)
    """

    backend = ["numpy", "torch"]

    def __init__(self, plane: str = "xy", offsets=(-1, 0, 1)):
        plane_axis(plane)
        self.plane = plane
        self.offsets = check_offsets(offsets)

    def __call__(self, img, index: int):
        return extract_slab(img, self.plane, index, self.offsets)


class SliceStackd(MapTransform):
    """Dictionary form of :class:`SliceStack`.

    The slice index is ``data[index_key]`` (and the plane ``data[plane_key]`` when that key is
    set and present, else ``plane``). ``keys`` get the full slab (``C*k`` channels); each key of
    ``label_keys`` gets its slice at offset 0 only (``L`` channels), which is what a 2.5D network
    predicts. A centred or forward slab always contains offset 0.
    """

    backend = SliceStack.backend

    def __init__(self, keys, plane: str = "xy", offsets=(-1, 0, 1), label_keys: Sequence[Hashable] = (),
                 index_key: Hashable = "slice", plane_key: Hashable | None = "plane",
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        plane_axis(plane)
        self.plane = plane
        self.offsets = check_offsets(offsets)
        self.label_keys = tuple(label_keys) if not isinstance(label_keys, str) else (label_keys,)
        self.index_key = index_key
        self.plane_key = plane_key

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        if self.index_key not in d:
            raise SlabError(f"{self.index_key}: slice index key missing from the data")
        plane = d.get(self.plane_key, self.plane) if self.plane_key is not None else self.plane
        index = d[self.index_key]
        index = int(index) if isinstance(index, (torch.Tensor, np.ndarray)) else index
        for key in self.key_iterator(d):
            d[key] = extract_slab(d[key], plane, index, self.offsets)
        for key in self.label_keys:
            if key in d:
                d[key] = extract_slab(d[key], plane, index, (0,))
            elif not self.allow_missing_keys:
                raise SlabError(f"{key}: label key missing from the data")
        return d


# ---------------------------------------------------------------------------------------------
# Padding to a network's divisor


def _divisors(divisor, n: int, name: str = "divisor") -> tuple[int, ...]:
    items = list(divisor) if isinstance(divisor, (list, tuple)) else [divisor] * n
    if len(items) != n:
        raise SlabError(f"{name}: expected one number or {n}, got {divisor!r}")
    return tuple(positive_int(item, name) for item in items)


def pad_to_divisor(x, divisor, spatial_dims: int = 2, mode: str = "constant", value: float = 0.0, min_size=1):
    """Pad the last ``spatial_dims`` axes of ``x`` up to multiples of ``divisor`` (pad, not resize),
    and to at least ``min_size`` (a network's smallest input, ``slab.networks.network_min_size``).

    Each axis gets ``total // 2`` before and the rest after, so content stays centred.

    Parameters
    ----------
    x : numpy array or torch tensor ``(..., *spatial)``
    divisor : int or one int per spatial axis
    spatial_dims : how many trailing axes are spatial
    mode : ``"constant"`` (with ``value``), ``"edge"`` or ``"reflect"``
    min_size : int or one int per spatial axis; each padded axis is at least this long

    Returns
    -------
    (padded, pads)
        ``pads`` is a tuple of ``(before, after)`` per spatial axis, for :func:`unpad`.

    Example
    -------
    >>> y, pads = pad_to_divisor(np.ones((1, 5, 7)), 4)
    >>> y.shape, pads
    ((1, 8, 8), ((1, 2), (0, 1)))
    """
    spatial_dims = positive_int(spatial_dims, "spatial_dims")
    if x.ndim < spatial_dims:
        raise SlabError(f"x: expected at least {spatial_dims} dimensions, got shape {tuple(x.shape)}")
    if mode not in PAD_MODES:
        raise SlabError(f"mode: expected one of {', '.join(PAD_MODES)}, got {mode!r}")
    sizes = tuple(int(s) for s in x.shape[-spatial_dims:])
    pads = []
    minimums = _divisors(min_size, spatial_dims, "min_size") if min_size != 1 else (1,) * spatial_dims
    for size, div, least in zip(sizes, _divisors(divisor, spatial_dims), minimums):
        total = max(least - size, -size % div)
        total += -(size + total) % div  # a minimum that is not a multiple still ends on one
        pads.append((total // 2, total - total // 2))
    pads = tuple(pads)
    if not any(before or after for before, after in pads):
        return x, pads
    if mode == "reflect" and any(max(p) >= s for p, s in zip(pads, sizes)):
        raise SlabError(f"mode: reflect padding needs every padded axis longer than its pad, got shape {sizes}")
    if isinstance(x, torch.Tensor):
        flat = [p for pair in reversed(pads) for p in pair]
        if mode == "constant":
            return F.pad(x, flat, mode="constant", value=value), pads
        # torch's replicate/reflect want a batch and channel axis in front of the spatial ones
        lead = x.shape[:-spatial_dims]
        y = x.reshape(1, -1, *sizes)
        if not y.is_floating_point():
            return F.pad(y.double(), flat, mode=_TORCH_PAD_MODE[mode]).to(x.dtype).reshape(*lead, *y.shape[2:]), pads
        y = F.pad(y, flat, mode=_TORCH_PAD_MODE[mode])
        return y.reshape(*lead, *y.shape[2:]), pads
    width = [(0, 0)] * (x.ndim - spatial_dims) + list(pads)
    if mode == "constant":
        return np.pad(x, width, mode="constant", constant_values=value), pads
    return np.pad(x, width, mode=mode), pads


def unpad(x, pads):
    """Crop what :func:`pad_to_divisor` added: ``unpad(*pad_to_divisor(x, d)) == x`` exactly.

    ``pads`` is the ``(before, after)`` per trailing spatial axis that ``pad_to_divisor`` returned.
    """
    pads = tuple(tuple(int(p) for p in pair) for pair in pads)
    if len(pads) > x.ndim:
        raise SlabError(f"pads: {len(pads)} padded axes for an array of shape {tuple(x.shape)}")
    index = [slice(None)] * (x.ndim - len(pads))
    for (before, after), size in zip(pads, x.shape[-len(pads):] if pads else ()):
        if before < 0 or after < 0 or before + after > size:
            raise SlabError(f"pads: {pads} do not fit an array of shape {tuple(x.shape)}")
        index.append(slice(before, size - after))
    return x[tuple(index)]


__all__ = [
    "PLANE_AXIS", "plane_axis", "slab_offsets", "check_offsets", "slab_indices", "extract_slab",
    "iter_slab_batches", "SliceStack", "SliceStackd", "pad_to_divisor", "unpad",
]
