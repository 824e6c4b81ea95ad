"""Model folders: where a trained model lives and what names it. A model is a checkpoint file, a
training run directory (its ``best.pt``), a model directory holding ``model.json`` (``slab cv``'s
output, ``slab install``'s: its members and the post-processing chosen on the out-of-fold
predictions), or the name of an installed model under :func:`models_home`."""
from __future__ import annotations

import os
from pathlib import Path

from slab.core.checks import read_json_object
from slab.core.errors import SlabError


MODEL_FILE = "model.json"


def models_home() -> Path:
    """Where ``slab install`` puts models: ``$SLAB_HOME/models`` (default ``~/.cache/slab/models``)."""
    home = os.environ.get("SLAB_HOME")
    return (Path(home) if home else Path.home() / ".cache" / "slab") / "models"


def resolve_model(name) -> Path:
    """A model path: a checkpoint file, a run directory (its ``best.pt``), a model directory
    (``model.json``), or the name of an installed model."""
    path = Path(name)
    if path.is_file():
        return path
    if path.is_dir():
        for candidate in (path / MODEL_FILE, path / "best.pt"):
            if candidate.is_file():
                return candidate
        raise SlabError(f"--model: {path} holds neither {MODEL_FILE} (slab cv, slab install) nor best.pt "
                        "(a training run)")
    installed = models_home() / str(name)
    if "/" not in str(name) and (installed / MODEL_FILE).is_file():
        return installed / MODEL_FILE
    raise SlabError(f"--model: {name} is not a checkpoint, a run or model directory, or an installed model "
                    f"(in {models_home()})")


def read_model_file(path) -> dict:
    """A ``model.json``, checked: ``members`` (a list of ``{"configuration", "checkpoint"}`` with
    paths relative to its folder), optional ``postprocess`` and ``tta``."""
    path = Path(path)
    data = read_json_object(path, "model file")
    members = data.get("members")
    if not isinstance(members, list) or not members or not all(
            isinstance(m, dict) and isinstance(m.get("checkpoint"), str) for m in members):
        raise SlabError(f"{path}: expected 'members', a list of objects with a 'checkpoint' path")
    for m in members:
        target = (path.parent / m["checkpoint"]).resolve()
        if not target.is_relative_to(path.parent.resolve()):
            raise SlabError(f"{path}: member {m['checkpoint']} lies outside the model's folder")
        if not target.is_file():
            raise SlabError(f"{path}: member checkpoint {m['checkpoint']} not found")
    if not isinstance(data.get("postprocess", {}), dict):
        raise SlabError(f"{path}: 'postprocess' must be an object")
    from slab.pipeline.model.spec import check_probability_thresholds
    from slab.transforms.post import make_postprocess

    try:
        make_postprocess(data.get("postprocess") or {})
        check_probability_thresholds(data.get("postprocess") or {})
    except SlabError as err:
        raise SlabError(f"{path}: {err}") from None
    return data
