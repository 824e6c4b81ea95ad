"""Training volumes read in parts, for training that streams (``stream`` in a training config).

:class:`SlabSource` is one volume of the 2.5D sampler read per sample
(:class:`slab.pipeline.data.slabs.SlabDataset` with ``stream=True``): the image and label are
opened lazily (:func:`slab.io.volumes.open_volume`), the image's normalisation window is
computed once in blocks, and the label is read once in blocks of z slices to count the
foreground pixels of every row of every slice of each plane. A sample then reads, of the label,
one row (to find the foreground pixel a positive draw centres on: the ``k``-th in row-major
order, as ``np.argwhere`` lists them in memory) and the patch window; of the image, the slab's
slices at the window, in one read where they are near each other (so a chunk is decompressed
once, not once per slice). The shared helpers read a part through the label transform (which
must then be voxel-wise) and normalise a part.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from slab.core.errors import SlabError
from slab.transforms.slabs import PLANE_AXIS

# Label bytes read at a time while the foreground of a streamed volume is counted.
COUNT_BLOCK_BYTES = 64 << 20


def read_part(volume, index) -> np.ndarray:
    """``volume[index]`` (a basic 4D index) of a lazy volume, tensor or array, as numpy."""
    part = volume[index]
    if isinstance(part, torch.Tensor):
        part = part.as_tensor() if hasattr(part, "as_tensor") else part
        return part.detach().cpu().numpy()
    return np.asarray(part)


def label_part(label, index, transform: Callable | None, name: str) -> np.ndarray:
    """``label[index]`` through the label transform (checked to keep the part's spatial shape)."""
    part = read_part(label, index)
    if transform is not None:
        shape = part.shape
        part = transform(part)
        part = part.detach().cpu().numpy() if isinstance(part, torch.Tensor) else np.asarray(part)
        if part.ndim != 4 or part.shape[1:] != shape[1:]:
            raise SlabError(f"label_transform: returned shape {tuple(part.shape)} for part {shape} of {name}; "
                            "streaming needs a voxel-wise label transform")
    elif part.dtype == np.bool_:
        part = part.astype(np.uint8)
    return part


def value_counts(label, chunk: int = 1 << 22) -> np.ndarray:
    """``(C, V)`` int64: the voxels of each value ``0 .. V-1`` in each channel of a ``(C, ...)``
    label (binary channels, or a class map; values rounded, below 0, NaN and Inf counted as 0),
    ``V`` at least 2, read ``chunk`` voxels at a time. Summed over volumes with :func:`add_counts`,
    they give the label prior of whole volumes (:mod:`slab.pipeline.training.prior`)."""
    label = read_part(label, ...) if not isinstance(label, np.ndarray) else label
    flat = label.reshape(label.shape[0], -1)
    counts = np.zeros((flat.shape[0], 2), dtype=np.int64)
    for start in range(0, flat.shape[1], chunk):
        part = flat[:, start:start + chunk]
        part = np.rint(np.nan_to_num(part, nan=0.0, posinf=0.0, neginf=0.0)) if part.dtype.kind == "f" else part
        part = np.clip(part, 0, None).astype(np.int64)
        width = max(counts.shape[1], int(part.max()) + 1 if part.size else 0)
        counts = add_counts(counts, np.stack([np.bincount(row, minlength=width) for row in part]))
    return counts


def add_counts(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The sum of two :func:`value_counts` tables (of one channel count), widened to the values of both."""
    width = max(a.shape[1], b.shape[1])
    out = np.zeros((a.shape[0], width), dtype=np.int64)
    out[:, :a.shape[1]] += a
    out[:, :b.shape[1]] += b
    return out


def normalised(raw: np.ndarray, transform: Callable | None, name: str) -> np.ndarray:
    """A part of an image through its block normalisation, checked for NaN and Inf."""
    part = raw
    if transform is not None:
        part = transform(torch.from_numpy(np.ascontiguousarray(raw)))
        part = part.detach().cpu().numpy() if isinstance(part, torch.Tensor) else np.asarray(part)
    if part.dtype.kind == "f" and not np.all(np.isfinite(part)):
        raise SlabError(f"{name}: NaN or Inf intensities; normalise or clean the volume first")
    return part


def _itemsize(volume) -> int:
    return volume.element_size() if isinstance(volume, torch.Tensor) else np.dtype(volume.dtype).itemsize


class SlabSource:
    """One volume of the streaming 2.5D sampler (see the module docs).

    ``counts[plane]`` is ``(slices, A)``: the foreground pixels of row ``a`` of each slice of the
    plane (a slice is ``(A, B)``, the plane's two other axes in order); ``channels`` the label's
    targets after the transform.
    """

    def __init__(self, image, label, planes, normalize, label_transform: Callable | None, names, cache_dtype):
        self.image, self.label, self.names = image, label, names
        self.label_transform, self.cache_dtype = label_transform, np.dtype(cache_dtype)
        self.transform = None if normalize is None else normalize.block_transform(image, names[0])
        shape = tuple(int(n) for n in label.shape)
        self.counts = {}
        for plane in planes:
            axis = PLANE_AXIS[plane]
            rows = [a for a in range(3) if a != axis][0]
            self.counts[plane] = np.zeros((shape[axis + 1], shape[rows + 1]), dtype=np.int32)
        self.channels = shape[0]
        self.values = np.zeros((1, 2), dtype=np.int64)  # value_counts of the label after its transform
        step = max(1, COUNT_BLOCK_BYTES // max(1, shape[0] * shape[1] * shape[2] * _itemsize(label)))
        for z in range(0, shape[3], step):
            block = label_part(label, (slice(None),) * 3 + (slice(z, z + step),), label_transform, names[1])
            self.channels = block.shape[0]
            self.values = value_counts(block) if z == 0 else add_counts(self.values, value_counts(block))
            foreground = np.any(block > 0, axis=0)  # (X, Y, z block)
            for plane, counts in self.counts.items():
                if plane == "xy":  # slices z, rows x
                    counts[z:z + step] = foreground.sum(axis=1, dtype=np.int32).T
                elif plane == "zx":  # slices y, rows x
                    counts += foreground.sum(axis=2, dtype=np.int32).T
                else:  # zy: slices x, rows y
                    counts += foreground.sum(axis=2, dtype=np.int32)
        self.flags = {plane: counts.any(axis=1) for plane, counts in self.counts.items()}

    def _index(self, axis: int, slice_index, rows, cols) -> tuple:
        where = [slice(None)] * 4
        where[axis + 1] = slice_index
        others = [a for a in (1, 2, 3) if a != axis + 1]
        where[others[0]], where[others[1]] = rows, cols
        return tuple(where)

    def positive_centre(self, plane: str, slice_index: int, rng: np.random.Generator):
        """A foreground pixel ``(a, b)`` of the slice, drawn as the in-memory sampler draws it
        (``pixels[rng.integers(len(pixels))]`` of ``np.argwhere``), or None when it has none."""
        rows = self.counts[plane][slice_index]
        total = int(rows.sum())
        if not total:
            return None
        k = int(rng.integers(total))
        ends = np.cumsum(rows, dtype=np.int64)
        a = int(np.searchsorted(ends, k, side="right"))
        line = label_part(self.label, self._index(PLANE_AXIS[plane], slice(slice_index, slice_index + 1),
                                                  slice(a, a + 1), slice(None)), self.label_transform, self.names[1])
        columns = np.flatnonzero(np.any(line > 0, axis=0).reshape(-1))
        return np.array([a, int(columns[k - (int(ends[a - 1]) if a else 0)])])

    def label_window(self, plane: str, slice_index: int, window) -> np.ndarray:
        """The ``(L, h, w)`` label of the slice at ``window``."""
        axis = PLANE_AXIS[plane]
        part = label_part(self.label, self._index(axis, slice(slice_index, slice_index + 1), *window),
                          self.label_transform, self.names[1])
        return np.take(part, 0, axis=axis + 1)

    def slab(self, axis: int, indices, window) -> np.ndarray:
        """The ``(C, k, h, w)`` normalised slab at ``window``, stored as ``cache_dtype``: the
        slices of ``indices`` in one read of their span when it is at most twice their number,
        else one read each."""
        wanted = [int(i) for i in indices]
        lo, hi = min(wanted), max(wanted) + 1
        if hi - lo <= 2 * len(set(wanted)):
            block = normalised(read_part(self.image, self._index(axis, slice(lo, hi), *window)), self.transform,
                               self.names[0])
            block = np.moveaxis(block.astype(self.cache_dtype, copy=False), axis + 1, 1)
            return block[:, [i - lo for i in wanted]]
        parts = {}
        for i in dict.fromkeys(wanted):
            raw = read_part(self.image, self._index(axis, slice(i, i + 1), *window))
            parts[i] = np.moveaxis(normalised(raw, self.transform, self.names[0]).astype(self.cache_dtype, copy=False),
                                   axis + 1, 1)
        return np.concatenate([parts[i] for i in wanted], axis=1)


class TruthVolume:
    """Binary ``(L, X, Y, Z)`` masks of a lazily read label volume, made from each part read by
    ``convert`` (voxel-wise: label values or channels to masks), for the streaming metrics."""

    ndim = 4

    def __init__(self, label, convert: Callable, labels: int):
        self.label, self.convert = label, convert
        self.shape = (int(labels),) + tuple(int(n) for n in label.shape[1:])
        self.dtype = np.dtype(np.uint8)

    def __getitem__(self, index) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        return self.convert(read_part(self.label, (slice(None),) + tuple(index[1:])))[index[0]]


def open_validation(item: dict, convert: Callable, labels: int):
    """``(image, truth, spacing, affine)`` of a validation item opened lazily (:class:`TruthVolume`
    over its label), or None where its format is read whole (then it is loaded as in memory)."""
    from slab.io.volumes import check_same_geometry, open_volume
    from slab.io.lazy import LazyVolume

    if isinstance(item["image"], list):
        return None
    image, label = open_volume(item["image"]), open_volume(item["label"])
    if not isinstance(image, LazyVolume) or not isinstance(label, LazyVolume):
        return None
    check_same_geometry(image, label, names=[str(item["image"]), str(item["label"])])
    spacing = tuple(float(s) for s in image.meta["spacing"])
    return image, TruthVolume(label, convert, labels), spacing, np.asarray(image.affine, dtype=np.float64)


def streamed_prediction(cfg: dict, image, out_path) -> dict:
    """The inference arguments that predict a lazy validation volume out of core into
    ``out_path``: float32 probabilities, normalised block by block with the volume's window."""
    from slab.transforms.intensity import make_normalize

    normalize = make_normalize(cfg["normalize"])
    return {"out_path": out_path, "out_dtype": "float32",
            "preprocess": None if normalize is None else normalize.block_transform(image, str(image.meta["filename_or_obj"]))}
__all__ = ["COUNT_BLOCK_BYTES", "SlabSource", "TruthVolume", "add_counts", "label_part", "normalised", "open_validation",
           "read_part", "streamed_prediction", "value_counts"]
