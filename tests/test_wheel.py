"""Installed = checked out: the sdist built from the checkout's files, a wheel built from that
sdist, installed (not editable) with its dependencies into a fresh venv, and used from a folder
outside the checkout as a user who never cloned the repository would: the public API, the
commands the README gives that need no repository files, the shipped bundles by name.

Slow (~2 minutes: the venv install takes most of it); `.ci/run` runs it (`make test-wheel`).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# What the user's venv must be able to do, run there by its own python from a scratch folder.
API_CHECK = r"""
import json, sys
from pathlib import Path
import slab
from slab.pipeline.paths import BUNDLES_DIR, DATA_DIR, shipped_bundles
prefix = Path(sys.prefix).resolve()
modules = {name: getattr(slab, name).__module__ for name in slab.__all__}
print(json.dumps({"file": str(Path(slab.__file__).resolve()), "prefix": str(prefix), "modules": modules,
                  "bundles_dir": str(BUNDLES_DIR.resolve()), "data_dir": str(DATA_DIR.resolve()),
                  "bundles": shipped_bundles(), "fill": slab.transforms.post._compiled_fill is not None}))
"""
README_SNIPPET = r"""
import numpy as np
import slab
from slab.io.volumes import load_volume

predictor = slab.Predictor.from_bundle("vessel_2p5d", planes=["xy"], tta="none", device="cpu")
probabilities = predictor(load_volume(slab.sample_dir("vessel_phantom") + "/image.nii.gz"))
print(tuple(probabilities.shape), float(np.asarray(probabilities).max()))
"""


def _source_copy(dest: Path) -> Path:
    """The checkout's files as git sees them (tracked and new, nothing ignored): what a clone has."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                            check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def _build(hook: str, source: Path, out: Path) -> Path:
    """A PEP 517 build hook of setuptools run in ``source`` (no network: the venv's setuptools)."""
    code = f"from setuptools import build_meta; print(build_meta.{hook}({str(out)!r}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=source, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python, slab command, user folder) of a fresh venv with the wheel built from the sdist."""
    work = tmp_path_factory.mktemp("wheel")
    sdist = _build("build_sdist", _source_copy(work / "checkout"), work / "dist")
    with tarfile.open(sdist) as archive:
        archive.extractall(work / "unpacked", filter="data")
    (unpacked,) = (work / "unpacked").iterdir()
    wheel = _build("build_wheel", unpacked, work / "dist")
    env_dir = work / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    done = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "-c", str(ROOT / "constraints.txt"),
                           str(wheel)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    user = work / "user"
    user.mkdir()
    return python, env_dir / "bin" / "slab", user


def _run(args, cwd, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    env["OMP_NUM_THREADS"] = "2"
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)


def test_import_slab_exposes_every_public_name_from_the_install(installed):
    python, _, user = installed
    done = _run([python, "-c", API_CHECK], user)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout)
    prefix = found["prefix"]
    assert found["file"].startswith(prefix) and not found["file"].startswith(str(ROOT))
    assert found["bundles_dir"].startswith(prefix) and found["data_dir"].startswith(prefix)
    assert found["bundles"] == ["brats_3d", "gi_tract_2p5d", "spine_cls_2p5d", "vessel_2p5d"]
    assert all(module.startswith("slab.") for module in found["modules"].values()), found["modules"]
    assert found["fill"], "the compiled flood fill did not build into the wheel"


def test_slab_demo_runs_from_the_install(installed):
    _, slab, user = installed
    done = _run([slab, "demo", "--out", "demo", "--planes", "xy", "--tta", "none", "--views", "1",
                 "--device", "cpu"], user)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((user / "demo" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["mean"]["dice"] > 0.85  # the shipped weights (test_demo: measured 0.8868)
    for name in ("mask.nii.gz", "image_hits.png", "image_sections.png", "slabs.png"):
        assert (user / "demo" / name).is_file(), name


def test_readme_commands_without_repository_files_run_from_the_install(installed):
    python, slab, user = installed
    done = _run([python, "-c", README_SNIPPET], user)
    assert done.returncode == 0, done.stderr[-3000:]
    shape, peak = done.stdout.split(")")
    assert shape.strip("( ").split(",")[:1] == ["1"] and 0.5 < float(peak) <= 1.0
    sample = _run([python, "-c", "import slab; print(slab.sample_dir('vessel_phantom'))"], user).stdout.strip()
    for args in (["--help"], ["train", "--show-config"], ["predict", "--help"],
                 ["predict", "-i", f"{sample}/image.nii.gz", "--bundle", "vessel_2p5d", "-o", "mask.nii.gz",
                  "--axes", "xy", "--tta", "none", "--device", "cpu"],
                 ["evaluate", "mask.nii.gz", f"{sample}/label.nii.gz", "--json", "scores.json"],
                 ["view", f"{sample}/image.nii.gz", "mask.nii.gz", f"{sample}/label.nii.gz", "-o", "case.html"]):
        done = _run([slab, *args], user)
        assert done.returncode == 0, (args, done.stderr[-3000:])
    scores = json.loads((user / "scores.json").read_text(encoding="utf-8"))
    assert scores["dice"] > 0.85
    assert "NiiVue 0.69.0" in (user / "case.html").read_text(encoding="utf-8")  # the viewer is package data
    # a bundle name that is not shipped stays a path, and fails as one: one line, exit 2
    done = _run([slab, "predict", "-i", f"{sample}/image.nii.gz", "--bundle", "no_such_bundle", "-o", "x.nii.gz"], user)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and "no_such_bundle" in done.stderr
    assert not (user / "x.nii.gz").exists()


def test_the_model_zoo_requirement_step_resolves_with_the_installed_slab(installed, tmp_path):
    """The zoo's ``ci/get_bundle_requirements.py`` writes ``slab-seg==0.1.0`` and the tested pins;
    ``pip install -r`` of that file resolves in the user's venv (slab-seg satisfied by the wheel
    installed from source, as each bundle's docs say, not looked up on the index)."""
    from test_bundle_zoo import zoo_requirements

    python, _, user = installed
    folder = json.loads(_run([python, "-c", API_CHECK], user).stdout)["bundles_dir"]
    for name in ("vessel_2p5d", "gi_tract_2p5d", "brats_3d", "spine_cls_2p5d"):
        meta = json.loads((Path(folder) / name / "configs" / "metadata.json").read_text(encoding="utf-8"))
        requirements = tmp_path / f"requirements_{name}.txt"
        requirements.write_text("\n".join(zoo_requirements(meta)) + "\n", encoding="utf-8")
        done = _run([python, "-m", "pip", "install", "--dry-run", "-r", requirements], user)
        assert done.returncode == 0, (name, done.stdout[-2000:], done.stderr[-2000:])
        assert "Requirement already satisfied: slab-seg==0.1.0" in done.stdout, done.stdout[-2000:]
