"""The MONAI model zoo's own checks on all four bundles, as its ``ci/verify_bundle.py`` runs them:
the directory (LICENSE, metadata, inference config, weights), the metadata schema
(``verify_metadata``), the InferProperties / TrainProperties, ``verify_net_in_out``, TorchScript
(``ckpt_export``) and ONNX (``onnx_export``) exports of the shipped weights; and the bundle run as
a user runs it, from a copy elsewhere (``bundle_root: "."``)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow, ckpt_export, verify_metadata

from slab.pipeline.bundle import BUNDLES_DIR, run_bundle
from slab.io.volumes import load_volume, save_volume

BUNDLES = ("vessel_2p5d", "gi_tract_2p5d", "brats_3d", "spine_cls_2p5d")
SCHEMA = BUNDLES_DIR / "metadata_schema.json"
# Small settings for running inference on a tiny volume (the shipped networks, the shipped weights).
QUICK = {
    "vessel_2p5d": {"slab#planes": ["xy"], "slab#tta": "none"},
    "gi_tract_2p5d": {"slab#tta": "none"},
    "brats_3d": {"slab#roi_size": [16, 16, 16], "slab#tta": "none"},
    "spine_cls_2p5d": {"classifier#n_slabs": 4, "classifier#image_size": [32, 32]},
}
CHANNELS = {"vessel_2p5d": 1, "gi_tract_2p5d": 1, "brats_3d": 4, "spine_cls_2p5d": 1}


def _files(name):
    root = BUNDLES_DIR / name
    return root, str(root / "configs" / "metadata.json"), str(root / "configs" / "inference.json")


def _volume(folder: Path, channels: int, shape=(21, 18, 11), seed=0) -> Path:
    """A small odd-sized volume with an oblique affine, in ``folder`` (its only file)."""
    from monai.data import MetaTensor

    rng = np.random.default_rng(seed)
    angle = np.deg2rad(10)  # oblique in-plane, anisotropic
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = rotation @ np.diag([0.9, 0.8, 2.5]), (-20, 5, 7)
    data = (rng.random((channels, *shape)) * 1000).astype(np.float32)
    return save_volume(MetaTensor(torch.from_numpy(data), affine=torch.from_numpy(affine)), folder / "case.nii.gz")


@pytest.mark.parametrize("name", BUNDLES)
def test_zoo_directory_and_metadata_schema(name, tmp_path):
    root, meta_file, _ = _files(name)
    for required in ("LICENSE", "configs/metadata.json", "configs/inference.json", "configs/logging.conf",
                     "docs/README.md"):
        assert (root / required).is_file(), required
    assert (root / "models" / "model.pt").is_file()  # every bundle ships weights
    # the thresholds chosen on validation travel with the weights
    assert "threshold" in json.loads((root / "models" / "model.json").read_text(encoding="utf-8"))
    meta = json.loads(Path(meta_file).read_text(encoding="utf-8"))
    assert meta["version"] in meta["changelog"]
    schema = tmp_path / "schema.json"
    shutil.copy(SCHEMA, schema)  # in place: verify_metadata downloads only a missing schema
    verify_metadata(meta_file=meta_file, filepath=str(schema))
    # and the schema is not vacuous: a tensor without its channel meanings, or a bad version, fails
    for broken in ({**meta, "version": "one"},
                   {**meta, "network_data_format": {"inputs": {"image": {
                       k: v for k, v in meta["network_data_format"]["inputs"]["image"].items() if k != "channel_def"}},
                       "outputs": meta["network_data_format"]["outputs"]}}):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(broken), encoding="utf-8")
        with pytest.raises(ValueError, match="Failed validating"):
            verify_metadata(meta_file=str(bad), filepath=str(schema))


def zoo_requirements(meta: dict) -> list[str]:
    """The lines the model zoo's ``ci/get_bundle_requirements.py`` writes for a bundle's metadata
    (and then ``pip install -r``): MONAI, torch and numpy pinned, then every required and
    optional package pinned to its version."""
    lines = [f"monai=={meta['monai_version']}", f"torch=={meta['pytorch_version']}", f"numpy=={meta['numpy_version']}"]
    for key in ("optional_packages_version", "required_packages_version"):
        lines += [f"{name}=={version}" for name, version in meta.get(key, {}).items()]
    return lines


@pytest.mark.parametrize("name", BUNDLES)
def test_zoo_requirement_step_names_real_distributions(name):
    """What the zoo would pip install: slab's real distribution name (``slab-seg``, the version this
    checkout builds; ``slab`` on the index is an unrelated audio library), and for every pin one of
    slab's own dependencies, at or above the minimum slab declares, installed here at that version
    or a later one of the same major version. The pins are the versions the bundle was trained and
    tested with, not slab's minima: the zoo installs exactly them, and e.g. nibabel 5.0 (slab's
    minimum) does not run with numpy 2. tests/test_wheel.py resolves the file with pip."""
    import configparser
    import re
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    import slab

    meta = json.loads((BUNDLES_DIR / name / "configs" / "metadata.json").read_text(encoding="utf-8"))
    required = meta["required_packages_version"]
    assert "slab" not in required
    cfg = configparser.ConfigParser()
    cfg.read(BUNDLES_DIR.parent / "setup.cfg")
    assert cfg["metadata"]["version"] == "attr: slab.__version__"  # one source of the version
    assert required["slab-seg"] == slab.__version__ == version("slab-seg")
    minima = dict(re.findall(r"^\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9.]+)\s*$", cfg["options"]["install_requires"], re.M))
    for dist, pinned in required.items():
        if dist != "slab-seg":
            assert dist in minima and Version(pinned) >= Version(minima[dist]), (dist, pinned, minima.get(dist))
    for line in zoo_requirements(meta):
        dist, pinned = line.split("==")
        try:
            installed = Version(version(dist))
        except PackageNotFoundError:
            raise AssertionError(f"{name}: {line} names no distribution installed with slab") from None
        assert installed.release[0] == Version(pinned).release[0] and installed >= Version(pinned), (line, installed)


def test_logging_conf_is_what_monai_applies():
    """MONAI applies configs/logging.conf before a bundle's configs; it refuses one whose classes
    are not logging's own (they are eval()ed). All four bundles' files pass that check."""
    from monai.bundle.workflows import _reject_executable_logging_config

    for name in BUNDLES:
        path = BUNDLES_DIR / name / "configs" / "logging.conf"
        assert "class=StreamHandler" in _reject_executable_logging_config(str(path))


class Recorder:
    """A handler as `--tracking` settings attach one (MLFlowHandler's place): what it saw."""

    seen: list = []

    def attach(self, engine):
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: Recorder.seen.append(e.state.output))


