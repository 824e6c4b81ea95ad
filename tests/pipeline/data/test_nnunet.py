"""nnU-Net v2's raw layout both ways: region-based labels read as label channels (and planned and
trained on), any slab datalist written as a raw dataset nnU-Net takes (``slab export --nnunet``),
checked against the layout's documented fields and read back."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from slab.pipeline.cli import main
from slab.pipeline.data.phantom import make_phantom

# an oblique, anisotropic grid: the geometry must survive every conversion
ANGLE = np.deg2rad(12)
AFFINE = np.array([[0.9 * np.cos(ANGLE), -0.8 * np.sin(ANGLE), 0, -30.0],
                   [0.9 * np.sin(ANGLE), 0.8 * np.cos(ANGLE), 0, 12.0],
                   [0, 0, 2.5, 4.0], [0, 0, 0, 1]])
SHAPE = (23, 19, 11)
TINY = {"samples_per_epoch": 4, "batch_size": 2, "network": {"name": "unet", "channels": [4, 8], "strides": [2]},
        "progress": False}


def _tumour_values(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(image (X, Y, Z), label map with nested classes 1 ⊃ 2 ⊃ 3) of a phantom."""
    phantom = make_phantom(SHAPE, seed=seed, kind="organs")
    organs = np.asarray(phantom.label) > 0
    values = np.zeros(SHAPE, np.uint8)
    values[organs[0] | organs[1]] = 1
    values[organs[1]] = 2
    values[organs[1] & (np.arange(SHAPE[2]) < SHAPE[2] // 2)[None, None]] = 3
    return np.asarray(phantom.image)[0].astype(np.float32), values


def _region_dataset(root: Path, cases: int = 3) -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(cases):
        image, values = _tumour_values(i)
        for c, channel in enumerate((image, image ** 2)):
            nib.save(nib.Nifti1Image(channel, AFFINE), root / "imagesTr" / f"BRATS_{i:03d}_{c:04d}.nii.gz")
        nib.save(nib.Nifti1Image(values, AFFINE), root / "labelsTr" / f"BRATS_{i:03d}.nii.gz")
    meta = {"channel_names": {"0": "FLAIR", "1": "T1w"},
            "labels": {"background": 0, "whole tumour": [1, 2, 3], "tumour core": [2, 3], "enhancing": 3},
            "regions_class_order": [1, 2, 3], "numTraining": cases, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_region_based_labels_become_label_channels_that_plan_and_train(tmp_path, capsys):
    root = _region_dataset(tmp_path / "Dataset010_Tumour")
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert main(["dataset", "nnunet", str(root), str(tmp_path / "out"), "--folds", "3"]) == 0
    data = json.loads((tmp_path / "out" / "datalist.json").read_text())
    assert data["label_format"] == "channels" and data["labels"] == ["whole tumour", "tumour core", "enhancing"]
    assert data["regions"] == {"whole tumour": [1, 2, 3], "tumour core": [2, 3], "enhancing": [3]}
    assert data["regions_class_order"] == [1, 2, 3]
    for item in data["training"] + data["validation"]:
        values = nib.load(root / "labelsTr" / f"{item['id']}.nii.gz").get_fdata()
        label = nib.load(item["label"])
        channels = np.asarray(label.dataobj)
        channels = np.moveaxis(channels, -1, 0) if channels.ndim == 4 else channels[None]
        np.testing.assert_array_equal(channels[0], values >= 1)
        np.testing.assert_array_equal(channels[1], np.isin(values, (2, 3)))
        np.testing.assert_array_equal(channels[2], values == 3)
        np.testing.assert_allclose(label.affine, AFFINE, atol=1e-6)
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before  # the raw dataset untouched
    plan = tmp_path / "plan"
    assert main(["plan", str(tmp_path / "out" / "datalist.json"), "-o", str(plan), "--device", "cpu", "--epochs", "1",
                 "--folds", "3", "--configurations", "2d"]) == 0
    plans = json.loads((plan / "plans.json").read_text())
    assert plans["configurations"]["2d"]["config"]["loss"] == "dice_bce"  # regions overlap: sigmoid channels
    overrides = tmp_path / "over.json"
    overrides.write_text(json.dumps(TINY))
    assert main(["train", "--plan", str(plan), "--configuration", "2d", "--fold", "0", "--config", str(overrides),
                 "--device", "cpu"]) == 0
    # the raw folder itself cannot be planned as it comes: one line naming the conversion
    capsys.readouterr()
    assert main(["plan", str(root), "-o", str(tmp_path / "plan_raw"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "slab dataset nnunet" in err and not (tmp_path / "plan_raw").exists()


def _msd_values_task(root: Path) -> Path:
    """A values-format datalist (a Decathlon task) on the oblique grid, folds given per item."""
    (root / "images").mkdir(parents=True)
    items = []
    for i in range(4):
        phantom = make_phantom(SHAPE, seed=10 + i, kind="organs")
        values = np.zeros(SHAPE, np.uint8)
        for c, channel in enumerate(np.asarray(phantom.label)[:2]):
            values[channel > 0] = c + 1
        nib.save(nib.Nifti1Image(np.asarray(phantom.image)[0], AFFINE), root / "images" / f"case{i}.nii.gz")
        nib.save(nib.Nifti1Image(values, AFFINE), root / "images" / f"case{i}_seg.nii.gz")
        items.append({"image": f"images/case{i}.nii.gz", "label": f"images/case{i}_seg.nii.gz", "fold": i % 2})
    datalist = {"labels": ["liver", "spleen"], "label_format": "values", "modality": {"0": "MRI"},
                "training": items[1:], "validation": items[:1]}
    (root / "datalist.json").write_text(json.dumps(datalist))
    return root / "datalist.json"


def test_export_writes_a_raw_dataset_nnunet_reads_and_slab_reads_back(tmp_path):
    datalist = _msd_values_task(tmp_path / "task")
    out = tmp_path / "Dataset501_Organs"
    assert main(["export", "--nnunet", str(datalist), str(out)]) == 0
    # the documented fields of dataset.json, and the file names nnU-Net derives from them
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "MRI"} and meta["file_ending"] == ".nii.gz"
    assert meta["labels"] == {"background": 0, "liver": 1, "spleen": 2} and meta["numTraining"] == 4
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [f"case{i}_0000.nii.gz" for i in range(4)]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == [f"case{i}.nii.gz" for i in range(4)]
    splits = json.loads((out / "splits_final.json").read_text())
    assert splits == [{"train": ["case1", "case3"], "val": ["case0", "case2"]},
                      {"train": ["case0", "case2"], "val": ["case1", "case3"]}]
    for i in range(4):
        exported = nib.load(out / "labelsTr" / f"case{i}.nii.gz")
        source = nib.load(tmp_path / "task" / "images" / f"case{i}_seg.nii.gz")
        np.testing.assert_array_equal(np.asarray(exported.dataobj), np.asarray(source.dataobj))
        assert np.issubdtype(exported.get_data_dtype(), np.integer)
        image = nib.load(out / "imagesTr" / f"case{i}_0000.nii.gz")
        np.testing.assert_allclose(image.affine, AFFINE, atol=1e-5)
        np.testing.assert_allclose(exported.affine, AFFINE, atol=1e-5)
        np.testing.assert_allclose(image.get_fdata(), nib.load(tmp_path / "task" / "images" / f"case{i}.nii.gz")
                                   .get_fdata(), rtol=1e-6)
    # read back by slab's own nnU-Net reader: the same cases, labels and modality
    assert main(["dataset", "nnunet", str(out), str(tmp_path / "back"), "--folds", "2"]) == 0
    back = json.loads((tmp_path / "back" / "datalist.json").read_text())
    assert back["labels"] == ["liver", "spleen"] and back["modality"] == {"0": "MRI"}
    assert sorted(i["id"] for i in back["training"] + back["validation"]) == [f"case{i}" for i in range(4)]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".Dataset")]  # no staging left


def test_export_of_channel_labels_and_multichannel_images(tmp_path):
    """Non-overlapping label channels become one map; a 2-channel image two channel files."""
    from slab.pipeline.bundle import phantom_datalist

    datalist = phantom_datalist(tmp_path / "ph", kind="organs", shape=(20, 18, 12), train_seeds=[1, 2],
                                val_seeds=[100], labels=["a", "b", "c"])
    data = json.loads(Path(datalist).read_text())
    for item in data["training"] + data["validation"]:
        item["image"] = [item["image"], item["image"]]
    (tmp_path / "two.json").write_text(json.dumps(data))
    out = tmp_path / "Dataset002_Two"
    assert main(["export", "--nnunet", str(tmp_path / "two.json"), str(out)]) == 0
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "image_0", "1": "image_1"} and list(meta["labels"]) == ["background", "a", "b", "c"]
    assert len(list((out / "imagesTr").iterdir())) == 6
    item = data["training"][0]
    channels = nib.load(item["label"]).get_fdata()
    channels = np.moveaxis(channels, -1, 0)
    exported = nib.load(out / "labelsTr" / f"{item['id']}.nii.gz").get_fdata()
    expected = np.zeros(channels.shape[1:])
    for c in range(channels.shape[0]):
        expected[channels[c] > 0] = c + 1
    np.testing.assert_array_equal(exported, expected)


@pytest.mark.parametrize("case", ["overlap", "name", "exists"])
def test_export_refusals_are_one_line_and_write_nothing(tmp_path, capsys, case):
    from slab.pipeline.bundle import phantom_datalist

    datalist = phantom_datalist(tmp_path / "ph", kind="tumour", shape=(20, 18, 12), train_seeds=[1], val_seeds=[],
                                labels=["TC", "WT", "ET"])  # BraTS regions overlap
    out = {"overlap": tmp_path / "Dataset003_Tumour", "name": tmp_path / "tumour_nnunet",
           "exists": tmp_path / "Dataset004_Here"}[case]
    if case == "exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    capsys.readouterr()
    assert main(["export", "--nnunet", datalist, str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("slab: error:")
    assert {"overlap": "overlap", "name": "DatasetXXX_Name", "exists": "exists"}[case] in err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
