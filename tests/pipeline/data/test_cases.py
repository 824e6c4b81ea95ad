"""Data as it is downloaded, straight into `slab predict`: SenNet's test layout with derived ids
and one submission CSV, UW-Madison scans with their spacing and a multi-class CSV, BraTS's four
contrasts as channels, nnU-Net's {case}_0000 naming, DICOM series kept in their stored dtype."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import imagecodecs
import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch

from slab.networks import build_network, save_weights
from slab.pipeline.data.cases import find_cases
from slab.pipeline.cli import main
from slab.core.errors import SlabError
from slab.io.volumes import load_volume
from slab.io.rle import read_sennet_rles, read_uwmgi_rles, rle_decode


def _network(tmp_path, in_channels=3, out_channels=1, labels=None, dims=2):
    config = {"name": "unet", "spatial_dims": dims, "in_channels": in_channels, "out_channels": out_channels,
              "channels": [4, 8], "strides": [2]}
    if labels:
        config["labels"] = labels
    if dims == 3:
        config["roi_size"] = [8, 8, 8]
    torch.manual_seed(0)
    (tmp_path / "net.json").write_text(json.dumps(config), encoding="utf-8")
    save_weights(build_network(**{k: v for k, v in config.items() if k not in ("labels", "roi_size")}),
                 tmp_path / "net.pt")
    return ["--network", str(tmp_path / "net.json"), "--weights", str(tmp_path / "net.pt"), "--device", "cpu"]


def _tiffs(folder: Path, shape, seed, first=0):
    folder.mkdir(parents=True)
    data = np.random.default_rng(seed).integers(0, 60000, shape, dtype=np.uint16)
    for z in range(shape[2]):
        tifffile.imwrite(folder / f"{z + first:04d}.tif", np.ascontiguousarray(data[:, :, z].T))
    return data


def test_sennet_test_layout_predicts_each_kidney_into_one_submission(tmp_path):
    test = tmp_path / "blood-vessel-segmentation" / "test"
    _tiffs(test / "kidney_5" / "images", (12, 10, 3), 5)
    _tiffs(test / "kidney_6" / "images", (9, 11, 2), 6)
    collection, cases = find_cases(test)
    assert collection and [c.name for c in cases] == ["kidney_5", "kidney_6"]
    assert cases[0].source == str(test / "kidney_5" / "images")
    network = _network(tmp_path)
    sub = tmp_path / "submission.csv"
    assert main(["predict", "-i", str(test), "-o", str(tmp_path / "masks"), "--rle-csv", str(sub),
                 "--threshold", "0.5"] + network) == 0
    rles = read_sennet_rles(sub)
    assert sorted(rles) == ["kidney_5", "kidney_6"]
    assert sorted(rles["kidney_5"]) == [0, 1, 2] and sorted(rles["kidney_6"]) == [0, 1]
    mask = load_volume(tmp_path / "masks" / "kidney_5").numpy()[0]  # a slice stack of 0/255
    assert set(np.unique(mask)) <= {0, 255}
    for z, (_, rle) in rles["kidney_5"].items():
        np.testing.assert_array_equal(rle_decode(rle, (10, 12)).T, mask[:, :, z] // 255)
    # One kidney alone: its case folder, or the images folder itself, gives the same row ids.
    for given in (test / "kidney_5", test / "kidney_5" / "images"):
        one = tmp_path / f"{given.name}.csv"
        assert main(["predict", "-i", str(given), "-o", str(tmp_path / f"{given.name}.nii.gz"),
                     "--rle-csv", str(one)] + network) == 0
        assert sorted(read_sennet_rles(one)) == ["kidney_5"]


def test_a_folder_of_only_case_folders_without_images_says_so(tmp_path, capfd):
    (tmp_path / "test" / "kidney_5" / "labels").mkdir(parents=True)
    network = _network(tmp_path)
    assert main(["predict", "-i", str(tmp_path / "test"), "-o", str(tmp_path / "out")] + network) == 2
    assert "neither slices, a DICOM series nor a case folder with images/" in capfd.readouterr().err
    assert main(["convert", str(tmp_path / "test" / "kidney_5"), str(tmp_path / "o.nii.gz")]) == 2
    assert "holds only sub-folders (labels)" in capfd.readouterr().err


def test_uwmgi_scans_keep_their_spacing_and_give_the_multi_class_csv(tmp_path):
    scans = tmp_path / "test" / "case123" / "case123_day20" / "scans"
    scans.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for number in (1, 2, 3, 4):
        (scans / f"slice_{number:04d}_16_12_1.50_1.50.png").write_bytes(
            imagecodecs.png_encode(rng.integers(0, 4000, (12, 16), dtype=np.uint16)))
    volume = load_volume(scans)
    assert volume.meta["spacing"] == (1.5, 1.5, 3.0)
    classes = ["large_bowel", "small_bowel", "stomach"]
    network = _network(tmp_path, out_channels=3, labels=classes)
    sub, out = tmp_path / "submission.csv", tmp_path / "mask.nii.gz"
    assert main(["predict", "-i", str(scans), "-o", str(out), "--rle-csv", str(sub), "--threshold", "0.5"]
                + network) == 0
    label_map = load_volume(out)  # one label map: class i has value i + 1
    np.testing.assert_allclose(label_map.meta["spacing"], (1.5, 1.5, 3.0))
    assert label_map.shape[0] == 1
    mask = load_volume(tmp_path / "channels.nii.gz") if main(
        ["predict", "-i", str(scans), "-o", str(tmp_path / "channels.nii.gz"), "--per-channel", "--threshold", "0.5"]
        + network) == 0 else None
    assert mask.shape[0] == 3
    with open(sub, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["id", "class", "segmentation"] and len(rows) == 1 + 4 * 3
    assert [r[0] for r in rows[1:4]] == ["case123_day20_slice_0001"] * 3 and [r[1] for r in rows[1:4]] == classes
    days = read_uwmgi_rles(sub)
    for number, by_class in days["case123_day20"].items():
        for name, (_, rle) in by_class.items():
            np.testing.assert_array_equal(rle_decode(rle, (12, 16)).T,
                                          mask.numpy()[classes.index(name), :, :, number - 1])
    painted = np.zeros(mask.shape[1:], np.uint8)
    for i in range(3):
        painted[mask.numpy()[i] > 0] = i + 1
    np.testing.assert_array_equal(label_map.numpy()[0], painted)


def test_brats_contrasts_as_channels_and_nnunet_naming(tmp_path):
    rng = np.random.default_rng(1)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    case = tmp_path / "BraTS20_Validation_001"
    case.mkdir()
    files = []
    for m in ("flair", "t1", "t1ce", "t2"):
        files.append(case / f"{case.name}_{m}.nii.gz")
        nib.save(nib.Nifti1Image(rng.integers(0, 900, (10, 9, 8)).astype(np.int16), affine), files[-1])
    network = _network(tmp_path, in_channels=4, out_channels=3, dims=3)
    out = tmp_path / "seg.nii.gz"
    assert main(["predict", "-i", *map(str, files), "-o", str(out)] + network) == 0
    mask = load_volume(out)
    assert tuple(mask.shape) == (1, 10, 9, 8)  # a label map
    assert main(["predict", "-i", *map(str, files), "-o", str(tmp_path / "regions.nii.gz"), "--per-channel"]
                + network) == 0
    assert tuple(load_volume(tmp_path / "regions.nii.gz").shape) == (3, 10, 9, 8)
    np.testing.assert_allclose(np.asarray(mask.affine), affine)
    assert main(["convert", *map(str, files), str(tmp_path / "four.nii.gz")]) == 0
    assert tuple(load_volume(tmp_path / "four.nii.gz").shape) == (4, 10, 9, 8)
    # nnU-Net's imagesTs: {case}_0000..0003 grouped into one four-channel case each
    images = tmp_path / "imagesTs"
    images.mkdir()
    for name in ("a", "b"):
        for c, source in enumerate(files):
            shutil.copy(source, images / f"{name}_{c:04d}.nii.gz")
    collection, cases = find_cases(images)
    assert collection and [(c.name, len(c.source), c.output_name) for c in cases] == [("a", 4, "a.nii.gz"),
                                                                                       ("b", 4, "b.nii.gz")]
    assert main(["predict", "-i", str(images), "-o", str(tmp_path / "preds")] + network) == 0
    np.testing.assert_array_equal(load_volume(tmp_path / "preds" / "a.nii.gz").numpy(), mask.numpy())
    (images / "b_0003.nii.gz").unlink()
    shutil.copy(files[0], images / "b_0004.nii.gz")
    with pytest.raises(SlabError, match="case b has channels 0000, 0001, 0002, 0004"):
        find_cases(images)


def test_dicom_ct_keeps_its_stored_int16_and_gaps_are_refused(tmp_path):
    from pydicom.data import get_testdata_file

    root = Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests"
    series = root / "98892001" / "CT5N"  # 5 slices 2.5 mm apart, 16-bit signed, intercept -1024
    volume = load_volume(series)
    assert volume.dtype == torch.int16 and tuple(volume.shape) == (1, 16, 16, 5)
    np.testing.assert_allclose(volume.meta["spacing"], (0.488281, 0.488281, 2.5), rtol=1e-5)
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series)))
    reference = sitk.GetArrayFromImage(reader.Execute()).transpose(2, 1, 0)
    np.testing.assert_array_equal(volume.numpy()[0], reference)
    with pytest.raises(SlabError, match=r"CT2: DICOM slice positions are not evenly spaced \(202.5 mm between "
                                        r"slices 0 and 1, 1.25 mm elsewhere"):
        load_volume(root / "77654033" / "CT2")

