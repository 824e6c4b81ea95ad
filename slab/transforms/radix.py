"""Exact order statistics of a volume read in blocks: radix selection on the values' bits.

For a lazy volume of floats (or of integers wider than 16 bits) the percentiles cannot be read
from one histogram of values. Each value is mapped to an unsigned key whose order is the values'
order (floats: the sign bit flipped for positives, every bit for negatives; signed integers: the
sign bit flipped), and the keys are selected 16 bits at a time: pass ``p`` reads the volume once,
in blocks of slices, and counts the ``p``-th 16-bit digit of the keys that share the digits
already chosen for each wanted rank; the cumulative counts fix the next digit of every rank.
One pass gives a float16's exact ``k``-th smallest value, two a float32's, four a float64's,
with 65,536 counts per wanted rank in memory, whatever the volume's size.
The ranks and the interpolation are numpy's (``slab.transforms.intensity``), so the result is
``np.percentile``'s.
"""
from __future__ import annotations

import numpy as np

from slab.core.errors import SlabError

DIGIT = 16
BLOCK_BYTES = 64 << 20


def key_dtype(dtype) -> tuple[np.dtype, np.dtype] | None:
    """``(value dtype read, key dtype)`` for a dtype that radix selection handles, else None."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return dtype, np.dtype(f"u{dtype.itemsize}")
    if dtype.kind in "iu" and dtype.itemsize > 2:
        return dtype, np.dtype(f"u{dtype.itemsize}")
    return None


def to_keys(values: np.ndarray, key: np.dtype) -> np.ndarray:
    """Unsigned keys in the order of ``values`` (floats without NaN)."""
    bits = values.view(key)
    top = key.type(1 << (8 * key.itemsize - 1))
    if values.dtype.kind == "f":
        return np.where(bits & top, ~bits, bits | top)
    if values.dtype.kind == "i":
        return bits ^ top
    return bits


def from_keys(keys: np.ndarray, value: np.dtype) -> np.ndarray:
    """The values of :func:`to_keys`' keys."""
    key = keys.dtype
    top = key.type(1 << (8 * key.itemsize - 1))
    if value.kind == "f":
        bits = np.where(keys & top, keys ^ top, ~keys)
    elif value.kind == "i":
        bits = keys ^ top
    else:
        bits = keys
    return bits.astype(key).view(value)


def _blocks(volume, channel, value: np.dtype, name: str):
    """The values of ``channel`` (None: every channel) of a ``(C, X, Y, Z)`` lazy volume, a block
    of slices at a time, flattened, NaN and Inf refused."""
    depth = int(volume.shape[-1])
    per_slice = max(1, int(np.prod(volume.shape[1:-1])) * value.itemsize * (1 if channel is not None
                                                                            else int(volume.shape[0])))
    step = max(1, BLOCK_BYTES // per_slice)
    for z in range(0, depth, step):
        index = (slice(None) if channel is None else slice(channel, channel + 1), slice(None), slice(None),
                 slice(z, z + step))
        block = np.asarray(volume[index]).astype(value, copy=False).reshape(-1)
        if value.kind == "f" and not np.all(np.isfinite(block)):
            raise SlabError(f"{name}: contains NaN or Inf where percentiles are computed; clean the volume first")
        yield block


def select(volume, ranks, name: str, channel: int | None = None) -> np.ndarray:
    """The values at the 0-based ``ranks`` of the sorted voxels of ``channel`` (None: all
    channels) of a lazy volume, in its dtype; ``ranks`` below :func:`count`."""
    found = key_dtype(volume.dtype)
    if found is None:
        raise SlabError(f"{name}: radix selection takes floats or integers wider than 16 bits, not {volume.dtype}")
    value, key = found
    bits = 8 * key.itemsize
    prefixes = [0] * len(ranks)
    remaining = [int(r) for r in ranks]
    for shift in range(bits - DIGIT, -1, -DIGIT):
        counts = {p: np.zeros(1 << DIGIT, dtype=np.int64) for p in set(prefixes)}
        for block in _blocks(volume, channel, value, name):
            keys = to_keys(block, key)
            digits = ((keys >> key.type(shift)) & key.type((1 << DIGIT) - 1)).astype(np.intp)
            if shift + DIGIT >= bits:  # the first digit: every voxel counts
                counts[0] += np.bincount(digits, minlength=1 << DIGIT)
                continue
            high = keys >> key.type(shift + DIGIT)
            for p, found in counts.items():
                found += np.bincount(digits[high == key.type(p)], minlength=1 << DIGIT)
        for i, p in enumerate(prefixes):
            cumulative = np.cumsum(counts[p])
            digit = int(np.searchsorted(cumulative, remaining[i], side="right"))
            if digit >= 1 << DIGIT:
                raise SlabError(f"{name}: rank {int(ranks[i])} is beyond its voxels")
            remaining[i] -= int(cumulative[digit - 1]) if digit else 0
            prefixes[i] = (p << DIGIT) | digit
    return from_keys(np.asarray(prefixes, dtype=np.uint64).astype(key), value)


def count(volume, channel: int | None = None) -> int:
    """Voxels of ``channel`` (None: all channels) of a ``(C, X, Y, Z)`` volume."""
    spatial = int(np.prod(volume.shape[1:]))
    return spatial if channel is not None else spatial * int(volume.shape[0])


__all__ = ["count", "from_keys", "key_dtype", "select", "to_keys"]
