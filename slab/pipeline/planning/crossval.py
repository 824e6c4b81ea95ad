"""A plan's cross-validation: ``slab plan`` writes the plan directory
(:mod:`slab.pipeline.planning.plandir`), ``slab train --plan``
trains one fold of one configuration in it, ``slab cv`` trains every fold, predicts each fold's
held-out cases, chooses the configuration (or ensemble) and its post-processing on those
out-of-fold predictions, and writes the model ``slab predict --model PLAN_DIR`` uses.

``PLAN_DIR/``
    ``fingerprint.json``, ``plans.json``, ``datalist.json`` (absolute paths, a fold per case)
    ``runs/<configuration>/fold_<k>/``   training runs (``slab train`` run directories)
    ``cv/<configuration>/<case>.npy``    out-of-fold probabilities ``(L, X, Y, Z)`` float32
    ``cv/<configuration>/fold_<k>.json`` which cases a fold's model predicted, from which epoch
    ``cv/table.json``, ``cv/table.md``  the cross-validated table
    ``postprocessing.json``              the chosen post-processing, step by step, with its gains
    ``model.json``                       the chosen members and post-processing

Everything is resumable as a whole: finished folds are skipped, interrupted ones resumed from
their ``last.pt``, predicted folds kept.
"""
from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import numpy as np

from slab.pipeline.planning.plandir import plan_config, plan_datalist, read_plan, run_dir, write_json, write_plan
from slab.pipeline.planning.selection import (LEVELS, bin_edges, best_window, case_scores, choose_postprocessing,
                                         summarize, window_histograms, window_mask)
from slab.core.checks import read_json_object
from slab.core.errors import SlabError


def _run_state(run: Path, epochs: int) -> str:
    """``done``, ``partial`` or ``new``."""
    last = run / "last.pt"
    if not last.exists():
        return "new"
    from slab.pipeline.model.checkpoints import load_checkpoint

    return "done" if int(load_checkpoint(last)["epoch"]) >= epochs else "partial"


def train_fold(plan_dir, configuration: str, fold: int, *, overrides=None, device=None, out=None,
               resume: bool | None = None, epochs: int | None = None) -> dict:
    """Train one fold of one planned configuration (``slab train --plan``); ``resume`` None:
    resume an interrupted run, skip a finished one."""
    from slab.pipeline.training import train

    plans, _, datalist = read_plan(plan_dir)
    cfg = plan_config(plans, configuration, overrides)
    if epochs is not None:
        cfg["epochs"] = epochs
    out = Path(out) if out is not None else run_dir(plan_dir, configuration, fold)
    state = _run_state(out, cfg["epochs"])
    if resume is None:
        if state == "done":
            return {"skipped": True, "run": str(out)}
        resume = state == "partial"
    return train(datalist, cfg, out, fold=fold, resume=resume, device=device)


def _fold_cases(datalist: Path, fold: int) -> list[dict]:
    return [i for i in read_json_object(datalist, "datalist")["training"] if int(i["fold"]) == fold]


def predict_fold(plan_dir, configuration: str, fold: int, device=None) -> list[str]:
    """Predict fold ``fold``'s held-out cases with its model into ``cv/<configuration>/``."""
    from slab.pipeline.model.spec import spec_of_state
    from slab.pipeline.inference.predictor import Predictor
    from slab.core.outputs import atomic_write
    from slab.io.volumes import load_volume

    plan_dir = Path(plan_dir)
    best = run_dir(plan_dir, configuration, fold) / "best.pt"
    marker = plan_dir / "cv" / configuration / f"fold_{fold}.json"
    from slab.pipeline.model.checkpoints import load_checkpoint

    state = load_checkpoint(best)
    spec, epoch = spec_of_state(state, best), int(state["epoch"])
    del state
    cases = _fold_cases(plan_dir / "datalist.json", fold)
    if marker.is_file() and read_json_object(marker, "fold record").get("epoch") == epoch:
        return [c["case"] for c in cases]
    predictor = Predictor.from_spec(spec, best, tta="none", device=device)
    for item in cases:
        probs = predictor(load_volume(item["image"]))
        target = plan_dir / "cv" / configuration / f"{item['case']}.npy"
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(target) as tmp, open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(probs.float().cpu().numpy()))
    write_json(marker, {"epoch": epoch, "cases": [c["case"] for c in cases]})
    return [c["case"] for c in cases]


