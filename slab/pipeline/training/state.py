"""What makes a run reproducible and resumable: seeds and RNG states, checkpoints read with
``weights_only=True``, and the epoch's ``last.pt`` / ``best.pt`` pair switched in one atomic step.

Determinism. Every random draw of an epoch comes from ``(seed, epoch)``: the global RNGs are
re-seeded at the start of each epoch and every training sample ``i`` of epoch ``e`` is drawn
under its own seed ``(seed, e, i)``. A sample is therefore the same whatever the number of
loader workers or processes, and a run resumed from ``last.pt`` at an epoch boundary repeats the
uninterrupted run exactly.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from slab.pipeline.model.checkpoints import load_checkpoint
from slab.pipeline.training.config import RUNTIME_KEYS
from slab.core.errors import SlabError
from slab.core.outputs import writing


# What a run directory holds (outputs that must not overwrite an input such as the datalist);
# last.pt, best.pt and state are links into states/.
RUN_FILES = ("config.json", "network.json", "states", "log.csv", "curves.png", "tensorboard", "report.html", "report")


def derive_seed(*parts: int) -> int:
    """A 31-bit seed from integers (e.g. ``seed, epoch, index``), stable across runs and machines."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy, torch (CPU and CUDA) and MONAI's ``set_determinism`` (cuDNN deterministic)."""
    from monai.utils import set_determinism

    set_determinism(seed=seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block under ``seed`` for Python, NumPy and torch (CPU), then restore the outer states.

    A sample drawn inside depends on ``seed`` alone, not on what was drawn before it, in which
    process or in which loader worker. Only the CPU generator of torch is seeded (the one
    ``fork_rng(devices=[])`` restores): ``torch.manual_seed`` would also reseed every CUDA device
    for good, and its lazy CUDA/XPU calls format a stack trace each time (0.7 ms a sample).
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)
        torch.default_generator.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def rng_states() -> dict:
    """The global RNG states, in a form ``torch.load(weights_only=True)`` reads back."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]) + [random.getstate()[0]],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state: dict) -> None:
    """Restore what :func:`rng_states` saved."""
    *internal, version = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), None))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict) -> Path:
    """``torch.save`` through ``atomic_write``: an interrupted save never leaves a broken file."""
    from slab.core.outputs import atomic_write

    with atomic_write(path) as tmp:
        torch.save(state, tmp)
    return path


def fsynced_save(state: dict, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def _link(target: str, link: Path) -> None:
    """Point the symbolic link ``link`` at ``target`` in one step (a temporary link renamed over it)."""
    staged = link.with_name(f".{link.name}.slab-{os.getpid()}-link")
    staged.unlink(missing_ok=True)
    os.symlink(target, staged)
    os.replace(staged, link)


def save_epoch_state(out: Path, last: dict, best: dict | None) -> None:
    """Write one epoch's ``last.pt`` and ``best.pt`` so that they change together, atomically.

    Both go into a new folder ``states/epoch_NNNNN.*/`` (``best.pt`` hard-linked from the current
    state when the best did not change; no copy), which one rename of the symbolic link ``state``
    makes current. ``RUN/last.pt`` and ``RUN/best.pt`` are links into ``state/``, so a reader, a
    crash or a kill at any moment sees either the old pair or the new pair, never one of each.
    Older state folders are removed afterwards.
    """
    states = out / "states"
    with writing(states):
        states.mkdir(parents=True, exist_ok=True)
        current = (out / "state").resolve() if (out / "state").is_symlink() else None
        new = Path(tempfile.mkdtemp(prefix=f"epoch_{int(last['epoch']):05d}.", dir=states))
    try:
        with writing(out / "last.pt"):  # a full disk is one line; the previous pair stays current
            fsynced_save(last, new / "last.pt")
            if best is not None:
                fsynced_save(best, new / "best.pt")
            elif current is not None and (current / "best.pt").is_file():
                os.link(current / "best.pt", new / "best.pt")
            elif (out / "best.pt").is_file() and not (out / "best.pt").is_symlink():  # a run from before states/
                shutil.copy2(out / "best.pt", new / "best.pt")
            _link(os.path.relpath(new, out), out / "state")
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    for name in ("last.pt", "best.pt"):
        if not (out / name).is_symlink():
            _link(os.path.join("state", name), out / name)
    for folder in states.iterdir():
        if folder != new:
            shutil.rmtree(folder, ignore_errors=True)


def check_epoch_state(out: Path, last: dict) -> None:
    """``--resume``'s check that ``best.pt`` is the best epoch ``last.pt`` records."""
    epoch = (last.get("best") or {}).get("epoch")
    best_path = out / "best.pt"
    if epoch is None:
        return
    if not best_path.is_file():
        raise SlabError(f"--resume: {best_path} is missing, but {out / 'last.pt'} records epoch {epoch} as the best")
    best = load_checkpoint(best_path)
    if best.get("epoch") != epoch:
        raise SlabError(f"--resume: {best_path} is from epoch {best.get('epoch')}, but {out / 'last.pt'} records "
                        f"epoch {epoch} as the best; the run's checkpoints disagree")


def config_differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every value that differs (runtime-only keys ignored)."""
    out = []
    for key in sorted(set(a) | set(b)):
        if not prefix and key in RUNTIME_KEYS:
            continue
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict) and key not in ("network", "normalize", "augment"):
            out += config_differences(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {json.dumps(va)} -> {json.dumps(vb)}")
    return out

