"""Post-processing as functions on one volume: the checks and conversions every transform uses,
the kernels on a 3D numpy volume (thresholds, the seeded flood fill, components, holes), argmax
masks of exclusive classes, and a coarse organ mask from the image."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import cc3d
import numpy as np
from monai.utils import convert_data_type, convert_to_dst_type
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu
from skimage.morphology import ball

from slab.core.checks import CONNECTIVITIES, cc3d_connectivity
from slab.core.errors import SlabError

try:  # the compiled flood fill (setup.py builds it); without it, hysteresis labels with cc3d
    from slab.transforms import _fill as _compiled_fill
except ImportError:  # pragma: no cover - an install without a C compiler
    _compiled_fill = None


# Voxels per chunk when walking a labelled volume: temporaries stay small and in cache.
_CHUNK_VOXELS = 1 << 20


# ---------------------------------------------------------------------------------------------
# Checks and conversions


def check_connectivity(connectivity) -> int:
    if connectivity not in CONNECTIVITIES or isinstance(connectivity, bool):
        raise SlabError(f"connectivity: expected 6, 18 or 26, got {connectivity!r}")
    return int(connectivity)


def check_number(name: str, value) -> float:
    number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not number or not math.isfinite(value):
        raise SlabError(f"{name}: expected a finite number, got {value!r}")
    return float(value)


def check_values(name: str, value) -> float | tuple[float, ...]:
    """A finite number, or a non-empty sequence of them (one per label channel) as a tuple."""
    if is_sequence(value):
        values = tuple(value.ravel().tolist()) if isinstance(value, np.ndarray) else tuple(value)
        if not values:
            raise SlabError(f"{name}: expected a number or one number per label channel, got {value!r}")
        return tuple(check_number(name, v) for v in values)
    return check_number(name, value)


def per_channel(name: str, value, labels: int) -> list[float]:
    """``value`` (a number or one per channel) as one number per label channel, the length checked."""
    if not isinstance(value, tuple):
        return [value] * labels
    if len(value) != labels:
        raise SlabError(f"{name}: {len(value)} values for {labels} label channel{'s' * (labels != 1)}; "
                        "expected one number or one per channel")
    return list(value)


def check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise SlabError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def as_numpy(x) -> np.ndarray:
    return convert_data_type(x, np.ndarray)[0]


def like_input(array: np.ndarray, x):
    """``array`` as the type of ``x`` (numpy, tensor on x's device, MetaTensor with x's meta)."""
    return convert_to_dst_type(array, x, dtype=array.dtype)[0]


def label_volumes(a: np.ndarray, who: str) -> list[np.ndarray]:
    if a.ndim == 3:
        return [a]
    if a.ndim == 4:
        return list(a)
    raise SlabError(f"{who}: expected a (L, X, Y, Z) or (X, Y, Z) volume, got shape {tuple(a.shape)}")


def per_volume(x, fn: Callable[[np.ndarray], np.ndarray], who: str):
    """Apply ``fn`` (3D numpy in, 3D numpy out) to each label of ``x``; ``x``'s type and meta out."""
    a = as_numpy(x)
    results = [fn(v) for v in label_volumes(a, who)]
    out = results[0] if a.ndim == 3 else np.stack(results)
    return like_input(out, x)


