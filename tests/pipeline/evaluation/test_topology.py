"""Topology metrics against known answers (torus, hollow sphere, broken tube) and independent
references (skimage's Euler number, cc3d's component counts); radius-binned recall on tubes of
known radius; ``slab evaluate --cldice --topology --radius-bins``."""
import json

import cc3d
import nibabel as nib
import numpy as np
import pytest
from skimage.measure import euler_number

from slab.pipeline.cli import main
from slab.pipeline.evaluation.topology import betti_numbers, radius_bins, topology_metrics


def torus(shape=(40, 40, 20), major=12.0, minor=4.0) -> np.ndarray:
    x, y, z = np.ogrid[: shape[0], : shape[1], : shape[2]]
    cx, cy, cz = [(s - 1) / 2 for s in shape]
    ring = np.sqrt((x - cx) ** 2 + (y - cy) ** 2) - major
    return ring ** 2 + (z - cz) ** 2 <= minor ** 2


def ball(shape, radius, centre=None) -> np.ndarray:
    x, y, z = np.ogrid[: shape[0], : shape[1], : shape[2]]
    c = centre or [(s - 1) / 2 for s in shape]
    return (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 <= radius ** 2


def test_known_betti_numbers():
    assert betti_numbers(torus()) == {"b0": 1, "b1": 1, "b2": 0, "euler": 0}
    hollow = ball((30, 30, 30), 12) & ~ball((30, 30, 30), 8)
    assert betti_numbers(hollow) == {"b0": 1, "b1": 0, "b2": 1, "euler": 2}
    tube = np.zeros((10, 10, 40), bool)
    tube[3:7, 3:7, 2:38] = True
    assert betti_numbers(tube)["b0"] == 1 and betti_numbers(tube)["b1"] == 0
    tube[:, :, 19:21] = False
    assert betti_numbers(tube) == {"b0": 2, "b1": 0, "b2": 0, "euler": 2}
    two_tori = np.concatenate([torus(), torus()], axis=0)
    assert betti_numbers(two_tori) == {"b0": 2, "b1": 2, "b2": 0, "euler": 0}
    assert betti_numbers(np.zeros((4, 4, 4), bool)) == {"b0": 0, "b1": 0, "b2": 0, "euler": 0}


@pytest.mark.parametrize("seed", range(4))
def test_betti_against_skimage_and_cc3d(seed):
    rng = np.random.default_rng(seed)
    m = rng.random((14, 13, 11)) < 0.35
    b = betti_numbers(m)
    assert b["euler"] == euler_number(np.pad(m, 1), connectivity=3)
    assert b["b0"] == cc3d.connected_components(m.astype(np.uint8), connectivity=26, return_N=True)[1]
    assert b["b0"] - b["b1"] + b["b2"] == b["euler"]


def test_topology_errors_and_fragments():
    truth = np.zeros((10, 10, 40), bool)
    truth[3:7, 3:7, 2:38] = True
    pred = truth.copy()
    pred[:, :, 12:14] = False
    pred[:, :, 25:27] = False  # the vessel broken into three pieces
    m = topology_metrics(pred, truth)
    assert m["b0_error"] == 2 and m["fragments_per_true_component"] == {"mean": 3.0, "max": 3, "missed": 0,
                                                                       "components": 1}
    assert m["largest_component_fraction"] == pytest.approx(np.max([10, 11, 11]) / 32)
    assert topology_metrics(truth, truth)["b0_error"] == 0


def test_radius_bins_show_which_sizes_are_missed():
    shape = (60, 40, 50)
    thin = np.zeros(shape, bool)
    thin[10, 10, 5:45] = True  # radius 1 voxel on its centreline
    x, y = np.ogrid[: shape[0], : shape[1]]
    thick = np.zeros(shape, bool)
    thick[((x - 40) ** 2 + (y - 20) ** 2 <= 16)[..., None] & np.ones(shape[2], bool)[None, None]] = True
    thick[:, :, :5] = thick[:, :, 45:] = False  # radius 4
    truth = thin | thick
    bins = {b["bin"]: b for b in radius_bins(thick, truth)}  # the prediction misses the thin vessel
    assert bins["1"]["recall"] == 0.0 and bins["1"]["truth_voxels"] > 30
    assert bins["3-4"]["recall"] == 1.0 or bins["5-8"]["recall"] == 1.0
    assert np.isnan(bins[">8"]["recall"])
    perfect = {b["bin"]: b for b in radius_bins(truth, truth)}
    assert all(b["recall"] == 1.0 for b in perfect.values() if b["truth_voxels"])
    assert all(b["precision"] == 1.0 for b in perfect.values() if b["pred_voxels"])


def test_evaluate_command_with_vessel_metrics(tmp_path, capsys):
    truth = torus()
    pred = truth.copy()
    pred[:20, 18:22, :] = False  # the ring cut: b1 lost
    for name, a in (("t.nii.gz", truth), ("p.nii.gz", pred)):
        nib.save(nib.Nifti1Image(a.astype(np.uint8), np.eye(4)), tmp_path / name)
    assert main(["evaluate", str(tmp_path / "p.nii.gz"), str(tmp_path / "t.nii.gz"), "--cldice", "--topology",
                 "--radius-bins", "--json", str(tmp_path / "s.json")]) == 0
    result = json.loads((tmp_path / "s.json").read_text())
    entry = result["classes"][0]
    assert entry["topology"]["truth"]["b1"] == 1 and entry["topology"]["pred"]["b1"] == 0
    assert entry["topology"]["b1_error"] == 1
    assert 0 < entry["cldice"] < 1 and result["cldice"] == entry["cldice"]
    assert [b["bin"] for b in entry["radius_bins"]] == ["1", "2", "3-4", "5-8", ">8"]
    capsys.readouterr()


def test_errors_ranks_false_positive_and_missed_clusters(tmp_path, capsys):
    import csv

    truth = np.zeros((30, 30, 20), np.uint8)
    truth[5:15, 5:15, 5:15] = 1  # found
    truth[20:23, 20:23, 2:5] = 1  # missed: 27 voxels
    prob = truth.astype(np.float32) * 0.9
    prob[20:23, 20:23, 2:5] = 0.1
    prob[25:29, 2:6, 10:14] = 0.8  # an unannotated structure: 64 confident voxels
    prob[0, 29, 19] = 0.6  # a speck
    affine = np.diag([0.5, 0.5, 2.0, 1.0])
    affine[:3, 3] = [10, 20, 30]
    for name, a in (("t.nii.gz", truth), ("p.nii.gz", prob), ("i.nii.gz", prob * 100)):
        nib.save(nib.Nifti1Image(a, affine), tmp_path / name)
    assert main(["errors", str(tmp_path / "p.nii.gz"), str(tmp_path / "t.nii.gz"), "-o", str(tmp_path / "c.csv"),
                 "--image", str(tmp_path / "i.nii.gz"), "--sheet", str(tmp_path / "s.png"), "--top", "2"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "c.csv")))
    assert [(r["kind"], int(r["voxels"])) for r in rows] == [("false_positive", 64), ("missed", 27),
                                                              ("false_positive", 1)]
    assert float(rows[0]["mean_probability"]) == pytest.approx(0.8)
    assert float(rows[1]["mean_probability"]) == pytest.approx(0.1)
    assert [float(rows[0][k]) for k in ("centroid_x", "centroid_y", "centroid_z")] == [26.5, 3.5, 11.5]
    assert [float(rows[0][k]) for k in ("world_x", "world_y", "world_z")] == [10 + 26.5 * 0.5, 20 + 3.5 * 0.5, 30 + 23]
    assert float(rows[0]["volume_mm3"]) == pytest.approx(64 * 0.5)
    assert (tmp_path / "s.png").stat().st_size > 10_000
    assert "2 false-positive and 1 missed cluster(s)" in capsys.readouterr().out


