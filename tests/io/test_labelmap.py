"""Label maps: multi-label masks as one volume (BraTS classes recovered from regions), and 3D
Slicer's .seg.nrrd read back with slicerio (Slicer's own reader), pynrrd and SimpleITK."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slab.networks import build_network, save_weights
from slab.pipeline.data.adapters import brats_label
from slab.pipeline.inference import Predictor, predict_file
from slab.core.errors import SlabError, SlabWarning
from slab.io.volumes import load_volume
from slab.io.labelmap import check_label_map, from_label_map, segment_metadata, to_label_map

BRATS = {"values": [1, 2, 4], "order": [1, 0, 2]}  # channels (TC, WT, ET); paint WT, TC, ET


@settings(max_examples=40, deadline=None)
@given(shape=st.tuples(*[st.integers(1, 9)] * 3), seed=st.integers(0, 2**16))
def test_brats_regions_paint_back_to_the_brats_classes(shape, seed):
    """The adapter turns BraTS classes {0, 1, 2, 4} into nested regions; painting the regions in the
    bundle's order gives the classes back, voxel for voxel (any shape, one voxel included)."""
    seg = np.random.default_rng(seed).choice(np.array([0, 1, 2, 4], np.int16), size=shape)
    spec = check_label_map(BRATS, 3)
    label, overlaps = to_label_map(brats_label(seg), spec["values"], spec["order"])
    assert label.dtype == np.uint8 and label.shape == (1, *shape)
    np.testing.assert_array_equal(label[0], seg)
    assert overlaps == int(np.count_nonzero(np.isin(seg, (1, 4))))  # TC and ET lie inside WT


def test_disjoint_labels_round_trip_and_wide_values():
    rng = np.random.default_rng(0)
    classes = rng.integers(0, 4, (7, 5, 3))
    mask = np.stack([classes == i + 1 for i in range(3)]).astype(np.uint8)
    label, overlaps = to_label_map(mask, (1, 2, 3), (0, 1, 2))
    assert overlaps == 0
    np.testing.assert_array_equal(label[0], classes)
    np.testing.assert_array_equal(from_label_map(label, (1, 2, 3)), mask)
    wide, _ = to_label_map(mask, (1, 300, 70000 - 5000), (0, 1, 2))
    assert wide.dtype == np.uint16 and set(np.unique(wide).tolist()) <= {0, 1, 300, 65000}


@pytest.mark.parametrize("spec, match", [
    ({"values": [1, 1, 2]}, "3 distinct integers"), ({"values": [0, 1, 2]}, "1..65535"),
    ({"values": [1, 2]}, "3 distinct"), ({"order": [0, 0, 1]}, "channel indices 0..2"),
    ({"order": [0, "a", 1]}, "channel indices 0..2"), ({"values": "abc"}, "3 distinct"),
    ({"colour": 1}, "unknown key colour"), ([1, 2, 3], "expected an object"),
])
def test_bad_label_maps_are_refused(spec, match):
    with pytest.raises(SlabError, match=match):
        check_label_map(spec, 3)


def _predictor(tmp_path, out_channels=3, **options):
    config = {"name": "unet", "spatial_dims": 2, "in_channels": 1, "out_channels": out_channels,
              "channels": [4, 8], "strides": [2]}
    torch.manual_seed(0)
    save_weights(build_network(**config), tmp_path / "net.pt")
    (tmp_path / "net.json").write_text(json.dumps(config), encoding="utf-8")
    return Predictor(config, tmp_path / "net.pt", device="cpu", planes=("xy",), offsets=(0,),
                     normalize=None, **options)


def _oblique(tmp_path):
    """An anisotropic, rotated (not sheared) volume: the geometry a .seg.nrrd must keep."""
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.7, 0.9, 2.5])
    affine[:3, 3] = (-12.5, 30.0, 7.25)
    data = np.random.default_rng(3).normal(size=(11, 13, 5)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "image.nii.gz")
    return tmp_path / "image.nii.gz", affine


