"""Self-configuration: fingerprints against numpy/cc3d, plans against hand-computed expectations,
--verify reporting every bad case, post-processing chosen where the answer is known, ensembles,
the no-network baseline, a tiny plan -> cv -> predict --model end to end, export/install."""
import json
import zipfile
from pathlib import Path

import cc3d
import nibabel as nib
import numpy as np
import pytest
import torch

from slab.pipeline.cli import main
from slab.pipeline.planning import plans as planning
from slab.pipeline.planning import schedule
from slab.pipeline.planning.fingerprint import fingerprint, is_tubular, label_summary
from slab.pipeline.planning.selection import best_window, choose_postprocessing, window_histograms, window_mask

from test_train import TINY_UNET, write_datalist  # noqa: E402


def _fp(spacing, shape=(64, 60, 20), cases=None, modality=None, tubular=False, dtype="int16"):
    """A hand-written fingerprint."""
    cases = cases or [{"intensity": [{"p50": 100.0, "min": 0.0}]}, {"intensity": [{"p50": 101.0, "min": 0.0}]}]
    return {"n_cases": len(cases), "channels": 1, "median_shape": list(shape), "median_spacing": list(spacing),
            "spacings_agree": True, "anisotropy": max(spacing) / min(spacing), "modality": modality,
            "intensity": [{"p0_5": 0.0, "p50": 100.0, "p99_5": 200.0, "mean": 100.0, "std": 40.0}],
            "cases": cases, "dtype": dtype,
            "labels": [{"name": "organ", "tubular": tubular, "smallest_component": 50, "mean_fraction": 0.1,
                        "median_components": 1, "median_radius_vox": 4.0}]}


CPU = torch.device("cpu")


def test_anisotropic_mri_slices_are_one_plane_forward_stride_2():
    fp = _fp((1.5, 1.5, 3.0))
    p25 = planning.plan_configuration(fp, "2p5d", CPU, 1 << 30)
    p2 = planning.plan_configuration(fp, "2d", CPU, 1 << 30)
    assert p25["config"]["planes"] == ["xy"] and p25["config"]["offsets"] == [0, 2, 4]
    assert p2["config"]["planes"] == ["xy"] and p2["config"]["offsets"] == [0]
    assert "3 mm apart along z" in p25["reasons"]["planes"] and "2.0x" in p25["reasons"]["planes"]
    # in-plane 64x60 -> patch 64x60 rounded to the divisor 16 of a 5-level... 60/4 -> 3 downs (divisor 8)
    assert p25["config"]["patch_size"] == [64, 56] and p25["config"]["network"]["strides"] == [2, 2, 2]
    # coarse axis x: the plane normal to x is zy
    assert planning.slab_geometry(_fp((4.0, 1.0, 1.0)), 3)[:2] == (["zy"], [0, 2, 4])


def test_isotropic_ct_is_three_planes_centred_with_a_dataset_window():
    cases = [{"intensity": [{"p50": 40.0, "min": -1024.0}]}, {"intensity": [{"p50": 45.0, "min": -1000.0}]}]
    fp = _fp((0.8, 0.8, 0.8), shape=(96, 96, 96), cases=cases)
    plan = planning.plan_configuration(fp, "2p5d", CPU, 1 << 30)
    cfg = plan["config"]
    assert cfg["planes"] == ["xy", "zx", "zy"] and cfg["offsets"] == [-1, 0, 1]
    assert cfg["normalize"] == {"scheme": "percentile", "lower": 0.5, "upper": 99.5, "dataset": True}
    assert "Hounsfield" in plan["reasons"]["normalize"]
    assert cfg["patch_size"] == [96, 96] and cfg["network"]["channels"] == [16, 32, 64, 128, 256]
    assert planning.normalization(_fp((1, 1, 1), modality={"0": "CT"}))[0]["scheme"] == "percentile"
    assert planning.normalization(_fp((1, 1, 1), modality={"0": "MRI"}))[0] == {"scheme": "zscore"}


def test_normalisation_from_the_spread_of_case_medians():
    consistent = _fp((1, 1, 1), dtype="uint16")
    assert planning.normalization(consistent)[0]["dataset"]  # medians 100, 101 of a 200 range: 0.5%
    spread = _fp((1, 1, 1), dtype="uint16", cases=[{"intensity": [{"p50": 20.0, "min": 0.0}]},
                                                     {"intensity": [{"p50": 150.0, "min": 0.0}]}])
    norm, reason = planning.normalization(spread)
    assert norm == {"scheme": "zscore"} and "65%" in reason
    one = _fp((1, 1, 1), dtype="uint16", cases=[{"intensity": [{"p50": 20.0, "min": 0.0}]}])
    assert planning.normalization(one)[0] == {"scheme": "percentile", "lower": 0.5, "upper": 99.5}