def test_cldice_in_sweeps_and_training_validation(tmp_path):
    from slab.pipeline.evaluation.metrics import threshold_sweep
    from slab.pipeline.evaluation.skeleton import cldice

    truth = torus().astype(np.uint8)
    rng = np.random.default_rng(0)
    prob = np.clip(truth * 0.7 + rng.random(truth.shape) * 0.4, 0, 1).astype(np.float32)
    sweep = threshold_sweep(prob, truth, [0.3, 0.5, 0.8], cldice=True, metric="cldice")
    assert sweep["cldice"] == pytest.approx([cldice(prob > t, truth)["cldice"] for t in (0.3, 0.5, 0.8)])
    assert sweep["best"]["metric"] == "cldice" and sweep["best"]["value"] == max(sweep["cldice"])
    from test_train import TINY, write_datalist

    from slab.pipeline.training import train

    datalist = write_datalist(tmp_path, n=3, shape=(16, 14, 12))
    result = train(datalist, {**TINY, "epochs": 1, "val": {**TINY["val"], "cldice": True, "metric": "cldice"}},
                   tmp_path / "run", device="cpu")
    row = result["history"][-1]
    assert "val_cldice" in row and 0 <= row["val_cldice"] <= 1 and result["best"]["metric"] == "cldice"
    from slab.pipeline.training.config import validate_config
    from slab.core.errors import SlabError

    with pytest.raises(SlabError, match="cldice needs val.cldice true"):
        validate_config({"val": {"metric": "cldice"}})
