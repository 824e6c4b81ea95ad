"""N5 datasets (the chunked format of BigDataViewer, BigStitcher, Paintera and the Janelia tools),
read lazily and written block by block, without an N5 library.

A container is a directory (``scan.n5``) whose ``attributes.json`` names the N5 version; a
dataset is a directory whose ``attributes.json`` holds ``dimensions`` and ``blockSize`` (fastest
axis first: x, y, z[, c]), ``dataType`` and ``compression`` (``raw``, ``gzip``, ``bzip2``, ``xz``,
``blosc``, ``zstd``). Block ``(i, j, k)`` is the file ``i/j/k``: a big-endian header (mode, number
of dimensions, the block's size per dimension) and the compressed big-endian voxels, fastest
axis first; a missing block is zeros. ``scan.n5`` reads the dataset at the container's root, or
the only dataset inside it; ``scan.n5/setup0/timepoint0/s0`` names one.

Geometry: ``pixelResolution`` (``{"unit", "dimensions"}``, n5-viewer / BigStitcher), or
``resolution`` with ``units`` (n5-ij), and ``offset``, in their units converted to mm; slab also
writes its voxel-to-world matrix as ``slab.affine`` and reads it back where it agrees with those
(as for zarr and HDF5, :mod:`slab.io.arrays`).

Untrusted files run no code and allocate no more than a block: every block's header is checked
against the dataset, and decompression stops at the block's size.
"""
from __future__ import annotations

import bz2
import json
import lzma
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from slab.core.checks import read_json_object
from slab.core.errors import SlabError
from slab.io.common import N5_SUFFIXES, one_line, run_parallel, spacing_of
from slab.io.headers import read_bounded, stored_limit

N5_VERSION = "4.0.0"
DTYPES = ("uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64", "float32", "float64")
COMPRESSIONS = ("raw", "gzip", "bzip2", "xz", "blosc", "zstd")


def split_n5(path) -> tuple[Path, str] | None:
    """``(container, dataset path inside it)`` of a path through a ``*.n5`` directory, or None."""
    path = Path(path)
    parts = path.parts
    for i, part in enumerate(parts):
        if part.lower().endswith(".n5"):
            return Path(*parts[:i + 1]), "/".join(parts[i + 1:])
    return None


def is_n5(path) -> bool:
    found = split_n5(path)
    return found is not None and found[0].is_dir()


def is_n5_container(path) -> bool:
    """Whether ``path`` is a directory holding N5 attributes (what an output may replace)."""
    return Path(path).is_dir() and (Path(path) / "attributes.json").is_file()


def _attributes(folder: Path, source) -> dict:
    return read_json_object(folder / "attributes.json", "N5 attributes") if (folder / "attributes.json").is_file() \
        else {}


def _datasets_in(root: Path, source) -> list[str]:
    found = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        if "attributes.json" in files and "dimensions" in _attributes(Path(folder), source):
            found.append(Path(folder).relative_to(root).as_posix())
            dirs[:] = []  # a dataset's subfolders are its blocks
    return found


