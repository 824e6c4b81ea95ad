"""Do a model's probabilities mean what they say, on data it was not tuned on?

Real MRI (nilearn's MNI152 2009a T1 template and its tissue maps, at 2 mm) split into blocks
along y: a training block, a validation block (the datalist's ``validation`` list: the plan keeps
it a fold of its own) and a held-out test block; and the vessel phantoms (two training, one
validation, one test volume). Each task is planned by ``slab plan``; each configuration is
trained on the training block and validated on the validation block with the plan's own recipe,
its schedule cut to fit 2 cores; the test block is then predicted and scored:

* the probability the model gives the test block's air (T1 < 5; median and 10th percentile);
* the expected calibration error over the body (:mod:`slab.pipeline.evaluation.calibration`);
* Dice at 0.5, at the threshold chosen on validation, and at the test block's own best threshold
  (a sweep of 0.05 ... 0.95), and that best threshold;
* false positives on the test block's first and last slices of each axis (the cut faces);
* the intensity window baseline (the best window on the training block, scored on the test block);
* where the reliability curve over every voxel crosses the diagonal (:func:`crossing`; in the
  JSON and the per-configuration lines);
* the run's recorded priors: the foreground share of its training samples and of its training
  volumes, and the logit adjustment its loss saw (:mod:`slab.pipeline.training.prior`).

``--tasks subjects``: grey matter of synthetic subjects of the template (``mni.subject``: deformed,
bias field, gamma, noise), six training, two validation and four test heads, where one window
cannot fit every scan.

    python benchmarks/bench_calibration.py [--tasks gm,tissue,vessels,subjects] [--configurations 2d,2p5d,3d]
        [--epochs 6] [--samples-2d 640] [--samples-3d 24] [--set KEY=JSON ...] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mni import mni152, write_subject  # noqa: E402

BLOCKS = {"train": (0, 52), "validation": (52, 84), "test": (84, 116)}
LEVELS = [round(0.05 * i, 2) for i in range(1, 20)]


def mni_task(root: Path, kind: str) -> Path:
    """``gm``: grey matter ``gm > 0.5`` (one label); ``tissue``: background / grey / white matter
    as one label map (values 1, 2: the larger of the two maps where it passes 0.5)."""
    import nibabel as nib

    t1, (gm, wm), affine = mni152(["gm", "wm"])
    if kind == "gm":
        label = (gm > 0.5).astype(np.uint8)
        extra = {"labels": ["grey_matter"]}
    else:
        label = np.zeros(t1.shape, np.uint8)
        label[(gm > 0.5) & (gm >= wm)] = 1
        label[(wm > 0.5) & (wm > gm)] = 2
        extra = {"labels": ["grey_matter", "white_matter"], "label_format": "values"}
    items = {}
    for split, (y0, y1) in BLOCKS.items():
        shift = np.eye(4)
        shift[1, 3] = y0
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.round(t1[:, y0:y1]).astype(np.int16), affine @ shift), folder / "image.nii.gz")
        nib.save(nib.Nifti1Image(label[:, y0:y1], affine @ shift), folder / "label.nii.gz")
        items[split] = {"image": f"{split}/image.nii.gz", "label": f"{split}/label.nii.gz"}
    return _datalist(root, items, extra)


def subjects_task(root: Path, n_train: int = 6, n_val: int = 2, n_test: int = 4) -> Path:
    """Grey matter of synthetic subjects of the template (:func:`mni.subject`: deformed, bias
    field, gamma, noise), whole heads: ``n_train`` training, ``n_val`` validation and ``n_test``
    test subjects, each its own seed."""
    t1, (gm,), affine = mni152(["gm"])
    splits = {"train": range(n_train), "validation": range(100, 100 + n_val), "test": range(200, 200 + n_test)}
    data = {"training": [], "validation": [], "test": [], "labels": ["grey_matter"]}
    for split, seeds in splits.items():
        for seed in seeds:
            item = write_subject(root / f"{split}_{seed}", t1, gm, affine, seed)
            data["training" if split == "train" else split].append({k: item[k] for k in ("image", "label")})
    path = root / "datalist.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def vessel_task(root: Path, size: int = 48) -> Path:
    from slab.pipeline.data.phantom import write_phantom

    items = {}
    for seed, split in enumerate(("train", "train2", "validation", "test")):
        write_phantom(root / split, shape=(size,) * 3, seed=seed, kind="vessels")
        items[split] = {"image": f"{split}/image.nii.gz", "label": f"{split}/label.nii.gz"}
    return _datalist(root, items, {"labels": ["vessel"]})


def _datalist(root: Path, items: dict, extra: dict) -> Path:
    training = [v for k, v in items.items() if k.startswith("train")]
    data = {"training": training, "validation": [items["validation"]], "test": [items["test"]], **extra}
    path = root / "datalist.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def shorten(plan_dir: Path, epochs: int, samples: dict, overrides: dict | None = None) -> None:
    """``bench_plan``'s cut of every schedule, no report pictures, and ``overrides`` (``--set``)
    of the training config."""
    from bench_plan import shorten as cut

    cut(plan_dir, epochs, samples)
    path = plan_dir / "plans.json"
    plans = json.loads(path.read_text(encoding="utf-8"))
    for plan in plans["configurations"].values():
        plan["config"]["report_volumes"] = 0
        plan["config"].update(overrides or {})
    path.write_text(json.dumps(plans, indent=2), encoding="utf-8")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return float(2 * (a & b).sum() / s) if s else float("nan")


def masks_of(prob: np.ndarray, threshold, exclusive: bool) -> np.ndarray:
    """``(L, X, Y, Z)`` masks: argmax over (background, labels) for exclusive models, else
    per-label thresholds."""
    if exclusive:
        from slab.transforms.post import argmax_masks

        return argmax_masks(prob).astype(bool)
    t = np.broadcast_to(np.asarray(threshold, dtype=np.float64).reshape(-1), (prob.shape[0],))
    return np.stack([prob[c] > t[c] for c in range(prob.shape[0])])


def score(model, image, truth: np.ndarray, air: np.ndarray, exclusive: bool) -> dict:
    from slab.pipeline.evaluation.calibration import calibration

    prob = np.asarray(model(image), dtype=np.float32)
    curves = calibration(prob, truth, np.asarray(image))
    chosen = model.postprocess.binarise.threshold if hasattr(model.postprocess, "binarise") and \
        model.postprocess.binarise is not None and hasattr(model.postprocess.binarise, "threshold") else 0.5
    at_half = masks_of(prob, 0.5, exclusive)
    at_chosen = masks_of(prob, chosen, exclusive)
    out = {"labels": []}
    for c in range(prob.shape[0]):
        sweep = {t: dice(prob[c] > t, truth[c] > 0) for t in LEVELS}
        best = max(sweep, key=sweep.get)
        mask = at_half[c]
        faces = sum(int((mask & ~(truth[c] > 0)).take(i, axis=a).sum()) for a in range(3) for i in (0, -1))
        out["labels"].append({
            "air_median": float(np.median(prob[c][air])), "air_p10": float(np.percentile(prob[c][air], 10)),
            "ece_body": curves[c]["ece"], "brier_body": curves[c]["brier"],
            "dice_0.5": dice(at_half[c], truth[c] > 0), "dice_chosen": dice(at_chosen[c], truth[c] > 0),
            "chosen": float(np.ravel([chosen])[min(c, np.size(chosen) - 1)]) if not exclusive else "argmax",
            "best_threshold": best, "dice_best": sweep[best],
            "dice_best_pm0.1": [sweep.get(round(best - 0.1, 2), float("nan")), sweep.get(round(best + 0.1, 2), float("nan"))],
            "fp_faces": faces, "fp": int((mask & ~(truth[c] > 0)).sum()),
            "crossing": crossing(prob[c], truth[c]),
        })
    return out


def crossing(prob: np.ndarray, truth: np.ndarray, bins: int = 20) -> float:
    """Where the reliability curve over every voxel (``bins`` equal bins) crosses the diagonal
    from below — over-confident under it, under-confident above: the probability, interpolated
    between the last bin whose voxels are true less often than they are given and the next,
    above which every bin is true at least as often. A calibrated model crosses near 0.5 where
    it crosses at all; NaN where no bin is under-confident."""
    from slab.pipeline.evaluation.calibration import reliability

    points = [(b["probability"], b["observed"] - b["probability"]) for b in reliability(prob, truth, bins=bins)["bins"]
              if b["count"]]
    above = len(points)
    while above and points[above - 1][1] >= 0:
        above -= 1
    if above == len(points):
        return float("nan")
    if above == 0:
        return float(points[0][0])
    (p0, d0), (p1, d1) = points[above - 1], points[above]
    return float(p0 + (p1 - p0) * -d0 / (d1 - d0))


def window_baseline(train_cases, test_cases) -> list[float]:
    """Per label, the mean test Dice of the intensity window with the best mean Dice over the
    training cases (``(normalised image, truth)`` pairs), as ``slab cv``'s baseline chooses it."""
    from slab.pipeline.planning.selection import best_window, bin_edges, window_histograms, window_mask

    rng = np.random.default_rng(0)
    channels = train_cases[0][0].shape[0]
    edges = [bin_edges(np.concatenate([rng.choice(img[c].reshape(-1), min(img[c].size, 20000), replace=False)
                                       for img, _ in train_cases])) for c in range(channels)]
    hist = [window_histograms(img, truth, edges) for img, truth in train_cases]
    windows = [best_window(hist, lab) for lab in range(train_cases[0][1].shape[0])]
    dices = []
    for img, truth in test_cases:
        mask = window_mask(img, edges, windows) > 0
        dices.append([dice(mask[c], truth[c] > 0) for c in range(truth.shape[0])])
    return [float(np.mean(d)) for d in zip(*dices)]


