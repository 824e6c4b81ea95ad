"""Every command and config in the README and the bundles' docs runs, as written.

The commands are read out of the documents' ``bash`` blocks (continuation lines joined) and run in
order, each document in a working folder that holds what its commands expect: a copy of
``bundles/`` (so that an explicit export into a bundle writes into the copy), a miniature
SenNet download, and the README's training config. ``slab`` commands run through the CLI entry
point; ``python -m monai.bundle`` commands through MONAI's own functions with the arguments
parsed as ``fire`` parses them. Training commands get tiny overrides appended (epochs, phantom
sizes) so that the suite stays fast; nothing else is changed. A command in a document that this
test does not run fails it, so a new example cannot go untested.
"""
from __future__ import annotations

import ast
import json
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from slab.pipeline.bundle import BUNDLES_DIR
from slab.pipeline.cli import main
from slab.io.rle import read_sennet_rles

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md"] + [f"bundles/{b}/docs/README.md" for b in
                        ("vessel_2p5d", "gi_tract_2p5d", "brats_3d", "spine_cls_2p5d")]
# Documented but not runnable on this machine, with the reason.
NOT_RUN = {"torchrun": "launches several processes (multi_gpu_train.json: CUDA GPUs); tests/core/test_distributed.py "
                       "runs torchrun training and prediction on 2 gloo processes itself"}
# Appended to training commands: the same pipeline, a few seconds long.
TINY_TRAIN = {
    "vessel_2p5d": {"phantom#shape": [24, 24, 24], "phantom#train_seeds": [1], "training#epochs": 1,
                    "training#samples_per_epoch": 8, "training#batch_size": 4, "training#patch_size": None},
    "gi_tract_2p5d": {"phantom#shape": [24, 24, 12], "phantom#train_seeds": [1], "training#epochs": 1,
                      "training#samples_per_epoch": 8, "training#batch_size": 4},
    "brats_3d": {"phantom#shape": [24, 24, 24], "phantom#train_seeds": [1], "training#epochs": 1,
                 "training#patch_size": [16, 16, 16], "training#samples_per_epoch": 2},
    "spine_cls_2p5d": {"phantom#shape": [24, 24, 24], "phantom#train_seeds": [1, 2], "phantom#val_seeds": [100, 101],
                       "training#epochs": 1,
                       "phantom#targets": {"C1": [1, 0, 0, 1], "C2": [0, 1, 1, 0], "C3": [0, 0, 1, 1]},
                       "training#classification#n_slabs": 4, "training#classification#image_size": [32, 32],
                       "training#batch_size": 2},
}
# Appended to `slab cv`: the plan's own configurations with a few-second schedule and network.
TINY_CV = {"samples_per_epoch": 8, "batch_size": 4, "network": {"name": "unet", "channels": [4, 8], "strides": [2]},
           "patch_size": None, "progress": False}
# The README's training config, shortened the same way.
TINY_CONFIG = {"epochs": 1, "samples_per_epoch": 8, "batch_size": 4, "patch_size": [32, 32]}
TINY_BRATS_INFER = {"slab#roi_size": [16, 16, 16], "slab#tta": "none"}


def documented(path: Path) -> list[str]:
    """The commands of a document's ``bash`` blocks, one string each, in order."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#") and not line.startswith("make "):
                commands.append(line)
    return commands


def _words(command: str) -> list[str]:
    words = shlex.split(command, comments=True)
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # OMP_NUM_THREADS=2 ...
        words = words[1:]
    return words


def _fire_value(text: str):
    """A value as fire reads it from the command line (Python literals, else the string)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _bundle_name(config_file) -> str | None:
    files = config_file if isinstance(config_file, list) else [config_file]
    match = re.search(r"bundles/([^/]+)/configs", Path(files[0]).resolve().as_posix())
    return match[1] if match else None


