"""Post-processing transforms on arrays (MONAI ``Transform`` classes): threshold, hysteresis, components,
holes, ROI, region growing, and the one chain (:class:`Postprocess`, :func:`make_postprocess`)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from monai.transforms import Transform
from scipy import ndimage as ndi

from slab.core.checks import CONNECTIVITIES, FILL_MODES
from slab.core.errors import SlabError
from slab.transforms.post.functional import (check_connectivity, check_int, check_no_nan, check_number,
                                             check_values, fill_enclosed, filter_components, hysteresis_pairs,
                                             is_sequence, largest_labels, like_input, as_numpy, per_channel, per_volume,
                                             label_volumes, argmax_masks, check_binary, greater_than, hysteresis_fill)
from slab.io.volumes import check_same_geometry


# ---------------------------------------------------------------------------------------------
# Array transforms


class Threshold(Transform):
    """Binarise: ``x > threshold`` (strict, as ``skimage`` hysteresis), as uint8.

    Parameters
    ----------
    threshold : float, or a sequence of floats
        One value for every label channel, or one value per channel of an ``(L, X, Y, Z)``
        input (e.g. the per-label thresholds chosen on validation); a sequence whose length is
        not ``L`` is a SlabError (an ``(X, Y, Z)`` input is one channel). Compared exactly with
        the values, whatever their dtype.

    Example
    -------
    >>> Threshold(0.5)(np.array([[[[0.2, 0.5, 0.7]]]])).tolist()
    [[[[0, 0, 1]]]]
    >>> Threshold([0.1, 0.6])(np.array([[[[0.2, 0.7]]], [[[0.2, 0.7]]]])).tolist()
    [[[[1, 1]]], [[[0, 1]]]]
    """

    def __init__(self, threshold: float | Sequence[float] = 0.5):
        self.threshold = check_values("threshold", threshold)

    def __call__(self, x):
        a = as_numpy(x)
        check_no_nan(a, "Threshold")
        if not isinstance(self.threshold, tuple):
            return like_input(greater_than(a, self.threshold).view(np.uint8), x)
        volumes = label_volumes(a, "Threshold")
        out = np.empty(a.shape, np.uint8)
        channels = [out] if a.ndim == 3 else list(out)
        for v, t, dest in zip(volumes, per_channel("threshold", self.threshold, len(volumes)), channels):
            dest[...] = greater_than(v, t)
        return like_input(out, x)


class HysteresisFill(Transform):
    """Flood fill from confident seeds: voxels ``> high``, grown through voxels ``> low``.

    The components (at ``connectivity``) of ``x > low`` that hold a voxel ``> high``. With
    ``connectivity=6`` this is exactly ``skimage.filters.apply_hysteresis_threshold(x, low, high)``
    (which labels with scipy's default face connectivity).

    Parameters
    ----------
    low, high : float, or sequences of floats
        ``low <= high``. Each is one value for every label channel or one value per channel of
        an ``(L, X, Y, Z)`` input (length ``L``, else a SlabError).
    connectivity : 6, 18 or 26
    """

    def __init__(self, low: float | Sequence[float], high: float | Sequence[float], connectivity: int = 26):
        self.low, self.high = check_values("low", low), check_values("high", high)
        lows, highs = (list(v) if isinstance(v, tuple) else [v] for v in (self.low, self.high))
        n = max(len(lows), len(highs))
        if {len(lows), len(highs)} - {1, n}:
            raise SlabError(f"hysteresis: {len(lows)} low and {len(highs)} high values; expected one pair per channel")
        for c, (lo, hi) in enumerate(zip(lows * (n // len(lows)), highs * (n // len(highs)))):
            if lo > hi:
                where = f" (channel {c})" if n > 1 else ""
                raise SlabError(f"hysteresis: low {lo:g} is above high {hi:g}{where}; expected low <= high")
        self.connectivity = check_connectivity(connectivity)

    def __call__(self, x):
        a = as_numpy(x)
        check_no_nan(a, "HysteresisFill")
        volumes = label_volumes(a, "HysteresisFill")
        lows = per_channel("hysteresis", self.low, len(volumes))
        highs = per_channel("hysteresis", self.high, len(volumes))
        results = [hysteresis_fill(v, lo, hi, self.connectivity) for v, lo, hi in zip(volumes, lows, highs)]
        return like_input(results[0] if a.ndim == 3 else np.stack(results), x)


class RemoveSmallComponents(Transform):
    """Remove connected components of fewer than ``min_size`` voxels.

    The same output as ``skimage.morphology.remove_small_objects`` on a bool mask with
    ``max_size=min_size - 1`` (scikit-image >= 0.26; ``min_size=min_size`` before) and
    scikit-image connectivity 1, 2, 3 for 6, 18, 26.

    Parameters
    ----------
    min_size : int >= 0
        Components with at least this many voxels are kept; 0 and 1 keep everything.
    connectivity : 6, 18 or 26
    """

    def __init__(self, min_size: int, connectivity: int = 26):
        self.min_size = check_int("min_size", min_size, 0)
        self.connectivity = check_connectivity(connectivity)

    def _remove(self, v: np.ndarray) -> np.ndarray:
        mask = check_binary(v, "RemoveSmallComponents")
        if self.min_size <= 1:
            return mask.astype(np.uint8)
        return filter_components(mask, self.connectivity, lambda sizes: sizes >= self.min_size)

    def __call__(self, x):
        return per_volume(x, self._remove, "RemoveSmallComponents")


class KeepLargestComponents(Transform):
    """Keep the ``k`` largest connected components.

    Components of equal size are ranked by their first voxel in memory scan order (C order,
    as ``scipy.ndimage.label`` numbers them, for a C-ordered array).

    Parameters
    ----------
    k : int >= 1
    connectivity : 6, 18 or 26
    """

    def __init__(self, k: int = 1, connectivity: int = 26):
        self.k = check_int("keep_largest", k, 1)
        self.connectivity = check_connectivity(connectivity)

    def _keep(self, v: np.ndarray) -> np.ndarray:
        mask = check_binary(v, "KeepLargestComponents")
        return filter_components(mask, self.connectivity, lambda sizes: largest_labels(sizes, self.k))

    def __call__(self, x):
        return per_volume(x, self._keep, "KeepLargestComponents")


class FillHoles(Transform):
    """Fill holes: background regions that do not reach the border.

    ``mode="3d"`` fills enclosed cavities of the volume (background face-connected, i.e.
    6-connected: exactly ``scipy.ndimage.binary_fill_holes``); ``mode="slice"`` fills each 2D
    slice across ``axis`` on its own (4-connected background, ``binary_fill_holes`` per slice),
    which also closes vessel lumens open at the volume's ends.

    Parameters
    ----------
    mode : "3d" or "slice"
    axis : int
        Spatial axis (0, 1 or 2, channel excluded) the slices are taken along, for ``"slice"``.
    """

    def __init__(self, mode: str = "3d", axis: int = 2):
        if mode not in FILL_MODES:
            raise SlabError(f"fill_holes: expected '3d' or 'slice', got {mode!r}")
        self.mode = mode
        self.axis = check_int("axis", axis, 0)
        if self.axis > 2:
            raise SlabError(f"axis: expected a spatial axis 0, 1 or 2, got {axis!r}")

    def _fill(self, v: np.ndarray) -> np.ndarray:
        mask = check_binary(v, "FillHoles")
        if self.mode == "3d":
            return fill_enclosed(mask)
        out = np.empty(mask.shape, np.uint8)
        for i in range(mask.shape[self.axis]):
            index = (slice(None),) * self.axis + (i,)
            out[index] = fill_enclosed(mask[index])
        return out

    def __call__(self, x):
        return per_volume(x, self._fill, "FillHoles")


class MaskToROI(Transform):
    """Zero everything outside a region of interest (an organ mask).

    ``__call__(x, roi)``: ``roi`` is a binary mask of ``x``'s spatial shape, with one channel
    (applied to every label) or one per label. When both are MetaTensors their affines must
    agree. ``x`` keeps its dtype.
    """

    def __call__(self, x, roi):
        a, r = as_numpy(x), check_binary(roi, "roi")
        if a.shape[-3:] != r.shape[-3:] or r.ndim not in (3, 4) or a.ndim not in (3, 4):
            raise SlabError(f"roi: shape {tuple(r.shape)} does not match the volume's {tuple(a.shape)}")
        labels = a.shape[0] if a.ndim == 4 else 1
        if r.ndim == 4 and r.shape[0] not in (1, labels):
            raise SlabError(f"roi: {r.shape[0]} channels; expected 1 or one per label ({labels})")
        if hasattr(x, "affine") and hasattr(roi, "affine"):
            check_same_geometry(x, roi, names=["volume", "roi"])
        if a.ndim == 3 and r.ndim == 4:
            r = r[0]
        return like_input(a * r, x)


class RegionGrow(Transform):
    """Intensity flood fill of an image from seed voxels (the predicted mask), bounded in steps.

    For each label, the seed statistics (mean, standard deviation of the image over the seed)
    define an intensity window ``mean ± tolerance * std`` (``scale="std"``) or
    ``mean ± tolerance`` (``scale="intensity"``). Each iteration adds the neighbours (at
    ``connectivity``) of the grown region whose intensity lies in the window, so a voxel is
    reached after at most ``max_iterations`` steps: the slice-to-slice vessel growing of the
    SenNet solutions, in 3D. Seed voxels are always kept.

    ``__call__(image, seed)``: ``image`` ``(C, X, Y, Z)`` or ``(X, Y, Z)`` with one channel or one
    per label; ``seed`` a binary ``(L, X, Y, Z)`` or ``(X, Y, Z)`` mask. Returns ``seed``'s type.

    Parameters
    ----------
    tolerance : float >= 0
    max_iterations : int >= 1, or None to grow until nothing changes
    connectivity : 6, 18 or 26
    scale : "std" or "intensity"
    """

    def __init__(self, tolerance: float = 2.0, max_iterations: int | None = 10, connectivity: int = 6,
                 scale: str = "std"):
        self.tolerance = check_number("tolerance", tolerance)
        if self.tolerance < 0:
            raise SlabError(f"tolerance: expected a number >= 0, got {tolerance!r}")
        self.max_iterations = None if max_iterations is None else check_int("max_iterations", max_iterations, 1)
        self.connectivity = check_connectivity(connectivity)
        if scale not in ("std", "intensity"):
            raise SlabError(f"scale: expected 'std' or 'intensity', got {scale!r}")
        self.scale = scale

    def _grow(self, image: np.ndarray, seed: np.ndarray) -> np.ndarray:
        if not seed.any():
            return seed.astype(np.uint8)
        values = image[seed].astype(np.float64)
        half = self.tolerance * (values.std() if self.scale == "std" else 1.0)
        mean = values.mean()
        allowed = seed | ((image >= mean - half) & (image <= mean + half))
        structure = ndi.generate_binary_structure(3, CONNECTIVITIES.index(self.connectivity) + 1)
        grown = ndi.binary_dilation(seed, structure, iterations=self.max_iterations or 0, mask=allowed)
        return grown.view(np.uint8)

    def __call__(self, image, seed):
        img, s = as_numpy(image), check_binary(seed, "seed")
        check_no_nan(img, "RegionGrow image")
        images, seeds = label_volumes(img, "RegionGrow image"), label_volumes(s, "RegionGrow seed")
        if images[0].shape != seeds[0].shape:
            raise SlabError(f"seed: spatial shape {seeds[0].shape} does not match the image's {images[0].shape}")
        if len(images) not in (1, len(seeds)):
            raise SlabError(f"image: {len(images)} channels; expected 1 or one per seed label ({len(seeds)})")
        results = [self._grow(images[i if len(images) > 1 else 0], sd) for i, sd in enumerate(seeds)]
        return like_input(results[0] if s.ndim == 3 else np.stack(results), seed)


class Postprocess(Transform):
    """The post-processing chain: ROI, threshold or hysteresis, small components, largest
    components, holes.

    Parameters
    ----------
    threshold : float, sequence of floats, or None
        Binarise ``x > threshold``: one value for every label channel, or one per channel
        (length ``L``; see :class:`Threshold`). ``None`` (with no ``hysteresis``) means the
        input is already a mask: anything but 0/1 is a SlabError.
    hysteresis : (low, high), or a sequence of (low, high) pairs, optional
        Use :class:`HysteresisFill` instead of the threshold: one pair for every label channel,
        or one pair per channel (length ``L``).
    min_size : int >= 0
        :class:`RemoveSmallComponents`; 0 skips it.
    keep_largest : int >= 1, optional
        :class:`KeepLargestComponents`.
    fill_holes : "3d", "slice" or None
        :class:`FillHoles` (slices along z).
    connectivity : 6, 18 or 26, for every component step.

    ``__call__(x, roi=None)``: ``roi`` is passed to :class:`MaskToROI` before binarising.
    """

    def __init__(self, threshold: float | Sequence[float] | None = 0.5,
                 hysteresis: Sequence[float] | Sequence[Sequence[float]] | None = None, min_size: int = 0,
                 keep_largest: int | None = None, fill_holes: str | None = None, connectivity: int = 26):
        connectivity = check_connectivity(connectivity)
        # the settings parsed, kept: the out-of-core chain (slab.transforms.blockwise) reads them
        self.connectivity, self.min_size = connectivity, check_int("min_size", min_size, 0)
        self.keep_largest, self.fill_holes = keep_largest, fill_holes
        if hysteresis is not None:
            low, high = hysteresis_pairs(hysteresis)
            self.binarise = HysteresisFill(low, high, connectivity=connectivity)
        elif threshold is not None:
            self.binarise = Threshold(threshold)
        else:
            self.binarise = None  # the input must already be a mask
        self.steps = []
        if self.min_size:
            self.steps.append(RemoveSmallComponents(min_size, connectivity))
        if keep_largest is not None:
            self.steps.append(KeepLargestComponents(keep_largest, connectivity))
        if fill_holes is not None:
            self.steps.append(FillHoles(fill_holes))

    def __call__(self, x, roi=None):
        a = as_numpy(x if roi is None else MaskToROI()(x, roi))
        a = check_binary(a, "input").view(np.uint8) if self.binarise is None else self.binarise(a)
        for step in self.steps:
            a = step(a)
        return like_input(a, x)


class PerLabelPostprocess(Transform):
    """A :class:`Postprocess` per label channel (e.g. chosen by cross-validation, label by label):
    channel ``i`` of ``(L, X, Y, Z)`` goes through ``Postprocess(**labels[i])``."""

    def __init__(self, labels: Sequence[Mapping]):
        if not is_sequence(labels) or not labels or not all(isinstance(o, Mapping) for o in labels):
            raise SlabError(f"postprocess labels: expected one object of settings per label, got {labels!r}")
        self.chains = [Postprocess(**dict(o)) for o in labels]

    def __call__(self, x, roi=None):
        a = as_numpy(x)
        if a.ndim != 4 or a.shape[0] != len(self.chains):
            raise SlabError(f"input: expected {len(self.chains)} label channel(s) (L, X, Y, Z), got shape {a.shape}")
        out = np.concatenate([np.asarray(chain(a[i:i + 1], None if roi is None else roi))
                              for i, chain in enumerate(self.chains)])
        return like_input(out, x)


class ArgmaxPostprocess(Transform):
    """Exclusive classes: each voxel to its most probable class (:func:`argmax_masks`), then the
    ``inner`` chain (components, holes: :class:`Postprocess` or :class:`PerLabelPostprocess`
    with no threshold) on the masks. No voxel is ever in two labels."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, x, roi=None):
        masks = argmax_masks(x if roi is None else MaskToROI()(x, roi))
        return like_input(np.asarray(self.inner(masks)), x)


def merge_postprocess(chosen: Mapping | None, given: Mapping | None) -> dict:
    """Post-processing settings ``given`` (e.g. on the command line) over ``chosen`` (a model's):
    a given ``threshold`` or ``hysteresis`` replaces the chosen binarisation (an exclusive
    model's ``argmax`` too); per-label settings (``{"labels": [...]}``) take the given values in
    every label."""
    chosen, given = dict(chosen or {}), dict(given or {})
    binarises = "threshold" in given or "hysteresis" in given
    argmax = chosen.pop("argmax", False) and not binarises and given.get("argmax", True)
    given.pop("argmax", None)

    def merge(options: dict) -> dict:
        options = dict(options)
        if binarises:
            options.pop("threshold", None)
            options.pop("hysteresis", None)
        return {**options, **given}

    out = {"labels": [merge(o) for o in chosen["labels"]]} if "labels" in chosen else merge(chosen)
    return {"argmax": True, **out} if argmax else out


def make_postprocess(options: Mapping | None):
    """:class:`Postprocess` (default ``threshold`` 0.5) or, for ``{"labels": [...]}``,
    :class:`PerLabelPostprocess`; with ``"argmax": true`` (exclusive classes), the masks of
    :func:`argmax_masks` through the same chain without a threshold (:class:`ArgmaxPostprocess`).
    Unknown settings are one-line SlabErrors."""
    if options is not None and not isinstance(options, Mapping):
        raise SlabError(f"postprocess: expected an object of settings, got {options!r}")
    options = dict(options or {})
    argmax = options.pop("argmax", False)
    if not isinstance(argmax, bool):
        raise SlabError(f"postprocess argmax: expected true or false, got {argmax!r}")
    if argmax and any(key in o for o in options.get("labels", [options]) for key in ("threshold", "hysteresis")):
        raise SlabError("postprocess: argmax (exclusive classes) binarises by itself; give no threshold or hysteresis "
                        "with it")
    default = {"threshold": None} if argmax else {"threshold": 0.5}
    try:
        if "labels" in options:
            if set(options) != {"labels"}:
                raise SlabError(f"postprocess: 'labels' (per-label settings) goes alone, got {sorted(options)}")
            if not is_sequence(options["labels"]) or not all(isinstance(o, Mapping) for o in options["labels"]):
                raise SlabError(f"postprocess labels: expected one object of settings per label, "
                                f"got {options['labels']!r}")
            chain = PerLabelPostprocess([{**default, **o} for o in options["labels"]])
        else:
            chain = Postprocess(**{**default, **options})
    except TypeError as err:
        raise SlabError(f"postprocess: {err}".replace("__init__() ", "")) from None
    return ArgmaxPostprocess(chain) if argmax else chain


def postprocess(x, *, threshold: float | Sequence[float] | None = 0.5,
                hysteresis: Sequence[float] | Sequence[Sequence[float]] | None = None, min_size: int = 0,
                keep_largest: int | None = None, fill_holes: str | None = None, roi=None, connectivity: int = 26):
    """Probability map (or mask) to cleaned mask; see :class:`Postprocess` for the parameters.

    Example
    -------
    >>> prob = np.zeros((1, 8, 8, 8), np.float32); prob[0, 2:6, 2:6, 2:6] = 0.9; prob[0, 0, 0, 0] = 0.8
    >>> int(postprocess(prob, threshold=0.5, min_size=2).sum())
    64
    >>> int(postprocess(np.concatenate([prob, prob]), threshold=[0.5, 0.85]).sum())
    129
    """
    return Postprocess(threshold, hysteresis, min_size, keep_largest, fill_holes, connectivity)(x, roi)


__all__ = ["ArgmaxPostprocess", "FillHoles", "HysteresisFill", "KeepLargestComponents", "MaskToROI", "PerLabelPostprocess", "Postprocess", "RegionGrow", "RemoveSmallComponents", "Threshold", "make_postprocess", "merge_postprocess", "postprocess"]
