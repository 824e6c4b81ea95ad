"""Chunked and multi-page volumes, read lazily and written block by block: zarr (v2 and v3) and
OME-Zarr (its multiscale pyramid, any level), HDF5 datasets, multi-page TIFF / BigTIFF
(ImageJ and OME-TIFF metadata). This module holds what they share (:class:`ArrayVolume`, the
geometry helpers) and the zarr reader; :mod:`slab.io.containers` reads HDF5 and TIFF,
:mod:`slab.io.chunked_writers` writes all three.

Axis order. These containers store C-ordered arrays, x fastest: ``(Z, Y, X)``, ``(C, Z, Y, X)``
or the axes an OME-Zarr / OME-TIFF / ImageJ file names (``t`` of size one is dropped). slab's
``(C, X, Y, Z)`` is a transposed view of that, so nothing is copied to reorder axes.

Geometry. OME-Zarr's ``scale`` and ``translation`` (in the axes' unit, converted to mm), HDF5's
``element_size_um`` (Fiji / ilastik, z y x in µm), OME-TIFF's ``PhysicalSize*`` and ImageJ's
resolution and ``spacing``. None of these stores an orientation, so slab also writes its own
voxel-to-world matrix (RAS, level 0) as the attribute ``slab.affine``; on reading, that matrix is
used where it agrees with the container's own voxel size and origin, so an oblique NIfTI comes
back exactly where it was, and every other program shows the volume axis-aligned at the right
size. A pyramid level's matrix is derived from level 0's through the levels' transforms.

Untrusted stores run no code: zarr metadata is read as JSON and checked before zarr opens the
array; object arrays and the pickle codec are refused.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from slab.core.checks import read_json_object
from slab.core.errors import SlabError, SlabWarning
from slab.io.formats import HDF5_SUFFIXES, TIFF_SUFFIXES, ZARR_SUFFIXES, one_line, spacing_of, suffix_of
from slab.io.lazy import LazyVolume

# mm per unit of the OME-NGFF / OME-XML / ImageJ unit names (a unit-less axis is taken as mm).
UNITS_MM = {
    "meter": 1e3, "m": 1e3, "centimeter": 10.0, "cm": 10.0, "millimeter": 1.0, "mm": 1.0, "micrometer": 1e-3,
    "micron": 1e-3, "um": 1e-3, "\u00b5m": 1e-3, "\u03bcm": 1e-3, "nanometer": 1e-6, "nm": 1e-6, "angstrom": 1e-7,
    "\u00c5": 1e-7, "picometer": 1e-9, "pm": 1e-9, "": 1.0, None: 1.0, "pixel": 1.0,
}
OME_VERSION = "0.4"
_REFUSED_CODECS = {"pickle"}  # numcodecs.Pickle unpickles chunk bytes: code from a file


# ---------------------------------------------------------------------------------------------
# Geometry helpers


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


# ---------------------------------------------------------------------------------------------
# A lazy volume over any array with numpy indexing in its own axis order


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


# ---------------------------------------------------------------------------------------------
# zarr and OME-Zarr


def is_zarr(path: Path, metadata: bool = False) -> bool:
    """Whether ``path`` is a zarr store: a directory with zarr metadata, or (unless ``metadata``)
    named ``*.zarr``."""
    path = Path(path)
    return path.is_dir() and ((not metadata and suffix_of(path) in ZARR_SUFFIXES) or any(
        (path / name).is_file() for name in (".zarray", ".zgroup", "zarr.json")))


def zarr_node(path: Path, source) -> tuple[str, dict, dict]:
    """``(kind, metadata, attributes)`` of a zarr node: kind ``"array"``, ``"group"`` or ``""``."""
    if (path / "zarr.json").is_file():
        meta = read_json_object(path / "zarr.json", "zarr metadata")
        kind = meta.get("node_type", "")
        attrs = meta.get("attributes")
        return (kind if kind in ("array", "group") else ""), meta, attrs if isinstance(attrs, dict) else {}
    attrs = read_json_object(path / ".zattrs", "zarr metadata") if (path / ".zattrs").is_file() else {}
    if (path / ".zarray").is_file():
        return "array", read_json_object(path / ".zarray", "zarr metadata"), attrs
    if (path / ".zgroup").is_file():
        return "group", read_json_object(path / ".zgroup", "zarr metadata"), attrs
    return "", {}, attrs


def _check_codecs(path: Path, meta: dict) -> None:
    """Refuse what would run code or hold Python objects: object dtypes, the pickle codec."""
    dtype = meta.get("dtype", meta.get("data_type"))
    codecs = list(meta.get("filters") or []) + [meta.get("compressor")] + list(meta.get("codecs") or [])
    names = {str(c.get("id", c.get("name", ""))).lower() for c in codecs if isinstance(c, dict)}
    if str(dtype).lstrip("|<>=") in ("O", "object") or names & _REFUSED_CODECS or "vlen-utf8" in names:
        raise SlabError(f"{path}: a zarr array of Python objects (dtype {dtype!r}, codecs {sorted(names)}); slab "
                        "reads numeric arrays only and never unpickles a file's data")
    if isinstance(dtype, str) and meta.get("zarr_format") != 3:  # v3 names its types (uint16, ...)
        try:
            np.dtype(dtype)
        except TypeError:
            raise SlabError(f"{path}: zarr dtype {dtype!r} is not a numeric array type") from None


def _multiscales(attrs: dict) -> list | None:
    ome = attrs.get("ome") if isinstance(attrs.get("ome"), dict) else attrs
    found = ome.get("multiscales")
    return found if isinstance(found, list) and found else None


def _ome_transform(transforms, naxes: int, source) -> tuple[np.ndarray, np.ndarray]:
    scale, translation = np.ones(naxes), np.zeros(naxes)
    for item in transforms or []:
        if not isinstance(item, dict):
            raise SlabError(f"{source}: an OME-Zarr coordinateTransformation is not an object")
        kind, values = item.get("type"), item.get(item.get("type") or "")
        if kind == "identity":
            continue
        if kind not in ("scale", "translation"):
            raise SlabError(f"{source}: OME-Zarr coordinate transformation {kind!r}; slab reads scale and translation")
        try:
            values = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            values = None
        if values is None or values.shape != (naxes,) or not np.all(np.isfinite(values)):
            raise SlabError(f"{source}: OME-Zarr {kind} {item.get(kind)!r}; expected {naxes} finite numbers")
        if kind == "scale":
            if np.any(values <= 0):
                raise SlabError(f"{source}: OME-Zarr scale {values.tolist()}; expected positive voxel sizes")
            scale, translation = scale * values, translation * values
        else:
            translation = translation + values
    return scale, translation


def _ome_geometry(multiscale: dict, dataset: dict, source) -> tuple[str, np.ndarray]:
    """The array axes (a string) and the container's RAS-as-stored matrix of one OME dataset."""
    axes = multiscale.get("axes")
    if axes is None:  # OME-Zarr 0.1-0.3 had no axes metadata: 5D tczyx
        axes = ["t", "c", "z", "y", "x"]
    names, units = [], {}
    for axis in axes:
        name = axis.get("name") if isinstance(axis, dict) else axis
        if not isinstance(name, str):
            raise SlabError(f"{source}: OME-Zarr axis {axis!r} has no name")
        names.append(name.lower())
        if isinstance(axis, dict):
            units[name.lower()] = axis.get("unit")
    scale, translation = _ome_transform(dataset.get("coordinateTransformations"), len(names), source)
    outer_scale, outer_translation = _ome_transform(multiscale.get("coordinateTransformations"), len(names), source)
    scale, translation = scale * outer_scale, translation * outer_scale + outer_translation
    mm = {a: unit_mm(units.get(a), source) for a in "zyx" if a in names}
    if len(mm) != 3:
        raise SlabError(f"{source}: OME-Zarr axes {names}; expected z, y and x")
    spacing = [scale[names.index(a)] * mm[a] for a in "xyz"]
    origin = [translation[names.index(a)] * mm[a] for a in "xyz"]
    return "".join(names), diag_affine(spacing, origin)


