"""Chunked and multi-page volumes, read lazily and written block by block: zarr (v2 and v3) and
OME-Zarr (its multiscale pyramid, any level), HDF5 datasets, multi-page TIFF / BigTIFF
(ImageJ and OME-TIFF metadata).

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

import math
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from slab.transforms.checks import read_json_object
from slab.transforms.errors import SlabError, SlabWarning
from slab.transforms.formats import HDF5_SUFFIXES, TIFF_SUFFIXES, ZARR_SUFFIXES, one_line, spacing_of, suffix_of
from slab.transforms.lazy import LazyVolume

# mm per unit of the OME-NGFF / OME-XML / ImageJ unit names (a unit-less axis is taken as mm).
UNITS_MM = {
    "meter": 1e3, "m": 1e3, "centimeter": 10.0, "cm": 10.0, "millimeter": 1.0, "mm": 1.0, "micrometer": 1e-3,
    "micron": 1e-3, "um": 1e-3, "µm": 1e-3, "\u00b5m": 1e-3, "nanometer": 1e-6, "nm": 1e-6, "angstrom": 1e-7,
    "\u00c5": 1e-7, "picometer": 1e-9, "pm": 1e-9, "": 1.0, None: 1.0, "pixel": 1.0,
}
OME_VERSION = "0.4"
_REFUSED_CODECS = {"pickle"}  # numcodecs.Pickle unpickles chunk bytes: code from a file
# Written pyramids stop when the largest axis of the last level is at most this.
PYRAMID_MIN = 256


# ---------------------------------------------------------------------------------------------
# Geometry helpers


def _diag_affine(spacing_xyz, origin_xyz) -> np.ndarray:
    affine = np.diag([*map(float, spacing_xyz), 1.0])
    affine[:3, 3] = [float(o) for o in origin_xyz]
    return affine


def _slab_affine(attrs: dict, source) -> np.ndarray | None:
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


def _restore(own: np.ndarray, level0: np.ndarray, level: np.ndarray | None = None, origin: bool = True) -> np.ndarray:
    """slab's matrix ``own`` (written for level 0, whose container geometry is ``level0``) where it
    agrees with the container (same voxel size, and same ``origin`` where the container has
    one), carried to a ``level`` of its own container geometry; else the container's."""
    level = level0 if level is None else level
    agrees = (np.allclose(spacing_of(own), np.diag(level0)[:3], rtol=1e-5, atol=1e-9)
              and (not origin or np.allclose(own[:3, 3], level0[:3, 3], rtol=1e-6, atol=1e-6)))
    if agrees and not origin:
        return own
    return own @ np.linalg.inv(level0) @ level if agrees else level


def _unit_mm(unit, source) -> float:
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


def _default_axes(ndim: int, source) -> str:
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


def _node(path: Path, source) -> tuple[str, dict, dict]:
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
    mm = {a: _unit_mm(units.get(a), source) for a in "zyx" if a in names}
    if len(mm) != 3:
        raise SlabError(f"{source}: OME-Zarr axes {names}; expected z, y and x")
    spacing = [scale[names.index(a)] * mm[a] for a in "xyz"]
    origin = [translation[names.index(a)] * mm[a] for a in "xyz"]
    return "".join(names), _diag_affine(spacing, origin)


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

    from slab.transforms.headers import stored_limit

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
    return sorted(p.name for p in path.iterdir() if p.is_dir() and _node(p, source)[0] == "array")


def open_zarr(path, spacing=None) -> ArrayVolume:
    """A zarr array, a zarr group holding one array, or an OME-Zarr image (its level 0; a level's
    own path, ``image.zarr/2``, reads that level) as a lazy volume."""
    path = Path(path)
    source = str(path)
    kind, meta, attrs = _node(path, source)
    if kind == "group":
        multiscales = _multiscales(attrs)
        if multiscales is None and (path / "0").is_dir():  # bioformats2raw: series 0 in 0/
            inner_kind, _, inner_attrs = _node(path / "0", source)
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
    parent_kind, _, parent_attrs = _node(parent, source)
    multiscales = _multiscales(parent_attrs) if parent_kind == "group" else None
    for multiscale in multiscales or []:
        for dataset in (multiscale.get("datasets") or []) if isinstance(multiscale, dict) else []:
            if isinstance(dataset, dict) and dataset.get("path") == path.name:
                return _open_level(parent, parent_attrs, multiscale, dataset, source, spacing)
    _check_codecs(path, meta)
    array = _open_zarr_array(path, source)
    axes = _default_axes(array.ndim, source)
    own = _slab_affine(attrs, source)
    return ArrayVolume(array, axes, own if own is not None else np.eye(4), source, spacing)


