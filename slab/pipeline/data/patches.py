"""3D training patches read from volumes on disk: MONAI's ``RandCropByPosNegLabeld`` without the volume.

In memory, the 3D task pads each volume to the patch size (``SpatialPadd``), lists its
foreground and background voxels (``FgBgToIndicesd``) and crops around a voxel drawn uniformly
from the foreground (probability ``pos / (pos + neg)``) or the background
(``RandCropByPosNegLabeld``; the centre moved so that the patch lies inside the padded volume).
:class:`StreamedPatches` draws from the same distribution holding neither the volume nor its
voxel lists: the label is read once in blocks to count the foreground voxels of every
``BLOCK``-sided cube; a draw picks a cube with probability proportional to its count of the
wanted kind (the padding counts as background), reads that cube's label and picks one of its
voxels uniformly — so every voxel of the kind is equally likely, as in MONAI — then reads only
the patch, normalised with the volume's window (computed once, in blocks), zero-padded where it
leaves the volume as ``SpatialPadd`` pads.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from slab.pipeline.data.stream import add_counts, label_part, normalised, read_part, value_counts
from slab.core.errors import SlabError

# Side of the cubes whose foreground voxels are counted.
BLOCK = 32


def _index(box) -> tuple:
    return (slice(None),) + tuple(slice(a, b) for a, b in box)


class StreamedVolume:
    """One training volume read in parts: ``image`` and ``label`` (lazy volumes or arrays of one
    spatial shape), the image's block ``normalize`` (or None), a voxel-wise ``label_transform``
    (or None) and the ``patch`` size; its padding, per-cube foreground counts and the label's
    ``values`` (:func:`slab.pipeline.data.stream.value_counts`)."""

    def __init__(self, image, label, patch: Sequence[int], normalize: Callable | None,
                 label_transform: Callable | None, name: str):
        self.image, self.label, self.name = image, label, name
        self.normalize, self.label_transform = normalize, label_transform
        self.shape = tuple(int(n) for n in image.shape[1:])
        self.patch = tuple(int(p) for p in patch)
        self.padded = tuple(max(n, p) for n, p in zip(self.shape, self.patch))
        self.before = tuple((p - n) // 2 for n, p in zip(self.shape, self.padded))  # SpatialPad's symmetric split
        grid = tuple(-(-n // BLOCK) for n in self.shape)
        fg = np.zeros(grid, dtype=np.int64)
        for z in range(0, self.shape[2], BLOCK):
            block = self.label_part(((0, self.shape[0]), (0, self.shape[1]), (z, min(self.shape[2], z + BLOCK))))
            self.values = value_counts(block) if z == 0 else add_counts(self.values, value_counts(block))
            foreground = np.zeros((grid[0] * BLOCK, grid[1] * BLOCK, BLOCK), dtype=bool)
            foreground[:self.shape[0], :self.shape[1], :block.shape[3]] = np.any(block > 0, axis=0)
            fg[:, :, z // BLOCK] = foreground.reshape(grid[0], BLOCK, grid[1], BLOCK, BLOCK).sum(axis=(1, 3, 4),
                                                                                                 dtype=np.int64)
        sizes = [np.diff(np.minimum(np.arange(g + 1) * BLOCK, n)) for g, n in zip(grid, self.shape)]
        voxels = sizes[0][:, None, None] * sizes[1][None, :, None] * sizes[2][None, None, :]
        self.grid = grid
        # cumulative voxel counts of each kind over the cubes (C order), and the padding's voxels
        self.cumulative = {True: np.cumsum(fg.ravel()), False: np.cumsum((voxels - fg).ravel())}
        self.padding = int(np.prod(self.padded)) - int(np.prod(self.shape))  # padded voxels: background
        self.fg, self.bg = int(self.cumulative[True][-1]), int(self.cumulative[False][-1]) + self.padding

    def label_part(self, box) -> np.ndarray:
        return label_part(self.label, _index(box), self.label_transform, self.name)

    def image_part(self, box) -> np.ndarray:
        return normalised(read_part(self.image, _index(box)), self.normalize, self.name).astype(np.float32, copy=False)

    def centre(self, positive: bool, rng: np.random.Generator) -> tuple[int, ...]:
        """A voxel (padded coordinates) drawn uniformly from the foreground or the background."""
        flat = self.cumulative[positive]
        pick = int(rng.integers(self.fg if positive else self.bg))
        if pick >= int(flat[-1]):  # a padded voxel: uniform over the padding
            while True:
                voxel = tuple(int(rng.integers(p)) for p in self.padded)
                if any(not b <= v < b + n for v, b, n in zip(voxel, self.before, self.shape)):
                    return voxel
        cube = np.unravel_index(int(np.searchsorted(flat, pick, side="right")), self.grid)
        box = [(c * BLOCK, min(n, (c + 1) * BLOCK)) for c, n in zip(cube, self.shape)]
        mask = np.any(self.label_part(box) > 0, axis=0)
        voxels = np.argwhere(mask if positive else ~mask)
        voxel = voxels[int(rng.integers(len(voxels)))]
        return tuple(int(v + a + b) for v, (a, _), b in zip(voxel, box, self.before))

    def crop(self, centre) -> dict:
        """The patch around ``centre`` (moved inside the padded volume, as MONAI's crop centres
        are), zero where it is padding."""
        start = [int(np.clip(c - p // 2, 0, n - p)) for c, p, n in zip(centre, self.patch, self.padded)]
        inside = [(max(0, s - b), min(n, s - b + p)) for s, b, n, p in zip(start, self.before, self.shape, self.patch)]
        place = (slice(None),) + tuple(slice(a + b - s, e + b - s) for (a, e), b, s in zip(inside, self.before, start))
        image_part, label_part = self.image_part(inside), self.label_part(inside)
        image = np.zeros((image_part.shape[0],) + self.patch, dtype=np.float32)
        label = np.zeros((label_part.shape[0],) + self.patch, dtype=label_part.dtype)
        image[place], label[place] = image_part, label_part
        return {"image": image, "label": label}


class StreamedPatches:
    """Patches of ``patch`` voxels from streamed volumes (:class:`StreamedVolume`), a foreground
    centre with probability ``pos / (pos + neg)`` (only one kind where a volume has no voxel of
    the other, as MONAI does), then ``augment`` (MONAI's dictionary transforms, reseeded per
    sample). ``sample(volume, rng)`` is one patch ``{"image", "label"}`` of volume ``volume``."""

    def __init__(self, volumes: list[StreamedVolume], pos_neg: Sequence[float], augment: Callable | None):
        pos, neg = (float(v) for v in pos_neg)
        if pos + neg <= 0:
            raise SlabError("pos_neg: pos + neg must be positive")
        self.volumes, self.ratio, self.augment = volumes, pos / (pos + neg), augment

    def sample(self, index: int, rng: np.random.Generator) -> dict:
        volume = self.volumes[index]
        positive = bool(rng.random() < self.ratio) if volume.fg and volume.bg else bool(volume.fg)
        patch = volume.crop(volume.centre(positive, rng))
        out = {"image": torch.from_numpy(patch["image"]), "label": torch.from_numpy(patch["label"])}
        if self.augment is not None:
            if hasattr(self.augment, "set_random_state"):
                self.augment.set_random_state(seed=int(rng.integers(2**32)))
            out = dict(self.augment(out))
        return {k: torch.as_tensor(out[k]).as_subclass(torch.Tensor) for k in ("image", "label")}


__all__ = ["BLOCK", "StreamedPatches", "StreamedVolume"]