def run_bundle_command(words: list[str]) -> None:
    """``python -m monai.bundle VERB --key value ...`` through monai.bundle's function of that name."""
    import monai.bundle.scripts as scripts

    assert words[:3] == ["python", "-m", "monai.bundle"], words
    verb, rest = words[3], words[4:]
    positional, kwargs = [], {}
    i = 0
    while i < len(rest):
        if rest[i].startswith("--"):
            kwargs[rest[i][2:]] = _fire_value(rest[i + 1])
            i += 2
        else:
            positional.append(rest[i])
            i += 1
    if verb == "run":
        name = _bundle_name(kwargs["config_file"])
        configs = kwargs["config_file"] if isinstance(kwargs["config_file"], list) else [kwargs["config_file"]]
        if any(c.endswith("train.json") for c in configs):
            kwargs.update({"device": "cpu", "training#progress": False, **TINY_TRAIN[name]})
        elif name == "brats_3d":
            kwargs.update(TINY_BRATS_INFER)
        kwargs.setdefault("device", "cpu")
        if name == "spine_cls_2p5d" and not any(c.endswith("train.json") for c in configs):
            kwargs.update({"classifier#n_slabs": 4, "classifier#image_size": [32, 32]})
        scripts.run(meta_file=str(Path(configs[0]).parent / "metadata.json"), **kwargs)
        if kwargs.get("tracking") == "mlflow":  # MONAI's MLflow settings: a SQLite store in output_dir
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=f"sqlite:///{Path(kwargs['output_dir']).resolve() / 'mlruns.db'}")
            assert any(client.search_runs([e.experiment_id]) for e in client.search_experiments()), words
    elif verb in ("verify_metadata", "verify_net_in_out", "ckpt_export", "onnx_export"):
        getattr(scripts, verb)(*positional, **kwargs)
    else:
        raise AssertionError(f"no runner for monai.bundle {verb}")


def _sennet(root: Path) -> None:
    """A miniature Kaggle SenNet download: train/ with images, labels and an RLE CSV, and test/."""
    rng = np.random.default_rng(0)
    for split, names in (("train", ("kidney_1_dense", "kidney_2", "kidney_3_sparse")), ("test", ("kidney_5",))):
        for name in names:
            images = root / split / name / "images"
            images.mkdir(parents=True)
            for z in range(20):
                tifffile.imwrite(images / f"{z:04d}.tif", rng.integers(0, 60000, (24, 28), dtype=np.uint16))
            if split == "train":
                (root / split / name / "labels").mkdir()
                for z in range(20):
                    tifffile.imwrite(root / split / name / "labels" / f"{z:04d}.tif",
                                     (rng.random((24, 28)) < 0.1).astype(np.uint8) * 255)
    (root / "train_rles.csv").write_text("id,rle\n", encoding="utf-8")


def _uwmgi(root: Path) -> None:
    """A miniature UW-Madison download: one case-day of 16-bit scans and its RLE CSV."""
    import imagecodecs

    scans = root / "train" / "case1" / "case1_day2" / "scans"
    scans.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for n in range(1, 9):
        image = rng.integers(0, 3000, (24, 32), dtype=np.uint16)
        (scans / f"slice_{n:04d}_32_24_1.50_1.50.png").write_bytes(imagecodecs.png_encode(image))
    rows = [f"case1_day2_slice_{n:04d},{c},{'40 6' if n % 2 else ''}\n" for n in range(1, 9)
            for c in ("large_bowel", "small_bowel", "stomach")]
    (root / "train.csv").write_text("id,class,segmentation\n" + "".join(rows), encoding="utf-8")


def _brats(root: Path) -> None:
    """A BraTS case of four contrasts (validation style), and a Kaggle-style nested training set."""
    import nibabel as nib

    rng = np.random.default_rng(2)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    cases = [root / "BraTS20_Validation_001"] + [
        root / "brats2020" / "BraTS2020_TrainingData" / "MICCAI_BraTS2020_TrainingData" / f"BraTS20_Training_{i:03d}"
        for i in (1, 2)]
    for case in cases:
        case.mkdir(parents=True)
        for m in ("flair", "t1", "t1ce", "t2"):
            nib.save(nib.Nifti1Image(rng.integers(0, 900, (20, 18, 16)).astype(np.int16), affine),
                     case / f"{case.name}_{m}.nii.gz")
        if "Training" in case.name:
            seg = np.zeros((20, 18, 16), np.uint8)
            seg[5:10, 5:9, 4:8] = 2
            seg[6:8, 6:8, 5:7] = 4
            nib.save(nib.Nifti1Image(seg, affine), case / f"{case.name}_seg.nii.gz")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    work = tmp_path_factory.mktemp("docs")
    shutil.copytree(BUNDLES_DIR, work / "bundles")  # each document copies it again (cd into it, ../..)
    _sennet(work / "blood-vessel-segmentation")
    _uwmgi(work / "uw-madison-gi-tract-image-segmentation")
    _brats(work)
    return work