def test_batch_size_is_measured_and_fits_the_budget():
    fp = _fp((1, 1, 1), shape=(48, 48, 48))
    small = planning.plan_configuration(fp, "3d", CPU, 64 << 20)
    large = planning.plan_configuration(fp, "3d", CPU, 4 << 30)
    memory = small["memory"]
    assert memory["per_sample_mib"] > 0 and memory["parameters"] > 0
    fits = int((64 - memory["fixed_mib"]) // memory["per_sample_mib"])
    assert small["config"]["batch_size"] == int(np.clip(fits, 2, 4))
    assert large["config"]["batch_size"] == 4
    # the measurement scales with the patch: twice the voxels, about twice the memory per sample
    net = {"name": "unet", "channels": [8, 16], "strides": [2]}
    a = planning.trial_memory(net, 3, 1, 1, (16, 16, 16), CPU)["per_sample"]
    b = planning.trial_memory(net, 3, 1, 1, (16, 16, 32), CPU)["per_sample"]
    assert 1.8 < b / a < 2.2


def test_label_summary_against_cc3d_and_tubularity():
    mask = np.zeros((40, 40, 40), bool)
    mask[5:8, 5:8, 2:38] = True  # a tube, radius ~1.5, 36 long
    mask[20:32, 20:32, 20:32] = True  # a cube
    mask[35, 35, 35] = True  # a speck
    summary = label_summary(mask, (1.0, 1.0, 1.0))
    labels, n = cc3d.connected_components(mask.astype(np.uint8), connectivity=26, return_N=True)
    sizes = np.bincount(labels.ravel())[1:]
    assert summary["components"] == n == 3
    assert summary["smallest"] == sizes.min() == 1 and summary["largest"] == sizes.max() == 12 ** 3
    tube = np.zeros_like(mask)
    tube[5:8, 5:8, 2:38] = True
    t = label_summary(tube, (1.0, 1.0, 1.0))
    assert t["tubular"] and t["radius"]["median_vox"] == pytest.approx(1.5)  # 3 voxels wide
    assert 30 <= t["radius"]["skeleton_voxels"] <= 36
    cube = np.zeros_like(mask)
    cube[10:30, 10:30, 10:30] = True
    assert not label_summary(cube, (1.0, 1.0, 1.0))["tubular"]
    ellipsoid = np.zeros((80, 40, 40), bool)
    x, y, z = np.ogrid[:80, :40, :40]
    ellipsoid[((x - 40) / 36.0) ** 2 + ((y - 20) / 12.0) ** 2 + ((z - 20) / 12.0) ** 2 <= 1] = True
    assert not label_summary(ellipsoid, (1.0, 1.0, 1.0))["tubular"]  # an elongated organ is no vessel
    assert is_tubular(40, 2.0) and not is_tubular(20, 2.0) and not is_tubular(0, 0.0)
    assert not is_tubular(4000, 1.0, branching=0.7)  # a mesh of junctions: a thin sheet, no vessel
    # a folded sheet with holes (cortex-like): thin, long skeleton, but no tube
    sheet = np.zeros((48, 48, 12), bool)
    xx, yy = np.meshgrid(np.arange(48), np.arange(48), indexing="ij")
    zz = (6 + 3 * np.sin(xx / 4.0) * np.cos(yy / 5.0)).astype(int)
    sheet[xx, yy, zz] = sheet[xx, yy, np.clip(zz + 1, 0, 11)] = True
    sheet[::6, ::6, :] = False
    assert not label_summary(sheet, (1.0, 1.0, 1.0))["tubular"]
    from slab.pipeline.data.phantom import make_phantom

    vessels = np.asarray(make_phantom((48, 48, 48), seed=0, kind="vessels").label)[0] > 0
    assert label_summary(vessels, (1.0, 1.0, 1.0))["tubular"]


def _mni152(name: str) -> np.ndarray:
    """nilearn's MNI152 2009a tissue probability map ``name`` (gm, wm) at 2 mm, from its wheel."""
    from nilearn import datasets

    path = Path(datasets.__file__).parent / "data" / f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz"
    a = np.asarray(nib.load(path).dataobj, np.float32) / 255.0
    s = [n // 2 * 2 for n in a.shape]
    return a[:s[0], :s[1], :s[2]].reshape(s[0] // 2, 2, s[1] // 2, 2, s[2] // 2, 2).mean(axis=(1, 3, 5))


def test_tissue_sheets_are_not_tubular_vessels_are():
    """White matter (one big sheet, 7-15 % of the volume) used to pass as tubular (its skeleton
    thins to curves with few junctions); it holds twice what tubes along that skeleton hold."""
    wm, gm = _mni152("wm") > 0.5, _mni152("gm") > 0.5
    for tissue in (wm, wm[:, :60], gm[:, :60]):
        summary = label_summary(tissue, (2.0, 2.0, 2.0))
        assert not summary["tubular"], summary["radius"]
    white = label_summary(wm, (2.0, 2.0, 2.0))["radius"]
    assert white["skeleton_branching"] <= 0.25 and white["tube_fill"] > 1.9  # it fails on the fill alone
    x, y, z = np.ogrid[:64, :64, :64]
    for r in (1, 2, 3):  # straight and curved tubes stay tubular
        straight = np.broadcast_to(((x - 32) ** 2 + (y - 32) ** 2 <= r * r) & (z > 4) & (z < 60), (64,) * 3)
        torus = (np.sqrt((x - 32.0) ** 2 + (y - 32.0) ** 2) - 20) ** 2 + (z - 32.0) ** 2 <= r * r
        for tube in (straight, torus):
            summary = label_summary(np.ascontiguousarray(tube), (1.0, 1.0, 1.0))
            assert summary["tubular"] and summary["radius"]["tube_fill"] < 1.4
    from slab.pipeline.data.phantom import make_phantom

    tree = np.asarray(make_phantom((96, 96, 96), seed=1, kind="vessels").label)[0] > 0
    assert label_summary(tree, (1.0, 1.0, 1.0))["tubular"]
    organs = np.asarray(make_phantom((64, 64, 64), seed=0, kind="organs").label) > 0
    assert not any(label_summary(o, (1.0, 1.0, 1.0))["tubular"] for o in organs)


def test_case_ids_are_unique_and_stable():
    from slab.pipeline.data.datalist import case_ids
    from slab.core.errors import SlabError

    folders = [{"image": f"/d/case{i}/image.nii.gz", "label": f"/d/case{i}/label.nii.gz"} for i in range(3)]
    assert case_ids(folders) == ["case0", "case1", "case2"]
    assert case_ids([{"image": "/d/a/x/scan.nii.gz"}, {"image": "/d/b/x/scan.nii.gz"},
                     {"image": "/d/b/x/other.nii.gz"}]) == ["a_x", "b_x", "other"]
    # a datalist 'case' groups items (days of one patient); ids stay unique within it
    assert case_ids([{"image": "/d/s1.nii.gz", "case": "c1"}, {"image": "/d/s2.nii.gz", "case": "c1"},
                     {"image": "/d/s3.nii.gz", "case": "c2"}]) == ["c1_s1", "c1_s2", "c2"]
    assert case_ids([{"image": ["/d/x_0000.nii.gz", "/d/x_0001.nii.gz"]}, {"image": "/d/y_0000.nii.gz"}]) == ["x", "y"]
    assert case_ids([{"image": "/d/x.nii.gz", "id": "y"}, {"image": "/d/y.nii.gz"}]) == ["y", "d_y"]
    assert case_ids(list(reversed(folders))) == ["case2", "case1", "case0"]  # a name does not depend on order
    with pytest.raises(SlabError, match="share the id 'x'"):
        case_ids([{"image": "/d/a.nii.gz", "id": "x"}, {"image": "/d/b.nii.gz", "id": "x"}])
    with pytest.raises(SlabError, match="names the same image"):
        case_ids([{"image": "/d/a.nii.gz"}, {"image": "/d/a.nii.gz"}])


def test_validation_entries_keep_their_own_fold(tmp_path):
    """A datalist's ``validation`` list is never dealt into training: it becomes one fold of its
    own, and training that fold trains on the training list and validates on the validation list."""
    from slab.pipeline.planning.plandir import plan_datalist

    items = []
    for i in range(5):
        for name in ("image", "label"):
            (tmp_path / f"c{i}").mkdir(exist_ok=True)
            (tmp_path / f"c{i}" / f"{name}.nii.gz").write_bytes(b"")
        items.append({"image": f"c{i}/image.nii.gz", "label": f"c{i}/label.nii.gz"})
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": items[:4], "validation": items[4:]}))
    fp = {"cases": [{"case": f"c{i}"} for i in range(5)]}
    data = plan_datalist(path, fp, n_folds=3)
    fold = {i["case"]: i["fold"] for i in data["training"]}
    assert data["validation_fold"] == 2 and fold["c4"] == 2
    assert sorted(fold[f"c{i}"] for i in range(4)) == [0, 0, 1, 1]
    from slab.pipeline.data.datalist import load_datalist

    train, val = load_datalist(data, fold=2)
    assert [i["case"] for i in val] == ["c4"] and sorted(i["case"] for i in train) == ["c0", "c1", "c2", "c3"]
    # a datalist with folds of its own keeps them; its unfolded validation items get one more
    for k, item in enumerate(items[:4]):
        item["fold"] = k % 2
    path.write_text(json.dumps({"training": items[:4], "validation": items[4:]}))
    data = plan_datalist(path, fp, n_folds=3)
    assert data["validation_fold"] == 2 and [i["fold"] for i in data["training"]] == [0, 1, 0, 1, 2]


def test_slice_statistics_and_drawn_body_shares_known_answers():
    """A bright 6x6x6 body, an 8-voxel label in it: per axis 2 slices with foreground (body 72),
    the others without (body 144). The sampler draws each kind half the time, so the drawn body
    holds 6 label voxels in 93 (0.0645) where the volume holds 8 in 216 (0.037)."""
    from slab.pipeline.planning.fingerprint import drawn_body_shares, slice_statistics

    image = np.zeros((10, 8, 6), np.float32)
    image[2:8, 1:7, :] = 100.0
    label = np.zeros(image.shape, bool)
    label[3:5, 2:4, 1:3] = True
    stats = slice_statistics(image, [label], label)
    assert stats == {"positive": [2, 2, 2], "negative": [8, 6, 4], "body_positive": [72, 72, 72],
                     "body_negative": [144, 144, 144], "label_body": [8]}
    ((drawn, whole),) = drawn_body_shares(stats, 0.5)
    assert drawn == pytest.approx(6 / 93) and whole == pytest.approx(8 / 216)
    ((drawn, whole),) = drawn_body_shares(stats, 0.5, axes=[2])  # one plane: slices along z only
    assert drawn == pytest.approx(2 / (18 + 18)) and whole == pytest.approx(8 / 216)
    air = np.zeros_like(image)
    air[3:5, 1:7, :] = 100.0  # the body only where the slices along x hold foreground
    stats = slice_statistics(air, [label], label)
    assert stats["body_negative"][0] == 0 and stats["positive"][0] == 2
    # every slice positive: every draw is of them, the drawn share is the volume's
    full = np.ones_like(label)
    ((drawn, whole),) = drawn_body_shares(slice_statistics(image, [full], full), 0.5)
    assert drawn == pytest.approx(whole)


def _mni152_t1() -> np.ndarray:
    from nilearn import datasets

    path = Path(datasets.__file__).parent / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    a = np.asarray(nib.load(path).dataobj, np.float32)
    s = [n // 2 * 2 for n in a.shape]
    return a[:s[0], :s[1], :s[2]].reshape(s[0] // 2, 2, s[1] // 2, 2, s[2] // 2, 2).mean(axis=(1, 3, 5))


def test_the_plan_undoes_a_lowered_prior_where_empty_slices_are_tissue(tmp_path):
    """MNI152 grey matter: the slices without it are air, the drawn body holds what the head does
    (true: only a raised prior undone); two vessel phantoms (fingerprinted as a plan reads them):
    their vessel-free slices are tissue, and drawing them half the time nearly halves the
    vessels' share of the body ("both")."""
    from slab.pipeline.data.phantom import write_phantom
    from slab.pipeline.planning.fingerprint import drawn_body_shares, slice_statistics

    gm = _mni152("gm") > 0.5
    brain = {"labels": [{"name": "grey_matter"}], "slices": slice_statistics(_mni152_t1(), [gm], gm)}
    items = []
    for seed in (0, 1):
        write_phantom(tmp_path / f"v{seed}", shape=(48, 48, 48), seed=seed, kind="vessels")
        items.append({"image": f"v{seed}/image.nii.gz", "label": f"v{seed}/label.nii.gz"})
    (tmp_path / "datalist.json").write_text(json.dumps({"training": items, "labels": ["vessel"]}))
    phantoms, problems = fingerprint(tmp_path / "datalist.json")
    assert problems == []
    for fp, expected, ratio in ((brain, True, (0.95, 1.05)), (phantoms, "both", (0.45, 0.65))):
        value, reason = planning.prior_adjustment(fp, ["xy", "zx", "zy"], 0.5)
        ((drawn, whole),) = drawn_body_shares(fp["slices"], 0.5)
        assert value == expected and ratio[0] < drawn / whole < ratio[1], (drawn, whole, reason)
    assert planning.prior_adjustment({"labels": [{"name": "l"}]}, ["xy"], 0.5)[0] is True  # an older fingerprint
    # one slice (a 2D image as a volume), every slice along z holding foreground: nothing to dilute
    flat = np.zeros((9, 7, 1), np.float32)
    flat[2:7, 1:6] = 50.0
    dot = np.zeros(flat.shape, bool)
    dot[4, 3, 0] = True
    one = {"labels": [{"name": "l"}], "slices": slice_statistics(flat, [dot], dot)}
    assert one["slices"]["positive"] == [1, 1, 1] and one["slices"]["negative"] == [8, 6, 0]
    assert planning.prior_adjustment(one, ["xy"], 0.5) == (True, "every slice holds foreground: the draws are "
                                                           "slices prediction meets; only a raised prior undone")


def test_fingerprint_of_phantoms_against_numpy(tmp_path):
    datalist = write_datalist(tmp_path, n=3, shape=(21, 19, 13))
    fp, problems = fingerprint(datalist)
    assert problems == [] and fp["n_cases"] == 3 and fp["median_shape"] == [21, 19, 13]
    case = next(c for c in fp["cases"] if c["case"] == "case1")
    image = nib.load(tmp_path / "case1" / "image.nii.gz").get_fdata()
    label = nib.load(tmp_path / "case1" / "label.nii.gz").get_fdata() > 0
    values = image[label]
    q = np.percentile(values, [0.5, 50, 99.5])
    stats = case["intensity"][0]
    assert [stats["p0_5"], stats["p50"], stats["p99_5"]] == pytest.approx(q.tolist())
    assert stats["mean"] == pytest.approx(values.mean()) and stats["std"] == pytest.approx(values.std())
    assert case["labels"][0]["voxels"] == int(label.sum())
    assert case["labels"][0]["fraction"] == pytest.approx(label.mean())
    assert case["orientation"] == "RAS" and case["spacing"] == [1.0, 1.0, 1.0]


def test_verify_reports_every_bad_case_in_one_pass(tmp_path, capsys):
    datalist = write_datalist(tmp_path, n=4, shape=(12, 10, 8))
    affine = np.eye(4)
    nib.save(nib.Nifti1Image(np.zeros((12, 10, 9), np.uint8), affine), tmp_path / "case1" / "label.nii.gz")
    nan = np.ones((12, 10, 8), np.float32)
    nan[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(nan, affine), tmp_path / "case2" / "image.nii.gz")
    nib.save(nib.Nifti1Image(np.full((12, 10, 8), -1, np.int16), affine), tmp_path / "case3" / "label.nii.gz")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["plan", str(datalist), "--verify"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 3, lines
    by_case = {next(c for c in ("case1", "case2", "case3") if f"/{c}/" in line): line for line in lines}
    assert "spatial shape" in by_case["case1"] and "NaN" in by_case["case2"] and "negative" in by_case["case3"]
    assert "1 good case(s), 3 problem(s)" in captured.out
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    # planning refuses the same data, naming every problem, and writes nothing
    assert main(["plan", str(datalist), "-o", str(tmp_path / "plan")]) == 2
    err = capsys.readouterr().err
    assert "3 problem(s)" in err and err.count("\n") == 1 and not (tmp_path / "plan").exists()


def _speckled_cases(n=3):
    """A blob of probability 0.9 plus isolated specks of 0.95: only min-size removal fixes them."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        truth = np.zeros((1, 24, 24, 24), np.uint8)
        truth[0, 6:18, 6:18, 6:18] = 1
        prob = truth.astype(np.float32) * 0.9
        for _ in range(300):
            x, y, z = rng.integers(0, 24, 3)
            if not truth[0, max(0, x - 1):x + 2, max(0, y - 1):y + 2, max(0, z - 1):z + 2].any():
                prob[0, x, y, z] = 0.95
        out.append((f"c{i}", prob, truth))
    return out


def test_postprocessing_choice_where_the_answer_is_known():
    cases = _speckled_cases()
    chosen = choose_postprocessing(lambda: iter(cases), 1, lambda name: (1.0, 1.0, 1.0), 1.0, [False], [1728])
    options = chosen["labels"][0]
    steps = {s["step"]: s for s in chosen["steps"][0]["steps"]}
    assert steps["min_size"]["kept"] and steps["min_size"]["gain"] > 0.05
    assert options["min_size"] >= 2
    assert not steps["fill_holes"]["kept"]  # a solid blob: nothing to fill, no gain, not kept
    # keep-largest 1 fixes the specks as well; whichever came first, the result is the truth
    from slab.transforms.post import make_postprocess

    for _, prob, truth in cases:
        assert np.array_equal(np.asarray(make_postprocess(options)(prob)), truth)
    assert chosen["steps"][0]["score"] == pytest.approx(1.0)


def test_baseline_window_finds_the_intensity_band():
    rng = np.random.default_rng(1)
    image = rng.uniform(0, 1, (1, 20, 20, 20)).astype(np.float32)
    truth = ((image[0] > 0.4) & (image[0] < 0.6))[None].astype(np.uint8)
    edges = [np.linspace(0, 1, 49)]
    edges[0][0], edges[0][-1] = -np.inf, np.inf
    hist = window_histograms(image, truth, edges)
    channel, first, end, dice = best_window([hist], 0)
    assert dice > 0.95 and abs(edges[0][first] - 0.4) < 0.03 and abs(edges[0][end] - 0.6) < 0.03
    mask = window_mask(image, edges, [(channel, first, end, dice)])
    d = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert d == pytest.approx(dice, rel=1e-9)


CV_SHAPES = [(20, 18, 12), (21, 18, 12), (20, 19, 12), (20, 18, 13)]


@pytest.fixture(scope="module")
def cv_plan(tmp_path_factory):
    """A tiny plan cross-validated end to end: 4 cases, 2 folds, 2d and 3d, one epoch each."""
    from slab.pipeline.data.phantom import write_phantom

    root = tmp_path_factory.mktemp("cv")
    # one folder per case, each holding image.nii.gz and label.nii.gz (as slab phantom writes
    # them), no ids and no folds: the plan must name the cases by their folders; each case has
    # its own shape, so a prediction that is not its own cannot pass unnoticed
    items = []
    for i, shape in enumerate(CV_SHAPES):
        image, label = write_phantom(root / f"case{i}", shape=shape, seed=i, kind="vessels")
        items.append({"image": str(image), "label": str(label)})
    datalist = root / "datalist.json"
    datalist.write_text(json.dumps({"training": items}), encoding="utf-8")
    plan = root / "plan"
    assert main(["plan", str(datalist), "-o", str(plan), "--device", "cpu", "--epochs", "1", "--folds", "2",
                 "--configurations", "2d,3d"]) == 0
    overrides = root / "over.json"
    overrides.write_text(json.dumps({"samples_per_epoch": 8, "batch_size": 4, "network": TINY_UNET,
                                     "progress": False, "val": {"thresholds": [0.3, 0.5, 0.7]}}))
    assert main(["cv", str(plan), "--config", str(overrides), "--device", "cpu", "--threads", "1"]) == 0
    return root, plan, overrides


def test_cv_writes_table_postprocessing_and_model(cv_plan, capsys):
    root, plan, overrides = cv_plan
    table = (plan / "cv" / "table.md").read_text()
    for row in ("| 2d |", "| 3d |", "| 2d+3d |", "(chosen)", "baseline: intensity window"):
        assert row in table
    model = json.loads((plan / "model.json").read_text())
    folds = sorted(m["fold"] for m in model["members"])
    assert folds in ([0, 1], [0, 0, 1, 1])
    post = json.loads((plan / "postprocessing.json").read_text())
    assert post["postprocess"] == model["postprocess"] and len(post["steps"]) == 1
    result = json.loads((plan / "cv" / "table.json").read_text())
    assert result["final"]["score"] >= result["rows"][result["best"]]["tuned"]["score"] - 1e-9
    # every out-of-fold case predicted once, from its own fold's model, into its own file
    assert sorted(p.stem for p in (plan / "cv" / "2d").glob("*.npy")) == ["case0", "case1", "case2", "case3"]
    data = json.loads((plan / "datalist.json").read_text())
    from slab.pipeline.inference.ensemble import load_model
    from slab.io.volumes import load_volume

    for fold in (0, 1):
        record = json.loads((plan / "cv" / "2d" / f"fold_{fold}.json").read_text())
        held = [i for i in data["training"] if i["fold"] == fold]
        assert record["cases"] == [i["case"] for i in held] and len(held) == 2
        model = load_model(plan / "runs" / "2d" / f"fold_{fold}", device="cpu", tta="none")
        for item in held:
            case = int(item["case"].removeprefix("case"))
            assert Path(item["image"]).parent.name == item["case"]
            saved = np.load(plan / "cv" / "2d" / f"{item['case']}.npy")
            assert saved.shape[1:] == CV_SHAPES[case]
            np.testing.assert_allclose(saved, model(load_volume(item["image"])).numpy(), atol=1e-6)
    per_case = [result["rows"]["2d"]["tuned"]["labels"]["label_1"]["dice"]["std"]]
    assert per_case[0] > 0  # four different cases, four different scores
    # resumable as a whole: a second run trains nothing
    stamp = (plan / "runs" / "2d" / "fold_0" / "best.pt").resolve().stat().st_mtime_ns
    assert main(["cv", str(plan), "--config", str(overrides), "--device", "cpu"]) == 0
    assert "2d fold 0: finished before" in capsys.readouterr().out
    assert (plan / "runs" / "2d" / "fold_0" / "best.pt").resolve().stat().st_mtime_ns == stamp


def test_predict_model_directory_ensemble_and_folds(cv_plan, tmp_path):
    root, plan, _ = cv_plan
    image = root / "case0" / "image.nii.gz"
    assert main(["predict", "--model", str(plan), "-i", str(image), "-o", str(tmp_path / "all.nii.gz"),
                 "--device", "cpu"]) == 0
    assert main(["predict", "--model", str(plan), "--folds", "1", "-i", str(image), "--prob",
                 str(tmp_path / "p1.nii.gz"), "-o", str(tmp_path / "f1.nii.gz"), "--device", "cpu"]) == 0
    written = nib.load(tmp_path / "all.nii.gz")
    assert np.allclose(written.affine, nib.load(image).affine) and written.shape == (20, 18, 12)
    from slab.pipeline.inference.ensemble import load_model
    from slab.io.volumes import load_volume

    volume = load_volume(image)
    ensemble = load_model(plan, device="cpu")
    model = json.loads((plan / "model.json").read_text())
    members = [load_model(plan / m["checkpoint"], device="cpu") for m in model["members"]]
    mean = sum(m(volume).float() for m in members) / len(members)
    assert torch.allclose(ensemble(volume), mean, atol=1e-6)
    mask = np.asarray(ensemble.postprocess(ensemble(volume)))[0]
    assert np.array_equal(mask, np.asarray(written.dataobj))


def test_ensemble_of_two_identical_folds_equals_one(cv_plan):
    _, plan, _ = cv_plan
    from slab.pipeline.inference.ensemble import Ensemble, load_model
    from slab.io.volumes import load_volume

    checkpoint = plan / "runs" / "2d" / "fold_0" / "best.pt"
    volume = load_volume(plan.parent / "case1" / "image.nii.gz")
    one = load_model(checkpoint, device="cpu")(volume)
    two = Ensemble([checkpoint, checkpoint], device="cpu")(volume)
    assert torch.equal(one, two)


def test_run_is_a_model_with_its_threshold_and_normalisation(cv_plan, tmp_path):
    _, plan, _ = cv_plan
    from slab.pipeline.inference.ensemble import load_model
    from slab.pipeline.model.spec import spec_of_checkpoint
    from slab.pipeline.model.checkpoints import load_checkpoint
    from slab.transforms.intensity import ZScoreNormalize

    run = plan / "runs" / "3d" / "fold_1"
    state = load_checkpoint(run / "best.pt")
    predictor = load_model(run, device="cpu")
    spec = spec_of_checkpoint(run / "best.pt")
    assert spec["normalize"] == state["config"]["normalize"]
    assert predictor.postprocess.binarise.threshold == pytest.approx(state["threshold"])
    assert predictor.roi_size == tuple(state["config"]["patch_size"])
    if spec["normalize"] == {"scheme": "zscore"}:
        assert isinstance(predictor.normalize, ZScoreNormalize)
    # a given threshold wins over the recorded one
    assert load_model(run, device="cpu", postprocess={"threshold": 0.25}).postprocess.binarise.threshold == 0.25


def test_train_from_plan_defaults_and_overrides(cv_plan, capsys):
    _, plan, overrides = cv_plan
    argv = ["train", "--plan", str(plan), "--configuration", "2d", "--fold", "0", "--config", str(overrides),
            "--device", "cpu"]
    assert main(argv) == 2  # PLAN_DIR/runs/2d/fold_0 is the default --out, and it holds a run
    assert "runs/2d/fold_0: already holds a run" in capsys.readouterr().err
    assert main(argv + ["--resume"]) == 0  # a finished run resumes to itself
    assert '"run_dir"' in capsys.readouterr().out
    assert main(["train", "--plan", str(plan), "--device", "cpu"]) == 2
    assert "--configuration: required" in capsys.readouterr().err
    assert main(["train", "--plan", str(plan), "--configuration", "4d", "--device", "cpu"]) == 2
    assert "'4d' is not planned" in capsys.readouterr().err


def test_export_install_and_predict_by_name(cv_plan, tmp_path, monkeypatch, capsys):
    root, plan, _ = cv_plan
    monkeypatch.setenv("SLAB_HOME", str(tmp_path / "home"))
    archive = tmp_path / "vessels.zip"
    assert main(["export", str(plan), str(archive)]) == 0
    names = zipfile.ZipFile(archive).namelist()
    assert "model.json" in names and "postprocessing.json" in names and any(n.startswith("members/") for n in names)
    assert "cases" not in json.loads(zipfile.ZipFile(archive).read("fingerprint.json"))
    assert main(["install", str(archive)]) == 0
    assert main(["install", str(archive)]) == 2 and "--force" in capsys.readouterr().err
    image = root / "case2" / "image.nii.gz"
    assert main(["predict", "--model", "vessels", "-i", str(image), "-o", str(tmp_path / "a.nii.gz"),
                 "--device", "cpu"]) == 0
    assert main(["predict", "--model", str(plan), "-i", str(image), "-o", str(tmp_path / "b.nii.gz"),
                 "--device", "cpu"]) == 0
    assert np.array_equal(nib.load(tmp_path / "a.nii.gz").dataobj, nib.load(tmp_path / "b.nii.gz").dataobj)
    # an archive whose member would land outside the folder is refused before extraction
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("model.json", "{}")
        zf.writestr("../escape.pt", "x")
    assert main(["install", str(evil)]) == 2
    assert "outside the model's folder" in capsys.readouterr().err
    assert not (tmp_path / "home" / "escape.pt").exists() and not (tmp_path / "home" / "models" / "evil").exists()


def test_predict_model_bad_inputs(cv_plan, tmp_path, capsys):
    root, plan, _ = cv_plan
    image = str(root / "case0" / "image.nii.gz")
    for argv, expected in [
        (["--model", str(plan), "--folds", "7"], "fold 7 is not in the model"),
        (["--model", str(tmp_path / "none")], "is not a checkpoint, a run or model directory"),
        (["--model", str(plan), "--weights", "x.pt"], "--weights: --model brings its own weights"),
        (["--network", str(plan / "runs" / "2d" / "fold_0" / "config.json"), "--weights", "x.pt"],
         "is a training configuration"),
        (["--bundle", str(tmp_path), "--folds", "0"], "--folds: only with --model"),
    ]:
        assert main(["predict", *argv, "-i", image, "-o", str(tmp_path / "o.nii.gz")]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert expected in err and "\n" not in err, err
    assert main(["predict", "--model", str(plan), "-i", image, "-o", str(plan / "model.json")]) == 2
    assert json.loads((plan / "model.json").read_text())["members"]


def test_dataset_normalisation_comes_from_the_training_folds_only(tmp_path):
    from slab.pipeline.training import train
    from slab.pipeline.training.normalization import foreground_samples

    datalist = write_datalist(tmp_path, n=3, shape=(16, 14, 10))  # folds 0, 1, 0
    cfg = {"epochs": 1, "batch_size": 4, "samples_per_epoch": 4, "planes": ["xy"], "network": TINY_UNET,
           "progress": False, "normalize": {"scheme": "percentile", "lower": 1, "upper": 99, "dataset": True}}
    train(datalist, cfg, tmp_path / "run", fold=0, device="cpu")
    stored = json.loads((tmp_path / "run" / "config.json").read_text())["normalize"]
    image = np.asarray(nib.load(tmp_path / "case1" / "image.nii.gz").dataobj, dtype=np.float64)
    label = np.asarray(nib.load(tmp_path / "case1" / "label.nii.gz").dataobj) > 0  # case1: the only training case
    assert label.sum() < 10_000  # every foreground voxel is in the sample: the exact percentiles
    assert stored["low"] == pytest.approx([np.percentile(image[label], 1)], abs=1e-5)
    assert stored["high"] == pytest.approx([np.percentile(image[label], 99)], abs=1e-5)
    assert "dataset" not in stored
    from slab.pipeline.inference.ensemble import load_model

    assert load_model(tmp_path / "run", device="cpu").normalize.low == tuple(stored["low"])
    z = foreground_samples([{"image": str(tmp_path / "case1" / "image.nii.gz"),
                             "label": str(tmp_path / "case1" / "label.nii.gz")}])
    assert z.shape == (1, int(label.sum()))
    with pytest.raises(Exception, match="dataset statistics replace low/high"):
        from slab.pipeline.training.config import validate_config

        validate_config({"normalize": {"low": [0], "high": [1], "dataset": True}})


def test_a_larger_ensemble_must_win_by_the_margin():
    from slab.pipeline.planning.crossval import ENSEMBLE_MARGIN, choose_candidate

    def rows(**scores):
        return {k: {"configurations": k.split("+"), "tuned": {"score": v}} for k, v in scores.items()}

    assert choose_candidate(rows(**{"2d": 0.80, "2p5d": 0.81, "2d+2p5d": 0.81 + ENSEMBLE_MARGIN / 2})) == "2p5d"
    assert choose_candidate(rows(**{"2d": 0.80, "2p5d": 0.81, "2d+2p5d": 0.83})) == "2d+2p5d"


def test_an_exported_run_keeps_its_threshold(cv_plan, tmp_path, monkeypatch):
    _, plan, _ = cv_plan
    from slab.pipeline.inference.ensemble import load_model
    from slab.pipeline.model.checkpoints import load_checkpoint

    monkeypatch.setenv("SLAB_HOME", str(tmp_path / "home"))
    run = plan / "runs" / "3d" / "fold_0"
    assert main(["export", str(run), str(tmp_path / "run.zip")]) == 0
    assert main(["install", str(tmp_path / "run.zip"), "--name", "one"]) == 0
    installed = load_model("one", device="cpu")
    assert installed.postprocess.binarise.threshold == pytest.approx(load_checkpoint(run / "best.pt")["threshold"])


def test_the_plan_reads_exclusive_classes_from_the_labels():
    fp = _fp((1, 1, 1))
    fp["labels"] = fp["labels"] * 2
    fp["label_format"] = "values"
    assert planning.label_outputs(fp)[0] == "dice_ce"
    fp["label_format"] = "channels"
    fp["cases"] = [dict(c, overlap_voxels=0) for c in fp["cases"]]
    loss, reason = planning.label_outputs(fp)
    assert loss == "dice_ce" and "never overlap" in reason
    fp["cases"][1]["overlap_voxels"] = 12
    loss, reason = planning.label_outputs(fp)
    assert loss == "dice_bce" and "12 voxels" in reason and "1 of 2 cases" in reason
    assert planning.label_outputs(_fp((1, 1, 1)))[0] == "dice_bce"  # one label


def test_exclusive_classes_train_a_softmax_and_predict_by_argmax(tmp_path, capsys):
    """A label map of three organs: planned as exclusive classes (dice_ce), cross-validated on
    argmax masks, and predicted as a softmax whose argmax puts no voxel in two labels."""
    from slab.pipeline.data.phantom import make_phantom
    from slab.pipeline.inference.ensemble import load_model
    from slab.io.volumes import load_volume

    items = []
    for i in range(4):
        phantom = make_phantom((24, 22, 16), seed=i, kind="organs")
        values = np.zeros((24, 22, 16), np.int16)
        for c, channel in enumerate(np.asarray(phantom.label)):
            values[channel > 0] = c + 1
        (tmp_path / f"c{i}").mkdir()
        nib.save(nib.Nifti1Image(np.asarray(phantom.image)[0], np.eye(4)), tmp_path / f"c{i}" / "image.nii.gz")
        nib.save(nib.Nifti1Image(values, np.eye(4)), tmp_path / f"c{i}" / "label.nii.gz")
        items.append({"image": f"c{i}/image.nii.gz", "label": f"c{i}/label.nii.gz"})
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": items, "labels": ["a", "b", "c"], "label_format": "values"}))
    plan = tmp_path / "plan"
    assert main(["plan", str(datalist), "-o", str(plan), "--device", "cpu", "--epochs", "1", "--folds", "2",
                 "--configurations", "2d"]) == 0
    plans = json.loads((plan / "plans.json").read_text())
    assert plans["configurations"]["2d"]["config"]["loss"] == "dice_ce"
    assert "exclusive" in plans["configurations"]["2d"]["reasons"]["loss"]
    overrides = tmp_path / "over.json"
    overrides.write_text(json.dumps({"samples_per_epoch": 8, "batch_size": 4, "network": TINY_UNET,
                                     "progress": False}))
    assert main(["cv", str(plan), "--config", str(overrides), "--device", "cpu", "--threads", "1"]) == 0
    model_file = json.loads((plan / "model.json").read_text())
    assert model_file["postprocess"]["argmax"] is True
    assert all("threshold" not in o for o in model_file["postprocess"]["labels"])
    assert "| 2d | argmax (ECE" in (plan / "cv" / "table.md").read_text()
    model = load_model(plan, device="cpu")
    assert model.exclusive
    image = load_volume(tmp_path / "c0" / "image.nii.gz")
    prob = np.asarray(model(image))
    assert prob.shape == (3, 24, 22, 16) and prob.min() >= 0 and prob.sum(axis=0).max() <= 1 + 1e-5
    # the softmax with the background logit 0, against the network's logits of one slab
    member = model.first
    from slab.pipeline.inference import predict_2p5d

    logits_model = member.model
    single = predict_2p5d(member.model, member.normalize(image), planes=["xy"], offsets=member.offsets, tta="none",
                          device="cpu", divisor=member.divisor, min_size=member.min_size, activation="softmax")
    with torch.no_grad():
        from slab.transforms.slabs import pad_to_divisor

        x = torch.as_tensor(np.asarray(member.normalize(image)))[:, :, :, 5][None]
        x, pads = pad_to_divisor(x, member.divisor, min_size=member.min_size)
        y = logits_model.eval()(x)[0][:, pads[0][0]:pads[0][0] + 24, pads[1][0]:pads[1][0] + 22]
        expected = torch.softmax(torch.cat([torch.zeros_like(y[:1]), y]), dim=0)[1:]
    np.testing.assert_allclose(np.asarray(single)[:, :, :, 5], expected.numpy(), atol=1e-5)
    out = tmp_path / "mask.nii.gz"
    capsys.readouterr()
    assert main(["predict", "-i", str(tmp_path / "c0" / "image.nii.gz"), "-o", str(out), "--model", str(plan),
                 "--device", "cpu", "--quiet"]) == 0
    assert "more than one label" not in capsys.readouterr().err
    mask = np.asarray(nib.load(out).dataobj)
    assert set(np.unique(mask)) <= {0, 1, 2, 3}
    from slab.transforms.post import argmax_masks

    chosen = np.asarray(model.postprocess(prob))
    assert chosen.sum(axis=0).max() <= 1 and (chosen <= argmax_masks(prob)).all()  # argmax, then clean-up
    np.testing.assert_array_equal(mask, (chosen * np.arange(1, 4)[:, None, None, None]).sum(axis=0))


def test_the_plan_says_how_long_and_fits_a_budget():
    fp = _fp((1, 1, 1), shape=(40, 36, 30))
    fp["n_cases"] = 4
    cfg = {"task": "segmentation_2p5d", "planes": ["xy", "zx"], "epochs": 10, "samples_per_epoch": 64,
           "batch_size": 8, "val_every": 2, "val": {"tta": "flips", "planes": None}}
    timing = {"step_s": 0.5, "forward_s_per_sample": 0.01}
    # 2 folds: 2 held-out cases, (30 + 36) slices x 8 flips each, 5 validations
    assert schedule.validation_samples(fp, cfg, 2) == 2 * 8 * (30 + 36)
    t = schedule.expected_time(fp, cfg, timing, n_folds=2)
    assert t["steps"] == 80 and t["train_min"] == pytest.approx(80 * 0.5 / 60, abs=0.01)
    assert t["validation_min"] == pytest.approx(5 * 1056 * 0.01 / 60, abs=0.01)
    three = {"task": "segmentation_3d", "patch_size": [24, 24, 24], "val": {"tta": "none", "overlap": 0.5}}
    # windows: x (40-24)/12 -> 3, y (36-24)/12 -> 2, z (30-24)/12 -> 2
    assert schedule.validation_samples(fp, three, 1) == 3 * 2 * 2
    for minutes in (0.5, 2.0):
        fitted = dict(cfg)
        schedule.fit_budget(fp, fitted, timing, 2, minutes)
        total = schedule.expected_time(fp, fitted, timing, 2)["total_min"]
        assert total <= minutes + 0.01 and fitted["epochs"] >= 1
    small = dict(cfg)
    reason = schedule.fit_budget(fp, small, timing, 2, 0.05)  # less than one epoch
    assert small["epochs"] == 1 and small["samples_per_epoch"] < 64 and "not one whole epoch" in reason
    plan = planning.plan_configuration(fp, "2d", CPU, 1 << 30, minutes=1.0, n_folds=2)
    assert plan["time"]["step_s"] > 0 and plan["time"]["total_min"] <= 1.0 + 1e-6
    assert "--budget 1 min" in plan["reasons"]["epochs"]


def test_install_checks_the_archive_before_unpacking(cv_plan, tmp_path, monkeypatch, capfd):
    """Damaged, encrypted, oddly compressed, oversized and lying archives are one line naming
    the archive, and SLAB_HOME holds no model afterwards; --force never follows a link."""
    import struct

    from slab.pipeline.model import archive as archives

    _, plan, _ = cv_plan
    home = tmp_path / "home"
    monkeypatch.setenv("SLAB_HOME", str(home))
    good = tmp_path / "good.zip"
    assert main(["export", str(plan), str(good)]) == 0
    data = good.read_bytes()
    infos = {i.filename: i for i in zipfile.ZipFile(good).infolist()}

    def patched(name, edit):
        path = tmp_path / f"{name}.zip"
        raw = bytearray(data)
        edit(raw)
        path.write_bytes(bytes(raw))
        return path

    model = infos["model.json"]
    local = model.header_offset
    start = local + 30 + len(model.filename.encode()) + len(model.extra)

    def bad_crc(raw):
        raw[start] ^= 0xFF  # the first byte of model.json's data: the CRC no longer matches

    def central(raw, offset, fmt, value):  # a field of model.json's central directory entry
        directory = bytes(raw).find(b"PK\x01\x02")
        while directory >= 0:
            name_length = struct.unpack("<H", raw[directory + 28:directory + 30])[0]
            if raw[directory + 46:directory + 46 + name_length] == b"model.json":
                struct.pack_into(fmt, raw, directory + offset, value)
                return
            directory = bytes(raw).find(b"PK\x01\x02", directory + 4)

    cases = {
        "crc": (patched("crc", bad_crc), "model.json is damaged"),
        "encrypted": (patched("encrypted", lambda raw: central(raw, 8, "<H", 0x1)), "encrypted"),
        "bzip2": (patched("bzip2", lambda raw: central(raw, 10, "<H", 12)), "compression 12"),
        "size-lies": (patched("lies", lambda raw: central(raw, 24, "<I", 3)), "model.json"),
    }
    for name, (path, expected) in cases.items():
        capfd.readouterr()
        assert main(["install", str(path), "--name", name]) == 2, name
        err = capfd.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0] and str(path) in err[0], (name, err)
        assert not (home / "models" / name).exists()
        assert not [p for p in (home / "models").iterdir() if p.name.startswith("slab-")] if (home / "models").exists() \
            else True
    monkeypatch.setattr(archives, "MAX_ARCHIVE_BYTES", 1000)  # a limit for the archive, not only per member
    assert main(["install", str(good), "--name", "big"]) == 2
    assert "more than 16 GiB" in capfd.readouterr().err and not (home / "models" / "big").exists()
    monkeypatch.undo()
    monkeypatch.setenv("SLAB_HOME", str(home))
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    (home / "models").mkdir(parents=True, exist_ok=True)
    (home / "models" / "linked").symlink_to(victim)
    assert main(["install", str(good), "--name", "linked", "--force"]) == 2
    assert "a link" in capfd.readouterr().err and (victim / "keep.txt").read_text() == "mine"


def _msd_task(root: Path, labels: dict) -> Path:
    """A miniature Medical Segmentation Decathlon task as its documentation lays it out:
    imagesTr/, labelsTr/ (one label map per case), imagesTs/, dataset.json with relative ./ paths."""
    from slab.pipeline.data.phantom import make_phantom

    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (root / folder).mkdir(parents=True)
    training = []
    for i in range(3):
        phantom = make_phantom((20, 18, 12), seed=i, kind="organs")
        values = np.zeros((20, 18, 12), np.uint8)
        for c, channel in enumerate(np.asarray(phantom.label)[:2]):
            values[channel > 0] = c + 1
        nib.save(nib.Nifti1Image(np.asarray(phantom.image)[0], np.eye(4)), root / "imagesTr" / f"org_{i:03d}.nii.gz")
        nib.save(nib.Nifti1Image(values, np.eye(4)), root / "labelsTr" / f"org_{i:03d}.nii.gz")
        training.append({"image": f"./imagesTr/org_{i:03d}.nii.gz", "label": f"./labelsTr/org_{i:03d}.nii.gz"})
    nib.save(nib.Nifti1Image(np.zeros((20, 18, 12), np.float32), np.eye(4)), root / "imagesTs" / "org_100.nii.gz")
    dataset = {"name": "Organs", "description": "phantoms", "tensorImageSize": "3D", "modality": {"0": "MRI"},
               "labels": labels, "numTraining": 3, "numTest": 1, "training": training,
               "test": ["./imagesTs/org_100.nii.gz"]}
    (root / "dataset.json").write_text(json.dumps(dataset))
    return root / "dataset.json"


@pytest.mark.parametrize("labels", [{"0": "background", "1": "liver", "2": "spleen"},  # MSD: value -> name
                                    {"background": 0, "liver": 1, "spleen": 2}])  # nnU-Net v2: name -> value
def test_a_decathlon_dataset_json_plans_and_trains_as_it_comes(tmp_path, labels):
    from slab.pipeline.data.datalist import read_datalist
    from slab.core.errors import SlabError

    dataset = _msd_task(tmp_path / "Task01_Organs", labels)
    data = read_datalist(dataset)
    assert data["labels"] == ["liver", "spleen"] and data["label_format"] == "values"
    plan = tmp_path / "plan"
    assert main(["plan", str(dataset.parent), "-o", str(plan), "--device", "cpu", "--epochs", "1", "--folds", "3",
                 "--configurations", "2d"]) == 0  # the task's folder, as it comes
    plans = json.loads((plan / "plans.json").read_text())
    assert plans["labels"] == ["liver", "spleen"] and plans["configurations"]["2d"]["config"]["loss"] == "dice_ce"
    assert "MRI" in plans["configurations"]["2d"]["reasons"]["normalize"]
    overrides = tmp_path / "over.json"
    overrides.write_text(json.dumps({"samples_per_epoch": 4, "batch_size": 2, "network": TINY_UNET, "progress": False}))
    assert main(["train", "--plan", str(plan), "--configuration", "2d", "--fold", "0", "--config", str(overrides),
                 "--device", "cpu"]) == 0
    with pytest.raises(SlabError, match="region"):
        read_datalist({"training": [], "labels": {"background": 0, "whole tumour": [1, 2, 3]}})
    with pytest.raises(SlabError, match="1..N"):
        read_datalist({"training": [], "labels": {"0": "background", "2": "spleen"}})


def test_an_nnunet_raw_dataset_becomes_a_datalist(tmp_path, capsys):
    """nnU-Net v2's raw layout: imagesTr/{case}_{XXXX}.nii.gz per channel, labelsTr/{case}.nii.gz,
    dataset.json with channel_names, labels (name -> value) and file_ending."""
    from slab.pipeline.data.phantom import make_phantom

    root = tmp_path / "Dataset001_Organs"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(3):
        phantom = make_phantom((20, 18, 12), seed=i, kind="organs")
        image = np.asarray(phantom.image)[0]
        for c, channel in enumerate((image, 1.0 - image)):  # two contrasts
            nib.save(nib.Nifti1Image(channel, np.eye(4)), root / "imagesTr" / f"org_{i:03d}_{c:04d}.nii.gz")
        values = np.zeros((20, 18, 12), np.uint8)
        values[np.asarray(phantom.label)[0] > 0] = 1
        nib.save(nib.Nifti1Image(values, np.eye(4)), root / "labelsTr" / f"org_{i:03d}.nii.gz")
    meta = {"channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "liver": 1}, "numTraining": 3,
            "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    assert main(["dataset", "nnunet", str(root), str(tmp_path / "out"), "--folds", "2"]) == 0
    data = json.loads((tmp_path / "out" / "datalist.json").read_text())
    items = data["training"] + data["validation"]
    assert data["labels"] == ["liver"] and data["label_format"] == "values"
    assert data["modality"] == {"0": "T1", "1": "T2"} and len(items) == 3
    first = next(i for i in items if i["id"] == "org_000")
    assert [Path(p).name for p in first["image"]] == ["org_000_0000.nii.gz", "org_000_0001.nii.gz"]
    assert Path(first["label"]).name == "org_000.nii.gz"
    assert main(["plan", str(tmp_path / "out" / "datalist.json"), "-o", str(tmp_path / "plan"), "--device", "cpu",
                 "--epochs", "1", "--configurations", "2d"]) == 0
    plans = json.loads((tmp_path / "plan" / "plans.json").read_text())
    assert plans["labels"] == ["liver"] and "MRI" in plans["configurations"]["2d"]["reasons"]["normalize"]
    # slab plan takes the raw folder itself
    assert main(["plan", str(root), "-o", str(tmp_path / "plan_raw"), "--device", "cpu", "--epochs", "1",
                 "--configurations", "2d"]) == 0
    raw = json.loads((tmp_path / "plan_raw" / "datalist.json").read_text())
    assert sorted(i["case"] for i in raw["training"]) == ["org_000", "org_001", "org_002"]
    assert json.loads((tmp_path / "plan_raw" / "plans.json").read_text())["labels"] == ["liver"]
    (root / "imagesTr" / "org_002_0001.nii.gz").unlink()  # a case missing a channel: one line
    capsys.readouterr()
    assert main(["dataset", "nnunet", str(root), str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err.strip()
    assert "org_002" in err and "\n" not in err and not (tmp_path / "out2").exists()


def test_one_volume_walk_reads_the_checkpoint_once_and_checks_the_output_once(cv_plan, tmp_path, monkeypatch):
    """``slab predict --model RUN``: the output's name is checked once, before the model is read;
    the checkpoint is read once (its spec and its weights from one read); the write itself is
    the only other time the output's format is resolved."""
    _, plan, _ = cv_plan
    import torch

    from slab.io import volumes

    run = plan / "runs" / "2d" / "fold_0"
    out = tmp_path / "mask.nii.gz"
    events = []
    load, writer_for = torch.load, volumes.writer_for

    def counting_load(f, *args, **kwargs):
        if Path(str(f)).resolve() == (run / "best.pt").resolve():
            events.append("read checkpoint")
        return load(f, *args, **kwargs)

    def counting_writer_for(path):
        if Path(path) == out:
            events.append("check output")
        return writer_for(path)

    monkeypatch.setattr(torch, "load", counting_load)
    monkeypatch.setattr(volumes, "writer_for", counting_writer_for)  # output_format and save_volume
    assert main(["predict", "--model", str(run), "-i", str(plan.parent / "case1" / "image.nii.gz"), "-o", str(out),
                 "--device", "cpu"]) == 0
    assert events == ["check output", "read checkpoint", "check output"]  # the last one: the write


def test_an_ensemble_goes_out_of_core_as_one_model_does(cv_plan, tmp_path):
    """predict_file with a cross-validated model (two folds) and a memory budget the volume does not
    fit: each member into a store of its own, their mean block by block; the mask equals the
    in-memory ensemble's, the probabilities agree to float16 and the work folder is gone."""
    _, plan, _ = cv_plan
    from slab.io.volumes import load_volume
    from slab.pipeline.inference import predict_file
    from slab.pipeline.inference.ensemble import Ensemble, load_model
    from slab.pipeline.inference.files import VolumePredictor

    image = plan.parent / "case2" / "image.nii.gz"
    blockwise = {"fill_holes": None}  # whatever cv chose: hole filling needs the whole mask (refused out of core)
    in_memory = load_model(plan, device="cpu", configurations=["2d"], postprocess=blockwise)
    out_of_core = load_model(plan, device="cpu", configurations=["2d"], memory_budget=1 << 12, postprocess=blockwise)
    assert isinstance(out_of_core, Ensemble) and len(out_of_core) == 2
    assert isinstance(out_of_core, VolumePredictor) and isinstance(in_memory.first, VolumePredictor)
    assert out_of_core.out_of_core(load_volume(image, lazy=True))
    predict_file(image, tmp_path / "a.nii.gz", in_memory, prob_path=tmp_path / "pa.nii.gz")
    predict_file(image, tmp_path / "b.zarr", out_of_core, prob_path=tmp_path / "pb.zarr")
    expected = load_volume(tmp_path / "a.nii.gz").numpy()
    got = load_volume(tmp_path / "b.zarr").numpy()
    probs_a = load_volume(tmp_path / "pa.nii.gz").numpy()
    probs_b = load_volume(tmp_path / "pb.zarr").numpy().astype(np.float32)
    np.testing.assert_allclose(probs_b, probs_a, atol=2e-3)
    near = np.abs(probs_a - 0.5).max(axis=0) < 3e-3  # float16 may flip a voxel at the threshold itself
    assert np.array_equal(got[:, ~near], expected[:, ~near]) and expected.any()
    assert not list(tmp_path.glob("*.partial"))
