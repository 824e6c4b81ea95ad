"""What the chunked formats (zarr, N5, HDF5, multi-page TIFF) share: :class:`ArrayVolume` (a
lazy volume over any array in its own axis order, ``(Z, Y, X)`` or ``(C, Z, Y, X)`` or the axes
OME metadata names), slab's own geometry attributes and their restoration, units, and the
block loop that writes a lazy volume without loading it (``copy_blocks``)."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from slab.core.errors import SlabError, SlabWarning
from slab.io.common import one_line, spacing_of
from slab.io.lazy import LazyVolume

# mm per unit of the OME-NGFF / OME-XML / ImageJ unit names (a unit-less axis is taken as mm).
UNITS_MM = {
    "meter": 1e3, "m": 1e3, "centimeter": 10.0, "cm": 10.0, "millimeter": 1.0, "mm": 1.0, "micrometer": 1e-3,
    "micron": 1e-3, "um": 1e-3, "\u00b5m": 1e-3, "\u03bcm": 1e-3, "nanometer": 1e-6, "nm": 1e-6, "angstrom": 1e-7,
    "\u00c5": 1e-7, "picometer": 1e-9, "pm": 1e-9, "": 1.0, None: 1.0, "pixel": 1.0,
}


OME_VERSION = "0.4"


def diag_affine(spacing_xyz, origin_xyz) -> np.ndarray:
    affine = np.diag([*map(float, spacing_xyz), 1.0])
    affine[:3, 3] = [float(o) for o in origin_xyz]
    return affine


def stored_affine(attrs: dict, source) -> np.ndarray | None:
    """slab's own level-0 matrix from a container's attributes, when it is a finite 4x4."""
    entry = attrs.get("slab") if isinstance(attrs, dict) else None
    affine = entry.get("affine") if isinstance(entry, dict) else None
    if affine is None:
        return None
    try:
        affine = np.asarray(affine, dtype=np.float64)
    except (TypeError, ValueError):
        affine = None
    if affine is None or affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise SlabError(f"{source}: its slab.affine attribute is not a finite 4x4 matrix")
    return affine


def restore_affine(own: np.ndarray, level0: np.ndarray, level: np.ndarray | None = None, origin: bool = True) -> np.ndarray:
    """slab's matrix ``own`` (written for level 0, whose container geometry is ``level0``) where it
    agrees with the container (same voxel size, and same ``origin`` where the container has
    one), carried to a ``level`` of its own container geometry; else the container's."""
    level = level0 if level is None else level
    agrees = (np.allclose(spacing_of(own), np.diag(level0)[:3], rtol=1e-5, atol=1e-9)
              and (not origin or np.allclose(own[:3, 3], level0[:3, 3], rtol=1e-6, atol=1e-6)))
    if agrees and not origin:
        return own
    return own @ np.linalg.inv(level0) @ level if agrees else level


def unit_mm(unit, source) -> float:
    key = unit.strip() if isinstance(unit, str) else unit
    if key not in UNITS_MM and isinstance(key, str):
        key = key.lower()
    if key not in UNITS_MM:
        raise SlabError(f"{source}: unknown length unit {unit!r}; expected one of millimeter, micrometer, nanometer, "
                        "centimeter, meter")
    return UNITS_MM[key]


class ArrayVolume(LazyVolume):
    """A ``(C, X, Y, Z)`` view of an array stored with the named ``axes`` (one letter per array
    axis: ``z``, ``y``, ``x``, optionally ``c``; any other letter, e.g. a ``t``, an axis of size
    one), read on demand."""

    def __init__(self, array, axes: str, affine: np.ndarray, source, spacing=None, extra: dict | None = None,
                 closer=None):
        self.array, self.axes, self._closer = array, axes, closer
        shape = tuple(int(s) for s in array.shape)
        if len(axes) != len(shape) or any(axes.count(a) > 1 for a in "czyx") or not set("zyx") <= set(axes):
            raise SlabError(f"{source}: array axes {axes!r} (shape {shape}); expected z, y and x "
                            "(and optionally c, t)")
        for axis, n in zip(axes, shape):
            if axis not in "czyx" and n != 1:
                what = "a time series" if axis == "t" else f"an axis {axis!r}"
                raise SlabError(f"{source}: {what} of {n} points (shape {shape}); slab reads one 3D "
                                "(multi-channel) volume")
        sizes = dict(zip(axes, shape))
        shape = (sizes.get("c", 1), sizes["x"], sizes["y"], sizes["z"])
        if min(shape) < 1:
            raise SlabError(f"{source}: array of shape {tuple(array.shape)}; expected at least one voxel per axis")
        super().__init__(shape, array.dtype, affine, source, spacing, extra)

    def _read(self, c, x, y, z) -> np.ndarray:
        wanted = {"c": c, "x": x, "y": y, "z": z}
        index, local = [], []
        for axis, n in zip(self.axes, self.array.shape):
            item = wanted.get(axis, 0)
            read, after = _forward(slice(item, item + 1) if isinstance(item, int) else item, int(n))
            index.append(read)
            local.append(after)
        try:
            data = np.asarray(self.array[tuple(index)])[tuple(local)]
        except SlabError:
            raise
        except Exception as err:  # noqa: BLE001 - codecs and stores raise many kinds on damaged chunks
            raise SlabError(f"{self.meta['filename_or_obj']}: a chunk cannot be read ({one_line(err)})") from None
        kept = [a for a in self.axes if a in "czyx"]
        data = data.reshape([n for a, n in zip(self.axes, data.shape) if a in "czyx"])
        if "c" not in kept:
            data, kept = data[np.newaxis], ["c"] + kept
        data = data.transpose([kept.index(a) for a in "cxyz"])
        squeeze = tuple(i for i, item in enumerate((c, x, y, z)) if isinstance(item, int))
        return data.squeeze(squeeze) if squeeze else data

    def close(self) -> None:
        if self._closer is not None:
            self._closer()
            self._closer = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _forward(item: slice, n: int) -> tuple[slice, slice]:
    """A slice with a positive step that stores read, and the slice of what it read that gives
    ``item`` (stores take no negative steps)."""
    picked = range(n)[item]
    if picked.step > 0 or not picked:
        return slice(picked.start, picked.stop, picked.step) if picked else slice(0, 0), slice(None)
    lo = picked[-1]
    return slice(lo, picked[0] + 1), slice(None, None, picked.step)


def default_axes(ndim: int, source) -> str:
    if ndim == 3:
        return "zyx"
    if ndim == 4:
        return "czyx"
    raise SlabError(f"{source}: a {ndim}D array; expected (Z, Y, X) or (C, Z, Y, X)")


def warn_orientation(affine: np.ndarray, path) -> None:
    """Warn that a TIFF keeps only the voxel size of a rotated or flipped volume."""
    import warnings

    affine = np.asarray(affine, dtype=np.float64)
    if not np.allclose(affine, diag_affine(spacing_of(affine), (0, 0, 0)), atol=1e-6):
        warnings.warn(SlabWarning(f"{path}: TIFF stores only the voxel size; the volume's orientation and origin are "
                                  "not kept (write .nii.gz, .nrrd or .zarr to keep them)"), stacklevel=3)


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


__all__ = ["UNITS_MM", "OME_VERSION", "diag_affine", "stored_affine", "restore_affine", "unit_mm", "ArrayVolume",
           "default_axes", "warn_orientation", "block_steps", "copy_blocks"]
