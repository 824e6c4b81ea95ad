"""Masks and probability maps read a few slices at a time, for the streaming metrics.

A :class:`Reader` gives blocks of one channel of a volume (numpy array, memory map, LazyVolume or
torch tensor) in stream order, along the axis that is slowest in memory, zero outside. From an
``np.memmap`` it copies those slices and drops the mapped pages it has passed from the process,
so that streaming a file larger than memory keeps only the slices at hand resident. Masks are
checked binary (0/1, bool, or 0/255 integers); probability maps are checked for NaN and
binarised ``> threshold`` in their own dtype.
"""
from __future__ import annotations

import mmap

import numpy as np
import torch

from slab.core.errors import SlabError


def _channels(volume, name: str) -> list:
    """Channel indices of a ``(X, Y, Z)`` (``[None]``) or ``(L, X, Y, Z)`` volume."""
    shape = tuple(volume.shape)
    if len(shape) == 3:
        return [None]
    if len(shape) == 4 and shape[0] > 0:
        return list(range(shape[0]))
    raise SlabError(f"{name}: expected a (X, Y, Z) or (L, X, Y, Z) volume, got shape {shape}")


def check_pair(pred, truth, names=("pred", "truth")) -> list:
    """Channel index pairs of two volumes with the same spatial shape and class count
    (a ``(X, Y, Z)`` volume is one class)."""
    pc, tc = _channels(pred, names[0]), _channels(truth, names[1])
    if tuple(pred.shape)[-3:] != tuple(truth.shape)[-3:] or len(pc) != len(tc):
        raise SlabError(f"{names[0]}: shape {tuple(pred.shape)} does not match {names[1]} {tuple(truth.shape)}")
    return list(zip(pc, tc))


class Reader:
    """Blocks of one channel of a volume, in stream order ``(s, a, b)``, zero outside.

    ``perm`` maps stream axes to spatial axes; blocks are numpy arrays, or torch tensors on
    ``device`` when that is given. Boxes may reach outside the volume (the zero padding of the
    cell grid); only the part inside is read.
    """

    def __init__(self, volume, name: str, channel, perm, device=None, threshold: float | None = None):
        if isinstance(volume, torch.Tensor):
            volume = volume.as_subclass(torch.Tensor)  # plain ops, no MetaTensor bookkeeping
        self.volume, self.name, self.channel, self.perm, self.device = volume, name, channel, perm, device
        self.threshold = threshold
        self.cuda = device is not None and device.type == "cuda"
        self.shape = tuple(tuple(volume.shape)[-3:][i] for i in perm)
        self.mapping = _shared_mapping(volume)

    def at(self, threshold: float) -> Reader:
        """The same volume, binarised ``> threshold``."""
        return Reader(self.volume, self.name, self.channel, self.perm, self.device, threshold)

    def _read(self, lo, hi):
        index = [slice(None)] * 3
        for axis, l, h in zip(self.perm, lo, hi):
            index[axis] = slice(l, h)
        data = self.volume[tuple(index) if self.channel is None else (self.channel, *index)]
        if isinstance(data, torch.Tensor):
            return data.permute(self.perm).to(self.device)
        if self.mapping is not None:
            data = _copy_and_release(data, *self.mapping)
        data = np.asarray(data).transpose(self.perm)
        return data if self.device is None else torch.from_numpy(np.ascontiguousarray(data)).to(self.device)

    def _part(self, lo, hi, convert):
        """``(where, data)``: the voxels of the box ``[lo, hi)`` inside the volume, converted, and
        their place in the box; ``None`` when the box lies outside."""
        inner_lo = [max(l, 0) for l in lo]
        inner_hi = [min(h, n) for h, n in zip(hi, self.shape)]
        if any(h <= l for l, h in zip(inner_lo, inner_hi)):
            return None
        where = tuple(slice(il - l, ih - l) for il, ih, l in zip(inner_lo, inner_hi, lo))
        return where, convert(self._read(inner_lo, inner_hi))

    def mask(self, lo, hi):
        """:meth:`_part` as a ``uint8`` 0/1 mask (checked binary, or ``> threshold``)."""
        if self.threshold is None:
            return self._part(lo, hi, self._binary)
        return self._part(lo, hi, lambda data: binarize(self._finite(data), self.threshold))

    def values(self, lo, hi):
        """:meth:`_part` as the raw values (a probability map, checked for NaN)."""
        return self._part(lo, hi, self._finite)

    def _finite(self, data):
        return finite_probabilities(data, self.name)

    def _binary(self, data):
        return binary_mask(data, self.name)


def finite_probabilities(data, name: str):
    """``data`` unchanged, or a SlabError naming ``name`` when a probability map holds NaN. Every
    command that reads a probability map (``evaluate``, ``errors``) checks it here."""
    if is_float(data) and bool((torch.isnan(data) if isinstance(data, torch.Tensor) else np.isnan(data)).any()):
        raise SlabError(f"{name}: NaN in the probability map")
    return data


