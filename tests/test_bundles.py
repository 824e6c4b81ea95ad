"""The MONAI bundles: layout, metadata against the network, verify_net_in_out, TorchScript export,
tiny train -> infer runs through the bundles' own configs, and bad bundle directories."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, verify_net_in_out
from monai.bundle.scripts import _get_fake_spatial_shape

from slab.pipeline.bundle import BUNDLE_FILES, BUNDLES_DIR, require_files, run_bundle, sample_dir
from slab.pipeline.cli import main
from slab.core.errors import SlabError
from slab.io.volumes import load_volume

BUNDLES = ("vessel_2p5d", "gi_tract_2p5d", "brats_3d", "spine_cls_2p5d")
# The fields the MONAI Bundle Specification requires of metadata.json, and the ones we add.
REQUIRED_META = ("version", "changelog", "monai_version", "pytorch_version", "numpy_version",
                 "required_packages_version", "task", "description", "authors", "copyright", "network_data_format")
EXTRA_META = ("intended_use", "data_source", "data_type", "image_classes", "label_classes", "pred_classes",
              "eval_metrics", "references")
TENSOR_KEYS = ("type", "format", "num_channels", "spatial_shape", "dtype", "value_range", "is_patch_data",
               "channel_def")


def _files(name):
    root = BUNDLES_DIR / name
    return root, str(root / "configs" / "metadata.json"), str(root / "configs" / "inference.json")


def _network_section(parser):
    return parser["slab"]["network"] if "slab" in parser else parser["classifier"]["network"]


@pytest.mark.parametrize("name", BUNDLES)
def test_layout_and_metadata_fields(name):
    root, meta_file, _ = _files(name)
    for relative in BUNDLE_FILES:
        assert (root / relative).is_file(), relative
    assert "Apache License" in (root / "LICENSE").read_text(encoding="utf-8") and "Version 2.0" in (root / "LICENSE").read_text(encoding="utf-8")
    meta = json.loads(Path(meta_file).read_text(encoding="utf-8"))
    for key in REQUIRED_META + EXTRA_META:
        assert key in meta, key
    assert meta["version"] in meta["changelog"]
    assert meta["monai_version"] and meta["pytorch_version"] and meta["numpy_version"]
    fmt = meta["network_data_format"]
    assert set(fmt) == {"inputs", "outputs"}
    for tensor in (fmt["inputs"]["image"], fmt["outputs"]["pred"]):
        for key in TENSOR_KEYS:
            assert key in tensor, key
    assert "modality" in fmt["inputs"]["image"]
    weights = root / "models" / "model.pt"
    readme = (root / "docs" / "README.md").read_text(encoding="utf-8")
    if not weights.exists():
        assert "no weights" in readme.lower(), "a bundle without weights says so in its docs"


@pytest.mark.parametrize("name", BUNDLES)
def test_network_matches_metadata(name):
    """network_def, fed a tensor of the declared shape and dtype, gives the declared output."""
    _, meta_file, config_file = _files(name)
    parser = ConfigParser()
    parser.read_config(config_file)
    parser.read_meta(meta_file)
    image = parser["_meta_"]["network_data_format"]["inputs"]["image"]
    pred = parser["_meta_"]["network_data_format"]["outputs"]["pred"]
    net = parser.get_parsed_content("network_def").eval()
    section = _network_section(parser)
    if section["name"] != "sequence_classifier":
        assert image["num_channels"] == section["in_channels"] and pred["num_channels"] == section["out_channels"]
        assert len(image["spatial_shape"]) == section["spatial_dims"]
    shape = _get_fake_spatial_shape(image["spatial_shape"], n=2)
    x = torch.rand(1, image["num_channels"], *shape, dtype=getattr(torch, image["dtype"]))
    with torch.no_grad():
        y = net(x)
    assert y.shape[1] == pred["num_channels"] and y.dtype == getattr(torch, pred["dtype"])
    if pred["spatial_shape"]:
        assert tuple(y.shape[2:]) == tuple(shape)
    verify_net_in_out(net_id="network_def", meta_file=meta_file, config_file=config_file, device="cpu")


@pytest.mark.parametrize("name", BUNDLES)
def test_train_and_inference_share_the_network(name):
    _, _, config_file = _files(name)
    inference = json.loads(Path(config_file).read_text(encoding="utf-8"))
    train = json.loads((BUNDLES_DIR / name / "configs" / "train.json").read_text(encoding="utf-8"))
    section = inference.get("slab", inference.get("classifier"))
    assert train["network"] == section["network"]
    if "offsets" in section and "offsets" in train["training"]:
        assert train["training"]["offsets"] == section["offsets"]
    assert train["training"]["normalize"] == section["normalize"]


def test_vessel_bundle_settings_agree_with_predictor_from_bundle():
    """`slab predict --bundle` (Predictor.from_bundle) and the bundle's own predictor agree."""
    from slab.pipeline.inference import Predictor

    root, meta_file, config_file = _files("vessel_2p5d")
    parser = ConfigParser()
    parser.read_config(config_file)
    parser.read_meta(meta_file)
    parser["bundle_root"] = str(root)  # as `--bundle_root` does; "." is the working directory
    ours, theirs = parser.get_parsed_content("predictor"), Predictor.from_bundle(root)
    assert (ours.planes, ours.offsets, ours.tta, ours.batch_size) == (theirs.planes, theirs.offsets, theirs.tta,
                                                                       theirs.batch_size)
    for a, b in zip(ours.model.state_dict().values(), theirs.model.state_dict().values()):
        assert torch.equal(a, b)