@pytest.mark.parametrize("name", BUNDLES)
def test_inference_properties_and_a_tracked_run(name, tmp_path):
    """MONAI's InferProperties (bundle_root, device, dataset_dir, dataset, evaluator, network_def,
    inferer) are all there; the inferer predicts a batch; tracking handlers attach to the
    evaluator (as `--tracking mlflow` attaches MLFlowHandler) and see one output per file."""
    root = BUNDLES_DIR / name
    data = tmp_path / "data"
    _volume(data, CHANNELS[name])
    quick = dict(QUICK[name])
    workflow = ConfigWorkflow(config_file=str(root / "configs" / "inference.json"), logging_file=False,
                              meta_file=str(root / "configs" / "metadata.json"), workflow_type="infer",
                              bundle_root=str(root), dataset_dir=str(data), image_glob="*.nii.gz",
                              output_dir=str(tmp_path / "out"), device="cpu", **quick)
    workflow.initialize()
    assert workflow.check_properties() == []
    assert [item["image"] for item in workflow.dataset] == [str(data / "case.nii.gz")]
    from monai.engines import Evaluator

    assert isinstance(workflow.evaluator, Evaluator)

    image = load_volume(data / "case.nii.gz")
    if name == "spine_cls_2p5d":
        scores = workflow.inferer(image[None], workflow.evaluator.network)
        assert scores["probability"].shape == (1, 1) and scores["slice_probabilities"].shape == (1, 4, 1)
    else:
        predictor = workflow.parser.get_parsed_content("predictor")
        batch = torch.stack([torch.as_tensor(np.asarray(image))] * 2)
        net = workflow.network_def  # a fresh network (random weights) handed to the inferer
        out = workflow.inferer(batch, net)
        out_channels = workflow.parser["slab"]["network"]["out_channels"]
        assert out.shape == (2, out_channels, *image.shape[1:]) and out.dtype == torch.float32
        own = predictor.model
        predictor.model = net
        np.testing.assert_allclose(out[1].numpy(), predictor(image).numpy(), atol=1e-6)
        predictor.model = own
        assert workflow.inferer.predictor.model is own  # handed a network, it did not keep it

    Recorder.seen = []
    settings = {"handlers_id": {"evaluator": {"id": "evaluator", "handlers": "handlers"}},
                "configs": {"save_execute_config": False, "evaluator": {"_target_": "test_bundle_zoo.Recorder"}}}
    (result,) = run_bundle(root, ("inference.json",), tracking=settings, dataset_dir=str(data), image_glob="*.nii.gz",
                           output_dir=str(tmp_path / "tracked"), device="cpu", **quick)
    assert len(Recorder.seen) == 1 and Recorder.seen[0]["image"] == str(data / "case.nii.gz")
    if name == "spine_cls_2p5d":
        assert Path(result).read_text(encoding="utf-8").splitlines()[1].startswith(str(data / "case.nii.gz"))
    else:
        assert result == Recorder.seen and Path(result[0]["mask"]).is_file()


