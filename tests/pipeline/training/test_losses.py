"""Differentiable surface dice and clDice losses: equal to the metrics on binary inputs (against
DeepMind's surface-distance and slab's own metric), gradients against finite differences, and a
training run with them."""
import numpy as np
import pytest
import surface_distance as sd
import torch

from slab.pipeline.evaluation.metrics import surface_dice
from slab.pipeline.training.losses import CombinedLoss, SoftClDiceLoss, SoftSurfaceDiceLoss, soft_skeleton


def _blobs(shape, seed):
    rng = np.random.default_rng(seed)
    from scipy import ndimage

    a = ndimage.gaussian_filter(rng.random(shape), 1.5)
    return a > np.median(a), a


@pytest.mark.parametrize("seed", range(3))
def test_soft_surface_dice_is_the_metric_on_binary_3d(seed):
    p, _ = _blobs((13, 11, 9), seed)
    t, _ = _blobs((13, 11, 9), seed + 10)
    loss = SoftSurfaceDiceLoss(3)(torch.from_numpy(p[None, None]).double(), torch.from_numpy(t[None, None]))
    assert 1 - loss.item() == pytest.approx(surface_dice(p, t), abs=1e-6)
    reference = sd.compute_surface_dice_at_tolerance(sd.compute_surface_distances(t, p, (1, 1, 1)), 0)
    assert 1 - loss.item() == pytest.approx(reference, abs=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_soft_surface_dice_is_the_metric_on_binary_2d(seed):
    p, _ = _blobs((17, 14), seed)
    t, _ = _blobs((17, 14), seed + 10)
    loss = SoftSurfaceDiceLoss(2)(torch.from_numpy(p[None, None]).double(), torch.from_numpy(t[None, None]))
    reference = sd.compute_surface_dice_at_tolerance(sd.compute_surface_distances(t, p, (1, 1)), 0)
    assert 1 - loss.item() == pytest.approx(reference, abs=1e-6)


@pytest.mark.parametrize("dims", [2, 3])
def test_soft_surface_dice_gradient_against_finite_differences(dims):
    shape = (6, 5, 4)[:dims]
    _, field = _blobs(shape, 1)
    probs = torch.tensor(field[None, None], dtype=torch.float64).clamp(0.05, 0.95).requires_grad_(True)
    target = torch.from_numpy(_blobs(shape, 2)[0][None, None])
    loss = SoftSurfaceDiceLoss(dims).double()
    assert torch.autograd.gradcheck(lambda x: loss(x, target), (probs,), eps=1e-6, atol=1e-5)


def test_soft_cldice_orders_and_differentiates():
    t = np.zeros((1, 1, 20, 20, 20))
    t[0, 0, 8:12, 8:12, 2:18] = 1
    target = torch.from_numpy(t)
    loss = SoftClDiceLoss(iterations=3)
    same = loss(target.clone(), target).item()
    half = target.clone()
    half[..., 10:] = 0
    assert same < 0.05 < loss(half, target).item() < loss(torch.zeros_like(target), target).item()
    # distinct values: min/max pooling and relu are differentiable away from ties
    probs = torch.from_numpy(np.random.default_rng(0).permutation(216).reshape(1, 1, 6, 6, 6) / 300 + 0.1)
    probs.requires_grad_(True)
    small = torch.zeros_like(probs)
    small[..., 2:4, 2:4, 1:5] = 1
    assert torch.autograd.gradcheck(lambda x: loss(x, small), (probs,), eps=1e-6, atol=1e-4)
    assert soft_skeleton(target, 3).max() <= 1 + 1e-9


def test_combined_loss_and_training_with_it(tmp_path):
    from monai.losses import DiceCELoss

    logits = torch.randn(2, 1, 8, 8, requires_grad=True)
    target = (torch.rand(2, 1, 8, 8) > 0.5).float()
    base = DiceCELoss(sigmoid=True)
    combined = CombinedLoss(base, 2, surface_dice=0.5, cldice=0.25)
    value = combined(logits, target)
    expected = base(logits, target) + 0.5 * SoftSurfaceDiceLoss(2)(torch.sigmoid(logits), target) \
        + 0.25 * SoftClDiceLoss()(torch.sigmoid(logits), target)
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    value.backward()
    assert torch.isfinite(logits.grad).all()
    from test_train import TINY, write_datalist

    from slab.pipeline.training import train

    datalist = write_datalist(tmp_path, n=3, shape=(16, 14, 12))
    result = train(datalist, {**TINY, "epochs": 1, "shape_loss": {"surface_dice": 1.0, "cldice": 0.5}},
                   tmp_path / "run", device="cpu")
    assert np.isfinite(result["history"][-1]["train_loss"])
    cfg3 = {**TINY, "task": "segmentation_3d", "patch_size": [8, 8, 8], "epochs": 1,
            "shape_loss": {"surface_dice": 1.0}}
    cfg3.pop("planes")
    result = train(datalist, cfg3, tmp_path / "run3", device="cpu")
    assert np.isfinite(result["history"][-1]["train_loss"])


@pytest.mark.parametrize("name", ["dice_bce", "dice_ce"])
def test_batch_dice_pools_the_batch_known_answer(name):
    """``dice_batch``: one Dice over the whole batch (nnU-Net's batch dice) against the mean of
    per-sample Dice; an empty sample whose prediction is not empty costs a whole Dice per sample
    and only its false positives pooled. Known answers from the sums, plus the same cross-entropy."""
    from slab.pipeline.training.losses import build_training_loss

    logits = torch.full((2, 1, 4, 4), -2.0)
    logits[0, 0, :2] = 2.0  # sample 0: 8 pixels predicted, 8 true (the same ones)
    logits[1, 0, 0, :2] = 2.0  # sample 1: 2 pixels predicted, none true
    target = torch.zeros(2, 1, 4, 4)
    target[0, 0, :2] = 1.0
    p, y = torch.sigmoid(logits), target
    eps = 1e-5
    per = [1 - (2 * (p[i] * y[i]).sum() + eps) / (p[i].sum() + y[i].sum() + eps) for i in range(2)]
    pooled = 1 - (2 * (p * y).sum() + eps) / (p.sum() + y.sum() + eps)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    if name == "dice_ce":
        target = target.long()
    cfg = {"loss": name, "shape_loss": {}}
    by_sample = build_training_loss({**cfg, "dice_batch": False}, 2)(logits, target)
    by_batch = build_training_loss({**cfg, "dice_batch": True}, 2)(logits, target)
    assert by_sample.item() == pytest.approx((sum(per) / 2 + bce).item(), rel=1e-5)
    assert by_batch.item() == pytest.approx((pooled + bce).item(), rel=1e-5)
    assert by_batch.item() < by_sample.item()  # the empty sample's whole-Dice penalty is gone
    ce_alone = build_training_loss({**cfg, "dice_batch": False, "dice_weight": 0.0}, 2)(logits, target)
    half = build_training_loss({**cfg, "dice_batch": False, "dice_weight": 0.5}, 2)(logits, target)
    assert ce_alone.item() == pytest.approx(bce.item(), rel=1e-5)
    assert half.item() == pytest.approx((sum(per) / 4 + bce).item(), rel=1e-5)
