"""Dataset adapters on miniature copies of each competition's layout, and `slab dataset`."""
import csv
import json

import imagecodecs
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import tifffile

from slab.pipeline.data.adapters import assign_folds, brats_label, build_datalist
from slab.pipeline.data.datalist import split_datalist
from slab.pipeline.cli import main
from slab.core.errors import SlabError, SlabWarning
from slab.io.volumes import keep_locale

X, Y, Z = 16, 12, 3  # slice images are Y rows x X columns


def write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def write_stack(directory, volume, suffix=".tif", name="{z:04d}", first=0):
    """Write (X, Y, Z) as slice images img = volume[:, :, z].T, numbered from ``first``."""
    directory.mkdir(parents=True)
    for z in range(volume.shape[2]):
        image = np.ascontiguousarray(volume[:, :, z].T)
        path = directory / (name.format(z=z + first) + suffix)
        if suffix == ".png":
            path.write_bytes(imagecodecs.png_encode(image))
        else:
            tifffile.imwrite(path, image)


def read_nifti(path):
    image = nib.load(path)
    return np.asanyarray(image.dataobj), image.affine


def load_datalist(out):
    return json.loads((out / "datalist.json").read_text(encoding="utf-8"))


def all_items(datalist):
    return {item["id"]: item for item in datalist["training"] + datalist["validation"]}


# ---------------------------------------------------------------------------------------------
# SenNet


@pytest.fixture
def sennet(tmp_path, rng):
    root = tmp_path / "sennet"
    for name in ("kidney_1_dense", "kidney_1_voi", "kidney_2", "kidney_3_sparse"):
        write_stack(root / "train" / name / "images", rng.integers(0, 60000, (X, Y, Z), dtype=np.uint16))
        if name != "kidney_1_voi":
            write_stack(root / "train" / name / "labels", (rng.random((X, Y, Z)) < 0.2).astype(np.uint8) * 255)
    # kidney_1_voi has no label stack: its label comes from the CSV.
    write_csv(root / "train_rles.csv", ["id", "rle"], [
        ["kidney_1_voi_0000", "1 3"],     # img[0, 0:3] -> vol[0:3, 0, 0]
        ["kidney_1_voi_0001", "17 2"],    # flat 16, 17 = img[1, 0:2] -> vol[0:2, 1, 1]
        ["kidney_1_voi_0002", "1 0"],
        ["kidney_2_0000", "1 1"],         # volumes with a label stack ignore their rows
    ])
    return root


def test_sennet(sennet, tmp_path):
    out = tmp_path / "out"
    assert build_datalist("sennet", sennet, out, n_folds=2, seed=3) == out / "datalist.json"
    datalist = load_datalist(out)
    assert datalist["kind"] == "sennet" and datalist["labels"] == ["blood_vessel"] and datalist["n_folds"] == 2
    items = all_items(datalist)
    assert sorted(items) == ["kidney_1_dense", "kidney_1_voi", "kidney_2", "kidney_3_sparse"]
    assert items["kidney_1_dense"]["image"] == str(sennet / "train/kidney_1_dense/images")
    assert items["kidney_1_dense"]["label"] == str(sennet / "train/kidney_1_dense/labels")
    # One kidney, one case, one fold.
    assert items["kidney_1_voi"]["case"] == items["kidney_1_dense"]["case"] == "kidney_1"
    assert items["kidney_1_voi"]["fold"] == items["kidney_1_dense"]["fold"]
    expected = np.zeros((X, Y, Z), np.uint8)
    expected[0:3, 0, 0] = 1
    expected[0:2, 1, 1] = 1
    label, affine = read_nifti(items["kidney_1_voi"]["label"])
    assert items["kidney_1_voi"]["label"] == str(out / "volumes/kidney_1_voi/label.nii.gz")
    np.testing.assert_array_equal(label, expected)
    np.testing.assert_array_equal(affine, np.eye(4))