def mean_scores(per_case: list[dict]) -> dict:
    """The test cases' scores averaged label by label (false positives summed)."""
    out = {"labels": [], "cases": len(per_case)}
    for c in range(len(per_case[0]["labels"])):
        rows = [case["labels"][c] for case in per_case]
        merged = {}
        for key, value in rows[0].items():
            if key in ("fp", "fp_faces"):
                merged[key] = int(sum(r[key] for r in rows))
            elif key == "dice_best_pm0.1":
                merged[key] = [float(np.nanmean([r[key][i] for r in rows])) for i in range(2)]
            elif isinstance(value, str):
                merged[key] = value
            else:
                merged[key] = float(np.nanmean([r[key] for r in rows]))
        out["labels"].append(merged)
    return out


def run_task(name: str, datalist: Path, plan_dir: Path, args) -> dict:
    from slab.pipeline.inference.ensemble import load_model
    from slab.pipeline.model.checkpoints import load_checkpoint
    from slab.pipeline.planning.crossval import train_fold, write_plan
    from slab.pipeline.training.validation import truth_masks
    from slab.io.volumes import load_volume

    fp, plans = write_plan(datalist, plan_dir, device="cpu", configurations=args.configurations.split(","))
    fold = plans.get("validation_fold")
    if fold is None:  # a plan from before validation items kept a fold of their own: set it as it would be
        path = plan_dir / "datalist.json"
        planned = json.loads(path.read_text())
        for item in planned["training"]:
            item["fold"] = 1 if "/validation/" in str(item["image"]) else 0
        planned["n_folds"] = 2
        path.write_text(json.dumps(planned))
        fold = 1
    shorten(plan_dir, args.epochs, {2: args.samples_2d, 3: args.samples_3d}, args.overrides)
    plans = json.loads((plan_dir / "plans.json").read_text())
    data = json.loads(datalist.read_text())
    root = datalist.parent
    fmt = data.get("label_format", "channels")
    n_labels = len(data["labels"])
    tests = []
    for item in data["test"]:
        image = load_volume(root / item["image"])
        raw = np.asarray(image)[0]
        air = raw < 5 if name != "vessels" else raw < np.percentile(raw, 5)
        tests.append((image, truth_masks(np.asarray(load_volume(root / item["label"])), fmt, n_labels), air))
    result = {"plan": {c: {"loss": p["config"].get("loss", "dice_bce"), "metric": p["config"]["val"]["metric"]}
                       for c, p in plans["configurations"].items()},
              "tubular": plans.get("tubular"), "configurations": {}}
    for configuration in args.configurations.split(","):
        usage = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        train_fold(plan_dir, configuration, fold, resume=False)
        after = resource.getrusage(resource.RUSAGE_SELF)
        run = plan_dir / "runs" / configuration / f"fold_{fold}"
        model = load_model(run, device="cpu")
        exclusive = getattr(model, "exclusive", False)
        scores = mean_scores([score(model, image, truth, air, exclusive) for image, truth, air in tests])
        scores["train_wall_s"] = time.perf_counter() - start
        scores["train_cpu_s"] = (after.ru_utime + after.ru_stime) - (usage.ru_utime + usage.ru_stime)
        scores["priors"] = load_checkpoint(run / "last.pt").get("priors")  # samples', volumes', adjustment
        result["configurations"][configuration] = scores
        print(f"  {name} {configuration}: " + json.dumps(scores), flush=True)
    train = [i for i in json.loads((plan_dir / "datalist.json").read_text())["training"] if int(i["fold"]) != fold]
    from slab.transforms.intensity import make_normalize

    norm = make_normalize(json.loads((run / "config.json").read_text())["normalize"])

    def normalised(image):
        return np.asarray(norm(image) if norm else image, np.float32)

    train_cases = [(normalised(load_volume(i["image"])), truth_masks(np.asarray(load_volume(i["label"])), fmt, n_labels))
                   for i in train]
    result["window"] = window_baseline(train_cases, [(normalised(image), truth) for image, truth, _ in tests])
    return result