def _open_zarr_array(path: Path, source):
    import zarr

    try:
        array = zarr.open_array(store=str(path), mode="r")
    except Exception as err:  # noqa: BLE001 - zarr raises many kinds on damaged metadata
        raise SlabError(f"{source}: not a readable zarr array ({one_line(err)})") from None
    _check_chunk_files(path, array, source)
    return array


_ZARR_METADATA = (".zarray", ".zattrs", ".zgroup", ".zmetadata", "zarr.json")


def _check_chunk_files(path: Path, array, source) -> None:
    """Every file of a zarr array's folder is a regular file no larger than a stored chunk (or
    shard) can be, and a zarr v2 array with ``.`` chunk keys holds no folder: zarr reads a chunk
    that is a folder as zeros, and reads a chunk that is a link to ``/dev/zero`` or a sparse
    file whole before it can tell. One ``scandir`` walk, no file opened."""
    import os
    import stat

    from slab.io.headers import stored_limit

    shape = getattr(array, "shards", None) or array.chunks
    limit = stored_limit(int(np.prod(shape)) * array.dtype.itemsize)
    flat = array.metadata.zarr_format == 2 and getattr(array.metadata, "dimension_separator", ".") == "."
    pending = [path]
    while pending:
        folder = pending.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                info = entry.stat()  # follows links: what zarr would read
                if stat.S_ISDIR(info.st_mode):
                    if flat:
                        raise SlabError(f"{source}: {entry.path} is a folder where a zarr chunk belongs")
                    if not entry.is_symlink():
                        pending.append(Path(entry.path))
                    continue
                if not stat.S_ISREG(info.st_mode):
                    raise SlabError(f"{source}: {entry.path} is not a regular file")
                if info.st_size > limit and entry.name not in _ZARR_METADATA:
                    raise SlabError(f"{source}: {entry.path} holds {info.st_size} bytes; a chunk of this array "
                                    f"holds at most {limit}")


