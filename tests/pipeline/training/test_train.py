"""Training: config schema, 2.5D / 3D segmentation and classification runs, resume, bad input.

Every run is tiny: 16-cube phantoms, a UNet of channels (4, 8), one or two epochs of a few steps.
"""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

import slab.pipeline.training.engine as train_module
from slab.pipeline.training import (
    DEFAULTS,
    DiceCE,
    describe_config,
    load_checkpoint,
    split_items,
    summarize_sweeps,
    train,
    validate_config,
    warmup_cosine,
)
from slab.core.errors import SlabError
from slab.pipeline.training.classification import (
    classification_metrics,
    competition_log_loss,
    mixup,
    roc_auc,
    sequence_loss,
    shuffle_sequence,
    weighted_log_loss,
)

SHAPE = (16, 16, 16)
TINY_UNET = {"name": "unet", "channels": [4, 8], "strides": [2]}
TINY = {
    "epochs": 2,
    "batch_size": 4,
    "samples_per_epoch": 8,
    "planes": ["xy", "zx"],
    "network": TINY_UNET,
    "val": {"thresholds": [0.3, 0.5, 0.7], "tolerance_mm": 1.0},
    "progress": False,
}


def write_datalist(root: Path, n: int = 3, shape=SHAPE, kind: str = "vessels", extra: dict | None = None) -> Path:
    """``n`` phantom cases, fold = index % 2; fold 0 is the validation list."""
    from slab.pipeline.data.phantom import write_phantom

    items = []
    for i in range(n):
        image, label = write_phantom(root / f"case{i}", shape=shape, seed=i, kind=kind)
        items.append({"id": f"case{i}", "case": f"case{i}", "fold": i % 2, "image": str(image), "label": str(label)})
    datalist = {"n_folds": 2, "training": [x for x in items if x["fold"]], "validation": [x for x in items if not x["fold"]],
                **(extra or {})}
    path = root / "datalist.json"
    path.write_text(json.dumps(datalist), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def vessels(tmp_path_factory) -> Path:
    return write_datalist(tmp_path_factory.mktemp("vessels"))


def _config(**overrides) -> dict:
    cfg = json.loads(json.dumps(TINY))
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    return cfg


# ---------------------------------------------------------------------------------------------
# Configuration


def test_defaults_are_valid_and_documented():
    cfg = validate_config({})
    assert cfg == validate_config(DEFAULTS)
    assert cfg["task"] == "segmentation_2p5d" and cfg["loss"] == "dice_bce"
    text = describe_config()
    for key in DEFAULTS:
        assert f"{key}" in text
    for key in DEFAULTS["val"]:
        assert f"val.{key} =" in text


def test_task_defaults():
    cfg = validate_config({"task": "classification"})
    assert cfg["val"]["metric"] == "auc" and cfg["samples_per_epoch"] is None
    assert cfg["network"]["name"] == "sequence_classifier"


@pytest.mark.parametrize("config, named", [
    ({"epochz": 3}, "'epochz'"),
    ({"val": {"tolerence_mm": 1}}, "'val.tolerence_mm'"),
    ({"classification": {"nslabs": 3}}, "'classification.nslabs'"),
    ({"lr": 0}, "lr"),
    ({"epochs": 0}, "epochs"),
    ({"batch_size": 2.5}, "batch_size"),
    ({"amp": "yes"}, "amp"),
    ({"planes": ["xy", "yz"]}, "planes[1]"),
    ({"offsets": [0, 0]}, "offsets"),
    ({"val": {"tta": "rotate"}}, "val.tta"),
    ({"val": {"tolerance_mm": -1}}, "val.tolerance_mm"),
    ({"val": {"thresholds": [0.5, 1.0]}}, "val.thresholds[1]"),
    ({"val": {"metric": "auc"}}, "val.metric"),
    ({"warmup_epochs": 5, "epochs": 2}, "warmup_epochs"),
    ({"samples_per_epoch": 2, "batch_size": 4}, "samples_per_epoch"),
    ({"normalize": {"lower": 60, "upper": 40}}, "normalize"),
    ({"normalize": {"percentile": 1}}, "'normalize.percentile'"),
    ({"augment": {"prob": 1.5}}, "augment.prob"),
    ({"augment": {"mirror": True}}, "'augment.mirror'"),
    ({"task": "segmentation_3d"}, "patch_size"),
    ({"task": "segmentation_3d", "patch_size": [16, 16, 16], "augment": {"flip": 1}}, "'augment.flip'"),
    ({"task": "segmentation_3d", "patch_size": [16, 16, 16], "val": {"tta": "full"}}, "val.tta"),
    ({"task": "classification", "network": {"name": "unet"}}, "network.name"),
    ({"network": {"spatial_dims": 3}}, "network.spatial_dims"),
    ({"task": "unknown"}, "task"),
])
def test_config_errors_name_the_key(config, named):
    with pytest.raises(SlabError, match="config") as err:
        validate_config(config)
    assert named in str(err.value)
    assert "\n" not in str(err.value)


def test_config_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"epochs": 3}), encoding="utf-8")
    assert validate_config(path)["epochs"] == 3
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(SlabError, match="not valid JSON"):
        validate_config(path)
    with pytest.raises(SlabError, match="no such config"):
        validate_config(tmp_path / "missing.json")


