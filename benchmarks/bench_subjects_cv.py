"""Does the configuration ``slab cv`` chooses beat the intensity window where one window cannot fit
every scan? Synthetic subjects of the real MNI152 template, held-out subjects scored.

Eight subjects (``mni.subject``: deformed, bias field of +-20 %, gamma 0.7-1.4, noise; grey matter
``gm > 0.5`` moved with the image) are planned by ``slab plan --budget MINUTES --folds 2`` (each
configuration's schedule scaled to that many minutes per fold on this machine), cross-validated
by ``slab cv`` (every fold of every configuration trained, held-out subjects predicted, the
candidate and its post-processing chosen on them), and the chosen model (the ensemble of its
folds) predicts four more subjects nothing was tuned on. Beside it: the intensity window with
the best mean Dice on the eight subjects' normalised images (as ``slab cv`` picks its baseline),
scored on the same four. CPU seconds from ``resource.getrusage``.

    python benchmarks/bench_subjects_cv.py [--minutes 6 | --epochs N] [--configurations 2d,2p5d] [--json out.json]
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from bench_calibration import LEVELS, dice, window_baseline  # noqa: E402
from mni import mni152, write_subject  # noqa: E402


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def subjects(root: Path, n_train: int = 8, n_test: int = 4) -> tuple[Path, list[dict]]:
    """A datalist of ``n_train`` subjects (seeds 0..) and the ``n_test`` held-out ones (seeds 200..)."""
    t1, (gm,), affine = mni152(["gm"])
    items = {"train": [], "test": []}
    for split, seeds in (("train", range(n_train)), ("test", range(200, 200 + n_test))):
        for seed in seeds:
            items[split].append(write_subject(root / f"subject_{seed}", t1, gm, affine, seed))
    path = root / "datalist.json"
    path.write_text(json.dumps({"training": items["train"], "labels": ["grey_matter"]}), encoding="utf-8")
    return path, items["test"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=6.0, help="slab plan --budget: minutes per fold run")
    parser.add_argument("--epochs", type=int, help="slab plan --epochs instead of --budget (the plan's samples per epoch)")
    parser.add_argument("--configurations", default="2d,2p5d")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    import torch

    from slab.io.volumes import load_volume
    from slab.pipeline.cli import quiet_libraries
    from slab.pipeline.inference.ensemble import load_model
    from slab.pipeline.planning.crossval import run_cv, write_plan
    from slab.pipeline.planning.plans import describe
    from slab.transforms.intensity import make_normalize

    quiet_libraries()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    configurations = args.configurations.split(",")
    schedule = f"--epochs {args.epochs}" if args.epochs else f"--budget {args.minutes:g} min per fold run"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {schedule}, "
          f"configurations {configurations}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        datalist, tests = subjects(root)
        plan_dir = root / "plan"
        fp, plans = write_plan(datalist, plan_dir, device="cpu", n_folds=2, configurations=configurations,
                               minutes=None if args.epochs else args.minutes, epochs=args.epochs)
        print(describe(fp, plans), flush=True)
        path = plan_dir / "plans.json"
        planned = json.loads(path.read_text())
        for plan in planned["configurations"].values():
            plan["config"]["report_volumes"] = 0
            plan["config"]["progress"] = False
        path.write_text(json.dumps(planned, indent=2))
        start, wall = cpu_seconds(), time.perf_counter()
        result = run_cv(plan_dir, device="cpu", log=lambda line: print("   ", line, flush=True))
        cv_cpu, cv_wall = cpu_seconds() - start, time.perf_counter() - wall
        print(result["markdown"], flush=True)
        model = load_model(plan_dir, device="cpu")
        chosen = result["postprocessing"]["labels"][0]  # the cv's choice for grey matter (threshold or hysteresis, clean-up)
        scores, truths, probs = [], [], []
        for item in tests:
            output = model(load_volume(item["image"]))
            prob = np.asarray(output, np.float32)[0]
            truth = np.asarray(load_volume(item["label"]))[0] > 0
            mask = np.asarray(model.postprocess(output))[0] > 0
            probs.append(prob)
            truths.append(truth)
            scores.append({"chosen": dice(mask, truth), "at_0.5": dice(prob > 0.5, truth)})
        sweep = {t: float(np.mean([dice(p > t, g) for p, g in zip(probs, truths)])) for t in LEVELS}
        best = max(sweep, key=sweep.get)
        norm = make_normalize(json.loads((plan_dir / "runs" / configurations[0] / "fold_0" / "config.json")
                                         .read_text())["normalize"])

        def case(item):
            image = load_volume(item["image"])
            return (np.asarray(norm(image) if norm else image, np.float32),
                    (np.asarray(load_volume(item["label"])) > 0).astype(np.uint8))

        window = window_baseline([case(i) for i in json.loads(datalist.read_text())["training"]],
                                 [case(i) for i in tests])[0]
        out = {"chosen": result["best"], "postprocess": chosen,
               "cv_cpu_s": cv_cpu, "cv_wall_s": cv_wall, "seconds": result["seconds"],
               "test_dice_chosen": float(np.mean([s["chosen"] for s in scores])),
               "test_dice_0.5": float(np.mean([s["at_0.5"] for s in scores])),
               "test_best_threshold": best, "test_dice_best": sweep[best], "window": window,
               "per_subject": scores,
               "cv_score": result["final"]["score"], "cv_baseline": (result["baseline"]["summary"] or {}).get("score")}
        print(json.dumps(out, indent=2))
        print(f"\nheld-out subjects: chosen {out['chosen']} Dice {out['test_dice_chosen']:.3f} ({json.dumps(chosen)}"
              f"; at 0.5 {out['test_dice_0.5']:.3f}; best {sweep[best]:.3f} at {best:g}) against the "
              f"window's {window:.3f}; slab cv {cv_cpu:.0f} CPU s ({cv_wall / 60:.1f} min)")
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
