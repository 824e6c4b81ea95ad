"""slab.pipeline.evaluation.metrics against DeepMind's surface-distance and MONAI, on tiny volumes."""
import math
import mmap
from pathlib import Path

import numpy as np
import pytest
import surface_distance as sd
import torch
from monai.metrics import DiceMetric, compute_surface_dice
from scipy import ndimage as ndi
from surface_distance import lookup_tables

import slab.pipeline.evaluation.metrics as M
import slab.pipeline.evaluation.surface as S
from slab.core.errors import SlabError
from slab.io.volumes import load_volume, save_volume

TOLERANCES = (0.0, 0.5, 1.0, 2.5)


@pytest.fixture(autouse=True)
def numpy_inf(monkeypatch):
    # surface-distance still spells np.Inf and np.NaN (gone in numpy 2) for empty masks.
    monkeypatch.setattr(np, "Inf", np.inf, raising=False)
    monkeypatch.setattr(np, "NaN", np.nan, raising=False)


def blobs(rng, shape, fraction, sigma=1.0):
    field = ndi.gaussian_filter(rng.standard_normal(shape), sigma)
    return field > np.quantile(field, 1 - fraction)


def reference(pred, truth, spacing, tolerance):
    distances = sd.compute_surface_distances(np.asarray(truth, bool), np.asarray(pred, bool), spacing)
    return sd.compute_surface_dice_at_tolerance(distances, tolerance)


def test_area_table_is_surface_distance_table():
    # MONAI's copy of the normals lists a few in another order: equal to the last bit.
    for spacing in [(1.0, 1.0, 1.0), (0.8, 0.8, 2.5), (0.3, 1.7, 0.9)]:
        np.testing.assert_allclose(
            S._area_table(spacing), lookup_tables.create_table_neighbour_code_to_surface_area(spacing), rtol=1e-15
        )


@pytest.mark.parametrize(
    "shape, spacing, order",
    [((9, 8, 7), (1.0, 1.0, 1.0), "C"), ((7, 10, 6), (0.8, 0.8, 2.5), "F"), ((6, 5, 11), (2.0, 0.5, 1.3), "C")],
)
def test_surface_dice_matches_surface_distance(rng, shape, spacing, order):
    for fraction, sigma in [(0.3, 1.0), (0.5, 0.5), (0.1, 1.5)]:
        pred = np.asarray(blobs(rng, shape, fraction, sigma), order=order)
        truth = np.asarray(blobs(rng, shape, fraction, sigma), order=order)
        for tolerance in (*TOLERANCES, spacing[2], 2 * spacing[0]):
            assert M.surface_dice(pred, truth, spacing, tolerance) == pytest.approx(
                reference(pred, truth, spacing, tolerance), abs=1e-9
            )


@pytest.mark.parametrize("tolerance", TOLERANCES)
def test_masks_touching_the_border(tolerance):
    full = np.ones((4, 5, 3), bool)
    half = full.copy()
    half[:2] = False
    corner = np.zeros_like(full)
    corner[-1, -1, -1] = True
    for pred, truth in [(full, half), (full, full), (corner, half), (half, corner)]:
        assert M.surface_dice(pred, truth, (1.0, 0.5, 2.0), tolerance) == pytest.approx(
            reference(pred, truth, (1.0, 0.5, 2.0), tolerance), abs=1e-9
        )


def test_single_voxels():
    a = np.zeros((5, 5, 5), bool)
    b = a.copy()
    a[2, 2, 2] = True
    b[2, 3, 2] = True
    assert M.surface_dice(a, a) == 1.0
    for tolerance in (0.0, 0.9, 1.0, 1.5):
        assert M.surface_dice(a, b, (0.9, 0.9, 3.0), tolerance) == pytest.approx(
            reference(a, b, (0.9, 0.9, 3.0), tolerance), abs=1e-12
        )


def test_empty_masks_follow_the_reference():
    empty = np.zeros((4, 4, 4), bool)
    one = empty.copy()
    one[1, 2, 3] = True
    for tolerance in (0.0, 1.0):
        assert M.surface_dice(one, empty, tolerance=tolerance) == reference(one, empty, (1, 1, 1), tolerance) == 0.0
        assert M.surface_dice(empty, one, tolerance=tolerance) == reference(empty, one, (1, 1, 1), tolerance) == 0.0
        with np.errstate(invalid="ignore"):
            assert math.isnan(reference(empty, empty, (1, 1, 1), tolerance))
        assert math.isnan(M.surface_dice(empty, empty, tolerance=tolerance))
    both = M.overlap_metrics(empty, empty)
    assert all(math.isnan(both[k]) for k in M.OVERLAP_KEYS)
    assert math.isnan(sd.compute_dice_coefficient(empty, empty))
    missed = M.overlap_metrics(empty, one)["classes"][0]
    assert (missed["dice"], missed["iou"], missed["recall"]) == (0.0, 0.0, 0.0) and math.isnan(missed["precision"])