def test_warmup_cosine_schedule():
    f = warmup_cosine(total_steps=10, warmup_steps=4)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0
    assert math.isclose(f(7), 0.5 * (1 + math.cos(math.pi * 3 / 6)))
    assert f(10) == pytest.approx(0.0)
    assert warmup_cosine(5, 0)(0) == 1.0


def test_dice_ce_equals_dice_bce_for_one_label():
    """One class: softmax over (0, logit) is the sigmoid, CE is BCE — the two losses agree."""
    from monai.losses import DiceCELoss

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 8, 8, generator=gen)
    truth = (torch.rand(3, 1, 8, 8, generator=gen) > 0.6).float()
    bce = DiceCELoss(sigmoid=True)(logits, truth)
    ce = DiceCE()(logits, truth.long())
    assert torch.allclose(bce, ce, atol=1e-6)


def test_summarize_sweeps_picks_threshold_per_label():
    thresholds = [0.3, 0.5, 0.7]
    curves = [
        (0, thresholds, [{"dice": [0.1, 0.5, 0.2], "surface_dice_0": [0.2, 0.6, 0.4], "surface_dice_tol": [0.3, 0.7, 0.5]},
                         {"dice": [0.9, 0.1, 0.1], "surface_dice_0": [0.1, 0.2, 0.3], "surface_dice_tol": [1, 1, 1]}]),
        (1, thresholds, [{"dice": [0.1, 0.3, 0.2], "surface_dice_0": [0.2, 0.4, 0.6], "surface_dice_tol": [0.3, 0.7, 0.5]},
                         {"dice": [0.9, 0.1, float("nan")], "surface_dice_0": [0.1, 0.2, 0.5], "surface_dice_tol": [1, 1, 1]}]),
    ]
    out = summarize_sweeps(curves, "surface_dice_0")
    assert out["threshold"] == [0.5, 0.7]  # label 0: means 0.2, 0.5, 0.5 -> first max; label 1: 0.1, 0.2, 0.4
    assert out["surface_dice_0"] == pytest.approx((0.5 + 0.4) / 2)
    assert out["dice"] == pytest.approx((0.4 + 0.1) / 2)  # label 1 dice at 0.7: nanmean(0.1, nan)
    assert summarize_sweeps(curves, "dice")["threshold"] == [0.5, 0.3]


# ---------------------------------------------------------------------------------------------
# Segmentation runs