# Tiny settings: every bundle's train.json must run end to end within seconds.
TINY = {
    "vessel_2p5d": {"phantom#shape": [24, 24, 24], "phantom#train_seeds": [1], "phantom#val_seeds": [100],
                    "training#patch_size": None, "training#samples_per_epoch": 8, "training#batch_size": 4},
    "gi_tract_2p5d": {"phantom#shape": [24, 24, 12], "phantom#train_seeds": [1], "phantom#val_seeds": [100],
                      "training#samples_per_epoch": 8, "training#batch_size": 4},
    "brats_3d": {"phantom#shape": [24, 24, 24], "phantom#train_seeds": [1], "phantom#val_seeds": [100],
                 "training#patch_size": [16, 16, 16], "training#samples_per_epoch": 2, "training#batch_size": 2,
                 "network#channels": [4, 8, 16, 16]},
    "spine_cls_2p5d": {"phantom#shape": [24, 24, 24], "phantom#train_seeds": [1, 2], "phantom#val_seeds": [100, 101],
                       "phantom#targets": {"C1": [1, 0, 0, 1], "C2": [0, 1, 1, 0], "C3": [0, 0, 1, 1]},
                       "training#classification#n_slabs": 4, "training#classification#image_size": [32, 32],
                       "training#batch_size": 2},
}
INFER = {
    "vessel_2p5d": {"slab#planes": ["xy"], "slab#tta": "none", "slab#postprocess": {"threshold": 0.5}},
    "gi_tract_2p5d": {"slab#tta": "none"},
    "brats_3d": {"slab#roi_size": [16, 16, 16], "slab#tta": "none", "slab#network#channels": [4, 8, 16, 16]},
    "spine_cls_2p5d": {"classifier#n_slabs": 4, "classifier#image_size": [32, 32]},
}


