"""Post-processing of probability maps and masks: threshold, hysteresis flood fill, region
growing, connected components, holes, ROI.

Every transform takes one item, a ``(L, X, Y, Z)`` volume (each label processed on its own) or
an ``(X, Y, Z)`` volume, as a numpy array, torch tensor or MetaTensor, and returns the same type
with the same meta (affine included). Masks come out as ``uint8`` 0/1. Transforms that need a
binary mask accept bool or 0/1 values of any dtype and raise :class:`SlabError` on anything else.

Connectivity is 6 (faces), 18 (+ edges) or 26 (+ corners); scikit-image and scipy call these
1, 2 and 3. :func:`postprocess` (and :class:`Postprocess`) is the one composition the CLI,
inference and bundles use: ROI, threshold or hysteresis, small components, largest components,
holes, in that order.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import cc3d
import numpy as np
from monai.transforms import MapTransform, Transform
from monai.utils import convert_data_type, convert_to_dst_type
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu
from skimage.morphology import ball

from slab.transforms.checks import CONNECTIVITIES, FILL_MODES, cc3d_connectivity
from slab.transforms.errors import SlabError
from slab.transforms.io import check_same_geometry

try:  # the compiled flood fill (setup.py builds it); without it, hysteresis labels with cc3d
    from slab.transforms import _fill as _compiled_fill
except ImportError:  # pragma: no cover - an install without a C compiler
    _compiled_fill = None

# Voxels per chunk when walking a labelled volume: temporaries stay small and in cache.
_CHUNK_VOXELS = 1 << 20


# ---------------------------------------------------------------------------------------------
# Checks and conversions


def _check_connectivity(connectivity) -> int:
    if connectivity not in CONNECTIVITIES or isinstance(connectivity, bool):
        raise SlabError(f"connectivity: expected 6, 18 or 26, got {connectivity!r}")
    return int(connectivity)


def _check_number(name: str, value) -> float:
    number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not number or not math.isfinite(value):
        raise SlabError(f"{name}: expected a finite number, got {value!r}")
    return float(value)


def _check_values(name: str, value) -> float | tuple[float, ...]:
    """A finite number, or a non-empty sequence of them (one per label channel) as a tuple."""
    if _is_sequence(value):
        values = tuple(value.ravel().tolist()) if isinstance(value, np.ndarray) else tuple(value)
        if not values:
            raise SlabError(f"{name}: expected a number or one number per label channel, got {value!r}")
        return tuple(_check_number(name, v) for v in values)
    return _check_number(name, value)


def _per_channel(name: str, value, labels: int) -> list[float]:
    """``value`` (a number or one per channel) as one number per label channel, the length checked."""
    if not isinstance(value, tuple):
        return [value] * labels
    if len(value) != labels:
        raise SlabError(f"{name}: {len(value)} values for {labels} label channel{'s' * (labels != 1)}; "
                        "expected one number or one per channel")
    return list(value)


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise SlabError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def _numpy(x) -> np.ndarray:
    return convert_data_type(x, np.ndarray)[0]


def _like(array: np.ndarray, x):
    """``array`` as the type of ``x`` (numpy, tensor on x's device, MetaTensor with x's meta)."""
    return convert_to_dst_type(array, x, dtype=array.dtype)[0]


def _volumes(a: np.ndarray, who: str) -> list[np.ndarray]:
    if a.ndim == 3:
        return [a]
    if a.ndim == 4:
        return list(a)
    raise SlabError(f"{who}: expected a (L, X, Y, Z) or (X, Y, Z) volume, got shape {tuple(a.shape)}")


def _per_volume(x, fn: Callable[[np.ndarray], np.ndarray], who: str):
    """Apply ``fn`` (3D numpy in, 3D numpy out) to each label of ``x``; ``x``'s type and meta out."""
    a = _numpy(x)
    results = [fn(v) for v in _volumes(a, who)]
    out = results[0] if a.ndim == 3 else np.stack(results)
    return _like(out, x)


def _check_no_nan(a: np.ndarray, who: str) -> None:
    # A min is one pass with no temporary, and NaN propagates through it.
    if a.dtype.kind == "f" and a.size and np.isnan(np.min(a)):
        raise SlabError(f"{who}: the input contains NaN; expected finite probabilities")


