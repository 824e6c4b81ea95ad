"""Volumes read from disk on demand: slice stacks (one 2D file per z) and NIfTI through
nibabel's array proxy (a memory map when uncompressed). Create them with
``slab.io.volumes.load_volume(path, lazy=True)``."""
from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor

from slab.core.errors import SlabError
from slab.io.formats import (TIFF_SUFFIXES, nifti_dtype, nifti_forms, one_line, run_parallel, spacing_of, suffix_of,
                                     with_spacing)
from slab.io.headers import (check_claim, check_memory, jpeg2k_claim, png_claim, tiff_bytes_claim, tiff_claim,
                                     tiff_header)


def check_affine(affine: np.ndarray, source) -> np.ndarray:
    """A usable voxel-to-world matrix: finite, with three independent axes of non-zero length."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise SlabError(f"{source}: its voxel-to-world affine is not a finite 4x4 matrix; the header is corrupt")
    sizes = np.linalg.norm(affine[:3, :3], axis=0)
    if np.min(sizes) <= 0 or abs(np.linalg.det(affine[:3, :3])) <= 1e-12 * float(np.prod(sizes)):
        spacing = ", ".join(f"{s:g}" for s in sizes)
        raise SlabError(f"{source}: degenerate geometry (voxel size {spacing} mm, or axes not independent); the "
                        "header's voxel size or orientation is broken (give --spacing where the command has it)")
    return affine


def metatensor(array: np.ndarray, affine: np.ndarray, source, spacing=None, extra: dict | None = None) -> MetaTensor:
    """A loaded volume: ``array`` with its affine (RAS) and meta (source, spacing, shape, and the
    format's own geometry notes in ``extra``, e.g. a NIfTI's qform and sform)."""
    extra = dict(extra or {})
    declared = extra.pop("declared_spacing", None) if spacing is None else None
    affine = check_affine(affine if spacing is None else with_spacing(affine, spacing), source)
    meta = {"filename_or_obj": source, "spacing": spacing_of(affine, declared or spacing),
            "spatial_shape": tuple(array.shape[1:])}
    if extra and spacing is None:
        meta.update(extra)
    return MetaTensor(torch.as_tensor(array), affine=torch.as_tensor(affine), meta=meta)


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
    ``load()`` gives the whole volume as a MetaTensor (after checking that it fits in memory).
    Create one with ``load_volume(path, lazy=True)``.

    Attributes
    ----------
    shape, dtype : the volume's shape ``(C, X, Y, Z)`` and dtype.
    affine : ``(4, 4)`` float64 numpy array, voxel to world in RAS.
    meta : ``{"filename_or_obj", "spacing", "spatial_shape"}`` as a loaded MetaTensor has.
    """

    ndim = 4

    def __init__(self, shape: tuple[int, ...], dtype, affine: np.ndarray, source, spacing=None,
                 extra: dict | None = None):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.affine = check_affine(affine if spacing is None else with_spacing(affine, spacing), source)
        self.extra = dict(extra or {}) if spacing is None else {}
        declared = self.extra.get("declared_spacing") if spacing is None else spacing
        self.meta = {"filename_or_obj": source, "spacing": spacing_of(self.affine, declared),
                     "spatial_shape": self.shape[1:]}
        self.meta.update({k: v for k, v in self.extra.items() if k != "declared_spacing"})

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

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
        check_memory(self.nbytes, str(self.meta["filename_or_obj"]), "; read it lazily (e.g. --memory-budget)")
        return metatensor(self._read_all(workers), self.affine, self.meta["filename_or_obj"], None, self.extra)

    def close(self) -> None:
        """Release what the volume holds open (a container's file handle); most hold nothing."""

    def _read(self, c, x, y, z) -> np.ndarray:
        raise NotImplementedError

    def _read_all(self, workers: int | None) -> np.ndarray:
        return self._read(slice(None), slice(None), slice(None), slice(None))


# What imagecodecs decodes exactly as tifffile does, and the GIL released: one grey sample,
# one page, 8/16/32-bit integers or 32-bit floats, none/LZW/deflate/PackBits compression.
_PLAIN_TIFF = {"samples": (1,), "pages": (1,), "bits": (8, 16, 32), "sample_format": (1, 2, 3),
               "compression": (1, 5, 8, 32946, 32773)}


def _plain_tiff(path: Path, data: bytes) -> dict | None:
    header = tiff_header(path, data)
    if header is None or any(header[k] not in allowed for k, allowed in _PLAIN_TIFF.items()):
        return None
    if header["sample_format"] == 3 and header["bits"] != 32:
        return None
    return header