@pytest.mark.parametrize("name", BUNDLES)
def test_train_json_runs_and_its_weights_infer(name, tmp_path):
    common = {"output_dir": str(tmp_path / "run"), "export_weights": str(tmp_path / "model.pt"), "device": "cpu",
              "training#epochs": 1, "training#val_every": 1, "training#progress": False}
    (result,) = run_bundle(BUNDLES_DIR / name, ("train.json",), **common, **TINY[name])
    assert len(result["history"]) == 1 and np.isfinite(result["history"][0]["train_loss"])
    assert Path(result["exported"]).is_file() and (tmp_path / "model.json").is_file()
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())  # a plain state dict

    datalist = json.loads((tmp_path / "run" / "phantoms" / "datalist.json").read_text(encoding="utf-8"))
    case = datalist["validation"][0]
    data = tmp_path / "data"
    data.mkdir()
    image = Path(case["image"])
    (data / image.name).symlink_to(image)
    (result,) = run_bundle(BUNDLES_DIR / name, ("inference.json",), dataset_dir=str(data),
                           output_dir=str(tmp_path / "out"), weights=str(tmp_path / "model.pt"), device="cpu",
                           **INFER[name])
    if name == "spine_cls_2p5d":
        rows = Path(result).read_text(encoding="utf-8").splitlines()
        assert rows[0] == "image,probability,max_slice_probability" and len(rows) == 2
        # the row is predict_sequences on the normalised study: one whole-volume sequence
        from slab.pipeline.bundle import network
        from slab.pipeline.inference import predict_sequences
        from slab.transforms.intensity import PercentileNormalize

        section = json.loads(Path(_files(name)[2]).read_text(encoding="utf-8"))["classifier"]
        model = network(section["network"])
        model.load_state_dict(state)
        study = PercentileNormalize(**section["normalize"])(load_volume(data / image.name))
        (scores,) = predict_sequences(model, study, n_slabs=4, size=(32, 32), offsets=section["offsets"],
                                      plane=section["plane"], device="cpu").values()
        path, probability, max_slice = rows[1].split(",")
        assert path == str(data / image.name)
        assert float(probability) == pytest.approx(scores["probability"], abs=1e-6)
        assert float(max_slice) == pytest.approx(scores["slice_probabilities"].max(), abs=1e-6)
        return
    if name == "brats_3d":  # one threshold per channel, chosen on validation, recorded with the weights
        assert len(json.loads((tmp_path / "model.json").read_text(encoding="utf-8"))["threshold"]) == 3
    mask = load_volume(result[0]["mask"])
    source = load_volume(image)
    label = load_volume(case["label"])
    assert mask.dtype == torch.uint8 and tuple(mask.shape[1:]) == tuple(label.shape[1:])
    assert mask.shape[0] == 1  # several labels are written as one label map
    np.testing.assert_allclose(np.asarray(mask.affine), np.asarray(source.affine), atol=1e-5)
    assert set(np.unique(np.asarray(mask)).tolist()) <= set(range(label.shape[0] + 1)) | {4}