def test_sennet_as_downloaded_dense_labels_pair_with_sparse_images(sennet, tmp_path, rng, capsys):
    """kidney_3_dense ships labels only: its slices are kidney_3_sparse's of the same names. The
    default 5 folds exceed the 3 kidneys: 3 folds, with a warning. The 0/255 label stacks then
    score and render like 0/1 masks."""
    dense = (rng.random((X, Y, 2)) < 0.3).astype(np.uint8) * 255
    write_stack(sennet / "train" / "kidney_3_dense" / "labels", dense, first=1)  # slices 0001, 0002
    out = tmp_path / "out"
    with pytest.warns(SlabWarning, match="5 folds for 3 cases; using 3"):
        build_datalist("sennet", sennet, out)
    datalist = load_datalist(out)
    assert datalist["n_folds"] == 3
    item = all_items(datalist)["kidney_3_dense"]
    assert item["case"] == "kidney_3" and item["image"] == str(out / "volumes/kidney_3_dense/images")
    assert sorted(p.name for p in (out / "volumes/kidney_3_dense/images").iterdir()) == ["0001.tif", "0002.tif"]
    from slab.io.volumes import load_volume

    np.testing.assert_array_equal(load_volume(item["image"]).numpy()[0],
                                  load_volume(sennet / "train/kidney_3_sparse/images").numpy()[0][:, :, 1:])
    assert all_items(datalist)["kidney_3_sparse"]["fold"] == item["fold"]  # one kidney, one fold
    label = item["label"]
    assert main(["evaluate", label, label, "--tolerance", "0", "1"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["dice"] == 1.0 and scores["surface_dice"]["0.0"] == 1.0
    assert main(["render", label, label, "-o", str(tmp_path / "hits.png"), "--views", "1"]) == 0
    assert (tmp_path / "hits.png").is_file()


def test_sennet_bad_roots(sennet, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SlabError, match="nowhere: missing"):
        build_datalist("sennet", tmp_path / "nowhere", out)
    (tmp_path / "nowhere").mkdir()
    with pytest.raises(SlabError, match=r"nowhere/train: missing"):
        build_datalist("sennet", tmp_path / "nowhere", out)
    # A label stack without its images.
    (sennet / "train/kidney_9/labels").mkdir(parents=True)
    with pytest.raises(SlabError, match=r"kidney_9/images: missing"):
        build_datalist("sennet", sennet, out, n_folds=2)
    assert not out.exists()


def test_sennet_csv_problems_write_nothing(sennet, tmp_path):
    out = tmp_path / "out"
    (sennet / "train_rles.csv").unlink()
    with pytest.raises(SlabError, match=r"train_rles\.csv: missing"):
        build_datalist("sennet", sennet, out, n_folds=2)
    write_csv(sennet / "train_rles.csv", ["id", "rle"], [["kidney_1_voi_0000", "1 3 5"]])
    with pytest.raises(SlabError, match=r"train_rles\.csv: row 2 \(id kidney_1_voi_0000\): odd number of tokens"):
        build_datalist("sennet", sennet, out, n_folds=2)
    write_csv(sennet / "train_rles.csv", ["id", "rle"], [["kidney_1_voi_0000", "191 3"]])
    with pytest.raises(SlabError, match=r"row 2 .*past the 12x16 image"):
        build_datalist("sennet", sennet, out, n_folds=2)
    write_csv(sennet / "train_rles.csv", ["id", "rle"], [["kidney_2_0000", "1 1"]])
    with pytest.raises(SlabError, match=r"no rows for kidney_1_voi"):
        build_datalist("sennet", sennet, out, n_folds=2)
    write_csv(sennet / "train_rles.csv", ["name", "encoding"], [])
    with pytest.raises(SlabError, match=r"train_rles\.csv: missing column\(s\) id, rle"):
        build_datalist("sennet", sennet, out, n_folds=2)
    assert not out.exists()


def test_failure_keeps_an_earlier_output(sennet, tmp_path):
    out = tmp_path / "out"
    build_datalist("sennet", sennet, out, n_folds=2)
    before = (out / "datalist.json").read_text(encoding="utf-8")
    write_csv(sennet / "train_rles.csv", ["id", "rle"], [["kidney_1_voi_0000", "1 x"]])
    with pytest.raises(SlabError, match="expected integers"):
        build_datalist("sennet", sennet, out, n_folds=3)
    assert (out / "datalist.json").read_text(encoding="utf-8") == before
    assert sorted(p.name for p in out.iterdir()) == ["datalist.json", "volumes"]
    # A later run that succeeds replaces the outputs.
    write_csv(sennet / "train_rles.csv", ["id", "rle"], [["kidney_1_voi_0000", "2 1"]])
    build_datalist("sennet", sennet, out, n_folds=3)
    assert load_datalist(out)["n_folds"] == 3
    assert sorted(p.name for p in out.iterdir()) == ["datalist.json", "volumes"]
    assert read_nifti(out / "volumes/kidney_1_voi/label.nii.gz")[0].sum() == 1


def test_sennet_label_stack_of_another_size(sennet, tmp_path):
    labels = sennet / "train/kidney_2/labels"
    (labels / "0002.tif").unlink()
    with pytest.raises(SlabError, match=r"kidney_2/labels: spatial shape \(16, 12, 2\) does not match"):
        build_datalist("sennet", sennet, tmp_path / "out", n_folds=2)


# ---------------------------------------------------------------------------------------------
# UW-Madison GI Tract

UW_DAYS = {"case7_day0": (1.5, 1.25), "case7_day3": (1.5, 1.25), "case10_day1": (1.63, 1.63), "case2_day5": (1.0, 2.0)}


@pytest.fixture
def uwmgi(tmp_path, rng):
    root = tmp_path / "uwmgi"
    rows = []
    for day, (sx, sy) in UW_DAYS.items():
        case = day.split("_")[0]
        write_stack(root / "train" / case / day / "scans", rng.integers(0, 3000, (X, Y, Z), dtype=np.uint16),
                    suffix=".png", name=f"slice_{{z:04d}}_{X}_{Y}_{sx:.2f}_{sy:.2f}", first=1)
        for number in range(1, Z + 1):
            for cls in ("large_bowel", "small_bowel", "stomach"):
                rows.append([f"{day}_slice_{number:04d}", cls, ""])
    # case7_day3: small bowel on slice 2 at img[0, 2:5] and img[11, 15]; stomach on slice 3, img[1, 0].
    rows[rows.index(["case7_day3_slice_0002", "small_bowel", ""])][2] = "3 3 192 1"
    rows[rows.index(["case7_day3_slice_0003", "stomach", ""])][2] = "17 1"
    write_csv(root / "train.csv", ["id", "class", "segmentation"], rows)
    return root


def test_uwmgi(uwmgi, tmp_path):
    out = tmp_path / "out"
    build_datalist("uwmgi", uwmgi, out, n_folds=2, seed=1)
    datalist = load_datalist(out)
    assert datalist["labels"] == ["large_bowel", "small_bowel", "stomach"]
    assert datalist["label_format"] == "channels"
    items = all_items(datalist)
    assert sorted(items) == sorted(UW_DAYS)
    assert items["case7_day0"]["case"] == items["case7_day3"]["case"] == "case7"
    assert items["case7_day0"]["fold"] == items["case7_day3"]["fold"]
    for day, (sx, sy) in UW_DAYS.items():
        image = nib.load(items[day]["image"])
        assert image.shape == (X, Y, Z) and image.get_data_dtype() == np.uint16
        np.testing.assert_allclose(image.header.get_zooms(), (sx, sy, 3.0))
        np.testing.assert_allclose(image.affine, np.diag([sx, sy, 3.0, 1.0]))
        first = imagecodecs.png_decode((uwmgi / "train" / day.split("_")[0] / day / "scans" /
                                        f"slice_0001_{X}_{Y}_{sx:.2f}_{sy:.2f}.png").read_bytes())
        np.testing.assert_array_equal(np.asanyarray(image.dataobj)[:, :, 0], first.T)
        label, affine = read_nifti(items[day]["label"])
        assert label.shape == (X, Y, Z, 3) and label.dtype == np.uint8  # NIfTI keeps channels last
        np.testing.assert_array_equal(affine, image.affine)
    label, _ = read_nifti(items["case7_day3"]["label"])
    expected = np.zeros((X, Y, Z, 3), np.uint8)
    expected[2:5, 0, 1, 1] = 1     # "3 3": flat 2..4 = row 0, cols 2..4
    expected[15, 11, 1, 1] = 1     # "192 1": flat 191 = row 11, col 15
    expected[0, 1, 2, 2] = 1       # "17 1": flat 16 = row 1, col 0
    np.testing.assert_array_equal(label, expected)


def test_uwmgi_bad_roots(uwmgi, tmp_path):
    out = tmp_path / "out"
    csv_path = uwmgi / "train.csv"
    text = csv_path.read_text(encoding="utf-8")
    csv_path.unlink()
    with pytest.raises(SlabError, match=r"uwmgi/train\.csv: missing"):
        build_datalist("uwmgi", uwmgi, out, n_folds=2)
    csv_path.write_text(text.replace("segmentation", "mask", 1), encoding="utf-8")
    with pytest.raises(SlabError, match=r"train\.csv: missing column\(s\) segmentation"):
        build_datalist("uwmgi", uwmgi, out, n_folds=2)
    # Labels for a case-day whose scans are not there.
    csv_path.write_text(text + "case9_day1_slice_0001,stomach,\n", encoding="utf-8")
    with pytest.raises(SlabError, match=r"case9/case9_day1/scans: missing; .*train\.csv has labels for case9_day1"):
        build_datalist("uwmgi", uwmgi, out, n_folds=2)
    csv_path.write_text(text, encoding="utf-8")
    scans = uwmgi / "train/case2/case2_day5/scans"
    (scans / f"slice_0002_{X}_{Y}_1.00_2.00.png").rename(scans / f"slice_0002_{X}_{Y}_1.00_2.50.png")
    with pytest.raises(SlabError, match=r"slice_0002_16_12_1.00_2.50.png: size or spacing differs"):
        build_datalist("uwmgi", uwmgi, out, n_folds=2)
    (scans / f"slice_0002_{X}_{Y}_1.00_2.50.png").rename(scans / "slice_0002.png")
    with pytest.raises(SlabError, match=r"slice_0002.png: expected a scan named slice_XXXX_W_H_SX_SY.png"):
        build_datalist("uwmgi", uwmgi, out, n_folds=2)
    (scans / "slice_0002.png").rename(scans / f"slice_0002_{Y}_{X}_1.00_2.00.png")
    with pytest.raises(SlabError, match=r"size or spacing differs"):
        build_datalist("uwmgi", uwmgi, out, n_folds=2)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# BraTS


def write_nifti(path, array, affine=None):
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), path)


