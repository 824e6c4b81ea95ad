"""What a user points slab at, as the cases (volumes) to process and where their results go.

An input is one of:

- one volume: a file (``.nii[.gz]``, ``.nrrd``, ``.mha``, ``.h5``, a multi-page ``.tif``...), a
  ``.zarr`` store, a slice directory or a DICOM series directory;
- several files: the channels of one volume (BraTS's four contrasts, in the order given);
- a case folder: a folder holding ``images/`` (SenNet's ``kidney_5/images``), named by the folder;
- a directory of volumes: volume files (multi-page TIFFs among them), zarr stores, slice or
  DICOM folders and case folders, and nnU-Net's
  channel files ``{case}_{XXXX}.nii.gz`` grouped into one case each (every volume file of the
  directory named so). Other files (a README, a sample submission) are left alone.

A slice folder called ``images`` or ``scans`` takes its parent's name (``kidney_5``,
``case123_day20``), so that RLE row ids come out as the competitions write them:
``kidney_5_0000`` (SenNet) and ``case123_day20_slice_0001`` (UW-Madison, numbers from the scans'
file names).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from slab.core.errors import SlabError
from slab.io.tiff import multipage_tiff
from slab.io.common import SLICE_SUFFIXES, STEM_SUFFIXES, VOLUME_SUFFIXES, natural_key, suffix_of
from slab.io.stacks import UWMGI_SCAN

_NNUNET = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_GENERIC_FOLDERS = ("images", "scans")


@dataclass(frozen=True)
class Case:
    """One volume to process: ``name`` (the case id), ``source`` (what ``load_volume`` takes: a
    path, or a list of paths for channels) and ``output_name`` (its result's name in an output
    directory: a file keeps its name, a slice folder becomes a slice stack, a DICOM series or a
    group of channels a ``.nii.gz``)."""

    name: str
    source: str | list[str]
    output_name: str
    slice_files: list[str] = field(default_factory=list, compare=False)

    def row_ids(self, depth: int, prefix: str | None = None) -> list[str]:
        """RLE row ids of the ``depth`` slices: UW-Madison's ``{case_day}_slice_{number:04d}`` when
        the slices are its scans, else ``{prefix or name}_{z:04d}`` (SenNet)."""
        name = prefix or self.name
        numbers = [UWMGI_SCAN.match(Path(f).name) for f in self.slice_files]
        if numbers and all(numbers) and len(numbers) == depth:
            return [f"{name}_slice_{int(m[1]):04d}" for m in numbers]
        return [f"{name}_{z:04d}" for z in range(depth)]


def stem(path: Path) -> str:
    """A file's name without its volume suffix (``case_0000.nii.gz`` -> ``case_0000``)."""
    name = Path(path).name
    suffix = suffix_of(Path(name))
    return name[: -len(suffix)] if suffix in STEM_SUFFIXES else name


def _visible(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=lambda p: natural_key(p.name))


def folder_kind(folder: Path) -> str:
    """``"zarr"`` (a zarr store or N5 container), ``"stack"`` (slices), ``"dicom"`` (a series), ``"case"`` (holds
    ``images/``) or ``"collection"`` (also a folder of multi-page TIFF volumes)."""
    from slab.io.zarr import is_zarr
    from slab.io.n5 import is_n5

    if is_zarr(folder) or is_n5(folder):
        return "zarr"
    entries = _visible(folder)
    files = [p for p in entries if p.is_file()]
    slices = [p for p in files if suffix_of(p) in SLICE_SUFFIXES]
    if slices:
        return "collection" if multipage_tiff(slices[0]) else "stack"
    if any(suffix_of(p) == ".dcm" or (not p.suffix and p.name.upper() != "DICOMDIR") for p in files):
        from slab.io.stacks import directory_kind

        try:
            if directory_kind(folder)[0] == "dicom":
                return "dicom"
        except SlabError:
            pass
    if (folder / "images").is_dir() and folder_kind(folder / "images") in ("stack", "dicom"):
        return "case"
    return "collection"


def _folder_name(folder: Path) -> str:
    return folder.parent.name if folder.name.lower() in _GENERIC_FOLDERS and folder.parent.name else folder.name


def _slices(folder: Path) -> list[str]:
    return [str(p) for p in _visible(folder) if p.is_file() and suffix_of(p) in SLICE_SUFFIXES]


