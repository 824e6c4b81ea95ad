"""File formats: NIfTI, NRRD/MHA/MHD (SimpleITK), DICOM series, slice-stack directories (PNG, TIFF,
JPEG 2000); the chunked containers (zarr / OME-Zarr, HDF5, multi-page TIFF) are in
:mod:`slab.io.chunked`.

Each reader returns a ``(C, X, Y, Z)`` array, its RAS affine and the file's own geometry notes;
each writer takes them back. Every header is checked (:mod:`slab.io.headers`) before a decoder
sees it or memory is allocated, every failure of a decoder on a user's file is one
:class:`SlabError` naming the file, and ITK's own warnings are kept off stderr. The public API is
:mod:`slab.io.volumes`; the helpers here are shared with :mod:`slab.io.lazy`.
"""
from __future__ import annotations

import locale
import math
import os
import re
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from slab.core.checks import SLICE_FORMATS, check_spacing
from slab.core.errors import SlabError, SlabWarning
from slab.io.headers import check_claim, check_memory, check_metaimage, check_nrrd

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
# UW-Madison GI tract scans: slice_<number>_<width>_<height>_<sx>_<sy>.png; slices are 3 mm apart.
UWMGI_SCAN = re.compile(r"^slice_(\d+)_(\d+)_(\d+)_(\d+(?:\.\d*)?)_(\d+(?:\.\d*)?)\.png$")
UWMGI_SLICE_THICKNESS = 3.0
# qform and sform further apart than this (mm, at any corner of the volume) are reported.
_FORMS_TOLERANCE = 1e-3
_LOCALE_LOCK = threading.Lock()

sitk.ProcessObject_SetGlobalWarningDisplay(False)  # slab reports what matters itself


# ---------------------------------------------------------------------------------------------
# Small helpers


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


# ---------------------------------------------------------------------------------------------
# NIfTI


def nifti_dtype(image) -> np.dtype:
    # nibabel moves scl_slope/scl_inter from the image header into its array proxy.
    scaled = (float(image.dataobj.slope), float(image.dataobj.inter)) != (1.0, 0.0)
    # Scaled values come back as float32; torch wants native byte order.
    return np.dtype(np.float32) if scaled else image.get_data_dtype().newbyteorder("=")


def nifti_forms(image) -> dict:
    """The NIfTI header's qform and sform with their codes (kept so that an output written in the
    input's geometry carries both as the input did)."""
    header = image.header
    return {"qform": np.asarray(header.get_qform(), np.float64), "qform_code": int(header["qform_code"]),
            "sform": np.asarray(header.get_sform(), np.float64), "sform_code": int(header["sform_code"])}


_FORMS_WARNED: set[str] = set()  # each file is reported once per process


def _warn_forms(path: Path, image, forms: dict) -> None:
    if not (forms["qform_code"] > 0 and forms["sform_code"] > 0) or str(path) in _FORMS_WARNED:
        return
    apart = corner_distance(forms["qform"], forms["sform"], image.shape[:3])
    if apart > _FORMS_TOLERANCE:
        _FORMS_WARNED.add(str(path))
        warnings.warn(f"{path}: its qform and sform place the volume up to {apart:.2f} mm apart; slab and nibabel "
                      "use the sform, ITK-based viewers (3D Slicer, ITK-SNAP) the qform; NIfTI outputs keep both as "
                      "this file has them, so each viewer shows them where it shows this file", SlabWarning,
                      stacklevel=4)


def open_nifti(path: Path, lazy: bool):
    """nibabel's image for ``path``, its header checked: 3D or 4D, and no more voxels than the
    file can hold (the file size for ``.nii``, 1032 times it for ``.nii.gz``)."""
    try:
        image = nib.load(path, mmap=lazy)
        shape = tuple(int(s) for s in image.shape)
        proxy = image.dataobj
        claimed = math.prod(shape) * proxy.dtype.itemsize
        offset = int(proxy.offset)
        forms = nifti_forms(image)
        _ = image.affine
    except Exception as err:  # noqa: BLE001 - nibabel raises many kinds on a corrupt header
        raise SlabError(f"{path}: not a readable NIfTI file ({one_line(err)})") from None
    if len(shape) < 3:
        raise SlabError(f"{path}: a {len(shape)}D image of shape {shape} where a 3D volume is expected")
    if len(shape) > 4:
        raise SlabError(f"{path}: a {len(shape)}D image; expected (X, Y, Z) or (X, Y, Z, C)")
    if min(shape) < 1:
        raise SlabError(f"{path}: image of shape {shape}; expected at least one voxel per axis")
    size = path.stat().st_size
    if suffix_of(path) == ".nii":
        if size < offset + claimed:
            raise SlabError(f"{path}: truncated NIfTI, {size} bytes where its header needs {offset + claimed}")
    else:
        check_claim(path, claimed, size, "gzip")
    _warn_forms(path, image, forms)
    return image


