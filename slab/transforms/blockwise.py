"""Post-processing of probability volumes larger than memory, slab of z slices by slab.

Thresholding is voxel-wise. Hysteresis and small-component removal need connected components
of the whole volume: each slab of whole ``(X, Y)`` planes is labelled with cc3d, the labels of
neighbouring slabs are merged where their touching planes connect (at the chosen connectivity),
and each merged component's voxel count and whether it holds a seed (a voxel above the high
threshold) are summed over its pieces. A second pass labels each slab again (labelling is
deterministic) and keeps the pieces of the components that qualify. The result equals
:class:`~slab.transforms.post.Postprocess` on the whole volume for ``threshold`` or
``hysteresis`` with ``min_size``; the steps that need the whole mask at once
(``keep_largest``, ``fill_holes``) are refused here.

Memory is one slab's probabilities, masks and labels plus, per component, a count and a flag.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from slab.core.checks import cc3d_connectivity
from slab.core.errors import SlabError
from slab.io.lazy import LazyVolume
from slab.transforms.post import (ArgmaxPostprocess, HysteresisFill, PerLabelPostprocess, Threshold, argmax_masks,
                                  greater_than, make_postprocess, per_channel)

# bytes per voxel of one slab: probabilities (up to float32), two masks, labels and cc3d's own
_BYTES_PER_VOXEL = 4 + 2 + 8 + 8


def _face_offsets(connectivity: int) -> list[tuple[int, int]]:
    """The in-plane offsets by which a voxel touches the next plane at ``connectivity``."""
    if connectivity == 6:
        return [(0, 0)]
    if connectivity == 18:
        return [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)]
    return [(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1)]


def _pairs(a: np.ndarray, b: np.ndarray, connectivity: int) -> np.ndarray:
    """``(n, 2)`` label pairs of plane ``a`` and the next plane ``b`` that touch, each pair once.

    Neighbouring voxels mostly give the same pair, so runs of equal pairs are dropped before the
    sort that removes the rest (a face of a million voxels costs milliseconds, not seconds)."""
    found = []
    nx, ny = a.shape
    base = np.uint64(int(max(a.max(initial=0), b.max(initial=0))) + 1)
    for dx, dy in _face_offsets(connectivity):
        sa = a[max(0, -dx): nx - max(0, dx), max(0, -dy): ny - max(0, dy)]
        sb = b[max(0, dx): nx - max(0, -dx), max(0, dy): ny - max(0, -dy)]
        both = (sa > 0) & (sb > 0)
        if not both.any():
            continue
        keys = sa[both].astype(np.uint64) * base + sb[both].astype(np.uint64)
        keep = np.ones(keys.shape, bool)
        keep[1:] = keys[1:] != keys[:-1]
        found.append(keys[keep])
    if not found:
        return np.empty((0, 2), np.int64)
    keys = np.unique(np.concatenate(found))
    return np.stack([keys // base, keys % base], axis=1).astype(np.int64)


class BlockwisePostprocess:
    """``threshold`` or ``hysteresis`` and ``min_size`` over a lazy ``(L, X, Y, Z)`` probability
    volume (any object with ``shape``, ``dtype`` and numpy indexing), giving the uint8 mask of
    any range of z slices; see the module docs.

    Parameters
    ----------
    probs : the probabilities (e.g. a LazyVolume over a zarr store).
    chain : the post-processing chain of :func:`~slab.transforms.post.make_postprocess` (what a
        predictor's ``postprocess`` is), or its settings, parsed by it: ``threshold`` (one value or one
        per channel), ``hysteresis`` (a pair or one per channel), or ``argmax`` (exclusive
        classes, :func:`~slab.transforms.post.argmax_masks`), ``min_size``,
        ``connectivity``; ``keep_largest`` and ``fill_holes`` are refused.
    memory_budget : bytes for one slab's working arrays.
    """

    def __init__(self, probs, chain, memory_budget: int = 1 << 30):
        self.probs, self.shape = probs, tuple(int(s) for s in probs.shape)
        labels = self.shape[0]
        if chain is None or isinstance(chain, Mapping):  # settings: parsed by the one parser
            chain = make_postprocess(chain)
        self.argmax = isinstance(chain, ArgmaxPostprocess)
        self.low, self.high, self.min_size, self.connectivity = self.settings(chain, labels)
        plane = self.shape[1] * self.shape[2]
        self.depth = max(1, min(self.shape[3], int(memory_budget) // max(1, plane * _BYTES_PER_VOXEL)))
        self.components = [self.high[c] is not None or self.min_size[c] > 0 for c in range(labels)]
        selected = [self._select(c) if self.components[c] else (None, None) for c in range(labels)]
        self.keep = [keep for keep, _ in selected]
        self.offsets = [offsets for _, offsets in selected]

    @staticmethod
    def settings(chain, labels: int) -> tuple[list, list, list, list]:
        """``(low, high or None, min_size, connectivity)`` per label channel of the post-processing
        ``chain`` (:func:`~slab.transforms.post.make_postprocess`'s: its settings are parsed once,
        there, for the in-memory and the out-of-core chains alike); SlabError for steps that need
        the whole mask. Called before a prediction starts, so that a refusal costs nothing."""
        if chain is None or isinstance(chain, Mapping):  # settings: parsed by the one parser
            chain = make_postprocess(chain)
        argmax = isinstance(chain, ArgmaxPostprocess)
        inner = chain.inner if argmax else chain
        per_label = isinstance(inner, PerLabelPostprocess)
        chains = inner.chains if per_label else [inner] * labels
        if len(chains) != labels:
            raise SlabError(f"postprocess labels: {len(chains)} settings for {labels} label channel(s)")
        low, high, min_size, connectivity = [], [], [], []
        for c, step in enumerate(chains):
            for key in ("keep_largest", "fill_holes"):
                if getattr(step, key) not in (None, False, 0):
                    raise SlabError(f"--{key.replace('_', '-')}: needs the whole mask in memory, and this volume is "
                                    "predicted out of core (drop it, or write a .nii.gz / raise --memory-budget)")
            connectivity.append(step.connectivity)
            min_size.append(step.min_size)
            n, i = (1, 0) if per_label else (labels, c)  # per-label settings hold one value each
            if argmax:  # the argmax binarises, slab by slab
                low.append(0.5)
                high.append(None)
            elif isinstance(step.binarise, HysteresisFill):
                low.append(per_channel("hysteresis", step.binarise.low, n)[i])
                high.append(per_channel("hysteresis", step.binarise.high, n)[i])
            elif isinstance(step.binarise, Threshold):
                low.append(per_channel("threshold", step.binarise.threshold, n)[i])
                high.append(None)
            else:
                raise SlabError("threshold: out-of-core post-processing binarises probabilities; give a threshold")
        return low, high, min_size, connectivity

    def _slab(self, c: int, z0: int, z1: int):
        """``(low mask, seed mask or None)`` of channel ``c``, slices ``z0:z1``."""
        if self.argmax:  # the voxels whose most probable class is c
            return argmax_masks(np.asarray(self.probs[:, :, :, z0:z1]))[c].astype(bool), None
        p = np.asarray(self.probs[c, :, :, z0:z1])
        if np.isnan(p).any():
            raise SlabError("probabilities: NaN values; expected probabilities in [0, 1]")
        low = greater_than(p, self.low[c])
        seeds = greater_than(p, self.high[c]) if self.high[c] is not None else None
        return low, seeds

    def _label(self, low: np.ndarray, c: int) -> tuple[np.ndarray, int]:
        import cc3d

        labels, n = cc3d.connected_components(np.asfortranarray(low), connectivity=cc3d_connectivity(
            low.shape, self.connectivity[c]), return_N=True, out_dtype=np.uint64)
        return labels, int(n)

    def _select(self, c: int) -> tuple[np.ndarray, list[int]]:
        """Pass 1: per global label (each slab's labels shifted by its offset), whether its
        component is kept; and the slabs' offsets."""
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        sizes, seeded, edges, offsets = [], [], [], []
        total, last = 0, None
        for z0 in range(0, self.shape[3], self.depth):
            low, seeds = self._slab(c, z0, min(self.shape[3], z0 + self.depth))
            labels, n = self._label(low, c)
            counts = np.bincount(labels.ravel(), minlength=n + 1)[1:]
            has = (np.bincount(labels[seeds].ravel(), minlength=n + 1)[1:] > 0) if seeds is not None else \
                np.ones(n, bool)
            first = labels[:, :, 0].astype(np.int64)
            if last is not None:
                pairs = _pairs(last, first, self.connectivity[c])
                if len(pairs):
                    edges.append(np.stack([pairs[:, 0], pairs[:, 1] + total], axis=1))
            offsets.append(total)
            last = np.where(labels[:, :, -1] > 0, labels[:, :, -1].astype(np.int64) + total, 0)
            sizes.append(counts)
            seeded.append(has)
            total += n
        keep = np.zeros(total + 1, bool)
        if total == 0:
            return keep, offsets
        sizes, seeded = np.concatenate(sizes), np.concatenate(seeded)
        pairs = np.concatenate(edges) - 1 if edges else np.empty((0, 2), np.int64)
        graph = coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(total, total))
        _, root = connected_components(graph, directed=False)
        component_size = np.bincount(root, weights=sizes.astype(np.float64))
        component_seeded = np.bincount(root, weights=seeded.astype(np.float64)) > 0
        ok = component_seeded & (component_size >= self.min_size[c])
        keep[1:] = ok[root]
        return keep, offsets

    def mask(self, z0: int, z1: int) -> np.ndarray:
        """Pass 2: the uint8 ``(L, X, Y, z1 - z0)`` mask of slices ``z0:z1``."""
        out = np.zeros((self.shape[0], self.shape[1], self.shape[2], z1 - z0), np.uint8)
        for c in range(self.shape[0]):
            if not self.components[c]:
                for a in range(z0, z1, self.depth):
                    b = min(z1, a + self.depth)
                    out[c, :, :, a - z0: b - z0] = self._slab(c, a, b)[0]
                continue
            # whole slabs of the first pass (their labels are the ones counted), cropped to z0:z1
            first = z0 // self.depth * self.depth
            for a in range(first, z1, self.depth):
                b = min(self.shape[3], a + self.depth)
                low, _ = self._slab(c, a, b)
                labels, _ = self._label(low, c)
                offset = self.offsets[c][a // self.depth]
                kept = self.keep[c][np.where(labels > 0, labels + offset, 0)]
                lo, hi = max(a, z0), min(b, z1)
                out[c, :, :, lo - z0: hi - z0] = kept[:, :, lo - a: hi - a]
        return out


class MaskVolume(LazyVolume):
    """The mask of :class:`BlockwisePostprocess` as a lazy ``(L, X, Y, Z)`` uint8 volume (or, with
    ``transform``, e.g. a label map, what it makes of each ``(L, X, Y, dz)`` block, ``channels``
    channels), for the chunked writers: the z range last read is kept, so the tiles of one z
    range cost one pass."""

    def __init__(self, post: BlockwisePostprocess, affine, source, transform=None, channels: int | None = None,
                 dtype=np.uint8):
        self.post, self.transform = post, transform
        super().__init__(((channels or post.shape[0]),) + post.shape[1:], dtype, affine, source)
        self._cached = (None, None)

    def _read(self, c, x, y, z) -> np.ndarray:
        zs = range(self.shape[3])[z] if isinstance(z, slice) else range(z, z + 1)
        if not len(zs):
            return np.zeros(self.shape[:3] + (0,), self.dtype)[(c, x, y)]
        lo, hi = min(zs[0], zs[-1]), max(zs[0], zs[-1]) + 1
        if self._cached[0] != (lo, hi):
            block = self.post.mask(lo, hi)
            block = self.transform(block) if self.transform is not None else block
            self._cached = ((lo, hi), block.astype(self.dtype, copy=False))
        out = self._cached[1][(c, x, y)]
        if not isinstance(z, slice):
            return out[..., z - lo]
        if zs.step == 1:
            return out[..., zs.start - lo: zs.stop - lo]  # a view: the writers' tiles
        return np.take(out, np.asarray(zs) - lo, axis=-1)


__all__ = ["BlockwisePostprocess", "MaskVolume"]
