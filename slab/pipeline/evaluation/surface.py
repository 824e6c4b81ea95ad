"""The streaming engine behind the metrics: one pass of cell codes for overlap and surface dice at
tolerance 0, a second halo'd pass for tolerances in mm, over blocks that
:mod:`slab.pipeline.evaluation.readers` gives (:mod:`slab.pipeline.evaluation.metrics` is the API).

Masks are binary ``(X, Y, Z)`` volumes (or ``(L, X, Y, Z)`` with one channel per class): numpy
arrays, memory maps, :class:`~slab.io.volumes.LazyVolume` s or torch tensors (CPU or CUDA).
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

import numpy as np
import torch
from monai.metrics.utils import _get_neighbour_code_to_normals_table

from slab.pipeline.evaluation.readers import Reader, binarize
from slab.core.errors import SlabError

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


def tolerance_key(tolerance: float) -> str:
    """The JSON key of a tolerance: ``0.0``, ``1.0``, ``2.5``."""
    return str(float(tolerance))


def check_tolerances(tolerances) -> tuple[float, ...]:
    values = tuple(float(t) for t in np.atleast_1d(tolerances))
    for t in values:
        if not (math.isfinite(t) and t >= 0):
            raise SlabError(f"tolerance: expected a non-negative distance in mm, got {t:g}")
    return values


def check_thresholds(thresholds) -> np.ndarray:
    values = np.unique(np.asarray(thresholds, dtype=np.float64).ravel())
    if values.size == 0 or not np.isfinite(values).all():
        raise SlabError(f"thresholds: expected finite numbers, got {thresholds!r}")
    return values


def _pairs(pred, truth, shape, device):
    """``pred | truth << 1`` as a zero-padded ``uint8`` block of ``shape``.

    ``pred`` and ``truth`` are :meth:`Reader.mask` parts of the same box (``None`` outside).
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


def _scan(rp: Reader, rt: Reader, levels=None, box: bool = False):
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
            part = pred if levels is None or pred is None else (pred[0], binarize(pred[1], levels[i]))
            planes = _plane_codes(_pairs(part, truth, shape, rt.device))
            for codes, first in ((_cell_codes(below[i], planes[:1]), c0),
                                 (_cell_codes(planes[:-1], planes[1:]), c0 + 1)):
                hists[i] = hists[i] + _histogram(codes)
                if box:
                    boxes[i].merge(_Box.of(codes, (first, 0, 0)))
            below[i] = planes[-1:]
    return [_numpy(h).astype(np.int64) for h in hists], boxes


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


def _matched_hist(rp: Reader, rt: Reader, spacing, tolerances, box: _Box) -> np.ndarray:
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
    return {tolerance_key(t): _ratio(matched[t], total) for t in tolerances}


def channel_metrics(rp, rt, spacing, tolerances) -> dict:
    (hist,), (cells,) = _scan(rp, rt, box=any(t > 0 for t in tolerances))
    tables = _tables(spacing, rt.perm)
    out = _overlap(hist, tables, math.prod(spacing))
    if tolerances:
        out["surface_dice"] = _surface(hist, tables, rp, rt, spacing, tolerances, cells)
    return out


def nan_mean(values) -> float:
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else math.nan


def sweep_curves(rp: Reader, rt: Reader, spacing, tolerances, levels) -> dict:
    """One channel's overlap and surface dice at every threshold of ``levels``: one pass for all
    of them, and one tolerance pass per level."""
    hists, boxes = _scan(rp, rt, levels, box=any(t > 0 for t in tolerances))
    tables = _tables(spacing, rt.perm)
    curves = {k: [] for k in OVERLAP_KEYS}
    curves["surface_dice"] = {tolerance_key(t): [] for t in tolerances}
    for i, level in enumerate(levels):
        point = _overlap(hists[i], tables, 1.0)
        for k in OVERLAP_KEYS:
            curves[k].append(point[k])
        surface = _surface(hists[i], tables, rp.at(float(level)), rt, spacing, tolerances, boxes[i])
        for t in tolerances:
            curves["surface_dice"][tolerance_key(t)].append(surface[tolerance_key(t)])
    return curves
