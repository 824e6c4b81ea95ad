"""The plan directory ``slab plan`` writes and everything after it reads: the plan's datalist
(unique case ids, folds, the user's validation items kept a fold of their own), ``plans.json``
checked whole, one configuration's training config with overrides, and where its runs go.

``PLAN_DIR/``
    ``fingerprint.json``, ``plans.json``, ``datalist.json`` (absolute paths, a fold per case)
    ``runs/<configuration>/fold_<k>/``   training runs (``slab train`` run directories)
"""
from __future__ import annotations

import json
from pathlib import Path

from slab.core.checks import read_json_object
from slab.core.errors import SlabError


def write_json(path: Path, data) -> None:
    from slab.core.outputs import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, allow_nan=True) + "\n", encoding="utf-8")


def plan_datalist(datalist, fp: dict, n_folds: int = 5) -> dict:
    """The plan's datalist: every good case, absolute paths, a unique ``case`` id each
    (:func:`slab.pipeline.data.datalist.case_ids`) and folds.

    Folds: the datalist's own where its items carry two or more. Otherwise the ``training``
    items are dealt round-robin into ``min(n_folds, groups)`` folds, by group (items sharing a
    datalist ``case`` stay in one fold), and the ``validation`` items, when there are any, form
    one fold of their own after those: they are never dealt into the training folds, and
    ``--fold`` of that fold trains on the training items and validates on the user's
    validation items (``validation_fold`` in the result).
    """
    from slab.pipeline.data.datalist import case_ids, load_datalist, read_datalist

    data = read_datalist(datalist)
    train_items, val_items = load_datalist(datalist, fold=None)
    good = {c["case"] for c in fp["cases"]}

    def absolute(value):
        return [str(Path(v).resolve()) for v in value] if isinstance(value, list) else str(Path(value).resolve())

    every = list(train_items) + list(val_items)
    ids = case_ids(every)
    items = [dict(i, case=name, group=str(i.get("case", name)), image=absolute(i["image"]),
                  label=absolute(i["label"]), split="validation" if k >= len(train_items) else "training")
             for k, (i, name) in enumerate(zip(every, ids)) if name in good]
    folds = sorted({int(i["fold"]) for i in items if "fold" in i})
    validation_fold = None
    if len(folds) < 2:
        training = [i for i in items if i["split"] == "training"]
        held = [i for i in items if i["split"] == "validation"]
        groups = sorted({i["group"] for i in training})
        k = max(1, min(n_folds - (1 if held else 0), len(groups)))
        fold_of = {g: index % k for index, g in enumerate(groups)}
        for item in training:
            item["fold"] = fold_of[item["group"]]
        for item in held:
            item["fold"] = k
        validation_fold = k if held else None
    else:
        unfolded = [i for i in items if "fold" not in i]
        for item in unfolded:
            item["fold"] = max(folds) + 1 if item["split"] == "validation" else 0
        if any(i["split"] == "validation" for i in unfolded):
            validation_fold = max(folds) + 1
    folds = sorted({int(i["fold"]) for i in items})
    for item in items:
        item.pop("split")
    out = {key: data[key] for key in ("labels", "label_format", "modality", "name") if key in data}
    out.update(n_folds=max(folds) + 1, training=items, validation=[])
    if validation_fold is not None:
        out["validation_fold"] = validation_fold
    return out


