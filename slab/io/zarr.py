"""zarr (v2 and v3) and OME-Zarr 0.4: an array, a group of one array, or a multiscale image (any
level by its path, ``image.zarr/2``) read lazily, codecs that would run code refused, chunk
files checked against their claims; written block by block with an OME-Zarr pyramid
(labels take every second voxel, images average)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from slab.core.checks import read_json_object
from slab.core.errors import SlabError
from slab.io.arrays import (
    OME_VERSION,
    ArrayVolume,
    block_steps,
    copy_blocks,
    default_axes,
    diag_affine,
    restore_affine,
    stored_affine,
    unit_mm,
)
from slab.io.common import ZARR_SUFFIXES, one_line, spacing_of, suffix_of

_REFUSED_CODECS = {"pickle"}  # numcodecs.Pickle unpickles chunk bytes: code from a file


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


# Written pyramids stop when the largest axis of the last level is at most this.
PYRAMID_MIN = 256


def _ome_axes(channels: int) -> list[dict]:
    axes = [{"name": "c", "type": "channel"}] if channels > 1 else []
    return axes + [{"name": a, "type": "space", "unit": "millimeter"} for a in "zyx"]


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


__all__ = ["is_zarr", "zarr_node", "open_zarr", "PYRAMID_MIN", "pyramid_shapes", "write_zarr", "read_notes"]
