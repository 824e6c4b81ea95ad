"""Volumes read on demand: the :class:`LazyVolume` base (basic numpy indexing, ``load()``,
``close()``) the formats' lazy readers derive from, and :func:`metatensor` (a loaded volume as
a MONAI MetaTensor, its affine checked)."""
from __future__ import annotations

import math

import numpy as np
import torch
from monai.data import MetaTensor

from slab.core.errors import SlabError
from slab.io.common import spacing_of, with_spacing
from slab.io.headers import check_memory


def check_affine(affine: np.ndarray, source) -> np.ndarray:
    """A usable voxel-to-world matrix: finite, with three independent axes of non-zero length."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise SlabError(f"{source}: its voxel-to-world affine is not a finite 4x4 matrix; the header is corrupt")
    sizes = np.linalg.norm(affine[:3, :3], axis=0)
    if np.min(sizes) <= 0 or abs(np.linalg.det(affine[:3, :3])) <= 1e-12 * float(np.prod(sizes)):
        spacing = ", ".join(f"{s:g}" for s in sizes)
        raise SlabError(f"{source}: degenerate geometry (voxel size {spacing} mm, or axes not independent); the "
                        "header's voxel size or orientation is broken (give --spacing where the command has it)")
    return affine


def metatensor(array: np.ndarray, affine: np.ndarray, source, spacing=None, extra: dict | None = None) -> MetaTensor:
    """A loaded volume: ``array`` with its affine (RAS) and meta (source, spacing, shape, and the
    format's own geometry notes in ``extra``, e.g. a NIfTI's qform and sform)."""
    extra = dict(extra or {})
    declared = extra.pop("declared_spacing", None) if spacing is None else None
    affine = check_affine(affine if spacing is None else with_spacing(affine, spacing), source)
    meta = {"filename_or_obj": source, "spacing": spacing_of(affine, declared or spacing),
            "spatial_shape": tuple(array.shape[1:])}
    if extra and spacing is None:
        meta.update(extra)
    return MetaTensor(torch.as_tensor(array), affine=torch.as_tensor(affine), meta=meta)


def _basic_index(index, shape: tuple[int, ...]) -> tuple[list, list[int]]:
    """Split a basic numpy index into one int-or-slice per axis and the positions of new axes."""
    items = index if isinstance(index, tuple) else (index,)
    for item in items:
        if not (item is None or item is Ellipsis or isinstance(item, (slice, int, np.integer))) or isinstance(
            item, (bool, np.bool_)
        ):
            raise TypeError(f"LazyVolume supports basic indexing (ints, slices, ..., None), got {item!r}")
    used = sum(item is not None and item is not Ellipsis for item in items)
    if used > len(shape) or sum(item is Ellipsis for item in items) > 1:
        raise IndexError(f"too many indices for a volume of shape {shape}")
    expanded = []
    for item in items:
        expanded.extend([slice(None)] * (len(shape) - used) if item is Ellipsis else [item])
    if Ellipsis not in items:
        expanded.extend([slice(None)] * (len(shape) - used))
    per_axis, new_axes, out_axes = [], [], 0
    for item in expanded:
        if item is None:
            new_axes.append(out_axes)
            out_axes += 1
            continue
        size = shape[len(per_axis)]
        if isinstance(item, slice):
            out_axes += 1
        elif not -size <= item < size:
            raise IndexError(f"index {item} is out of bounds for axis {len(per_axis)} with size {size}")
        else:
            item = int(item) % size
        per_axis.append(item)
    return per_axis, new_axes


class LazyVolume:
    """A ``(C, X, Y, Z)`` volume whose voxels are read from disk on demand.

    Indexing takes basic numpy indices (ints, slices, ``...``, ``None``) and returns a numpy
    array equal to the same index on the eagerly loaded volume; a slice stack reads only the
    slices the index touches, an uncompressed NIfTI reads through nibabel's memory map.
    ``load()`` gives the whole volume as a MetaTensor (after checking that it fits in memory).
    Create one with ``load_volume(path, lazy=True)``.

    Attributes
    ----------
    shape, dtype : the volume's shape ``(C, X, Y, Z)`` and dtype.
    affine : ``(4, 4)`` float64 numpy array, voxel to world in RAS.
    meta : ``{"filename_or_obj", "spacing", "spatial_shape"}`` as a loaded MetaTensor has.
    """

    ndim = 4

    def __init__(self, shape: tuple[int, ...], dtype, affine: np.ndarray, source, spacing=None,
                 extra: dict | None = None):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.affine = check_affine(affine if spacing is None else with_spacing(affine, spacing), source)
        self.extra = dict(extra or {}) if spacing is None else {}
        declared = self.extra.get("declared_spacing") if spacing is None else spacing
        self.meta = {"filename_or_obj": source, "spacing": spacing_of(self.affine, declared),
                     "spatial_shape": self.shape[1:]}
        self.meta.update({k: v for k, v in self.extra.items() if k != "declared_spacing"})

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def __repr__(self) -> str:
        return f"LazyVolume(shape={self.shape}, dtype={self.dtype}, source={self.meta['filename_or_obj']!r})"

    def __getitem__(self, index) -> np.ndarray:
        per_axis, new_axes = _basic_index(index, self.shape)
        out = self._read(*per_axis)
        if new_axes:
            return np.expand_dims(out, tuple(new_axes))
        return out[()] if out.ndim == 0 else out  # a voxel is a numpy scalar, as numpy gives

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = self.load().numpy()
        return array if dtype is None else array.astype(dtype, copy=False)

    def load(self, workers: int | None = None) -> MetaTensor:
        """Read the whole volume into memory."""
        check_memory(self.nbytes, str(self.meta["filename_or_obj"]), "; read it lazily (e.g. --memory-budget)")
        return metatensor(self._read_all(workers), self.affine, self.meta["filename_or_obj"], None, self.extra)

    def close(self) -> None:
        """Release what the volume holds open (a container's file handle); most hold nothing."""

    def _read(self, c, x, y, z) -> np.ndarray:
        raise NotImplementedError

    def _read_all(self, workers: int | None) -> np.ndarray:
        return self._read(slice(None), slice(None), slice(None), slice(None))


__all__ = ["LazyVolume", "check_affine", "metatensor"]
