"""Calibration: the reliability curve and ECE against scikit-learn's calibration_curve and known
answers, the body mask, the threshold chosen at the centre of a flat optimum, and networks that
start at their training samples' foreground prior."""
import json

import numpy as np
import pytest
import torch

from slab.pipeline.evaluation.calibration import body_mask, pooled, reliability
from slab.pipeline.evaluation.metrics import choose_threshold
from slab.pipeline.training.prior import prior_logits, set_output_bias

from test_train import TINY, write_datalist  # noqa: E402


def test_reliability_against_scikit_learn():
    from sklearn.calibration import calibration_curve

    rng = np.random.default_rng(0)
    p = rng.beta(0.5, 0.8, 20000)
    t = rng.uniform(size=p.size) < np.clip(p * 0.8 + 0.05, 0, 1)  # miscalibrated on purpose
    ours = reliability(p, t, bins=10)
    observed, predicted = calibration_curve(t, p, n_bins=10, strategy="uniform")
    rows = [r for r in ours["bins"] if r["count"]]
    np.testing.assert_allclose([r["observed"] for r in rows], observed, rtol=1e-12)
    np.testing.assert_allclose([r["probability"] for r in rows], predicted, rtol=1e-12)
    counts = np.array([r["count"] for r in rows])
    ece = np.sum(counts * np.abs(observed - predicted)) / counts.sum()
    assert ours["ece"] == pytest.approx(ece, rel=1e-12)
    assert ours["brier"] == pytest.approx(np.mean((p - t) ** 2), rel=1e-12)
    # a calibrated map: ECE near 0; one that says 0.5 everywhere on a 10 % foreground: 0.4
    calibrated = rng.uniform(size=200000)
    assert reliability(calibrated, rng.uniform(size=calibrated.size) < calibrated)["ece"] < 0.01
    half = np.full(1000, 0.5)
    assert reliability(half, np.arange(1000) < 100)["ece"] == pytest.approx(0.4)
    # pooling two halves gives the whole
    a, b = reliability(p[:7000], t[:7000]), reliability(p[7000:], t[7000:])
    assert pooled([a, b])["ece"] == pytest.approx(ours["ece"], rel=1e-9)
    assert pooled([a, b])["brier"] == pytest.approx(ours["brier"], rel=1e-9)


def test_body_mask_fills_the_head_and_leaves_the_air():
    image = np.zeros((1, 40, 40, 40), np.float32)
    x, y, z = np.ogrid[:40, :40, :40]
    r = np.sqrt((x - 20.0) ** 2 + (y - 20.0) ** 2 + (z - 20.0) ** 2)
    image[0][r < 15] = 100.0
    image[0][r < 5] = 2.0  # a dark ventricle inside: still body
    body = body_mask(image)
    assert body[20, 20, 20] and body[20, 20, 32] and not body[0, 0, 0]
    assert body.sum() == (r < 15).sum()
    assert body_mask(np.ones((1, 4, 4, 4))).all()


def test_threshold_at_the_centre_of_a_flat_optimum():
    levels = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    # the plateau is the run around the best: a lone best at 0.9, far above a flat 0.3-0.6, is kept
    peak = [0.5, 0.6, 0.8, 0.8, 0.8, 0.8, 0.7, 0.9, 0.6]
    assert choose_threshold(levels, peak)[0] == 0.8
    flat = [0.5, 0.6, 0.897, 0.9, 0.899, 0.898, 0.7, 0.6, 0.5]
    t, info = choose_threshold(levels, flat)
    assert t == 0.4 and info["plateau"] == [0.3, 0.6] and info["best_threshold"] == 0.4
    assert info["below"] == pytest.approx(0.897) and info["above"] == pytest.approx(0.899)
    t, info = choose_threshold(levels, [0.9] * 9)
    assert t == 0.5 and info["plateau"] == [0.1, 0.9]
    # the sweep is not capped at 0.9
    from slab.core.checks import THRESHOLD_LEVELS

    assert max(THRESHOLD_LEVELS) > 0.95 and 0.45 in THRESHOLD_LEVELS and min(THRESHOLD_LEVELS) < 0.05


def test_prior_logits_known_answers():
    labels = [torch.zeros(1, 10, 10), torch.zeros(1, 10, 10)]
    labels[0][0, :5, :5] = 1  # 25 of 200 voxels
    logit = float(prior_logits(labels, 1, exclusive=False)[0])
    assert logit == pytest.approx(np.log((26 / 202) / (1 - 26 / 202)))
    classes = [torch.zeros(1, 10, 10, dtype=torch.int64)]
    classes[0][0, :2] = 1  # 20 voxels of class 1, 10 of class 2, 70 background
    classes[0][0, 2] = 2
    logits = prior_logits(classes, 2, exclusive=True)
    np.testing.assert_allclose(logits.numpy(), np.log(np.array([21, 11]) / 71.0), rtol=1e-6)
    assert float(prior_logits([torch.zeros(1, 100, 100)], 1, exclusive=False)[0]) == -8.0  # clamped


@pytest.mark.parametrize("name, options", [("unet", {"channels": [4, 8, 16], "strides": [2, 2]}),
                                           ("unet", {"channels": [4, 8], "strides": [2], "num_res_units": 0}),
                                           ("basic_unet", {"features": [4, 4, 8, 8, 16, 4]})])
def test_output_bias_moves_the_mean_logit_to_the_prior(name, options):
    from slab.networks import build_network

    torch.manual_seed(0)
    model = build_network(name, 2, 3, 2, **options)
    x = torch.randn(4, 3, 32, 32)
    target = torch.tensor([-2.0, -0.5])
    assert set_output_bias(model, x, target)
    with torch.no_grad():
        mean = model.eval()(x).mean(dim=(0, 2, 3))
    np.testing.assert_allclose(mean.numpy(), target.numpy(), atol=0.05)


def test_a_run_starts_at_its_prior(tmp_path):
    """Before its first step, a run's network gives its training samples' foreground share on
    average, not 0.5; with ``output_bias: null`` it does not."""
    from slab.pipeline.training import build_trainer
    from slab.pipeline.training.engine import TrainingSamples

    datalist = write_datalist(tmp_path)
    cfg = json.loads(json.dumps(TINY))
    cfg.update(epochs=1, samples_per_epoch=8)
    trainer = build_trainer(datalist, cfg, tmp_path / "run", device="cpu")
    task = trainer.task
    samples = TrainingSamples(task, trainer.cfg["seed"])
    batch = task.collate([samples[(0, i)] for i in range(16)])
    share = float(batch["label"].float().mean())
    with torch.no_grad():
        prob = torch.sigmoid(task.model.eval()(batch["image"])).mean()
    assert task.output_bias["applied"] and abs(float(prob) - share) < 0.1 and share < 0.3
    plain = build_trainer(datalist, {**cfg, "output_bias": None}, tmp_path / "plain", device="cpu")
    ptask = plain.task
    with torch.no_grad():
        assert abs(float(torch.sigmoid(ptask.model.eval()(batch["image"])).mean()) - 0.5) < 0.15
