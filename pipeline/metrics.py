"""Segmentation metrics in physical units: surface dice, overlap, threshold sweeps, MONAI metrics.

Masks are binary ``(X, Y, Z)`` volumes (or ``(L, X, Y, Z)`` with one channel per class): numpy
arrays, memory maps, :class:`~transforms.io.LazyVolume` s or torch tensors (CPU or CUDA).
Spacing is the voxel size ``(sx, sy, sz)`` in mm; tolerances are in mm.

Surface dice follows DeepMind's ``surface-distance`` (the SenNet HOA metric at tolerance 0):
every 2x2x2 cell of the zero-padded volume has an 8-bit neighbour code per mask and, from
the marching-cubes table, a surface area; a cell "has surface" when its code is neither 0 nor
255. A surface cell of one mask counts as matched when the other mask has a surface cell whose
centre lies within the tolerance; the score is the matched area of both masks over their total
area. At tolerance 0 that means both masks have surface in the same cell.

How it is computed: one pass over slice pairs builds, for every cell, a 16-bit code of both
masks' 8 corners and adds it to a 65536-bin histogram; tables indexed by that code give the
areas, the surface-in-both flag and the voxel counts (every voxel is a corner of 8 cells), so
surface dice at tolerance 0 and all overlap metrics come from the histogram. The pass reads a
few slices at a time, along the axis that is slowest in memory; from an ``np.memmap`` it copies
those slices and drops the mapped pages it has passed from the process, so that streaming a
file larger than memory keeps only the slices at hand resident. Tolerances above 0 need the
distance from each surface cell to the other surface: a second pass over the bounding box, in
chunks with a halo, tests the cell offsets inside the tolerance ellipsoid (nearest first), or
for large ellipsoids takes an exact distance transform (``edt``) and settles the cells whose
distance is within float rounding of the tolerance by the same offset test, so that
``d <= tolerance`` is decided with the reference's float64 arithmetic.

Empty masks, the convention: every ratio whose denominator is 0 is NaN, as in
``surface-distance`` and MONAI. Both masks empty gives NaN for dice, IoU and surface dice;
an empty prediction gives precision NaN, an empty truth recall NaN; one mask empty and the
other not gives dice, IoU and surface dice 0. Means over classes skip NaN (as MONAI's
``reduction="mean"`` does) and the CLI writes NaN as ``null``.

SenNet discussions speak of the "hit rate", which is recall, and the "false-positive rate",
which there is 1 - precision (the fraction of predicted voxels outside the truth).
"""
from __future__ import annotations

import functools
import itertools
import math
import mmap

import numpy as np
import torch
from monai.metrics import CumulativeIterationMetric
from monai.metrics.utils import _get_neighbour_code_to_normals_table, do_metric_reduction

from transforms.checks import check_spacing
from transforms.errors import SlabError

__all__ = [
    "surface_dice",
    "overlap_metrics",
    "evaluate",
    "threshold_sweep",
    "plot_sweep",
    "SurfaceDiceMetric",
    "OverlapMetric",
]

OVERLAP_KEYS = ("dice", "iou", "precision", "recall")
# Cells per streamed chunk: a few MB of temporaries (fastest on CPU, measured at 256^3 and
# 1024^3); CUDA wants larger launches.
_CHUNK_CELLS = {"cpu": 1 << 20, "cuda": 1 << 24}
# Cells per chunk of the tolerance pass (it holds a few bytes per cell of its region).
_TOL_CHUNK_CELLS = 1 << 22
# Above this many offsets inside the tolerance ellipsoid, a distance transform is cheaper.
_MAX_BALL_OFFSETS = 1000
# Relative band around tolerance**2 inside which the float32 distance transform is re-checked.
_EDT_BAND = 1e-4
_KERNEL = np.array([[[128, 64], [32, 16]], [[8, 4], [2, 1]]])  # surface-distance's code weights


def _key(tolerance: float) -> str:
    """The JSON key of a tolerance: ``0.0``, ``1.0``, ``2.5``."""
    return str(float(tolerance))


# ---------------------------------------------------------------------------------------------
# Arguments


def _check_tolerances(tolerances) -> tuple[float, ...]:
    values = tuple(float(t) for t in np.atleast_1d(tolerances))
    for t in values:
        if not (math.isfinite(t) and t >= 0):
            raise SlabError(f"tolerance: expected a non-negative distance in mm, got {t:g}")
    return values