class N5Array:
    """An N5 dataset as a C-ordered array (``dimensions`` reversed: ``(Z, Y, X)`` or ``(C, Z, Y,
    X)``), read with basic slices of positive step and written with block-aligned regions."""

    def __init__(self, folder: Path, attrs: dict, source):
        self.folder, self.source = Path(folder), str(source)
        dims, block = attrs.get("dimensions"), attrs.get("blockSize")
        if (not isinstance(dims, list) or not isinstance(block, list) or len(dims) != len(block) or not dims
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in dims + block)):
            raise SlabError(f"{source}: N5 dimensions {dims!r} and blockSize {block!r}; expected positive integers, "
                            "one per axis")
        kind = attrs.get("dataType")
        if kind not in DTYPES:
            raise SlabError(f"{source}: N5 dataType {kind!r}; expected one of {', '.join(DTYPES)}")
        compression = attrs.get("compression", {"type": attrs.get("compressionType", "raw")})
        self.codec = compression.get("type") if isinstance(compression, dict) else None
        if self.codec not in COMPRESSIONS:
            raise SlabError(f"{source}: N5 compression {compression!r}; expected one of {', '.join(COMPRESSIONS)}")
        self.compression = compression
        self.dims, self.block = [int(d) for d in dims], [int(b) for b in block]  # fastest axis first
        self.shape, self.dtype, self.ndim = tuple(self.dims[::-1]), np.dtype(kind), len(dims)
        self.big = self.dtype.newbyteorder(">")

    # -- blocks --------------------------------------------------------------------------------

    def _path(self, grid) -> Path:
        return self.folder.joinpath(*map(str, grid))

    def _decompress(self, data: bytes, size: int, path: Path) -> bytes:
        if self.codec == "raw":
            return data[:size + 1]
        if self.codec == "gzip":
            return zlib.decompressobj(wbits=47).decompress(data, size + 1)  # gzip or zlib ("useZlib")
        if self.codec == "bzip2":
            return bz2.BZ2Decompressor().decompress(data, max_length=size + 1)
        if self.codec == "xz":
            return lzma.LZMADecompressor().decompress(data, max_length=size + 1)
        if self.codec == "blosc":
            from numcodecs import Blosc

            if len(data) < 16 or struct.unpack("<I", data[4:8])[0] != size:
                raise SlabError(f"{path}: a blosc block whose header does not give {size} bytes")
            return bytes(Blosc().decode(data))
        import imagecodecs

        out = bytearray(size)
        decoded = imagecodecs.zstd_decode(data, out=out)
        return bytes(decoded)

    def read_block(self, grid) -> np.ndarray | None:
        """Block ``grid`` (fastest axis first) as a C-ordered array of its stored size, or None
        where the file is missing (zeros)."""
        path = self._path(grid)
        try:  # never more than a block can take: not a device, a FIFO or a sparse file's claim
            data = read_bounded(path, 4 + 4 * self.ndim + 4 + stored_limit(int(np.prod(self.block)) * self.dtype.itemsize),
                                "the N5 block")
        except FileNotFoundError:
            return None
        except OSError as err:
            raise SlabError(f"{path}: cannot read the N5 block ({one_line(err)})") from None
        if len(data) < 4:
            raise SlabError(f"{path}: a truncated N5 block header")
        mode, ndim = struct.unpack(">HH", data[:4])
        head = 4 + 4 * ndim + (4 if mode == 1 else 0)
        if mode not in (0, 1) or ndim != self.ndim or len(data) < head:
            raise SlabError(f"{path}: N5 block mode {mode} with {ndim} dimensions; expected mode 0 with {self.ndim}")
        size = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
        lowest = [min(b, d - g * b) for g, b, d in zip(grid, self.block, self.dims)]
        if any(not low <= s <= b for s, low, b in zip(size, lowest, self.block)):
            raise SlabError(f"{path}: an N5 block of size {list(size)}; expected {lowest} (at most {self.block})")
        count = int(np.prod(size))
        if mode == 1 and struct.unpack(">I", data[head - 4:head])[0] != count:
            raise SlabError(f"{path}: a varlength N5 block; slab reads numeric blocks of their full size")
        nbytes = count * self.dtype.itemsize
        try:
            raw = self._decompress(data[head:], nbytes, path)
        except SlabError:
            raise
        except Exception as err:  # noqa: BLE001 - decoders raise many kinds on damaged data
            raise SlabError(f"{path}: an N5 block that does not decompress ({one_line(err)})") from None
        if len(raw) != nbytes:
            raise SlabError(f"{path}: an N5 block of {len(raw)} bytes; its header gives {nbytes}")
        return np.frombuffer(raw, dtype=self.big).reshape(size[::-1]).astype(self.dtype)

    def write_block(self, grid, values: np.ndarray) -> None:
        """Block ``grid`` from its C-ordered voxels (its size, truncated at the border)."""
        size = values.shape[::-1]
        raw = np.ascontiguousarray(values, dtype=self.big).tobytes()
        level = int(self.compression.get("level", 1))
        if self.codec == "gzip":
            compressor = zlib.compressobj(level, zlib.DEFLATED, 31)  # gzip, as N5's Java writer makes it
            raw = compressor.compress(raw) + compressor.flush()
        elif self.codec != "raw":
            raise SlabError(f"{self.source}: slab writes N5 raw or gzip, not {self.codec}")
        header = struct.pack(f">HH{len(size)}I", 0, len(size), *size)
        path = self._path(grid)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(header + raw)

    # -- numpy indexing --------------------------------------------------------------------------

    def _ranges(self, index) -> list[range]:
        items = index if isinstance(index, tuple) else (index,)
        if any(item is Ellipsis for item in items):
            at = items.index(Ellipsis)
            items = items[:at] + (slice(None),) * (self.ndim - len(items) + 1) + items[at + 1:]
        items = tuple(items) + (slice(None),) * (self.ndim - len(items))
        ranges = []
        for item, n in zip(items, self.shape):
            if not isinstance(item, slice):
                raise TypeError(f"N5Array takes slices, got {item!r}")
            picked = range(n)[item]
            if picked.step < 0:
                raise TypeError("N5Array takes slices of positive step")
            ranges.append(picked)
        return ranges

    def __getitem__(self, index) -> np.ndarray:
        ranges = self._ranges(index)
        lo = [r.start if r else 0 for r in ranges]
        hi = [r[-1] + 1 if r else 0 for r in ranges]
        out = np.zeros([b - a for a, b in zip(lo, hi)], dtype=self.dtype)
        if out.size:
            blocks = self.block[::-1]  # C order
            spans = [range(a // b, (e - 1) // b + 1) for a, e, b in zip(lo, hi, blocks)]
            cells = [[s[g] for s, g in zip(spans, grid)] for grid in np.ndindex(*[len(s) for s in spans])]

            def fill(cell) -> None:
                values = self.read_block(cell[::-1])
                if values is None:
                    return
                start = [c * b for c, b in zip(cell, blocks)]
                take = tuple(slice(max(a, s) - s, min(e, s + n) - s) for a, e, s, n in zip(lo, hi, start, values.shape))
                put = tuple(slice(max(a, s) - a, min(e, s + n) - a) for a, e, s, n in zip(lo, hi, start, values.shape))
                out[put] = values[take]  # blocks fill disjoint parts

            run_parallel(fill, cells, None)  # the decompressors release the GIL
        return out[tuple(slice(None, None, r.step) for r in ranges)]

    def __setitem__(self, index, values) -> None:
        ranges = self._ranges(index)
        values = np.broadcast_to(np.asarray(values, dtype=self.dtype), [len(r) for r in ranges])
        blocks = self.block[::-1]
        for r, b, n in zip(ranges, blocks, self.shape):
            if r.step != 1 or r.start % b or (r.stop % b and r.stop != n):
                raise ValueError(f"N5Array writes whole blocks; got rows {r.start}:{r.stop} of blocks of {b}")
        spans = [range(r.start // b, -(-r.stop // b)) for r, b in zip(ranges, blocks)]

        def put(grid) -> None:
            cell = [s[g] for s, g in zip(spans, grid)]
            region = tuple(slice(c * b - r.start, min(r.stop, (c + 1) * b) - r.start)
                           for c, b, r in zip(cell, blocks, ranges))
            self.write_block(cell[::-1], values[region])

        run_parallel(put, list(np.ndindex(*[len(s) for s in spans])), None)  # zlib releases the GIL


def _geometry(attrs: dict, ndim: int, source) -> np.ndarray:
    """The voxel-to-world matrix from the dataset's resolution and offset (x, y, z, in mm)."""
    from slab.io.arrays import diag_affine, unit_mm

    spacing, offset, units = [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [None] * 3
    resolution = attrs.get("pixelResolution")
    if isinstance(resolution, dict):
        units = [resolution.get("unit")] * 3
        resolution = resolution.get("dimensions")
    elif resolution is None:
        resolution = attrs.get("resolution")
        given = attrs.get("units")
        units = list(given) if isinstance(given, list) and len(given) >= 3 else units
    if resolution is not None:
        if (not isinstance(resolution, list) or len(resolution) < 3
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) and v > 0
                           for v in resolution[:3])):
            raise SlabError(f"{source}: N5 resolution {resolution!r}; expected three positive sizes (x y z)")
        spacing = [float(v) * unit_mm(u, source) for v, u in zip(resolution[:3], units)]
    given = attrs.get("offset")
    if given is not None:
        if not isinstance(given, list) or len(given) < 3 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in given[:3]):
            raise SlabError(f"{source}: N5 offset {given!r}; expected three numbers (x y z)")
        offset = [float(v) * unit_mm(u, source) for v, u in zip(given[:3], units)]
    return diag_affine(spacing, offset)


def open_n5(path, spacing=None):
    """An N5 dataset as a lazy volume (:class:`slab.io.arrays.ArrayVolume`)."""
    from slab.io.arrays import ArrayVolume, default_axes, restore_affine, stored_affine

    root, inner = split_n5(path)
    source = str(path)
    if not root.is_dir():
        raise SlabError(f"{root}: no such N5 container")
    folder = root / inner if inner else root
    attrs = _attributes(folder, source) if folder.is_dir() else {}
    if "dimensions" not in attrs:
        if inner and not folder.is_dir():
            raise SlabError(f"{source}: no such N5 dataset in {root}")
        found = _datasets_in(folder, source)
        if len(found) != 1:
            listed = ", ".join(found[:6]) or "none"
            raise SlabError(f"{source}: an N5 group with {len(found)} datasets ({listed}); give one dataset's path, "
                            f"e.g. {folder / (found[0] if found else 'DATASET')}")
        folder = folder / found[0]
        attrs = _attributes(folder, source)
    array = N5Array(folder, attrs, source)
    affine = _geometry(attrs, array.ndim, source)
    own = stored_affine(attrs, source)
    if own is not None:
        affine = restore_affine(own, affine)
    return ArrayVolume(array, default_axes(array.ndim, source), affine, source, spacing)


def write_n5(volume, affine: np.ndarray, path: Path, chunks: int = 64, block_bytes: int = 256 << 20) -> None:
    """An N5 container holding one gzip dataset at its root (``(C, X, Y, Z)`` as dimensions x, y,
    z[, c]) with ``pixelResolution`` and ``offset`` in mm and slab's matrix, written block by block."""
    from slab.io.arrays import copy_blocks, block_steps
    from slab.core.outputs import atomic_write

    affine = np.asarray(affine, dtype=np.float64)
    channels = volume.shape[0]
    dtype = np.dtype(volume.dtype)
    if dtype.name not in DTYPES:
        raise SlabError(f"{path}: N5 stores {', '.join(DTYPES)}; cannot write {dtype}")
    dims = [int(n) for n in volume.shape[1:]] + ([channels] if channels > 1 else [])
    block = [min(chunks, n) for n in volume.shape[1:]] + ([1] if channels > 1 else [])
    attrs = {"n5": N5_VERSION, "dimensions": dims, "blockSize": block, "dataType": dtype.name,
             "compression": {"type": "gzip", "level": 1},
             "pixelResolution": {"unit": "mm", "dimensions": [float(s) for s in spacing_of(affine)]},
             "offset": [float(v) for v in affine[:3, 3]],
             "slab": {"affine": affine.tolist(), "axes": "xyz order of the voxel-to-world matrix, RAS mm"}}
    with atomic_write(path) as tmp:
        tmp.mkdir()
        (tmp / "attributes.json").write_text(json.dumps(attrs), encoding="utf-8")
        target = N5Array(tmp, attrs, path)
        copy_blocks(volume, target, channels, *block_steps(volume, chunks, block_bytes), None)


__all__ = ["N5Array", "N5_SUFFIXES", "is_n5", "is_n5_container", "open_n5", "split_n5", "write_n5"]