def _inside(work: Path, folder: Path) -> Path:
    """A folder a document changes into, which must lie in its working folder."""
    folder = folder.resolve()
    assert folder.is_dir() and folder.is_relative_to(work.resolve()), folder
    return folder


def readme_config() -> dict:
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    return json.loads(re.search(r"```json\n(.*?)```", text, flags=re.S)[1])


def test_the_readme_training_config_is_valid_as_written():
    from slab.pipeline.training import validate_config

    config = validate_config(readme_config())
    assert config["val"]["metric"] in ("surface_dice_0", "surface_dice_tol", "dice")


@pytest.mark.parametrize("doc", DOCS)
def test_every_documented_command_runs(doc, workdir, monkeypatch, capsys):
    work = workdir / f"doc{DOCS.index(doc)}"
    work.mkdir(exist_ok=True)
    if not (work / "bundles").exists():  # a copy, not a link: `cd bundles/X` then `../..` is this folder
        shutil.copytree(workdir / "bundles", work / "bundles")
    for name in ("blood-vessel-segmentation", "uw-madison-gi-tract-image-segmentation", "brats2020",
                 "BraTS20_Validation_001"):
        if not (work / name).exists():
            (work / name).symlink_to(workdir / name)
    (work / "my_config.json").write_text(json.dumps({**readme_config(), **TINY_CONFIG}), encoding="utf-8")
    (work / "tiny_cv.json").write_text(json.dumps(TINY_CV), encoding="utf-8")
    monkeypatch.chdir(work)
    monkeypatch.setenv("SLAB_HOME", str(work / "slab_home"))  # slab install stays in the test's folder
    commands = documented(REPO_ROOT / doc)
    assert commands, doc
    for command in commands:
        subshell = re.fullmatch(r"\(cd (\S+) && (.*)\)", command)  # (cd X && command): that one command in X
        words = _words(subshell[2] if subshell else command)
        if words[0] in NOT_RUN:
            continue
        if words[0] == "cd":  # as a shell: the commands after it run there, until the next cd
            assert len(words) == 2, command
            monkeypatch.chdir(_inside(work, Path.cwd() / words[1]))
            continue
        here = Path.cwd()
        if subshell:
            monkeypatch.chdir(_inside(work, here / subshell[1]))
        if words[0] == "slab":
            if words[1] == "cv":
                words += ["--config", "tiny_cv.json", "--device", "cpu"]
            assert main(words[1:]) == 0, (command, capsys.readouterr().err)
        elif words[:3] == ["python", "-m", "monai.bundle"]:
            run_bundle_command(words)
        else:
            raise AssertionError(f"{doc}: no way to run {command!r}; add it to tests/test_docs.py")
        monkeypatch.chdir(here)
    capsys.readouterr()
    assert Path.cwd() == work.resolve(), f"{doc} leaves its reader in {Path.cwd()}, not where it started"
    if doc == "README.md":
        # The post-processing shown works on the example it is shown with (the shipped bundle's
        # probabilities of that phantom): a clean mask, not a volume of foreground.
        scores = json.loads((work / "scores.json").read_text(encoding="utf-8"))
        assert scores["dice"] > 0.85 and scores["precision"] > 0.8, scores
        assert sorted(read_sennet_rles(work / "submission.csv")) == ["kidney_5"]


def test_documented_exclusions_are_the_only_ones():
    skipped = {_words(c)[0] for doc in DOCS for c in documented(REPO_ROOT / doc) if _words(c)[0] in NOT_RUN}
    assert skipped <= set(NOT_RUN)


@pytest.mark.parametrize("doc", DOCS)
def test_every_python_example_runs(doc, monkeypatch):
    """The documents' ``python`` blocks run as written, from the repository root."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO_ROOT / doc).read_text(encoding="utf-8"), flags=re.S)
    monkeypatch.chdir(REPO_ROOT)
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, doc, "exec"), namespace)  # noqa: S102 - the project's own documentation
        if "probabilities" in namespace:
            assert tuple(namespace["probabilities"].shape[-3:]) == (96, 96, 96)
