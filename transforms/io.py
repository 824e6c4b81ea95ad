"""Volume I/O: NIfTI, NRRD/MHA/MHD, DICOM series and 2D slice stacks to and from MetaTensors.

A loaded volume is a MONAI ``MetaTensor`` of shape ``(C, X, Y, Z)`` in the file's own dtype
(no upcasting), with ``.affine`` the voxel-to-world matrix in RAS and ``meta["spacing"]`` the
voxel size ``(sx, sy, sz)`` in mm. SimpleITK formats (NRRD, MHA, MHD, DICOM) are LPS on disk
and are flipped to RAS on read and back on write. A slice image ``img[row, col]`` is
``vol[0, :, :, z] = img.T``; a slice stack has no geometry, so it gets ``diag(sx, sy, sz, 1)``
(spacing 1 unless given). Loaded arrays keep x fastest in memory, as on disk, so nothing is
copied to reorder axes: a slice stack is decoded straight into one preallocated buffer.

Every file is written through :func:`atomic_write`; bad input raises a one-line
:class:`~transforms.errors.SlabError` that names the file.
"""
from __future__ import annotations

import locale
import os
import re
import threading
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import imagecodecs
import nibabel as nib
import numpy as np
import SimpleITK as sitk
import tifffile
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from nibabel.filebasedimages import ImageFileError

from transforms.checks import check_spacing
from transforms.errors import SlabError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
SLICE_SUFFIXES = (".png", ".tif", ".tiff")
SLICE_FORMATS = ("tif", "png")
PNG_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16))
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # its own inverse
_EXPECTED = "a .nii/.nii.gz, .nrrd/.nhdr, .mha/.mhd file, a DICOM directory or a directory of .png/.tif slices"
_LOCALE_LOCK = threading.Lock()


# ---------------------------------------------------------------------------------------------
# Small helpers


