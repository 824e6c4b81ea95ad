"""Multi-page TIFF / BigTIFF volumes (ImageJ and OME-TIFF voxel sizes) through tifffile, read
lazily page by page and written block by block as OME-TIFF (the voxel size only: TIFF keeps no
orientation); a one-page TIFF is a slice of a stack, not a volume."""
from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from slab.core.errors import SlabError
from slab.io.arrays import ArrayVolume, diag_affine, unit_mm
from slab.io.common import TIFF_SUFFIXES, one_line, spacing_of, suffix_of
from slab.io.headers import tiff_header


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


__all__ = ["multipage_tiff", "open_tiff", "write_tiff"]
