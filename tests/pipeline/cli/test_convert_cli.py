"""`slab convert`: files written by the command, read back with nibabel, SimpleITK, PIL and tifffile."""
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import tifffile
from PIL import Image

from slab.pipeline.cli import main

AFFINE = np.array([[0.0, 1.5, 0.0, -10.0], [-0.75, 0.0, 0.0, 20.5], [0.0, 0.0, 2.5, 3.25], [0.0, 0.0, 0.0, 1.0]])


@pytest.fixture
def stack(tmp_path, rng):
    """A 4-slice 16-bit PNG stack and its (X, Y, Z) volume."""
    images = [rng.integers(0, 65535, size=(6, 5), dtype=np.uint16) for _ in range(4)]
    (tmp_path / "stack").mkdir()
    for z, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / "stack" / f"s_{z}.png")
    return tmp_path / "stack", np.stack([image.T for image in images], axis=-1)


def test_stack_to_nifti_with_spacing(tmp_path, stack, capsys):
    src, volume = stack
    assert main(["convert", str(src), str(tmp_path / "v.nii.gz"), "--spacing", "0.5", "0.5", "2"]) == 0

    image = nib.load(tmp_path / "v.nii.gz")
    assert image.get_data_dtype() == np.uint16
    np.testing.assert_array_equal(np.asanyarray(image.dataobj), volume)
    np.testing.assert_array_equal(image.affine, np.diag([0.5, 0.5, 2.0, 1.0]))
    assert "v.nii.gz" in capsys.readouterr().out


@pytest.mark.parametrize("fmt", ["png", "tif"])
def test_nifti_to_stack(tmp_path, rng, fmt, capsys):
    data = rng.integers(0, 255, size=(5, 6, 3), dtype=np.uint8)
    nib.save(nib.Nifti1Image(data, AFFINE), tmp_path / "v.nii")

    assert main(["convert", str(tmp_path / "v.nii"), str(tmp_path / "out"), "--slice-format", fmt]) == 0

    files = sorted((tmp_path / "out").iterdir())
    assert [f.name for f in files] == [f"000{z}.{fmt}" for z in range(3)]
    for z, f in enumerate(files):
        image = np.asarray(Image.open(f)) if fmt == "png" else tifffile.imread(f)
        np.testing.assert_array_equal(image, data[:, :, z].T)
    assert "keeps no geometry" in capsys.readouterr().err


def test_nifti_to_mha_and_back(tmp_path, rng):
    data = rng.normal(size=(5, 6, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, AFFINE), tmp_path / "v.nii.gz")

    assert main(["convert", str(tmp_path / "v.nii.gz"), str(tmp_path / "v.mha")]) == 0
    image = sitk.ReadImage(str(tmp_path / "v.mha"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), data.transpose(2, 1, 0))
    assert image.GetSpacing() == (0.75, 1.5, 2.5) and image.GetOrigin() == (10.0, -20.5, 3.25)

    assert main(["convert", str(tmp_path / "v.mha"), str(tmp_path / "w.nii")]) == 0
    back = nib.load(tmp_path / "w.nii")
    np.testing.assert_array_equal(back.get_fdata(dtype=np.float32), data)
    np.testing.assert_array_equal(back.affine, AFFINE)


def _error_line(capsys):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("slab: error: ")
    return err


def _bad_source(directory, case):
    if case == "corrupt":
        (directory / "cut.nii.gz").write_bytes(b"\x1f\x8b\x08\x00")  # a gzip header, then nothing
        return directory / "cut.nii.gz"
    if case == "empty dir":
        (directory / "empty").mkdir()
        return directory / "empty"
    if case == "unsupported":
        (directory / "scan.raw").write_bytes(b"\0")
        return directory / "scan.raw"
    return directory / "absent.nii.gz"


@pytest.mark.parametrize(
    "case, dst, expected",
    [
        ("missing", "out.nii.gz", "absent.nii.gz: no such file or directory"),
        ("corrupt", "out.nii.gz", "cut.nii.gz: not a readable NIfTI file"),
        ("empty dir", "out", "empty: empty directory"),
        ("unsupported", "out.nii.gz", "scan.raw: unsupported format '.raw'"),
        ("missing", "out.jpg", "out.jpg: unsupported output format '.jpg'"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, case, dst, expected):
    src = _bad_source(tmp_path, case)
    before = sorted(p.name for p in tmp_path.iterdir())

    assert main(["convert", str(src), str(tmp_path / dst)]) == 2

    assert expected in _error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_bad_spacing_and_png_of_floats(tmp_path, stack, capsys):
    src, _ = stack
    assert main(["convert", str(src), str(tmp_path / "v.nii"), "--spacing", "1", "0", "1"]) == 2
    assert "argument --spacing: expected a positive number, got '0'" in _error_line(capsys)
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), tmp_path / "f.nii")
    assert main(["convert", str(tmp_path / "f.nii"), str(tmp_path / "pngs"), "--slice-format", "png"]) == 2
    assert "PNG holds uint8 or uint16" in _error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.nii", "stack"]


def test_console_script_reports_bad_input(tmp_path):
    script = Path(sys.executable).with_name("slab")
    if not script.exists():
        pytest.skip(f"no console script beside {sys.executable}")
    (tmp_path / "flat.png").write_bytes(b"")
    result = subprocess.run([str(script), "convert", str(tmp_path / "flat.png"), str(tmp_path / "v.nii.gz")],
                            capture_output=True, encoding="utf-8", timeout=300)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    expected = f"slab: error: {tmp_path / 'flat.png'}: a single .png image where a 3D volume is expected"
    assert result.stderr.startswith(expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flat.png"]