def _check_thresholds(thresholds) -> np.ndarray:
    values = np.unique(np.asarray(thresholds, dtype=np.float64).ravel())
    if values.size == 0 or not np.isfinite(values).all():
        raise SlabError(f"thresholds: expected finite numbers, got {thresholds!r}")
    return values


def _channels(volume, name: str) -> list:
    """Channel indices of a ``(X, Y, Z)`` (``[None]``) or ``(L, X, Y, Z)`` volume."""
    shape = tuple(volume.shape)
    if len(shape) == 3:
        return [None]
    if len(shape) == 4 and shape[0] > 0:
        return list(range(shape[0]))
    raise SlabError(f"{name}: expected a (X, Y, Z) or (L, X, Y, Z) volume, got shape {shape}")


def _check_pair(pred, truth, names=("pred", "truth")) -> list:
    """Channel index pairs of two volumes with the same spatial shape and class count
    (a ``(X, Y, Z)`` volume is one class)."""
    pc, tc = _channels(pred, names[0]), _channels(truth, names[1])
    if tuple(pred.shape)[-3:] != tuple(truth.shape)[-3:] or len(pc) != len(tc):
        raise SlabError(f"{names[0]}: shape {tuple(pred.shape)} does not match {names[1]} {tuple(truth.shape)}")
    return list(zip(pc, tc))


# ---------------------------------------------------------------------------------------------
# Reading volumes in stream order


class _Reader:
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

    def at(self, threshold: float) -> _Reader:
        """The same volume, binarised ``> threshold``."""
        return _Reader(self.volume, self.name, self.channel, self.perm, self.device, threshold)

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
        return self._part(lo, hi, lambda data: _binarize(self._finite(data), self.threshold))

    def values(self, lo, hi):
        """:meth:`_part` as the raw values (a probability map, checked for NaN)."""
        return self._part(lo, hi, self._finite)

    def _finite(self, data):
        if _is_float(data) and bool((torch.isnan(data) if isinstance(data, torch.Tensor) else np.isnan(data)).any()):
            raise SlabError(f"{self.name}: NaN in the probability map")
        return data

    def _binary(self, data):
        """A block as 0/1 ``uint8``: 0/1 values (any dtype, bool), or integer 0/255 (stacks)."""
        if isinstance(data, torch.Tensor):
            if data.dtype == torch.bool:
                return data.to(torch.uint8)
            if data.numel() and not bool(((data == 0) | (data == 1)).all()):
                if data.is_floating_point() or not bool(((data == 0) | (data == 1) | (data == 255)).all()):
                    raise SlabError(f"{self.name}: expected a binary mask (0/1 or 0/255), found other values")
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
        raise SlabError(f"{self.name}: expected a binary mask (0/1 or 0/255), found other values")


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


def _readers(pred, truth, channels, names, threshold: float | None = None) -> tuple[_Reader, _Reader]:
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
    return (_Reader(pred, names[0], channels[0], perm, device, threshold),
            _Reader(truth, names[1], channels[1], perm, device))


def _is_float(data) -> bool:
    return data.dtype.is_floating_point if isinstance(data, torch.Tensor) else np.issubdtype(data.dtype, np.floating)


def _binarize(data, threshold: float):
    """``data > threshold`` as uint8, compared exactly as :class:`transforms.post.Threshold` does."""
    if isinstance(data, torch.Tensor):
        return (data.double() > threshold).to(torch.uint8)  # float64 holds every value and threshold
    # Imported here: transforms.post brings scikit-image and the I/O stack (~100 MB resident),
    # which streaming a mask does not need.
    from transforms.post import greater_than

    return greater_than(data, threshold).view(np.uint8)


# ---------------------------------------------------------------------------------------------
# Cell codes and their tables


def _pairs(pred, truth, shape, device):
    """``pred | truth << 1`` as a zero-padded ``uint8`` block of ``shape``.

    ``pred`` and ``truth`` are :meth:`_Reader.mask` parts of the same box (``None`` outside).
    """
    block = np.zeros(shape, np.uint8) if device is None else torch.zeros(shape, dtype=torch.uint8, device=device)
    if truth is not None:
        block[truth[0]] = pred[1] | (truth[1] << 1)
    return block


def _plane_codes(pairs):
    """8-bit codes of the 2x2 squares of each slice of a :func:`_pairs` block, widened for
    :func:`_cell_codes`: ``(n, a+2, b+2)`` voxels give ``(n, a+1, b+1)`` squares. Bit
    ``2*(oa + 2*ob)`` holds the prediction and the next bit the truth at corner ``(oa, ob)``."""
    va = pairs[:, :-1] | (pairs[:, 1:] << 2)
    if isinstance(va, torch.Tensor):
        return (va[:, :, 1:].to(torch.int32) << 4) | va[:, :, :-1]
    planes = np.left_shift(va[:, :, 1:], 4, dtype=np.uint16)
    planes |= va[:, :, :-1]
    return planes


