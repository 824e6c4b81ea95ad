"""DICOM SEG output: a mask predicted from a DICOM series, read back with highdicom (the reader
OHIF's and Slicer's DICOM tools share the model of) and pydicom: one segment per label, each frame
on the source instance it references, at that instance's position, in the source's study."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slab.networks import build_network, save_weights
from slab.pipeline.cli import main
from slab.pipeline.inference import Predictor, predict_file
from slab.io.dicom import dicom_files
from slab.io.dicom_seg import write_dicom_seg
from slab.core.errors import SlabError
from slab.io.volumes import load_volume
from test_io import _rotation_x, _write_dicom_series

hd = pytest.importorskip("highdicom")

STUDY, SERIES = "1.2.826.0.1.3680043.2.1125.1", "1.2.826.0.1.3680043.2.1125.1.2"


def _series(tmp_path, shape_zyx=(6, 7, 5), name="dcm"):
    """An oblique, anisotropic CT series whose file names run against slice position."""
    data = np.random.default_rng(1).integers(-200, 800, shape_zyx).astype(np.int16)
    _write_dicom_series(tmp_path / name, data, (0.7, 0.9, 2.5), (10.0, -20.0, 5.0), _rotation_x(30))
    return tmp_path / name


def _predictor(tmp_path, labels=("kidney", "vessel", "tumour")):
    config = {"name": "unet", "spatial_dims": 2, "in_channels": 1, "out_channels": len(labels),
              "channels": [4, 8], "strides": [2]}
    torch.manual_seed(0)
    save_weights(build_network(**config), tmp_path / "net.pt")
    cli = {**config, "labels": list(labels), "planes": ["xy"], "offsets": [0]}  # what slab predict reads
    (tmp_path / "net.json").write_text(json.dumps(cli), encoding="utf-8")
    return Predictor(config, tmp_path / "net.pt", device="cpu", planes=("xy",), offsets=(0,), normalize=None,
                     labels=list(labels), postprocess={"threshold": 0.5})


def _frames_by_instance(seg, series_dir, segments):
    """(z, the instance's header, its frame of each segment (rows, cols, segments))."""
    for z, name in enumerate(dicom_files(series_dir)):
        header = pydicom.dcmread(name, stop_before_pixels=True)
        pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=[header.SOPInstanceUID],
                                                   segment_numbers=segments)
        yield z, header, pixels[0]


def test_dicom_seg_of_an_oblique_series_references_every_slice(tmp_path):
    series = _series(tmp_path)
    predictor = _predictor(tmp_path)
    channels = tmp_path / "channels.nii.gz"
    predict_file(series, channels, predictor, per_channel=True)
    written = predict_file(series, tmp_path / "seg.dcm", predictor)
    mask = np.asarray(load_volume(channels))  # (3, X=5, Y=7, Z=6), the same prediction
    assert mask.shape == (3, 5, 7, 6) and 0 < mask.sum() < mask.size

    raw = pydicom.dcmread(written["mask"])
    assert raw.Modality == "SEG" and raw.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert raw.StudyInstanceUID == STUDY and raw.FrameOfReferenceUID == "1.2.826.0.1.3680043.2.1125.1.3"
    assert raw.ReferencedSeriesSequence[0].SeriesInstanceUID == SERIES
    assert raw.NumberOfFrames == 3 * 6  # every frame kept, empty ones too
    seg = hd.seg.segread(written["mask"])
    assert seg.SegmentationType == "BINARY"
    described = [(s.SegmentNumber, s.SegmentLabel, s.SegmentedPropertyTypeCodeSequence[0].CodeValue,
                  s.SegmentedPropertyCategoryCodeSequence[0].CodeValue, s.SegmentAlgorithmType)
                 for s in seg.SegmentSequence]
    assert described == [(1, "kidney", "64033007", "91723000", "AUTOMATIC"),
                         (2, "vessel", "59820001", "91723000", "AUTOMATIC"),
                         (3, "tumour", "108369006", "49755003", "AUTOMATIC")]
    referenced = {i.ReferencedSOPInstanceUID for i in raw.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert len(referenced) == 6
    for z, header, frames in _frames_by_instance(seg, series, [1, 2, 3]):
        assert header.SOPInstanceUID in referenced
        for c in range(3):
            np.testing.assert_array_equal(frames[:, :, c], mask[c, :, :, z].T)
    # each frame lies where its source slice lies
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in dicom_files(series)]
    source = {h.SOPInstanceUID: h.ImagePositionPatient for h in headers}
    for group in raw.PerFrameFunctionalGroupsSequence:
        uid = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = group.PlanePositionSequence[0].ImagePositionPatient
        np.testing.assert_allclose([float(v) for v in position], [float(v) for v in source[uid]], atol=1e-4)
    first = pydicom.dcmread(dicom_files(series)[0])
    shared = raw.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
                               [float(v) for v in first.ImageOrientationPatient], atol=1e-6)
    np.testing.assert_allclose([float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing],
                               [float(v) for v in first.PixelSpacing], atol=1e-6)
    assert not list(tmp_path.glob("*.tmp*")) and not list(tmp_path.glob(".*"))