def _priors(priors: dict | None, c: int) -> str:
    """A run's recorded priors as probabilities (per class against the background for exclusive
    classes), and the logit adjustment its loss saw."""
    if not priors:
        return "-"

    def p(logit: float) -> str:
        return f"{100 / (1 + np.exp(-logit)):.1f} %"

    return f"{p(priors['samples'][c])} / {p(priors['volumes'][c])} ({priors['adjustment'][c]:+.2f})"


def table(results: dict) -> str:
    lines = ["| task | configuration | loss | label | air median p | air p10 | ECE body | Dice @0.5 | Dice @chosen "
             "(chosen) | best threshold | Dice @best | Dice @best±0.1 | FP on faces / all | window Dice | train CPU s | "
             "prior: samples / volumes (loss adjustment) |",
             "|" + "---|" * 16]
    for task, result in results.items():
        for configuration, scores in result["configurations"].items():
            for c, s in enumerate(scores["labels"]):
                chosen = s["chosen"] if isinstance(s["chosen"], str) else f"{s['chosen']:g}"
                lines.append(
                    f"| {task} | {configuration} | {result['plan'][configuration]['loss']} | {c + 1} | "
                    f"{s['air_median']:.3f} | {s['air_p10']:.3f} | {s['ece_body']:.3f} | {s['dice_0.5']:.3f} | "
                    f"{s['dice_chosen']:.3f} ({chosen}) | {s['best_threshold']:g} | {s['dice_best']:.3f} | "
                    f"{s['dice_best_pm0.1'][0]:.3f} / {s['dice_best_pm0.1'][1]:.3f} | {s['fp_faces']} / {s['fp']} | "
                    f"{result['window'][c]:.3f} | {scores['train_cpu_s']:.0f} | {_priors(scores.get('priors'), c)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="gm,tissue,vessels,subjects")
    parser.add_argument("--configurations", default="2d,2p5d,3d")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--samples-2d", type=int, default=640)
    parser.add_argument("--samples-3d", type=int, default=24)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="set a training-config key in every configuration (e.g. dice_batch=false)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    args.overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            args.overrides[key] = json.loads(value)
        except ValueError:
            parser.error(f"--set {item}: expected KEY=JSON, e.g. dice_batch=true or logit_adjustment='\"both\"'")
    import torch

    from slab.pipeline.cli import quiet_libraries

    quiet_libraries()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.epochs} epochs x "
          f"{args.samples_2d} slabs / {args.samples_3d} patches", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for task in args.tasks.split(","):
            datalist = vessel_task(root / task) if task == "vessels" else subjects_task(root / task) \
                if task == "subjects" else mni_task(root / task, task)
            results[task] = run_task(task, datalist, root / task / "plan", args)
    print()
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
