"""Volume I/O: NIfTI, NRRD/MHA/MHD, DICOM series, 2D slice stacks (PNG, TIFF, JPEG 2000), zarr /
OME-Zarr, N5, HDF5 and multi-page TIFF to and from MetaTensors.

A loaded volume is a MONAI ``MetaTensor`` of shape ``(C, X, Y, Z)`` in the file's own dtype
(no upcasting), with ``.affine`` the voxel-to-world matrix in RAS and ``meta["spacing"]`` the
voxel size ``(sx, sy, sz)`` in mm. SimpleITK formats (NRRD, MHA, MHD, DICOM) are LPS on disk
and are flipped to RAS on read and back on write. A slice image ``img[row, col]`` is
``vol[0, :, :, z] = img.T``; a slice stack has no geometry, so it gets ``diag(sx, sy, sz, 1)``
(spacing 1 unless given, or the spacing its file names carry: UW-Madison scans). Loaded arrays
keep x fastest in memory, as on disk, so nothing is copied to reorder axes: a slice stack is
decoded straight into one preallocated buffer.

Headers are checked before anything is allocated (:mod:`slab.io.headers`). A path is resolved
to its format in one place, :mod:`slab.io.registry` (one class per format); the families
themselves live in one module each: :mod:`slab.io.nifti`, :mod:`slab.io.itk`,
:mod:`slab.io.stacks` (slice directories), :mod:`slab.io.dicom`, :mod:`slab.io.zarr`,
:mod:`slab.io.n5`, :mod:`slab.io.hdf5`, :mod:`slab.io.tiff` (the chunked ones read lazily and
written block by block over :mod:`slab.io.arrays`), lazy volumes in :mod:`slab.io.lazy`. Every file
is written through :func:`~slab.core.outputs.atomic_write`; bad input raises a one-line
:class:`~slab.core.errors.SlabError` that names the file.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

from slab.core.errors import SlabError
from slab.io.common import EXPECTED, ITK_SUFFIXES, LPS_TO_RAS, NIFTI_SUFFIXES, PNG_DTYPES, SLICE_SUFFIXES, STEM_SUFFIXES, VOLUME_SUFFIXES, keep_locale, natural_key, suffix_of
from slab.core.checks import SLICE_FORMATS
from slab.io.lazy import LazyVolume, metatensor
from slab.io.registry import FORMATS, NotLazyError, WriteOptions, find, writer_for
from slab.core.outputs import atomic_write


def load_volume(src, *, lazy: bool = False, spacing: Sequence[float] | None = None, workers: int | None = None):
    """Load a volume as a ``(C, X, Y, Z)`` MetaTensor in the file's dtype, affine in RAS.

    Parameters
    ----------
    src : path or list of paths
        A ``.nii``/``.nii.gz``, ``.nrrd``/``.nhdr``, ``.mha``/``.mhd`` file, a DICOM series
        directory, a directory of 2D ``.png``/``.tif``/``.jp2`` slices (natural sort order,
        decoded in parallel), a multi-page ``.tif`` (one page per z; OME-TIFF or ImageJ voxel
        size), a ``.zarr`` store (an array, a group of one array, or an OME-Zarr image: level 0,
        or a level by its path, ``image.zarr/2``), an N5 container (``scan.n5``, its one dataset,
        or ``scan.n5/setup0/timepoint0/s0``) or an HDF5 file (``scan.h5``, its one 3D/4D
        dataset, or ``scan.h5/group/name``). zarr, HDF5 and TIFF arrays are ``(Z, Y, X)`` or
        ``(C, Z, Y, X)`` (or the axes OME metadata names). A list loads each entry as channels of
        one volume; geometry must agree.
    lazy : bool
        Return a :class:`LazyVolume` that reads on demand (slice stacks, NIfTI, zarr, N5, HDF5, TIFF).
    spacing : (sx, sy, sz), optional
        Voxel size in mm. Sets a slice stack's spacing (else 1, or what UW-Madison file names
        say); for other formats it replaces the file's voxel size, keeping orientation and origin.
    workers : int, optional
        Threads decoding slices; default one per available core.

    Returns
    -------
    MetaTensor or LazyVolume
        ``meta["spacing"]`` holds the voxel size, ``meta["filename_or_obj"]`` the source; a
        NIfTI's ``meta["nifti_forms"]`` its qform and sform with their codes.

    Example
    -------
    >>> vol = load_volume("case_01/images")  # doctest: +SKIP
    >>> vol.shape, vol.dtype, vol.meta["spacing"]  # doctest: +SKIP
    (torch.Size([1, 768, 768, 200]), torch.uint16, (1.0, 1.0, 1.0))
    """
    if isinstance(src, (list, tuple)):
        return _load_channels(src, spacing, lazy, workers)
    if not isinstance(src, (str, Path)):
        raise SlabError(f"source: expected a file or directory path, got {type(src).__name__} {src!r}")
    source = find(src)
    return source.open(spacing, workers) if lazy else source.read(spacing, workers)


def volume_info(src) -> tuple[tuple[int, ...], np.dtype, np.ndarray]:
    """``(shape (C, X, Y, Z), dtype, affine)`` of a volume from its header(s), checked as a load
    would check them, without reading the voxels (DICOM: the first slice's header)."""
    if isinstance(src, (list, tuple)):
        infos = [volume_info(s) for s in src]
        if not infos:
            raise SlabError("source: an empty list of files")
        shape = (sum(i[0][0] for i in infos),) + infos[0][0][1:]
        return shape, infos[0][1], infos[0][2]
    return find(src).info()


# Output formats written block by block from a lazy volume (what out-of-core results go to).
CHUNKED_OUTPUTS = tuple(f.name for f in FORMATS if f.chunked)  # zarr, n5, hdf5, tiff


def open_volume(src, spacing: Sequence[float] | None = None):
    """A LazyVolume where the format reads lazily (zarr, N5, HDF5, TIFF, slice stacks, NIfTI), else
    the loaded volume: what a reader of parts of many volumes (training that streams) opens."""
    try:
        return load_volume(src, lazy=True, spacing=spacing)
    except NotLazyError:
        return load_volume(src, spacing=spacing)


def _load_channels(sources, spacing, lazy: bool, workers: int | None) -> MetaTensor:
    if not sources:
        raise SlabError("source: an empty list of files")
    if lazy:
        raise NotLazyError(f"{sources[0]}: lazy loading takes one file or directory, not a list")
    volumes = [load_volume(source, spacing=spacing, workers=workers) for source in sources]
    check_same_geometry(*volumes, names=[str(s) for s in sources])
    # (C, Z, Y, X) order keeps x fastest in each channel, like a single loaded volume.
    data = np.concatenate([v.numpy().transpose(0, 3, 2, 1) for v in volumes]).transpose(0, 3, 2, 1)
    extra = {k: v for k, v in volumes[0].meta.items() if k == "nifti_forms"}
    extra["declared_spacing"] = volumes[0].meta["spacing"]
    return metatensor(data, np.asarray(volumes[0].affine), [str(s) for s in sources], None, extra)


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
    """What :func:`save_volume` writes at ``path``: ``"nifti"``, ``"itk"``, ``"zarr"``, ``"hdf5"``,
    ``"tiff"`` or ``"stack"``.

    A ``.nii``/``.nii.gz`` name is NIfTI, ``.nrrd``/``.nhdr``/``.mha``/``.mhd`` SimpleITK,
    ``.zarr`` an OME-Zarr image, ``.n5`` an N5 container, ``.h5``/``.hdf5`` HDF5, ``.tif``/``.tiff`` a multi-page
    OME-TIFF, an existing directory or a name without suffix a slice stack; anything else is a
    SlabError, as is a target that cannot be replaced (a directory where a file goes, a
    directory holding other files where a stack goes, a directory that is not a zarr store
    where a ``.zarr`` goes).
    """
    return writer_for(path).name


def _as_numpy(data, affine, meta, dtype, lazy_ok: bool = False) -> tuple[np.ndarray, np.ndarray, dict]:
    if isinstance(data, LazyVolume) and lazy_ok and dtype is None:
        affine = data.affine if affine is None else np.asarray(affine, dtype=np.float64)
        return data, affine, dict(meta if meta is not None else data.meta)
    if isinstance(data, LazyVolume):
        data = data.load()
    if meta is None and isinstance(data, MetaTensor):
        meta = data.meta
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
    return (array.astype(np.uint8) if array.dtype == np.bool_ else array), affine, dict(meta or {})


def save_volume(data, dst, *, affine=None, meta=None, dtype=None, slice_format: str | None = None,
                workers: int | None = None, mask: bool = False, labels: bool = False,
                fields: dict | None = None) -> Path:
    """Write a ``(C, X, Y, Z)`` volume; the format follows the path (see :func:`output_format`).

    Parameters
    ----------
    data : MetaTensor, torch.Tensor, numpy array or LazyVolume
        Written in its own dtype (bool as uint8) unless ``dtype`` is given.
    dst : ``.nii``/``.nii.gz``, ``.nrrd``/``.nhdr``/``.mha``/``.mhd`` (LPS, compressed),
        ``.zarr`` (OME-Zarr 0.4 with a pyramid), ``.h5``/``.hdf5`` (dataset ``volume``),
        ``.tif``/``.tiff`` (multi-page OME-TIFF), or a directory: one ``NNNN.tif``/``.png``/``.jp2``
        per z, ``img = vol[0, :, :, z].T``; a stack keeps no geometry. zarr, HDF5 and TIFF are
        written block by block (a LazyVolume is never loaded whole); zarr and HDF5 keep slab's
        full matrix in an attribute, TIFF only the voxel size. Written atomically.
    affine : (4, 4), optional
        Voxel to world in RAS. Default: ``meta["affine"]``, else the MetaTensor's affine, else
        identity.
    meta : dict, optional
        A MONAI meta dictionary (e.g. the input's; default the MetaTensor's own). Its
        ``"affine"`` is used when ``affine`` is not given, and a NIfTI input's qform and sform
        (``"nifti_forms"``) are written as the input had them when the affine is the input's.
        Otherwise NIfTI gets qform = sform = the affine, both with code 1.
    dtype : numpy dtype, optional
        Cast to this dtype (``numpy.astype``) before writing.
    slice_format : ``"tif"`` (default), ``"png"`` (uint8/uint16) or ``"jp2"`` (lossless JPEG 2000,
        8/16-bit integers), for a slice stack.
    workers : threads encoding slices; default one per available core.
    mask : bool
        ``data`` is a 0/1 mask or a label map: a slice stack stores a 0/1 mask as 0/255 (visible
        in image viewers, as SenNet ships its labels); volume files keep label values, and an
        OME-Zarr pyramid takes every second voxel instead of averaging.
    labels : bool
        ``data`` is a label map (integer labels, not intensities): an OME-Zarr pyramid takes
        every second voxel instead of averaging.
    fields : dict of str, optional
        NRRD key/value pairs (ITK formats only), e.g.
        :func:`slab.io.labelmap.segment_metadata` for a ``.seg.nrrd``.

    Returns
    -------
    Path
        The path written.
    """
    path = Path(dst)
    fmt = writer_for(path)
    array, affine, meta = _as_numpy(data, affine, meta, dtype, lazy_ok=fmt.chunked)
    if fmt.chunked:
        if array.dtype == np.bool_:
            array = array.astype(np.uint8)
        check_output_claim(array, path)
    fmt.write(array, affine, path, WriteOptions(meta.get("nifti_forms"), labels, mask, fields, slice_format, workers))
    return path


def check_output_claim(volume, path) -> None:
    """Refuse, before a byte is written, a chunked output whose raw size passes the free space
    of its disk: a lazy input's header may claim 100000^3 voxels of missing chunks, which would
    be written (compressed, block after block) for days; a real volume that large needs a
    bigger disk anyway. The size written is bounded by what was read, not by a claim."""
    import shutil

    raw = int(np.prod([int(n) for n in volume.shape], dtype=object)) * np.dtype(volume.dtype).itemsize
    folder = Path(path).resolve().parent
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if raw > free:
        raise SlabError(f"{path}: the volume holds {raw / 2**30:,.1f} GiB raw ({'x'.join(map(str, volume.shape))} "
                        f"{np.dtype(volume.dtype).name}), more than the {free / 2**30:,.1f} GiB free on its disk")


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
    suffix = suffix_of(Path(name))
    return name[: -len(suffix)] if suffix in STEM_SUFFIXES else name


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


__all__ = ["load_volume", "open_volume", "NotLazyError", "CHUNKED_OUTPUTS", "volume_info", "save_volume", "output_format", "check_same_geometry", "atomic_write",
           "LazyVolume", "LoadVolume", "LoadVolumed", "SaveVolume", "SaveVolumed", "keep_locale", "natural_key",
           "NIFTI_SUFFIXES", "ITK_SUFFIXES", "SLICE_SUFFIXES", "VOLUME_SUFFIXES", "SLICE_FORMATS", "PNG_DTYPES",
           "LPS_TO_RAS", "EXPECTED"]