def test_dicom_seg_of_pydicoms_single_slice_ct(tmp_path):
    """pydicom's own CT_small.dcm (128x128, one slice) as a one-file series."""
    from pydicom.data import get_testdata_file

    series = tmp_path / "ct"
    series.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), series / "CT_small.dcm")
    source = pydicom.dcmread(series / "CT_small.dcm")
    predictor = _predictor(tmp_path, labels=("liver",))
    predictor_mask = tmp_path / "mask.nii.gz"
    predict_file(series, predictor_mask, predictor)
    written = predict_file(series, tmp_path / "seg.dcm", predictor)
    mask = np.asarray(load_volume(predictor_mask))
    seg = hd.seg.segread(written["mask"])
    assert seg.PatientID == source.PatientID and seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    [(z, header, frames)] = list(_frames_by_instance(seg, series, [1]))
    assert header.SOPInstanceUID == source.SOPInstanceUID and frames.shape == (128, 128, 1)
    np.testing.assert_array_equal(frames[:, :, 0], mask[0, :, :, 0].T)


@settings(max_examples=8, deadline=None)
@given(shape=st.tuples(st.integers(1, 4), st.integers(1, 9), st.integers(1, 9)).filter(lambda s: s[1] * s[2] >= 8),
       labels=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_any_mask_on_any_series_reads_back(tmp_path_factory, shape, labels, seed):
    """One slice, one row, odd sizes (frames not a whole number of bytes), one to three labels,
    empty labels: frame by frame as written, also through pydicom's own unpacking."""
    tmp_path = tmp_path_factory.mktemp("seg")
    series = _series(tmp_path, shape_zyx=shape)
    depth, rows, cols = shape
    rng = np.random.default_rng(seed)
    mask = (rng.random((labels, cols, rows, depth)) > rng.random()).astype(np.uint8)
    mask[-1] = 0  # an empty segment is still a segment
    path = write_dicom_seg(mask, series, tmp_path / "seg.dcm", [f"label {i}" for i in range(labels)])
    seg = hd.seg.segread(path)
    assert seg.number_of_segments == labels
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Tissue"
    for z, _, frames in _frames_by_instance(seg, series, list(range(1, labels + 1))):
        np.testing.assert_array_equal(frames, mask[:, :, :, z].transpose(2, 1, 0))
    raw = pydicom.dcmread(path)
    pixels = raw.pixel_array.reshape(raw.NumberOfFrames, rows, cols)  # pydicom: bits packed end to end
    shared = raw.SharedFunctionalGroupsSequence[0]
    for k, group in enumerate(raw.PerFrameFunctionalGroupsSequence):
        identification = group if "SegmentIdentificationSequence" in group else shared  # shared for one segment
        segment = identification.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        uid = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        z = int(uid.rsplit(".", 1)[1]) - 1  # the series helper numbers instances by slice
        np.testing.assert_array_equal(pixels[k], mask[segment - 1, :, :, z].T)


def test_a_mask_off_the_series_grid_or_on_tiny_slices_is_refused(tmp_path):
    series = _series(tmp_path)
    with pytest.raises(SlabError, match="does not lie on the grid"):
        write_dicom_seg(np.zeros((1, 7, 5, 6), np.uint8), series, tmp_path / "seg.dcm", ["a"])
    tiny = _series(tmp_path, shape_zyx=(3, 1, 7), name="tiny")
    with pytest.raises(SlabError, match="slices of 7x1 pixels"):
        write_dicom_seg(np.zeros((1, 7, 1, 3), np.uint8), tiny, tmp_path / "seg.dcm", ["a"])
    assert not (tmp_path / "seg.dcm").exists()


def _cli(tmp_path, capsys, inputs, output, *extra):
    code = main(["predict", "-i", *[str(i) for i in inputs], "-o", str(output), "--network",
                 str(tmp_path / "net.json"), "--weights", str(tmp_path / "missing.pt"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def test_cli_refuses_a_dicom_seg_it_cannot_reference_before_reading(tmp_path, capsys):
    """Bad requests end in one line and exit 2 before the model is read (its weights are
    missing), and nothing is written or removed."""
    import nibabel as nib

    _predictor(tmp_path)
    series = _series(tmp_path)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in series.iterdir())
    nib.save(nib.Nifti1Image(np.zeros((5, 6, 7), np.float32), np.eye(4)), tmp_path / "scan.nii.gz")
    code, err = _cli(tmp_path, capsys, [tmp_path / "scan.nii.gz"], tmp_path / "seg.dcm")
    assert code == 2 and len(err) == 1 and "DICOM series directory" in err[0]
    # inside the input series: it would become a second series of that directory
    code, err = _cli(tmp_path, capsys, [series], series / "seg.dcm")
    assert code == 2 and len(err) == 1 and "inside the input" in err[0]
    # a directory of cases is written to a directory of masks
    cases = tmp_path / "cases"
    cases.mkdir()
    shutil.copytree(series, cases / "a")
    code, err = _cli(tmp_path, capsys, [cases], tmp_path / "seg.dcm")
    assert code == 2 and len(err) == 1 and "directory name" in err[0]
    # a series without a frame of reference cannot be referenced
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in dicom_files(series):
        header = pydicom.dcmread(name)
        del header.FrameOfReferenceUID
        header.save_as(bare / Path(name).name)
    code, err = _cli(tmp_path, capsys, [bare], tmp_path / "seg.dcm")
    assert code == 2 and len(err) == 1 and "FrameOfReferenceUID" in err[0]
    assert not (tmp_path / "seg.dcm").exists()
    assert sorted((p.name, p.stat().st_mtime_ns) for p in series.iterdir()) == before


def test_cli_without_highdicom_names_the_extra(tmp_path, capsys, monkeypatch):
    import sys

    _predictor(tmp_path)
    series = _series(tmp_path)
    monkeypatch.setitem(sys.modules, "highdicom", None)
    code, err = _cli(tmp_path, capsys, [series], tmp_path / "seg.dcm")
    assert code == 2 and len(err) == 1 and "slab-seg[dicom]" in err[0]


def test_cli_writes_the_dicom_seg(tmp_path, capsys):
    _predictor(tmp_path, labels=("stomach", "large_bowel"))
    series = _series(tmp_path)
    code = main(["predict", "-i", str(series), "-o", str(tmp_path / "seg.dcm"), "--network", str(tmp_path / "net.json"),
                 "--weights", str(tmp_path / "net.pt"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'seg.dcm'}"
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["stomach", "large_bowel"]
    assert [s.SegmentedPropertyTypeCodeSequence[0].CodeMeaning for s in seg.SegmentSequence] == [
        "Stomach", "Large intestine"]
