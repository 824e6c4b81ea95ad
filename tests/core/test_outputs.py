"""Never destroy or half-write: outputs against inputs, full and read-only disks, a full TMPDIR
during on-disk accumulation, SIGTERM and SIGINT mid-run, stale temporaries of killed runs,
multi-volume runs that fail on a later volume, and training checkpoints that a crash cannot split."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from slab.networks import build_network, save_weights
from slab.pipeline.cli import main
from slab.core.errors import SlabError
from slab.core.outputs import atomic_write, check_outputs, sweep_stale, temp_dir

NET = {"name": "unet", "spatial_dims": 2, "in_channels": 3, "out_channels": 1, "channels": [4, 8], "strides": [2]}


@pytest.fixture
def model(tmp_path):
    torch.manual_seed(0)
    (tmp_path / "net.json").write_text(json.dumps(NET), encoding="utf-8")
    save_weights(build_network(**NET), tmp_path / "net.pt")
    return ["--network", str(tmp_path / "net.json"), "--weights", str(tmp_path / "net.pt"), "--device", "cpu"]


def _volume(path: Path, shape=(12, 10, 8), seed=0) -> Path:
    data = np.random.default_rng(seed).normal(100, 20, shape).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.5, 1])), path)
    return path


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@contextmanager
def tmpfs(where: Path, size: str, readonly: bool = False):
    """A small tmpfs at ``where`` (root only; skipped elsewhere), unmounted afterwards."""
    where.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if readonly else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or 'not root'})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _one_error_line(capfd) -> str:
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("slab: error: "), err
    return err[0]


# ---------------------------------------------------------------------------------------------
# Outputs against inputs


def test_check_outputs_refuses_aliases_and_allows_neighbours(tmp_path):
    stack = tmp_path / "stack"
    stack.mkdir()
    (stack / "0000.png").write_bytes(b"")
    image = tmp_path / "image.nii.gz"
    image.write_bytes(b"")
    (tmp_path / "link.nii.gz").symlink_to(image)
    refused = [({"-i": stack}, {"-o": stack}, "is the input"),
               ({"-i": stack}, {"-o": stack / "mask.nii.gz"}, "lies inside the input"),
               ({"-i": stack / "0000.png"}, {"-o": tmp_path}, "would replace the input"),
               ({"-i": image}, {"-o": tmp_path / "link.nii.gz"}, "is the input"),
               ({"-i": image}, {"-o": tmp_path / "a.nii.gz", "--prob": tmp_path / "a.nii.gz"}, "the same path as"),
               ({"-i": image}, {"-o": tmp_path / "out", "--prob": tmp_path / "out" / "p.nii.gz"}, "lies inside the output")]
    for inputs, outputs, message in refused:
        with pytest.raises(SlabError, match=message):
            check_outputs(inputs, outputs)
    check_outputs({"-i": image, "--weights": None}, {"-o": tmp_path / "mask.nii.gz", "--prob": None})
    check_outputs({"-i": [image, tmp_path / "other.nii.gz"]}, {"-o": tmp_path / "sub" / "deeper" / "m.nii.gz"})


def test_every_command_declares_its_inputs_and_outputs():
    from slab.pipeline.cli import COMMANDS, _module

    for name in COMMANDS:
        assert hasattr(_module(name), "paths"), name


# ---------------------------------------------------------------------------------------------
# Full and read-only disks


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, capfd):
    source = _volume(tmp_path / "big.nii", shape=(64, 64, 64))  # 1 MiB of float32, uncompressed output
    with tmpfs(tmp_path / "full", "256k") as full:
        assert main(["convert", str(source), str(full / "out.nii")]) == 2
        line = _one_error_line(capfd)
        assert "out.nii" in line and "no space left" in line
        assert _tree(full) == []


def test_a_full_disk_while_training_or_cross_validating_is_one_line(tmp_path, capfd):
    """torch.save on a full disk fails as a RuntimeError around the OSError: one line naming the
    run's checkpoint, and the half-written epoch folder removed."""
    import json

    from test_train import TINY, write_datalist

    datalist = write_datalist(tmp_path / "data")
    cfg = {**json.loads(json.dumps(TINY)), "epochs": 1, "samples_per_epoch": 8,
           "network": {"name": "unet", "channels": [32, 64, 128], "strides": [2, 2]}}  # ~0.5 MB of weights
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    with tmpfs(tmp_path / "full", "600k") as full:
        assert main(["train", "--datalist", str(datalist), "--config", str(tmp_path / "c.json"), "--out",
                     str(full / "run"), "--device", "cpu"]) == 2
        line = _one_error_line(capfd)
        assert "run/last.pt" in line and "no space left" in line
        assert list((full / "run" / "states").iterdir()) == []