def _arrays_in(path: Path, source) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir() and zarr_node(p, source)[0] == "array")


def open_zarr(path, spacing=None) -> ArrayVolume:
    """A zarr array, a zarr group holding one array, or an OME-Zarr image (its level 0; a level's
    own path, ``image.zarr/2``, reads that level) as a lazy volume."""
    path = Path(path)
    source = str(path)
    kind, meta, attrs = zarr_node(path, source)
    if kind == "group":
        multiscales = _multiscales(attrs)
        if multiscales is None and (path / "0").is_dir():  # bioformats2raw: series 0 in 0/
            inner_kind, _, inner_attrs = zarr_node(path / "0", source)
            inner = _multiscales(inner_attrs) if inner_kind == "group" else None
            if inner is not None:
                path, attrs, multiscales = path / "0", inner_attrs, inner
        if multiscales is not None:
            datasets = multiscales[0].get("datasets") if isinstance(multiscales[0], dict) else None
            if not isinstance(datasets, list) or not datasets or not isinstance(datasets[0], dict):
                raise SlabError(f"{source}: OME-Zarr multiscales without datasets")
            return _open_level(path, attrs, multiscales[0], datasets[0], source, spacing)
        arrays = _arrays_in(path, source)
        if len(arrays) != 1:
            listed = ", ".join(arrays[:6]) or "none"
            raise SlabError(f"{source}: a zarr group with {len(arrays)} arrays ({listed}) and no OME-Zarr multiscales; "
                            f"give one array's path, e.g. {path / (arrays[0] if arrays else 'NAME')}")
        return open_zarr(path / arrays[0], spacing)
    if kind != "array":
        raise SlabError(f"{source}: not a zarr array or group (no .zarray, .zgroup or zarr.json)")
    parent = path.parent
    parent_kind, _, parent_attrs = zarr_node(parent, source)
    multiscales = _multiscales(parent_attrs) if parent_kind == "group" else None
    for multiscale in multiscales or []:
        for dataset in (multiscale.get("datasets") or []) if isinstance(multiscale, dict) else []:
            if isinstance(dataset, dict) and dataset.get("path") == path.name:
                return _open_level(parent, parent_attrs, multiscale, dataset, source, spacing)
    _check_codecs(path, meta)
    array = _open_zarr_array(path, source)
    axes = default_axes(array.ndim, source)
    own = stored_affine(attrs, source)
    return ArrayVolume(array, axes, own if own is not None else np.eye(4), source, spacing)


def _open_level(group: Path, attrs: dict, multiscale: dict, dataset: dict, source, spacing) -> ArrayVolume:
    name = dataset.get("path")
    if not isinstance(name, str) or not (group / name).is_dir() \
            or not (group / name).resolve().is_relative_to(group.resolve()) or (group / name).resolve() == group.resolve():
        raise SlabError(f"{source}: OME-Zarr dataset path {name!r} is not in the store")
    kind, meta, _ = zarr_node(group / name, source)
    if kind != "array":
        raise SlabError(f"{group / name}: not a zarr array")
    _check_codecs(group / name, meta)
    axes, level = _ome_geometry(multiscale, dataset, source)
    array = _open_zarr_array(group / name, source)
    if array.ndim != len(axes):
        raise SlabError(f"{source}: a {array.ndim}D array where its OME-Zarr axes are {axes!r}")
    own = stored_affine(attrs, source)
    if own is not None:
        first = multiscale["datasets"][0]
        level = restore_affine(own, _ome_geometry(multiscale, first, source)[1], level)
    return ArrayVolume(array, axes, level, source, spacing)


def warn_orientation(affine: np.ndarray, path) -> None:
    """Warn that a TIFF keeps only the voxel size of a rotated or flipped volume."""
    import warnings

    affine = np.asarray(affine, dtype=np.float64)
    if not np.allclose(affine, diag_affine(spacing_of(affine), (0, 0, 0)), atol=1e-6):
        warnings.warn(SlabWarning(f"{path}: TIFF stores only the voxel size; the volume's orientation and origin are "
                                  "not kept (write .nii.gz, .nrrd or .zarr to keep them)"), stacklevel=3)


__all__ = ["ArrayVolume", "open_zarr", "is_zarr", "warn_orientation", "ZARR_SUFFIXES", "HDF5_SUFFIXES", "TIFF_SUFFIXES",
           "UNITS_MM"]
