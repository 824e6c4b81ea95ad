"""Networks that start at the prior and a loss adjusted from the samples' prior to the volumes':
value counts and prior logits against known answers, the output bias, and runs (2.5D and 3D, in
memory and streamed) whose recorded priors are recomputed here from their own draws and labels."""
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from slab.pipeline.data.stream import add_counts, value_counts
from slab.pipeline.training.prior import LIMIT, prior_logits, set_output_bias, share_logits

from test_train import TINY, write_datalist  # noqa: E402


def _logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


def test_value_counts_known_answers():
    binary = np.zeros((2, 5, 6, 7), np.float32)
    binary[0, :2] = 1.0  # 84 of 210
    binary[1, 0, 0, :3] = 1.0  # 3
    counts = value_counts(binary, chunk=11)  # chunks that cut rows
    np.testing.assert_array_equal(counts, [[126, 84], [207, 3]])
    classes = np.zeros((1, 4, 4, 4), np.uint8)
    classes[0, 0] = 1
    classes[0, 1, :2] = 3
    np.testing.assert_array_equal(value_counts(classes, chunk=5), [[40, 16, 0, 8]])
    signed = np.array([[[[-1, 0, 2]]]], np.int16)  # below 0 counts as 0
    np.testing.assert_array_equal(value_counts(signed), [[2, 0, 1]])
    np.testing.assert_array_equal(value_counts(np.array([[[[np.nan, np.inf, 1.0, 0.6]]]])), [[2, 2]])
    np.testing.assert_array_equal(value_counts(torch.ones(1, 2, 2, 2)), [[0, 8]])
    np.testing.assert_array_equal(add_counts(np.array([[1, 2]]), np.array([[3, 4, 5]])), [[4, 6, 5]])


def test_share_and_prior_logits_known_answers():
    labels = [torch.zeros(1, 10, 10), torch.zeros(1, 10, 10)]
    labels[0][0, :5, :5] = 1  # 25 of 200 voxels
    logit = float(prior_logits(labels, 1, exclusive=False)[0])
    assert logit == pytest.approx(_logit(26 / 202))
    assert float(share_logits(np.array([[175, 25]]), 1, exclusive=False)[0]) == pytest.approx(logit)
    classes = [torch.zeros(1, 10, 10, dtype=torch.int64)]
    classes[0][0, :2] = 1  # 20 voxels of class 1, 10 of class 2, 70 background
    classes[0][0, 2] = 2
    logits = prior_logits(classes, 2, exclusive=True)
    np.testing.assert_allclose(logits.numpy(), np.log(np.array([21, 11]) / 71.0), rtol=1e-6)
    # values past the last class count as it (as a clamp of the class map would)
    np.testing.assert_allclose(share_logits(np.array([[70, 20, 5, 5]]), 2, exclusive=True).numpy(),
                               np.log(np.array([21, 11]) / 71.0), rtol=1e-6)
    assert float(prior_logits([torch.zeros(1, 100, 100)], 1, exclusive=False)[0]) == -LIMIT  # clamped


def test_only_a_raised_prior_is_undone():
    """Samples richer in foreground than the volumes (foreground-centred draws): the loss is
    adjusted by the difference of the log-odds, per class for exclusive classes; samples poorer in
    it (padding, empty slices): not adjusted; ``adjust=False``: never."""
    from slab.pipeline.training.prior import priors

    rich = [torch.zeros(1, 10, 10)]
    rich[0][0, :3] = 1  # 30 %
    volumes = np.array([[900, 100]])  # 10 %
    record = priors(rich, volumes, 1, exclusive=False, adjust=True)
    assert record["adjustment"] == [pytest.approx(_logit(31 / 102) - _logit(101 / 1002), abs=1e-4)]
    assert record["start"] == [pytest.approx(record["volumes"][0], abs=1e-4)]
    poor = priors(rich, np.array([[500, 500]]), 1, exclusive=False, adjust=True)
    assert poor["adjustment"] == [0.0] and poor["start"] == poor["samples"]
    assert priors(rich, volumes, 1, exclusive=False, adjust=False)["adjustment"] == [0.0]
    classes = [torch.zeros(1, 10, 10, dtype=torch.int64)]
    classes[0][0, :4] = 1  # class 1 raised (40 % against 10 %), class 2 lowered (10 % against 30 %)
    classes[0][0, 4] = 2
    record = priors(classes, np.array([[600, 100, 300]]), 2, exclusive=True, adjust=True)
    assert record["adjustment"][0] == pytest.approx(np.log(41 / 51) - np.log(101 / 601), abs=1e-4)
    assert record["adjustment"][1] == 0.0