def test_train_2p5d_writes_a_complete_run(vessels, tmp_path):
    from slab.networks import build_network, load_weights
    from slab.pipeline.inference import predict_2p5d

    out = tmp_path / "run"
    result = train(vessels, _config(), out, device="cpu")
    for name in ("config.json", "last.pt", "best.pt", "log.csv", "curves.png"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    assert json.loads((out / "config.json").read_text(encoding="utf-8")) == validate_config(_config())

    rows = (out / "log.csv").read_text(encoding="utf-8").splitlines()
    assert len(rows) == 3
    header = rows[0].split(",")
    for column in ("epoch", "lr", "train_loss", "images_per_s", "val_surface_dice_0", "val_surface_dice_tol",
                   "val_dice", "threshold"):
        assert column in header

    last = load_checkpoint(out / "last.pt")
    assert last["epoch"] == 2 and len(last["history"]) == 2
    for key in ("model", "optimizer", "scheduler", "scaler", "config", "rng", "network", "threshold", "best"):
        assert key in last
    assert last["scheduler"]["last_epoch"] == 2 * (8 // 4)  # stepped once per optimizer step
    best = load_checkpoint(out / "best.pt")
    assert best["threshold"] in (0.3, 0.5, 0.7)
    assert best["epoch"] == result["best"]["epoch"]
    assert best["metrics"]["val_surface_dice_0"] == result["best"]["value"]
    assert result["threshold"] == best["threshold"]
    assert 0.0 <= result["best"]["value"] <= 1.0

    # the checkpoint alone rebuilds the network, and load_weights reads it
    net = build_network(**{k: v for k, v in best["network"].items()})
    load_weights(net, out / "best.pt")
    image = torch.rand(1, *SHAPE)
    prob = predict_2p5d(net, image, planes=("xy",), offsets=best["config"]["offsets"], device="cpu")
    assert prob.shape == (1, *SHAPE)


class _Interrupted(Exception):
    pass


def test_resume_reaches_the_same_result(vessels, tmp_path, monkeypatch):
    cfg = _config(val_every=1)
    straight = train(vessels, cfg, tmp_path / "straight", device="cpu")

    real_start = train_module.SlabTrainer.start_epoch

    def crash_in_second_epoch(self, engine):
        if self.state.epoch == 2:  # ignite counts epochs from 1
            raise _Interrupted
        return real_start(self, engine)

    monkeypatch.setattr(train_module.SlabTrainer, "start_epoch", crash_in_second_epoch)
    with pytest.raises(_Interrupted):
        train(vessels, cfg, tmp_path / "resumed", device="cpu")
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["epoch"] == 1
    monkeypatch.setattr(train_module.SlabTrainer, "start_epoch", real_start)
    resumed = train(vessels, cfg, tmp_path / "resumed", resume=True, device="cpu")

    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "last.pt")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert [r["train_loss"] for r in straight["history"]] == [r["train_loss"] for r in resumed["history"]]
    assert [r["val_surface_dice_0"] for r in straight["history"]] == [r["val_surface_dice_0"] for r in resumed["history"]]
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]
    assert len((tmp_path / "resumed" / "log.csv").read_text(encoding="utf-8").splitlines()) == 3

    # a finished run resumes to itself without training
    again = train(vessels, cfg, tmp_path / "resumed", resume=True, device="cpu")
    assert again["history"] == resumed["history"]


def test_resume_refuses_another_config_and_missing_runs(vessels, tmp_path):
    out = tmp_path / "run"
    train(vessels, _config(epochs=1), out, device="cpu")
    with pytest.raises(SlabError, match=r"another config \(lr: 0.001 -> 0.002"):
        train(vessels, _config(epochs=1, lr=2e-3), out, resume=True, device="cpu")
    with pytest.raises(SlabError, match="already holds a run"):
        train(vessels, _config(epochs=1), out, device="cpu")
    with pytest.raises(SlabError, match="nothing to resume"):
        train(vessels, _config(epochs=1), tmp_path / "empty", resume=True, device="cpu")
    # runtime-only keys may change
    train(vessels, _config(epochs=1, num_workers=0, progress=True), out, resume=True, device="cpu")


def test_train_3d_with_multilabel_organs(tmp_path):
    datalist = write_datalist(tmp_path / "data", n=2, kind="organs")
    cfg = _config(task="segmentation_3d", patch_size=[16, 16, 16], epochs=1, batch_size=2, samples_per_epoch=2,
                  val={"tta": "flips"})
    cfg.pop("planes")
    result = train(datalist, cfg, tmp_path / "run", device="cpu")
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert best["network"]["spatial_dims"] == 3 and best["network"]["out_channels"] == 3
    assert isinstance(best["threshold"], list) and len(best["threshold"]) == 3
    assert set(result["history"][0]) >= {"train_loss", "val_dice", "val_surface_dice_0"}


def test_3d_patch_must_suit_the_network(vessels, tmp_path):
    cfg = _config(task="segmentation_3d", patch_size=[15, 16, 16], epochs=1)
    cfg.pop("planes")
    with pytest.raises(SlabError, match="patch_size"):
        train(vessels, cfg, tmp_path / "run", device="cpu")
    assert not (tmp_path / "run").exists()


