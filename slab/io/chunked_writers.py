"""zarr / OME-Zarr (with its pyramid), HDF5 and multi-page TIFF written block by block: a
:class:`~slab.io.lazy.LazyVolume` is never loaded whole; see :mod:`slab.io.chunked`
for the axis order and the geometry attributes written."""
from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from slab.io.chunked import OME_VERSION, ArrayVolume, zarr_node
from slab.core.errors import SlabError
from slab.io.formats import one_line, spacing_of

# Written pyramids stop when the largest axis of the last level is at most this.
PYRAMID_MIN = 256


# ---------------------------------------------------------------------------------------------
# Writers (block by block; a LazyVolume is never loaded whole)


def _tiles(volume, zstep: int, ystep: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """``(z0, y0, block as (C, dz, dy, X))`` over a (C, X, Y, Z) volume, ``zstep`` x ``ystep`` at a time."""
    _, _, height, depth = volume.shape
    for z0 in range(0, depth, zstep):
        for y0 in range(0, height, ystep):
            block = np.asarray(volume[:, :, y0:y0 + ystep, z0:z0 + zstep])
            yield z0, y0, block.transpose(0, 3, 2, 1)


def block_steps(volume, chunks, block_bytes: int) -> tuple[int, int]:
    """Whole chunks of z and y (``chunks``: one size, or ``(z, y)``) per block, as many y chunks as
    ``block_bytes`` allow (at least one)."""
    cz, cy = chunks if isinstance(chunks, (tuple, list)) else (chunks, chunks)
    _, width, height, depth = volume.shape
    zstep = min(cz, depth)
    row = max(1, volume.shape[0] * zstep * width * np.dtype(volume.dtype).itemsize)
    ystep = max(1, block_bytes // row // cy) * cy
    return zstep, min(ystep, height)


def copy_blocks(source, target, channels: int, zstep: int, ystep: int, labels: bool | None) -> None:
    """``source`` (C, X, Y, Z) into ``target`` ((C,) Z, Y, X), tile by tile; with ``labels`` not
    None, halved (:func:`_downsample`) on the way. Tiles start at even offsets, so a halved
    tile is exactly that part of the halved volume."""
    halve = labels is not None
    fz = 2 if halve and source.shape[3] > 1 else 1
    fy = 2 if halve and source.shape[2] > 1 else 1
    for z0, y0, block in _tiles(source, zstep * fz, ystep * fy):
        if halve:
            block = _downsample(block, labels)
        z0, y0 = z0 // fz, y0 // fy
        region = (Ellipsis, slice(z0, z0 + block.shape[1]), slice(y0, y0 + block.shape[2]), slice(None))
        target[region] = block if channels > 1 else block[0]


def _ome_axes(channels: int) -> list[dict]:
    axes = [{"name": "c", "type": "channel"}] if channels > 1 else []
    return axes + [{"name": a, "type": "space", "unit": "millimeter"} for a in "zyx"]


def _downsample(block: np.ndarray, labels: bool) -> np.ndarray:
    """Half size on each spatial axis longer than one voxel (``(C, Z, Y, X)``): every second voxel
    for labels, else the mean of each 2x2x2 cell (edges repeated), rounded back to integers."""
    steps = [1] + [2 if n > 1 else 1 for n in block.shape[1:]]
    if labels:
        return block[tuple(slice(None, None, s) for s in steps)]
    pad = [(0, (n % s)) for n, s in zip(block.shape, steps)]
    padded = np.pad(block, pad, mode="edge") if any(p[1] for p in pad) else block
    shape = []
    for n, s in zip(padded.shape, steps):
        shape += [n // s, s]
    mean = padded.reshape(shape).mean(axis=(1, 3, 5, 7), dtype=np.float64)
    if np.issubdtype(block.dtype, np.integer):
        info = np.iinfo(block.dtype)
        mean = np.clip(np.rint(mean), info.min, info.max)
    return mean.astype(block.dtype)


def pyramid_shapes(shape_czyx, levels: int | None = None) -> list[tuple[int, ...]]:
    """The level shapes of a written pyramid: level 0, then halves until the largest spatial axis
    is at most :data:`PYRAMID_MIN` (or ``levels`` levels in all)."""
    shapes = [tuple(int(n) for n in shape_czyx)]
    while (len(shapes) < levels) if levels is not None else (max(shapes[-1][1:]) > PYRAMID_MIN):
        last = shapes[-1]
        if max(last[1:]) == 1:
            break
        shapes.append((last[0],) + tuple((n + 1) // 2 if n > 1 else 1 for n in last[1:]))
    return shapes


def write_zarr(volume, affine: np.ndarray, path: Path, *, labels: bool = False, chunks=64,
               levels: int | None = None, block_bytes: int = 64 << 20, notes: dict | None = None) -> None:
    """An OME-Zarr 0.4 image (zarr v2, ``/`` chunk keys, Blosc zstd): level 0 and a pyramid, written
    block by block from ``volume`` ((C, X, Y, Z) array or LazyVolume); ``chunks`` is one size for
    every axis or ``(z, y, x)`` (e.g. thin in z for 2.5D reading); ``labels`` downsamples by
    taking every second voxel instead of averaging; ``notes`` join the ``slab`` attribute."""
    import zarr
    from numcodecs import Blosc

    from slab.core.outputs import atomic_write

    affine = np.asarray(affine, dtype=np.float64)
    channels = volume.shape[0]
    shape = (channels,) + tuple(volume.shape[1:][::-1])  # (C, Z, Y, X)
    shapes = pyramid_shapes(shape, levels)
    spacing = np.asarray(spacing_of(affine), dtype=np.float64)
    origin = affine[:3, 3]
    datasets, scale, translation = [], spacing.copy(), origin.copy()
    for i, _ in enumerate(shapes):
        if i:
            factor = np.asarray([2.0 if n > 1 else 1.0 for n in shapes[i - 1][1:][::-1]])  # x y z
            if not labels:
                translation = translation + (factor - 1) / 2 * scale
            scale = scale * factor
        lead = [1.0] if channels > 1 else []
        datasets.append({"path": str(i), "coordinateTransformations": [
            {"type": "scale", "scale": lead + scale[::-1].tolist()},
            {"type": "translation", "translation": [0.0] * len(lead) + translation[::-1].tolist()}]})
    attrs = {"multiscales": [{"version": OME_VERSION, "name": Path(path).name, "axes": _ome_axes(channels),
                              "datasets": datasets, "type": "nearest" if labels else "mean"}],
             "slab": {"affine": affine.tolist(), "axes": "xyz order of the level-0 voxel-to-world matrix, RAS mm",
                      **(notes or {})}}
    compressor = Blosc(cname="zstd", clevel=3, shuffle=Blosc.BITSHUFFLE if volume.dtype.itemsize == 1
                       else Blosc.SHUFFLE)
    zyx = tuple(int(c) for c in (chunks if isinstance(chunks, (tuple, list)) else (chunks,) * 3))
    zstep, ystep = block_steps(volume, zyx[:2], block_bytes)
    with atomic_write(path) as tmp:
        try:
            group = zarr.open_group(store=str(tmp), mode="w", zarr_format=2)
            source = volume
            for i, level_shape in enumerate(shapes):
                level_chunks = (1,) * (channels > 1) + tuple(min(c, n) for c, n in zip(zyx, level_shape[1:]))
                array = group.create_array(
                    name=str(i), shape=level_shape if channels > 1 else level_shape[1:], dtype=volume.dtype,
                    chunks=level_chunks, compressors=compressor, fill_value=0,
                    chunk_key_encoding={"name": "v2", "separator": "/"})
                copy_blocks(source, array, channels, zstep, ystep, labels if i else None)
                source = ArrayVolume(array, "czyx" if channels > 1 else "zyx", np.eye(4), str(path))
            group.attrs.update(attrs)
        except (SlabError, OSError):
            raise
        except (ValueError, TypeError) as err:
            raise SlabError(f"{path}: cannot write {volume.dtype} as zarr ({one_line(err)})") from None


def read_notes(path) -> dict:
    """The ``slab`` attribute of a zarr store written by :func:`write_zarr` ({} when there is none)."""
    try:
        kind, _, attrs = zarr_node(Path(path), str(path))
    except SlabError:
        return {}
    notes = attrs.get("slab") if kind == "group" else None
    return notes if isinstance(notes, dict) else {}


def write_hdf5(volume, affine: np.ndarray, path: Path, dataset: str = "volume", chunks: int = 64,
               block_bytes: int = 256 << 20) -> None:
    """One chunked, gzip-compressed HDF5 dataset ``(Z, Y, X)`` or ``(C, Z, Y, X)`` with Fiji's
    ``element_size_um`` (z y x) and slab's matrix (``slab_affine``), written block by block."""
    import h5py

    from slab.core.outputs import atomic_write

    affine = np.asarray(affine, dtype=np.float64)
    channels = volume.shape[0]
    shape = ((channels,) if channels > 1 else ()) + tuple(volume.shape[1:][::-1])
    spacing = np.asarray(spacing_of(affine))
    with atomic_write(path) as tmp:
        with h5py.File(tmp, "w") as handle:
            data = handle.create_dataset(dataset, shape=shape, dtype=volume.dtype, compression="gzip",
                                         compression_opts=1, shuffle=True,
                                         chunks=tuple(min(chunks, n) for n in shape) if channels == 1 else
                                         (1,) + tuple(min(chunks, n) for n in shape[1:]))
            data.attrs["element_size_um"] = (spacing[::-1] * 1e3).astype(np.float64)
            data.attrs["slab_affine"] = affine
            copy_blocks(volume, data, channels, *block_steps(volume, chunks, block_bytes), None)


def write_tiff(volume, affine: np.ndarray, path: Path) -> None:
    """A multi-page OME-TIFF (one zlib-compressed page per z, channels as OME's C; BigTIFF past
    2 GiB) with its voxel size in mm, written page by page."""
    import tifffile

    from slab.core.outputs import atomic_write

    spacing = spacing_of(np.asarray(affine, dtype=np.float64))
    channels, depth = volume.shape[0], volume.shape[3]
    nbytes = math.prod(volume.shape) * volume.dtype.itemsize
    metadata = {"axes": "ZCYX" if channels > 1 else "ZYX"}
    for axis, size in zip("XYZ", spacing):
        metadata[f"PhysicalSize{axis}"] = float(size)
        metadata[f"PhysicalSize{axis}Unit"] = "mm"

    plane = max(1, channels * volume.shape[1] * volume.shape[2] * volume.dtype.itemsize)
    step = max(1, min(depth, (256 << 20) // plane))

    def pages():
        for z0 in range(0, depth, step):
            block = np.asarray(volume[:, :, :, z0:z0 + step])  # (C, X, Y, dz), read a block at a time
            for z in range(block.shape[3]):
                yield from (np.ascontiguousarray(block[c, :, :, z].T) for c in range(channels))

    shape = (depth, channels, volume.shape[2], volume.shape[1]) if channels > 1 else \
        (depth, volume.shape[2], volume.shape[1])
    with atomic_write(path) as tmp:
        try:
            tifffile.imwrite(tmp, data=pages(), shape=shape, dtype=volume.dtype, ome=True, metadata=metadata,
                             bigtiff=nbytes > (2 << 30) - (32 << 20), compression="zlib",
                             photometric="minisblack")
        except (ValueError, TypeError) as err:
            raise SlabError(f"{path}: cannot write {volume.dtype} as TIFF ({one_line(err)})") from None


__all__ = ["write_zarr", "write_hdf5", "write_tiff", "read_notes", "pyramid_shapes"]
