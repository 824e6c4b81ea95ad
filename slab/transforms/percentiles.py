"""Exact volume percentiles without sorting.

:func:`volume_percentiles` returns exactly what ``np.percentile`` (linear interpolation) returns:
integer volumes of up to 16 bits are counted into a histogram (``np.bincount`` over chunks of
the flattened volume, so no full-size temporary is made) and the two order statistics around
each percentile are read from its cumulative sum; float volumes use ``np.partition`` on the
requested ranks only, and lazy float (or wide integer) volumes radix selection in blocks
(:mod:`slab.transforms.radix`), never loading them.
"""
from __future__ import annotations


import numpy as np
import torch
from monai.data import MetaTensor

from slab.core.errors import SlabError

_CHUNK = 1 << 20  # elements per bincount call: the intp temporary stays in cache
_MAX_HIST_RANGE = 1 << 24  # wider integer ranges are partitioned instead of counted


def to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.as_tensor() if isinstance(x, MetaTensor) else x
        return x.detach().cpu().numpy()
    if hasattr(x, "load") and hasattr(x, "affine") and not isinstance(x, np.ndarray):  # a LazyVolume
        return np.asarray(x.load())
    return np.asarray(x)


def _check_q(q) -> np.ndarray:
    try:
        qa = np.asarray(q, dtype=np.float64)
    except (TypeError, ValueError):
        raise SlabError(f"percentiles: expected numbers in [0, 100], got {q!r}") from None
    if qa.ndim > 1 or qa.size == 0:
        raise SlabError(f"percentiles: expected a number or a list of numbers in [0, 100], got {q!r}")
    if not np.all(np.isfinite(qa)) or np.any(qa < 0) or np.any(qa > 100):
        raise SlabError(f"percentiles: expected values in [0, 100], got {np.ravel(qa).tolist()}")
    return qa


