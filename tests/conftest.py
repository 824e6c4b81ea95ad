"""Shared test set-up: tiny volumes, one thread per worker, no display.

The tests are laid out by room, as the library is (``tests/io/`` for ``slab/io/``,
``tests/pipeline/inference/`` for ``slab/pipeline/inference/``, ...); the whole-package checks
(layout, docs, wheel, bundles, bad inputs) stay at the top. Test modules share a few helpers by
module name across rooms (``from test_train import write_datalist``): every room is on the path.
"""
import os
import sys
from pathlib import Path

sys.path[:0] = sorted(str(p) for p in Path(__file__).parent.rglob("*") if p.is_dir() and p.name != "__pycache__")

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("PYVISTA_OFF_SCREEN", "true")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


TESTS = Path(__file__).parent


def pytest_collection_modifyitems(items):
    """The whole-package checks first (the documented commands, the bundles, the bad-input corpus:
    the longest tests), the rooms after: two workers then finish together instead of one waiting
    on the other's last long test."""
    items.sort(key=lambda item: item.path.parent != TESTS)