def _open_level(group: Path, attrs: dict, multiscale: dict, dataset: dict, source, spacing) -> ArrayVolume:
    name = dataset.get("path")
    if not isinstance(name, str) or not (group / name).is_dir() \
            or not (group / name).resolve().is_relative_to(group.resolve()) or (group / name).resolve() == group.resolve():
        raise SlabError(f"{source}: OME-Zarr dataset path {name!r} is not in the store")
    kind, meta, _ = _node(group / name, source)
    if kind != "array":
        raise SlabError(f"{group / name}: not a zarr array")
    _check_codecs(group / name, meta)
    axes, level = _ome_geometry(multiscale, dataset, source)
    array = _open_zarr_array(group / name, source)
    if array.ndim != len(axes):
        raise SlabError(f"{source}: a {array.ndim}D array where its OME-Zarr axes are {axes!r}")
    own = _slab_affine(attrs, source)
    if own is not None:
        first = multiscale["datasets"][0]
        level = _restore(own, _ome_geometry(multiscale, first, source)[1], level)
    return ArrayVolume(array, axes, level, source, spacing)


# ---------------------------------------------------------------------------------------------
# HDF5


def split_hdf5(path) -> tuple[Path, str | None] | None:
    """``(file, dataset)`` for ``file.h5`` or ``file.h5/group/dataset``; None for other paths."""
    path = Path(path)
    for i, part in enumerate(path.parts):
        if suffix_of(Path(part)) in HDF5_SUFFIXES:
            file = Path(*path.parts[: i + 1])
            inner = "/".join(path.parts[i + 1:])
            if file.is_file() or not inner:
                return file, inner or None
    return None


def open_hdf5(path, spacing=None) -> ArrayVolume:
    import h5py

    file, name = split_hdf5(path)
    source = str(path)
    if not file.is_file():
        raise SlabError(f"{file}: no such file")
    try:
        handle = h5py.File(file, "r")
    except Exception as err:  # noqa: BLE001 - h5py raises OSError and others on damaged files
        raise SlabError(f"{file}: not a readable HDF5 file ({one_line(err)})") from None
    try:
        if name is None:
            found = []
            handle.visititems(lambda key, node: found.append(key) if isinstance(node, h5py.Dataset)
                              and node.ndim in (3, 4) else None)
            if len(found) != 1:
                listed = ", ".join(found[:6]) or "none"
                raise SlabError(f"{file}: holds {len(found)} 3D/4D datasets ({listed}); name one, "
                                f"e.g. {file}/{found[0] if found else 'DATASET'}")
            name = found[0]
        node = handle.get(name)
        if not isinstance(node, h5py.Dataset):
            raise SlabError(f"{source}: no dataset {name!r} in {file}")
        if node.dtype.kind not in "biuf":
            raise SlabError(f"{source}: a dataset of {node.dtype}; expected numbers")
        axes = _default_axes(node.ndim, source)
        attrs = dict(node.attrs)
        size = attrs.get("element_size_um")
        affine = np.eye(4)
        if size is not None:
            try:
                size = np.asarray(size, dtype=np.float64).ravel()
            except (TypeError, ValueError):
                raise SlabError(f"{source}: element_size_um {size!r:.60}; expected three positive sizes (z y x)") \
                    from None
            if size.shape != (3,) or not np.all(np.isfinite(size)) or np.any(size <= 0):
                raise SlabError(f"{source}: element_size_um {size.tolist()}; expected three positive sizes (z y x)")
            affine = _diag_affine(size[::-1] * 1e-3, (0, 0, 0))
        own = attrs.get("slab_affine")
        if own is not None:
            own = _slab_affine({"slab": {"affine": np.asarray(own).tolist()}}, source)
            affine = _restore(own, affine, origin=False) if size is not None else own
        return ArrayVolume(node, axes, affine, source, spacing, closer=handle.close)
    except BaseException:
        handle.close()
        raise


# ---------------------------------------------------------------------------------------------
# Multi-page TIFF


