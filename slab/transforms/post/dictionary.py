"""Dictionary forms (MONAI ``MapTransform`` classes) of the array transforms in :mod:`.array`."""
from __future__ import annotations

from monai.transforms import MapTransform

from slab.transforms.post.array import (FillHoles, HysteresisFill, KeepLargestComponents, MaskToROI, Postprocess,
                                        RegionGrow, RemoveSmallComponents, Threshold)


# ---------------------------------------------------------------------------------------------
# Dictionary transforms


class _Mapped(MapTransform):
    """Apply ``array_transform`` (built from the remaining arguments) to each key."""

    array_transform: type

    def __init__(self, keys, *args, allow_missing_keys: bool = False, **kwargs):
        super().__init__(keys, allow_missing_keys)
        self.transform = self.array_transform(*args, **kwargs)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d


class Thresholdd(_Mapped):
    """Dictionary form of :class:`Threshold`."""

    array_transform = Threshold


class HysteresisFilld(_Mapped):
    """Dictionary form of :class:`HysteresisFill`."""

    array_transform = HysteresisFill


class RemoveSmallComponentsd(_Mapped):
    """Dictionary form of :class:`RemoveSmallComponents`."""

    array_transform = RemoveSmallComponents


class KeepLargestComponentsd(_Mapped):
    """Dictionary form of :class:`KeepLargestComponents`."""

    array_transform = KeepLargestComponents


class FillHolesd(_Mapped):
    """Dictionary form of :class:`FillHoles`."""

    array_transform = FillHoles


class MaskToROId(MapTransform):
    """Dictionary form of :class:`MaskToROI`: the ROI is ``data[roi_key]``."""

    def __init__(self, keys, roi_key: str, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.roi_key, self.transform = roi_key, MaskToROI()

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key], d[self.roi_key])
        return d


class RegionGrowd(MapTransform):
    """Dictionary form of :class:`RegionGrow`: grows each key's mask over ``data[image_key]``."""

    def __init__(self, keys, image_key: str = "image", allow_missing_keys: bool = False, **kwargs):
        super().__init__(keys, allow_missing_keys)
        self.image_key, self.transform = image_key, RegionGrow(**kwargs)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[self.image_key], d[key])
        return d


class Postprocessd(MapTransform):
    """Dictionary form of :class:`Postprocess`; ``roi_key`` names an optional ROI mask."""

    def __init__(self, keys, roi_key: str | None = None, allow_missing_keys: bool = False, **kwargs):
        super().__init__(keys, allow_missing_keys)
        self.roi_key, self.transform = roi_key, Postprocess(**kwargs)

    def __call__(self, data):
        d = dict(data)
        roi = None if self.roi_key is None else d[self.roi_key]
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key], roi)
        return d


__all__ = ["FillHolesd", "HysteresisFilld", "KeepLargestComponentsd", "MaskToROId", "Postprocessd", "RegionGrowd", "RemoveSmallComponentsd", "Thresholdd"]