def write_plan(datalist, out, *, device=None, memory_gib=None, epochs=None, n_folds: int = 5,
               configurations=None, progress=None, minutes: float | None = None,
               encoder: str | None = None) -> tuple[dict, dict]:
    """Fingerprint, verify and plan ``datalist`` into ``out``; ``(fingerprint, plans)``.
    Bad cases are one SlabError listing every problem."""
    from slab.pipeline.planning.fingerprint import fingerprint
    from slab.pipeline.planning.plans import CONFIGURATIONS, check_encoder, make_plans

    check_encoder(encoder)  # before a single case is read
    fp, problems = fingerprint(datalist, progress=progress)
    if problems:
        raise SlabError(f"{len(problems)} problem(s) in the datalist's cases (slab plan --verify lists them): "
                        + "; ".join(problems))
    out = Path(out)
    data = plan_datalist(datalist, fp, n_folds)
    plans = make_plans(fp, device=device, memory_gib=memory_gib, epochs=epochs,
                       configurations=tuple(configurations or CONFIGURATIONS), minutes=minutes, encoder=encoder,
                       n_folds=len({int(item["fold"]) for item in data["training"]}))
    plans["folds"] = sorted({int(item["fold"]) for item in data["training"]})
    if "validation_fold" in data:
        plans["validation_fold"] = data["validation_fold"]
    write_json(out / "fingerprint.json", fp)
    write_json(out / "plans.json", plans)
    write_json(out / "datalist.json", data)
    return fp, plans


def read_plan(plan_dir) -> tuple[dict, dict, Path]:
    """``(plans, fingerprint, datalist path)`` of a plan directory."""
    plan_dir = Path(plan_dir)
    if not (plan_dir / "plans.json").is_file():
        raise SlabError(f"--plan: {plan_dir} holds no plans.json; make one with slab plan DATALIST -o {plan_dir}")
    plans = read_json_object(plan_dir / "plans.json", "plans")
    fp = read_json_object(plan_dir / "fingerprint.json", "fingerprint")
    check_plans(plans, plan_dir / "plans.json")
    return plans, fp, plan_dir / "datalist.json"


def check_plans(plans: dict, path) -> None:
    """The whole of a (possibly hand-edited) ``plans.json`` checked before anything trains: each
    configuration an object whose ``config`` is a valid training configuration, ``folds`` a list
    of distinct fold numbers, ``labels`` / ``tubular`` lists of names, ``tolerance_mm`` a number.
    A SlabError names the file and the first bad key."""
    from slab.pipeline.training.config import validate_config

    configurations = plans.get("configurations")
    if not isinstance(configurations, dict) or not configurations:
        raise SlabError(f"{path}: expected 'configurations', an object of planned configurations")
    for name, plan in configurations.items():
        if not isinstance(plan, dict) or not isinstance(plan.get("config"), dict):
            raise SlabError(f"{path}: configurations.{name} must be an object with a 'config' object")
        try:
            validate_config(plan["config"])
        except SlabError as err:
            raise SlabError(f"{path}: configurations.{name}.{err}") from None
    folds = plans.get("folds", [0])
    if not isinstance(folds, list) or not folds or any(isinstance(f, bool) or not isinstance(f, int) or f < 0
                                                       for f in folds) or len(set(folds)) != len(folds):
        raise SlabError(f"{path}: 'folds' is {folds!r}; expected a list of distinct fold numbers >= 0")
    for key in ("labels", "tubular"):
        value = plans.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise SlabError(f"{path}: '{key}' is {value!r}; expected a list of label names")
    tolerance = plans.get("tolerance_mm", 1.0)
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance >= 0:
        raise SlabError(f"{path}: 'tolerance_mm' is {tolerance!r}; expected a number >= 0")


def plan_config(plans: dict, configuration: str, overrides: dict | None = None) -> dict:
    """The training configuration of one planned configuration, ``overrides`` (a partial
    training config) merged over it section by section."""
    if configuration not in plans["configurations"]:
        raise SlabError(f"--configuration: {configuration!r} is not planned; the plan has "
                        f"{', '.join(plans['configurations'])}")
    cfg = json.loads(json.dumps(plans["configurations"][configuration]["config"]))
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict) and key not in ("normalize", "augment"):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def run_dir(plan_dir, configuration: str, fold: int) -> Path:
    return Path(plan_dir) / "runs" / configuration / f"fold_{fold}"


__all__ = ["write_json", "plan_datalist", "write_plan", "read_plan", "check_plans", "plan_config", "run_dir"]
