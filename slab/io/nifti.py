"""NIfTI (``.nii``, ``.nii.gz``) through nibabel: qform and sform kept as the file has them (a
disagreement between them is said once), scaled data read as float32, read whole or on demand
(:class:`NiftiVolume`) and written atomically."""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np

from slab.core.errors import SlabError, SlabWarning
from slab.io.common import corner_distance, one_line, suffix_of
from slab.io.headers import check_claim, check_memory
from slab.io.lazy import LazyVolume

# qform and sform further apart than this (mm, at any corner of the volume) are reported.
_FORMS_TOLERANCE = 1e-3


def nifti_dtype(image) -> np.dtype:
    # nibabel moves scl_slope/scl_inter from the image header into its array proxy.
    scaled = (float(image.dataobj.slope), float(image.dataobj.inter)) != (1.0, 0.0)
    # Scaled values come back as float32; torch wants native byte order.
    return np.dtype(np.float32) if scaled else image.get_data_dtype().newbyteorder("=")


def nifti_forms(image) -> dict:
    """The NIfTI header's qform and sform with their codes (kept so that an output written in the
    input's geometry carries both as the input did)."""
    header = image.header
    return {"qform": np.asarray(header.get_qform(), np.float64), "qform_code": int(header["qform_code"]),
            "sform": np.asarray(header.get_sform(), np.float64), "sform_code": int(header["sform_code"])}


_FORMS_WARNED: set[str] = set()  # each file is reported once per process


def _warn_forms(path: Path, image, forms: dict) -> None:
    if not (forms["qform_code"] > 0 and forms["sform_code"] > 0) or str(path) in _FORMS_WARNED:
        return
    apart = corner_distance(forms["qform"], forms["sform"], image.shape[:3])
    if apart > _FORMS_TOLERANCE:
        _FORMS_WARNED.add(str(path))
        warnings.warn(f"{path}: its qform and sform place the volume up to {apart:.2f} mm apart; slab and nibabel "
                      "use the sform, ITK-based viewers (3D Slicer, ITK-SNAP) the qform; NIfTI outputs keep both as "
                      "this file has them, so each viewer shows them where it shows this file", SlabWarning,
                      stacklevel=4)


def open_nifti(path: Path, lazy: bool):
    """nibabel's image for ``path``, its header checked: 3D or 4D, and no more voxels than the
    file can hold (the file size for ``.nii``, 1032 times it for ``.nii.gz``)."""
    try:
        image = nib.load(path, mmap=lazy)
        shape = tuple(int(s) for s in image.shape)
        proxy = image.dataobj
        claimed = math.prod(shape) * proxy.dtype.itemsize
        offset = int(proxy.offset)
        forms = nifti_forms(image)
        _ = image.affine
    except Exception as err:  # noqa: BLE001 - nibabel raises many kinds on a corrupt header
        raise SlabError(f"{path}: not a readable NIfTI file ({one_line(err)})") from None
    if len(shape) < 3:
        raise SlabError(f"{path}: a {len(shape)}D image of shape {shape} where a 3D volume is expected")
    if len(shape) > 4:
        raise SlabError(f"{path}: a {len(shape)}D image; expected (X, Y, Z) or (X, Y, Z, C)")
    if min(shape) < 1:
        raise SlabError(f"{path}: image of shape {shape}; expected at least one voxel per axis")
    size = path.stat().st_size
    if suffix_of(path) == ".nii":
        if size < offset + claimed:
            raise SlabError(f"{path}: truncated NIfTI, {size} bytes where its header needs {offset + claimed}")
    else:
        check_claim(path, claimed, size, "gzip")
    _warn_forms(path, image, forms)
    return image


def read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    image = open_nifti(path, lazy=False)
    proxy = image.dataobj
    dtype = nifti_dtype(image)
    voxels = math.prod(image.shape)
    check_memory(voxels * (proxy.dtype.itemsize + (dtype.itemsize if dtype != proxy.dtype else 0)), str(path))
    try:
        data = np.asarray(proxy.get_unscaled())
        if dtype != proxy.dtype:  # scaled in float32, as nibabel would, without a float64 copy
            data = data.astype(np.float32)
            data *= np.float32(proxy.slope)
            data += np.float32(proxy.inter)
        else:
            data = data.astype(dtype, copy=False)
    except Exception as err:  # noqa: BLE001 - zlib, EOF, OS errors of a damaged file
        raise SlabError(f"{path}: truncated or corrupt NIfTI ({one_line(err)})") from None
    data = data[np.newaxis] if data.ndim == 3 else np.moveaxis(data, -1, 0)
    return data, image.affine, {"nifti_forms": nifti_forms(image), "declared_spacing": image.header.get_zooms()[:3]}


def write_nifti(array: np.ndarray, affine: np.ndarray, path: Path, forms: dict | None = None) -> None:
    """``forms`` (an input's :func:`nifti_forms`): when its sform is ``affine``, the output gets
    the input's qform and sform with their codes, so every viewer shows it where it shows the input."""
    from slab.core.outputs import atomic_write

    data = array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)
    image = nib.Nifti1Image(data, affine, dtype=data.dtype)
    if forms is not None and np.allclose(forms["sform"], affine, atol=1e-6) and forms["sform_code"] > 0:
        image.set_sform(forms["sform"], code=forms["sform_code"])
        image.set_qform(forms["qform"], code=forms["qform_code"])
    else:
        image.set_sform(affine, code=1)
        image.set_qform(affine, code=1)
    image.header.set_xyzt_units("mm")
    with atomic_write(path) as tmp:
        nib.save(image, tmp)


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


__all__ = ["nifti_dtype", "nifti_forms", "open_nifti", "read_nifti", "write_nifti", "NiftiVolume"]
