"""`slab postprocess`: outputs against scikit-image / scipy, IN's geometry kept, bad input refused."""
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.filters import apply_hysteresis_threshold

from slab.pipeline.cli import main

AFFINE = np.array([[0.0, 0.8, 0.0, -10.0], [-0.8, 0.0, 0.0, 20.5], [0.0, 0.0, 2.5, 3.25], [0.0, 0.0, 0.0, 1.0]])


def write(path, data, affine=AFFINE):
    nib.save(nib.Nifti1Image(data, affine), path)
    return str(path)


@pytest.fixture
def prob(tmp_path, rng):
    """A smoothed (12, 11, 10) probability map in [0, 1], written as float32 NIfTI."""
    p = ndi.gaussian_filter(rng.random((12, 11, 10)), 1.0)
    p = ((p - p.min()) / (p.max() - p.min())).astype(np.float32)
    return write(tmp_path / "prob.nii.gz", p), p


def test_hysteresis_and_holes_in_input_geometry(tmp_path, prob, capsys):
    path, p = prob
    out = tmp_path / "mask.nii.gz"
    args = ["postprocess", path, str(out), "--hysteresis", "0.45", "0.6", "--connectivity", "6", "--fill-holes"]
    assert main(args) == 0
    image = nib.load(out)
    assert image.get_data_dtype() == np.uint8
    np.testing.assert_allclose(image.affine, AFFINE)
    expected = ndi.binary_fill_holes(apply_hysteresis_threshold(p, 0.45, 0.6))
    np.testing.assert_array_equal(np.asanyarray(image.dataobj), expected)
    assert f"{int(expected.sum())} foreground voxels" in capsys.readouterr().out


def test_mask_input_with_roi_and_largest(tmp_path, rng):
    mask = np.zeros((10, 10, 10), np.uint8)
    mask[1:3, 1:3, 1:3] = 1  # 8 voxels, outside the ROI
    mask[5:9, 5:9, 5:9] = 1  # 64 voxels, half inside
    mask[5, 1, 1] = 1
    roi = np.zeros_like(mask)
    roi[4:10, 4:10, 4:7] = 1
    out = tmp_path / "out.nii"
    assert main(["postprocess", write(tmp_path / "m.nii", mask), str(out), "--roi", write(tmp_path / "roi.nii", roi),
                 "--keep-largest", "1"]) == 0
    np.testing.assert_array_equal(np.asanyarray(nib.load(out).dataobj), mask * roi * (np.indices(mask.shape).min(0) >= 5))


def _refused(capsys, args, message, out):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("slab: error: ") and message in err and err.count("\n") == 1
    assert not out.exists() and not any(p.name.startswith(f".{out.name}") for p in out.parent.iterdir())


def test_bad_input_is_refused_and_nothing_written(tmp_path, prob, capsys):
    path, p = prob
    out = tmp_path / "out.nii.gz"
    _refused(capsys, ["postprocess", path, str(out), "--hysteresis", "0.7", "0.3"], "low 0.7 is above high 0.3", out)
    _refused(capsys, ["postprocess", path, str(out), "--threshold", "0.5", "--min-size", "-2"], "argument --min-size", out)
    _refused(capsys, ["postprocess", path, str(out), "--min-size", "5"], "needs --threshold or --hysteresis", out)

    nan = p.copy()
    nan[3, 3, 3] = np.nan
    _refused(capsys, ["postprocess", write(tmp_path / "nan.nii.gz", nan), str(out), "--threshold", "0.5"], "NaN", out)

    roi = np.ones(p.shape, np.uint8)
    small = write(tmp_path / "small.nii.gz", roi[:, :, :5])
    _refused(capsys, ["postprocess", path, str(out), "--threshold", "0.5", "--roi", small], "spatial shape", out)
    moved = AFFINE.copy()
    moved[0, 3] += 5
    shifted = write(tmp_path / "shifted.nii.gz", roi, moved)
    _refused(capsys, ["postprocess", path, str(out), "--threshold", "0.5", "--roi", shifted], "geometry", out)
    soft = write(tmp_path / "soft.nii.gz", p)
    _refused(capsys, ["postprocess", path, str(out), "--threshold", "0.5", "--roi", soft], "binary mask", out)


def test_threshold_and_hysteresis_exclude_each_other(tmp_path, prob, capsys):
    path, _ = prob
    assert main(["postprocess", path, str(tmp_path / "o.nii"), "--threshold", "0.5", "--hysteresis", "0.2",
                 "0.6"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err
    assert not (tmp_path / "o.nii").exists()