def test_missing_bundle_files_are_one_line_errors(tmp_path, capsys):
    bundle = tmp_path / "vessel_2p5d"
    shutil.copytree(BUNDLES_DIR / "vessel_2p5d" / "configs", bundle / "configs")
    with pytest.raises(SlabError, match=str(bundle / "models" / "model.pt")):
        require_files(bundle)
    assert main(["demo", "--bundle", str(bundle), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bundle / "models" / "model.pt") in err
    (bundle / "configs" / "inference.json").unlink()
    with pytest.raises(SlabError, match="inference.json"):
        run_bundle(bundle, ("inference.json",))
    assert not (tmp_path / "out").exists()


def test_predict_through_a_broken_bundle_exits_2(tmp_path, capsys):
    pytest.importorskip("slab.pipeline.cli.predict")
    bundle = tmp_path / "b"
    (bundle / "configs").mkdir(parents=True)
    shutil.copy(BUNDLES_DIR / "vessel_2p5d" / "configs" / "inference.json", bundle / "configs")
    code = main(["predict", "-i", str(Path(sample_dir("vessel_phantom")) / "image.nii.gz"),
                 "-o", str(tmp_path / "mask.nii.gz"), "--bundle", str(bundle)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "model.pt" in err
    assert not (tmp_path / "mask.nii.gz").exists()


def test_brats_inference_uses_the_thresholds_chosen_on_validation(tmp_path):
    """Per-channel thresholds from models/model.json (or a checkpoint) binarise each channel;
    without one, every channel is binarised at slab#postprocess#threshold (0.5)."""
    from monai.data import MetaTensor

    from slab.pipeline.bundle import network
    from slab.pipeline.inference import recorded_postprocess
    from slab.io.volumes import save_volume

    root, _, config_file = _files("brats_3d")
    config = {**json.loads(Path(config_file).read_text(encoding="utf-8"))["slab"]["network"], "channels": [4, 8, 16, 16]}
    torch.manual_seed(0)
    weights = tmp_path / "models" / "model.pt"
    weights.parent.mkdir()
    torch.save(network(config).state_dict(), weights)
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    save_volume(MetaTensor(torch.from_numpy(rng.random((4, 24, 24, 24), dtype=np.float32)), affine=torch.eye(4)),
                data / "case.nii.gz")

    def infer(out):
        ((written,),) = run_bundle(root, ("inference.json",), dataset_dir=str(data), output_dir=str(tmp_path / out),
                                   weights=str(weights), device="cpu", prob_name="{stem}_prob.nii.gz",
                                   **INFER["brats_3d"])
        return np.asarray(load_volume(written["mask"])), np.asarray(load_volume(written["prob"]), np.float64)

    def per_channel(prob, thresholds):
        """The BraTS label map of the thresholded regions (TC, WT, ET): WT 2, then TC 1, then ET 4."""
        regions = np.stack([prob[c] > t for c, t in enumerate(thresholds)])
        label = np.zeros((1, *prob.shape[1:]), np.uint8)
        for c, value in ((1, 2), (0, 1), (2, 4)):
            label[0][regions[c]] = value
        return label

    mask, prob = infer("default")  # no model.json: 0.5 for every channel
    np.testing.assert_array_equal(mask, per_channel(prob, [0.5] * 3))
    chosen = [float(np.median(prob[c])) for c in range(3)]  # thresholds that split every channel
    assert len(set(chosen)) == 3
    weights.with_suffix(".json").write_text(json.dumps({"best": {}, "threshold": chosen}), encoding="utf-8")
    mask, prob_again = infer("chosen")
    np.testing.assert_array_equal(prob_again, prob)
    np.testing.assert_array_equal(mask, per_channel(prob, chosen))
    assert 0 < (mask > 0).mean() < 1 and not np.array_equal(mask, per_channel(prob, [0.5] * 3))

    # slab predict --bundle binarises as the bundle run does; an explicit --threshold wins
    section = json.loads(Path(config_file).read_text(encoding="utf-8"))["slab"]
    section.update(roi_size=[16, 16, 16], tta="none", network={**section["network"], "channels": [4, 8, 16, 16]})
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "inference.json").write_text(json.dumps({"slab": section}), encoding="utf-8")
    cli = ["predict", "-i", str(data / "case.nii.gz"), "--bundle", str(tmp_path), "--device", "cpu"]
    assert main(cli + ["-o", str(tmp_path / "cli.nii.gz")]) == 0
    np.testing.assert_array_equal(np.asarray(load_volume(tmp_path / "cli.nii.gz")), mask)
    assert main(cli + ["-o", str(tmp_path / "cli_05.nii.gz"), "--threshold", "0.5"]) == 0
    np.testing.assert_array_equal(np.asarray(load_volume(tmp_path / "cli_05.nii.gz")), per_channel(prob, [0.5] * 3))

    # a training checkpoint carries its threshold itself; hysteresis or no threshold are left alone
    checkpoint = tmp_path / "best.pt"
    torch.save({"model": torch.load(weights, weights_only=True), "config": {}, "threshold": [0.2, 0.3, 0.4]},
               checkpoint)
    assert recorded_postprocess({"threshold": 0.5, "min_size": 3}, checkpoint, 3) == {"threshold": [0.2, 0.3, 0.4],
                                                                                    "min_size": 3}
    assert recorded_postprocess({"threshold": 0.5}, weights, 3) == {"threshold": chosen}
    assert recorded_postprocess({"hysteresis": [0.4, 0.6]}, weights, 3) == {"hysteresis": [0.4, 0.6]}
    assert recorded_postprocess({"threshold": None}, weights, 3) == {"threshold": None}
    assert recorded_postprocess({"threshold": 0.5}, None, 3) == {"threshold": 0.5}
    assert recorded_postprocess({"threshold": 0.5}, tmp_path / "elsewhere.pt", 3) == {"threshold": 0.5}
    with pytest.raises(SlabError, match=rf"^{weights.with_suffix('.json')}: threshold has 3 values; .* 2 labels"):
        recorded_postprocess({"threshold": 0.5}, weights, 2)


@pytest.mark.parametrize("name", ["vessel_2p5d", "gi_tract_2p5d", "brats_3d"])
def test_training_writes_only_under_a_relative_output_dir(name, tmp_path, monkeypatch):
    """A bundle's training never touches the repository (the shipped weights stay as they are);
    a relative --output_dir resolves from the working directory, phantom datalists included."""
    import hashlib

    def digest(folder: Path) -> dict:
        return {str(p): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}

    before = digest(BUNDLES_DIR)
    monkeypatch.chdir(tmp_path)
    (result,) = run_bundle(BUNDLES_DIR / name, ("train.json",), output_dir="relative/run", device="cpu",
                           **{"training#epochs": 1, "training#progress": False}, **TINY[name])
    assert Path(result["exported"]).resolve() == (tmp_path / "relative" / "run" / "models" / "model.pt")
    assert digest(BUNDLES_DIR) == before
    default = json.loads((BUNDLES_DIR / name / "configs" / "inference.json").read_text(encoding="utf-8"))
    assert default["output_dir"] == f"eval/{name}"  # relative: the working directory, never the bundle


def test_spine_training_whose_validation_auc_is_undefined_falls_back_to_the_loss(tmp_path):
    """Validation studies without both classes give an all-NaN AUC: the best checkpoint is chosen
    by the validation loss instead (said in a warning), and the weights export."""
    from slab.core.errors import SlabWarning

    tiny = {**TINY["spine_cls_2p5d"], "phantom#targets": {"C1": [1, 0, 0, 0], "C2": [0, 1, 0, 0],
                                                           "C3": [1, 1, 0, 0]}}
    with pytest.warns(SlabWarning, match="val.metric auc is undefined at epoch 1 .* chosen by val_loss"):
        (result,) = run_bundle(BUNDLES_DIR / "spine_cls_2p5d", ("train.json",), output_dir=str(tmp_path / "run"),
                               device="cpu", **{"training#epochs": 2, "training#progress": False,
                                                "training#val#metric": "auc"}, **tiny)
    assert result["best"]["fallback"] == "val_loss" and result["best"]["epoch"] in (1, 2)
    assert Path(result["exported"]).is_file()
    losses = [row["val_loss"] for row in result["history"]]
    assert result["best"]["epoch"] == 1 + int(np.argmin(losses))


class Recorder:
    """A handler as MONAI's tracking settings attach one (an MLFlowHandler's place): what it saw."""

    seen: dict = {}

    def __init__(self, name: str):
        self.name = name

    def attach(self, engine):
        from ignite.engine import Events

        Recorder.seen[self.name] = []
        engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: Recorder.seen[self.name].append(
            ("iteration", e.state.output)))
        engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: Recorder.seen[self.name].append(
            ("epoch", dict(e.state.metrics))))