def natural_key(name: str) -> list:
    """Sort key that orders digit runs by value: ``slice_2`` before ``slice_10``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (lines[-1] if lines else type(err).__name__)[:200]


def _default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _run_parallel(fn: Callable[[int], None], items: Iterable[int], workers: int | None) -> None:
    """Call ``fn`` on every item in threads; the first failure (lowest item) is raised."""
    items = list(items)
    workers = workers or _default_workers()
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


def _spacing(affine: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(s) for s in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))


def _with_spacing(affine: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """The same orientation and origin with voxel size ``spacing``."""
    spacing = np.asarray(check_spacing(spacing))
    out = np.array(affine, dtype=np.float64)
    out[:3, :3] = out[:3, :3] / np.asarray(_spacing(affine)) * spacing
    return out


def _metatensor(array: np.ndarray, affine: np.ndarray, source, spacing: Sequence[float] | None) -> MetaTensor:
    affine = np.asarray(affine, dtype=np.float64) if spacing is None else _with_spacing(affine, spacing)
    meta = {"filename_or_obj": source, "spacing": _spacing(affine), "spatial_shape": tuple(array.shape[1:])}
    return MetaTensor(torch.as_tensor(array), affine=torch.as_tensor(affine), meta=meta)


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


@contextmanager
def atomic_write(path) -> Iterator[Path]:
    """Write ``path`` atomically: yield a temporary path, move it into place on success.

    The temporary path has the target's name inside a private directory beside the target, so
    suffix-driven writers (nibabel, SimpleITK) behave as for the real name. On success every
    file the caller wrote there (the target, and companions such as an ``.mhd``'s ``.raw``)
    is renamed beside the target, the target last; an existing directory target is replaced
    whole. On failure nothing is left behind.

    Example
    -------
    >>> with atomic_write("out/table.csv") as tmp, open(tmp, "w", encoding="utf-8") as f:  # doctest: +SKIP
    ...     f.write("id,rle\\n")
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield staging / target.name
        for written in sorted(staging.iterdir(), key=lambda p: p.name == target.name):
            dest = target.parent / written.name
            if dest.exists() and dest.is_dir() != written.is_dir():
                expected = "a directory" if written.is_dir() else "a file"
                raise SlabError(f"{dest}: exists and is not {expected}; not replacing it")
            if dest.is_dir():
                dest.rename(staging / ".replaced")  # removed with the staging directory
            os.replace(written, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Lazy volumes


def _basic_index(index, shape: tuple[int, ...]) -> tuple[list, list[int]]:
    """Split a basic numpy index into one int-or-slice per axis and the positions of new axes."""
    items = index if isinstance(index, tuple) else (index,)
    for item in items:
        if not (item is None or item is Ellipsis or isinstance(item, (slice, int, np.integer))) or isinstance(
            item, (bool, np.bool_)
        ):
            raise TypeError(f"LazyVolume supports basic indexing (ints, slices, ..., None), got {item!r}")
    used = sum(item is not None and item is not Ellipsis for item in items)
    if used > len(shape) or sum(item is Ellipsis for item in items) > 1:
        raise IndexError(f"too many indices for a volume of shape {shape}")
    expanded = []
    for item in items:
        expanded.extend([slice(None)] * (len(shape) - used) if item is Ellipsis else [item])
    if Ellipsis not in items:
        expanded.extend([slice(None)] * (len(shape) - used))
    per_axis, new_axes, out_axes = [], [], 0
    for item in expanded:
        if item is None:
            new_axes.append(out_axes)
            out_axes += 1
            continue
        size = shape[len(per_axis)]
        if isinstance(item, slice):
            out_axes += 1
        elif not -size <= item < size:
            raise IndexError(f"index {item} is out of bounds for axis {len(per_axis)} with size {size}")
        else:
            item = int(item) % size
        per_axis.append(item)
    return per_axis, new_axes


class LazyVolume:
    """A ``(C, X, Y, Z)`` volume whose voxels are read from disk on demand.

    Indexing takes basic numpy indices (ints, slices, ``...``, ``None``) and returns a numpy
    array equal to the same index on the eagerly loaded volume; a slice stack reads only the
    slices the index touches, an uncompressed NIfTI reads through nibabel's memory map.
    ``load()`` gives the whole volume as a MetaTensor. Create one with
    ``load_volume(path, lazy=True)``.

    Attributes
    ----------
    shape, dtype : the volume's shape ``(C, X, Y, Z)`` and dtype.
    affine : ``(4, 4)`` float64 numpy array, voxel to world in RAS.
    meta : ``{"filename_or_obj", "spacing", "spatial_shape"}`` as a loaded MetaTensor has.
    """

    ndim = 4

    def __init__(self, shape: tuple[int, ...], dtype, affine: np.ndarray, source, spacing=None):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.affine = np.asarray(affine, dtype=np.float64) if spacing is None else _with_spacing(affine, spacing)
        self.meta = {"filename_or_obj": source, "spacing": _spacing(self.affine), "spatial_shape": self.shape[1:]}

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def __repr__(self) -> str:
        return f"LazyVolume(shape={self.shape}, dtype={self.dtype}, source={self.meta['filename_or_obj']!r})"

    def __getitem__(self, index) -> np.ndarray:
        per_axis, new_axes = _basic_index(index, self.shape)
        out = self._read(*per_axis)
        if new_axes:
            return np.expand_dims(out, tuple(new_axes))
        return out[()] if out.ndim == 0 else out  # a voxel is a numpy scalar, as numpy gives

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = self.load().numpy()
        return array if dtype is None else array.astype(dtype, copy=False)

    def load(self, workers: int | None = None) -> MetaTensor:
        """Read the whole volume into memory."""
        return _metatensor(self._read_all(workers), self.affine, self.meta["filename_or_obj"], None)

    def _read(self, c, x, y, z) -> np.ndarray:
        raise NotImplementedError

    def _read_all(self, workers: int | None) -> np.ndarray:
        return self._read(slice(None), slice(None), slice(None), slice(None))


class _SliceStack(LazyVolume):
    """A directory of 2D slices: slice ``z`` is file ``files[z]``, decoded when read."""

    def __init__(self, directory: Path, files: list[Path], spacing=None, workers: int | None = None):
        self.files = files
        self.workers = workers
        first = self._decode(files[0])
        self.slice_shape, self.slice_dtype = first.shape, first.dtype
        rows, cols = first.shape
        super().__init__((1, cols, rows, len(files)), first.dtype, np.eye(4), str(directory), spacing)

    @staticmethod
    def _decode(path: Path) -> np.ndarray:
        try:
            if _suffix(path) == ".png":
                image = imagecodecs.png_decode(path.read_bytes())
            else:
                image = tifffile.imread(path, maxworkers=1)
        except (OSError, ValueError, RuntimeError, KeyError, IndexError) as err:
            raise SlabError(f"{path}: not a readable {_suffix(path)} image ({_one_line(err)})") from None
        if image.ndim != 2:
            raise SlabError(f"{path}: expected a 2D single-channel slice, got an image of shape {image.shape}")
        return image

    def _slice(self, z: int) -> np.ndarray:
        """Slice ``z`` as stored, ``(rows, cols)``, checked against the first slice."""
        image = self._decode(self.files[z])
        if image.shape != self.slice_shape or image.dtype != self.slice_dtype:
            raise SlabError(
                f"{self.files[z]}: slice of {image.shape[1]}x{image.shape[0]} {image.dtype}, expected "
                f"{self.slice_shape[1]}x{self.slice_shape[0]} {self.slice_dtype} like {self.files[0].name}"
            )
        return image

    def _read(self, c, x, y, z) -> np.ndarray:
        zs = range(self.shape[3])[z] if isinstance(z, slice) else [z]
        kept = tuple(len(range(n)[s]) for n, s in zip(self.shape[1:3], (x, y)) if isinstance(s, slice))
        out = np.empty(kept + (len(zs),), dtype=self.dtype)

        def fill(k: int) -> None:
            out[..., k] = self._slice(zs[k]).T[x, y]

        _run_parallel(fill, range(len(zs)), self.workers)
        return (out if isinstance(z, slice) else out[..., 0])[np.newaxis][(c,)]

    def _read_all(self, workers: int | None) -> np.ndarray:
        # Decode each slice into its row of one (Z, rows, cols) buffer; the (1, X, Y, Z) volume is
        # a transposed view of it, so the peak is the volume plus one slice per thread.
        buffer = np.empty((self.shape[3],) + self.slice_shape, dtype=self.dtype)

        def fill(k: int) -> None:
            buffer[k] = self._slice(k)

        _run_parallel(fill, range(self.shape[3]), workers or self.workers)
        return buffer.transpose(2, 1, 0)[np.newaxis]


class _NiftiVolume(LazyVolume):
    """A NIfTI file read through nibabel's array proxy (a memory map when uncompressed)."""

    def __init__(self, path: Path, image, spacing=None):
        self.dataobj = image.dataobj
        self.path = path
        spatial = image.shape[:3]
        channels = image.shape[3] if len(image.shape) == 4 else 1
        super().__init__((channels,) + spatial, _nifti_dtype(image), image.affine, str(path), spacing)

    def _read(self, c, x, y, z) -> np.ndarray:
        try:
            if len(self.dataobj.shape) == 3:
                out = np.asarray(self.dataobj[x, y, z])[np.newaxis][(c,)]
            else:
                out = np.asarray(self.dataobj[x, y, z, c])
                out = np.moveaxis(out, -1, 0) if isinstance(c, slice) else out
        except (OSError, EOFError, ValueError, zlib.error) as err:
            raise SlabError(f"{self.path}: truncated or corrupt NIfTI ({_one_line(err)})") from None
        return out.astype(self.dtype, copy=False)


# ---------------------------------------------------------------------------------------------
# Readers: each gives a (C, X, Y, Z) array and its RAS affine


def _nifti_dtype(image) -> np.dtype:
    # nibabel moves scl_slope/scl_inter from the image header into its array proxy.
    scaled = (float(image.dataobj.slope), float(image.dataobj.inter)) != (1.0, 0.0)
    # Scaled values come back as float32; torch wants native byte order.
    return np.dtype(np.float32) if scaled else image.get_data_dtype().newbyteorder("=")


def _open_nifti(path: Path, lazy: bool):
    try:
        image = nib.load(path, mmap=lazy)
    except (ImageFileError, OSError, EOFError, ValueError, zlib.error) as err:
        raise SlabError(f"{path}: not a readable NIfTI file ({_one_line(err)})") from None
    if len(image.shape) < 3:
        raise SlabError(f"{path}: a 2D image of shape {image.shape} where a 3D volume is expected")
    if len(image.shape) > 4:
        raise SlabError(f"{path}: a {len(image.shape)}D image; expected (X, Y, Z) or (X, Y, Z, C)")
    if _suffix(path) == ".nii":
        proxy = image.dataobj
        needed = proxy.offset + int(np.prod(proxy.shape)) * proxy.dtype.itemsize
        if path.stat().st_size < needed:
            raise SlabError(f"{path}: truncated NIfTI, {path.stat().st_size} bytes where its header needs {needed}")
    return image


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = _open_nifti(path, lazy=False)
    try:
        data = np.asanyarray(image.dataobj).astype(_nifti_dtype(image), copy=False)
    except (OSError, EOFError, ValueError, zlib.error) as err:
        raise SlabError(f"{path}: truncated or corrupt NIfTI ({_one_line(err)})") from None
    data = data[np.newaxis] if data.ndim == 3 else np.moveaxis(data, -1, 0)
    return data, image.affine


def _itk_affine(image: sitk.Image) -> np.ndarray:
    lps = np.eye(4)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=np.float64)
    lps[:3, 3] = image.GetOrigin()
    return LPS_TO_RAS @ lps


def _itk_volume(image: sitk.Image, path: Path) -> tuple[np.ndarray, np.ndarray]:
    if image.GetDimension() != 3:
        raise SlabError(
            f"{path}: a {image.GetDimension()}D image of size {image.GetSize()} where a 3D volume is expected"
        )
    array = sitk.GetArrayFromImage(image)  # (Z, Y, X) or (Z, Y, X, C)
    data = array.transpose(2, 1, 0)[np.newaxis] if array.ndim == 3 else array.transpose(3, 2, 1, 0)
    return data, _itk_affine(image)


def _read_itk(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise SlabError(f"{path}: not a readable {_suffix(path)} image ({_one_line(err)})") from None
    return _itk_volume(image, path)


def _read_dicom(directory: Path) -> tuple[np.ndarray, np.ndarray]:
    reader = sitk.ImageSeriesReader()
    with keep_locale():
        series = reader.GetGDCMSeriesIDs(str(directory))
        if len(series) != 1:
            raise SlabError(f"{directory}: holds {len(series)} DICOM series; expected one series per directory")
        # GDCM orders the files by slice position along the slice normal.
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(directory), series[0]))
        try:
            image = reader.Execute()
        except RuntimeError as err:
            raise SlabError(f"{directory}: not a readable DICOM series ({_one_line(err)})") from None
    return _itk_volume(image, directory)


