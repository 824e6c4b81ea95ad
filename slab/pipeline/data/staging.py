"""Where a dataset adapter writes what it converts (:class:`Staging`), and the checks every
adapter makes of the folders and files it expects."""
from __future__ import annotations

from pathlib import Path

from slab.core.errors import SlabError
from slab.io.volumes import natural_key, save_volume


class Staging:
    """Where an adapter writes what it converts: into a staging folder that becomes
    ``out_dir/volumes`` only when the whole dataset has converted. Paths it returns are final."""

    def __init__(self, staging: Path, final: Path):
        self.staging, self.final = staging, final
        self.skipped: list[dict] = []  # cases left out, with the reason
        self.meta: dict = {}  # what the dataset itself declares (labels, modality) over the kind's defaults

    def save(self, volume, relative: str, affine=None) -> str:
        """Write ``volume`` at ``volumes/<relative>``; its final absolute path."""
        save_volume(volume, self.staging / relative, affine=affine)
        return str(self.final / relative)

    def link(self, files: list[Path], relative: str) -> str:
        """A folder ``volumes/<relative>`` of links to ``files`` (slices another volume owns)."""
        folder = self.staging / relative
        folder.mkdir(parents=True)
        for path in files:
            (folder / path.name).symlink_to(Path(path).resolve())
        return str(self.final / relative)

    def skip(self, case: str, reason: str) -> None:
        self.skipped.append({"case": case, "reason": reason})


def natural_order(paths):
    return sorted(paths, key=lambda p: natural_key(p.name))


def subdirs(directory: Path) -> list[Path]:
    return natural_order(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise SlabError(f"{path}: missing; expected {what}")
    return path


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise SlabError(f"{path}: missing; expected {what}")
    return path


__all__ = ["Staging"]