def _cell_codes(lower, upper):
    """16-bit codes of the cells between slices whose plane codes are ``lower`` and ``upper``."""
    return lower | (upper << 8)


def _histogram(codes):
    """Counts of the 16-bit codes. Code 0 (no voxel set) is left at 0: it adds to nothing."""
    if isinstance(codes, torch.Tensor) and codes.is_cuda:
        return torch.bincount(codes[codes != 0], minlength=1 << 16)
    codes = _numpy(codes)
    return np.bincount(codes[codes != 0], minlength=1 << 16)


def _surface_cells(codes: np.ndarray, bits: int) -> np.ndarray:
    """Cells whose corners under ``bits`` (0x5555 pred, 0xAAAA truth) are neither all 0 nor all 1."""
    masked = codes & bits
    return (masked != 0) & (masked != bits)


@functools.lru_cache(maxsize=32)
def _area_table(spacing: tuple[float, float, float]) -> np.ndarray:
    """Surface area (mm^2) of each of the 256 neighbour codes, as surface-distance computes it."""
    normals = _get_neighbour_code_to_normals_table().double().cpu().numpy()  # (256, 4, 3), zero-padded
    scale = np.array([spacing[1] * spacing[2], spacing[0] * spacing[2], spacing[0] * spacing[1]])
    table = np.zeros(256)
    for code in range(256):
        table[code] = sum(np.linalg.norm(n * scale) for n in normals[code] if n.any())
    return table


class _Tables:
    """Per 16-bit cell code: each mask's area and corner count, the joint corner count, and
    each mask's area where both masks have surface."""

    def __init__(self, spacing: tuple[float, float, float], perm: tuple[int, int, int]):
        bits = np.arange(1 << 16)
        code_p = np.zeros(1 << 16, np.int64)
        code_t = np.zeros(1 << 16, np.int64)
        self.corners_p = np.zeros(1 << 16, np.int64)
        self.corners_t = np.zeros(1 << 16, np.int64)
        self.corners_pt = np.zeros(1 << 16, np.int64)
        for os_, oa, ob in itertools.product((0, 1), repeat=3):
            offset = [0, 0, 0]
            offset[perm[0]], offset[perm[1]], offset[perm[2]] = os_, oa, ob
            position = 2 * (oa + 2 * ob + 4 * os_)
            p, t = (bits >> position) & 1, (bits >> (position + 1)) & 1
            code_p += p * _KERNEL[tuple(offset)]
            code_t += t * _KERNEL[tuple(offset)]
            self.corners_p += p
            self.corners_t += t
            self.corners_pt += p & t
        area = _area_table(spacing)
        self.area_p, self.area_t = area[code_p], area[code_t]
        both = _surface_cells(bits, 0x5555) & _surface_cells(bits, 0xAAAA)
        self.area_p_both, self.area_t_both = self.area_p * both, self.area_t * both


@functools.lru_cache(maxsize=32)
def _tables(spacing: tuple[float, float, float], perm: tuple[int, int, int]) -> _Tables:
    return _Tables(spacing, perm)


# ---------------------------------------------------------------------------------------------
# The streaming pass


class _Box:
    """Bounding box ``[lo, hi)`` of non-zero cells, in stream order, merged chunk by chunk."""

    def __init__(self):
        self.lo, self.hi = None, None

    @staticmethod
    def of(codes, offset):
        nonzero = codes != 0
        lo, hi = [], []
        for axis in range(3):
            other = tuple(a for a in range(3) if a != axis)
            hits = nonzero.any(dim=other) if isinstance(nonzero, torch.Tensor) else nonzero.any(axis=other)
            index = np.flatnonzero(_numpy(hits))
            if index.size == 0:
                return None
            lo.append(index[0] + offset[axis])
            hi.append(index[-1] + 1 + offset[axis])
        return np.array(lo), np.array(hi)

    def merge(self, box) -> None:
        if box is not None:
            self.lo = box[0] if self.lo is None else np.minimum(self.lo, box[0])
            self.hi = box[1] if self.hi is None else np.maximum(self.hi, box[1])