def test_values_labels_and_dice_ce(tmp_path):
    """A one-channel label of values (1, 2) becomes two sigmoid outputs; dice_ce trains on it."""
    from slab.io.volumes import save_volume

    root = tmp_path / "data"
    items = []
    for i in range(2):
        image = torch.rand(1, *SHAPE)
        label = torch.zeros(1, *SHAPE, dtype=torch.uint8)
        label[0, 2:7, 2:7] = 1
        label[0, 9:14, 9:14] = 2
        image[label > 0] += 1
        paths = [save_volume(MetaTensor(v, affine=torch.eye(4)), root / f"{i}_{name}.nii.gz")
                 for v, name in ((image, "image"), (label, "label"))]
        items.append({"image": str(paths[0]), "label": str(paths[1]), "fold": i})
    datalist = {"labels": ["a", "b"], "label_format": "values", "training": items[1:], "validation": items[:1]}
    result = train(datalist, _config(epochs=1, loss="dice_ce"), tmp_path / "run", device="cpu")
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert best["network"]["out_channels"] == 2
    assert len(result["threshold"]) == 2


def test_folds_split_by_case(vessels):
    training, validation, _ = split_items(vessels, fold=1)
    assert [Path(i["image"]).parent.name for i in validation] == ["case1"]
    assert sorted(Path(i["image"]).parent.name for i in training) == ["case0", "case2"]
    with pytest.raises(SlabError, match="fold"):
        split_items(vessels, fold=5)


# ---------------------------------------------------------------------------------------------
# Bad input: an error before anything is trained or written


