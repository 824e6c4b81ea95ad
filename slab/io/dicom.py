"""DICOM series through GDCM (SimpleITK), checked first with pydicom's headers: one series per
directory, one orientation, slice positions evenly spaced along the normal (no gaps, no
repeats), memory for the volume, and 16-bit CT kept in its stored dtype."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from slab.core.errors import SlabError
from slab.io.itk import itk_volume
from slab.io.common import LPS_TO_RAS, native, one_line
from slab.io.headers import check_memory


def _series_files(directory: Path) -> list[str]:
    reader = sitk.ImageSeriesReader()
    with native():
        try:
            series = reader.GetGDCMSeriesIDs(str(directory))
        except RuntimeError as err:
            raise SlabError(f"{directory}: not a readable DICOM directory ({one_line(err)})") from None
        if len(series) != 1:
            raise SlabError(f"{directory}: holds {len(series)} DICOM series; expected one series per directory")
        # GDCM orders the files by slice position along the slice normal.
        return list(reader.GetGDCMSeriesFileNames(str(directory), series[0]))


def _dicom_headers(directory: Path, files: list[str]):
    import pydicom

    try:
        return [pydicom.dcmread(f, stop_before_pixels=True, force=True) for f in files]
    except Exception as err:  # noqa: BLE001 - pydicom raises many kinds on damaged files
        raise SlabError(f"{directory}: not a readable DICOM series ({one_line(err)})") from None


def check_dicom_series(directory: Path, headers) -> None:
    """One orientation, and slice positions evenly spaced along the normal: no gaps, no repeats.

    A series with a gap or uneven positions would be stacked at an averaged spacing (ITK's
    behaviour), putting every slice but the ends in the wrong place.
    """
    if len(headers) < 2:
        return
    try:
        orientations = np.array([[float(v) for v in h.ImageOrientationPatient] for h in headers])
        positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
    except (AttributeError, TypeError, ValueError):
        raise SlabError(f"{directory}: DICOM slices without ImageOrientationPatient / ImagePositionPatient; "
                        "cannot place them in 3D") from None
    if orientations.shape[1] != 6 or positions.shape[1] != 3:
        raise SlabError(f"{directory}: malformed ImageOrientationPatient or ImagePositionPatient")
    if not np.allclose(orientations, orientations[0], atol=1e-4):
        raise SlabError(f"{directory}: the DICOM series mixes slice orientations; expected one")
    normal = np.cross(orientations[0, :3], orientations[0, 3:])
    along = positions @ normal
    steps = np.diff(along)
    step = float(np.median(steps))
    if abs(step) < 1e-6 or np.any(np.abs(steps) < 1e-6):
        raise SlabError(f"{directory}: the DICOM series repeats slice positions ({len(headers)} files at "
                        f"{len(np.unique(np.round(along, 4)))} positions); expected one slice per position")
    worst = int(np.argmax(np.abs(steps - step)))
    if abs(steps[worst] - step) > 0.01 * abs(step) + 1e-3:
        raise SlabError(f"{directory}: DICOM slice positions are not evenly spaced ({abs(steps[worst]):.4g} mm between "
                        f"slices {worst} and {worst + 1}, {abs(step):.4g} mm elsewhere: a gap or a second stack); "
                        "split the series into evenly spaced parts")


def dicom_series(directory: Path) -> tuple[list[str], list]:
    """``(files, headers)`` of the one DICOM series in ``directory``, checked as
    :func:`read_dicom` checks them, in the order of slab's z axis (GDCM's order: position along
    the slice normal); headers without pixel data."""
    files = _series_files(directory)
    headers = _dicom_headers(directory, files)
    check_dicom_series(directory, headers)
    return files, headers


def dicom_files(directory: Path) -> list[str]:
    """The files of :func:`dicom_series`."""
    return dicom_series(directory)[0]


def _stored_dtype(header) -> np.dtype | None:
    """The dtype that holds the rescaled values of a 16-bit series (slope 1, integer intercept)."""
    try:
        bits, signed = int(header.BitsStored), int(header.PixelRepresentation) == 1
        slope = float(getattr(header, "RescaleSlope", 1) or 1)
        intercept = float(getattr(header, "RescaleIntercept", 0) or 0)
        allocated = int(header.BitsAllocated)
    except (AttributeError, TypeError, ValueError):
        return None
    if allocated != 16 or slope != 1 or not intercept.is_integer():
        return None
    low = (-(1 << (bits - 1)) if signed else 0) + int(intercept)
    high = ((1 << (bits - 1)) - 1 if signed else (1 << bits) - 1) + int(intercept)
    for dtype in (np.int16, np.uint16):
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return np.dtype(dtype)
    return np.dtype(np.int16) if signed else np.dtype(np.uint16)  # checked on the values below


def dicom_info(directory: Path) -> tuple[tuple[int, ...], np.dtype, np.ndarray] | None:
    """``(shape (1, X, Y, Z), dtype, RAS affine)`` of the series from its headers alone, checked as
    :func:`read_dicom` checks them (the placement GDCM gives: origin at the first slice in its
    order, axes the rows, columns and slice normal, the slice step between its positions); the
    dtype is the stored one where the rescale keeps it, else float32 (what a read may widen to).
    None for what headers cannot place (one slice, colour), which a read then describes."""
    files, headers = dicom_series(directory)
    first = headers[0]
    try:
        rows, cols, samples = int(first.Rows), int(first.Columns), int(getattr(first, "SamplesPerPixel", 1))
        row_mm, col_mm = (float(v) for v in first.PixelSpacing)
        orientation = np.array([float(v) for v in first.ImageOrientationPatient])
        positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
    except (AttributeError, TypeError, ValueError):
        return None
    if len(files) < 2 or samples != 1:
        return None
    normal = np.cross(orientation[:3], orientation[3:])
    step = float((positions[-1] - positions[0]) @ normal) / (len(files) - 1)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = orientation[:3] * col_mm, orientation[3:] * row_mm
    lps[:3, 2] = normal * step
    lps[:3, 3] = positions[0]
    stored = _stored_dtype(first)
    return (1, cols, rows, len(files)), stored if stored is not None else np.dtype(np.float32), LPS_TO_RAS @ lps


def read_dicom(directory: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    files, headers = dicom_series(directory)
    try:
        rows, cols = int(headers[0].Rows), int(headers[0].Columns)
    except (AttributeError, TypeError, ValueError):
        raise SlabError(f"{directory}: DICOM slices without Rows / Columns") from None
    check_memory(2 * rows * cols * len(files) * 4, str(directory))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    with native():
        try:
            image = reader.Execute()
        except Exception as err:  # noqa: BLE001 - GDCM errors on damaged files
            raise SlabError(f"{directory}: not a readable DICOM series ({one_line(err)})") from None
    data, affine = itk_volume(image, directory)
    stored = _stored_dtype(headers[0])
    if stored is not None and data.dtype != stored and data.size:
        info = np.iinfo(stored)
        if info.min <= data.min() and data.max() <= info.max:
            data = data.astype(stored)  # ITK widens 16-bit CT to int32 for the intercept
    return data, affine, {"declared_spacing": image.GetSpacing()}