def _ome_tiff_geometry(xml: str, source) -> tuple[list[float], list[float]] | None:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    pixels = next((e for e in root.iter() if e.tag.endswith("Pixels")), None)
    if pixels is None:
        return None
    spacing = []
    for axis in "XYZ":
        value = pixels.get(f"PhysicalSize{axis}")
        spacing.append(_positive_size(value, f"OME PhysicalSize{axis}", source)
                       * _unit_mm(pixels.get(f"PhysicalSize{axis}Unit", "micrometer"), source) if value else 1.0)
    return spacing, [0.0, 0.0, 0.0]


def _positive_size(value, what: str, source) -> float:
    """A voxel size from a file's metadata: a positive finite number, or a SlabError naming it
    (a negative size would mirror an axis without a word, text would be a traceback)."""
    try:
        size = float(value)
    except (TypeError, ValueError):
        raise SlabError(f"{source}: {what} is {value!r:.40}; expected a positive number") from None
    if not np.isfinite(size) or size <= 0:
        raise SlabError(f"{source}: {what} is {value!r:.40}; expected a positive number")
    return size


def _imagej_geometry(tif, meta: dict, source) -> tuple[list[float], list[float]]:
    page = tif.pages[0]
    unit = meta.get("unit")
    mm = _unit_mm(unit.replace("\\u00B5", "µ") if isinstance(unit, str) else unit, source)
    spacing = []
    for tag in ("XResolution", "YResolution"):
        value = page.tags.get(tag)
        num, den = value.value if value is not None else (1, 1)
        if num < 0 or den < 0:
            raise SlabError(f"{source}: TIFF {tag} {num}/{den}; expected a positive resolution")
        spacing.append(den / num * mm if num > 0 and den > 0 else 1.0)
    spacing.append(_positive_size(meta.get("spacing", 1.0), "ImageJ spacing", source) * mm)
    images = meta.get("images")
    pages = len(tif.pages)  # ImageJ writes a page per image (one, with the rest after it, past 4 GB)
    if images is not None and (not isinstance(images, int) or images < 1 or (pages > 1 and images != pages)):
        raise SlabError(f"{source}: the ImageJ header claims {images!r} images in {pages} TIFF pages; "
                        "expected one page per image")
    return spacing, [0.0, 0.0, 0.0]


def open_tiff(path, spacing=None) -> ArrayVolume:
    """A TIFF file's first series: one page per z (a single page is a one-slice volume)."""
    import tifffile
    import zarr

    path = Path(path)
    source = str(path)
    try:
        tif = tifffile.TiffFile(path)
    except Exception as err:  # noqa: BLE001 - tifffile raises many kinds on damaged files
        raise SlabError(f"{path}: not a readable TIFF file ({one_line(err)})") from None
    try:
        if not tif.series:
            raise SlabError(f"{path}: a TIFF file without images")
        series = tif.series[0]
        axes = series.axes.lower().replace("i", "z").replace("q", "z")
        if "s" in axes and series.shape[axes.index("s")] != 1:
            raise SlabError(f"{path}: an RGB/multi-sample TIFF of shape {series.shape}; expected grey slices")
        one_page = "z" not in axes
        if not one_page and (any(axes.count(a) > 1 for a in "czyx") or not set("zyx") <= set(axes)):
            raise SlabError(f"{path}: TIFF series of shape {series.shape} and axes {series.axes}; expected "
                            "pages of grey Y x X slices (Z, Y, X)")
        shapes = {tuple(page.shape) for page in tif.pages[:4096]}
        if len(shapes) > 1 and len(series.pages) < len(tif.pages):  # the first series would drop the others
            raise SlabError(f"{path}: TIFF pages of different sizes ({', '.join('x'.join(map(str, s)) for s in sorted(shapes)[:3])}); "
                            "expected one size for every slice")
        geometry = None
        if tif.is_ome and tif.ome_metadata:
            geometry = _ome_tiff_geometry(tif.ome_metadata, source)
        elif tif.is_imagej and tif.imagej_metadata is not None:
            geometry = _imagej_geometry(tif, tif.imagej_metadata, source)
        affine = _diag_affine(*geometry) if geometry else np.eye(4)
        try:
            store = series.aszarr()
            array = zarr.open_array(store=store, mode="r")
        except Exception as err:  # noqa: BLE001
            raise SlabError(f"{path}: TIFF pages cannot be read ({one_line(err)})") from None
        if one_page:  # a one-slice volume
            array, axes = _OnePage(array), "z" + axes
        return ArrayVolume(array, axes, affine, source, spacing, closer=tif.close)
    except BaseException:
        tif.close()
        raise


