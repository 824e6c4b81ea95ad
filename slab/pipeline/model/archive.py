"""Moving a trained model between machines: ``slab export MODEL model.zip`` packs the weights and
inference specs of its members (slim checkpoints: no optimizer, no RNG states), ``model.json``,
the post-processing, the plans and a fingerprint summary (no file paths); ``slab install
model.zip`` checks and unpacks it under :func:`slab.pipeline.model.folders.models_home`, after which
``slab predict --model NAME`` finds it. Checkpoints are read with ``weights_only=True``; archive
members are checked before anything is extracted (names inside the archive, sizes bounded)."""
from __future__ import annotations

import json
import shutil
import zipfile
import zlib
from pathlib import Path

import torch

from slab.pipeline.model.checkpoints import load_checkpoint
from slab.pipeline.model.folders import MODEL_FILE, models_home, read_model_file, resolve_model
from slab.pipeline.model.spec import spec_of_checkpoint, spec_of_state
from slab.core.errors import SlabError


MAX_MEMBER_BYTES = 8 << 30
MAX_ARCHIVE_BYTES = 16 << 30  # all members together, unpacked
SIDE_FILES = ("postprocessing.json", "plans.json")
COMPRESSIONS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)


def _fingerprint_summary(path: Path) -> dict | None:
    if not path.is_file():
        return None
    fp = json.loads(path.read_text(encoding="utf-8"))
    fp.pop("cases", None)  # per-case file paths stay on the machine that has the data
    return fp


def slim_state(path) -> dict:
    """What a model needs of a training checkpoint: its weights and inference spec (no
    optimizer, no RNG states, no history), for ``slab export``."""
    state = load_checkpoint(Path(path))
    return {"model": state["model"], "config": state["config"], "network": state["network"],
            "inference": spec_of_state(state, path), "epoch": state.get("epoch"),
            "threshold": state.get("threshold"), "metrics": state.get("metrics")}


def export_model(model, archive) -> dict:
    """Write ``archive`` (a zip) for ``model`` (a run, checkpoint or model directory); returns
    its ``model.json``."""
    from slab.core.outputs import atomic_write

    source = resolve_model(model)
    if source.name == MODEL_FILE:
        data = read_model_file(source)
        root = source.parent
        members = data["members"]
    else:
        root = source.parent
        members = [{"configuration": "run", "fold": None, "checkpoint": source.name}]
        # one run: its model's post-processing is the threshold its validation chose
        data = {"postprocess": spec_of_checkpoint(source).get("postprocess") or {}}
    out_members = []
    with atomic_write(archive) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for index, member in enumerate(members):
            name = f"members/{index:02d}_{member.get('configuration') or 'model'}_fold{member.get('fold')}.pt"
            staged = Path(str(tmp) + f".{index}.pt")
            try:
                torch.save(slim_state(root / member["checkpoint"]), staged)
                zf.write(staged, name)
            finally:
                staged.unlink(missing_ok=True)
            out_members.append({**member, "checkpoint": name})
        model_json = {**data, "members": out_members}
        zf.writestr(MODEL_FILE, json.dumps(model_json, indent=2) + "\n")
        for side in SIDE_FILES:
            if (root / side).is_file():
                zf.write(root / side, side)
        summary = _fingerprint_summary(root / "fingerprint.json")
        if summary is not None:
            zf.writestr("fingerprint.json", json.dumps(summary, indent=2) + "\n")
    return model_json


