"""NRRD and MetaImage (``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``) through SimpleITK: headers checked
(:mod:`slab.io.headers`) before ITK parses them, LPS on disk and RAS in slab, shear refused,
compressed on write, 3D Slicer's NRRD fields kept."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from slab.core.errors import SlabError
from slab.io.common import LPS_TO_RAS, is_sheared, native, one_line, spacing_of, suffix_of
from slab.io.headers import check_memory, check_metaimage, check_nrrd


def itk_affine(image: sitk.Image) -> np.ndarray:
    lps = np.eye(4)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=np.float64)
    lps[:3, 3] = image.GetOrigin()
    return LPS_TO_RAS @ lps


def itk_volume(image: sitk.Image, path: Path) -> tuple[np.ndarray, np.ndarray]:
    if image.GetDimension() != 3:
        raise SlabError(
            f"{path}: a {image.GetDimension()}D image of size {image.GetSize()} where a 3D volume is expected"
        )
    array = sitk.GetArrayFromImage(image)  # (Z, Y, X) or (Z, Y, X, C)
    data = array.transpose(2, 1, 0)[np.newaxis] if array.ndim == 3 else array.transpose(3, 2, 1, 0)
    return data, itk_affine(image)


def check_itk_header(path: Path) -> dict:
    """The MetaImage or NRRD header validated (:mod:`slab.io.headers`) before ITK parses it."""
    return check_nrrd(path) if suffix_of(path) in (".nrrd", ".nhdr") else check_metaimage(path)


def read_itk(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    header = check_itk_header(path)
    check_memory(2 * header["claimed"], str(path))  # ITK's buffer and the array made from it
    try:
        with native():
            image = sitk.ReadImage(str(path))
    except Exception as err:  # noqa: BLE001 - ITK raises RuntimeError, and others on odd headers
        raise SlabError(f"{path}: not a readable {suffix_of(path)} image ({one_line(err)})") from None
    data, affine = itk_volume(image, path)
    return data, affine, {"declared_spacing": image.GetSpacing()}


def write_itk(array: np.ndarray, affine: np.ndarray, path: Path, fields: dict | None = None) -> None:
    """``array`` (C, X, Y, Z) in RAS ``affine`` as an ITK file (LPS, compressed); ``fields``
    become NRRD key/value pairs (``key:=value``), e.g. a ``.seg.nrrd``'s segment metadata."""
    from slab.core.outputs import atomic_write

    if is_sheared(affine):
        raise SlabError(f"{path}: the volume's affine is sheared (its axes are not orthogonal), which NRRD/MHA "
                        "cannot store (ITK would move it); write NIfTI instead")
    if array.shape[0] == 1:
        image = sitk.GetImageFromArray(array[0].transpose(2, 1, 0))
    else:
        image = sitk.GetImageFromArray(array.transpose(3, 2, 1, 0), isVector=True)
    lps = LPS_TO_RAS @ affine
    spacing = np.asarray(spacing_of(lps))
    image.SetSpacing(spacing.tolist())
    image.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    for key, value in (fields or {}).items():
        image.SetMetaData(key, value)
    with atomic_write(path) as tmp:
        try:
            with native():
                sitk.WriteImage(image, str(tmp), True)  # compressed, as .nii.gz is
        except RuntimeError as err:
            raise SlabError(f"{path}: cannot write {array.dtype} as {suffix_of(path)} ({one_line(err)})") from None
        if array.shape[0] > 1 and fields and "Segmentation_MasterRepresentation" in fields:
            _layers_kind(tmp)


def _layers_kind(nrrd: Path) -> None:
    """A segmentation's layers as 3D Slicer writes and reads them: the first axis of kind
    ``list`` (ITK writes ``vector``, which Slicer's reader refuses)."""
    data = nrrd.read_bytes()
    end = data.index(b"\n\n")  # the header ends at the first blank line; the data follows
    header = data[:end].replace(b"\nkinds: vector domain domain domain", b"\nkinds: list domain domain domain", 1)
    nrrd.write_bytes(header + data[end:])


__all__ = ["itk_affine", "itk_volume", "check_itk_header", "read_itk", "write_itk"]