def test_both_undoes_a_lowered_prior_too():
    """``adjust="both"`` (the plan's choice where slices without foreground are tissue): the
    difference of the log-odds either way, the start at the volumes' prior."""
    from slab.pipeline.training.prior import priors

    poor = [torch.zeros(1, 10, 10)]
    poor[0][0, :1] = 1  # 10 %
    record = priors(poor, np.array([[500, 500]]), 1, exclusive=False, adjust="both")
    assert record["adjustment"] == [pytest.approx(_logit(11 / 102) - _logit(501 / 1002), abs=1e-4)]
    assert record["adjustment"][0] < 0 and record["start"] == [pytest.approx(record["volumes"][0], abs=1e-4)]
    classes = [torch.zeros(1, 10, 10, dtype=torch.int64)]
    classes[0][0, :4] = 1
    classes[0][0, 4] = 2
    record = priors(classes, np.array([[600, 100, 300]]), 2, exclusive=True, adjust="both")
    np.testing.assert_allclose(record["adjustment"], [np.log(41 / 51) - np.log(101 / 601),
                                                      np.log(11 / 51) - np.log(301 / 601)], atol=1e-4)


def test_logit_adjustment_dice_batch_and_dice_weight_in_the_config():
    from slab.core.errors import SlabError
    from slab.pipeline.training.config import validate_config

    cfg = validate_config({})
    assert cfg["logit_adjustment"] is True and cfg["dice_batch"] is False
    assert validate_config({"logit_adjustment": "both"})["logit_adjustment"] == "both"
    for bad in ("lowered", 1, None):
        with pytest.raises(SlabError, match="logit_adjustment"):
            validate_config({"logit_adjustment": bad})
    with pytest.raises(SlabError, match="dice_batch"):
        validate_config({"dice_batch": "yes"})
    assert cfg["dice_weight"] == 1.0 and validate_config({"dice_weight": 0})["dice_weight"] == 0.0
    with pytest.raises(SlabError, match="dice_weight"):
        validate_config({"dice_weight": -1})


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


def _small_cube(root, shape=(23, 20, 21)) -> tuple:
    """Two noise volumes, each with a 4-voxel cube of foreground (0.6 % of 9660 voxels), one
    validation volume: a 3D patch drawn around the foreground half the time holds far more."""
    rng = np.random.default_rng(0)
    items = []
    for i in range(3):
        image = rng.normal(size=shape).astype(np.float32)
        label = np.zeros(shape, np.uint8)
        label[3 + i:7 + i, 5:9, 6:10] = 1
        image[label > 0] += 2.0
        folder = root / f"case{i}"
        folder.mkdir(parents=True)
        nib.save(nib.Nifti1Image(image, np.eye(4)), folder / "image.nii.gz")
        nib.save(nib.Nifti1Image(label, np.eye(4)), folder / "label.nii.gz")
        items.append({"image": str(folder / "image.nii.gz"), "label": str(folder / "label.nii.gz")})
    path = root / "datalist.json"
    path.write_text(json.dumps({"training": items[:2], "validation": items[2:]}), encoding="utf-8")
    return path, 2 * 64, 2 * int(np.prod(shape))


def _cfg(**overrides) -> dict:
    cfg = json.loads(json.dumps(TINY))
    cfg.update(epochs=1, samples_per_epoch=4, batch_size=2, **overrides)
    return cfg


