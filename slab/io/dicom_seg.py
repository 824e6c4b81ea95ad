"""DICOM Segmentation (SEG) objects of a mask predicted from a DICOM series, through ``highdicom``.

A mask written as ``name.dcm`` is one binary SEG instance: one segment per label (overlapping
labels such as BraTS regions stay apart), its frames referencing the slices of the source series
by SOP Instance UID, in the study of that series (patient and study attributes copied from it),
so that 3D Slicer (QuantitativeReporting), OHIF and PACS viewers place it on those slices.

Segments carry the label names and SNOMED CT codes where the name is a known structure
(``stomach``, ``large_bowel``, ``vessel``: an anatomical structure; ``tumour``, ``edema``: a
morphologically abnormal structure), else the generic "Tissue"; the
algorithm is identified as slab's automatic segmentation. :func:`check_dicom_seg` refuses, before
anything is read, a SEG whose input is not one DICOM series directory.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from slab.core.errors import SlabError

SUFFIX = ".dcm"
# A label name (lower case, words joined by "_") to the SNOMED CT keyword of its property type.
_PROPERTY_TYPES = {
    "stomach": "Stomach", "large_bowel": "LargeIntestine", "large_intestine": "LargeIntestine", "colon": "Colon",
    "small_bowel": "SmallIntestine", "small_intestine": "SmallIntestine", "kidney": "Kidney", "liver": "Liver",
    "spleen": "Spleen", "pancreas": "Pancreas", "vessel": "BloodVessel", "vessels": "BloodVessel",
    "blood_vessel": "BloodVessel", "artery": "Artery", "vein": "Vein", "vertebra": "Vertebra",
    "tumour": "Neoplasm", "tumor": "Neoplasm", "neoplasm": "Neoplasm", "edema": "Edema", "oedema": "Edema",
    "necrosis": "Necrosis",
}
_ABNORMAL = {"Neoplasm", "Edema", "Necrosis"}
# what a SEG copies from its source images and references them by
_REFERENCED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "FrameOfReferenceUID")


def is_dicom_seg(path) -> bool:
    """Whether a mask output named ``path`` is written as a DICOM SEG (a ``.dcm`` name)."""
    return Path(path).suffix.lower() == SUFFIX


def check_dicom_seg(output_path, source) -> None:
    """SlabError unless ``source`` (what the mask is predicted from) is one DICOM series
    directory that a SEG at ``output_path`` can reference, and ``highdicom`` is installed."""
    output = Path(output_path)
    if output.is_dir():
        raise SlabError(f"{output}: exists and is a directory; a DICOM SEG is one file")
    if isinstance(source, (list, tuple)) or not Path(source).is_dir():
        raise SlabError(f"-o {output}: a DICOM SEG references the slices it segments; the input must be one DICOM "
                        f"series directory (got {source}); give a .nii.gz or .seg.nrrd name for other inputs")
    try:
        import highdicom  # noqa: F401
    except ImportError:
        raise SlabError(f"-o {output}: writing DICOM SEG needs highdicom (pip install 'slab-seg[dicom]')") from None
    from slab.io.dicom import dicom_series

    files, headers = dicom_series(Path(source))  # one readable, evenly spaced series, else its own line
    first, header = files[0], headers[0]
    missing = [key for key in _REFERENCED if not str(header.get(key, "") or "").strip()]
    if missing:
        raise SlabError(f"{first}: no {', '.join(missing)}; a DICOM SEG must reference the series' study, frame of "
                        "reference and instances (give a .nii.gz or .seg.nrrd name instead)")
    _check_frame_size(int(header.get("Rows", 0) or 0), int(header.get("Columns", 0) or 0), source)


def _check_frame_size(rows: int, columns: int, source) -> None:
    # Binary frames are bit-packed end to end; highdicom (0.28) pads frames of fewer than 8
    # pixels to a byte each and pydicom cannot unpack them, so such a SEG would read back wrong.
    if rows * columns < 8:
        raise SlabError(f"{source}: slices of {columns}x{rows} pixels; a DICOM SEG needs at least 8 pixels per "
                        "slice (give a .nii.gz or .seg.nrrd name instead)")


def _code(name: str):
    from pydicom.sr.codedict import codes

    key = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    keyword = _PROPERTY_TYPES.get(key) or _PROPERTY_TYPES.get(key.rstrip("s"))
    prop = getattr(codes.SCT, keyword) if keyword else codes.SCT.Tissue
    if keyword in _ABNORMAL:
        category = codes.SCT.MorphologicallyAbnormalStructure
    else:
        category = codes.SCT.AnatomicalStructure if keyword else codes.SCT.Tissue
    return category, prop


def write_dicom_seg(mask, source, path, names: Sequence[str], *, version: str = "") -> Path:
    """``mask`` (C, X, Y, Z), a 0/1 channel per label on the grid of the DICOM series directory
    ``source`` as slab loads it, as a binary DICOM SEG at ``path`` (written atomically).

    slab's axes are ITK's: X the columns, Y the rows, Z the slices in order of position along the
    normal, which is the order of the series' files (:func:`slab.io.dicom.dicom_files`);
    frame ``z`` of segment ``c`` is ``mask[c, :, :, z].T`` on the instance of slice ``z``.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from slab.io.dicom import dicom_series
    from slab.io.common import one_line
    from slab.core.outputs import atomic_write

    source = Path(source)
    _, datasets = dicom_series(source)  # each header read once, in slab's z order
    mask = np.asarray(mask)
    channels, columns, rows, depth = mask.shape
    if (depth, rows, columns) != (len(datasets), int(datasets[0].Rows), int(datasets[0].Columns)):
        raise SlabError(f"{path}: a mask of {columns}x{rows}x{depth} voxels does not lie on the grid of {source} "
                        f"({int(datasets[0].Columns)}x{int(datasets[0].Rows)}x{len(datasets)})")
    _check_frame_size(rows, columns, source)
    if len(names) != channels:
        names = [f"label_{i + 1}" for i in range(channels)]
    algorithm = hd.AlgorithmIdentificationSequence(name="slab", version=version or "0",
                                                   family=codes.cid7162.ArtificialIntelligence)
    segments = []
    for number, name in enumerate(names, start=1):
        category, prop = _code(name)
        segments.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=str(name)[:64], segmented_property_category=category,
            segmented_property_type=prop, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm, tracking_uid=hd.UID(), tracking_id=str(name)[:64]))
    frames = np.ascontiguousarray(mask.transpose(3, 2, 1, 0) > 0).astype(np.uint8)  # (slices, rows, cols, labels)
    try:
        seg = hd.seg.Segmentation(
            source_images=datasets, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=segments, series_instance_uid=hd.UID(), series_number=_series_number(datasets[0]),
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="slab", manufacturer_model_name="slab",
            software_versions=version or "0", device_serial_number="0", series_description="slab segmentation",
            omit_empty_frames=False)
    except (ValueError, TypeError, AttributeError) as err:  # what highdicom finds missing in the source
        raise SlabError(f"{path}: cannot write a DICOM SEG of {source} ({one_line(err)})") from None
    with atomic_write(path) as staged:
        seg.save_as(staged)
    return Path(path)


def _series_number(header) -> int:
    try:
        return int(header.SeriesNumber) + 1000
    except (AttributeError, TypeError, ValueError):
        return 1000