def test_a_read_only_folder_is_refused_before_any_work(tmp_path, capfd):
    source = _volume(tmp_path / "image.nii.gz")
    with tmpfs(tmp_path / "ro", "1m", readonly=True) as ro:
        assert main(["convert", str(source), str(ro / "out.nii.gz")]) == 2
        assert "read-only" in _one_error_line(capfd)


def test_a_full_tmpdir_during_on_disk_accumulation_is_an_error_not_a_bus_error(tmp_path, model, capfd,
                                                                                monkeypatch):
    source = _volume(tmp_path / "image.nii", shape=(64, 64, 48))  # 786 KiB accumulators per plane
    with tmpfs(tmp_path / "tmp", "300k") as full:
        monkeypatch.setattr(tempfile, "tempdir", str(full))
        code = main(["predict", "-i", str(source), "-o", str(tmp_path / "mask.nii.gz"), "--memory-budget", "0.0001",
                     "--axes", "xy,zx"] + model)
        assert code == 2
        line = _one_error_line(capfd)
        assert "no space left" in line and str(full) in line
        assert _tree(full) == []
    assert not (tmp_path / "mask.nii.gz").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".mask")]


# ---------------------------------------------------------------------------------------------
# Signals and stale temporaries


def _start_predict(tmp_path: Path, model) -> tuple[subprocess.Popen, Path, Path]:
    source = _volume(tmp_path / "image.nii", shape=(96, 96, 96))
    private = tmp_path / "tmp"
    private.mkdir()
    out = tmp_path / "out" / "mask.nii.gz"
    env = {**os.environ, "TMPDIR": str(private), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "slab.pipeline.cli", "predict", "-i", str(source), "-o", str(out), "--tta", "flips",
               "--memory-budget", "0.001"] + model
    # the child takes SIGINT as Python's default (KeyboardInterrupt) whatever this process does with it
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.default_int_handler))
    deadline = time.monotonic() + 120
    while not list(private.glob("slab-infer-*/sum.npy")):  # the on-disk accumulators are being written
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.02)
    time.sleep(0.2)
    assert process.poll() is None, ("finished before the signal", process.communicate())
    return process, private, out


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_mid_run_removes_everything_it_was_writing(tmp_path, model, signum, code):
    process, private, out = _start_predict(tmp_path, model)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    assert len(err.strip().splitlines()) == 1 and "nothing half-written" in err, err
    assert _tree(private) == []
    assert not out.parent.exists() or _tree(out.parent) == []


def test_stale_temporaries_of_dead_runs_are_swept(tmp_path):
    dead = 2 ** 22 + 12345  # above any pid this machine hands out
    stale = [tmp_path / f"slab-infer-{dead}-abcd", tmp_path / f".mask.nii.gz.slab-{dead}-x.tmp"]
    alive = [tmp_path / "slab-infer-1-abcd", tmp_path / f"slab-predict-{os.getpid()}-q", tmp_path / "user-folder"]
    for folder in stale + alive:
        folder.mkdir()
        (folder / "sum.npy").write_bytes(b"\0" * 8)
    sweep_stale(tmp_path)
    assert [p.exists() for p in stale] == [False, False]
    assert all(p.exists() for p in alive)
    with temp_dir("infer", tmp_path) as made:  # temp_dir sweeps first, then removes its own
        assert made.name.startswith(f"slab-infer-{os.getpid()}-")
        stale[0].mkdir()
    assert not made.exists()