def _directory_kind(directory: Path) -> tuple[str, list[Path]]:
    """``("stack", slice files in natural order)`` or ``("dicom", [])``."""
    files = [p for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")]
    slices = [p for p in files if _suffix(p) in SLICE_SUFFIXES]
    if not files:
        raise SlabError(f"{directory}: empty directory; expected {_EXPECTED}")
    if not slices:
        with keep_locale():
            series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(directory))
        if series:
            return "dicom", []
        raise SlabError(f"{directory}: no .png/.tif slices and no DICOM series found")
    others = sorted(set(files) - set(slices), key=lambda p: natural_key(p.name))
    if others:
        raise SlabError(f"{others[0]}: not a .png/.tif slice; a slice directory holds only slices")
    if len({_suffix(p) == ".png" for p in slices}) > 1:
        raise SlabError(f"{directory}: mixes .png and .tif slices; expected one format")
    return "stack", sorted(slices, key=lambda p: natural_key(p.name))


def load_volume(src, *, lazy: bool = False, spacing: Sequence[float] | None = None, workers: int | None = None):
    """Load a volume as a ``(C, X, Y, Z)`` MetaTensor in the file's dtype, affine in RAS.

    Parameters
    ----------
    src : path or list of paths
        A ``.nii``/``.nii.gz``, ``.nrrd``/``.nhdr``, ``.mha``/``.mhd`` file, a DICOM series
        directory or a directory of 2D ``.png``/``.tif`` slices (natural sort order, decoded in
        parallel). A list loads each entry as channels of one volume; geometry must agree.
    lazy : bool
        Return a :class:`LazyVolume` (slice stacks and NIfTI only) that reads on demand.
    spacing : (sx, sy, sz), optional
        Voxel size in mm. Sets a slice stack's spacing (else 1); for other formats it replaces
        the file's voxel size, keeping orientation and origin.
    workers : int, optional
        Threads decoding slices; default one per available core.

    Returns
    -------
    MetaTensor or LazyVolume
        ``meta["spacing"]`` holds the voxel size, ``meta["filename_or_obj"]`` the source.

    Example
    -------
    >>> vol = load_volume("case_01/images")  # doctest: +SKIP
    >>> vol.shape, vol.dtype, vol.meta["spacing"]  # doctest: +SKIP
    (torch.Size([1, 768, 768, 200]), torch.uint16, (1.0, 1.0, 1.0))
    """
    if isinstance(src, (list, tuple)):
        return _load_channels(src, spacing, lazy, workers)
    path = Path(src)
    if not path.exists():
        raise SlabError(f"{path}: no such file or directory")
    suffix = _suffix(path)
    if path.is_dir():
        kind, files = _directory_kind(path)
        if kind == "stack":
            stack = _SliceStack(path, files, spacing, workers)
            return stack if lazy else stack.load()
        reader = _read_dicom
    elif suffix in NIFTI_SUFFIXES:
        if lazy:
            return _NiftiVolume(path, _open_nifti(path, lazy=True), spacing)
        reader = _read_nifti
    elif suffix in ITK_SUFFIXES:
        reader = _read_itk
    elif suffix in SLICE_SUFFIXES:
        raise SlabError(f"{path}: a single image file where a 3D volume is expected; give the directory of slices")
    else:
        raise SlabError(f"{path}: unsupported format {suffix or '(no suffix)'!r}; expected {_EXPECTED}")
    if lazy:
        raise SlabError(f"{path}: lazy loading reads slice directories and NIfTI files; load this one eagerly")
    data, affine = reader(path)
    return _metatensor(data, affine, str(path), spacing)