@pytest.fixture
def brats(tmp_path, rng):
    root = tmp_path / "brats"
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    for i in (1, 2, 3):
        case = root / f"BraTS20_Training_{i:03d}"
        case.mkdir(parents=True)
        for m in ("flair", "t1", "t1ce", "t2"):
            write_nifti(case / f"{case.name}_{m}.nii.gz", rng.integers(0, 900, (6, 5, 4)).astype(np.int16), affine)
        seg = np.zeros((6, 5, 4), np.uint8)
        seg[1, 1, 1], seg[2, 2, 2], seg[3, 3, 3] = 1, 2, 4
        write_nifti(case / f"{case.name}_seg.nii", seg, affine)
    (root / "name_mapping.csv").write_text("a,b\n", encoding="utf-8")
    return root


def test_brats(brats, tmp_path):
    out = tmp_path / "out"
    build_datalist("brats", brats, out, n_folds=3)
    datalist = load_datalist(out)
    assert datalist["labels"] == ["TC", "WT", "ET"]
    items = all_items(datalist)
    assert sorted(items) == [f"BraTS20_Training_{i:03d}" for i in (1, 2, 3)]
    assert sorted(item["fold"] for item in items.values()) == [0, 1, 2]
    item = items["BraTS20_Training_002"]
    case = brats / "BraTS20_Training_002"
    assert item["image"] == [str(case / f"BraTS20_Training_002_{m}.nii.gz") for m in ("flair", "t1", "t1ce", "t2")]
    label, affine = read_nifti(item["label"])
    np.testing.assert_array_equal(affine, np.diag([-1.0, -1.0, 1.0, 1.0]))
    assert label.shape == (6, 5, 4, 3)
    on = {c: sorted(map(tuple, np.argwhere(label[..., c]).tolist())) for c in range(3)}
    assert on[0] == [(1, 1, 1), (3, 3, 3)]                 # TC: 1 or 4
    assert on[1] == [(1, 1, 1), (2, 2, 2), (3, 3, 3)]      # WT: 1, 2 or 4
    assert on[2] == [(3, 3, 3)]                            # ET: 4


