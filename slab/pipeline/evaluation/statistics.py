"""Per-label statistics of a prediction, no ground truth needed (TotalSegmentator's
``--statistics``): voxels, volume in mm³, connected components, bounding box, centroid in world
(RAS) millimetres, and the input's intensities inside each label.

The image may be a LazyVolume: it is read in blocks of slices along the last axis, so a stack
larger than memory is summarised without being loaded. Intensities are the input's own values
(Hounsfield units for CT), before any normalisation.
"""
from __future__ import annotations

from collections.abc import Sequence

import cc3d
import numpy as np

from slab.core.checks import CONNECTIVITIES, cc3d_connectivity
from slab.core.errors import SlabError

PERCENTILES = (5, 50, 95)
_BLOCK_VOXELS = 1 << 24  # voxels of the image read at a time


def _plain(volume) -> np.ndarray:
    if hasattr(volume, "as_tensor"):
        volume = volume.as_tensor()
    if hasattr(volume, "detach"):
        volume = volume.detach().cpu().numpy()
    return volume


def _projections(mask: np.ndarray) -> list[np.ndarray]:
    """Voxel counts of ``mask`` per index of each axis."""
    return [mask.sum(axis=tuple(a for a in range(3) if a != axis), dtype=np.int64) for axis in range(3)]


def _intensities(image, mask: np.ndarray) -> list[dict]:
    """Per channel: mean, std, min, max and percentiles of ``image`` over ``mask`` (read in blocks)."""
    channels = int(image.shape[0])
    depth = int(mask.shape[2])
    step = max(1, _BLOCK_VOXELS // max(1, int(mask.shape[0]) * int(mask.shape[1]) * channels))
    values: list[list[np.ndarray]] = [[] for _ in range(channels)]
    for start in range(0, depth, step):
        inside = mask[:, :, start:start + step]
        if not inside.any():
            continue
        block = np.asarray(_plain(image[:, :, :, start:start + step]))
        for c in range(channels):
            values[c].append(block[c][inside].astype(np.float64))
    out = []
    for c in range(channels):
        v = np.concatenate(values[c])
        if not np.all(np.isfinite(v)):
            raise SlabError("image: NaN or Inf intensities inside a predicted label; expected finite values")
        row = {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max())}
        row.update({f"p{p}": float(q) for p, q in zip(PERCENTILES, np.percentile(v, PERCENTILES))})
        out.append(row)
    return out


def label_statistics(mask, image, affine, names: Sequence[str], connectivity: int = 26) -> dict:
    """Statistics of each label channel of ``mask``.

    Parameters
    ----------
    mask : ``(L, X, Y, Z)`` 0/1 (or bool) array or tensor, one channel per label.
    image : ``(C, X, Y, Z)`` the input the mask was predicted from (array, tensor, MetaTensor or
        LazyVolume), or None to leave intensities out.
    affine : 4x4 voxel-to-world (RAS, mm) matrix of both.
    names : one name per label channel.
    connectivity : 6, 18 or 26, for counting components.

    Returns
    -------
    dict: ``voxel_volume_mm3`` and ``labels``: ``{name: {"voxels", "volume_mm3", "components",
    "bounding_box" ([[first, last] per axis], voxel indices, inclusive), "centroid_ras_mm",
    "intensity" (one dict per image channel: mean, std, min, max, p5, p50, p95)}}``; an empty
    label has 0 voxels and components and None for the rest.
    """
    mask = np.asarray(_plain(mask))
    if mask.ndim != 4:
        raise SlabError(f"mask: expected (L, X, Y, Z), got shape {tuple(mask.shape)}")
    if len(names) != mask.shape[0]:
        raise SlabError(f"labels: {len(names)} names for {mask.shape[0]} label channels")
    if connectivity not in CONNECTIVITIES:
        raise SlabError(f"connectivity: expected 6, 18 or 26, got {connectivity!r}")
    affine = np.asarray(affine, dtype=np.float64)
    if image is not None and tuple(image.shape[1:]) != tuple(mask.shape[1:]):
        raise SlabError(f"image: spatial shape {tuple(image.shape[1:])} differs from the mask's {tuple(mask.shape[1:])}")
    voxel_mm3 = float(abs(np.linalg.det(affine[:3, :3])))
    labels = {}
    for channel, name in zip(mask, names):
        inside = channel.astype(bool, copy=False)
        count = int(np.count_nonzero(inside))
        entry = {"voxels": count, "volume_mm3": count * voxel_mm3, "components": 0, "bounding_box": None,
                 "centroid_ras_mm": None, "intensity": None}
        if count:
            entry["components"] = int(cc3d.connected_components(inside, connectivity=cc3d_connectivity(inside.shape, connectivity),
                                                                return_N=True,
                                                                binary_image=True)[1])
            counts = _projections(inside)
            entry["bounding_box"] = [[int(np.flatnonzero(c)[0]), int(np.flatnonzero(c)[-1])] for c in counts]
            centre = [float(np.dot(np.arange(c.size), c) / count) for c in counts]
            entry["centroid_ras_mm"] = [float(v) for v in affine[:3, :3] @ centre + affine[:3, 3]]
            if image is not None:
                entry["intensity"] = _intensities(image, inside)
        labels[str(name)] = entry
    return {"voxel_volume_mm3": voxel_mm3, "labels": labels}


__all__ = ["label_statistics", "PERCENTILES"]