def decode_slice(path: Path) -> np.ndarray:
    """One 2D slice, its header checked before decoding (no allocation past what the file can hold)."""
    import imagecodecs
    import tifffile

    try:
        if suffix_of(path) == ".png":
            data = path.read_bytes()
            png_claim(path, data)
            image = imagecodecs.png_decode(data)
        elif suffix_of(path) in (".jp2", ".j2k"):
            data = path.read_bytes()
            jpeg2k_claim(path, data)
            image = imagecodecs.jpeg2k_decode(data, numthreads=1)  # OpenJPEG in C, the GIL released
        elif (header := _plain_tiff(path, data := path.read_bytes())) is not None:
            tiff_bytes_claim(path, data, header)
            image = imagecodecs.tiff_decode(data)  # libtiff in C, the GIL released: threads decode in parallel
        else:
            with tifffile.TiffFile(path) as tif:
                if not tif.pages:
                    raise SlabError(f"{path}: a TIFF file without images")
                if len(tif.pages) > 1:
                    raise SlabError(f"{path}: a multi-page TIFF in a slice directory; give the file itself as the "
                                    "volume, or one page per file")
                page = tif.pages[0]
                tiff_claim(path, page)
                image = page.asarray(maxworkers=1)
    except SlabError:
        raise
    except Exception as err:  # noqa: BLE001 - decoders raise many kinds on damaged files
        raise SlabError(f"{path}: not a readable {suffix_of(path)} image ({one_line(err)})") from None
    if image.ndim != 2:
        raise SlabError(f"{path}: expected a 2D single-channel slice, got an image of shape {image.shape}")
    return image


class SliceFolder(LazyVolume):
    """A directory of 2D slices: slice ``z`` is file ``files[z]``, decoded when read."""

    def __init__(self, directory: Path, files: list[Path], spacing=None, workers: int | None = None):
        self.files = files
        self.workers = workers
        first = decode_slice(files[0])
        self.slice_shape, self.slice_dtype = first.shape, first.dtype
        rows, cols = first.shape
        super().__init__((1, cols, rows, len(files)), first.dtype, np.eye(4), str(directory), spacing)

    def check_files(self) -> None:
        """Every slice file's header read (64 KiB at most each, nothing decoded) and checked
        against the first slice: a truncated download, an empty file or a slice of another size
        is a SlabError naming it, before anything is written from the stack."""
        rows, cols = self.slice_shape
        for path in self.files:
            size = path.stat().st_size
            with open(path, "rb") as f:
                data = f.read(1 << 16)
            if suffix_of(path) == ".png":
                png_claim(path, data)
                found = struct.unpack(">II", data[16:24]) if len(data) >= 24 else None
                found = found and (found[1], found[0])
            elif suffix_of(path) in TIFF_SUFFIXES:
                header = tiff_header(path, data)
                if header is None and size < (1 << 16):  # a small file whose header cannot be read
                    raise SlabError(f"{path}: a truncated or unreadable TIFF slice ({size} bytes)")
                found = None if header is None else (header["height"], header["width"])
                if header is not None:
                    check_claim(path, header["width"] * header["height"] * header["samples"]
                                * max(1, header["bits"] // 8), size, "raw" if header["compression"] == 1 else "tiff")
            else:
                found = None
            if found is not None and tuple(found) != (rows, cols):
                raise SlabError(f"{path}: a {found[1]}x{found[0]} slice; the stack's first slice is {cols}x{rows}")

    def _slice(self, z: int) -> np.ndarray:
        """Slice ``z`` as stored, ``(rows, cols)``, checked against the first slice."""
        image = decode_slice(self.files[z])
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

        run_parallel(fill, range(len(zs)), self.workers)
        return (out if isinstance(z, slice) else out[..., 0])[np.newaxis][(c,)]

    def _read_all(self, workers: int | None) -> np.ndarray:
        # Decode each slice into its row of one (Z, rows, cols) buffer; the (1, X, Y, Z) volume is
        # a transposed view of it, so the peak is the volume plus one slice per thread.
        buffer = np.empty((self.shape[3],) + self.slice_shape, dtype=self.dtype)

        def fill(k: int) -> None:
            buffer[k] = self._slice(k)

        run_parallel(fill, range(self.shape[3]), workers or self.workers)
        return buffer.transpose(2, 1, 0)[np.newaxis]


class NiftiVolume(LazyVolume):
    """A NIfTI file read through nibabel's array proxy (a memory map when uncompressed)."""

    def __init__(self, path: Path, image, spacing=None):
        self.dataobj = image.dataobj
        self.path = path
        spatial = image.shape[:3]
        channels = image.shape[3] if len(image.shape) == 4 else 1
        super().__init__((channels,) + spatial, nifti_dtype(image), image.affine, str(path), spacing,
                         {"nifti_forms": nifti_forms(image), "declared_spacing": image.header.get_zooms()[:3]})

    def _read(self, c, x, y, z) -> np.ndarray:
        try:
            if len(self.dataobj.shape) == 3:
                out = np.asarray(self.dataobj[x, y, z])[np.newaxis][(c,)]
            else:
                out = np.asarray(self.dataobj[x, y, z, c])
                out = np.moveaxis(out, -1, 0) if isinstance(c, slice) else out
        except Exception as err:  # noqa: BLE001 - zlib, EOF, OS errors of a damaged file
            raise SlabError(f"{self.path}: truncated or corrupt NIfTI ({one_line(err)})") from None
        return out.astype(self.dtype, copy=False)


__all__ = ["LazyVolume", "SliceFolder", "NiftiVolume", "decode_slice", "metatensor"]