def _load_channels(sources, spacing, lazy: bool, workers: int | None) -> MetaTensor:
    if not sources:
        raise SlabError("source: an empty list of files")
    if lazy:
        raise SlabError(f"{sources[0]}: lazy loading takes one file or directory, not a list")
    volumes = [load_volume(source, spacing=spacing, workers=workers) for source in sources]
    check_same_geometry(*volumes, names=[str(s) for s in sources])
    # (C, Z, Y, X) order keeps x fastest in each channel, like a single loaded volume.
    data = np.concatenate([v.numpy().transpose(0, 3, 2, 1) for v in volumes]).transpose(0, 3, 2, 1)
    return _metatensor(data, np.asarray(volumes[0].affine), [str(s) for s in sources], None)


def check_same_geometry(*volumes, names: Sequence[str] | None = None, name_a: str = "PRED", name_b: str = "TRUTH",
                        atol: float = 1e-4) -> None:
    """Raise SlabError unless all volumes share spatial shape and affine.

    Parameters
    ----------
    *volumes : MetaTensor, LazyVolume or anything with ``.shape`` ``(C, X, Y, Z)`` and ``.affine``.
    names : one name per volume for the message (file names, usually).
    name_a, name_b : the names of the first two volumes when ``names`` is not given.
    atol : absolute tolerance on affine entries (mm).

    Example
    -------
    >>> check_same_geometry(image, label, names=["image.nii.gz", "label.nii.gz"])  # doctest: +SKIP
    """
    if names is None:
        names = [name_a, name_b] + [f"volume {i}" for i in range(2, len(volumes))]
    ref_shape, ref_affine = tuple(volumes[0].shape[1:]), np.asarray(volumes[0].affine, dtype=np.float64)
    for name, volume in zip(names[1:], volumes[1:]):
        shape = tuple(volume.shape[1:])
        if shape != ref_shape:
            raise SlabError(f"{name}: spatial shape {shape} does not match {names[0]} {ref_shape}")
        affine = np.asarray(volume.affine, dtype=np.float64)
        if not np.allclose(affine, ref_affine, rtol=0, atol=atol):
            raise SlabError(
                f"{name}: geometry (affine rows {np.round(affine[:3], 4).tolist()}) does not match "
                f"{names[0]} ({np.round(ref_affine[:3], 4).tolist()})"
            )