def _volume_case(path: Path) -> Case:
    """A file, slice folder, DICOM folder or case folder as one case."""
    if path.is_file() or not path.exists():  # a file, or an HDF5 file's dataset (scan.h5/raw)
        return Case(stem(path), str(path), path.name)
    kind = folder_kind(path)
    if kind == "zarr":
        return Case(stem(path), str(path), path.name)
    if kind == "case":
        images = path / "images"
        return Case(path.name, str(images), path.name, _slices(images))
    if kind == "stack":
        name = _folder_name(path)
        return Case(name, str(path), name, _slices(path))
    if kind == "dicom":
        return Case(_folder_name(path), str(path), _folder_name(path) + ".nii.gz")
    raise SlabError(f"{path}: a directory of volumes where one volume is expected")


def _channels(name: str, files: list[Path]) -> Case:
    """nnU-Net's ``{case}_0000 .. {case}_{C-1}`` files as one case, channels in index order."""
    indexed = sorted(((int(_NNUNET.match(stem(f))["channel"]), f) for f in files), key=lambda t: t[0])
    indices = [i for i, _ in indexed]
    if indices != list(range(len(indices))):
        raise SlabError(f"{files[0].parent}: case {name} has channels {', '.join(f'{i:04d}' for i in indices)}; "
                        "expected _0000, _0001, ... without gaps (nnU-Net naming)")
    suffixes = {suffix_of(f) for _, f in indexed}
    return Case(name, [str(f) for _, f in indexed], name + (suffixes.pop() if len(suffixes) == 1 else ".nii.gz"))


def _collection(folder: Path) -> list[Case]:
    entries = _visible(folder)
    volumes = [p for p in entries if p.is_file() and (suffix_of(p) in VOLUME_SUFFIXES or multipage_tiff(p))]
    cases: list[Case] = []
    if volumes and all(_NNUNET.match(stem(p)) for p in volumes):
        groups: dict[str, list[Path]] = {}
        for path in volumes:
            groups.setdefault(_NNUNET.match(stem(path))["case"], []).append(path)
        cases += [_channels(name, files) for name, files in groups.items()]
    else:
        cases += [Case(stem(p), str(p), p.name) for p in volumes]
    for sub in (p for p in entries if p.is_dir()):
        kind = folder_kind(sub)
        if kind == "collection":
            raise SlabError(f"{sub}: neither slices, a DICOM series nor a case folder with images/; "
                            f"give it as its own input, or move it out of {folder}")
        cases.append(_volume_case(sub))
    if not cases:
        raise SlabError(f"{folder}: holds no volumes (volume files, slice or DICOM folders, or case folders "
                        "with images/)")
    names = [c.output_name for c in cases]
    clash = next((n for n in names if names.count(n) > 1), None)
    if clash:
        raise SlabError(f"{folder}: two inputs would both write {clash}; rename one")
    return cases


def find_cases(inputs) -> tuple[bool, list[Case]]:
    """``(collection, cases)`` for the input path(s) a user gave (see the module docs).

    ``collection`` is true for a directory of volumes: its results go into an output directory
    under each case's ``output_name``; otherwise there is one case and its result goes to the
    output path itself.
    """
    paths = [Path(p) for p in ([inputs] if isinstance(inputs, (str, Path)) else list(inputs))]
    if not paths:
        raise SlabError("input: no input given")
    from slab.io.hdf5 import split_hdf5

    for path in paths:
        inside = split_hdf5(path)
        if not path.exists() and not (inside and inside[0].is_file()):
            raise SlabError(f"{path}: no such file or directory")
    if len(paths) > 1:
        for path in paths:
            if path.is_dir() and folder_kind(path) == "collection":
                raise SlabError(f"{path}: a directory of volumes; several inputs are the channels of one volume")
        matches = [_NNUNET.match(stem(p)) if p.is_file() else None for p in paths]
        names = {m["case"] for m in matches if m}
        name = names.pop() if len(names) == 1 and all(matches) else stem(paths[0]) if paths[0].is_file() \
            else _folder_name(paths[0])
        return False, [Case(name, [str(p) for p in paths], name + ".nii.gz")]
    path = paths[0]
    if path.is_dir() and folder_kind(path) == "collection":
        return True, _collection(path)
    return False, [_volume_case(path)]


__all__ = ["Case", "find_cases", "folder_kind", "stem"]
