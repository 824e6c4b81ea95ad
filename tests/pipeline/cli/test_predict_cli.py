"""`slab predict` end to end: a saved tiny network over NIfTI, slice stacks and directories of
volumes; masks in the input's geometry; RLE CSV; bundles; bad input refused, nothing written."""
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from slab.networks import build_network, save_weights
from slab.pipeline.cli import main
from slab.pipeline.inference import predict_2p5d
from slab.transforms.intensity import PercentileNormalize
from slab.io.volumes import load_volume, save_volume
from slab.transforms.post import postprocess
from slab.io.rle import rle_decode

AFFINE = np.array([[0.0, 0.8, 0.0, -10.0], [-0.8, 0.0, 0.0, 20.5], [0.0, 0.0, 2.5, 3.25], [0.0, 0.0, 0.0, 1.0]])
CONFIG = {"name": "unet", "spatial_dims": 2, "in_channels": 3, "out_channels": 1, "channels": [4, 8], "strides": [2]}


@pytest.fixture
def model(tmp_path):
    """A saved tiny UNet (bias lifted so that the mask is neither empty nor full)."""
    torch.manual_seed(0)
    net = build_network(**CONFIG)
    (tmp_path / "net.json").write_text(json.dumps(CONFIG), encoding="utf-8")
    save_weights(net, tmp_path / "net.pt")
    return net, str(tmp_path / "net.json"), str(tmp_path / "net.pt")


@pytest.fixture
def image(tmp_path, rng):
    data = rng.normal(100, 20, (12, 10, 8)).astype(np.float32)
    data[3:8, 2:7, 2:6] += 60
    path = tmp_path / "case_01.nii.gz"
    nib.save(nib.Nifti1Image(data, AFFINE), path)
    return str(path), data


def expected_probs(net, data, **kwargs):
    volume = torch.from_numpy(data)[None]
    return predict_2p5d(net, PercentileNormalize()(volume), divisor=2, **kwargs)[0].numpy()


def test_nifti_in_mask_prob_and_rle_out(tmp_path, model, image, capsys):
    net, config, weights = model
    path, data = image
    out, prob, csv = tmp_path / "mask.nii.gz", tmp_path / "prob.nii.gz", tmp_path / "sub.csv"
    args = ["predict", "-i", path, "-o", str(out), "--network", config, "--weights", weights, "--tta", "flips",
            "--prob", str(prob), "--rle-csv", str(csv), "--id-prefix", "kidney_5", "--device", "cpu"]
    assert main(args) == 0
    probs = expected_probs(net, data, tta="flips")
    threshold = float(np.median(probs))
    assert main(args + ["--threshold", str(threshold)]) == 0
    written = nib.load(out)
    np.testing.assert_allclose(written.affine, AFFINE)
    mask = np.asanyarray(written.dataobj)
    assert written.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(mask, probs > threshold)
    assert 0 < mask.sum() < mask.size
    np.testing.assert_allclose(np.asanyarray(nib.load(prob).dataobj), probs, atol=1e-6)
    np.testing.assert_allclose(nib.load(prob).affine, AFFINE)
    rows = csv.read_text(encoding="utf-8").splitlines()
    assert rows[0] == "id,rle" and len(rows) == 1 + data.shape[2]
    for z, row in enumerate(rows[1:]):
        name, rle = row.split(",")
        assert name == f"kidney_5_{z:04d}"
        np.testing.assert_array_equal(rle_decode(rle, (data.shape[1], data.shape[0])), mask[:, :, z].T)
    assert "wrote" in capsys.readouterr().out


def test_stack_in_stack_out_with_axes_and_postprocessing(tmp_path, model, image):
    net, config, weights = model
    _, data = image
    stack = tmp_path / "stack"
    save_volume(np.round(data)[None].astype(np.uint16), stack)
    out = tmp_path / "out"
    assert main(["predict", "-i", str(stack), "-o", str(out), "--network", config, "--weights", weights,
                 "--axes", "xy,zy", "--hysteresis", "0.4", "0.6", "--min-size", "3"]) == 0
    probs = expected_probs(net, np.round(data).astype(np.uint16).astype(np.float32), planes=("xy", "zy"))
    expected = postprocess(probs, hysteresis=(0.4, 0.6), min_size=3)
    np.testing.assert_array_equal(load_volume(out)[0].numpy(), expected * 255)  # a mask stack holds 0/255