@pytest.mark.parametrize("stream", [False, True])
def test_3d_run_adjusts_its_loss_from_the_samples_prior_to_the_volumes(tmp_path, stream):
    """The recorded priors are the 256 draws' and the training labels' (recomputed here), their
    difference is added to the logits the loss sees, and the network starts at the volumes'
    prior; streamed volumes count the same labels."""
    from slab.pipeline.training import build_trainer
    from slab.pipeline.training.engine import TrainingSamples
    from slab.pipeline.training.loop import PRIOR_EPOCH
    from slab.pipeline.training.prior import SAMPLES, SHARE_SAMPLES

    datalist, fg, voxels = _small_cube(tmp_path / "data")
    cfg = _cfg(task="segmentation_3d", patch_size=[16, 16, 16], stream=stream)
    cfg.pop("planes")
    trainer = build_trainer(datalist, cfg, tmp_path / "run", device="cpu")
    task, priors = trainer.task, trainer.task.priors
    assert priors["volumes"] == [pytest.approx(_logit((fg + 1) / (voxels + 2)), abs=1e-4)]
    samples = TrainingSamples(task, trainer.cfg["seed"])
    drawn = [samples[(PRIOR_EPOCH, i)] for i in range(SHARE_SAMPLES)]
    assert priors["samples"] == [pytest.approx(float(prior_logits([d["label"] for d in drawn], 1, False)[0]), abs=1e-4)]
    share = float(np.mean([float(d["label"].float().mean()) for d in drawn]))
    assert share > 1.5 * fg / voxels  # half the patches around the cube: twice the volumes' share
    assert priors["adjustment"] == [pytest.approx(priors["samples"][0] - priors["volumes"][0], abs=2e-4)]
    assert priors["output_bias"] and priors["start"] == [pytest.approx(priors["volumes"][0], abs=2e-4)]
    batch = task.collate(drawn[:SAMPLES])
    with torch.no_grad():
        logits = task.model.eval()(batch["image"])
        assert float(logits.mean()) == pytest.approx(priors["volumes"][0], abs=0.05)
        expected = task.loss_fn(logits + priors["adjustment"][0], batch["label"])
        assert float(task.loss(task.model, batch, torch.device("cpu"))) == pytest.approx(float(expected), rel=1e-5)
    trainer.run()
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["priors"] == priors
    resumed = build_trainer(datalist, cfg, tmp_path / "run", device="cpu", resume=True)
    assert resumed.task.priors == priors  # from the checkpoint, not drawn again


def test_2p5d_volume_counts_in_memory_and_streamed_and_the_adjustment_off(tmp_path):
    from slab.pipeline.training import build_trainer
    from slab.pipeline.training.prior import SAMPLES

    datalist = write_datalist(tmp_path / "data")
    labels = [np.asarray(nib.load(item["label"]).dataobj) for item in json.loads(datalist.read_text())["training"]]
    fg, voxels = sum(int((label > 0).sum()) for label in labels), sum(label.size for label in labels)
    counts = []
    for stream in (False, True):
        trainer = build_trainer(datalist, _cfg(stream=stream), tmp_path / f"run{stream}", device="cpu")
        counts.append(trainer.task.volume_counts())
        assert trainer.task.priors["volumes"] == [pytest.approx(_logit((fg + 1) / (voxels + 2)), abs=1e-4)]
    np.testing.assert_array_equal(counts[0], [[voxels - fg, fg]])
    np.testing.assert_array_equal(counts[1], counts[0])
    off = build_trainer(datalist, _cfg(logit_adjustment=False), tmp_path / "off", device="cpu").task.priors
    assert off["adjustment"] == [0.0] and off["start"] == off["samples"] and off["n_samples"] == SAMPLES
    both = build_trainer(datalist, _cfg(logit_adjustment="both"), tmp_path / "both", device="cpu").task.priors
    assert both["adjustment"] == [pytest.approx(both["samples"][0] - both["volumes"][0], abs=2e-4)]
    assert both["start"] == [pytest.approx(both["volumes"][0], abs=2e-4)]  # either way, the volumes' prior


def test_output_bias_null_keeps_the_networks_own_start(tmp_path):
    """With ``output_bias: null`` the network keeps its initialisation (mean probability near
    0.5); the adjustment is still recorded and applied."""
    from slab.pipeline.training import build_trainer

    datalist = write_datalist(tmp_path / "data")
    trainer = build_trainer(datalist, _cfg(output_bias=None), tmp_path / "run", device="cpu")
    assert "output_bias" not in trainer.task.priors
    x = torch.randn(4, trainer.task.in_channels(), 16, 16)
    with torch.no_grad():
        assert abs(float(torch.sigmoid(trainer.task.model.eval()(x)).mean()) - 0.5) < 0.15
