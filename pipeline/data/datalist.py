"""Decathlon-style datalists: read, checked field by field, paths resolved and checked to exist.

:func:`load_datalist` reads a ``datalist.json`` (``training`` and ``validation`` lists of
``{"image": ..., "label": ..., "fold": k}``), resolves paths against the file's folder and
checks that every file exists. With ``fold=k`` the items of fold ``k`` (from both lists) are
the validation set and all others the training set; adapters assign folds by case, so no
case lands on both sides.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from slab.transforms.checks import read_json_object
from slab.transforms.errors import SlabError


PATH_KEYS = ("image", "label")


def _item_problem(item, split: str, i: int) -> str | None:
    """What is wrong with one datalist item, or None."""
    where = f"{split}[{i}]"
    if not isinstance(item, Mapping):
        return f"{where} is not an object with an 'image'"
    if "image" not in item:
        return f"{where} has no 'image'"
    image = item["image"]
    paths = image if isinstance(image, list) else [image]
    if not paths or not all(isinstance(p, str) and p.strip() for p in paths):
        return f"{where} 'image' is {image!r}; expected a file path or a list of paths (channels)"
    if "label" in item and not (isinstance(item["label"], str) and item["label"].strip()):
        return f"{where} 'label' is {item['label']!r}; expected a file path"
    fold = item.get("fold", 0)
    if isinstance(fold, bool) or not isinstance(fold, int) or fold < 0:
        return f"{where} 'fold' is {fold!r}; expected an integer >= 0"
    if "case" in item and not isinstance(item["case"], (str, int)) or isinstance(item.get("case"), bool):
        return f"{where} 'case' is {item['case']!r}; expected a name"
    if "targets" in item and not (isinstance(item["targets"], Mapping) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in item["targets"].values())):
        return f"{where} 'targets' is {item['targets']!r}; expected an object of 0/1 values"
    return None


def check_datalist(data, name: str) -> None:
    """SlabError naming the datalist and the first bad item or field: lists of objects with an
    ``image`` (a path or a list of paths), optional ``label`` (a path), ``fold`` (an integer
    >= 0), ``case``, ``targets``; ``n_folds`` a positive integer; ``labels`` a list of names."""
    if not isinstance(data, Mapping) or not isinstance(data.get("training"), list):
        raise SlabError(f"{name}: expected a JSON object with a 'training' list")
    if not isinstance(data.get("validation", []), list):
        raise SlabError(f"{name}: 'validation' must be a list")
    for split in ("training", "validation"):
        for i, item in enumerate(data.get(split, [])):
            problem = _item_problem(item, split, i)
            if problem:
                raise SlabError(f"{name}: {problem}")
    if "n_folds" in data:
        n = data["n_folds"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise SlabError(f"{name}: 'n_folds' is {n!r}; expected a positive integer")
        folds = [int(item.get("fold", 0)) for split in ("training", "validation") for item in data.get(split, [])]
        if folds and max(folds) >= n:
            raise SlabError(f"{name}: an item has fold {max(folds)}, but 'n_folds' is {n}")
    labels = data.get("labels")
    if labels is not None and not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
        raise SlabError(f"{name}: 'labels' is {labels!r}; expected a list of names")
    if not isinstance(data.get("label_format", "channels"), str):
        raise SlabError(f"{name}: 'label_format' must be channels or values")


def _resolve(value, base: Path | None, name: str, datalist_name: str = ""):
    if isinstance(value, (list, tuple)):
        return [_resolve(v, base, name, datalist_name) for v in value]
    if not isinstance(value, (str, Path)):
        return value  # already an array or tensor
    path = Path(value).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    if not path.exists():
        raise SlabError(f"{path}: {name} file listed in the datalist {datalist_name} does not exist")
    return str(path)


def datalist_paths(datalist) -> list[str]:
    """Every image and label path a datalist file lists, resolved against its folder (for the
    check that no output overwrites them); an unreadable datalist lists none (its load says why)."""
    path = Path(datalist)
    try:
        data = read_json_object(path, "datalist")
        check_datalist(data, str(path))
    except SlabError:
        return []
    found = []
    for item in data.get("training", []) + data.get("validation", []):
        for key in PATH_KEYS:
            values = item.get(key, [])
            for value in values if isinstance(values, list) else [values]:
                candidate = Path(value).expanduser()
                found.append(str(candidate if candidate.is_absolute() else path.parent / candidate))
    return found


def load_datalist(datalist, fold: int | None = 0, base_dir=None) -> tuple[list[dict], list[dict]]:
    """``(training, validation)`` items of a Decathlon-style datalist, paths resolved and checked.

    Parameters
    ----------
    datalist : path to a JSON file, or the parsed dict
        ``{"training": [{"image": ..., "label": ..., "fold": k}, ...], "validation": [...]}``
        as ``slab dataset`` writes it (fold 0 in ``validation``); ``image`` may be a list of
        files (channels).
    fold : int or None
        ``k``: every item whose ``fold`` is ``k`` (from both lists) is validation, every other
        item training (``slab.pipeline.data.adapters.split_datalist``). A datalist whose items carry no
        ``fold`` has only its own split, fold 0. None: the file's own two lists.
    base_dir : folder relative paths are resolved against (default the datalist's folder, or the
        working directory for a dict).

    Returns
    -------
    (list of dict, list of dict)
        Copies of the items with absolute ``image``/``label`` paths, every file checked to exist.
    """
    path = None
    if isinstance(datalist, Mapping):
        data = datalist
    else:
        path = Path(datalist)
        data = read_json_object(path, "datalist")
    name = str(path) if path is not None else "datalist"
    check_datalist(data, name)
    validation = data.get("validation", [])
    base = Path(base_dir) if base_dir is not None else (path.parent if path is not None else None)

    def resolved(items: list, split: str) -> list[dict]:
        out = []
        for i, item in enumerate(items):
            if not isinstance(item, Mapping) or "image" not in item:
                raise SlabError(f"{name}: {split}[{i}] is not an object with an 'image'")
            entry = dict(item)
            for key in PATH_KEYS:
                if key in entry:
                    entry[key] = _resolve(entry[key], base, key, name)
            out.append(entry)
        return out

    training, validation = resolved(data["training"], "training"), resolved(validation, "validation")
    if fold is None:
        return training, validation
    if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)):
        raise SlabError(f"fold: expected an integer, got {fold!r}")
    pool = training + validation
    with_fold = [item for item in pool if "fold" in item]
    if not with_fold and int(fold) == 0:
        return training, validation
    if not pool:
        raise SlabError(f"{name}: no items to split into folds")
    if len(with_fold) != len(pool):
        raise SlabError(f"{name}: fold {fold} needs a 'fold' on every item; some items have none")
    from slab.pipeline.data.adapters import split_datalist

    n_folds = int(data.get("n_folds", max(int(item["fold"]) for item in pool) + 1))
    return split_datalist({"n_folds": n_folds, "training": training, "validation": validation}, int(fold))



__all__ = ["PATH_KEYS", "check_datalist", "datalist_paths", "load_datalist"]
