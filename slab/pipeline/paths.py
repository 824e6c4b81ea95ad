"""Where this installation keeps its shipped files: the MONAI bundles and the embedded sample
data, found through the import system (standard library only, so that ``slab COMMAND --help``
stays light).

The repository keeps them in ``bundles/`` and ``data/`` at its root; ``setup.cfg`` installs them
as the package data of ``slab.bundles`` and ``slab.data``, so a wheel carries them and an editable
install maps the two names to the repository's folders. They are never looked up relative to the
working directory.
"""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def _package_folder(package: str) -> Path:
    folder = Path(str(files(package)))
    if not folder.is_dir():  # a zipped or otherwise virtual installation
        raise RuntimeError(f"{package}: the installation's shipped files are not a folder on disk ({folder})")
    return folder


BUNDLES_DIR = _package_folder("slab.bundles")
DATA_DIR = _package_folder("slab.data")


def shipped_bundles() -> list[str]:
    """The names of the bundles this installation ships (``vessel_2p5d``, ...)."""
    return sorted(p.name for p in BUNDLES_DIR.iterdir() if (p / "configs" / "metadata.json").is_file())


def bundle_dir(bundle) -> Path:
    """A bundle given as a folder, or as the name of a shipped bundle (``vessel_2p5d``) where no
    folder of that name exists: a user of the installed package need not know where it lives."""
    path = Path(bundle)
    if not path.exists() and path.name == str(bundle) and (BUNDLES_DIR / path.name / "configs").is_dir():
        return BUNDLES_DIR / path.name
    return path


def sample_dir(name: str) -> str:
    """``data/<name>``, the embedded sample data of this installation."""
    return str(DATA_DIR / name)