def read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    image = open_nifti(path, lazy=False)
    proxy = image.dataobj
    dtype = nifti_dtype(image)
    voxels = math.prod(image.shape)
    check_memory(voxels * (proxy.dtype.itemsize + (dtype.itemsize if dtype != proxy.dtype else 0)), str(path))
    try:
        data = np.asarray(proxy.get_unscaled())
        if dtype != proxy.dtype:  # scaled in float32, as nibabel would, without a float64 copy
            data = data.astype(np.float32)
            data *= np.float32(proxy.slope)
            data += np.float32(proxy.inter)
        else:
            data = data.astype(dtype, copy=False)
    except Exception as err:  # noqa: BLE001 - zlib, EOF, OS errors of a damaged file
        raise SlabError(f"{path}: truncated or corrupt NIfTI ({one_line(err)})") from None
    data = data[np.newaxis] if data.ndim == 3 else np.moveaxis(data, -1, 0)
    return data, image.affine, {"nifti_forms": nifti_forms(image), "declared_spacing": image.header.get_zooms()[:3]}


def write_nifti(array: np.ndarray, affine: np.ndarray, path: Path, forms: dict | None = None) -> None:
    """``forms`` (an input's :func:`nifti_forms`): when its sform is ``affine``, the output gets
    the input's qform and sform with their codes, so every viewer shows it where it shows the input."""
    from slab.core.outputs import atomic_write

    data = array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)
    image = nib.Nifti1Image(data, affine, dtype=data.dtype)
    if forms is not None and np.allclose(forms["sform"], affine, atol=1e-6) and forms["sform_code"] > 0:
        image.set_sform(forms["sform"], code=forms["sform_code"])
        image.set_qform(forms["qform"], code=forms["qform_code"])
    else:
        image.set_sform(affine, code=1)
        image.set_qform(affine, code=1)
    image.header.set_xyzt_units("mm")
    with atomic_write(path) as tmp:
        nib.save(image, tmp)


# ---------------------------------------------------------------------------------------------
# SimpleITK formats (LPS on disk)


def itk_affine(image: sitk.Image) -> np.ndarray:
    lps = np.eye(4)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=np.float64)
    lps[:3, 3] = image.GetOrigin()
    return LPS_TO_RAS @ lps


def itk_volume(image: sitk.Image, path: Path) -> tuple[np.ndarray, np.ndarray]:
    if image.GetDimension() != 3:
        raise SlabError(
            f"{path}: a {image.GetDimension()}D image of size {image.GetSize()} where a 3D volume is expected"
        )
    array = sitk.GetArrayFromImage(image)  # (Z, Y, X) or (Z, Y, X, C)
    data = array.transpose(2, 1, 0)[np.newaxis] if array.ndim == 3 else array.transpose(3, 2, 1, 0)
    return data, itk_affine(image)


def check_itk_header(path: Path) -> dict:
    """The MetaImage or NRRD header validated (:mod:`slab.io.headers`) before ITK parses it."""
    return check_nrrd(path) if suffix_of(path) in (".nrrd", ".nhdr") else check_metaimage(path)


