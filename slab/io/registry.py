"""The formats slab reads and writes, each one class, listed once.

A path is resolved to its format here and nowhere else: :func:`find` for reading (what
``load_volume``, ``open_volume`` and ``volume_info`` do with a path) and :func:`writer_for` for
writing (``save_volume``, ``output_format``). A new format is one class in this list, as in
MONAI's ``image_reader.py`` and nnU-Net v2's ``reader_writer_registry.py``; the code that
decodes and encodes each family stays in its own module.

Reading resolves in this order: the containers whose datasets are addressed by a path *through*
them (``scan.zarr/2``, ``scan.n5/setup0/s0``, ``scan.h5/group/name``) and multi-page TIFF files;
then a missing path is refused; a directory is a slice stack or a DICOM series (listed once,
:func:`~slab.io.stacks.directory_kind`); a file goes by its suffix.

Example
-------
>>> writer_for("case.nii.gz").name, writer_for("probs.zarr").chunked, writer_for("slices").name
('nifti', True, 'stack')
>>> [f.name for f in FORMATS]
['zarr', 'n5', 'hdf5', 'tiff', 'nifti', 'itk', 'dicom', 'stack']
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from slab.core.errors import SlabError
from slab.io.common import EXPECTED, ITK_SUFFIXES, LPS_TO_RAS, NIFTI_SUFFIXES, SLICE_SUFFIXES, native, suffix_of
from slab.io.itk import check_itk_header, read_itk, write_itk
from slab.io.stacks import check_stack_target, directory_kind, stack_spacing, write_stack
from slab.io.nifti import open_nifti, read_nifti, write_nifti
from slab.io.common import HDF5_SUFFIXES, TIFF_SUFFIXES, ZARR_SUFFIXES
from slab.io.zarr import is_zarr, open_zarr
from slab.io.arrays import warn_orientation
from slab.io.hdf5 import write_hdf5
from slab.io.tiff import write_tiff
from slab.io.zarr import write_zarr
from slab.io.hdf5 import open_hdf5, split_hdf5
from slab.io.tiff import open_tiff
from slab.io.dicom import dicom_info, read_dicom
from slab.io.nifti import NiftiVolume
from slab.io.stacks import SliceFolder
from slab.io.lazy import metatensor
from slab.io.n5 import N5_SUFFIXES, is_n5_container, open_n5, split_n5, write_n5


class NotLazyError(SlabError):
    """``load_volume(..., lazy=True)`` of a source whose format is only read whole (NRRD, MHA,
    DICOM, a list of channel files)."""


@dataclass(frozen=True)
class Source:
    """A path resolved to the format that reads it (what :func:`find` returns)."""

    path: Path
    format: VolumeFormat
    files: tuple[Path, ...] = field(default=(), repr=False)  # a slice directory's slices, in order

    def open(self, spacing=None, workers: int | None = None):
        return self.format.open(self, spacing, workers)

    def read(self, spacing=None, workers: int | None = None):
        return self.format.read(self, spacing, workers)

    def info(self) -> tuple[tuple[int, ...], np.dtype, np.ndarray]:
        return self.format.info(self)


@dataclass(frozen=True)
class WriteOptions:
    """What :func:`~slab.io.volumes.save_volume` passes on to a format's writer."""

    forms: dict | None = None  # a NIfTI input's qform and sform (``meta["nifti_forms"]``)
    labels: bool = False  # a label map: pyramids take every second voxel instead of averaging
    mask: bool = False  # a 0/1 mask: a slice stack stores it as 0/255
    fields: dict | None = None  # NRRD key/value pairs
    slice_format: str | None = None
    workers: int | None = None