def test_brats_label_values():
    seg = np.array([[[0, 1, 2, 4]]], np.float64)
    np.testing.assert_array_equal(brats_label(seg)[:, 0, 0], [[0, 1, 0, 1], [0, 1, 1, 1], [0, 0, 0, 1]])
    with pytest.raises(SlabError, match=r"x_seg.nii: unexpected label values \[3\]"):
        brats_label(np.array([0, 3, 4]), "x_seg.nii")


def test_brats_bad_cases_are_skipped_and_reported(brats, tmp_path):
    case = brats / "BraTS20_Training_003"
    seg = nib.load(case / "BraTS20_Training_003_seg.nii")
    problems = [
        (lambda: write_nifti(case / "BraTS20_Training_003_seg.nii", np.full((6, 5, 4), 3, np.uint8), seg.affine),
         r"BraTS20_Training_003_seg.nii: unexpected label values \[3\]"),
        (lambda: write_nifti(case / "BraTS20_Training_003_seg.nii", np.zeros((6, 5, 3), np.uint8), seg.affine),
         r"BraTS20_Training_003_seg.nii: spatial shape"),
        (lambda: (case / "BraTS20_Training_003_t1ce.nii.gz").unlink(), r"BraTS20_Training_003_t1ce.nii.gz: missing"),
    ]
    for n, (break_it, reason) in enumerate(problems):
        break_it()
        out = tmp_path / f"out{n}"
        with pytest.warns(SlabWarning, match=f"skipped case BraTS20_Training_003: .*{reason}"):
            build_datalist("brats", brats, out, n_folds=2)
        datalist = load_datalist(out)
        assert sorted(all_items(datalist)) == ["BraTS20_Training_001", "BraTS20_Training_002"]
        assert [s["case"] for s in datalist["skipped"]] == ["BraTS20_Training_003"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(SlabError, match=r"no BraTS20_Training_XXX case directories"):
        build_datalist("brats", tmp_path / "empty", tmp_path / "none", n_folds=2)
    assert not (tmp_path / "none").exists()


def test_brats_as_kaggle_ships_it_nested_with_the_misnamed_case(brats, tmp_path):
    """The Kaggle download: cases under MICCAI_BraTS2020_TrainingData/, and case 355's
    segmentation named W39_1998.09.19_Segm.nii."""
    nested = tmp_path / "kaggle" / "BraTS2020_TrainingData" / "MICCAI_BraTS2020_TrainingData"
    nested.parent.mkdir(parents=True)
    brats.rename(nested)
    case = nested / "BraTS20_Training_002"
    (case / "BraTS20_Training_002_seg.nii").rename(case / "W39_1998.09.19_Segm.nii")
    out = tmp_path / "out"
    build_datalist("brats", tmp_path / "kaggle", out, n_folds=3)
    items = all_items(load_datalist(out))
    assert sorted(items) == [f"BraTS20_Training_{i:03d}" for i in (1, 2, 3)]
    label, _ = read_nifti(items["BraTS20_Training_002"]["label"])
    assert label.shape == (6, 5, 4, 3) and label[3, 3, 3].tolist() == [1, 1, 1]


# ---------------------------------------------------------------------------------------------
# RSNA cervical spine

DCM_SHAPE = (6, 5, 4)  # (X, Y, Z)


def write_dicom_series(directory, volume, spacing=(0.5, 0.75, 1.25), origin=(10.0, -20.0, 30.0), uid="1.2.3"):
    """Write (X, Y, Z) int16 as one DICOM file per z (SimpleITK's series-from-array recipe)."""
    directory.mkdir(parents=True)
    image = sitk.GetImageFromArray(volume.transpose(2, 1, 0).astype(np.int16))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(volume.shape[2]):
        piece = image[:, :, z]
        for tag, value in (("0008|0060", "CT"), ("0020|000d", uid), ("0020|000e", uid + ".1"),
                           ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0018|0050", str(spacing[2])),
                           ("0020|0032", "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, z))))),
                           ("0020|0013", str(z + 1)), ("0008|0018", f"{uid}.1.{z + 1}")):
            piece.SetMetaData(tag, value)
        # Files named against the slice order: the reader must order them by position.
        writer.SetFileName(str(directory / f"{(7 * z) % 5:03d}_{z}.dcm"))
        with keep_locale():  # GDCM's writer switches the process to the "C" locale
            writer.Execute(piece)


def dicom_affine(spacing=(0.5, 0.75, 1.25), origin=(10.0, -20.0, 30.0)):
    lps = np.diag(list(spacing) + [1.0])
    lps[:3, 3] = origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # RAS


@pytest.fixture
def rsna(tmp_path, rng):
    root = tmp_path / "rsna"
    vertebrae = np.zeros(DCM_SHAPE, np.uint8)
    vertebrae[1:3, 1:4, 0] = 1
    vertebrae[2:5, 0:2, 2] = 2
    vertebrae[5, 4, 3] = 7
    for uid in ("1.2.3", "1.2.10", "1.2.4"):
        write_dicom_series(root / "train_images" / uid, rng.integers(-1000, 2000, DCM_SHAPE), uid=uid)
    # The segmentation is stored with axes swapped and flipped against the DICOM: voxel (a, b, c)
    # holds DICOM voxel (X-1-c, b, Z-1-a); its affine says so.
    stored = np.flip(vertebrae.transpose(2, 1, 0), axis=(0, 2))
    to_dicom = np.array([[0, 0, -1, DCM_SHAPE[0] - 1], [0, 1, 0, 0], [-1, 0, 0, DCM_SHAPE[2] - 1], [0, 0, 0, 1.0]])
    (root / "segmentations").mkdir()
    write_nifti(root / "segmentations" / "1.2.3.nii", stored.astype(np.float32), dicom_affine() @ to_dicom)
    write_csv(root / "train.csv", ["StudyInstanceUID", "patient_overall"] + [f"C{i}" for i in range(1, 8)], [
        ["1.2.3", 1, 0, 1, 0, 0, 0, 0, 1],
        ["1.2.10", 0, 0, 0, 0, 0, 0, 0, 0],
        ["1.2.4", 1, 1, 0, 0, 0, 0, 0, 0],
    ])
    return root, vertebrae


def test_rsna_spine(rsna, tmp_path):
    root, vertebrae = rsna
    out = tmp_path / "out"
    build_datalist("rsna-spine", root, out, n_folds=3)
    datalist = load_datalist(out)
    assert datalist["labels"] == [f"C{i}" for i in range(1, 8)] and datalist["label_format"] == "values"
    items = all_items(datalist)
    assert [i["id"] for i in datalist["training"] + datalist["validation"]
            if i["fold"] == 0] == [i["id"] for i in datalist["validation"]]
    assert set(items) == {"1.2.3", "1.2.4", "1.2.10"}
    assert items["1.2.3"]["image"] == str(root / "train_images/1.2.3")
    assert items["1.2.3"]["targets"] == {"C1": 0, "C2": 1, "C3": 0, "C4": 0, "C5": 0, "C6": 0, "C7": 1,
                                         "patient_overall": 1}
    assert items["1.2.4"]["targets"]["C1"] == 1 and "label" not in items["1.2.4"]
    label, affine = read_nifti(items["1.2.3"]["label"])
    assert label.dtype == np.uint8  # from a float32 file
    np.testing.assert_array_equal(label, vertebrae)
    np.testing.assert_allclose(affine, dicom_affine(), atol=1e-6)
    # Reference: SimpleITK resampling, nearest neighbour, onto the series as SimpleITK reads it.
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(root / "train_images/1.2.3")))
    dicom = reader.Execute()
    seg = sitk.ReadImage(str(root / "segmentations/1.2.3.nii"))
    reference = sitk.Resample(seg, dicom, sitk.Transform(), sitk.sitkNearestNeighbor, 0, seg.GetPixelID())
    np.testing.assert_array_equal(label, sitk.GetArrayFromImage(reference).transpose(2, 1, 0))