class _Cases:
    """Out-of-fold cases of a candidate (configurations averaged) with their truths."""

    def __init__(self, plan_dir: Path, items: list[dict], fmt: str, n_labels: int, configurations,
                 exclusive: bool = False):
        self.plan_dir, self.items, self.fmt, self.n_labels = plan_dir, items, fmt, n_labels
        self.exclusive = exclusive  # exclusive classes: a case's "probabilities" are its argmax masks
        self.configurations = list(configurations)
        self.spacing = {}
        self._truth = {}

    def truth(self, item: dict) -> np.ndarray:
        from slab.pipeline.training.validation import truth_masks
        from slab.io.volumes import load_volume

        name = item["case"]
        if name not in self._truth:
            label = load_volume(item["label"])
            self.spacing[name] = tuple(float(s) for s in label.meta["spacing"])
            self._truth[name] = truth_masks(np.asarray(label), self.fmt, self.n_labels)
        return self._truth[name]

    def prob(self, name: str, configurations=None) -> np.ndarray:
        from slab.pipeline.inference.ensemble import mean_probabilities
        from slab.transforms.post import argmax_masks

        mean = mean_probabilities(np.load(self.plan_dir / "cv" / c / f"{name}.npy", mmap_mode="r")
                                  for c in (configurations or self.configurations))
        return argmax_masks(mean).astype(np.float32) if self.exclusive else mean

    def __call__(self, configurations=None):
        for item in self.items:
            yield item["case"], self.prob(item["case"], configurations), self.truth(item)

    def spacing_of(self, name: str):
        return self.spacing[name]


def _baseline(plan_dir: Path, items: list[dict], cases: _Cases, configuration: str, folds, tolerance, tubular,
              names) -> dict:
    """The best intensity window per label, chosen on each fold's training cases, scored held out.

    Images are normalised as fold ``k``'s run of ``configuration`` normalised them (its stored
    settings: dataset statistics come from its own training cases)."""
    from slab.transforms.intensity import make_normalize
    from slab.io.volumes import load_volume

    raw = {item["case"]: load_volume(item["image"]) for item in items}
    rng = np.random.default_rng(0)
    scores, windows_by_fold = [], {}
    for fold in folds:
        train = [i for i in items if int(i["fold"]) != fold]
        held = [i for i in items if int(i["fold"]) == fold]
        if not train or not held:
            continue
        cfg = read_json_object(run_dir(plan_dir, configuration, fold) / "config.json", "run config")
        norm = make_normalize(cfg["normalize"])
        images = {i["case"]: np.asarray(norm(raw[i["case"]]) if norm is not None else raw[i["case"]], np.float32)
                  for i in train + held}
        channels = images[train[0]["case"]].shape[0]
        edges = [bin_edges(np.concatenate([rng.choice(images[i["case"]][c].reshape(-1),
                                                       min(images[i["case"]][c].size, 20000), replace=False)
                                            for i in train])) for c in range(channels)]
        hist = [window_histograms(images[i["case"]], cases.truth(i), edges) for i in train]
        windows = [best_window(hist, lab) for lab in range(len(names))]
        windows_by_fold[fold] = [{"channel": w[0], "low": float(edges[w[0]][w[1]]), "high": float(edges[w[0]][w[2]]),
                                  "train_dice": w[3]} for w in windows]
        for item in held:
            mask = window_mask(images[item["case"]], edges, windows)
            scores.append(case_scores(mask, cases.truth(item), cases.spacing_of(item["case"]), tolerance, tubular))
    return {"summary": summarize(scores, names) if scores else None, "windows": windows_by_fold}


def _calibration(cases: _Cases, combo, items: list[dict]) -> dict:
    """Per label, the reliability curve and ECE over the body of the candidate's out-of-fold
    probabilities (the members' mean), pooled over cases."""
    from slab.pipeline.evaluation.calibration import calibration, pooled
    from slab.pipeline.inference.ensemble import mean_probabilities
    from slab.io.volumes import load_volume

    curves = []
    for item in items:
        prob = mean_probabilities(np.load(cases.plan_dir / "cv" / c / f"{item['case']}.npy", mmap_mode="r")
                                  for c in combo)
        curves.append(calibration(prob, cases.truth(item), np.asarray(load_volume(item["image"]))))
    return {"labels": [pooled([c[label] for c in curves]) for label in range(cases.n_labels)]}


def _candidates(configurations: list[str]) -> list[tuple[str, ...]]:
    out = [(c,) for c in configurations]
    for r in range(2, len(configurations) + 1):
        out += list(itertools.combinations(configurations, r))
    return out


def _scores(cases: _Cases, combo, options, tolerance, tubular) -> list[list[dict]]:
    from slab.transforms.post import make_postprocess

    post = make_postprocess(options)
    return [case_scores(np.asarray(post(prob), dtype=np.uint8), truth, cases.spacing_of(name), tolerance, tubular)
            for name, prob, truth in cases(combo)]