def read_itk(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    header = check_itk_header(path)
    check_memory(2 * header["claimed"], str(path))  # ITK's buffer and the array made from it
    try:
        with native():
            image = sitk.ReadImage(str(path))
    except Exception as err:  # noqa: BLE001 - ITK raises RuntimeError, and others on odd headers
        raise SlabError(f"{path}: not a readable {suffix_of(path)} image ({one_line(err)})") from None
    data, affine = itk_volume(image, path)
    return data, affine, {"declared_spacing": image.GetSpacing()}


def write_itk(array: np.ndarray, affine: np.ndarray, path: Path, fields: dict | None = None) -> None:
    """``array`` (C, X, Y, Z) in RAS ``affine`` as an ITK file (LPS, compressed); ``fields``
    become NRRD key/value pairs (``key:=value``), e.g. a ``.seg.nrrd``'s segment metadata."""
    from slab.core.outputs import atomic_write

    if is_sheared(affine):
        raise SlabError(f"{path}: the volume's affine is sheared (its axes are not orthogonal), which NRRD/MHA "
                        "cannot store (ITK would move it); write NIfTI instead")
    if array.shape[0] == 1:
        image = sitk.GetImageFromArray(array[0].transpose(2, 1, 0))
    else:
        image = sitk.GetImageFromArray(array.transpose(3, 2, 1, 0), isVector=True)
    lps = LPS_TO_RAS @ affine
    spacing = np.asarray(spacing_of(lps))
    image.SetSpacing(spacing.tolist())
    image.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    for key, value in (fields or {}).items():
        image.SetMetaData(key, value)
    with atomic_write(path) as tmp:
        try:
            with native():
                sitk.WriteImage(image, str(tmp), True)  # compressed, as .nii.gz is
        except RuntimeError as err:
            raise SlabError(f"{path}: cannot write {array.dtype} as {suffix_of(path)} ({one_line(err)})") from None
        if array.shape[0] > 1 and fields and "Segmentation_MasterRepresentation" in fields:
            _layers_kind(tmp)


def _layers_kind(nrrd: Path) -> None:
    """A segmentation's layers as 3D Slicer writes and reads them: the first axis of kind
    ``list`` (ITK writes ``vector``, which Slicer's reader refuses)."""
    data = nrrd.read_bytes()
    end = data.index(b"\n\n")  # the header ends at the first blank line; the data follows
    header = data[:end].replace(b"\nkinds: vector domain domain domain", b"\nkinds: list domain domain domain", 1)
    nrrd.write_bytes(header + data[end:])


# ---------------------------------------------------------------------------------------------
# Directories


def directory_kind(directory: Path) -> tuple[str, list[Path]]:
    """``("stack", slice files in natural order)`` or ``("dicom", [])``."""
    entries = [p for p in directory.iterdir() if not p.name.startswith(".")]
    files = [p for p in entries if p.is_file()]
    slices = [p for p in files if suffix_of(p) in SLICE_SUFFIXES]
    if not files:
        folders = sorted(p.name for p in entries if p.is_dir())
        if folders:
            shown = ", ".join(folders[:4]) + (", ..." if len(folders) > 4 else "")
            raise SlabError(f"{directory}: holds only sub-folders ({shown}), no slices; give the folder of slices "
                            "itself (e.g. its images/)")
        raise SlabError(f"{directory}: empty directory; expected {EXPECTED}")
    if not slices:
        with native():
            try:
                series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(directory))
            except RuntimeError:
                series = ()
        if series:
            return "dicom", []
        raise SlabError(f"{directory}: no .png/.tif/.jp2 slices and no DICOM series found")
    others = sorted(set(files) - set(slices), key=lambda p: natural_key(p.name))
    if others:
        raise SlabError(f"{others[0]}: not a .png/.tif/.jp2 slice; a slice directory holds only slices")
    families = sorted({SLICE_FAMILY[suffix_of(p)] for p in slices})
    if len(families) > 1:
        raise SlabError(f"{directory}: mixes {' and '.join(families)} slices; expected one format")
    return "stack", sorted(slices, key=lambda p: natural_key(p.name))


def stack_spacing(files: Sequence[Path]) -> tuple[float, float, float] | None:
    """The voxel size that slice file names carry: UW-Madison scans
    (``slice_XXXX_W_H_SX_SY.png``, 3 mm slices); None for names without one."""
    found = {UWMGI_SCAN.match(Path(f).name) for f in files}
    if None in found or not found:
        return None
    spacings = {(float(m[4]), float(m[5])) for m in found}
    if len(spacings) != 1:
        return None
    sx, sy = spacings.pop()
    return (sx, sy, UWMGI_SLICE_THICKNESS) if sx > 0 and sy > 0 else None


def write_stack(array: np.ndarray, path: Path, slice_format: str, workers: int | None) -> None:
    import imagecodecs
    import tifffile

    from slab.core.outputs import atomic_write

    if slice_format not in SLICE_FORMATS:
        raise SlabError(f"slice_format: expected one of {', '.join(SLICE_FORMATS)}, got {slice_format!r}")
    if array.shape[0] != 1:
        raise SlabError(f"{path}: a slice stack holds one channel; the volume has {array.shape[0]}")
    if slice_format == "png" and array.dtype not in PNG_DTYPES:
        raise SlabError(f"{path}: PNG holds uint8 or uint16 slices, the volume is {array.dtype}; write TIFF")
    if slice_format == "jp2" and array.dtype not in JP2_DTYPES:
        raise SlabError(f"{path}: JPEG 2000 holds 8- and 16-bit integer slices, the volume is {array.dtype}; "
                        "write TIFF")
    check_stack_target(path)
    volume, depth = array[0], array.shape[3]
    width = max(4, len(str(depth - 1)))
    with atomic_write(path) as tmp:
        tmp.mkdir()

        def write(z: int) -> None:
            image = np.ascontiguousarray(volume[:, :, z].T)
            target = tmp / f"{z:0{width}d}.{slice_format}"
            if slice_format == "png":
                target.write_bytes(imagecodecs.png_encode(image))
            elif slice_format == "jp2":
                target.write_bytes(imagecodecs.jpeg2k_encode(image, level=0))  # lossless (reversible 5/3)
            else:
                tifffile.imwrite(target, image, photometric="minisblack", metadata=None)

        run_parallel(write, range(depth), workers)


def check_stack_target(path: Path) -> None:
    """A slice stack replaces a directory only when it holds slices alone."""
    if path.is_dir():
        strays = sorted(p.name for p in path.iterdir() if suffix_of(p) not in SLICE_SUFFIXES)
        if strays:
            raise SlabError(f"{path}: exists and holds files other than slices ({strays[0]}); not replacing it")
    elif path.exists():
        raise SlabError(f"{path}: exists and is a file; a slice stack is written to a directory")