def test_atomic_write_cleans_up_on_failure_and_names_the_target(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_write(tmp_path / "out.csv") as tmp:
            tmp.write_text("half", encoding="utf-8")
            raise RuntimeError("boom")
    assert _tree(tmp_path) == []
    (tmp_path / "afile").write_text("x", encoding="utf-8")
    with pytest.raises(SlabError, match="out.csv: cannot write"):
        with atomic_write(tmp_path / "afile" / "out.csv"):
            pass


# ---------------------------------------------------------------------------------------------
# Several volumes: all checked before the first is written


def test_a_bad_third_volume_fails_before_the_first_is_written(tmp_path, model, capfd):
    cases = tmp_path / "cases"
    _volume(cases / "a.nii.gz", seed=1)
    _volume(cases / "b.nii.gz", seed=2)
    (cases / "c.nii.gz").write_bytes(b"not a volume")
    assert main(["predict", "-i", str(cases), "-o", str(tmp_path / "masks"), "--rle-csv", str(tmp_path / "s.csv")]
                + model) == 2
    assert "c.nii.gz" in _one_error_line(capfd)
    assert not (tmp_path / "masks").exists() and not (tmp_path / "s.csv").exists()
    (cases / "c.nii.gz").unlink()
    nib.save(nib.Nifti1Image(np.zeros((12, 10, 8, 2), np.float32), np.eye(4)), cases / "c.nii.gz")
    assert main(["predict", "-i", str(cases), "-o", str(tmp_path / "masks")] + model) == 2
    assert "c.nii.gz: 2 channel(s)" in _one_error_line(capfd)
    assert not (tmp_path / "masks").exists()


def test_demo_checks_every_pair_before_writing(tmp_path, capfd):
    from slab.pipeline.bundle import DATA_DIR

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(DATA_DIR / "vessel_phantom" / "image.nii.gz", data / "image_a.nii.gz")
    shutil.copy(DATA_DIR / "vessel_phantom" / "label.nii.gz", data / "label_a.nii.gz")
    _volume(data / "image_b.nii.gz")
    shutil.copy(DATA_DIR / "vessel_phantom" / "label.nii.gz", data / "label_b.nii.gz")
    assert main(["demo", "--data", str(data), "--out", str(tmp_path / "demo"), "--planes", "xy", "--tta", "none"]) == 2
    assert "label_b.nii.gz" in _one_error_line(capfd)
    assert not (tmp_path / "demo").exists()


# ---------------------------------------------------------------------------------------------
# Training checkpoints


def _datalist(root: Path) -> Path:
    from slab.pipeline.data.phantom import write_phantom

    items = []
    for i in range(2):
        image, label = write_phantom(root / f"c{i}", shape=(16, 16, 16), seed=i)
        items.append({"image": str(image), "label": str(label)})
    path = root / "datalist.json"
    path.write_text(json.dumps({"training": items[:1], "validation": items[1:]}), encoding="utf-8")
    return path


class Killed(BaseException):
    """A kill, as the process would see it: not an Exception, so nothing handles it on the way."""


CONFIG = {"epochs": 3, "batch_size": 4, "samples_per_epoch": 8, "planes": ["xy"], "progress": False,
          "network": {"name": "unet", "channels": [4, 8], "strides": [2]}, "val": {"thresholds": [0.5]}}


def test_a_crash_between_the_two_checkpoint_writes_cannot_split_them(tmp_path, monkeypatch):
    import slab.pipeline.training.state as train_module
    from slab.pipeline.training import load_checkpoint, train

    datalist = _datalist(tmp_path / "data")
    straight = train(datalist, CONFIG, tmp_path / "straight", device="cpu")
    real = train_module.fsynced_save

    def crash_after_last_of_epoch_2(state, path):
        real(state, path)
        if state["epoch"] == 2 and path.name == "last.pt":
            raise Killed  # killed between last.pt and best.pt of epoch 2

    monkeypatch.setattr(train_module, "fsynced_save", crash_after_last_of_epoch_2)
    with pytest.raises(Killed):
        train(datalist, CONFIG, tmp_path / "run", device="cpu")
    run = tmp_path / "run"
    last, best = load_checkpoint(run / "last.pt"), load_checkpoint(run / "best.pt")
    assert last["epoch"] == 1 and best["epoch"] == last["best"]["epoch"] == 1  # the epoch-1 pair, whole
    assert len(list((run / "states").iterdir())) == 1
    monkeypatch.setattr(train_module, "fsynced_save", real)
    resumed = train(datalist, CONFIG, run, resume=True, device="cpu")
    assert resumed["best"] == straight["best"]
    for key, value in load_checkpoint(tmp_path / "straight" / "best.pt")["model"].items():
        assert torch.equal(value, load_checkpoint(run / "best.pt")["model"][key]), key


def test_resume_refuses_checkpoints_that_disagree(tmp_path):
    from slab.pipeline.training import train

    datalist = _datalist(tmp_path / "data")
    run = tmp_path / "run"
    train(datalist, {**CONFIG, "epochs": 2}, run, device="cpu")
    best = torch.load(run / "best.pt", weights_only=True)
    (run / "best.pt").unlink()
    torch.save({**best, "epoch": 7}, run / "best.pt")  # a best.pt from elsewhere
    with pytest.raises(SlabError, match="best.pt is from epoch 7, but .*last.pt records epoch"):
        train(datalist, {**CONFIG, "epochs": 3}, run, resume=True, device="cpu")