def test_directory_of_volumes_and_bundle(tmp_path, model, image):
    net, config, weights = model
    path, data = image
    cases = tmp_path / "cases"
    cases.mkdir()
    nib.save(nib.Nifti1Image(data, AFFINE), cases / "kidney_5.nii.gz")
    save_volume(np.round(data)[None].astype(np.uint16), cases / "kidney_6")
    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    save_weights(net, bundle / "models" / "model.pt")
    section = {"network": CONFIG, "planes": ["xy"], "tta": "none", "postprocess": {"threshold": 0.5, "min_size": 0},
               "normalize": {"lower": 0.5, "upper": 99.5}}
    (bundle / "configs" / "inference.json").write_text(json.dumps({"slab": section}), encoding="utf-8")
    out, csv = tmp_path / "out", tmp_path / "all.csv"
    assert main(["predict", "-i", str(cases), "-o", str(out), "--bundle", str(bundle), "--rle-csv", str(csv),
                 "--threshold", "0.45"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["kidney_5.nii.gz", "kidney_6"]
    expected = expected_probs(net, data, planes=("xy",)) > 0.45
    np.testing.assert_array_equal(np.asanyarray(nib.load(out / "kidney_5.nii.gz").dataobj), expected)
    np.testing.assert_allclose(nib.load(out / "kidney_5.nii.gz").affine, AFFINE)
    assert load_volume(out / "kidney_6").shape == (1,) + data.shape
    rows = csv.read_text(encoding="utf-8").splitlines()
    assert rows[0] == "id,rle" and len(rows) == 1 + 2 * data.shape[2]
    assert rows[1].startswith("kidney_5_0000,") and rows[1 + data.shape[2]].startswith("kidney_6_0000,")
    stats = tmp_path / "stats.json"
    assert main(["predict", "-i", str(cases), "-o", str(tmp_path / "out2"), "--bundle", str(bundle),
                 "--threshold", "0.45", "--statistics", str(stats)]) == 0
    document = json.loads(stats.read_text(encoding="utf-8"))
    assert sorted(document["cases"]) == ["kidney_5.nii.gz", "kidney_6"]
    five = document["cases"]["kidney_5.nii.gz"]
    assert five["input"] == str(cases / "kidney_5.nii.gz") and five["mask"] == str(tmp_path / "out2" / "kidney_5.nii.gz")
    entry = five["labels"]["label_1"]
    assert entry["voxels"] == expected.sum()
    assert entry["volume_mm3"] == pytest.approx(expected.sum() * abs(np.linalg.det(AFFINE[:3, :3])))
    assert entry["intensity"][0]["mean"] == pytest.approx(float(data[expected].mean()), rel=1e-6)


def _refused(capsys, args, message, out):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("slab: error: ") and message in err and err.count("\n") == 1, err
    assert not out.exists() and not any(p.name.startswith(f".{out.name}") for p in out.parent.iterdir())


def test_bad_input_is_refused_and_nothing_written(tmp_path, model, image, capsys, rng):
    net, config, weights = model
    path, data = image
    out = tmp_path / "never.nii.gz"
    base = ["-o", str(out), "--network", config, "--weights", weights]
    two = tmp_path / "two.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([data, data], -1), AFFINE), two)
    _refused(capsys, ["predict", "-i", str(two)] + base, "2 channel(s) do not divide the network's 3", out)
    offsets = tmp_path / "offsets.json"
    offsets.write_text(json.dumps({**CONFIG, "offsets": [-2, 0, 2]}), encoding="utf-8")
    _refused(capsys, ["predict", "-i", str(two), "-o", str(out), "--network", str(offsets), "--weights", weights],
             "2 channel(s) x 3 offsets = 6 slab channels; the network takes 3", out)
    other = tmp_path / "other.pt"
    save_weights(build_network("unet", 2, 3, 1, channels=(4, 8, 16), strides=(2, 2)), other)
    _refused(capsys, ["predict", "-i", path, "-o", str(out), "--network", config, "--weights", str(other)],
             "weights do not match the network", out)
    nan = data.copy()
    nan[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(nan, AFFINE), tmp_path / "nan.nii.gz")
    _refused(capsys, ["predict", "-i", str(tmp_path / "nan.nii.gz")] + base, "NaN", out)
    _refused(capsys, ["predict", "-i", path] + base + ["--axes", "xy,yz"], "planes: unknown plane 'yz'", out)
    _refused(capsys, ["predict", "-i", path] + base + ["--tta", "rot"], "argument --tta: invalid choice: 'rot'", out)
    _refused(capsys, ["predict", "-i", path] + base + ["--precision", "fp16", "--device", "cpu"],
             "--precision fp16: CUDA only", out)
    _refused(capsys, ["predict", "-i", path] + base + ["--precision", "half"], "argument --precision: invalid choice", out)
    _refused(capsys, ["predict", "-i", path] + base + ["--statistics", str(tmp_path / "stats.txt")],
             "--statistics: expected a .json file name", out)
    _refused(capsys, ["predict", "-i", path, "-o", str(out), "--network", config, "--weights",
                      str(tmp_path / "missing.pt")], "no such weights file", out)
    _refused(capsys, ["predict", "-i", path, "-o", str(out), "--network", config], "--weights", out)
    _refused(capsys, ["predict", "-i", path, "-o", str(tmp_path / "m.png"), "--network", config, "--weights", weights],
             "m.png", tmp_path / "m.png")



def test_progress_bars_on_a_terminal_off_with_quiet():
    """``slab predict`` draws progress bars by default only on a terminal; ``--quiet`` turns them
    off, ``--progress`` forces them; the two together are refused."""
    import argparse
    import io

    from slab.pipeline.cli.arguments import add_progress, show_progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    parser = argparse.ArgumentParser()
    add_progress(parser)
    assert show_progress(parser.parse_args([]), Terminal()) is True
    assert show_progress(parser.parse_args([]), io.StringIO()) is False
    assert show_progress(parser.parse_args(["--quiet"]), Terminal()) is False
    assert show_progress(parser.parse_args(["--progress"]), io.StringIO()) is True
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--quiet", "--progress"])
    assert exit_info.value.code == 2