@pytest.mark.parametrize("name", BUNDLES)
def test_inference_runs_and_checks_clean_without_arguments(name, tmp_path, monkeypatch):
    """As the zoo's verify_bundle.py checks a bundle (bundle_root, config, logging and meta files,
    nothing else), MONAI's InferProperties are all there; and the bundle predicts as shipped, with
    no data given: its default dataset_dir is the embedded sample (vessel_2p5d) or a phantom
    sample (seed 0) written once under output_dir."""
    root = BUNDLES_DIR / name
    monkeypatch.chdir(tmp_path)
    workflow = ConfigWorkflow(config_file=str(root / "configs" / "inference.json"), workflow_type="infer",
                              logging_file=str(root / "configs" / "logging.conf"),
                              meta_file=str(root / "configs" / "metadata.json"), bundle_root=str(root))
    workflow.initialize()
    assert workflow.check_properties() == []
    (result,) = run_bundle(root, ("inference.json",), output_dir=str(tmp_path / "out"), device="cpu", **QUICK[name])
    if name == "vessel_2p5d":
        assert [Path(r["image"]).parent for r in result] == [BUNDLES_DIR.parent / "data" / "vessel_phantom"]
    elif name == "spine_cls_2p5d":
        assert str(tmp_path / "out" / "sample" / "image.nii.gz") in Path(result).read_text(encoding="utf-8")
    else:
        sample = load_volume(tmp_path / "out" / "sample" / "image.nii.gz")
        mask = load_volume(result[0]["mask"])
        assert sample.shape[0] == CHANNELS[name] and mask.shape[1:] == sample.shape[1:]
        assert np.asarray(mask).any()  # the shipped weights find the phantom's structures
    if name != "vessel_2p5d":
        assert (tmp_path / "out" / "sample").is_dir() and not (BUNDLES_DIR / name / "out").exists()


@pytest.mark.parametrize("name", BUNDLES)
def test_train_properties(name):
    root = BUNDLES_DIR / name
    workflow = ConfigWorkflow(config_file=str(root / "configs" / "train.json"), logging_file=False,
                              meta_file=str(root / "configs" / "metadata.json"), workflow_type="train",
                              bundle_root=str(root))
    workflow.initialize()
    assert workflow.check_properties() == []
    for key in ("train#dataset", "train#dataset#data", "validate#dataset", "validate#dataset#data",
                "train#trainer", "train#handlers", "validate#evaluator", "validate#handlers"):
        assert key in workflow.parser, key  # the model zoo's names


def test_overriding_the_zoo_data_keys_changes_what_a_bundle_trains_on(tmp_path):
    """``train#dataset#data`` / ``validate#dataset#data`` are the data the trainer uses: a user who
    overrides them (as with any zoo bundle) trains on their items."""
    root = BUNDLES_DIR / "vessel_2p5d"
    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "train.json"))
    parser.update({"bundle_root": str(root), "output_dir": str(tmp_path / "run"), "device": "cpu",
                   "phantom#shape": [24, 24, 24], "phantom#train_seeds": [1, 2], "phantom#val_seeds": [100]})
    training = parser.get_parsed_content("train#dataset#data")
    validation = parser.get_parsed_content("validate#dataset#data")
    assert [Path(i["image"]).parent.name for i in training] == ["seed1", "seed2"]
    assert [Path(i["image"]).parent.name for i in validation] == ["seed100"]
    assert len(parser.get_parsed_content("train#dataset")) == 2
    parser.update({"train#dataset#data": training[1:], "validate#dataset#data": training[:1]})
    trainer = parser.get_parsed_content("train#trainer")
    assert [i["image"] for i in trainer.task.train_items] == [training[1]["image"]]
    assert [i["image"] for i in trainer.task.val_items] == [training[0]["image"]]


def _example(name, parser) -> torch.Tensor:
    image = parser["_meta_"]["network_data_format"]["inputs"]["image"]
    shape = {"vessel_2p5d": (40, 48), "gi_tract_2p5d": (32, 48), "brats_3d": (32, 16, 48),
             "spine_cls_2p5d": (40, 32)}[name]
    # the classifier: a batch of two sequences of five slabs of spatial_shape[0] channels
    lead = (2, 5, image["spatial_shape"][0]) if name == "spine_cls_2p5d" else (2, image["num_channels"])
    return torch.rand(*lead, *shape, generator=torch.Generator().manual_seed(0))