def _ranks(n: int, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """numpy's linear method: the two ranks around each virtual index, and the weight."""
    virtual = (n - 1) * np.true_divide(q, 100)
    previous = np.floor(virtual)
    following = previous + 1
    above = virtual >= n - 1
    previous[above] = n - 1
    following[above] = n - 1
    below = virtual < 0
    previous[below] = 0
    following[below] = 0
    gamma = np.asarray(virtual - np.floor(virtual), dtype=np.float64)
    return previous.astype(np.intp), np.minimum(following, n - 1).astype(np.intp), gamma


def _lerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """numpy's ``_lerp`` step for step, so results are bit-identical to ``np.percentile``."""
    diff = b - a
    out = np.add(a, diff * t)
    np.subtract(b, diff * (1 - t), out=out, where=t >= 0.5, casting="unsafe", dtype=out.dtype)
    return out


def _histogram(flat: np.ndarray, mask: np.ndarray | None, offset: int | None, bins: int) -> np.ndarray:
    """Counts of ``flat[mask] - offset`` (no offset: the values are already bin indices)."""
    counts = np.zeros(bins, dtype=np.int64)
    for start in range(0, flat.size, _CHUNK):
        chunk = flat[start:start + _CHUNK]
        if mask is not None:
            chunk = chunk[mask[start:start + _CHUNK]]
        if offset is not None:
            chunk = chunk.astype(np.int64) - offset
        counts += np.bincount(chunk, minlength=bins)
    return counts


def _small_int_counts(flat: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, int, np.dtype]:
    """Histogram of an integer array of at most 16 bits, in value order.

    Returns ``(counts, offset, dtype)``: ``counts[j]`` voxels equal ``j - offset``.
    """
    dtype = flat.dtype
    if dtype == np.bool_:
        flat, dtype = flat.view(np.uint8), np.dtype(np.uint8)
    bins = 1 << (8 * dtype.itemsize)
    if dtype.kind == "u":
        return _histogram(flat, mask, None, bins), 0, dtype
    # signed: count the bit patterns, then rotate the negatives' bins to the front
    offset = bins // 2
    counts = _histogram(flat.view(np.dtype(f"u{dtype.itemsize}")), mask, None, bins)
    return np.roll(counts, -offset), offset, dtype


def percentiles_from_counts(counts: np.ndarray, offset: int, dtype: np.dtype, q1: np.ndarray, name: str) -> np.ndarray:
    """The percentiles ``q1`` of the voxels a value-ordered histogram counts."""
    cumulative = np.cumsum(counts)
    n = int(cumulative[-1]) if cumulative.size else 0
    if n == 0:
        raise SlabError(f"{name}: no voxels to compute percentiles from (empty volume or mask)")
    previous, following, gamma = _ranks(n, q1)
    bins = np.searchsorted(cumulative, np.concatenate([previous, following]), side="right")
    values = (bins.astype(np.int64) - offset).astype(dtype)
    return _lerp(values[: q1.size], values[q1.size:], gamma).astype(np.float64)


def _integer_counts(flat: np.ndarray, mask: np.ndarray | None, name: str):
    """``(counts, offset, dtype)`` of an integer array, or None when its range is too wide to count."""
    if flat.dtype.itemsize <= 2:
        return _small_int_counts(flat, mask)
    values = flat if mask is None else flat[mask]
    if values.size == 0:
        raise SlabError(f"{name}: no voxels to compute percentiles from (empty volume or mask)")
    low, high = int(values.min()), int(values.max())
    if high - low >= _MAX_HIST_RANGE or high >= 1 << 63:
        return None
    return _histogram(values, None, low, high - low + 1), -low, flat.dtype


def is_lazy(x) -> bool:
    return not isinstance(x, (np.ndarray, torch.Tensor)) and hasattr(x, "load") and hasattr(x, "shape")


def lazy_counts(volume, name: str) -> tuple[np.ndarray, int, np.dtype] | None:
    """Per-channel value-ordered histograms ``(C, bins)`` of a LazyVolume of <= 16-bit integers,
    read in blocks of slices (about 64 MB each) so the volume is never held whole; None for
    other dtypes."""
    dtype = np.dtype(volume.dtype)
    if dtype.kind not in "biu" or dtype.itemsize > 2:
        return None
    channels, depth = int(volume.shape[0]), int(volume.shape[-1])
    slice_bytes = max(1, int(np.prod(volume.shape[:-1])) * dtype.itemsize)
    step = max(1, (64 << 20) // slice_bytes)
    counts, offset, out_dtype = None, 0, dtype
    for z in range(0, depth, step):
        block = np.asarray(volume[:, :, :, z:z + step])
        for c in range(channels):
            part = block[c]
            order = "F" if part.flags.f_contiguous and not part.flags.c_contiguous else "C"
            found, offset, out_dtype = _small_int_counts(part.reshape(-1, order=order), None)
            if counts is None:
                counts = np.zeros((channels, found.size), dtype=np.int64)
            counts[c] += found
    if counts is None:
        raise SlabError(f"{name}: no voxels to compute percentiles from (empty volume)")
    return counts, offset, out_dtype


def lazy_select(volume, q1: np.ndarray, name: str, channel: int | None) -> np.ndarray | None:
    """Percentiles ``q1`` of a LazyVolume of floats or wide integers (one channel, or all), by
    radix selection in blocks (:mod:`slab.transforms.radix`); None for other dtypes."""
    from slab.transforms import radix

    if radix.key_dtype(volume.dtype) is None:
        return None
    previous, following, gamma = _ranks(radix.count(volume, channel), q1)
    values = radix.select(volume, np.concatenate([previous, following]), name, channel)
    return _lerp(values[: q1.size], values[q1.size:], gamma).astype(np.float64)


def volume_percentiles(x, q, mask=None, *, name: str = "volume"):
    """Exact percentiles of a whole volume, identical to ``np.percentile(x[mask], q)``.

    Parameters
    ----------
    x : numpy array, torch tensor, MetaTensor or LazyVolume
        Any shape. Integer volumes of up to 16 bits (and wider ones whose range is below 2**24)
        are histogrammed; float volumes are partitioned. NaN or Inf in a float volume (within
        the mask) is a SlabError.
    q : float or sequence of floats
        Percentiles in ``[0, 100]``.
    mask : array-like of bool, optional
        Same shape as ``x``; only voxels where it is true count.
    name : str
        What to call ``x`` in error messages.

    Returns
    -------
    float or numpy.ndarray
        float64; a Python float for a scalar ``q``, else an array shaped like ``q``. Equal to
        ``np.percentile(x[mask], np.asarray(q, float))`` (linear interpolation).

    Example
    -------
    >>> v = np.arange(101, dtype=np.uint16).reshape(1, 101, 1, 1)
    >>> volume_percentiles(v, [1, 50, 99.5]).tolist()
    [1.0, 50.0, 99.5]
    """
    qa = _check_q(q)
    q1 = qa.reshape(-1)

    def shaped(result: np.ndarray):
        return float(result[0]) if qa.ndim == 0 else np.asarray(result, dtype=np.float64).reshape(qa.shape)

    if mask is None and is_lazy(x):
        if name == "volume":  # a lazy volume knows its file
            name = str(getattr(x, "meta", {}).get("filename_or_obj") or name)
        found = lazy_counts(x, name)
        if found is not None:
            counts, offset, dtype = found
            return shaped(percentiles_from_counts(counts.sum(axis=0), offset, dtype, q1, name))
        selected = lazy_select(x, q1, name, None)
        if selected is not None:
            return shaped(selected)
    array = to_numpy(x)
    # Order does not matter to a percentile: flatten in memory order so that a volume loaded
    # x-fastest (Fortran order) is not copied; the mask is flattened the same way.
    order = "F" if array.flags.f_contiguous and not array.flags.c_contiguous else "C"
    flat = array.reshape(-1, order=order)
    m = None
    if mask is not None:
        m = to_numpy(mask)
        if m.shape != array.shape:
            raise SlabError(f"mask: shape {tuple(m.shape)} does not match {name} {tuple(array.shape)}")
        m = m.astype(bool, copy=False).reshape(-1, order=order)
    if array.dtype.kind in "biu":
        found = _integer_counts(flat, m, name)
        if found is not None:
            return shaped(percentiles_from_counts(*found, q1, name))
        values = flat if m is None else flat[m]
    elif array.dtype.kind == "f":
        values = flat if m is None else flat[m]
        if not np.all(np.isfinite(values)):
            raise SlabError(f"{name}: contains NaN or Inf where percentiles are computed; clean the volume first")
    else:
        raise SlabError(f"{name}: expected a real-valued volume, got dtype {array.dtype}")
    n = int(values.size)
    if n == 0:
        raise SlabError(f"{name}: no voxels to compute percentiles from (empty volume or mask)")
    previous, following, gamma = _ranks(n, q1)
    kth = np.unique(np.concatenate([previous, following]))
    part = np.partition(values, kth)  # a copy of the selected voxels; the input is untouched
    return shaped(_lerp(part[previous], part[following], gamma))


__all__ = ["volume_percentiles"]
