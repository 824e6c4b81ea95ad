"""The plan's clock (``slab.pipeline.planning.schedule``): a validation costs its network passes
and the scoring of every held-out case, which the plan now times on a case of the median shape;
known answers for the sums, and the scoring trial calls the sweep as training's validation does."""
import pytest
import torch

from slab.pipeline.evaluation import calibration, metrics
from slab.pipeline.planning import schedule
from slab.pipeline.planning.plans import plan_configuration
from slab.pipeline.training.config import validate_config

from test_planning import _fp  # noqa: E402


def test_a_validation_costs_its_forward_passes_and_its_scoring():
    fp = _fp((1, 1, 1), shape=(40, 36, 30))
    fp["n_cases"] = 4
    cfg = {"task": "segmentation_2p5d", "planes": ["xy"], "epochs": 10, "samples_per_epoch": 64, "batch_size": 8,
           "val_every": 5, "val": {"tta": "none", "planes": None}}
    timing = {"step_s": 0.5, "forward_s_per_sample": 0.01, "score_s_per_case": 3.0}
    t = schedule.expected_time(fp, cfg, timing, n_folds=2)
    # 2 validations of the 2 held-out cases: 2 x 30 slices at 0.01 s, and 2 x 3 s of scoring
    assert t["validation_min"] == pytest.approx(2 * (2 * 30 * 0.01 + 2 * 3.0) / 60, abs=0.01)
    assert t["train_min"] == pytest.approx(80 * 0.5 / 60, abs=0.01)
    fitted = dict(cfg)
    schedule.fit_budget(fp, fitted, timing, 2, 1.0)
    assert schedule.expected_time(fp, fitted, timing, 2)["total_min"] <= 1.0 + 1e-9


def test_the_scoring_trial_sweeps_as_validation_does(monkeypatch):
    calls = []
    real_sweep, real_calibration = metrics.threshold_sweep, calibration.calibration

    def sweep(prob, truth, thresholds, spacing, tolerances, **kwargs):
        calls.append(("sweep", prob.shape, truth.shape, list(thresholds), list(spacing), list(tolerances)))
        return real_sweep(prob, truth, thresholds, spacing, tolerances, **kwargs)

    def calibrated(prob, truth, image):
        calls.append(("calibration", prob.shape))
        return real_calibration(prob, truth, image)

    monkeypatch.setattr(metrics, "threshold_sweep", sweep)
    monkeypatch.setattr(calibration, "calibration", calibrated)
    fp = _fp((1.5, 1.5, 3.0), shape=(23, 19, 7))
    cfg = validate_config({"val": {"tolerance_mm": 3.0}})
    seconds = schedule.trial_scoring(fp, cfg)
    assert seconds > 0
    assert calls == [("sweep", (1, 23, 19, 7), (1, 23, 19, 7), cfg["val"]["thresholds"], [1.5, 1.5, 3.0], [0.0, 3.0]),
                     ("calibration", (1, 23, 19, 7))]
    # a case larger than the trial's voxels is timed on a part of them, scaled by the voxel ratio
    monkeypatch.setattr(schedule, "SCORING_TRIAL_VOXELS", 23 * 19 * 7 // 4)
    clock = iter([10.0, 12.0])
    monkeypatch.setattr("time.perf_counter", lambda: next(clock))
    assert schedule.trial_scoring(fp, cfg) == pytest.approx(2.0 * (23 * 19 * 7) / (11 * 9 * 7))
    assert calls[-2][1] == (1, 11, 9, 7)  # 23 -> 11, then 19 -> 9: at most a quarter of the voxels
    monkeypatch.undo()
    plan = plan_configuration(fp, "2d", torch.device("cpu"), 1 << 26)
    t = plan["time"]
    assert t["score_s_per_case"] > 0 and t["validation_min"] > 0  # the plan's own trial, recorded
