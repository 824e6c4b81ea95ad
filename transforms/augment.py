"""2D augmentation of slabs, identical for every image channel and the label.

A slab's channels are neighbouring slices, so each geometric change must move all of them
(and the label) the same way, or the network would learn from misaligned slices. MONAI's
dictionary transforms draw one random decision per call and apply it to every key, which is
exactly that; :class:`RandSlabAugmentd` chains them: flips on both axes, 90° rotations (square
images only; a rectangle gets 180° turns from the two flips), an affine (rotation, scaling),
an optional elastic deformation, then intensity scaling and shifting of the image keys only.
Images are resampled bilinearly, labels with nearest neighbour.
"""
from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    MapTransform,
    Rand2DElasticd,
    RandAffined,
    RandFlipd,
    Randomizable,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
)

from transforms.errors import SlabError


def _probability(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not 0 <= value <= 1:
        raise SlabError(f"{name}: expected a probability in [0, 1], got {value!r}")
    return float(value)


def _non_negative(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not value >= 0:
        raise SlabError(f"{name}: expected a number >= 0, got {value!r}")
    return float(value)


class RandSlabAugmentd(Randomizable, MapTransform):
    """Random 2D augmentation of ``(C, H, W)`` slabs and their ``(L, H, W)`` labels.

    Parameters
    ----------
    keys : keys to augment (default ``("image", "label")``).
    label_keys : those of ``keys`` that are labels: nearest-neighbour resampling, no intensity change.
    prob : probability of each enabled step (each flip, rot90, affine, elastic, intensity step).
    flips, rot90, affine, intensity, elastic : switch the steps on or off.
    rotate_range : affine rotation, radians, drawn from ``[-r, r]``.
    scale_range : affine zoom, drawn from ``[1 - s, 1 + s]``.
    scale_intensity : image intensities multiplied by ``1 + f``, ``f`` in ``[-s, s]``.
    shift_intensity : image intensities plus ``o``, ``o`` in ``[-s, s]``.
    elastic_spacing, elastic_magnitude : control-point spacing (pixels) and displacement range
        of the elastic deformation.

    Randomness follows MONAI: ``set_random_state(seed)`` makes the sequence reproducible.

    Example
    -------
    >>> aug = RandSlabAugmentd(prob=1.0, affine=False, intensity=False).set_random_state(0)
    >>> out = aug({"image": torch.rand(3, 8, 8), "label": torch.zeros(1, 8, 8)})
    >>> tuple(out["image"].shape), tuple(out["label"].shape)
    ((3, 8, 8), (1, 8, 8))
    """

    def __init__(self, keys: KeysCollection = ("image", "label"), label_keys: Sequence[Hashable] = ("label",),
                 prob: float = 0.5, flips: bool = True, rot90: bool = True, affine: bool = True,
                 intensity: bool = True, elastic: bool = False, rotate_range: float = 0.26,
                 scale_range: float = 0.1, scale_intensity: float = 0.1, shift_intensity: float = 0.1,
                 elastic_spacing: float = 16.0, elastic_magnitude: tuple[float, float] = (1.0, 2.0),
                 allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        prob = _probability(prob, "prob")
        label_keys = (label_keys,) if isinstance(label_keys, str) else tuple(label_keys)
        stray = [k for k in label_keys if k not in self.keys]
        if stray:
            raise SlabError(f"label_keys: {stray[0]!r} is not one of keys {list(self.keys)}")
        keys = list(self.keys)
        image_keys = [k for k in keys if k not in label_keys]
        modes = ["nearest" if k in label_keys else "bilinear" for k in keys]
        allow = allow_missing_keys
        rotate_range = _non_negative(rotate_range, "rotate_range")
        scale_range = _non_negative(scale_range, "scale_range")
        steps: list = []
        if flips:
            steps += [RandFlipd(keys, prob=prob, spatial_axis=0, allow_missing_keys=allow),
                      RandFlipd(keys, prob=prob, spatial_axis=1, allow_missing_keys=allow)]
        self._rot90 = RandRotate90d(keys, prob=prob, max_k=3, allow_missing_keys=allow) if rot90 else None
        if affine:
            steps.append(RandAffined(keys, prob=prob, rotate_range=rotate_range, scale_range=scale_range,
                                     mode=modes, padding_mode="zeros", allow_missing_keys=allow))
        if elastic:
            magnitude = tuple(float(m) for m in elastic_magnitude)
            if len(magnitude) != 2 or not 0 <= magnitude[0] <= magnitude[1]:
                raise SlabError(f"elastic_magnitude: expected (low, high), 0 <= low <= high; got {elastic_magnitude!r}")
            spacing = _non_negative(elastic_spacing, "elastic_spacing")
            if spacing < 2:
                raise SlabError(f"elastic_spacing: expected at least 2 pixels, got {elastic_spacing!r}")
            steps.append(Rand2DElasticd(keys, spacing=(spacing, spacing), magnitude_range=magnitude, prob=prob,
                                        mode=modes, padding_mode="zeros", allow_missing_keys=allow))
        self._geometric = Compose(steps)
        intensity_steps = []
        if intensity and image_keys:
            factor = _non_negative(scale_intensity, "scale_intensity")
            offset = _non_negative(shift_intensity, "shift_intensity")
            intensity_steps = [RandScaleIntensityd(image_keys, factors=factor, prob=prob, allow_missing_keys=allow),
                               RandShiftIntensityd(image_keys, offsets=offset, prob=prob, allow_missing_keys=allow)]
        self._intensity = Compose(intensity_steps)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        for step in (self._geometric, self._rot90, self._intensity):
            if step is not None:
                step.set_random_state(seed=int(self.R.randint(2**32, dtype="uint32")))
        return self

    def randomize(self, data=None) -> None:
        """Each MONAI step draws its own decision when called."""

    def geometric(self, data: Mapping) -> dict:
        """Only the geometric steps (flips, rot90, affine, elastic)."""
        d = self._geometric(dict(data))
        present = [k for k in self.key_iterator(d)]
        if self._rot90 is not None and present:
            shape = tuple(d[present[0]].shape[-2:])
            if shape[0] == shape[1]:
                d = self._rot90(d)
            else:  # keep the slab's shape fixed for batching; keep the random sequence aligned
                self._rot90.randomize()
        return d

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        dtypes = {}
        for key in self.key_iterator(d):
            value = torch.as_tensor(d[key])
            if value.ndim != 3:
                raise SlabError(f"{key}: expected a (C, H, W) slab, got shape {tuple(value.shape)}")
            dtypes[key] = value.dtype
            d[key] = value
        d = self._intensity(self.geometric(d))
        for key, dtype in dtypes.items():
            value = d[key].as_tensor() if isinstance(d[key], MetaTensor) else torch.as_tensor(d[key])
            d[key] = value.to(dtype)  # labels were resampled by nearest neighbour: values survive the round trip
        return d


__all__ = ["RandSlabAugmentd"]