@pytest.mark.parametrize("name", BUNDLES)
def test_train_json_has_monai_train_properties(name):
    """MONAI's TrainProperties (trainer, max_epochs, dataset, inferer, handlers...) are all there, so
    MONAI's tools (tracking, Label, FL) find the training workflow."""
    from monai.bundle import ConfigWorkflow

    root = BUNDLES_DIR / name
    workflow = ConfigWorkflow(config_file=str(root / "configs" / "train.json"),
                              meta_file=str(root / "configs" / "metadata.json"), logging_file=False,
                              workflow_type="train", bundle_root=str(root))
    workflow.initialize()
    assert workflow.check_properties() == []


def test_tracking_handlers_attach_to_the_trainer_and_the_evaluator(tmp_path):
    """`monai.bundle run --tracking SETTINGS` puts handlers on train#trainer and validate#evaluator
    (the MLflow settings do it the same way): they see every step's loss and the validation metrics."""
    settings = {
        "handlers_id": {"trainer": {"id": "train#trainer", "handlers": "train#handlers"},
                        "validator": {"id": "validate#evaluator", "handlers": "validate#handlers"}},
        "configs": {"save_execute_config": False,
                    "trainer": {"_target_": "test_bundles.Recorder", "name": "trainer"},
                    "validator": {"_target_": "test_bundles.Recorder", "name": "validator"}},
    }
    Recorder.seen = {}
    (result,) = run_bundle(BUNDLES_DIR / "vessel_2p5d", ("train.json",), tracking=settings,
                           output_dir=str(tmp_path / "run"), device="cpu",
                           **{"training#epochs": 2, "training#progress": False}, **TINY["vessel_2p5d"])
    steps = [out for kind, out in Recorder.seen["trainer"] if kind == "iteration"]
    assert len(steps) == 2 * 2 and all(np.isfinite(s[0]["loss"]) for s in steps)  # decollated, as MONAI's
    epochs = [m for kind, m in Recorder.seen["trainer"] if kind == "epoch"]
    assert [m["train_loss"] for m in epochs] == [row["train_loss"] for row in result["history"]]
    validated = [m for kind, m in Recorder.seen["validator"] if kind == "epoch"]
    assert validated and validated[-1]["surface_dice_0"] == result["history"][-1]["val_surface_dice_0"]


