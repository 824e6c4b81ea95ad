"""What the format families share: the suffixes, the geometry helpers (voxel size from an
affine, shear), natural sort order, threads that decode slices, and ``native()`` around every
ITK/GDCM call (the process locale kept, their messages off stderr)."""
from __future__ import annotations

import locale
import os
import re
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from slab.core.checks import check_spacing

NIFTI_SUFFIXES = (".nii", ".nii.gz")


ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")


SLICE_SUFFIXES = (".png", ".tif", ".tiff", ".jp2", ".j2k")


# One slice format per stack: these suffixes are one format.
SLICE_FAMILY = {".png": "png", ".tif": "tif", ".tiff": "tif", ".jp2": "jp2", ".j2k": "jp2"}


ZARR_SUFFIXES = (".zarr",)  # a directory


HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")


TIFF_SUFFIXES = (".tif", ".tiff")  # one page is a slice of a stack, several a volume


VOLUME_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES + HDF5_SUFFIXES  # files that are always volumes


N5_SUFFIXES = (".n5",)  # a directory


STEM_SUFFIXES = VOLUME_SUFFIXES + ZARR_SUFFIXES + N5_SUFFIXES + TIFF_SUFFIXES  # what a case name drops


PNG_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16))


JP2_DTYPES = PNG_DTYPES + (np.dtype(np.int8), np.dtype(np.int16))


LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # its own inverse


EXPECTED = ("a .nii/.nii.gz, .nrrd/.nhdr, .mha/.mhd, multi-page .tif or .h5 file, a .zarr store (OME-Zarr) or .n5 container, a DICOM "
            "directory or a directory of .png/.tif/.jp2 slices")


_LOCALE_LOCK = threading.Lock()


sitk.ProcessObject_SetGlobalWarningDisplay(False)  # slab reports what matters itself


def natural_key(name: str) -> list:
    """Sort key that orders digit runs by value: ``slice_2`` before ``slice_10``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def suffix_of(path: Path) -> str:
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(path).suffix.lower()


def one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (lines[-1] if lines else type(err).__name__)[:200]


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_parallel(fn: Callable[[int], None], items: Iterable[int], workers: int | None) -> None:
    """Call ``fn`` on every item in threads; the first failure (lowest item) is raised."""
    items = list(items)
    workers = workers or default_workers()
    if workers == 1 or len(items) <= 1:
        for item in items:
            fn(item)
        return
    with ThreadPoolExecutor(min(workers, len(items))) as pool:
        futures = [pool.submit(fn, item) for item in items]
        try:
            for future in futures:
                future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def spacing_of(affine: np.ndarray, declared: Sequence[float] | None = None) -> tuple[float, float, float]:
    """The voxel size of ``affine``: the lengths of its axes, or the size the file ``declared``
    (a NIfTI's pixdim, ITK's spacing) where those agree to float32 precision. The lengths of a
    rotated float32 affine's columns carry rounding (0.5000000035 for 0.5), which would move
    distances that are exactly a tolerance out of it."""
    lengths = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    if declared is not None and len(declared) >= 3:
        exact = np.asarray([float(s) for s in declared[:3]])
        if np.all(np.isfinite(exact)) and np.allclose(exact, lengths, rtol=1e-6, atol=0):
            return tuple(float(s) for s in exact)
    return tuple(float(s) for s in lengths)


def with_spacing(affine: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """The same orientation and origin with voxel size ``spacing``."""
    spacing = np.asarray(check_spacing(spacing))
    out = np.array(affine, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):  # a degenerate affine stays degenerate (NaN)
        out[:3, :3] = out[:3, :3] / np.asarray(spacing_of(affine)) * spacing
    return out


@contextmanager
def keep_locale() -> Iterator[None]:
    """Restore the process locale (every category) after the block, however it ends.

    GDCM, SimpleITK's DICOM library, switches the whole process to the ASCII ``"C"`` locale
    (seen on writing a series with SimpleITK 2.5), after which Python's default text encoding
    is ASCII. Every GDCM call goes through this guard; blocks are serialised so that threads
    cannot save one another's switched locale.

    Example
    -------
    >>> with keep_locale():
    ...     pass
    """
    with _LOCALE_LOCK:
        saved = locale.setlocale(locale.LC_ALL)
        try:
            yield
        finally:
            locale.setlocale(locale.LC_ALL, saved)


# Whether ITK's and GDCM's own messages reach stderr (``slab --verbose`` sets it).
SHOW_NATIVE_MESSAGES = False


@contextmanager
def native() -> Iterator[None]:
    """Around every ITK / GDCM call: the locale restored afterwards (:func:`keep_locale`) and the
    libraries' own stderr messages (MetaIO's, GDCM's), which slab reports in its own words, kept
    off the terminal unless :data:`SHOW_NATIVE_MESSAGES`."""
    with keep_locale():
        if SHOW_NATIVE_MESSAGES:
            yield
            return
        sys.stderr.flush()
        saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(devnull)


def corner_distance(a: np.ndarray, b: np.ndarray, shape: Sequence[int]) -> float:
    """The largest distance (mm) between where two affines put the corners of a volume."""
    corners = np.array([[i * (n - 1) for i, n in zip(bits, shape)] + [1]
                        for bits in np.ndindex(2, 2, 2)], dtype=np.float64).T
    return float(np.max(np.linalg.norm((np.asarray(a) @ corners - np.asarray(b) @ corners)[:3], axis=0)))


def is_sheared(affine: np.ndarray, atol: float = 1e-6) -> bool:
    """Whether the affine's axes are not orthogonal (a shear, which ITK cannot store)."""
    axes = np.asarray(affine, dtype=np.float64)[:3, :3]
    unit = axes / np.linalg.norm(axes, axis=0)
    return not np.allclose(unit.T @ unit, np.eye(3), atol=atol)


__all__ = ["NIFTI_SUFFIXES", "ITK_SUFFIXES", "SLICE_SUFFIXES", "SLICE_FAMILY", "ZARR_SUFFIXES", "HDF5_SUFFIXES",
           "TIFF_SUFFIXES", "VOLUME_SUFFIXES", "N5_SUFFIXES", "STEM_SUFFIXES", "PNG_DTYPES", "JP2_DTYPES", "LPS_TO_RAS",
           "EXPECTED", "natural_key", "suffix_of", "one_line", "default_workers", "run_parallel", "spacing_of",
           "with_spacing", "keep_locale", "SHOW_NATIVE_MESSAGES", "native", "corner_distance", "is_sheared"]