class _OnePage:
    """A 2D array seen as ``(1, Y, X)``."""

    def __init__(self, array):
        self.array, self.dtype, self.shape = array, array.dtype, (1,) + tuple(array.shape)

    def __getitem__(self, index):
        return np.asarray(self.array[index[1:]])[np.newaxis][index[:1]]


# ---------------------------------------------------------------------------------------------
# Writers (block by block; a LazyVolume is never loaded whole)


def _tiles(volume, zstep: int, ystep: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """``(z0, y0, block as (C, dz, dy, X))`` over a (C, X, Y, Z) volume, ``zstep`` x ``ystep`` at a time."""
    _, _, height, depth = volume.shape
    for z0 in range(0, depth, zstep):
        for y0 in range(0, height, ystep):
            block = np.asarray(volume[:, :, y0:y0 + ystep, z0:z0 + zstep])
            yield z0, y0, block.transpose(0, 3, 2, 1)


def _steps(volume, chunks, block_bytes: int) -> tuple[int, int]:
    """Whole chunks of z and y (``chunks``: one size, or ``(z, y)``) per block, as many y chunks as
    ``block_bytes`` allow (at least one)."""
    cz, cy = chunks if isinstance(chunks, (tuple, list)) else (chunks, chunks)
    _, width, height, depth = volume.shape
    zstep = min(cz, depth)
    row = max(1, volume.shape[0] * zstep * width * np.dtype(volume.dtype).itemsize)
    ystep = max(1, block_bytes // row // cy) * cy
    return zstep, min(ystep, height)


def _copy(source, target, channels: int, zstep: int, ystep: int, labels: bool | None) -> None:
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

    from slab.transforms.outputs import atomic_write

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
    zstep, ystep = _steps(volume, zyx[:2], block_bytes)
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
                _copy(source, array, channels, zstep, ystep, labels if i else None)
                source = ArrayVolume(array, "czyx" if channels > 1 else "zyx", np.eye(4), str(path))
            group.attrs.update(attrs)
        except (SlabError, OSError):
            raise
        except (ValueError, TypeError) as err:
            raise SlabError(f"{path}: cannot write {volume.dtype} as zarr ({one_line(err)})") from None


def read_notes(path) -> dict:
    """The ``slab`` attribute of a zarr store written by :func:`write_zarr` ({} when there is none)."""
    try:
        kind, _, attrs = _node(Path(path), str(path))
    except SlabError:
        return {}
    notes = attrs.get("slab") if kind == "group" else None
    return notes if isinstance(notes, dict) else {}


def write_hdf5(volume, affine: np.ndarray, path: Path, dataset: str = "volume", chunks: int = 64,
               block_bytes: int = 256 << 20) -> None:
    """One chunked, gzip-compressed HDF5 dataset ``(Z, Y, X)`` or ``(C, Z, Y, X)`` with Fiji's
    ``element_size_um`` (z y x) and slab's matrix (``slab_affine``), written block by block."""
    import h5py

    from slab.transforms.outputs import atomic_write

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
            _copy(volume, data, channels, *_steps(volume, chunks, block_bytes), None)


def write_tiff(volume, affine: np.ndarray, path: Path) -> None:
    """A multi-page OME-TIFF (one zlib-compressed page per z, channels as OME's C; BigTIFF past
    2 GiB) with its voxel size in mm, written page by page."""
    import tifffile

    from slab.transforms.outputs import atomic_write

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


def warn_orientation(affine: np.ndarray, path) -> None:
    """Warn that a TIFF keeps only the voxel size of a rotated or flipped volume."""
    import warnings

    affine = np.asarray(affine, dtype=np.float64)
    if not np.allclose(affine, _diag_affine(spacing_of(affine), (0, 0, 0)), atol=1e-6):
        warnings.warn(SlabWarning(f"{path}: TIFF stores only the voxel size; the volume's orientation and origin are "
                                  "not kept (write .nii.gz, .nrrd or .zarr to keep them)"), stacklevel=3)


__all__ = ["ArrayVolume", "open_zarr", "open_hdf5", "open_tiff", "write_zarr", "write_hdf5", "write_tiff", "is_zarr",
           "split_hdf5", "pyramid_shapes", "ZARR_SUFFIXES", "HDF5_SUFFIXES", "TIFF_SUFFIXES", "UNITS_MM"]