def check_binary(x, who: str) -> np.ndarray:
    """``x`` as a numpy bool array, or SlabError unless every value is 0 or 1 (or bool); an
    integer mask stored as 0/255 (slice stacks, SenNet's label TIFFs) is binary too.

    Parameters
    ----------
    x : numpy array, tensor or MetaTensor
    who : the argument or file named in the error message.
    """
    a = _numpy(x)
    if a.dtype == np.bool_:
        return a
    if a.dtype.kind not in "uif":
        raise SlabError(f"{who}: expected a binary mask (0/1), got dtype {a.dtype}")
    if a.size == 0:
        return a.astype(bool)
    low, high = np.min(a), np.max(a)
    if low >= 0 and high <= 1 and (a.dtype.kind != "f" or np.all((a == 0) | (a == 1))):
        return a.view(np.bool_) if a.dtype.itemsize == 1 else a != 0
    if a.dtype.kind in "ui" and low >= 0 and high == 255 and np.all((a == 0) | (a == 1) | (a == 255)):
        return a != 0
    raise SlabError(f"{who}: expected a binary mask (values 0/1 or 0/255), got values in [{low}, {high}]; "
                    "threshold it first")


def _round_down(dtype: np.dtype, threshold: float):
    """The largest value of float ``dtype`` that is <= ``threshold``: for ``x`` of that dtype,
    ``x > t`` exactly when ``x > threshold`` as real numbers."""
    rounded = dtype.type(threshold)
    if float(rounded) > threshold:
        rounded = np.nextafter(rounded, dtype.type(-np.inf))
    return rounded


def greater_than(x: np.ndarray, threshold: float) -> np.ndarray:
    """``x > threshold`` compared as real numbers, computed in ``x``'s dtype (no float64 copy).

    NumPy would compare a float32 array with a Python float in float32, rounding
    ``threshold``; with the threshold rounded *down* to the array's precision the comparison
    is exact, which is what ``skimage`` gets from its float64 thresholds. Integer and bool
    arrays compare against the threshold's floor, clipped to the dtype's range.

    Parameters
    ----------
    x : numpy array (float, integer or bool)
    threshold : float

    Returns
    -------
    bool array of ``x``'s shape

    Example
    -------
    >>> greater_than(np.array([0.1, 0.2, 0.3], np.float32), 0.2).tolist()  # float32(0.2) > 0.2
    [False, True, True]
    """
    if x.dtype.kind == "f":
        return x > _round_down(x.dtype, threshold)
    if x.dtype == np.bool_:
        x = x.view(np.uint8)
    info = np.iinfo(x.dtype)
    if threshold < info.min:
        return np.ones(x.shape, bool)
    if threshold >= info.max:
        return np.zeros(x.shape, bool)
    return x > x.dtype.type(math.floor(threshold))


# ---------------------------------------------------------------------------------------------
# Kernels on one 3D numpy volume


def _exact_threshold(x: np.ndarray, threshold: float) -> tuple[np.ndarray, float]:
    """``(values, t)`` such that ``values > t`` in ``values``' float precision is exactly
    :func:`greater_than` ``(x, threshold)``: floats keep their dtype and ``t`` is rounded down
    to it; integers and bools become float32 (up to 16 bits) or float64 (exact to 2**53) and
    ``t`` is the threshold's floor, clipped to the dtype's range (64-bit integers are not
    handled: float64 would round them)."""
    if x.dtype.kind == "f" and x.dtype.itemsize in (4, 8):
        if not x.dtype.isnative:  # a big-endian volume from a file
            x = x.astype(x.dtype.newbyteorder("="))
        return x, float(_round_down(x.dtype, threshold))
    if x.dtype.kind == "f":  # float16: float32 holds every value and the threshold exactly
        return _exact_threshold(x.astype(np.float32), threshold)
    if x.dtype == np.bool_:
        x = x.view(np.uint8)
    info = np.iinfo(x.dtype)
    t = float(min(max(math.floor(threshold), info.min - 1), info.max))
    return x.astype(np.float32 if x.dtype.itemsize <= 2 else np.float64), t