def binary_mask(data, name: str):
    """``data`` as 0/1 ``uint8``: 0/1 values (any dtype, bool), or integer 0/255 (stacks); a
    SlabError naming ``name`` for anything else. Every command that reads a mask (``evaluate``,
    ``errors``) checks it here."""
    if isinstance(data, torch.Tensor):
        if data.dtype == torch.bool:
            return data.to(torch.uint8)
        if data.numel() and not bool(((data == 0) | (data == 1)).all()):
            if data.is_floating_point() or not bool(((data == 0) | (data == 1) | (data == 255)).all()):
                raise SlabError(f"{name}: expected a binary mask (0/1 or 0/255), found other values")
            return (data != 0).to(torch.uint8)
        return data.to(torch.uint8)
    if data.dtype == bool:
        return data.view(np.uint8)
    if data.size == 0:
        return data.astype(np.uint8, copy=False)
    if int(data.max()) <= 1 if data.dtype == np.uint8 else bool(((data == 0) | (data == 1)).all()):
        return data.astype(np.uint8, copy=False)
    if data.dtype.kind in "ui" and bool(((data == 0) | (data == 1) | (data == 255)).all()):
        return (data != 0).view(np.uint8)
    raise SlabError(f"{name}: expected a binary mask (0/1 or 0/255), found other values")


def _shared_mapping(volume) -> tuple[mmap.mmap, int] | None:
    """``(mmap, its address)`` of an ``np.memmap`` whose pages may be dropped once read (a
    shared mapping: the file keeps the data), else None."""
    mapped = getattr(volume, "_mmap", None)
    if (not isinstance(volume, np.memmap) or not isinstance(mapped, mmap.mmap) or volume.mode == "c"
            or not hasattr(mmap, "MADV_DONTNEED")):
        return None
    probe = np.frombuffer(mapped, np.uint8, count=1)
    address = probe.__array_interface__["data"][0]
    del probe  # releases the buffer export, so the mapping can still close
    return mapped, address


def _copy_and_release(block: np.ndarray, mapped: mmap.mmap, address: int) -> np.ndarray:
    """A private copy of the memory-mapped ``block``, and the mapped pages it spans before its
    last page dropped from the process (they are read again from the page cache if needed).

    Streaming a memory map otherwise keeps every page read resident in the process until the
    end, so its resident set grows to the size of the inputs.
    """
    copy = np.array(block)
    if block.size:
        low = high = block.__array_interface__["data"][0]
        for n, stride in zip(block.shape, block.strides):
            low, high = low + min(0, stride * (n - 1)), high + max(0, stride * (n - 1))
        high += block.itemsize
        # Only a block that is (nearly) one contiguous run: else it spans pages of data still to come.
        if high - low <= 2 * block.nbytes:
            start = (low - address) // mmap.PAGESIZE * mmap.PAGESIZE
            end = (high - address) // mmap.PAGESIZE * mmap.PAGESIZE
            if end > start:
                mapped.madvise(mmap.MADV_DONTNEED, start, end - start)
    return copy


def readers(pred, truth, channels, names, threshold: float | None = None) -> tuple[Reader, Reader]:
    """Readers of one class of ``pred`` and ``truth`` that stream along the same axis into the
    same kind of array: torch on the first tensor's device if either is a tensor.

    The stream axis is z when either volume is lazy (it reads whole slices), else ``pred``'s
    slowest axis in memory, so that a block of a few slices is one contiguous read.
    """
    strides = [v.stride() if isinstance(v, torch.Tensor) else getattr(v, "strides", None) for v in (pred, truth)]
    if strides[0] is None or strides[1] is None:
        perm = (2, 0, 1)
    else:
        perm = tuple(int(i) for i in np.argsort([-abs(s) for s in strides[0][-3:]], kind="stable"))
    device = next((v.device for v in (pred, truth) if isinstance(v, torch.Tensor)), None)
    return (Reader(pred, names[0], channels[0], perm, device, threshold),
            Reader(truth, names[1], channels[1], perm, device))


def is_float(data) -> bool:
    return data.dtype.is_floating_point if isinstance(data, torch.Tensor) else np.issubdtype(data.dtype, np.floating)


def binarize(data, threshold: float):
    """``data > threshold`` as uint8, compared exactly as :class:`slab.transforms.post.Threshold` does."""
    if isinstance(data, torch.Tensor):
        return (data.double() > threshold).to(torch.uint8)  # float64 holds every value and threshold
    # Imported here: slab.transforms.post brings scikit-image and the I/O stack (~100 MB resident),
    # which streaming a mask does not need.
    from slab.transforms.post import greater_than

    return greater_than(data, threshold).view(np.uint8)