def test_mlflow_tracking_of_a_bundle_training(tmp_path):
    """`python -m monai.bundle run --config_file configs/train.json --tracking mlflow` with MONAI's
    own MLflow settings: the run in MLflow's store holds every step's loss, each epoch's
    training loss and the validation metrics, equal to the run's own history."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    (result,) = run_bundle(BUNDLES_DIR / "vessel_2p5d", ("train.json",), tracking="mlflow", output_dir=str(out),
                           device="cpu", **{"training#epochs": 2, "training#progress": False}, **TINY["vessel_2p5d"])
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlruns.db'}")
    [experiment] = [e for e in client.search_experiments() if e.name == "monai_experiment"]
    [run] = client.search_runs([experiment.experiment_id])
    history = {key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
               for key in ("train_loss", "val_surface_dice_0", "dice")}
    rows = result["history"]
    epochs = [(row["epoch"], row["train_loss"]) for row in rows]
    steps = [point for point in history["train_loss"] if point not in epochs]
    assert len(steps) == 2 * 2 and sorted(s for s, _ in steps) == [1, 2, 3, 4]  # every optimizer step
    for epoch, loss in epochs:  # an epoch's loss is the mean of its steps
        assert loss == pytest.approx(np.mean([v for s, v in steps if (s - 1) // 2 == epoch - 1]), rel=1e-6)
    assert history["val_surface_dice_0"] == [(2, pytest.approx(rows[-1]["val_surface_dice_0"]))]
    assert history["dice"][-1] == (2, pytest.approx(rows[-1]["val_dice"]))  # the evaluator's own metrics
    assert run.data.params["max_epochs"] == "2"


def test_a_shipped_bundle_is_found_by_name_and_a_folder_of_that_name_wins(tmp_path, monkeypatch):
    from slab.pipeline.paths import bundle_dir, shipped_bundles

    assert shipped_bundles() == ["brats_3d", "gi_tract_2p5d", "spine_cls_2p5d", "vessel_2p5d"]
    monkeypatch.chdir(tmp_path)
    assert bundle_dir("vessel_2p5d") == BUNDLES_DIR / "vessel_2p5d"
    assert require_files("brats_3d") == BUNDLES_DIR / "brats_3d"
    (tmp_path / "vessel_2p5d").mkdir()  # the user's own folder of that name is what they mean
    assert bundle_dir("vessel_2p5d") == Path("vessel_2p5d")
    assert bundle_dir("no_such_bundle") == Path("no_such_bundle")
    assert bundle_dir("sub/brats_3d") == Path("sub/brats_3d")  # a path is never rewritten
