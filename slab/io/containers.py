"""HDF5 datasets and multi-page TIFF / BigTIFF (ImageJ and OME-TIFF metadata), read lazily as
:class:`~slab.io.chunked.ArrayVolume` objects; see :mod:`slab.io.chunked` for the axis
order and the geometry they share with zarr."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from slab.io.chunked import ArrayVolume, default_axes, diag_affine, restore_affine, stored_affine, unit_mm
from slab.core.errors import SlabError
from slab.io.formats import HDF5_SUFFIXES, TIFF_SUFFIXES, one_line, suffix_of
from slab.io.headers import tiff_header


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
        axes = default_axes(node.ndim, source)
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
            affine = diag_affine(size[::-1] * 1e-3, (0, 0, 0))
        own = attrs.get("slab_affine")
        if own is not None:
            own = stored_affine({"slab": {"affine": np.asarray(own).tolist()}}, source)
            affine = restore_affine(own, affine, origin=False) if size is not None else own
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
                       * unit_mm(pixels.get(f"PhysicalSize{axis}Unit", "micrometer"), source) if value else 1.0)
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
    mm = unit_mm(unit.replace("\\u00B5", "µ") if isinstance(unit, str) else unit, source)
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


def multipage_tiff(path: Path) -> bool:
    """Whether a ``.tif`` file holds more than one page (a volume, not a slice)."""
    if suffix_of(path) not in TIFF_SUFFIXES:
        return False
    try:
        with open(path, "rb") as handle:
            head = handle.read(1 << 16)
    except OSError:
        return False
    header = tiff_header(path, head)
    if header is not None:
        return header["pages"] != 1
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return len(tif.pages) > 1
    except Exception:  # noqa: BLE001 - a damaged file is reported when it is read
        return False


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
        affine = diag_affine(*geometry) if geometry else np.eye(4)
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


__all__ = ["multipage_tiff", "open_hdf5", "open_tiff", "split_hdf5"]
