"""Slice stacks: a directory of 2D PNG / TIFF / JPEG 2000 slices, one per z (natural order), read
on demand and decoded in threads (:class:`SliceFolder`: ``img[row, col]`` is ``vol[0, :, :, z]
= img.T``), written one slice per file; what a directory holds (slices or a DICOM series); the
voxel size UW-Madison's file names carry."""
from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from slab.core.checks import SLICE_FORMATS
from slab.core.errors import SlabError
from slab.io.common import (
    EXPECTED,
    JP2_DTYPES,
    PNG_DTYPES,
    SLICE_FAMILY,
    SLICE_SUFFIXES,
    TIFF_SUFFIXES,
    native,
    natural_key,
    one_line,
    run_parallel,
    suffix_of,
)
from slab.io.headers import check_claim, jpeg2k_claim, png_claim, tiff_bytes_claim, tiff_claim, tiff_header
from slab.io.lazy import LazyVolume

# UW-Madison GI tract scans: slice_<number>_<width>_<height>_<sx>_<sy>.png; slices are 3 mm apart.
UWMGI_SCAN = re.compile(r"^slice_(\d+)_(\d+)_(\d+)_(\d+(?:\.\d*)?)_(\d+(?:\.\d*)?)\.png$")


UWMGI_SLICE_THICKNESS = 3.0


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


__all__ = ["UWMGI_SCAN", "UWMGI_SLICE_THICKNESS", "directory_kind", "stack_spacing", "write_stack",
           "check_stack_target", "decode_slice", "SliceFolder"]
