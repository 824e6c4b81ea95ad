"""Geometry edge cases say what they do: NIfTI inputs whose qform and sform disagree, sheared
affines that ITK formats cannot store, oblique volumes through predict. Every reader (nibabel,
and SimpleITK as 3D Slicer and ITK-SNAP use it) must place an output where it placed the input."""
from __future__ import annotations

import json
import warnings

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from slab.networks import build_network, save_weights
from slab.pipeline.cli import main
from slab.core.errors import SlabError, SlabWarning
from slab.io.volumes import load_volume, save_volume

NET = {"name": "unet", "spatial_dims": 2, "in_channels": 3, "out_channels": 1, "channels": [4, 8], "strides": [2]}


def _disagreeing(path, sform_code=2, qform_code=1):
    """A NIfTI whose sform is 9.19 mm (6.5, 6.5 in x, y) away from its qform."""
    data = np.random.default_rng(0).normal(100, 20, (10, 12, 8)).astype(np.float32)
    qform = np.diag([0.8, 0.8, 2.5, 1.0])
    qform[:3, 3] = [10, 20, 30]
    sform = qform.copy()
    sform[:3, 3] += [6.5, 6.5, 0]
    image = nib.Nifti1Image(data, sform)
    image.set_sform(sform, code=sform_code)
    image.set_qform(qform, code=qform_code)
    nib.save(image, path)
    return path


def _itk_geometry(path):
    image = sitk.ReadImage(str(path))
    return np.array(image.GetOrigin()), np.array(image.GetDirection()), np.array(image.GetSpacing())


def _same_place_for_every_reader(source, written):
    np.testing.assert_allclose(nib.load(written).affine, nib.load(source).affine, atol=1e-5)
    for a, b in zip(_itk_geometry(written), _itk_geometry(source)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    header, reference = nib.load(written).header, nib.load(source).header
    assert (int(header["qform_code"]), int(header["sform_code"])) == (int(reference["qform_code"]),
                                                                      int(reference["sform_code"]))


@pytest.mark.parametrize("codes", [(2, 1), (1, 1), (1, 2)])
def test_disagreeing_forms_are_reported_and_kept_as_the_input_has_them(tmp_path, codes):
    source = _disagreeing(tmp_path / "scan.nii.gz", *codes)
    with pytest.warns(SlabWarning, match=r"qform and sform place the volume up to 9\.19 mm apart"):
        volume = load_volume(source)
    out = save_volume((volume > 100).to(torch.uint8), tmp_path / "mask.nii.gz")
    _same_place_for_every_reader(source, out)


def test_agreeing_forms_give_no_warning_and_the_same_geometry(tmp_path):
    source = _disagreeing(tmp_path / "scan.nii.gz", 1, 0)  # qform unused: only the sform places it
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlabWarning)
        volume = load_volume(source)
    _same_place_for_every_reader(source, save_volume(volume, tmp_path / "copy.nii.gz"))


def test_predict_keeps_both_forms_and_warns_once_on_the_command_line(tmp_path, capfd):
    source = _disagreeing(tmp_path / "scan.nii.gz")
    torch.manual_seed(0)
    (tmp_path / "net.json").write_text(json.dumps(NET), encoding="utf-8")
    save_weights(build_network(**NET), tmp_path / "net.pt")
    capfd.readouterr()
    assert main(["predict", "-i", str(source), "-o", str(tmp_path / "mask.nii.gz"), "--prob",
                 str(tmp_path / "prob.nii.gz"), "--network", str(tmp_path / "net.json"), "--weights",
                 str(tmp_path / "net.pt"), "--device", "cpu", "--memory-budget", "0.001"]) == 0
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("slab: warning: ") and "9.19 mm" in err[0], err
    for written in ("mask.nii.gz", "prob.nii.gz"):
        _same_place_for_every_reader(source, tmp_path / written)


def _sheared(path):
    affine = np.eye(4)
    affine[:3, :3] = [[1.0, 0.4, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0]]
    nib.save(nib.Nifti1Image(np.zeros((6, 5, 4), np.uint8), affine), path)
    return path


def test_a_sheared_affine_is_refused_by_itk_formats_and_kept_by_nifti(tmp_path, capfd):
    source = _sheared(tmp_path / "sheared.nii.gz")
    for suffix in (".nrrd", ".mha"):
        assert main(["convert", str(source), str(tmp_path / f"out{suffix}")]) == 2
        err = capfd.readouterr().err.strip()
        assert "sheared" in err and "write NIfTI instead" in err and len(err.splitlines()) == 1
        assert not (tmp_path / f"out{suffix}").exists()
    assert main(["convert", str(source), str(tmp_path / "out.nii.gz")]) == 0
    np.testing.assert_allclose(nib.load(tmp_path / "out.nii.gz").affine, nib.load(source).affine, atol=1e-6)
    with pytest.raises(SlabError, match="sheared"):
        save_volume(load_volume(source), tmp_path / "direct.nrrd")


def test_an_oblique_volume_round_trips_through_itk_formats(tmp_path):
    angle = 0.3
    affine = np.eye(4)
    affine[:3, :3] = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0],
                               [0, 0, 1.0]]) @ np.diag([0.7, 0.9, 2.5])
    affine[:3, 3] = [-40.0, 12.5, 7.0]
    volume = torch.from_numpy(np.arange(120, dtype=np.int16).reshape(1, 6, 5, 4))
    for suffix in (".nrrd", ".mha", ".nii.gz"):
        written = save_volume(volume, tmp_path / f"oblique{suffix}", affine=affine)
        back = load_volume(written)
        np.testing.assert_allclose(np.asarray(back.affine), affine, atol=1e-5)
        np.testing.assert_array_equal(back.numpy(), volume.numpy())
