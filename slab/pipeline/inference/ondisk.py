"""On-disk arrays for volumes larger than memory: ``(L, X, Y, Z)`` ``.npy`` files in Fortran order
(x fastest, as loaded volumes), reached through short-lived memory maps of a few z planes, and the
sink that accumulates plane sums into them in the in-memory path's order (so a float32 result is
bit-identical to it). Their blocks are allocated up front: a full disk fails at the start.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from slab.core.outputs import reserve


# On-disk arrays are mapped this many bytes at a time, so mapped pages never pile up.
_MAP_BYTES = 64 << 20


class DiskArray:
    """An ``(L, X, Y, Z)`` ``.npy`` array in Fortran order (x fastest, z slowest, as loaded
    volumes), reached through short-lived memory maps of a few z planes, so that mapped pages
    never pile up in memory."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype):
        self.path, self.shape, self.dtype = Path(path), tuple(shape), np.dtype(dtype)
        array = np.lib.format.open_memmap(self.path, mode="w+", dtype=self.dtype, shape=self.shape, fortran_order=True)
        self.offset = array.offset
        del array
        self.plane_bytes = int(np.prod(self.shape[:3])) * self.dtype.itemsize
        # Every block on disk now: a full disk is an error here, not a bus error mid-write.
        reserve(self.path, self.offset + self.plane_bytes * self.shape[3])

    def map(self, zs: int, ze: int) -> torch.Tensor:
        """A writable tensor over ``[..., zs:ze]``; unmapped when the last reference goes."""
        shape = self.shape[:3] + (ze - zs,)
        return torch.from_numpy(np.memmap(self.path, self.dtype, "r+", self.offset + zs * self.plane_bytes, shape, "F"))


class DiskSink:
    """Plane sums of blocks, accumulated in an on-disk float32 array and finished into ``out``.

    The first plane's blocks are copied, later ones added, and the last plane's are added and
    divided by ``count`` straight into ``out``: the operations of the in-memory path, in its order.
    """

    def __init__(self, directory: Path, out: Path, shape, out_dtype, n_planes: int, count: int):
        self.shape, self.n_planes, self.count = tuple(shape), n_planes, count
        self.out = DiskArray(out, shape, out_dtype)
        self.sum = DiskArray(directory / "sum.npy", shape, np.float32) if n_planes > 1 else None
        self.step = max(1, _MAP_BYTES // (int(np.prod(self.shape[:3])) * 4))

    def add(self, plane_index: int, axis: int, start: int, block: torch.Tensor) -> None:
        """Add ``block``, the sums of slices ``start:`` along spatial ``axis`` of plane ``plane_index``."""
        stop = start + block.shape[axis + 1]
        z0, z1 = (start, stop) if axis == 2 else (0, self.shape[3])
        for zs in range(z0, z1, self.step):
            ze = min(z1, zs + self.step)
            part = block[..., zs - z0: ze - z0]

            def region(array: DiskArray) -> torch.Tensor:
                mapped = array.map(zs, ze)
                return mapped if axis == 2 else mapped.narrow(axis + 1, start, stop - start)

            if plane_index < self.n_planes - 1:
                if plane_index == 0:
                    region(self.sum).copy_(part)
                else:
                    region(self.sum).add_(part)
                continue
            if self.sum is not None:
                part = region(self.sum) + part
            region(self.out).copy_(part.div(self.count) if self.count > 1 else part)


def fortran_empty(shape, device) -> torch.Tensor:
    """A float32 ``(L, X, Y, Z)`` tensor stored x fastest, z slowest (like loaded volumes)."""
    return torch.empty(tuple(reversed(shape)), dtype=torch.float32, device=device).permute(3, 2, 1, 0)