def _numpy(x) -> np.ndarray:
    return x.cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _scan(rp: _Reader, rt: _Reader, levels=None, box: bool = False):
    """Code histogram and box of the cells of ``rp`` against ``rt``; with ``levels``, one of
    each per level, of ``rp > level`` (``rp`` read once per chunk, thresholded at each level).

    Cells cover the zero-padded volume: cell ``i`` spans voxels ``i - 1`` and ``i`` on each axis,
    so a volume of ``n`` voxels has ``n + 1`` cells along it.
    """
    ns, na, nb = rt.shape
    step = max(1, _CHUNK_CELLS["cuda" if rt.cuda else "cpu"] // ((na + 1) * (nb + 1)))
    count = 1 if levels is None else len(levels)
    hists, boxes = [0] * count, [_Box() for _ in range(count)]
    # Each chunk reads slices [c0, c1) once; the cells below its first slice pair it with the
    # previous chunk's last slice (zeros before the volume; slice ns is the padding after it).
    below = [0] * count
    for c0 in range(0, ns + 1, step):
        lo, hi = (c0, -1, -1), (min(ns + 1, c0 + step), na + 1, nb + 1)
        shape = tuple(h - l for l, h in zip(lo, hi))
        truth = rt.mask(lo, hi)
        pred = rp.mask(lo, hi) if levels is None else rp.values(lo, hi)
        for i in range(count):
            part = pred if levels is None or pred is None else (pred[0], _binarize(pred[1], levels[i]))
            planes = _plane_codes(_pairs(part, truth, shape, rt.device))
            for codes, first in ((_cell_codes(below[i], planes[:1]), c0),
                                 (_cell_codes(planes[:-1], planes[1:]), c0 + 1)):
                hists[i] = hists[i] + _histogram(codes)
                if box:
                    boxes[i].merge(_Box.of(codes, (first, 0, 0)))
            below[i] = planes[-1:]
    return [_numpy(h).astype(np.int64) for h in hists], boxes


# ---------------------------------------------------------------------------------------------
# Tolerance > 0


def _ball(spacing: tuple[float, float, float], tolerance: float):
    """Integer cell offsets within ``tolerance`` mm, nearest first, and their distances.

    The distance is computed as scipy's ``distance_transform_edt`` (used by surface-distance)
    computes it: ``sqrt((dx*sx)**2 + (dy*sy)**2 + (dz*sz)**2)`` in float64, summed in that order.
    """
    radius = [int(tolerance // s) for s in spacing]
    grids = np.meshgrid(*[np.arange(-r, r + 1) for r in radius], indexing="ij")
    offsets = np.stack([g.ravel() for g in grids], axis=1)
    scaled = offsets.astype(np.float64) * np.asarray(spacing, dtype=np.float64)
    scaled *= scaled
    distance = np.sqrt((scaled[:, 0] + scaled[:, 1]) + scaled[:, 2])
    keep = distance <= tolerance
    order = np.argsort(distance[keep], kind="stable")
    return offsets[keep][order], distance[keep][order], radius


def _nearest(index: np.ndarray, target: np.ndarray, shifts: np.ndarray, distances: np.ndarray) -> np.ndarray:
    """Distance from each cell ``index`` (flat) to the nearest ``target`` cell among ``shifts``.

    ``shifts`` are flat offsets sorted by ``distances``; a cell leaves the search at its first
    hit. Cells with no hit get ``inf``.
    """
    nearest = np.full(index.size, np.inf)
    remaining = np.arange(index.size)
    for shift, distance in zip(shifts, distances):
        if remaining.size == 0:
            break
        hit = target[index[remaining] + shift]
        nearest[remaining[hit]] = distance
        remaining = remaining[~hit]
    return nearest


def _within(index, target, shape, offsets, distances, tolerances, spacing_s) -> np.ndarray:
    """``(len(tolerances), len(index))``: is a ``target`` cell within each tolerance?"""
    strides = np.array([shape[1] * shape[2], shape[2], 1])
    shifts = offsets @ strides
    if len(offsets) <= _MAX_BALL_OFFSETS:
        nearest = _nearest(index, target, shifts, distances)
        return nearest[None, :] <= np.asarray(tolerances)[:, None]
    import edt  # large tolerances: an exact distance transform, float32

    squared = edt.edtsq((~target).reshape(shape).view(np.uint8), anisotropy=spacing_s, parallel=0)
    squared = squared.reshape(-1)[index].astype(np.float64)
    result = np.zeros((len(tolerances), index.size), bool)
    for k, tolerance in enumerate(tolerances):
        limit = tolerance * tolerance
        result[k] = squared <= limit * (1 - _EDT_BAND)
        unsure = np.flatnonzero(np.abs(squared - limit) <= limit * _EDT_BAND)
        if unsure.size:
            shell = (distances <= tolerance) & (distances * distances >= limit * (1 - 2 * _EDT_BAND))
            nearest = _nearest(index[unsure], target, shifts[shell], distances[shell])
            result[k, unsure] = nearest <= tolerance
    return result


def _matched_hist(rp: _Reader, rt: _Reader, spacing, tolerances, box: _Box) -> np.ndarray:
    """Code histograms ``(len(tolerances), 2, 65536)`` of the pred / truth surface cells that
    lie within each tolerance (> 0) of the other surface."""
    hists = np.zeros((len(tolerances), 2, 1 << 16), np.int64)
    if box.lo is None:
        return hists
    perm = rt.perm
    offsets, distances, radius = _ball(spacing, max(tolerances))
    offsets = offsets[:, list(perm)]
    spacing_s = tuple(spacing[a] for a in perm)
    # Cells of the box, widened by the ellipsoid's radius so that every offset stays inside;
    # along the stream axis that margin is the halo each chunk adds on both sides.
    pad = [radius[a] for a in perm]
    lo = [int(l) - r for l, r in zip(box.lo, pad)]
    hi = [int(h) + r for h, r in zip(box.hi, pad)]
    plane = (hi[1] - lo[1]) * (hi[2] - lo[2])
    step = max(1, _TOL_CHUNK_CELLS // plane - 2 * pad[0])
    for c0 in range(lo[0] + pad[0], hi[0] - pad[0], step):
        c1 = min(hi[0] - pad[0], c0 + step)
        vlo = (c0 - pad[0] - 1, lo[1] - 1, lo[2] - 1)  # cell i spans voxels i - 1 and i
        vhi = (c1 + pad[0], hi[1], hi[2])
        shape = tuple(h - l for l, h in zip(vlo, vhi))
        planes = _plane_codes(_pairs(rp.mask(vlo, vhi), rt.mask(vlo, vhi), shape, rt.device))
        codes = _numpy(_cell_codes(planes[:-1], planes[1:]))
        shape = codes.shape
        codes = codes.reshape(-1)
        core = slice(pad[0] * shape[1] * shape[2], (pad[0] + c1 - c0) * shape[1] * shape[2])
        surface = (_surface_cells(codes, 0x5555), _surface_cells(codes, 0xAAAA))
        for side in (0, 1):
            index = np.flatnonzero(surface[side][core]) + core.start
            if index.size == 0:
                continue
            hit = _within(index, surface[1 - side], shape, offsets, distances, tolerances, spacing_s)
            for k in range(len(tolerances)):
                hists[k, side] += np.bincount(codes[index[hit[k]]], minlength=1 << 16)
    return hists


# ---------------------------------------------------------------------------------------------
# Metrics from histograms


def _dot(hist: np.ndarray, table: np.ndarray):
    """``hist @ table`` (numpy's matmul of int64 with float64 takes a slow loop)."""
    return (hist * table).sum().item()


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else math.nan


def _overlap(hist: np.ndarray, tables: _Tables, voxel_mm3: float) -> dict:
    # Each voxel is a corner of 8 cells of the padded grid.
    n_pred = _dot(hist, tables.corners_p) // 8
    n_truth = _dot(hist, tables.corners_t) // 8
    tp = _dot(hist, tables.corners_pt) // 8
    return {
        "dice": _ratio(2 * tp, n_pred + n_truth),
        "iou": _ratio(tp, n_pred + n_truth - tp),
        "precision": _ratio(tp, n_pred),
        "recall": _ratio(tp, n_truth),
        "volume_pred_voxels": n_pred,
        "volume_truth_voxels": n_truth,
        "volume_pred_mm3": n_pred * voxel_mm3,
        "volume_truth_mm3": n_truth * voxel_mm3,
    }


def _surface(hist, tables, rp, rt, spacing, tolerances, box) -> dict:
    # Matched and total area are sums of the same terms when everything matches: a score of 1 is 1.
    total = _dot(hist, tables.area_p) + _dot(hist, tables.area_t)
    matched = {0.0: _dot(hist, tables.area_p_both) + _dot(hist, tables.area_t_both)}
    positive = [t for t in tolerances if t > 0]
    if positive:
        for t, (hp, ht) in zip(positive, _matched_hist(rp, rt, spacing, positive, box)):
            matched[t] = _dot(hp, tables.area_p) + _dot(ht, tables.area_t)
    return {_key(t): _ratio(matched[t], total) for t in tolerances}


def _channel_metrics(rp, rt, spacing, tolerances) -> dict:
    (hist,), (cells,) = _scan(rp, rt, box=any(t > 0 for t in tolerances))
    tables = _tables(spacing, rt.perm)
    out = _overlap(hist, tables, math.prod(spacing))
    if tolerances:
        out["surface_dice"] = _surface(hist, tables, rp, rt, spacing, tolerances, cells)
    return out


def _mean(values) -> float:
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else math.nan


# ---------------------------------------------------------------------------------------------
# Public functions


def surface_dice(pred, truth, spacing=(1.0, 1.0, 1.0), tolerance: float = 0.0) -> float:
    """Surface dice of two binary masks at ``tolerance`` mm.

    Parameters
    ----------
    pred, truth : array-like, ``(X, Y, Z)`` or ``(1, X, Y, Z)``
        Binary masks (bool or 0/1 integers): numpy arrays, memory maps, LazyVolumes or torch
        tensors (CPU or CUDA). Read a few slices at a time.
    spacing : (sx, sy, sz)
        Voxel size in mm.
    tolerance : float
        Largest surface-to-surface distance (mm) that counts as a match; 0 is the SenNet
        definition (surface in the same 2x2x2 cell).

    Returns
    -------
    float
        Equal to ``surface_distance.compute_surface_dice_at_tolerance(
        compute_surface_distances(truth, pred, spacing), tolerance)``; NaN if both are empty.

    Example
    -------
    >>> a = np.zeros((8, 8, 8), bool); a[2:6, 2:6, 2:6] = True
    >>> surface_dice(a, a)
    1.0
    >>> round(surface_dice(a, np.roll(a, 1, axis=0), tolerance=1.0), 4)
    1.0
    """
    spacing = check_spacing(spacing)
    (tolerance,) = _check_tolerances(tolerance)
    channels = _check_pair(pred, truth)
    if len(channels) != 1:
        raise SlabError(f"pred: surface_dice takes one mask, got {len(channels)} channels; use evaluate")
    rp, rt = _readers(pred, truth, channels[0], ("pred", "truth"))
    return _channel_metrics(rp, rt, spacing, (tolerance,))["surface_dice"][_key(tolerance)]


def evaluate(pred, truth, spacing=(1.0, 1.0, 1.0), tolerances=(0.0,), threshold: float | None = None,
             names=("pred", "truth")) -> dict:
    """All metrics of a prediction against the truth, per class and their mean.

    Parameters
    ----------
    pred : array-like, ``(X, Y, Z)`` or ``(L, X, Y, Z)``
        Binary masks, or probabilities when ``threshold`` is given (``pred > threshold``, as
        :class:`transforms.post.Threshold` and ``slab postprocess --threshold`` binarise).
    truth : array-like, same shape
        Binary masks, one channel per class.
    spacing : (sx, sy, sz)
        Voxel size in mm.
    tolerances : sequence of float
        Surface dice tolerances in mm.
    threshold : float, optional
        Threshold for a probability map.
    names : (str, str)
        What error messages call ``pred`` and ``truth`` (the CLI gives the file names).

    Returns
    -------
    dict
        ``{"dice", "iou", "precision", "recall": mean over classes (NaN skipped),
        "surface_dice": {"<tolerance>": mean, ...},
        "classes": [{"class": i, "dice", "iou", "precision", "recall", "surface_dice",
        "volume_pred_voxels", "volume_truth_voxels", "volume_pred_mm3", "volume_truth_mm3"}, ...],
        "spacing": [sx, sy, sz], "tolerances": [...], "threshold": threshold}``.
        Undefined ratios (0/0) are NaN.
    """
    spacing = check_spacing(spacing)
    tolerances = _check_tolerances(tolerances)
    channels = _check_pair(pred, truth, names)
    classes = []
    for i, pair in enumerate(channels):
        rp, rt = _readers(pred, truth, pair, names, threshold)
        classes.append({"class": i, **_channel_metrics(rp, rt, spacing, tolerances)})
    result = {k: _mean([m[k] for m in classes]) for k in OVERLAP_KEYS}
    if tolerances:
        result["surface_dice"] = {
            _key(t): _mean([m["surface_dice"][_key(t)] for m in classes]) for t in tolerances
        }
    result.update(classes=classes, spacing=list(spacing), tolerances=list(tolerances), threshold=threshold)
    return result


def overlap_metrics(pred, truth, spacing=(1.0, 1.0, 1.0), threshold: float | None = None,
                    names=("pred", "truth")) -> dict:
    """Dice, IoU, precision, recall and volumes; :func:`evaluate` without surface dice.

    Recall is SenNet's "hit rate"; 1 - precision its "false-positive rate".

    Example
    -------
    >>> a = np.zeros((4, 4, 4), np.uint8); a[:2] = 1
    >>> b = np.zeros_like(a); b[1:3] = 1
    >>> m = overlap_metrics(a, b, spacing=(0.5, 0.5, 2.0))
    >>> m["dice"], m["iou"], m["classes"][0]["volume_pred_mm3"]
    (0.5, 0.3333333333333333, 16.0)
    """
    return evaluate(pred, truth, spacing, tolerances=(), threshold=threshold, names=names)


def threshold_sweep(prob, truth, thresholds, spacing=(1.0, 1.0, 1.0), tolerance=0.0, metric: str = "surface_dice",
                    names=("prob", "truth")) -> dict:
    """Every metric at every threshold, and the best threshold.

    The probability map is read once; each chunk is thresholded at every level and coded
    against the truth, so overlap metrics and surface dice at tolerance 0 cost one pass.
    Tolerances above 0 take one more pass per threshold over the bounding box.

    Parameters
    ----------
    prob : array-like, ``(X, Y, Z)`` or ``(L, X, Y, Z)``
        Probabilities; a voxel is foreground when ``prob > threshold`` (as ``slab postprocess``).
    truth : array-like, same shape
        Binary masks.
    thresholds : sequence of float
    spacing : (sx, sy, sz)
    tolerance : float or sequence of float
        Surface dice tolerance(s) in mm.
    metric : str
        What "best" maximises: ``"surface_dice"`` (at the first tolerance), ``"dice"``,
        ``"iou"``, ``"precision"`` or ``"recall"``. Multi-class: the mean over classes.
    names : (str, str)
        What error messages call ``prob`` and ``truth``.

    Returns
    -------
    dict
        ``{"thresholds": [...], "tolerances": [...], "dice": [...], "iou": [...],
        "precision": [...], "recall": [...], "surface_dice": {"<tolerance>": [...]},
        "best": {"metric", "threshold", "value"}, "classes": [per-class curves]}``; curves
        at the top level are means over classes.
    """
    spacing = check_spacing(spacing)
    tolerances = _check_tolerances(tolerance)
    levels = _check_thresholds(thresholds)
    if metric not in (*OVERLAP_KEYS, "surface_dice"):
        raise SlabError(f"metric: expected one of {', '.join((*OVERLAP_KEYS, 'surface_dice'))}, got {metric!r}")
    channels = _check_pair(prob, truth, names)
    positive = any(t > 0 for t in tolerances)
    classes = []
    for pair in channels:
        rp, rt = _readers(prob, truth, pair, names)
        hists, boxes = _scan(rp, rt, levels, box=positive)
        tables = _tables(spacing, rt.perm)
        curves = {k: [] for k in OVERLAP_KEYS}
        curves["surface_dice"] = {_key(t): [] for t in tolerances}
        for i, level in enumerate(levels):
            point = _overlap(hists[i], tables, 1.0)
            for k in OVERLAP_KEYS:
                curves[k].append(point[k])
            surface = _surface(hists[i], tables, rp.at(float(level)), rt, spacing, tolerances, boxes[i])
            for t in tolerances:
                curves["surface_dice"][_key(t)].append(surface[_key(t)])
        classes.append(curves)
    sweep = {"thresholds": levels.tolist(), "tolerances": list(tolerances)}
    for k in OVERLAP_KEYS:
        sweep[k] = [_mean(v) for v in zip(*(m[k] for m in classes))]
    sweep["surface_dice"] = {
        _key(t): [_mean(v) for v in zip(*(m["surface_dice"][_key(t)] for m in classes))] for t in tolerances
    }
    curve = sweep["surface_dice"][_key(tolerances[0])] if metric == "surface_dice" else sweep[metric]
    scores = np.asarray(curve, dtype=np.float64)
    best = int(np.nanargmax(scores)) if not np.isnan(scores).all() else 0
    name = f"surface_dice@{_key(tolerances[0])}" if metric == "surface_dice" else metric
    sweep["best"] = {"metric": name, "threshold": float(levels[best]), "value": float(scores[best])}
    sweep["classes"] = classes
    return sweep


def plot_sweep(sweep: dict, png) -> None:
    """Plot the curves of :func:`threshold_sweep` against the threshold into ``png`` (atomically)."""
    from matplotlib.figure import Figure  # no pyplot: no backend or global state to touch

    from transforms.io import atomic_write

    thresholds = sweep["thresholds"]
    best = sweep["best"]
    fig = Figure(figsize=(6.4, 4.2), dpi=100, layout="tight")
    ax = fig.add_subplot()
    for key in OVERLAP_KEYS:
        ax.plot(thresholds, np.asarray(sweep[key], dtype=float), label=key)
    for key, values in sweep["surface_dice"].items():
        ax.plot(thresholds, np.asarray(values, dtype=float), "--", label=f"surface dice @ {key} mm")
    ax.axvline(best["threshold"], color="grey", lw=0.8)
    ax.set(xlabel="threshold (foreground: > threshold)", ylabel="score", ylim=(0, 1.02),
           title=f"best {best['metric']} = {best['value']:.4f} at {best['threshold']:g}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower center")
    with atomic_write(png) as tmp:
        fig.savefig(tmp, format="png")


# ---------------------------------------------------------------------------------------------
# MONAI metric classes


class _BatchMetric(CumulativeIterationMetric):
    """Batch-first ``(B, C, X, Y, Z)`` binary inputs to a ``(B, C)`` score per iteration."""

    def __init__(self, spacing, include_background: bool, reduction, get_not_nans: bool):
        super().__init__()
        self.spacing = check_spacing(spacing)
        self.include_background = include_background
        self.reduction = reduction
        self.get_not_nans = get_not_nans

    def _score(self, pred: _Reader, truth: _Reader) -> float:
        raise NotImplementedError

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if y_pred.ndim != 5 or tuple(y_pred.shape) != tuple(y.shape):
            raise SlabError(
                f"y_pred: expected batch-first (B, C, X, Y, Z) like y, got {tuple(y_pred.shape)} and {tuple(y.shape)}"
            )
        first = 0 if self.include_background else 1
        scores = [
            [self._score(*_readers(y_pred[b], y[b], (c, c), ("y_pred", "y"))) for c in range(first, y.shape[1])]
            for b in range(y.shape[0])
        ]
        return torch.tensor(scores, dtype=torch.float32, device=y_pred.device).reshape(y.shape[0], -1)

    def aggregate(self, reduction=None):
        """Reduce the buffered ``(N, C)`` scores; NaN (undefined) entries are skipped."""
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError("the data to aggregate must be PyTorch Tensor.")
        f, not_nans = do_metric_reduction(data, reduction or self.reduction)
        return (f, not_nans) if self.get_not_nans else f


class SurfaceDiceMetric(_BatchMetric):
    """Surface dice at ``tolerance`` mm as a MONAI cumulative metric (same code as :func:`surface_dice`).

    Example
    -------
    >>> metric = SurfaceDiceMetric(tolerance=1.0, spacing=(0.8, 0.8, 2.5))  # doctest: +SKIP
    >>> metric(y_pred=pred_onehot, y=label_onehot); metric.aggregate()  # doctest: +SKIP
    """

    def __init__(self, tolerance: float = 0.0, spacing=(1.0, 1.0, 1.0), include_background: bool = True,
                 reduction="mean", get_not_nans: bool = False):
        super().__init__(spacing, include_background, reduction, get_not_nans)
        (self.tolerance,) = _check_tolerances(tolerance)

    def _score(self, pred, truth):
        return _channel_metrics(pred, truth, self.spacing, (self.tolerance,))["surface_dice"][
            _key(self.tolerance)
        ]


class OverlapMetric(_BatchMetric):
    """Dice, IoU, precision or recall as a MONAI cumulative metric (same code as :func:`evaluate`).

    Unlike MONAI's ``DiceMetric`` (``ignore_empty=True``), an empty truth with a non-empty
    prediction scores 0, not NaN; both empty is NaN.
    """

    def __init__(self, name: str = "dice", include_background: bool = True, reduction="mean",
                 get_not_nans: bool = False):
        if name not in OVERLAP_KEYS:
            raise SlabError(f"name: expected one of {', '.join(OVERLAP_KEYS)}, got {name!r}")
        super().__init__((1.0, 1.0, 1.0), include_background, reduction, get_not_nans)
        self.name = name

    def _score(self, pred, truth):
        return _channel_metrics(pred, truth, self.spacing, ())[self.name]