def test_distance_transform_path_and_halo_chunks(rng, monkeypatch):
    """Large tolerances take the EDT path; small chunks exercise the halo along the stream axis."""
    monkeypatch.setattr(S, "_MAX_BALL_OFFSETS", 0)
    monkeypatch.setattr(S, "_TOL_CHUNK_CELLS", 40)
    monkeypatch.setattr(S, "_CHUNK_CELLS", {"cpu": 30, "cuda": 30})
    spacing = (0.8, 1.0, 0.5)
    for _ in range(3):
        pred, truth = blobs(rng, (8, 6, 9), 0.3), blobs(rng, (8, 6, 9), 0.3)
        for tolerance in (0.0, 0.8, 1.0, 1.6, 3.0):
            assert M.surface_dice(pred, truth, spacing, tolerance) == pytest.approx(
                reference(pred, truth, spacing, tolerance), abs=1e-9
            )


def test_inputs_stream_from_memmap_lazy_volume_and_tensors(rng, tmp_path, monkeypatch):
    monkeypatch.setattr(S, "_CHUNK_CELLS", {"cpu": 50, "cuda": 50})
    pred, truth = blobs(rng, (7, 6, 9), 0.3).astype(np.uint8), blobs(rng, (7, 6, 9), 0.3).astype(np.uint8)
    expected = M.evaluate(pred, truth, (0.8, 0.8, 2.0), (0.0, 1.0))
    mm = np.lib.format.open_memmap(tmp_path / "p.npy", mode="w+", dtype=np.uint8, shape=pred.shape)
    mm[:] = pred
    save_volume(truth[None], tmp_path / "t.nii", affine=np.diag([0.8, 0.8, 2.0, 1.0]))
    lazy = load_volume(tmp_path / "t.nii", lazy=True)
    for p, t in [
        (mm, lazy),
        (torch.from_numpy(pred), torch.from_numpy(truth).bool()),
        (torch.from_numpy(pred), truth),
        (np.asfortranarray(pred)[None], lazy),
    ]:
        assert M.evaluate(p, t, (0.8, 0.8, 2.0), (0.0, 1.0))["surface_dice"] == expected["surface_dice"]


def _rss_file_kib() -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile:"))


@pytest.mark.skipif(not hasattr(mmap, "MADV_DONTNEED") or not Path("/proc/self/status").exists(),
                    reason="needs madvise(MADV_DONTNEED) and /proc")
def test_streaming_a_memmap_drops_the_pages_it_has_read(rng, tmp_path):
    """Exact on memmaps (C order, Fortran order, a channel of a 4D map), and the mapped pages
    read do not stay resident: the process's file-backed memory grows by far less than the
    inputs (8 MiB)."""
    pred, truth = blobs(rng, (64, 256, 256), 0.3).astype(np.uint8), blobs(rng, (64, 256, 256), 0.3).astype(np.uint8)
    expected = M.surface_dice(pred, truth)
    for order in "CF":
        maps = []
        for name, data in (("p", pred), ("t", truth)):
            path = tmp_path / f"{name}{order}.u8"
            out = np.memmap(path, np.uint8, "w+", shape=data.shape, order=order)
            out[:] = data
            out.flush()
            del out
            maps.append(np.memmap(path, np.uint8, "r", shape=data.shape, order=order))
        before = _rss_file_kib()
        value = M.surface_dice(*maps)
        assert _rss_file_kib() - before < 2048
        assert value == pytest.approx(expected, abs=1e-15) and value == M.surface_dice(*(np.array(m) for m in maps))
    stacked = np.lib.format.open_memmap(tmp_path / "s.npy", mode="w+", dtype=np.uint8, shape=(2,) + pred.shape)
    stacked[0], stacked[1] = truth, pred
    assert M.surface_dice(stacked[1:], truth[None]) == expected


def test_overlap_metrics_known_values():
    a = np.zeros((4, 4, 4), np.uint8)
    b = np.zeros_like(a)
    a[:2] = 1
    b[1:3] = 1
    m = M.overlap_metrics(a, b, spacing=(0.5, 0.5, 2.0))
    assert (m["dice"], m["iou"], m["precision"], m["recall"]) == (0.5, 1 / 3, 0.5, 0.5)
    c = m["classes"][0]
    assert (c["volume_pred_voxels"], c["volume_truth_voxels"], c["volume_pred_mm3"]) == (32, 32, 16.0)


