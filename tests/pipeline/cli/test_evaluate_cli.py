"""`slab evaluate`: the JSON equals slab.pipeline.evaluation.metrics on the arrays; bad input exits 2, writes nothing."""
import json
import math

import numpy as np
import pytest
from scipy import ndimage as ndi

from slab.pipeline.cli import main
from slab.pipeline.evaluation.metrics import evaluate, threshold_sweep
from slab.io.volumes import save_volume

SPACING = (0.8, 0.8, 2.5)
AFFINE = np.diag([*SPACING, 1.0])


@pytest.fixture
def files(tmp_path, rng):
    """A two-class truth (uint8), a float32 probability map and a mask predicted from it."""
    truth = (ndi.gaussian_filter(rng.standard_normal((2, 12, 10, 8)), (0, 1.5, 1.5, 1.5)) > 0).astype(np.uint8)
    prob = np.clip(truth + rng.normal(0, 0.35, truth.shape), 0, 1).astype(np.float32)
    paths = {name: tmp_path / f"{name}.nii.gz" for name in ("truth", "prob", "mask")}
    save_volume(truth, paths["truth"], affine=AFFINE)
    save_volume(prob, paths["prob"], affine=AFFINE)
    save_volume((prob > 0.4).astype(np.uint8), paths["mask"], affine=AFFINE)
    return paths, truth, prob


def _approx(expected):
    """pytest.approx for a JSON tree, with NaN read back as null."""
    if isinstance(expected, dict):
        return {k: _approx(v) for k, v in expected.items()}
    if isinstance(expected, list):
        return [_approx(v) for v in expected]
    if isinstance(expected, float):
        return None if math.isnan(expected) else pytest.approx(expected, rel=1e-6)
    return expected


def test_probability_map_with_tolerances_and_json(files, tmp_path, capsys):
    paths, truth, prob = files
    out = tmp_path / "out" / "metrics.json"
    argv = ["evaluate", str(paths["prob"]), str(paths["truth"]), "--tolerance", "0", "1", "2.5",
            "--threshold", "0.6", "--json", str(out)]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = evaluate(prob, truth, SPACING, (0.0, 1.0, 2.5), threshold=0.6)
    assert printed == {"pred": str(paths["prob"]), "truth": str(paths["truth"]), **_approx(expected)}
    assert sorted(printed["surface_dice"]) == ["0.0", "1.0", "2.5"]
    assert len(printed["classes"]) == 2
    assert json.loads(out.read_text(encoding="utf-8")) == printed


def test_mask_is_not_thresholded(files, capsys):
    paths, truth, prob = files
    assert main(["evaluate", str(paths["mask"]), str(paths["truth"])]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["threshold"] is None
    assert printed["dice"] == pytest.approx(evaluate(prob > 0.4, truth, SPACING)["dice"])


def test_sweep_and_plot(files, tmp_path, capsys):
    paths, truth, prob = files
    png = tmp_path / "sweep.png"
    assert main(["evaluate", str(paths["prob"]), str(paths["truth"]), "--sweep", "0.3", "0.5", "0.7",
                 "--plot", str(png)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["sweep"] == _approx(threshold_sweep(prob, truth, [0.3, 0.5, 0.7], SPACING))
    assert png.read_bytes()[:4] == b"\x89PNG"


def _write(path, array, affine=AFFINE):
    save_volume(array, path, affine=affine)
    return str(path)


@pytest.mark.parametrize(
    "case, message",
    [
        ("geometry", "geometry"),
        ("shape", "spatial shape"),
        ("channels", "channel"),
        ("non-binary truth", "binary mask"),
        ("nan", "NaN"),
        ("negative tolerance", "tolerance"),
        ("sweep of a mask", "--sweep needs a probability map"),
        ("plot without sweep", "--plot"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(files, tmp_path, capsys, case, message):
    paths, truth, prob = files
    pred, ref, extra = str(paths["prob"]), str(paths["truth"]), []
    if case == "geometry":
        ref = _write(tmp_path / "moved.nii.gz", truth, np.diag([0.8, 0.8, 2.0, 1.0]))
    elif case == "shape":
        ref = _write(tmp_path / "small.nii.gz", truth[:, :-1])
    elif case == "channels":
        ref = _write(tmp_path / "one.nii.gz", truth[:1])
    elif case == "non-binary truth":
        ref = _write(tmp_path / "labels.nii.gz", truth * 2)
    elif case == "nan":
        pred = _write(tmp_path / "nan.nii.gz", np.where(truth > 0, np.nan, prob).astype(np.float32))
    elif case == "negative tolerance":
        extra = ["--tolerance", "-1"]
    elif case == "sweep of a mask":
        pred, extra = str(paths["mask"]), ["--sweep"]
    else:
        extra = ["--plot", str(tmp_path / "x.png")]
    before = sorted(tmp_path.rglob("*"))
    out = tmp_path / "out.json"
    assert main(["evaluate", pred, ref, "--json", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slab: error:") and message in err and err.count("\n") == 1
    assert sorted(tmp_path.rglob("*")) == before
