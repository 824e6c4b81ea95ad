"""Out-of-core 3D sliding-window inference: MONAI's window grid, a block of the volume at a time.

:func:`predict_3d_blocks` gives what ``predict_3d`` gives in memory (MONAI's
``sliding_window_inference``: the same windows, the same importance map, the same order of
sums, the padding of an input smaller than the ROI; with ``tta="flips"`` each flipped volume's
own grid, mirrored back), but never holds the volume: the output is cut into blocks, and a
block reads the input under every window that reaches into it, predicts those windows, adds
their weighted logits and importance, divides, takes the activation (sigmoid, or softmax over
exclusive classes) and keeps its own voxels.
A block is the shape that predicts the fewest windows within the memory budget
(:func:`block_tile`): often a run of whole z slices when they fit, and a box cut in x and y too
when they do not, so that a 2048 x 2048 slice does not need ``roi_z`` slices of work in memory.
Blocks are independent (a window that straddles two blocks is predicted by both: about
``roi / block`` more forwards per cut axis at 50 % overlap), so they are resumable and shared by
``torchrun`` ranks like the 2.5D blocks
(:func:`slab.pipeline.inference.store.predict_blocks`). One flip is one work array; the flips
are averaged in the in-memory order when the store is finished.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from monai.data.utils import compute_importance_map, dense_patch_slices

from slab.pipeline.inference.forward import activate
from slab.core.errors import SlabError
from slab.io.volumes import LazyVolume

# MONAI's default Gaussian width (sliding_window_inference's sigma_scale).
SIGMA_SCALE = 0.125
# Block sizes tried per axis when choosing a block shape.
CANDIDATES = 48


def scan_interval(image_size, roi, overlap: float) -> tuple[int, ...]:
    """MONAI's window step per axis: the ROI where it equals the image, else
    ``int(roi * (1 - overlap))``, at least 1."""
    return tuple(int(r) if r == n else max(1, int(r * (1 - overlap))) for n, r in zip(image_size, roi))


class WindowGrid:
    """The windows of ``sliding_window_inference`` over a ``(X, Y, Z)`` volume flipped along
    ``flips`` (spatial axes), in the unflipped volume's padded coordinates.

    ``pad[a]`` is the zero padding before axis ``a`` (MONAI pads an axis shorter than the ROI by
    half the difference before it, the rest after; mirrored on a flipped axis), ``starts`` the
    windows' corners in MONAI's order.
    """

    def __init__(self, shape, roi, overlap: float, flips: tuple[int, ...] = ()):
        self.shape, self.roi, self.flips = tuple(int(n) for n in shape), tuple(int(r) for r in roi), tuple(flips)
        self.padded = tuple(max(n, r) for n, r in zip(self.shape, self.roi))
        diffs = [p - n for p, n in zip(self.padded, self.shape)]
        self.pad = tuple(d - d // 2 if a in self.flips else d // 2 for a, d in enumerate(diffs))
        slices = dense_patch_slices(self.padded, self.roi, scan_interval(self.padded, self.roi, overlap))
        starts = np.array([[s.start for s in window] for window in slices], dtype=np.int64).reshape(-1, 3)
        for a in self.flips:
            starts[:, a] = self.padded[a] - starts[:, a] - self.roi[a]
        self.starts = starts

    def reaching(self, box) -> np.ndarray:
        """The windows (in order) that cover some of ``box = ((x0, x1), (y0, y1), (z0, z1))``
        (unpadded coordinates)."""
        keep = np.ones(len(self.starts), dtype=bool)
        for a, (lo, hi) in enumerate(box):
            start = self.starts[:, a]
            keep &= (start < hi + self.pad[a]) & (start + self.roi[a] > lo + self.pad[a])
        return np.flatnonzero(keep)


def block_probabilities(forward, grid: WindowGrid, box, read: Callable, importance: torch.Tensor,
                        labels: int, sw_batch_size: int, where) -> torch.Tensor:
    """The float32 ``(L, x1 - x0, y1 - y0, z1 - z0)`` probabilities of ``box = ((x0, x1), (y0,
    y1), (z0, z1))`` under ``grid``'s windows: their logits weighted by ``importance``, summed in
    MONAI's order, divided by the summed importance, then the activation (sigmoid or softmax). ``read(box)`` gives the
    normalised ``(C, ...)`` input of a box."""
    starts = grid.starts[grid.reaching(box)]
    roi, pad = np.asarray(grid.roi), np.asarray(grid.pad)
    lo, hi = starts.min(axis=0), starts.max(axis=0) + roi  # padded coordinates under the windows
    src = [(max(0, int(a - p)), min(n, int(b - p))) for a, b, p, n in zip(lo, hi, pad, grid.shape)]
    x = read(src).to(where)  # the input those windows cover
    buffer = torch.zeros((x.shape[0],) + tuple(int(n) for n in hi - lo), dtype=torch.float32, device=where)
    buffer[(slice(None),) + tuple(slice(a + p - o, b + p - o) for (a, b), p, o in zip(src, pad, lo))] = x
    del x
    dims = [a + 2 for a in grid.flips]
    weight = importance.flip(list(grid.flips)) if grid.flips else importance
    weight = weight.to(where)
    total = torch.zeros((labels,) + tuple(buffer.shape[1:]), dtype=torch.float32, device=where)
    count = torch.zeros((1,) + tuple(buffer.shape[1:]), dtype=torch.float32, device=where)
    regions = [(slice(None),) + tuple(slice(int(s - o), int(s - o + r)) for s, o, r in zip(start, lo, roi))
               for start in starts]
    for first in range(0, len(regions), sw_batch_size):
        batch = regions[first:first + sw_batch_size]
        windows = torch.stack([buffer[region] for region in batch])
        logits = forward(windows.flip(dims) if dims else windows)
        logits = (logits.flip(dims) if dims else logits).to(where)
        if logits.shape[1] != labels or tuple(logits.shape[2:]) != grid.roi:
            raise SlabError(f"network: gives {tuple(logits.shape[1:])} for a {tuple(windows.shape[1:])} window; "
                            f"expected {labels} channels of the window's size")
        for region, y in zip(batch, logits):
            total[region] += y * weight
    for region in regions:
        count[region] += weight
    keep = (slice(None),) + tuple(slice(int(a + p - o), int(b + p - o)) for (a, b), p, o in zip(box, pad, lo))
    return activate((total[keep] / count[keep])[None], forward.activation)[0].cpu()


def block_bytes(tile, shape, roi, channels: int, labels: int, itemsize: int, sw_batch_size: int) -> int:
    """The memory one block of ``tile`` voxels (x, y, z) takes: the windows reaching it span about
    the tile and a ROI more per axis (within the padded volume) of input, sums and importance
    (float32), the raw read, and a batch of windows."""
    padded = [int(min(max(n, r), t + r)) for n, r, t in zip(shape[1:], roi, tile)]
    raw = [int(min(n, t + r)) for n, r, t in zip(shape[1:], roi, tile)]
    batch = sw_batch_size * int(np.prod(roi)) * 4 * (2 * channels + 2 * labels)
    return int(np.prod(padded)) * 4 * (channels + labels + 1) + int(np.prod(raw)) * channels * itemsize + batch


def axis_forwards(n: int, r: int, overlap: float, tile: int) -> int:
    """Windows predicted along one axis of ``n`` voxels (ROI ``r``) when it is cut into blocks
    of ``tile``: each block predicts every window of MONAI's grid that reaches into it. The grid
    is a product of its axes, so a block shape predicts the product of these over the axes."""
    padded = max(n, r)
    starts = np.array([w[0].start for w in dense_patch_slices((padded,), (r,), scan_interval((padded,), (r,), overlap))])
    pad = (padded - n) // 2
    edges = np.arange(0, n, tile)
    lo, hi = edges + pad, np.minimum(n, edges + tile) + pad
    return int(((starts[None, :] < hi[:, None]) & (starts[None, :] + r > lo[:, None])).sum())


def block_tile(budget: int, shape, roi, channels: int, labels: int, itemsize: int, sw_batch_size: int,
               overlap: float = 0.5):
    """The block size ``(x, y, z)`` that predicts the fewest windows (:func:`axis_forwards`)
    within ``budget`` bytes of work (:func:`block_bytes`); among equals, the largest. Sizes are
    the whole axis or multiples of the window step, never below the ROI (where the axis is not):
    thinner blocks would predict each window up to ``roi`` times over per axis (measured: 48x the
    forwards at one slice per block), so a budget below one ROI-sized block is raised to it.
    Whole slices (a block cut only in z) win where they fit and the volume is deep; under a
    smaller budget the blocks are cut in x and y too. At most ``CANDIDATES`` sizes per axis are
    tried (spread geometrically on a long axis)."""
    spatial = [int(n) for n in shape[1:]]
    candidates, forwards = [], []
    for n, r in zip(spatial, roi):
        step = scan_interval((max(n, r),), (r,), overlap)[0]
        multiples = np.unique(np.geomspace(1, max(1, n // step), CANDIDATES).astype(int))
        sizes = sorted({n} | {int(k) * step for k in multiples if r <= k * step < n})
        candidates.append(np.asarray(sizes))
        forwards.append(np.asarray([axis_forwards(n, r, overlap, t) for t in sizes], dtype=np.float64))
    grid = np.meshgrid(*candidates, indexing="ij")
    work = [np.minimum(max(n, r), t + r) for n, r, t in zip(spatial, roi, grid)]
    raw = [np.minimum(n, t + r) for n, r, t in zip(spatial, roi, grid)]
    batch = sw_batch_size * int(np.prod(roi)) * 4 * (2 * channels + 2 * labels)
    cost = (work[0] * work[1] * work[2] * 4.0 * (channels + labels + 1) + raw[0] * raw[1] * raw[2] * channels * itemsize
            + batch)
    windows = forwards[0][:, None, None] * forwards[1][None, :, None] * forwards[2][None, None, :]
    volume = grid[0] * grid[1] * grid[2]
    feasible = cost <= max(float(budget), float(cost.min()))  # the smallest block, when the budget is below it
    order = np.lexsort((-volume[feasible], windows[feasible]))  # fewest windows, then the largest block
    best = np.argwhere(feasible)[order[0]]
    return tuple(int(candidates[a][i]) for a, i in enumerate(best))


def predict_3d_blocks(forward, volume, *, roi, overlap: float, mode: str, flip_sets, preprocess: Callable, name: str,
                      budget: int, out_path, out_dtype: str, settings: dict, bar, shard=None):
    """3D sliding-window probabilities of ``volume`` into the OME-Zarr ``out_path``, block by
    block, resumable (see the module docs); the result as a lazy volume."""
    from slab.pipeline.inference.forward import fits_on
    from slab.pipeline.inference.multiplane import read_box
    from slab.pipeline.inference.store import predict_blocks

    shape = tuple(int(s) for s in volume.shape)
    try:
        labels = int(forward(torch.zeros((1, shape[0]) + tuple(roi))).shape[1])
    except (RuntimeError, ValueError, IndexError) as err:
        raise SlabError(f"network: does not run on a {shape[0]}-channel {'x'.join(map(str, roi))} window "
                        f"({' '.join(str(err).split())[:200]})") from None
    itemsize = np.dtype(volume.dtype).itemsize if isinstance(volume, LazyVolume) else 4
    tile = block_tile(budget, shape, roi, shape[0], labels, itemsize, settings["sw_batch_size"], overlap)
    grids = [WindowGrid(shape[1:], roi, overlap, tuple(d - 2 for d in dims)) for dims in flip_sets]
    importance = compute_importance_map(tuple(roi), mode=mode, sigma_scale=SIGMA_SCALE, device="cpu",
                                        dtype=torch.float32)
    # a block's sums stay on the network's device where they fit (as the in-memory path keeps the volume)
    work = block_bytes(tile, shape, roi, shape[0], labels, itemsize, settings["sw_batch_size"])
    where = forward.device if fits_on(forward.device, work) else torch.device("cpu")

    def read(box):
        return read_box(volume, box, preprocess, name)

    def units(p, box):  # the progress bar counts z slices: a block is its share of them
        return int(np.prod([b - a for a, b in box])) / (shape[1] * shape[2])

    def compute(p, box):
        probs = block_probabilities(forward, grids[p], box, read, importance, labels,
                                    settings["sw_batch_size"], where)
        bar.update(units(p, box))
        return probs

    return predict_blocks(forward.model, volume, out_path, (labels,) + shape[1:], [tile] * len(grids),
                          {**settings, "roi": list(roi), "overlap": overlap, "mode": mode, "labels": labels},
                          compute, len(grids), out_dtype, bar, budget, shard, units=units)