def evaluate_cv(plan_dir, configurations, folds) -> dict:
    """The table, the chosen candidate and post-processing, from the out-of-fold predictions."""
    plan_dir = Path(plan_dir)
    plans, fp, datalist = read_plan(plan_dir)
    data = read_json_object(datalist, "datalist")
    items = [i for i in data["training"] if int(i["fold"]) in folds]
    names = plans["labels"]
    tubular = [n in plans["tubular"] for n in names]
    tolerance = float(plans["tolerance_mm"])
    exclusive = any(p["config"].get("loss") == "dice_ce" for c, p in plans["configurations"].items()
                    if c in configurations)
    cases = _Cases(plan_dir, items, data.get("label_format", "channels"), len(names), configurations, exclusive)
    for item in items:
        cases.truth(item)
    rows = {}
    for combo in _candidates(list(configurations)):
        key = "+".join(combo)
        raw = _scores(cases, combo, {"threshold": 0.5}, tolerance, tubular)
        sweep = [0.5] * len(names) if exclusive else choose_thresholds(cases, combo, len(names), tubular)
        tuned = raw if exclusive else _scores(cases, combo, {"labels": [{"threshold": t} for t in sweep]}, tolerance,
                                              tubular)
        rows[key] = {"configurations": list(combo), "at_0.5": summarize(raw, names),
                     "thresholds": sweep, "tuned": summarize(tuned, names),
                     "calibration": _calibration(cases, combo, items)}
    best = choose_candidate(rows)
    combo = tuple(rows[best]["configurations"])
    smallest = [lab["smallest_component"] for lab in fp["labels"]]
    chosen = choose_postprocessing(lambda: cases(combo), len(names), cases.spacing_of, tolerance, tubular, smallest,
                                   binarise=not exclusive)
    final = _scores(cases, combo, {"labels": chosen["labels"]}, tolerance, tubular)
    if exclusive:  # the masks are the argmax of the probabilities; a model applies it first
        chosen["labels"] = [{k: v for k, v in o.items() if k != "threshold"} for o in chosen["labels"]]
        chosen["argmax"] = True
    baseline = _baseline(plan_dir, items, cases, configurations[0], folds, tolerance, tubular, names)
    return {"rows": rows, "best": best, "postprocessing": chosen, "final": summarize(final, names), "exclusive": exclusive,
            "baseline": baseline, "labels": names, "tubular": tubular, "tolerance_mm": tolerance,
            "folds": list(folds), "cases": len(items), "target_metric": plans["target_metric"]}


ENSEMBLE_MARGIN = 0.005


def choose_candidate(rows: dict) -> str:
    """The candidate with the best tuned score, where one with more configurations must beat the
    best with fewer by ``ENSEMBLE_MARGIN``: each configuration an ensemble adds costs a whole
    network per prediction, and a gain below half a point is within the noise of a few cases."""
    best = None
    for size in sorted({len(r["configurations"]) for r in rows.values()}):
        of_size = [k for k, r in rows.items() if len(r["configurations"]) == size]
        top = max(of_size, key=lambda k: rows[k]["tuned"]["score"])
        if best is None or rows[top]["tuned"]["score"] > rows[best]["tuned"]["score"] + ENSEMBLE_MARGIN:
            best = top
    return best


def choose_thresholds(cases: _Cases, combo, n_labels: int, tubular) -> list[float]:
    """Per label, the level of ``LEVELS`` at the centre of the flat optimum of the mean target
    over the cases (:func:`~slab.pipeline.evaluation.metrics.choose_threshold`)."""
    from slab.pipeline.evaluation.metrics import choose_threshold
    from slab.pipeline.planning.selection import sweep_label

    out = []
    for label in range(n_labels):
        sweep = sweep_label(lambda: cases(combo), label, cases.spacing_of, tubular[label])
        out.append(choose_threshold(LEVELS, [sweep[t] for t in LEVELS])[0])
    return out


def _cell(metric: dict) -> str:
    return "n/a" if metric is None or np.isnan(metric["mean"]) else f"{metric['mean']:.3f} ± {metric['std']:.3f}"