class VolumeFormat:
    """One format: its name, its suffixes, and how it is opened, read, described and written.

    ``lazy`` formats are read on demand (:class:`~slab.io.lazy.LazyVolume`); ``chunked`` ones are
    written block by block from a lazy volume, never loaded whole; ``directory`` ones are stored as
    a directory."""

    name = ""
    suffixes: tuple[str, ...] = ()
    lazy = False
    chunked = False
    directory = False

    def claims(self, path: Path) -> bool:
        """Whether this format reads ``path`` before anything else is asked of it (containers whose
        datasets are addressed by a path through them)."""
        return False

    def open(self, source: Source, spacing, workers):
        raise NotLazyError(f"{source.path}: lazy loading reads zarr, N5, HDF5, TIFF, slice directories and NIfTI "
                           "files; load this one eagerly")

    def read(self, source: Source, spacing, workers):
        volume = self.open(source, spacing, workers)
        try:
            return volume.load(workers)
        finally:
            volume.close()

    def info(self, source: Source) -> tuple[tuple[int, ...], np.dtype, np.ndarray]:
        volume = self.open(source, None, None)
        volume.close()
        return tuple(volume.shape), volume.dtype, volume.affine

    def check_target(self, path: Path) -> None:
        """Refuse, before anything is computed, a target this format cannot replace."""
        if path.is_dir():
            raise SlabError(f"{path}: exists and is a directory; not replacing it with a file")

    def write(self, array, affine: np.ndarray, path: Path, options: WriteOptions) -> None:
        raise NotImplementedError


class _Eager(VolumeFormat):
    """A format read whole by a ``reader(path) -> (array, affine, extra)``."""

    def read(self, source: Source, spacing, workers):
        data, affine, extra = self._reader(source.path)
        return metatensor(data, affine, str(source.path), spacing, extra)

    def info(self, source: Source):
        volume = self.read(source, None, None)
        return tuple(volume.shape), np.dtype(str(volume.dtype).removeprefix("torch.")), np.asarray(volume.affine)


class Zarr(VolumeFormat):
    name, suffixes, lazy, chunked, directory = "zarr", ZARR_SUFFIXES, True, True, True

    def claims(self, path):
        if is_zarr(path):
            return True
        if suffix_of(path) in ZARR_SUFFIXES and not path.exists():
            raise SlabError(f"{path}: no such zarr store")
        return False

    def open(self, source, spacing, workers):
        return open_zarr(source.path, spacing)

    def check_target(self, path):
        if path.is_file():
            raise SlabError(f"{path}: exists and is a file; a zarr store is a directory")
        if path.is_dir() and any(path.iterdir()) and not is_zarr(path, metadata=True):
            raise SlabError(f"{path}: exists and is not a zarr store; not replacing it")

    def write(self, array, affine, path, options):
        write_zarr(array, affine, path, labels=options.labels or options.mask)


class N5(VolumeFormat):
    name, suffixes, lazy, chunked, directory = "n5", N5_SUFFIXES, True, True, True

    def claims(self, path):
        return split_n5(path) is not None and not path.is_file()  # a file kept inside an .n5 folder is itself

    def open(self, source, spacing, workers):
        return open_n5(source.path, spacing)

    def check_target(self, path):
        if path.is_file():
            raise SlabError(f"{path}: exists and is a file; an N5 container is a directory")
        if path.is_dir() and any(path.iterdir()) and not is_n5_container(path):
            raise SlabError(f"{path}: exists and is not an N5 container; not replacing it")

    def write(self, array, affine, path, options):
        write_n5(array, affine, path)


class HDF5(VolumeFormat):
    name, suffixes, lazy, chunked = "hdf5", HDF5_SUFFIXES, True, True

    def claims(self, path):
        hdf5 = split_hdf5(path)
        return hdf5 is not None and (hdf5[0].is_file() or hdf5[1] is not None)

    def open(self, source, spacing, workers):
        return open_hdf5(source.path, spacing)

    def write(self, array, affine, path, options):
        write_hdf5(array, affine, path)


class Tiff(VolumeFormat):
    """A multi-page TIFF file is a volume; a directory of one-page TIFFs is a slice stack."""

    name, suffixes, lazy, chunked = "tiff", TIFF_SUFFIXES, True, True

    def claims(self, path):
        return path.is_file() and suffix_of(path) in TIFF_SUFFIXES

    def open(self, source, spacing, workers):
        return open_tiff(source.path, spacing)

    def write(self, array, affine, path, options):
        warn_orientation(affine, path)
        write_tiff(array, affine, path)


class Nifti(VolumeFormat):
    name, suffixes, lazy = "nifti", NIFTI_SUFFIXES, True

    def open(self, source, spacing, workers):
        return NiftiVolume(source.path, open_nifti(source.path, lazy=True), spacing)

    def read(self, source, spacing, workers):
        data, affine, extra = read_nifti(source.path)
        return metatensor(data, affine, str(source.path), spacing, extra)

    def write(self, array, affine, path, options):
        write_nifti(array, affine, path, options.forms)