# ---------------------------------------------------------------------------------------------
# Writers


def output_format(path) -> str:
    """What :func:`save_volume` writes at ``path``: ``"nifti"``, ``"itk"`` or ``"stack"``.

    A ``.nii``/``.nii.gz`` name is NIfTI, ``.nrrd``/``.nhdr``/``.mha``/``.mhd`` SimpleITK, an
    existing directory or a name without suffix a slice stack; anything else is a SlabError.
    """
    path = Path(path)
    suffix = _suffix(path)
    if suffix in NIFTI_SUFFIXES:
        return "nifti"
    if suffix in ITK_SUFFIXES:
        return "itk"
    if path.is_dir() or not suffix:
        return "stack"
    if suffix in SLICE_SUFFIXES:
        raise SlabError(f"{path}: a slice stack is written to a directory; give a directory name")
    raise SlabError(
        f"{path}: unsupported output format {suffix!r}; expected .nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd or a directory"
    )


def _as_numpy(data, affine, meta, dtype) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(data, LazyVolume):
        data = data.load()
    if affine is None and meta is not None:
        affine = meta.get("affine")
    if affine is None and isinstance(data, MetaTensor):
        affine = data.affine
    array = data.detach().cpu().numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    if array.ndim != 4:
        raise SlabError(f"data: expected shape (C, X, Y, Z), got {tuple(array.shape)}")
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise SlabError(f"affine: expected a 4x4 matrix, got shape {affine.shape}")
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    return (array.astype(np.uint8) if array.dtype == np.bool_ else array), affine