def _documented_converter_kwargs(root: Path) -> dict:
    """The ``--converter_kwargs`` of the ``onnx_export`` command in the bundle's docs/README.md (the
    dynamic axes that keep the ONNX graph any-size): the test runs what the docs say."""
    import ast
    import re

    readme = (root / "docs" / "README.md").read_text(encoding="utf-8")
    (line,) = [line for line in readme.splitlines() if "monai.bundle onnx_export" in line]
    return ast.literal_eval(re.search(r'--converter_kwargs "(\{.*\})"', line).group(1))


@pytest.mark.parametrize("name", BUNDLES)
def test_torchscript_and_onnx_exports_of_the_shipped_weights(name, tmp_path):
    """``ckpt_export`` and ``onnx_export`` (MONAI's) of every bundle's models/model.pt; the
    TorchScript module and the ONNX graph (run by onnxruntime), fed another size than the export's,
    give the network's output."""
    root, meta_file, config_file = _files(name)
    parser = ConfigParser()
    parser.read_config(config_file)
    parser.read_meta(meta_file)
    net = parser.get_parsed_content("network_def").eval()
    weights = root / "models" / "model.pt"
    net.load_state_dict(torch.load(weights, weights_only=True))
    x = _example(name, parser)
    with torch.no_grad():
        expected = net(x)
    ts = tmp_path / "model.ts"
    ckpt_export(net_id="network_def", filepath=str(ts), ckpt_file=str(weights),
                meta_file=meta_file, config_file=config_file, bundle_root=str(root))
    scripted = torch.jit.load(str(ts))
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), expected, atol=1e-5, rtol=1e-4)

    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from monai.bundle import onnx_export

    onnx_path = tmp_path / "model.onnx"
    onnx_export(net_id="network_def", filepath=str(onnx_path), ckpt_file=str(weights),
                meta_file=meta_file, config_file=config_file, bundle_root=str(root),
                converter_kwargs=_documented_converter_kwargs(root))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(output, expected.numpy(), atol=1e-4, rtol=1e-3)