def check_no_nan(a: np.ndarray, who: str) -> None:
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
    a = as_numpy(x)
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
    scanline fill of the paths that turn back (``slab/transforms/_fill.c``; no labelling of every
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


def hysteresis_fill(v: np.ndarray, low: float, high: float, connectivity: int) -> np.ndarray:
    """Voxels above ``low`` connected to a voxel above ``high``, of one 3D volume: the compiled
    seeded fill where it is built and takes the dtype, else cc3d labelling (the same mask)."""
    if _compiled_fill is not None and (v.dtype.kind in "fb" or v.dtype.kind in "iu" and v.dtype.itemsize <= 4):
        return seeded_fill(v, low, high, connectivity)
    return filter_components(greater_than(v, low), connectivity, lambda seeds: seeds > 0,
                              count_in=greater_than(v, high))


def filter_components(mask: np.ndarray, connectivity: int, keep: Callable[[np.ndarray], np.ndarray],
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


def largest_labels(sizes: np.ndarray, k: int) -> np.ndarray:
    """Select the ``k`` largest labels (index 0 excluded); equal sizes go to the lower label."""
    selected = np.zeros(sizes.shape, bool)
    selected[np.argsort(-sizes[1:], kind="stable")[:k] + 1] = True
    return selected


def fill_enclosed(mask: np.ndarray) -> np.ndarray:
    """Fill background regions (face-connected, as scipy's default) that do not touch the border."""
    background, n = cc3d.connected_components(~mask, connectivity=4 if mask.ndim == 2 else 6, return_N=True)
    inside = np.ones(n + 1, bool)
    for axis in range(mask.ndim):
        for end in (0, -1):
            inside[np.take(background, end, axis=axis)] = False
    inside[0] = True  # label 0 is the foreground itself
    return np.take(inside, background).view(np.uint8)


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
    a = as_numpy(prob)
    if a.ndim != 4:
        raise SlabError(f"input: expected (L, X, Y, Z) class probabilities, got shape {a.shape}")
    check_no_nan(a, "input")
    out = np.zeros(a.shape, np.uint8)
    step = max(1, (1 << 24) // max(1, int(np.prod(a.shape[:3]))))
    for z in range(0, a.shape[3], step):  # a slab of slices at a time: no float copy of the volume
        part = np.asarray(a[..., z:z + step], dtype=np.float32)
        scores = np.concatenate([1.0 - part.sum(axis=0, keepdims=True), part])
        winner = scores.argmax(axis=0)
        for c in range(a.shape[0]):
            out[c, ..., z:z + step] = winner == c + 1
    return out


def is_sequence(value) -> bool:
    return isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, (str, bytes))


def hysteresis_pairs(hysteresis) -> tuple:
    """``(low, high)`` of one pair of numbers, or ``(lows, highs)`` of a sequence of pairs."""
    items = list(hysteresis) if is_sequence(hysteresis) else []
    if items and not any(is_sequence(v) for v in items) and len(items) == 2:
        return items[0], items[1]
    if not items or not all(is_sequence(p) and len(p) == 2 for p in items):
        raise SlabError(f"hysteresis: expected (low, high) or one (low, high) pair per label channel, "
                        f"got {hysteresis!r}")
    return tuple(p[0] for p in items), tuple(p[1] for p in items)


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
    downsample = check_int("downsample", downsample, 1)
    closing = check_int("closing", closing, 0)
    sigma = check_number("sigma", sigma)
    if sigma < 0:
        raise SlabError(f"sigma: expected a number >= 0, got {sigma!r}")
    if percentile is not None and not 0 <= check_number("percentile", percentile) <= 100:
        raise SlabError(f"percentile: expected a number in [0, 100], got {percentile!r}")
    a = as_numpy(image)
    check_no_nan(a, "image")
    channels = label_volumes(a, "organ_mask_from_image")
    small = np.mean([c[::downsample, ::downsample, ::downsample] for c in channels], axis=0, dtype=np.float32)
    small = ndi.gaussian_filter(small, sigma) if sigma else small
    level = threshold_otsu(small) if percentile is None else np.percentile(small, percentile)
    mask = filter_components(small > level, 26, lambda sizes: largest_labels(sizes, 1)).view(bool)
    if closing:
        # Padded, so that the erosion half of the closing does not eat the organ at the border.
        mask = ndi.binary_closing(np.pad(mask, closing), ball(closing))[(slice(closing, -closing),) * 3]
    mask = fill_enclosed(mask)
    # Each voxel takes the nearest subsampled voxel (sample i sits at i * downsample).
    nearest = [np.minimum((np.arange(n) + downsample // 2) // downsample, m - 1)
               for n, m in zip(channels[0].shape, mask.shape)]
    out = mask[np.ix_(*nearest)]
    return like_input(out if a.ndim == 3 else out[None], image)


__all__ = ["argmax_masks", "as_numpy", "check_binary", "check_connectivity", "check_int", "check_no_nan", "check_number",
           "check_values", "fill_enclosed", "filter_components", "greater_than", "hysteresis_fill", "hysteresis_pairs",
           "is_sequence", "label_volumes", "largest_labels", "like_input", "organ_mask_from_image", "per_channel",
           "per_volume", "seeded_fill"]
