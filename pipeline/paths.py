"""Where this installation keeps its shipped files: the repository root, the bundles and the
embedded sample data (standard library only, so that ``slab COMMAND --help`` stays light)."""
from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLES_DIR = REPO_ROOT / "bundles"
DATA_DIR = REPO_ROOT / "data"


def sample_dir(name: str) -> str:
    """``data/<name>``, the embedded sample data of this installation."""
    return str(DATA_DIR / name)
