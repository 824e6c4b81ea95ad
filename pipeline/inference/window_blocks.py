"""Out-of-core 3D sliding-window inference: MONAI's window grid, a block of z slices at a time.

:func:`predict_3d_blocks` gives what ``predict_3d`` gives in memory (MONAI's
``sliding_window_inference``: the same windows, the same importance map, the same order of
sums, the padding of an input smaller than the ROI; with ``tta="flips"`` each flipped volume's
own grid, mirrored back), but never holds the volume: the output is cut into blocks of z
slices, and a block reads the input under every window that reaches into it, predicts those
windows, adds their weighted logits and importance, divides, takes the sigmoid and keeps its
own slices. Blocks are independent (a window that straddles two blocks is predicted by both:
about ``roi_z / block`` more forwards at 50 % overlap), so they are resumable and shared by
``torchrun`` ranks like the 2.5D blocks (:func:`slab.pipeline.inference.store.predict_blocks`).
One flip is one work array; the flips are averaged in the in-memory order when the store is
finished.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from monai.data.utils import compute_importance_map, dense_patch_slices

from slab.transforms.errors import SlabError
from slab.transforms.io import LazyVolume

# MONAI's default Gaussian width (sliding_window_inference's sigma_scale).
SIGMA_SCALE = 0.125


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

    def reaching(self, z0: int, z1: int) -> np.ndarray:
        """The windows (in order) that cover some of the slices ``z0:z1`` (unpadded z)."""
        lo, hi = z0 + self.pad[2], z1 + self.pad[2]
        z = self.starts[:, 2]
        return np.flatnonzero((z < hi) & (z + self.roi[2] > lo))


def block_probabilities(forward, grid: WindowGrid, z0: int, z1: int, read: Callable, importance: torch.Tensor,
                        labels: int, sw_batch_size: int, where) -> torch.Tensor:
    """The float32 ``(L, X, Y, z1 - z0)`` probabilities of slices ``z0:z1`` under ``grid``'s
    windows: their logits weighted by ``importance``, summed in MONAI's order, divided by the
    summed importance, then the sigmoid. ``read(lo, hi)`` gives the normalised ``(C, X, Y,
    hi - lo)`` input slices."""
    chosen = grid.reaching(z0, z1)
    starts = grid.starts[chosen]
    (rx, ry, rz), (px, py, _), (ox, oy, oz) = grid.roi, grid.padded, grid.pad
    lo, hi = int(starts[:, 2].min()), int(starts[:, 2].max()) + rz  # padded z under the windows
    zs, ze = max(0, lo - oz), min(grid.shape[2], hi - oz)  # the input slices they cover
    x = read(zs, ze).to(where)
    buffer = torch.zeros((x.shape[0], px, py, hi - lo), dtype=torch.float32, device=where)
    buffer[:, ox:ox + grid.shape[0], oy:oy + grid.shape[1], zs + oz - lo:ze + oz - lo] = x
    del x
    dims = [a + 2 for a in grid.flips]
    weight = importance.flip(list(grid.flips)) if grid.flips else importance
    weight = weight.to(where)
    total = torch.zeros((labels, px, py, hi - lo), dtype=torch.float32, device=where)
    count = torch.zeros((1, px, py, hi - lo), dtype=torch.float32, device=where)
    regions = [(slice(None), slice(a, a + rx), slice(b, b + ry), slice(c - lo, c - lo + rz)) for a, b, c in starts]
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
    keep = (slice(None), slice(ox, ox + grid.shape[0]), slice(oy, oy + grid.shape[1]),
            slice(z0 + oz - lo, z1 + oz - lo))
    return (total[keep] / count[keep]).sigmoid_().cpu()


def slices_per_block(budget: int, shape, roi, channels: int, labels: int, itemsize: int, sw_batch_size: int) -> int:
    """How many output z slices one block may hold within ``budget`` bytes: the block and the ROI's
    depth of input, sums and importance (float32, padded), the raw read and a batch of windows;
    never fewer than the ROI's depth."""
    px, py = (max(n, r) for n, r in zip(shape[1:3], roi[:2]))
    per_slice = px * py * 4 * (channels + labels + 1) + shape[1] * shape[2] * channels * itemsize
    batch = sw_batch_size * int(np.prod(roi)) * 4 * (2 * channels + 2 * labels)
    slices = (budget - batch) // per_slice - roi[2]
    # At least the ROI's depth: thinner blocks would predict each window up to roi_z times over
    # (measured: 48x the forwards at one slice per block), so a small budget is exceeded instead.
    return int(min(shape[3], max(roi[2], slices)))


def predict_3d_blocks(forward, volume, *, roi, overlap: float, mode: str, flip_sets, preprocess: Callable, name: str,
                      budget: int, out_path, out_dtype: str, settings: dict, bar, shard=None):
    """3D sliding-window probabilities of ``volume`` into the OME-Zarr ``out_path``, block by
    block, resumable (see the module docs); the result as a lazy volume."""
    from slab.pipeline.inference.multiplane import _read_block
    from slab.pipeline.inference.store import predict_blocks

    shape = tuple(int(s) for s in volume.shape)
    try:
        labels = int(forward(torch.zeros((1, shape[0]) + tuple(roi))).shape[1])
    except (RuntimeError, ValueError, IndexError) as err:
        raise SlabError(f"network: does not run on a {shape[0]}-channel {'x'.join(map(str, roi))} window "
                        f"({' '.join(str(err).split())[:200]})") from None
    itemsize = np.dtype(volume.dtype).itemsize if isinstance(volume, LazyVolume) else 4
    step = slices_per_block(budget, shape, roi, shape[0], labels, itemsize, settings["sw_batch_size"])
    grids = [WindowGrid(shape[1:], roi, overlap, tuple(d - 2 for d in dims)) for dims in flip_sets]
    importance = compute_importance_map(tuple(roi), mode=mode, sigma_scale=SIGMA_SCALE, device="cpu",
                                        dtype=torch.float32)
    where = torch.device("cpu")

    def read(lo, hi):
        return _read_block(volume, 2, lo, hi, preprocess, name)

    def compute(p, start, stop):
        probs = block_probabilities(forward, grids[p], start, stop, read, importance, labels,
                                    settings["sw_batch_size"], where)
        bar.update(stop - start)
        return probs

    return predict_blocks(forward.model, volume, out_path, (labels,) + shape[1:], [2] * len(grids),
                          [step] * len(grids), {**settings, "roi": list(roi), "overlap": overlap, "mode": mode,
                                                "labels": labels}, compute, len(grids), out_dtype, bar, budget, shard)