def _check_archive(zf: zipfile.ZipFile, archive, free: int) -> list[zipfile.ZipInfo]:
    """Every member's name, size, compression and encryption checked from the central directory,
    before anything is unpacked: names inside the model's folder, each member at most
    ``MAX_MEMBER_BYTES`` and all together at most ``MAX_ARCHIVE_BYTES`` and the ``free`` bytes of
    the disk, stored or deflated only, nothing encrypted."""
    infos = zf.infolist()
    names = {i.filename for i in infos}
    if MODEL_FILE not in names:
        raise SlabError(f"{archive}: not a slab model archive (no {MODEL_FILE})")
    total = 0
    for info in infos:
        parts = Path(info.filename).parts
        if info.filename.startswith("/") or ".." in parts or "\\" in info.filename or not parts:
            raise SlabError(f"{archive}: member {info.filename!r} would land outside the model's folder")
        if info.file_size > MAX_MEMBER_BYTES:
            raise SlabError(f"{archive}: member {info.filename} claims {info.file_size} bytes (more than 8 GiB)")
        if info.flag_bits & 0x1:
            raise SlabError(f"{archive}: member {info.filename} is encrypted; slab archives are not")
        if info.compress_type not in COMPRESSIONS:
            raise SlabError(f"{archive}: member {info.filename} uses zip compression {info.compress_type}; expected "
                            "stored or deflated (what slab export writes)")
        total += info.file_size
        if info.is_dir():
            continue
        if not (info.filename in (MODEL_FILE, "fingerprint.json", *SIDE_FILES)
                or (parts[0] == "members" and len(parts) == 2 and info.filename.endswith(".pt"))):
            raise SlabError(f"{archive}: unexpected member {info.filename!r}")
    if total > min(MAX_ARCHIVE_BYTES, free):
        raise SlabError(f"{archive}: its members unpack to {total} bytes, more than "
                        + ("16 GiB" if total > MAX_ARCHIVE_BYTES else f"the {free} bytes free for SLAB_HOME"))
    return infos


def _extract(zf: zipfile.ZipFile, infos: list[zipfile.ZipInfo], staging: Path, archive) -> None:
    """Unpack the checked members, each read no further than the size its header gives (a
    member whose data runs longer, or shorter, or fails its CRC is refused naming the archive)."""
    from slab.core.outputs import writing

    for info in infos:
        target = staging / info.filename
        if info.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with zf.open(info) as src, open(target, "wb") as dst, writing(target):
                left = info.file_size
                while left >= 0:
                    chunk = src.read(min(1 << 20, left + 1))
                    if not chunk:
                        break
                    left -= len(chunk)
                    if left < 0:
                        raise SlabError(f"{archive}: member {info.filename} holds more than the {info.file_size} "
                                        "bytes its header gives")
                    dst.write(chunk)
                if left > 0:
                    raise SlabError(f"{archive}: member {info.filename} holds less than the {info.file_size} bytes "
                                    "its header gives")
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, ValueError) as err:
            reason = " ".join(str(err).split())[:120] or type(err).__name__
            raise SlabError(f"{archive}: member {info.filename} is damaged ({reason})") from None


def install_model(archive, name: str | None = None, home=None, force: bool = False) -> Path:
    """Unpack ``archive`` into ``home/NAME`` (default: the archive's stem under
    :func:`models_home`) and check that the model loads as data; returns the folder."""
    from slab.core.outputs import temp_dir

    archive = Path(archive)
    name = name or archive.name.removesuffix(".zip")
    if not name or "/" in name or name.startswith("."):
        raise SlabError(f"--name: expected a plain folder name, got {name!r}")
    home = Path(home) if home is not None else models_home()
    target = home / name
    if target.is_symlink():  # --force would empty whatever the link points at
        raise SlabError(f"{target}: a link, not an installed model's folder; remove it or choose another --name")
    if target.exists() and not force:
        raise SlabError(f"{target}: a model of that name is installed; pass --force to replace it or --name another")
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as err:
        raise SlabError(f"{archive}: not a readable zip archive ({err})") from None
    home.mkdir(parents=True, exist_ok=True)
    with zf, temp_dir("install", home) as staging:
        infos = _check_archive(zf, archive, shutil.disk_usage(home).free)
        _extract(zf, infos, staging, archive)
        try:
            data = read_model_file(staging / MODEL_FILE)
            for member in data["members"]:
                spec_of_checkpoint(staging / member["checkpoint"])  # weights_only: data, not code
        except SlabError as err:  # name the archive, not the staging folder that is about to go
            raise SlabError(f"{archive}: {str(err).replace(str(staging) + '/', '')}") from None
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
        staging.mkdir()  # temp_dir removes its folder on the way out
    return target