def seeded_fill(x: np.ndarray, low: float, high: float, connectivity: int) -> np.ndarray:
    """Hysteresis by seeded flood fill in compiled code: the voxels ``> low`` connected to a
    voxel ``> high``, as uint8. Two sequential passes over the rows of the one-byte state and a
    scanline fill of the paths that turn back (``transforms/_fill.c``; no labelling of every
    component), memory the output and a stack of spans (plus a float copy of an integer
    volume), and the GIL is released.
    A Fortran-ordered volume is filled transposed (connectivity is symmetric), not copied."""
    flip = x.flags.f_contiguous and not x.flags.c_contiguous
    if flip:
        x = x.T
    x = np.ascontiguousarray(x)
    values, t_high = _exact_threshold(x, high)
    state = greater_than(x, low).view(np.uint8)  # 1: fillable; the fill marks what it reaches 2
    if state.size:
        _compiled_fill.fill(values, state, t_high, connectivity)
    np.right_shift(state, 1, out=state)
    return state.T if flip else state


def _filter_components(mask: np.ndarray, connectivity: int, keep: Callable[[np.ndarray], np.ndarray],
                       count_in: np.ndarray | None = None) -> np.ndarray:
    """The connected components of ``mask`` that ``keep`` selects, as uint8.

    ``keep(counts)`` returns one bool per label (index 0, the background, is ignored), where
    ``counts[l]`` is the number of voxels of component ``l``, or of its voxels inside
    ``count_in`` when given. Labels number components in memory scan order (C order for a
    C-ordered mask, as ``scipy.ndimage.label``). After labelling, the volume is walked in chunks
    (bounded temporaries); sparse chunks visit their foreground voxels only.
    """
    flip = mask.flags.f_contiguous and not mask.flags.c_contiguous
    if flip:  # a Fortran-ordered volume is C-ordered when transposed; connectivity is symmetric
        mask = mask.T
        count_in = None if count_in is None else count_in.T
    mask = np.ascontiguousarray(mask)
    count_in = None if count_in is None else np.ascontiguousarray(count_in)
    labels, n = cc3d.connected_components(mask, connectivity=cc3d_connectivity(mask.shape, connectivity),
                                          return_N=True, binary_image=True)
    out = np.zeros(mask.shape, np.uint8)
    if n:
        step = max(1, _CHUNK_VOXELS // max(1, mask[0].size))
        chunks = [slice(start, start + step) for start in range(0, mask.shape[0], step)]
        counted = mask if count_in is None else count_in
        counts = np.zeros(n + 1, np.int64)
        for chunk in chunks:  # voxels outside the mask have label 0, which is never kept
            counts += np.bincount(labels[chunk][counted[chunk]], minlength=n + 1)
        selected = np.asarray(keep(counts), dtype=bool)
        selected[0] = False
        for chunk in chunks:
            inside = mask[chunk]
            if 4 * np.count_nonzero(inside) > inside.size:  # dense: look every voxel up
                np.take(selected.view(np.uint8), labels[chunk], out=out[chunk], mode="clip")
            else:  # sparse: look up the foreground only
                index = np.flatnonzero(inside)
                out[chunk].ravel()[index[selected[labels[chunk].ravel()[index]]]] = 1
    return out.T if flip else out


def _largest(sizes: np.ndarray, k: int) -> np.ndarray:
    """Select the ``k`` largest labels (index 0 excluded); equal sizes go to the lower label."""
    selected = np.zeros(sizes.shape, bool)
    selected[np.argsort(-sizes[1:], kind="stable")[:k] + 1] = True
    return selected


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill background regions (face-connected, as scipy's default) that do not touch the border."""
    background, n = cc3d.connected_components(~mask, connectivity=4 if mask.ndim == 2 else 6, return_N=True)
    inside = np.ones(n + 1, bool)
    for axis in range(mask.ndim):
        for end in (0, -1):
            inside[np.take(background, end, axis=axis)] = False
    inside[0] = True  # label 0 is the foreground itself
    return np.take(inside, background).view(np.uint8)


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
        self.threshold = _check_values("threshold", threshold)

    def __call__(self, x):
        a = _numpy(x)
        _check_no_nan(a, "Threshold")
        if not isinstance(self.threshold, tuple):
            return _like(greater_than(a, self.threshold).view(np.uint8), x)
        volumes = _volumes(a, "Threshold")
        out = np.empty(a.shape, np.uint8)
        channels = [out] if a.ndim == 3 else list(out)
        for v, t, dest in zip(volumes, _per_channel("threshold", self.threshold, len(volumes)), channels):
            dest[...] = greater_than(v, t)
        return _like(out, x)


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
        self.low, self.high = _check_values("low", low), _check_values("high", high)
        lows, highs = (list(v) if isinstance(v, tuple) else [v] for v in (self.low, self.high))
        n = max(len(lows), len(highs))
        if {len(lows), len(highs)} - {1, n}:
            raise SlabError(f"hysteresis: {len(lows)} low and {len(highs)} high values; expected one pair per channel")
        for c, (lo, hi) in enumerate(zip(lows * (n // len(lows)), highs * (n // len(highs)))):
            if lo > hi:
                where = f" (channel {c})" if n > 1 else ""
                raise SlabError(f"hysteresis: low {lo:g} is above high {hi:g}{where}; expected low <= high")
        self.connectivity = _check_connectivity(connectivity)

    def _fill(self, v: np.ndarray, low: float, high: float) -> np.ndarray:
        if _compiled_fill is not None and (v.dtype.kind in "fb" or v.dtype.kind in "iu" and v.dtype.itemsize <= 4):
            return seeded_fill(v, low, high, self.connectivity)
        return _filter_components(greater_than(v, low), self.connectivity, lambda seeds: seeds > 0,
                                  count_in=greater_than(v, high))

    def __call__(self, x):
        a = _numpy(x)
        _check_no_nan(a, "HysteresisFill")
        volumes = _volumes(a, "HysteresisFill")
        lows = _per_channel("hysteresis", self.low, len(volumes))
        highs = _per_channel("hysteresis", self.high, len(volumes))
        results = [self._fill(v, lo, hi) for v, lo, hi in zip(volumes, lows, highs)]
        return _like(results[0] if a.ndim == 3 else np.stack(results), x)


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
        self.min_size = _check_int("min_size", min_size, 0)
        self.connectivity = _check_connectivity(connectivity)

    def _remove(self, v: np.ndarray) -> np.ndarray:
        mask = check_binary(v, "RemoveSmallComponents")
        if self.min_size <= 1:
            return mask.astype(np.uint8)
        return _filter_components(mask, self.connectivity, lambda sizes: sizes >= self.min_size)

    def __call__(self, x):
        return _per_volume(x, self._remove, "RemoveSmallComponents")


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
        self.k = _check_int("keep_largest", k, 1)
        self.connectivity = _check_connectivity(connectivity)

    def _keep(self, v: np.ndarray) -> np.ndarray:
        mask = check_binary(v, "KeepLargestComponents")
        return _filter_components(mask, self.connectivity, lambda sizes: _largest(sizes, self.k))

    def __call__(self, x):
        return _per_volume(x, self._keep, "KeepLargestComponents")


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
        self.axis = _check_int("axis", axis, 0)
        if self.axis > 2:
            raise SlabError(f"axis: expected a spatial axis 0, 1 or 2, got {axis!r}")

    def _fill(self, v: np.ndarray) -> np.ndarray:
        mask = check_binary(v, "FillHoles")
        if self.mode == "3d":
            return _fill_holes(mask)
        out = np.empty(mask.shape, np.uint8)
        for i in range(mask.shape[self.axis]):
            index = (slice(None),) * self.axis + (i,)
            out[index] = _fill_holes(mask[index])
        return out

    def __call__(self, x):
        return _per_volume(x, self._fill, "FillHoles")


class MaskToROI(Transform):
    """Zero everything outside a region of interest (an organ mask).

    ``__call__(x, roi)``: ``roi`` is a binary mask of ``x``'s spatial shape, with one channel
    (applied to every label) or one per label. When both are MetaTensors their affines must
    agree. ``x`` keeps its dtype.
    """

    def __call__(self, x, roi):
        a, r = _numpy(x), check_binary(roi, "roi")
        if a.shape[-3:] != r.shape[-3:] or r.ndim not in (3, 4) or a.ndim not in (3, 4):
            raise SlabError(f"roi: shape {tuple(r.shape)} does not match the volume's {tuple(a.shape)}")
        labels = a.shape[0] if a.ndim == 4 else 1
        if r.ndim == 4 and r.shape[0] not in (1, labels):
            raise SlabError(f"roi: {r.shape[0]} channels; expected 1 or one per label ({labels})")
        if hasattr(x, "affine") and hasattr(roi, "affine"):
            check_same_geometry(x, roi, names=["volume", "roi"])
        if a.ndim == 3 and r.ndim == 4:
            r = r[0]
        return _like(a * r, x)


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
        self.tolerance = _check_number("tolerance", tolerance)
        if self.tolerance < 0:
            raise SlabError(f"tolerance: expected a number >= 0, got {tolerance!r}")
        self.max_iterations = None if max_iterations is None else _check_int("max_iterations", max_iterations, 1)
        self.connectivity = _check_connectivity(connectivity)
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
        img, s = _numpy(image), check_binary(seed, "seed")
        _check_no_nan(img, "RegionGrow image")
        images, seeds = _volumes(img, "RegionGrow image"), _volumes(s, "RegionGrow seed")
        if images[0].shape != seeds[0].shape:
            raise SlabError(f"seed: spatial shape {seeds[0].shape} does not match the image's {images[0].shape}")
        if len(images) not in (1, len(seeds)):
            raise SlabError(f"image: {len(images)} channels; expected 1 or one per seed label ({len(seeds)})")
        results = [self._grow(images[i if len(images) > 1 else 0], sd) for i, sd in enumerate(seeds)]
        return _like(results[0] if s.ndim == 3 else np.stack(results), seed)


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
        connectivity = _check_connectivity(connectivity)
        if hysteresis is not None:
            low, high = _hysteresis_pairs(hysteresis)
            self.binarise = HysteresisFill(low, high, connectivity=connectivity)
        elif threshold is not None:
            self.binarise = Threshold(threshold)
        else:
            self.binarise = None  # the input must already be a mask
        self.steps = []
        if _check_int("min_size", min_size, 0):
            self.steps.append(RemoveSmallComponents(min_size, connectivity))
        if keep_largest is not None:
            self.steps.append(KeepLargestComponents(keep_largest, connectivity))
        if fill_holes is not None:
            self.steps.append(FillHoles(fill_holes))

    def __call__(self, x, roi=None):
        a = _numpy(x if roi is None else MaskToROI()(x, roi))
        a = check_binary(a, "input").view(np.uint8) if self.binarise is None else self.binarise(a)
        for step in self.steps:
            a = step(a)
        return _like(a, x)


class PerLabelPostprocess(Transform):
    """A :class:`Postprocess` per label channel (e.g. chosen by cross-validation, label by label):
    channel ``i`` of ``(L, X, Y, Z)`` goes through ``Postprocess(**labels[i])``."""

    def __init__(self, labels: Sequence[Mapping]):
        if not _is_sequence(labels) or not labels or not all(isinstance(o, Mapping) for o in labels):
            raise SlabError(f"postprocess labels: expected one object of settings per label, got {labels!r}")
        self.chains = [Postprocess(**dict(o)) for o in labels]

    def __call__(self, x, roi=None):
        a = _numpy(x)
        if a.ndim != 4 or a.shape[0] != len(self.chains):
            raise SlabError(f"input: expected {len(self.chains)} label channel(s) (L, X, Y, Z), got shape {a.shape}")
        out = np.concatenate([np.asarray(chain(a[i:i + 1], None if roi is None else roi))
                              for i, chain in enumerate(self.chains)])
        return _like(out, x)


class ArgmaxPostprocess(Transform):
    """Exclusive classes: each voxel to its most probable class (:func:`argmax_masks`), then the
    ``inner`` chain (components, holes: :class:`Postprocess` or :class:`PerLabelPostprocess`
    with no threshold) on the masks. No voxel is ever in two labels."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, x, roi=None):
        masks = argmax_masks(x if roi is None else MaskToROI()(x, roi))
        return _like(np.asarray(self.inner(masks)), x)


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
            if not _is_sequence(options["labels"]) or not all(isinstance(o, Mapping) for o in options["labels"]):
                raise SlabError(f"postprocess labels: expected one object of settings per label, "
                                f"got {options['labels']!r}")
            chain = PerLabelPostprocess([{**default, **o} for o in options["labels"]])
        else:
            chain = Postprocess(**{**default, **options})
    except TypeError as err:
        raise SlabError(f"postprocess: {err}".replace("__init__() ", "")) from None
    return ArgmaxPostprocess(chain) if argmax else chain


def argmax_masks(prob) -> np.ndarray:
    """One-hot ``(L, X, Y, Z)`` uint8 masks of exclusive classes from their probabilities
    ``(L, X, Y, Z)`` (the background's is what is left, ``1 - sum``): each voxel goes to the most
    probable of background and labels (background wins a tie), so no voxel is in two labels.

    Example
    -------
    >>> p = np.array([[0.6, 0.3, 0.2], [0.3, 0.4, 0.2]], np.float32).reshape(2, 3, 1, 1)
    >>> argmax_masks(p)[:, :, 0, 0].tolist()  # background 0.1, 0.3, 0.6
    [[1, 0, 0], [0, 1, 0]]
    """
    a = _numpy(prob)
    if a.ndim != 4:
        raise SlabError(f"input: expected (L, X, Y, Z) class probabilities, got shape {a.shape}")
    _check_no_nan(a, "input")
    out = np.zeros(a.shape, np.uint8)
    step = max(1, (1 << 24) // max(1, int(np.prod(a.shape[:3]))))
    for z in range(0, a.shape[3], step):  # a slab of slices at a time: no float copy of the volume
        part = np.asarray(a[..., z:z + step], dtype=np.float32)
        scores = np.concatenate([1.0 - part.sum(axis=0, keepdims=True), part])
        winner = scores.argmax(axis=0)
        for c in range(a.shape[0]):
            out[c, ..., z:z + step] = winner == c + 1
    return out


def _is_sequence(value) -> bool:
    return isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, (str, bytes))


def _hysteresis_pairs(hysteresis) -> tuple:
    """``(low, high)`` of one pair of numbers, or ``(lows, highs)`` of a sequence of pairs."""
    items = list(hysteresis) if _is_sequence(hysteresis) else []
    if items and not any(_is_sequence(v) for v in items) and len(items) == 2:
        return items[0], items[1]
    if not items or not all(_is_sequence(p) and len(p) == 2 for p in items):
        raise SlabError(f"hysteresis: expected (low, high) or one (low, high) pair per label channel, "
                        f"got {hysteresis!r}")
    return tuple(p[0] for p in items), tuple(p[1] for p in items)


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


def organ_mask_from_image(image, *, downsample: int = 4, sigma: float = 2.0, percentile: float | None = None,
                          closing: int = 2):
    """A coarse organ mask from the image: the bright organ against a dark background.

    Steps, on the image subsampled by ``downsample`` (channels averaged): Gaussian smoothing
    (``sigma`` in subsampled voxels), threshold at Otsu's level (or at ``percentile`` of the
    smoothed values), largest 26-connected component, closing by a ball of radius ``closing``,
    3D hole filling; then nearest-neighbour upsampling to the full grid. Made for SenNet kidney
    stacks, where the kidney sits in darker embedding medium.

    Parameters
    ----------
    image : (C, X, Y, Z) or (X, Y, Z) array, tensor or MetaTensor
    downsample : int >= 1
    sigma : float >= 0
    percentile : float in [0, 100], optional
    closing : int >= 0

    Returns
    -------
    uint8 mask, ``(1, X, Y, Z)`` (or ``(X, Y, Z)``), of ``image``'s type and meta.
    """
    downsample = _check_int("downsample", downsample, 1)
    closing = _check_int("closing", closing, 0)
    sigma = _check_number("sigma", sigma)
    if sigma < 0:
        raise SlabError(f"sigma: expected a number >= 0, got {sigma!r}")
    if percentile is not None and not 0 <= _check_number("percentile", percentile) <= 100:
        raise SlabError(f"percentile: expected a number in [0, 100], got {percentile!r}")
    a = _numpy(image)
    _check_no_nan(a, "image")
    channels = _volumes(a, "organ_mask_from_image")
    small = np.mean([c[::downsample, ::downsample, ::downsample] for c in channels], axis=0, dtype=np.float32)
    small = ndi.gaussian_filter(small, sigma) if sigma else small
    level = threshold_otsu(small) if percentile is None else np.percentile(small, percentile)
    mask = _filter_components(small > level, 26, lambda sizes: _largest(sizes, 1)).view(bool)
    if closing:
        # Padded, so that the erosion half of the closing does not eat the organ at the border.
        mask = ndi.binary_closing(np.pad(mask, closing), ball(closing))[(slice(closing, -closing),) * 3]
    mask = _fill_holes(mask)
    # Each voxel takes the nearest subsampled voxel (sample i sits at i * downsample).
    nearest = [np.minimum((np.arange(n) + downsample // 2) // downsample, m - 1)
               for n, m in zip(channels[0].shape, mask.shape)]
    out = mask[np.ix_(*nearest)]
    return _like(out if a.ndim == 3 else out[None], image)


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