def test_rsna_bad_roots(rsna, tmp_path):
    root, _ = rsna
    out = tmp_path / "out"
    write_nifti(root / "segmentations" / "9.9.9.nii.gz", np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(SlabError, match=r"segmentations/9.9.9.nii.gz: segmentation of a study not in .*train.csv"):
        build_datalist("rsna-spine", root, out, n_folds=2)
    (root / "segmentations" / "9.9.9.nii.gz").unlink()
    # A segmentation whose affine puts it elsewhere in the world.
    seg, affine = read_nifti(root / "segmentations" / "1.2.3.nii")
    seg = seg.copy()  # not a memory map of the file rewritten below
    far = affine.copy()
    far[:3, 3] += 500
    write_nifti(root / "segmentations" / "1.2.3.nii", seg, far)
    with pytest.raises(SlabError, match=r"1.2.3.nii: does not overlap the image"):
        build_datalist("rsna-spine", root, out, n_folds=2)
    write_nifti(root / "segmentations" / "1.2.3.nii", seg, affine)
    for dcm in (root / "train_images/1.2.4").iterdir():
        dcm.unlink()
    with pytest.raises(SlabError, match=r"train_images/1.2.4: missing or without .dcm files"):
        build_datalist("rsna-spine", root, out, n_folds=2)
    write_csv(root / "train.csv", ["StudyInstanceUID", "C1"], [["1.2.3", 0]])
    with pytest.raises(SlabError, match=r"train.csv: missing column\(s\) C2, C3, C4, C5, C6, C7, patient_overall"):
        build_datalist("rsna-spine", root, out, n_folds=2)
    write_csv(root / "train.csv", ["StudyInstanceUID", "patient_overall"] + [f"C{i}" for i in range(1, 8)],
              [["1.2.3", 1, 0, 2, 0, 0, 0, 0, 1]])
    with pytest.raises(SlabError, match=r"train.csv: row 2: C2 is '2'; expected 0 or 1"):
        build_datalist("rsna-spine", root, out, n_folds=2)
    (root / "train.csv").unlink()
    with pytest.raises(SlabError, match=r"train.csv: CSV file not found"):
        build_datalist("rsna-spine", root, out, n_folds=2)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Folds and the command line


def test_assign_folds_grouped_and_balanced():
    cases = ["a"] * 4 + ["b"] * 3 + ["c"] * 2 + ["d"] * 2 + ["e"]
    folds = assign_folds(cases, 3, seed=0)
    assert sorted(folds) == ["a", "b", "c", "d", "e"]
    sizes = [sum(cases.count(c) for c in folds if folds[c] == f) for f in range(3)]
    assert sorted(sizes) == [4, 4, 4]          # greedy by size: a | b + e | c + d
    assert folds == assign_folds(cases, 3, seed=0)
    assert len({tuple(sorted(assign_folds(list("abcdef"), 3, seed=s).items())) for s in range(6)}) > 1
    with pytest.raises(SlabError, match="folds: expected 1 to 5"):
        assign_folds(cases, 6)
    assert set(assign_folds(cases, 1).values()) == {0}


def test_split_datalist(brats, tmp_path):
    datalist = json.loads(build_datalist("brats", brats, tmp_path / "out", n_folds=3).read_text(encoding="utf-8"))
    for fold in range(3):
        training, validation = split_datalist(datalist, fold)
        assert [i["fold"] for i in validation] == [fold]
        assert sorted(i["id"] for i in training + validation) == sorted(all_items(datalist))
    assert [i["id"] for i in split_datalist(datalist, 0)[1]] == [i["id"] for i in datalist["validation"]]
    with pytest.raises(SlabError, match="fold: expected 0 to 2"):
        split_datalist(datalist, 3)


def test_cli(sennet, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["dataset", "sennet", str(sennet), str(out), "--folds", "2", "--seed", "4"]) == 0
    assert "4 items (4 labelled) from 3 cases" in capsys.readouterr().out
    assert load_datalist(out)["seed"] == 4
    assert main(["dataset", "sennet", str(tmp_path / "missing"), str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slab: error: ") and "missing" in err and err.count("\n") == 1
    assert not (tmp_path / "o2").exists()
    assert main(["dataset", "sennet", str(sennet), str(tmp_path / "o3"), "--folds", "9"]) == 0
    captured = capsys.readouterr()
    assert "slab: warning: folds: 9 folds for 3 cases; using 3" in captured.err
    assert "(fold 0 of 3)" in captured.out
    assert main(["dataset", "kaggle", str(sennet), str(out)]) == 2
    assert "argument KIND: invalid choice: 'kaggle'" in capsys.readouterr().err