def test_evaluate_per_class_and_mean(rng):
    truth = np.stack([blobs(rng, (6, 7, 5), 0.3), blobs(rng, (6, 7, 5), 0.2), np.zeros((6, 7, 5), bool)])
    prob = np.clip(truth + rng.normal(0, 0.4, truth.shape), 0, 1).astype(np.float32)
    result = M.evaluate(prob, truth, (1.0, 1.0, 2.0), (0.0, 2.0), threshold=0.5)
    pred = prob > 0.5
    for c, metrics in enumerate(result["classes"][:2]):
        p, t = pred[c], truth[c]
        tp = (p & t).sum()
        assert metrics["dice"] == pytest.approx(2 * tp / (p.sum() + t.sum()))
        assert metrics["iou"] == pytest.approx(tp / (p | t).sum())
        assert metrics["precision"] == pytest.approx(tp / p.sum())
        assert metrics["recall"] == pytest.approx(tp / t.sum())
        for tolerance in (0.0, 2.0):
            assert metrics["surface_dice"][str(tolerance)] == pytest.approx(
                reference(p, t, (1.0, 1.0, 2.0), tolerance), abs=1e-9
            )
    # class 2 has no truth: recall undefined (NaN) and left out of the mean
    assert math.isnan(result["classes"][2]["recall"])
    assert result["recall"] == pytest.approx(np.mean([m["recall"] for m in result["classes"][:2]]))
    assert result["dice"] == pytest.approx(np.mean([m["dice"] for m in result["classes"]]))


def test_threshold_sweep_equals_evaluate_at_each_threshold(rng, tmp_path):
    truth = blobs(rng, (8, 7, 6), 0.3)
    prob = np.clip(truth + rng.normal(0, 0.4, truth.shape), 0, 1).astype(np.float32)
    sweep = M.threshold_sweep(prob, truth, [0.7, 0.3, 0.5, 0.1], (1.0, 0.9, 2.0), (0.0, 1.0))
    assert sweep["thresholds"] == [0.1, 0.3, 0.5, 0.7]
    for i, threshold in enumerate(sweep["thresholds"]):
        at = M.evaluate(prob > threshold, truth, (1.0, 0.9, 2.0), (0.0, 1.0))
        for key in M.OVERLAP_KEYS:
            assert sweep[key][i] == pytest.approx(at[key], abs=1e-12)
        assert {k: v[i] for k, v in sweep["surface_dice"].items()} == pytest.approx(at["surface_dice"], abs=1e-12)
    best = int(np.argmax(sweep["surface_dice"]["0.0"]))
    assert sweep["best"] == {"metric": "surface_dice@0.0", "threshold": sweep["thresholds"][best],
                             "value": sweep["surface_dice"]["0.0"][best]}
    assert M.threshold_sweep(prob, truth, [0.3, 0.5], metric="dice")["best"]["metric"] == "dice"
    M.plot_sweep(sweep, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["sweep.png"]


def test_monai_metric_classes(rng):
    truth = torch.from_numpy(np.stack([blobs(rng, (2, 7, 6, 5), 0.3) for _ in range(3)]))  # (B, C, X, Y, Z)
    pred = torch.from_numpy(np.stack([blobs(rng, (2, 7, 6, 5), 0.3) for _ in range(3)]))
    ours, dice = M.OverlapMetric("dice", reduction="none"), DiceMetric(include_background=True, reduction="none")
    ours(pred, truth)
    dice(pred.float(), truth.float())
    torch.testing.assert_close(ours.aggregate(), dice.aggregate())
    mean = M.OverlapMetric("dice")
    mean(pred, truth)
    mean(pred, truth)
    torch.testing.assert_close(mean.aggregate(), dice.aggregate().mean().reshape(1))

    surface = M.SurfaceDiceMetric(tolerance=1.0, spacing=(0.8, 0.8, 2.0), reduction="mean_batch", get_not_nans=True)
    surface(pred, truth)
    scores = [[M.surface_dice(pred[b, c], truth[b, c], (0.8, 0.8, 2.0), 1.0) for c in range(2)] for b in range(3)]
    value, not_nans = surface.aggregate()
    torch.testing.assert_close(value, torch.tensor(scores, dtype=torch.float32).mean(0))
    assert not_nans.tolist() == [3, 3]
    with np.errstate(invalid="ignore"):
        monai = compute_surface_dice(pred.float(), truth.float(), [1.0, 1.0], include_background=True,
                                     spacing=(0.8, 0.8, 2.0), use_subvoxels=True)
    torch.testing.assert_close(surface.get_buffer(), monai, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda a, b: M.surface_dice(a, b[:3]), "does not match"),
        (lambda a, b: M.surface_dice(a * 2, b), "binary mask"),
        (lambda a, b: M.surface_dice(a, b, tolerance=-1.0), "non-negative"),
        (lambda a, b: M.surface_dice(a, b, spacing=(1.0, 0.0, 1.0)), "spacing"),
        (lambda a, b: M.evaluate(np.where(a, np.nan, 0.2), b, threshold=0.5), "NaN"),
        (lambda a, b: M.threshold_sweep(np.full(a.shape, np.nan), b, [0.5]), "NaN"),
        (lambda a, b: M.threshold_sweep(a * 0.5, b, [0.5], metric="auc"), "metric"),
        (lambda a, b: M.SurfaceDiceMetric()(torch.from_numpy(a), torch.from_numpy(b)), "batch-first"),
    ],
)
def test_bad_input(call, message):
    a = np.zeros((4, 4, 4), np.uint8)
    a[1:3, 1:3, 1:3] = 1
    with pytest.raises(SlabError, match=message):
        call(a, a.copy())


