"""Decathlon-style datalists: read, checked field by field, paths resolved and checked to exist.

:func:`load_datalist` reads a ``datalist.json`` (``training`` and ``validation`` lists of
``{"image": ..., "label": ..., "fold": k}``), resolves paths against the file's folder and
checks that every file exists. With ``fold=k`` the items of fold ``k`` (from both lists) are
the validation set and all others the training set; adapters assign folds by case, so no
case lands on both sides.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from slab.core.checks import read_json_object
from slab.core.errors import SlabError


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
    for key in ("case", "id"):
        if key in item and (not isinstance(item[key], (str, int)) or isinstance(item[key], bool)
                            or not str(item[key]).strip() or "/" in str(item[key])):
            return f"{where} '{key}' is {item[key]!r}; expected a name (no '/')"
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


def _image_parts(item: Mapping) -> list[str]:
    """The image's path as parts, its file name without the volume suffix (nnU-Net's channel
    suffix ``_0000`` dropped): ``a/case1/image.nii.gz`` -> ``["a", "case1", "image"]``."""
    from slab.pipeline.data.cases import stem

    image = item["image"][0] if isinstance(item["image"], list) else item["image"]
    path = Path(str(image))
    name = stem(path)
    name = re.sub(r"_\d{4}$", "", name) if isinstance(item["image"], list) or re.search(r"_\d{4}$", name) else name
    return [part for part in path.parent.parts if part not in ("/", "")] + [name]


def case_ids(items) -> list[str]:
    """A unique, stable id for every item: its ``id``; else its ``case`` (the group folds keep
    together) where no other item shares it; else the image's name, made unique by as many of
    its folders as it takes (``case1/image.nii.gz`` and ``case2/image.nii.gz`` are ``case1`` and
    ``case2``; ``a/x/scan.nii.gz`` and ``b/x/scan.nii.gz`` are ``a_x_scan`` and ``b_x_scan``;
    items of one ``case`` become ``{case}_{name}``).

    Out-of-fold predictions, fold records and tables are keyed by these ids, so two items never
    share one. Two items that give the same ``id``, or the same image, are a SlabError.
    """
    items = list(items)
    explicit = [str(i["id"]) if i.get("id") is not None else None for i in items]
    seen: dict[str, int] = {}
    for index, value in enumerate(explicit):
        if value is not None:
            if value in seen:
                raise SlabError(f"datalist: items {seen[value]} and {index} share the id {value!r}; ids must be unique")
            seen[value] = index
    groups: dict[str, int] = {}
    for item in items:
        if "case" in item:
            groups[str(item["case"])] = groups.get(str(item["case"]), 0) + 1
    parts = [_image_parts(i) for i in items]
    base = [e if e is not None else str(i["case"]) if "case" in i and groups[str(i["case"])] == 1 else None
            for e, i in zip(explicit, items)]
    taken = {b for b in base if b is not None}
    pending = [k for k, b in enumerate(base) if b is None]
    depth = 1
    while pending:
        names = {}
        # one file name in every folder (case1/image.nii.gz, case2/image.nii.gz): the folders name the cases
        shared = depth > 1 and len(pending) > 1 and len({parts[k][-1] for k in pending}) == 1
        for k in pending:
            tail = parts[k][-depth:-1] if shared else parts[k][-depth:]
            case = str(items[k]["case"]) if "case" in items[k] else None
            prefix = [case] if case is not None and not "_".join(tail).startswith(case) else []
            names[k] = re.sub(r"[^\w.-]+", "_", "_".join(prefix + tail))
        counts: dict[str, int] = {}
        for name in names.values():
            counts[name] = counts.get(name, 0) + 1
        left = []
        for k in pending:
            if counts[names[k]] == 1 and names[k] not in taken:
                base[k] = names[k]
                taken.add(names[k])
            elif depth >= len(parts[k]):
                others = [j for j in pending if j != k and names[j] == names[k]]
                raise SlabError(f"datalist: item {k} ({items[k]['image']}) has no id of its own"
                                + (f"; item {others[0]} names the same image" if others else "")
                                + "; give each item a unique 'id'")
            else:
                left.append(k)
        pending, depth = left, depth + 1
    return base


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


def read_datalist(datalist, name: str | None = None) -> dict:
    """A datalist (a file or a dict) in slab's form. Two other layouts of ``labels`` are taken as
    they come, one label map per case (``label_format`` ``values``):

    - the Medical Segmentation Decathlon's ``dataset.json``: ``{"0": "background", "1": "left
      atrium", ...}`` (value -> name);
    - nnU-Net v2's: ``{"background": 0, "liver": 1, ...}`` (name -> value; region-based labels,
      lists of values, are refused in one line).

    The values must run 1..N (0 the background): slab's value ``i + 1`` is label ``i``. MSD's
    ``modality`` and relative paths (``./imagesTr/la_003.nii.gz``) need nothing more.
    """
    data = dict(datalist) if isinstance(datalist, Mapping) else read_json_object(datalist, "datalist")
    name = name or (str(datalist) if not isinstance(datalist, Mapping) else "datalist")
    labels = data.get("labels")
    if not isinstance(labels, Mapping):
        return data
    pairs = []
    for key, value in labels.items():
        if isinstance(value, bool) or isinstance(key, bool):
            raise SlabError(f"{name}: 'labels' entry {key!r}: {value!r}; expected value -> name or name -> value")
        if isinstance(value, int):  # nnU-Net: name -> value
            pairs.append((value, str(key)))
        elif isinstance(value, str) and str(key).strip().lstrip("-").isdigit():  # MSD: value -> name
            pairs.append((int(key), value))
        elif isinstance(value, list):
            raise SlabError(f"{name}: 'labels' {key!r} is the region {value!r}; region-based labels are not read from "
                            "a dataset.json: give each region as its own binary channel")
        else:
            raise SlabError(f"{name}: 'labels' entry {key!r}: {value!r}; expected value -> name (MSD) or name -> "
                            "value (nnU-Net)")
    foreground = sorted((v, n) for v, n in pairs if v != 0)
    if [v for v, _ in foreground] != list(range(1, len(foreground) + 1)) or len(pairs) - len(foreground) > 1:
        raise SlabError(f"{name}: 'labels' values {sorted(v for v, _ in pairs)}; expected 0 for the background and "
                        "1..N for the labels")
    return {**data, "labels": [n for _, n in foreground], "label_format": "values"}


def datalist_paths(datalist) -> list[str]:
    """Every image and label path a datalist file lists, resolved against its folder (for the
    check that no output overwrites them); an unreadable datalist lists none (its load says why)."""
    path = Path(datalist)
    try:
        data = read_datalist(path)
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


def split_datalist(datalist: dict, fold: int) -> tuple[list[dict], list[dict]]:
    """``(training, validation)`` items with ``fold`` held out."""
    if not 0 <= fold < datalist["n_folds"]:
        raise SlabError(f"fold: expected 0 to {datalist['n_folds'] - 1}, got {fold}")
    items = datalist["training"] + datalist["validation"]
    return [i for i in items if i["fold"] != fold], [i for i in items if i["fold"] == fold]


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
        item training (:func:`split_datalist`). A datalist whose items carry no
        ``fold`` has only its own split, fold 0. None: the file's own two lists.
    base_dir : folder relative paths are resolved against (default the datalist's folder, or the
        working directory for a dict).

    Returns
    -------
    (list of dict, list of dict)
        Copies of the items with absolute ``image``/``label`` paths, every file checked to exist.
    """
    path = None if isinstance(datalist, Mapping) else Path(datalist)
    data = read_datalist(datalist)
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
    n_folds = int(data.get("n_folds", max(int(item["fold"]) for item in pool) + 1))
    return split_datalist({"n_folds": n_folds, "training": training, "validation": validation}, int(fold))



__all__ = ["PATH_KEYS", "case_ids", "check_datalist", "read_datalist", "datalist_paths", "split_datalist", "load_datalist"]