def test_seg_nrrd_opens_with_names_values_and_geometry(tmp_path):
    slicerio = pytest.importorskip("slicerio")
    nrrd = pytest.importorskip("nrrd")
    image, affine = _oblique(tmp_path)
    predictor = _predictor(tmp_path, labels=["kidney", "artery", "vein"], label_map={"values": [3, 7, 9]},
                           postprocess={"threshold": [0.45, 0.5, 0.55]})
    out = tmp_path / "pred.seg.nrrd"
    channels = tmp_path / "channels.nii.gz"
    predict_file(image, channels, predictor, per_channel=True)
    with pytest.warns(SlabWarning, match="in more than one label") if _overlap(channels) else _nothing():
        predict_file(image, out, predictor)
    segmentation = slicerio.read_segmentation(str(out))
    assert [(s["name"], s["labelValue"], s["layer"]) for s in segmentation["segments"]] == [
        ("kidney", 3, 0), ("artery", 7, 0), ("vein", 9, 0)]
    assert all(len(s["color"]) == 3 for s in segmentation["segments"])
    header = nrrd.read_header(str(out))
    assert header["space"] == "left-posterior-superior" and header["encoding"] == "gzip"
    lps = np.diag([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(np.asarray(header["space directions"]).T, lps @ affine[:3, :3], atol=1e-6)
    np.testing.assert_allclose(header["space origin"], lps @ affine[:3, 3], atol=1e-6)
    voxels = sitk.GetArrayFromImage(sitk.ReadImage(str(out))).transpose(2, 1, 0)
    mask = np.asarray(load_volume(channels))
    painted = np.zeros(mask.shape[1:], np.uint8)
    for i, value in enumerate((3, 7, 9)):
        painted[mask[i] > 0] = value
    np.testing.assert_array_equal(voxels, painted)
    np.testing.assert_array_equal(segmentation["voxels"], painted)
    assert slicerio.segment_names(segmentation) == ["kidney", "artery", "vein"]


def _overlap(path) -> bool:
    return bool((np.asarray(load_volume(path)).sum(0) > 1).any())


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_overlaps_warn_unless_the_order_is_declared(tmp_path):
    image, _ = _oblique(tmp_path)
    everything = {"threshold": [0.0, 0.0, 0.0]}  # every voxel in every label
    with pytest.warns(SlabWarning, match=r"715 voxels are in more than one label"):
        predict_file(image, tmp_path / "a.nii.gz", _predictor(tmp_path, postprocess=everything))
    assert np.unique(np.asarray(load_volume(tmp_path / "a.nii.gz"))).tolist() == [3]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        predict_file(image, tmp_path / "b.nii.gz", _predictor(tmp_path, postprocess=everything, label_map=BRATS))
    assert np.unique(np.asarray(load_volume(tmp_path / "b.nii.gz"))).tolist() == [4]
    assert segment_metadata(["a"], [5])["Segment0_LabelValue"] == "5"
    # one label with its own value: written with that value, not 0/1
    predict_file(image, tmp_path / "c.nii.gz", _predictor(tmp_path, out_channels=1, postprocess={"threshold": 0.0},
                                                          label_map={"values": [5]}))
    assert np.unique(np.asarray(load_volume(tmp_path / "c.nii.gz"))).tolist() == [5]


def test_overlapping_labels_open_in_slicer_as_layers(tmp_path):
    """--per-channel onto a .seg.nrrd: BraTS-style nested regions kept apart in Slicer's layers
    (kinds "list domain domain domain"), each segment's voxels exactly its channel, as slicerio
    (Slicer's reader), pynrrd and slab itself read them back."""
    slicerio = pytest.importorskip("slicerio")
    nrrd = pytest.importorskip("nrrd")
    image, affine = _oblique(tmp_path)
    everything = {"threshold": [0.0, 0.5, 0.55]}  # the first label covers every voxel: overlaps
    predictor = _predictor(tmp_path, labels=["wt", "tc", "et"], label_map={"values": [2, 1, 4]},
                           postprocess=everything)
    channels = tmp_path / "channels.nii.gz"
    predict_file(image, channels, predictor, per_channel=True)
    out = tmp_path / "regions.seg.nrrd"
    predict_file(image, out, predictor, per_channel=True)
    mask = np.asarray(load_volume(channels))
    assert mask[0].all() and (mask[1:].sum(0) > 0).any()
    header = nrrd.read_header(str(out))
    assert header["kinds"][0] == "list" and header["encoding"] == "gzip"
    segmentation = slicerio.read_segmentation(str(out))
    voxels = segmentation["voxels"]
    assert voxels.ndim == 4
    for c, segment in enumerate(segmentation["segments"]):
        assert (segment["name"], segment["labelValue"]) == (["wt", "tc", "et"][c], [2, 1, 4][c])
        np.testing.assert_array_equal(slicerio.segment_mask(segmentation, segment), mask[c] > 0)
    assert segmentation["segments"][0]["layer"] == 0 and segmentation["segments"][1]["layer"] == 1
    lps = np.diag([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(np.asarray(header["space directions"])[1:].T, lps @ affine[:3, :3], atol=1e-6)
    back = load_volume(out)  # slab reads its own layers back: one channel per layer
    assert back.shape[0] == voxels.shape[0]
    np.testing.assert_allclose(back.affine.numpy(), affine, atol=1e-6)
    # labels that never overlap share one layer: a plain 3D label map
    from slab.io.labelmap import to_layers

    apart = np.zeros((3, 4, 4, 4), np.uint8)
    apart[0, 0], apart[1, 1], apart[2, 2] = 1, 1, 1
    layers, placed = to_layers(apart, (3, 7, 9))
    assert layers.shape == (1, 4, 4, 4) and placed == [0, 0, 0]
    assert set(np.unique(layers).tolist()) == {0, 3, 7, 9}