@pytest.mark.parametrize("angle", [0.3, 1.1])
def test_oblique_affine_scores_as_its_spacing(tmp_path, angle, capsys):
    """A rotated affine stored in float32 (NIfTI's sform) has column lengths 0.5000000035 where the
    voxel size is 0.5; the score must be the one of spacing 0.5, as surface-distance gives it and
    as the same data in an axis-aligned file gives it."""
    import json

    import nibabel as nib

    from slab.pipeline.cli import main

    rng = np.random.default_rng(3)
    truth = np.zeros((24, 20, 16), np.uint8)
    truth[5:17, 4:15, 3:12] = 1
    pred = truth.copy()
    pred[5:17, 4:15, 11:13] = 1  # a surface moved by two voxels: exactly 1 mm at 0.5 mm
    pred[rng.random(pred.shape) < 0.01] ^= 1
    c, s = np.cos(angle), np.sin(angle)
    rotated = np.eye(4)
    rotated[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]) @ np.diag([0.5, 0.5, 0.5])
    rotated[:3, 3] = [-30.0, 12.0, 4.0]
    scores = {}
    for name, affine in (("oblique", rotated), ("aligned", np.diag([0.5, 0.5, 0.5, 1.0]))):
        for kind, data in (("pred", pred), ("truth", truth)):
            nib.save(nib.Nifti1Image(data, affine.astype(np.float32)), tmp_path / f"{name}_{kind}.nii.gz")
        assert main(["evaluate", str(tmp_path / f"{name}_pred.nii.gz"), str(tmp_path / f"{name}_truth.nii.gz"),
                     "--tolerance", "0", "1", "2"]) == 0
        scores[name] = json.loads(capsys.readouterr().out)["surface_dice"]
    assert scores["oblique"] == scores["aligned"]
    for tolerance in (1.0, 2.0):
        assert scores["oblique"][str(tolerance)] == pytest.approx(reference(pred, truth, (0.5, 0.5, 0.5), tolerance),
                                                                  abs=1e-9)


def _cldice_by_hand(p, t):
    """clDice straight from the paper's definitions, with skimage's skeletons."""
    from skimage.morphology import skeletonize

    sp, st = skeletonize(p).astype(bool), skeletonize(t).astype(bool)
    tprec = (sp & t).sum() / sp.sum()
    tsens = (st & p).sum() / st.sum()
    return 2 * tprec * tsens / (tprec + tsens)


def test_cldice_known_answers_and_the_formula():
    from slab.pipeline.evaluation.skeleton import cldice

    tube = np.zeros((15, 15, 40), bool)
    tube[5:10, 5:10, 3:37] = True
    assert cldice(tube, tube)["cldice"] == 1.0
    assert cldice(tube, np.zeros_like(tube))["cldice"] == 0.0
    assert np.isnan(cldice(np.zeros_like(tube), np.zeros_like(tube))["cldice"])
    thin = np.zeros_like(tube)
    thin[7, 7, 3:37] = True  # the centreline alone: topologically perfect, Dice far below 1
    result = cldice(thin, tube)
    assert result["topology_precision"] == 1.0 and result["cldice"] > 0.9
    broken = tube.copy()
    broken[:, :, 18:22] = False  # a gap: the truth's centreline is no longer covered there
    assert cldice(broken, tube)["topology_sensitivity"] < 1
    rng = np.random.default_rng(0)
    for _ in range(3):
        p = tube ^ (rng.random(tube.shape) < 0.05)
        assert cldice(p, tube)["cldice"] == pytest.approx(_cldice_by_hand(p, tube))