def table_markdown(result: dict, times: dict | None = None) -> str:
    """The cross-validated table as Markdown: one row per candidate (at 0.5 and with tuned
    thresholds), the best with its chosen post-processing, and the baseline."""
    names, tubular = result["labels"], result["tubular"]
    keys = ["dice", "surface_dice_0", "surface_dice_tol"]
    header = ["candidate", "post-processing", "score"]
    vessel = ["cldice", "b0_error", "small_vessel_recall"]
    for name, tub in zip(names, tubular):
        header += [f"{name} {k}" for k in keys + (vessel if tub else [])]
    if times:
        header.append("train+predict s")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def row(label, post, summary, seconds=None):
        cells = [label, post, f"{summary['score']:.4f}"]
        for name, tub in zip(names, tubular):
            metrics = summary["labels"][name]
            cells += [_cell(metrics.get(k)) for k in keys + (vessel if tub else [])]
        if times:
            cells.append("" if seconds is None else f"{seconds:.0f}")
        lines.append("| " + " | ".join(cells) + " |")

    for key, r in result["rows"].items():
        seconds = sum(times.get(c, 0.0) for c in r["configurations"]) if times else None
        ece = r.get("calibration")
        ece = " (ECE " + ", ".join(f"{c['ece']:.3f}" for c in ece["labels"]) + ")" if ece else ""
        if result.get("exclusive"):
            row(key, "argmax" + ece, r["at_0.5"], seconds)
            continue
        row(key, "threshold 0.5" + ece, r["at_0.5"], seconds)
        row(key, "thresholds " + ",".join(f"{t:g}" for t in r["thresholds"]), r["tuned"])
    chosen = ("argmax; " if result["postprocessing"].get("argmax") else "") + \
        "; ".join(json.dumps(o) for o in result["postprocessing"]["labels"])
    row(f"**{result['best']}** (chosen)", chosen, result["final"])
    if result["baseline"]["summary"] is not None:
        row("baseline: intensity window", "window chosen per fold", result["baseline"]["summary"])
    return "\n".join(lines) + "\n"


def run_cv(plan_dir, *, configurations=None, folds=None, device=None, overrides=None, log=print) -> dict:
    """Train every fold of every configuration, predict held-out cases, choose and write the
    table, ``postprocessing.json`` and ``model.json``; see the module docstring."""
    plan_dir = Path(plan_dir)
    plans, fp, datalist = read_plan(plan_dir)
    configurations = list(configurations or plans["configurations"])
    for c in configurations:
        if c not in plans["configurations"]:
            raise SlabError(f"--configurations: {c!r} is not planned; the plan has {', '.join(plans['configurations'])}")
    available = plans.get("folds") or [0]
    folds = list(available if folds is None else folds)
    if len(available) < 2:
        raise SlabError(f"{plan_dir}: cross-validation needs at least 2 folds (the plan has {len(available)}; "
                        "a dataset of 2 or more cases)")
    missing = [f for f in folds if f not in available]
    if missing:
        raise SlabError(f"--folds: fold {missing[0]} is not in the plan (folds {', '.join(map(str, available))})")
    times_path = plan_dir / "cv" / "times.json"
    times = read_json_object(times_path, "times") if times_path.is_file() else {}
    for c in configurations:
        for k in folds:
            start = time.perf_counter()
            result = train_fold(plan_dir, c, k, overrides=overrides, device=device)
            log(f"{c} fold {k}: {'finished before' if result.get('skipped') else 'trained'}")
            predict_fold(plan_dir, c, k, device=device)
            if not result.get("skipped") or f"{c}/{k}" not in times:
                times[f"{c}/{k}"] = time.perf_counter() - start
                write_json(times_path, times)
    result = evaluate_cv(plan_dir, configurations, folds)
    per_config = {c: sum(v for key, v in times.items() if key.split("/")[0] == c
                         and int(key.split("/")[1]) in folds) for c in configurations}
    result["seconds"] = per_config
    write_json(plan_dir / "cv" / "table.json", result)
    markdown = table_markdown(result, per_config)
    from slab.core.outputs import atomic_write

    with atomic_write(plan_dir / "cv" / "table.md") as tmp:
        tmp.write_text(markdown, encoding="utf-8")
    best = result["rows"][result["best"]]
    chosen = {"labels": result["postprocessing"]["labels"]}
    if result["postprocessing"].get("argmax"):
        chosen["argmax"] = True
    write_json(plan_dir / "postprocessing.json", {
        "candidate": result["best"], "labels": result["labels"], "postprocess": chosen,
        "steps": result["postprocessing"]["steps"], "score_tuned_thresholds": best["tuned"]["score"],
        "score_after": result["final"]["score"]})
    members = [{"configuration": c, "fold": k, "checkpoint": f"runs/{c}/fold_{k}/best.pt"}
               for c in best["configurations"] for k in folds]
    write_json(plan_dir / "model.json", {"members": members, "postprocess": chosen,
                                          "labels": result["labels"], "candidate": result["best"],
                                          "score": result["final"]["score"], "target_metric": plans["target_metric"]})
    result["markdown"] = markdown
    return result


__all__ = ["write_plan", "read_plan", "plan_config", "train_fold", "predict_fold", "evaluate_cv", "run_cv",
           "table_markdown", "plan_datalist", "choose_candidate"]