def test_a_copied_bundle_runs_from_its_own_folder_with_its_own_weights(tmp_path, monkeypatch):
    """`python -m monai.bundle run --config_file configs/inference.json` in a copy of the bundle
    (the model zoo's way: bundle_root "." is the working directory) uses the copy's weights; with
    the copy's weights gone it fails naming the copy's path, never falling back to the
    repository's bundle."""
    copy = tmp_path / "vessel_copy"
    shutil.copytree(BUNDLES_DIR / "vessel_2p5d", copy)
    data = tmp_path / "data"
    image = _volume(data, 1, shape=(19, 23, 7))
    # the copy's weights differ from the repository's: a fresh network's
    parser = ConfigParser()
    parser.read_config(str(copy / "configs" / "inference.json"))
    torch.manual_seed(1)
    torch.save(parser.get_parsed_content("network_def").state_dict(), copy / "models" / "model.pt")
    (copy / "models" / "model.json").unlink()
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
               "--dataset_dir", str(data), "--image_glob", "*.nii.gz", "--output_dir", str(tmp_path / "out"),
               "--prob_name", "{stem}_prob.nii.gz", "--slab#planes", "['xy']", "--slab#tta", "none",
               "--device", "cpu"]
    done = subprocess.run(command, cwd=copy, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert " - INFO - " in done.stdout  # configs/logging.conf was applied

    from slab.pipeline.inference import Predictor

    expected = Predictor.from_bundle(copy, planes=["xy"], tta="none", device="cpu")(load_volume(image))
    prob = load_volume(tmp_path / "out" / "case_prob.nii.gz")
    np.testing.assert_allclose(np.asarray(prob, np.float32), expected.numpy(), atol=1e-3)  # stored as float16
    np.testing.assert_allclose(np.asarray(prob.affine), np.asarray(load_volume(image).affine), atol=1e-6)

    # without its own weights the copy fails, naming them (here in process: the same workflow)
    (copy / "models" / "model.pt").unlink()
    monkeypatch.chdir(copy)
    workflow = ConfigWorkflow(config_file="configs/inference.json", logging_file=False, workflow_type="infer",
                              dataset_dir=str(data), image_glob="*.nii.gz", output_dir=str(tmp_path / "none"))
    workflow.initialize()
    with pytest.raises(RuntimeError) as failed:
        workflow.run()
    cause = failed.value
    while cause.__cause__ is not None:
        cause = cause.__cause__
    assert str(cause).startswith("models/model.pt: no such weights file")
    assert not (tmp_path / "none").exists()


# The model zoo's README template (docs/readme_template.md), its sections in its order.
TEMPLATE = ("### **Authors**", "### **Tags**", "## **Model Description**", "## **Data**", "#### **Preprocessing**",
            "## **Performance**", "## **Additional Usage Steps**", "## **System Configuration**",
            "## **Limitations**", "## **References**")


@pytest.mark.parametrize("name", BUNDLES)
def test_docs_follow_the_zoo_readme_template(name):
    """Each bundle's docs/README.md has the template's sections in order, each with text, and its
    references and authors are the metadata's."""
    text = (BUNDLES_DIR / name / "docs" / "README.md").read_text(encoding="utf-8")
    lines, fence, headings = text.splitlines(), False, []
    for number, line in enumerate(lines):
        fence = fence != line.startswith("```")
        if not fence and line.startswith("#"):
            headings.append((line, number))
    found = [h for h, _ in headings if h in TEMPLATE]
    assert found == list(TEMPLATE)
    for (heading, start), (_, end) in zip(headings, headings[1:] + [("", len(lines))]):
        if heading in TEMPLATE and heading not in ("## **Performance**", "## **Additional Usage Steps**"):
            assert any(line.strip() for line in lines[start + 1:end]), heading
    meta = json.loads((BUNDLES_DIR / name / "configs" / "metadata.json").read_text(encoding="utf-8"))
    references = text.split("## **References**", 1)[1]
    assert all(reference in references for reference in meta["references"])
    assert meta["authors"] in text.split("### **Tags**", 1)[0]


# The model zoo's pre-commit hooks (its .pre-commit-config.yaml) that apply to a bundle's files,
# run as the zoo runs them: pre-commit-hooks' own programs. Fixers run on a copy and must find
# nothing to fix.
ZOO_HOOKS = (("check-added-large-files", "--maxkb=1024", "--enforce-all"), ("end-of-file-fixer",),
             ("trailing-whitespace-fixer",), ("mixed-line-ending",), ("detect-private-key",),
             ("check-case-conflict",), ("check-executables-have-shebangs",),
             ("pretty-format-json", "--no-sort-keys", "--indent=4"), ("check-json",), ("check-yaml",))
TEXT = {".json", ".md", ".conf", ".yml", ".yaml", ".txt", ""}  # "" is LICENSE


@pytest.mark.parametrize("name", BUNDLES)
def test_zoo_formatting_hooks_pass(name, tmp_path):
    copy = tmp_path / name
    shutil.copytree(BUNDLES_DIR / name, copy)
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)  # the hooks run in the zoo's repository,
    subprocess.run(["git", "add", "-A"], cwd=tmp_path, check=True)    # on the files of a commit
    files = sorted(p for p in copy.rglob("*") if p.is_file())
    text = [p for p in files if p.suffix in TEXT]
    kinds = {"pretty-format-json": ".json", "check-json": ".json", "check-yaml": ".yml"}
    bin_dir = Path(sys.executable).parent
    for hook, *args in ZOO_HOOKS:
        chosen = files if hook in ("check-added-large-files", "check-case-conflict", "detect-private-key",
                                   "check-executables-have-shebangs") else text
        chosen = [p for p in chosen if hook not in kinds or p.suffix == kinds[hook]]
        if hook == "check-executables-have-shebangs":  # pre-commit hands it the executable files only
            chosen = [p for p in chosen if p.stat().st_mode & 0o111]
        if not chosen:
            continue
        done = subprocess.run([str(bin_dir / hook), *args, *map(str, chosen)], capture_output=True, text=True,
                              cwd=copy)
        assert done.returncode == 0, (hook, done.stdout[-2000:], done.stderr[-2000:])
    assert sorted(p for p in copy.rglob("*") if p.is_file()) == files
    for path in files:  # the fixers changed nothing
        assert path.read_bytes() == (BUNDLES_DIR / name / path.relative_to(copy)).read_bytes(), path
    # and the size rule is not vacuous: the hook refuses a file over 1 MiB
    big = copy / "models" / "big.pt"
    big.write_bytes(b"\0" * (1025 * 1024))
    done = subprocess.run([str(bin_dir / "check-added-large-files"), "--maxkb=1024", "--enforce-all", str(big)],
                          capture_output=True, text=True, cwd=copy)
    assert done.returncode == 1 and "exceeds 1024 KB" in done.stdout