def _write_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    data = array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)
    image = nib.Nifti1Image(data, affine, dtype=data.dtype)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    image.header.set_xyzt_units("mm")
    with atomic_write(path) as tmp:
        nib.save(image, tmp)


def _write_itk(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    if array.shape[0] == 1:
        image = sitk.GetImageFromArray(array[0].transpose(2, 1, 0))
    else:
        image = sitk.GetImageFromArray(array.transpose(3, 2, 1, 0), isVector=True)
    lps = LPS_TO_RAS @ affine
    spacing = np.asarray(_spacing(lps))
    image.SetSpacing(spacing.tolist())
    image.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    with atomic_write(path) as tmp:
        try:
            sitk.WriteImage(image, str(tmp))
        except RuntimeError as err:
            raise SlabError(f"{path}: cannot write {array.dtype} as {_suffix(path)} ({_one_line(err)})") from None


def _write_stack(array: np.ndarray, path: Path, slice_format: str, workers: int | None) -> None:
    if slice_format not in SLICE_FORMATS:
        raise SlabError(f"slice_format: expected one of {', '.join(SLICE_FORMATS)}, got {slice_format!r}")
    if array.shape[0] != 1:
        raise SlabError(f"{path}: a slice stack holds one channel; the volume has {array.shape[0]}")
    if slice_format == "png" and array.dtype not in PNG_DTYPES:
        raise SlabError(f"{path}: PNG holds uint8 or uint16 slices, the volume is {array.dtype}; write TIFF")
    if path.is_dir():
        strays = [p.name for p in path.iterdir() if _suffix(p) not in SLICE_SUFFIXES]
        if strays:
            raise SlabError(f"{path}: exists and holds files other than slices ({strays[0]}); not replacing it")
    volume, depth = array[0], array.shape[3]
    width = max(4, len(str(depth - 1)))
    with atomic_write(path) as tmp:
        tmp.mkdir()

        def write(z: int) -> None:
            image = np.ascontiguousarray(volume[:, :, z].T)
            target = tmp / f"{z:0{width}d}.{slice_format}"
            if slice_format == "png":
                target.write_bytes(imagecodecs.png_encode(image))
            else:
                tifffile.imwrite(target, image, photometric="minisblack", metadata=None)

        _run_parallel(write, range(depth), workers)


def save_volume(data, dst, *, affine=None, meta=None, dtype=None, slice_format: str | None = None,
                workers: int | None = None) -> Path:
    """Write a ``(C, X, Y, Z)`` volume; the format follows the path (see :func:`output_format`).

    Parameters
    ----------
    data : MetaTensor, torch.Tensor, numpy array or LazyVolume
        Written in its own dtype (bool as uint8) unless ``dtype`` is given.
    dst : ``.nii``/``.nii.gz`` (qform and sform set to the affine), ``.nrrd``/``.nhdr``/
        ``.mha``/``.mhd`` (converted to LPS), or a directory: one ``NNNN.tif``/``NNNN.png`` per z,
        ``img = vol[0, :, :, z].T``; a stack keeps no geometry. Written atomically.
    affine : (4, 4), optional
        Voxel to world in RAS. Default: ``meta["affine"]``, else the MetaTensor's affine, else
        identity.
    meta : dict, optional
        A MONAI meta dictionary (e.g. the input's) whose ``"affine"`` is used.
    dtype : numpy dtype, optional
        Cast to this dtype (``numpy.astype``) before writing.
    slice_format : ``"tif"`` (default) or ``"png"`` (uint8/uint16 only), for a slice stack.
    workers : threads encoding slices; default one per available core.

    Returns
    -------
    Path
        The path written.
    """
    path = Path(dst)
    kind = output_format(path)
    array, affine = _as_numpy(data, affine, meta, dtype)
    if kind == "nifti":
        _write_nifti(array, affine, path)
    elif kind == "itk":
        _write_itk(array, affine, path)
    else:
        _write_stack(array, path, slice_format or "tif", workers)
    return path


# ---------------------------------------------------------------------------------------------
# MONAI transforms


class LoadVolume(Transform):
    """Array transform over :func:`load_volume`: a path (or list of paths) to a MetaTensor."""

    def __init__(self, spacing: Sequence[float] | None = None, lazy: bool = False, workers: int | None = None):
        self.spacing, self.lazy, self.workers = spacing, lazy, workers

    def __call__(self, source):
        return load_volume(source, spacing=self.spacing, lazy=self.lazy, workers=self.workers)


class LoadVolumed(MapTransform):
    """Dictionary form of :class:`LoadVolume`: replaces each key's path with its volume."""

    def __init__(self, keys, spacing=None, lazy: bool = False, workers: int | None = None,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadVolume(spacing, lazy, workers)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loader(d[key])
        return d


def _source_stem(volume) -> str:
    source = getattr(volume, "meta", {}).get("filename_or_obj")
    source = source[0] if isinstance(source, (list, tuple)) and source else source
    if not source:
        raise SlabError("volume: has no meta['filename_or_obj'] to name the output; pass a file name")
    name = Path(str(source)).name
    suffix = _suffix(Path(name))
    return name[: -len(suffix)] if suffix in NIFTI_SUFFIXES + ITK_SUFFIXES else name


class SaveVolume(Transform):
    """Array transform over :func:`save_volume`; returns the volume unchanged.

    The file is ``output_dir / name`` for an explicit ``name``, else the source's stem (from
    ``meta["filename_or_obj"]``) + ``postfix`` + ``suffix``; ``suffix=""`` writes a slice stack.
    """

    def __init__(self, output_dir, suffix: str = ".nii.gz", postfix: str = "", slice_format: str = "tif", workers=None):
        self.output_dir, self.suffix, self.postfix = Path(output_dir), suffix, postfix
        self.slice_format, self.workers = slice_format, workers

    def __call__(self, volume, name: str | None = None):
        name = name or f"{_source_stem(volume)}{self.postfix}{self.suffix}"
        save_volume(volume, self.output_dir / name, slice_format=self.slice_format, workers=self.workers)
        return volume


class SaveVolumed(MapTransform):
    """Dictionary form of :class:`SaveVolume`; ``postfix`` defaults to ``"_<key>"``."""

    def __init__(self, keys, output_dir, suffix: str = ".nii.gz", postfix: str | None = None, slice_format: str = "tif",
                 workers=None, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.output_dir, self.suffix, self.postfix = output_dir, suffix, postfix
        self.slice_format, self.workers = slice_format, workers

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            postfix = f"_{key}" if self.postfix is None else self.postfix
            SaveVolume(self.output_dir, self.suffix, postfix, self.slice_format, self.workers)(d[key])
        return d
