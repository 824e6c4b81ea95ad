"""Calibration: the reliability curve and ECE against scikit-learn's calibration_curve and known
answers, the body mask, the threshold chosen at the centre of a flat optimum (the networks' start
at the prior: tests/pipeline/training/test_prior.py)."""
import numpy as np
import pytest

from slab.pipeline.evaluation.calibration import body_mask, pooled, reliability
from slab.pipeline.evaluation.metrics import choose_threshold


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