class Itk(_Eager):
    """NRRD and MetaImage through SimpleITK (LPS on disk, RAS in slab)."""

    name, suffixes = "itk", ITK_SUFFIXES
    _reader = staticmethod(read_itk)

    def info(self, source):
        import SimpleITK as sitk

        path = source.path
        check_itk_header(path)
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            with native():
                reader.ReadImageInformation()
        except Exception as err:  # noqa: BLE001
            raise SlabError(f"{path}: not a readable {suffix_of(path)} image ({err})") from None
        size = reader.GetSize()
        if len(size) != 3:
            raise SlabError(f"{path}: a {len(size)}D image of size {size} where a 3D volume is expected")
        lps = np.eye(4)
        lps[:3, :3] = np.asarray(reader.GetDirection()).reshape(3, 3) * np.asarray(reader.GetSpacing())
        lps[:3, 3] = reader.GetOrigin()
        return (reader.GetNumberOfComponents(),) + tuple(size), np.dtype(np.float32), LPS_TO_RAS @ lps

    def write(self, array, affine, path, options):
        write_itk(array, affine, path, options.fields)


class DicomSeries(_Eager):
    """A directory holding one DICOM series: read whole through GDCM, described from its headers
    (pydicom's, checked as a read checks them) without reading the pixels."""

    name, directory = "dicom", True
    _reader = staticmethod(read_dicom)

    def info(self, source):
        return dicom_info(source.path) or super().info(source)


class Stack(VolumeFormat):
    """A directory of 2D slices (PNG, TIFF, JPEG 2000), one per z, read on demand."""

    name, suffixes, lazy, directory = "stack", SLICE_SUFFIXES, True, True

    def open(self, source, spacing, workers):
        files = list(source.files)
        return SliceFolder(source.path, files, spacing if spacing is not None else stack_spacing(files), workers)

    def check_target(self, path):
        check_stack_target(path)

    def write(self, array, affine, path, options):
        if options.mask:
            array = (array > 0).astype(np.uint8) * np.uint8(255)
        write_stack(array, path, options.slice_format or "tif", options.workers)


ZARR, N5_FORMAT, HDF5_FORMAT, TIFF, NIFTI, ITK, DICOM, STACK = FORMATS = (
    Zarr(), N5(), HDF5(), Tiff(), Nifti(), Itk(), DicomSeries(), Stack())
_CONTAINERS = (ZARR, N5_FORMAT, HDF5_FORMAT, TIFF)  # asked first, in this order
_FILES = (NIFTI, ITK)  # by suffix
_WRITERS = (ZARR, N5_FORMAT, HDF5_FORMAT, TIFF, NIFTI, ITK)  # by suffix; a directory or no suffix: STACK


def find(path) -> Source:
    """The format that reads ``path``, or a one-line SlabError naming the path."""
    path = Path(path)
    for fmt in _CONTAINERS:
        if fmt.claims(path):
            return Source(path, fmt)
    if not path.exists():
        raise SlabError(f"{path}: no such file or directory")
    if path.is_dir():
        kind, files = directory_kind(path)
        return Source(path, STACK, tuple(files)) if kind == "stack" else Source(path, DICOM)
    suffix = suffix_of(path)
    for fmt in _FILES:
        if suffix in fmt.suffixes:
            return Source(path, fmt)
    if suffix in SLICE_SUFFIXES:
        raise SlabError(f"{path}: a single {suffix} image where a 3D volume is expected; give the directory of slices")
    raise SlabError(f"{path}: unsupported format {suffix or '(no suffix)'!r}; expected {EXPECTED}")


def writer_for(path) -> VolumeFormat:
    """The format written at ``path`` (by its suffix; a directory or a name without suffix is a slice
    stack), its target checked; else a one-line SlabError."""
    path = Path(path)
    suffix = suffix_of(path)
    fmt = next((f for f in _WRITERS if suffix in f.suffixes), None)
    if fmt is None and (path.is_dir() or not suffix):
        fmt = STACK
    if fmt is None:
        if suffix in SLICE_SUFFIXES:
            raise SlabError(f"{path}: a slice stack is written to a directory; give a directory name")
        raise SlabError(f"{path}: unsupported output format {suffix!r}; expected .nii, .nii.gz, .nrrd, .nhdr, .mha, "
                        ".mhd, .zarr, .n5, .h5, .tif or a directory")
    fmt.check_target(path)
    return fmt