def _broken_datalist(root: Path, problem: str) -> Path:
    path = write_datalist(root, n=2)
    data = json.loads(path.read_text(encoding="utf-8"))
    item = data["training"][0]
    if problem == "missing":
        item["label"] = str(root / "nowhere.nii.gz")
    elif problem == "shape":
        from slab.io.volumes import save_volume

        item["label"] = str(save_volume(MetaTensor(torch.zeros(1, 16, 16, 12, dtype=torch.uint8), affine=torch.eye(4)),
                                        root / "short_label.nii.gz"))
    elif problem == "channels":
        from slab.io.volumes import save_volume

        item["image"] = str(save_volume(MetaTensor(torch.rand(2, *SHAPE), affine=torch.eye(4)), root / "two.nii.gz"))
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.mark.parametrize("problem, message", [
    ("missing", "nowhere.nii.gz"),
    ("shape", "short_label.nii.gz"),
    ("channels", "channels"),
])
def test_bad_data_fails_before_training(tmp_path, problem, message, monkeypatch):
    datalist = _broken_datalist(tmp_path / "data", problem)
    if problem == "channels":  # the two-channel image is the second training item, after the first
        data = json.loads(datalist.read_text(encoding="utf-8"))
        data["training"].insert(0, data["validation"].pop())
        datalist.write_text(json.dumps(data), encoding="utf-8")
    monkeypatch.setattr(train_module.SlabTrainer, "start_epoch", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(SlabError, match=message):
        train(datalist, _config(epochs=1), tmp_path / "run", device="cpu")
    assert not (tmp_path / "run" / "config.json").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_train_on_cuda_with_amp(vessels, tmp_path):
    result = train(vessels, _config(epochs=1, amp=True), tmp_path / "run", device="cuda")
    assert math.isfinite(result["history"][0]["train_loss"])
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert all(v.device.type == "cpu" for v in last["model"].values())


def test_unavailable_device(vessels, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(SlabError, match="CUDA is not available"):
        train(vessels, _config(), tmp_path / "run", device="cuda")
    with pytest.raises(SlabError, match="--device"):
        train(vessels, _config(), tmp_path / "run", device="tpu")


# ---------------------------------------------------------------------------------------------
# Classification


def test_roc_auc_and_log_losses_known_answers():
    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert math.isnan(roc_auc(np.array([0.1, 0.2]), np.array([1, 1])))
    p, t = np.array([0.9, 0.2, 0.6]), np.array([1, 0, 0])
    manual = (2 * -np.log(0.9) + -np.log(0.8) + -np.log(0.4)) / 4
    assert weighted_log_loss(p, t) == pytest.approx(manual)
    # two studies of two vertebrae and the derived patient_overall rows (weights 7 / 14)
    vp = np.array([[0.9, 0.2], [0.1, 0.3]])
    vt = np.array([[1, 0], [0, 0]])
    ot = np.array([1, 0])
    op = 1 - (1 - vp).prod(axis=1)
    rows = [(2, 0.9, 1), (1, 0.2, 0), (1, 0.1, 0), (1, 0.3, 0), (14, op[0], 1), (7, op[1], 0)]
    manual = sum(w * -(y * np.log(q) + (1 - y) * np.log(1 - q)) for w, q, y in rows) / sum(r[0] for r in rows)
    assert competition_log_loss(vp, vt, ot) == pytest.approx(manual)
    metrics = classification_metrics([("s0", "C1", 0.9, 1), ("s0", "C2", 0.2, 0), ("s1", "C1", 0.1, 0),
                                      ("s1", "C2", 0.3, 0)])
    assert metrics["log_loss"] == pytest.approx(manual)
    assert metrics["auc_C1"] == 1.0 and math.isnan(metrics["auc_C2"]) and metrics["auc"] == 1.0


def test_sequence_loss_weights():
    slice_logits, seq_logits = torch.zeros(2, 3), torch.zeros(2, 1)
    slice_t, seq_t = torch.tensor([[1.0, 1, 1], [0, 0, 0]]), torch.tensor([[1.0], [0.0]])
    ln2 = math.log(2)
    # positives weigh 2: mean weight 1.5 on both terms
    assert sequence_loss(slice_logits, seq_logits, slice_t, seq_t).item() == pytest.approx(16 * 1.5 * ln2)
    assert sequence_loss(slice_logits, seq_logits, slice_t, seq_t, slice_weight=0, seq_weight=1,
                         pos_weight=1).item() == pytest.approx(ln2)


def test_mixup_and_shuffle_keep_targets_with_images():
    np.random.seed(0)
    images = torch.arange(4.0).reshape(4, 1, 1, 1, 1).expand(4, 2, 1, 2, 2)
    targets = torch.arange(4.0).reshape(4, 1)
    mixed, (t,) = mixup(images, [targets], alpha=1.0)
    assert torch.allclose(mixed[:, 0, 0, 0, 0], t[:, 0])  # image value == its blended target
    slabs = torch.arange(6.0).reshape(6, 1, 1, 1)
    slice_t = torch.arange(6.0)
    np.random.seed(1)
    shuffled, st = shuffle_sequence(slabs, slice_t, prob=1.0)
    assert sorted(st.tolist()) == list(range(6)) and st.tolist() != list(range(6))
    assert torch.equal(shuffled[:, 0, 0, 0], st)
    same, _ = shuffle_sequence(slabs, slice_t, prob=0.0)
    assert torch.equal(same, slabs)


def write_classification_datalist(root: Path, n: int = 8, shape=(16, 16, 20)) -> Path:
    """Two stacked "vertebrae" (label values 1, 2); a positive target has a bright blob inside its
    vertebra. Every fourth study has no label (one whole-volume sequence for patient_overall)."""
    from slab.io.volumes import save_volume

    rng = np.random.default_rng(0)
    items = []
    for s in range(n):
        image = rng.normal(0.3, 0.05, shape).astype(np.float32)
        label = np.zeros(shape, np.uint8)
        label[3:13, 3:13, :10] = 1
        label[3:13, 3:13, 10:] = 2
        targets = {}
        for v in (1, 2):
            targets[f"V{v}"] = int(rng.random() < 0.5)
            if targets[f"V{v}"]:
                x, y, z = rng.integers(5, 11), rng.integers(5, 11), rng.integers(2, 8) + 10 * (v - 1)
                image[x - 2:x + 2, y - 2:y + 2, z - 2:z + 2] = 1.0
        targets["patient_overall"] = max(targets.values())
        item = {"id": f"s{s}", "case": f"s{s}", "fold": s % 2, "targets": targets,
                "image": str(save_volume(MetaTensor(torch.from_numpy(image[None]), affine=torch.eye(4)),
                                         root / f"s{s}" / "image.nii.gz"))}
        if s % 4 != 3:
            item["label"] = str(save_volume(MetaTensor(torch.from_numpy(label[None]), affine=torch.eye(4)),
                                            root / f"s{s}" / "label.nii.gz"))
        items.append(item)
    data = {"labels": ["V1", "V2"], "label_format": "values", "n_folds": 2,
            "training": [i for i in items if i["fold"]], "validation": [i for i in items if not i["fold"]]}
    path = root / "datalist.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


CLS = {
    "task": "classification", "epochs": 2, "batch_size": 2, "lr": 1e-3, "warmup_epochs": 0, "normalize": None,
    "classification": {"n_slabs": 4, "image_size": [16, 16]},
    "network": {"backbone": "resnet10", "hidden_size": 4, "num_layers": 1, "dropout": 0.0}, "progress": False,
}


def test_train_classification(tmp_path):
    datalist = write_classification_datalist(tmp_path / "data")
    result = train(datalist, CLS, tmp_path / "run", device="cpu")
    row = result["history"][-1]
    for key in ("val_auc", "val_log_loss", "val_loss", "val_auc_V1", "val_auc_V2"):
        assert key in row
    assert 0 < row["val_log_loss"] < 10
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert best["network"]["name"] == "sequence_classifier" and best["network"]["in_channels"] == 3
    assert result["best"]["metric"] == "auc"

    # inference builds and scores the validation studies' sequences exactly as validation did
    from slab.networks import build_network
    from slab.pipeline.inference import predict_sequences
    from slab.io.volumes import load_volume

    model = build_network(**best["network"])
    model.load_state_dict(best["model"])
    rows = []
    for item in json.loads(datalist.read_text(encoding="utf-8"))["validation"]:
        label = load_volume(item["label"]) if "label" in item else None
        scores = predict_sequences(model, load_volume(item["image"]), label, targets=["V1", "V2"], n_slabs=4,
                                   size=(16, 16), plane="xy", offsets=(-1, 0, 1), device="cpu")
        rows += [(item["id"], target, s["probability"], item["targets"][target]) for target, s in scores.items()]
    assert len(rows) == 8  # 4 labelled validation studies x 2 vertebrae
    metrics = classification_metrics(rows)
    for key in ("log_loss", "auc_V1", "auc_V2", "val_loss"):
        logged = best["metrics"][key if key.startswith("val_") else f"val_{key}"]
        assert metrics[key] == pytest.approx(logged, rel=1e-5, nan_ok=True), key


def test_classification_data_errors(tmp_path):
    datalist = write_classification_datalist(tmp_path / "data", n=4)
    data = json.loads(datalist.read_text(encoding="utf-8"))
    del data["training"][0]["targets"]
    with pytest.raises(SlabError, match="targets"):
        train(data, CLS, tmp_path / "run", device="cpu")
    data = json.loads(datalist.read_text(encoding="utf-8"))
    data.pop("labels")
    with pytest.raises(SlabError, match="labels"):
        train(data, CLS, tmp_path / "run", device="cpu")


def test_loader_workers_do_not_change_the_samples(vessels, tmp_path):
    """Sample i of epoch e is drawn under its own seed: 2 worker processes train exactly like 0,
    also in the second epoch, which the persistent workers learn from the batch indices."""
    a = train(vessels, _config(epochs=2, val_every=2), tmp_path / "a", device="cpu")
    b = train(vessels, _config(epochs=2, val_every=2, num_workers=2), tmp_path / "b", device="cpu")
    assert [r["train_loss"] for r in a["history"]] == [r["train_loss"] for r in b["history"]]
    assert a["history"][0]["train_loss"] != a["history"][1]["train_loss"]
    wa, wb = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    assert all(torch.equal(v, wb["model"][k]) for k, v in wa["model"].items())


@pytest.mark.slow
def test_classifier_learns_bright_blobs(tmp_path):
    """40 studies, 10 epochs: the sequence classifier ranks every validation target correctly."""
    datalist = write_classification_datalist(tmp_path / "data", n=40)
    result = train(datalist, {**CLS, "epochs": 10, "batch_size": 4}, tmp_path / "run", device="cpu")
    assert result["history"][-1]["val_auc"] >= 0.9
    assert result["history"][-1]["train_loss"] < result["history"][0]["train_loss"]
