"""Self-configuration end to end: ``slab plan`` -> ``slab cv`` -> ``slab predict --model`` on real
data a package ships and on the vessel phantoms; prints each cross-validated table (2d vs 2.5d vs
3d vs their ensembles, at threshold 0.5, with tuned thresholds, with the chosen post-processing,
and the no-network intensity-window baseline) and the time of every stage.

    pip install -e .[bench]                  # nilearn: the MNI152 template and tissue maps (nothing downloaded)
    python benchmarks/bench_plan.py          # both datasets, 4 folds each (~20 min on 2 cores)
    python benchmarks/bench_plan.py --quick  # a smoke run
    python benchmarks/bench_plan.py --out DIR --only mni152 && \
        python benchmarks/bench_plan.py --out DIR --converge 30 1280  # does 2.5D pass the baseline?

Datasets:

* **MNI152 grey matter** (``nilearn.datasets``' ICBM152 2009a T1 template and its grey-matter
  probability map, the uint8 files in nilearn's own package folder): the 1 mm template
  block-averaged to 2 mm, the label ``gm > 0.5``; four cases, the four quadrant crops (left/right x front/back,
  overlapping by 8 voxels).
* **Vessel phantoms** (``slab.pipeline.data.phantom``, kind ``vessels``): four 48^3 volumes, seeds 0-3.

The plans are written by ``write_plan`` as ``slab plan`` writes them; then, to fit a 2-core
machine, every configuration's schedule in ``plans.json`` is shortened the way a user edits a
plan (``--epochs`` and ``--samples``; validation every other epoch). Everything else (planes,
offsets, patch, network, batch size, normalisation) is the plan's own.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def mni152_cases(root: Path) -> Path:
    """Four quadrant crops of the 2 mm MNI152 template with grey matter as the label."""
    import nibabel as nib
    from nilearn import datasets

    data = Path(datasets.__file__).parent / "data"
    t1 = nib.load(data / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")  # uint8, 0-255
    gm = nib.load(data / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz")  # uint8, 0-255 probability
    image = np.asarray(t1.dataobj, dtype=np.float32)
    label = np.asarray(gm.dataobj, dtype=np.float32) / 255.0
    shape = [s // 2 * 2 for s in image.shape]

    def down(a):
        a = a[: shape[0], : shape[1], : shape[2]]
        return a.reshape(shape[0] // 2, 2, shape[1] // 2, 2, shape[2] // 2, 2).mean(axis=(1, 3, 5))

    image2, label2 = down(image), down(label) > 0.5
    affine = np.array(t1.affine, dtype=np.float64)
    affine[:3, :3] *= 2
    x, y = image2.shape[0] // 2, image2.shape[1] // 2
    items = []
    for i, (xs, ys) in enumerate([(slice(0, x + 4), slice(0, y + 4)), (slice(x - 4, None), slice(0, y + 4)),
                                  (slice(0, x + 4), slice(y - 4, None)), (slice(x - 4, None), slice(y - 4, None))]):
        shift = np.eye(4)
        shift[:3, 3] = [xs.start or 0, ys.start or 0, 0]
        case = root / f"mni_{i}"
        case.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.round(image2[xs, ys]).astype(np.int16), affine @ shift), case / "image.nii.gz")
        nib.save(nib.Nifti1Image(label2[xs, ys].astype(np.uint8), affine @ shift), case / "label.nii.gz")
        items.append({"image": f"mni_{i}/image.nii.gz", "label": f"mni_{i}/label.nii.gz", "case": f"mni_{i}"})
    path = root / "datalist.json"
    path.write_text(json.dumps({"training": items, "labels": ["grey_matter"]}), encoding="utf-8")
    return path


def vessel_cases(root: Path, size: int) -> Path:
    from slab.pipeline.data.phantom import write_phantom

    items = []
    for seed in range(4):
        write_phantom(root / f"vessels_{seed}", shape=(size,) * 3, seed=seed, kind="vessels")
        items.append({"image": f"vessels_{seed}/image.nii.gz", "label": f"vessels_{seed}/label.nii.gz",
                      "case": f"vessels_{seed}"})
    path = root / "datalist.json"
    path.write_text(json.dumps({"training": items, "labels": ["vessel"]}), encoding="utf-8")
    return path


def shorten(plan_dir: Path, epochs: int, samples: dict) -> None:
    """Every configuration's schedule cut to ``epochs`` x ``samples[dims]`` (validation every 2)."""
    path = plan_dir / "plans.json"
    plans = json.loads(path.read_text(encoding="utf-8"))
    for plan in plans["configurations"].values():
        cfg = plan["config"]
        three = cfg["task"] == "segmentation_3d"
        cfg["epochs"] = epochs
        cfg["warmup_epochs"] = min(1.0, epochs / 4)
        cfg["samples_per_epoch"] = max(cfg["batch_size"], samples[3 if three else 2] // cfg["batch_size"]
                                       * cfg["batch_size"])
        cfg["val_every"] = 2
        cfg["progress"] = False
        plan["reasons"]["epochs"] = f"shortened by benchmarks/bench_plan.py to fit 2 cores: {epochs} epochs"
    path.write_text(json.dumps(plans, indent=2), encoding="utf-8")


def run(name: str, datalist: Path, plan_dir: Path, args) -> dict:
    from slab.pipeline.inference import predict_file
    from slab.pipeline.inference.ensemble import load_model
    from slab.pipeline.planning.crossval import run_cv, write_plan
    from slab.pipeline.planning.plans import describe

    times = {}
    start = time.perf_counter()
    fp, plans = write_plan(datalist, plan_dir, device="cpu", n_folds=4)
    times["plan"] = time.perf_counter() - start
    print(f"\n## {name}\n\n```\n{describe(fp, plans)}\n```\n")
    shorten(plan_dir, args.epochs, {2: args.samples_2d, 3: args.samples_3d})
    start = time.perf_counter()
    result = run_cv(plan_dir, device="cpu", log=lambda line: print("   ", line, flush=True))
    times["cv"] = time.perf_counter() - start
    model = load_model(plan_dir, device="cpu")
    first = json.loads((plan_dir / "datalist.json").read_text())["training"][0]
    start = time.perf_counter()
    predict_file(first["image"], plan_dir / "predicted.nii.gz", model)
    times["predict"] = time.perf_counter() - start
    print()
    print(result["markdown"])
    print(f"chosen: {result['best']}, post-processing {json.dumps(result['postprocessing']['labels'])}")
    print("seconds (train + predict held-out, all folds): "
          + ", ".join(f"{c} {s:.0f}" for c, s in result["seconds"].items()))
    print(f"plan {times['plan']:.1f} s, cv {times['cv']:.0f} s, predict --model (ensemble of "
          f"{len(model)} on {first['case']}) {times['predict']:.1f} s")
    return {"result": result, "times": times}


def converge(plan_dir: Path, configuration: str, epochs: int, samples: int) -> None:
    """One fold of one configuration trained ``epochs`` x ``samples`` (the plan's network, batch and
    normalisation), scored on the fold's held-out cases beside the fold's baseline window."""
    from slab.pipeline.planning.crossval import train_fold
    from slab.pipeline.planning.selection import case_scores
    from slab.io.volumes import load_volume

    out = plan_dir / "runs" / f"{configuration}_long" / "fold_0"
    start = time.perf_counter()
    train_fold(plan_dir, configuration, 0, out=out, resume=False,
               overrides={"epochs": epochs, "samples_per_epoch": samples, "val_every": max(1, epochs // 5),
                          "warmup_epochs": 1.0, "progress": False})
    seconds = time.perf_counter() - start
    from slab.pipeline.inference.ensemble import load_model

    model = load_model(out, device="cpu")
    data = json.loads((plan_dir / "datalist.json").read_text())
    held = [i for i in data["training"] if int(i["fold"]) == 0]
    scores = []
    for item in held:
        mask = np.asarray(model.postprocess(model(load_volume(item["image"]))))
        truth = np.asarray(load_volume(item["label"])) > 0
        scores.append(case_scores(mask, truth, (2.0, 2.0, 2.0), 2.0, [False])[0]["dice"])
    baseline = json.loads((plan_dir / "cv" / "table.json").read_text())["baseline"]["windows"]["0"][0]
    print(f"\n{configuration} fold 0, {epochs} epochs x {samples} samples ({seconds:.0f} s): held-out Dice "
          f"{np.mean(scores):.4f} at threshold {model.postprocess.binarise.threshold}; the fold's baseline window "
          f"{baseline['low']:.3f}-{baseline['high']:.3f} (training Dice {baseline['train_dice']:.4f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="where the datasets and plans go (default: a temporary folder)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--samples-2d", type=int, default=640, help="2D samples per epoch")
    parser.add_argument("--samples-3d", type=int, default=24, help="3D patches per epoch")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 epochs, small vessels")
    parser.add_argument("--only", choices=("mni152", "vessels"))
    parser.add_argument("--rescore", action="store_true",
                        help="score the out-of-fold predictions of an earlier run in --out again (no training)")
    parser.add_argument("--converge", nargs=2, type=int, metavar=("EPOCHS", "SAMPLES"),
                        help="after the MNI152 cv (in --out), train its 2p5d fold 0 this long and score it")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.samples_2d, args.samples_3d = 2, 64, 4
    import torch

    from slab.pipeline.cli import quiet_libraries

    quiet_libraries()  # slab's own warnings as one line each, as the CLI shows them
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, epochs {args.epochs}, "
          f"{args.samples_2d} 2D samples / {args.samples_3d} 3D patches per epoch")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        if args.rescore:  # the saved out-of-fold predictions of a run in --out, scored by this code
            from slab.pipeline.planning.crossval import evaluate_cv, table_markdown

            for name in ("mni152", "vessels"):
                plan = root / name / "plan"
                times = json.loads((plan / "cv" / "times.json").read_text())
                configurations = list(json.loads((plan / "plans.json").read_text())["configurations"])
                result = evaluate_cv(plan, configurations, [0, 1, 2, 3])
                seconds = {c: sum(v for k, v in times.items() if k.startswith(c + "/")) for c in configurations}
                print(f"\n## {name}\n\n{table_markdown(result, seconds)}")
                print(f"chosen: {result['best']}, post-processing {json.dumps(result['postprocessing']['labels'])}")
            return
        if args.converge:
            converge(root / "mni152" / "plan", "2p5d", *args.converge)
            return
        if args.only in (None, "mni152"):
            run("MNI152 grey matter (4 quadrant crops, 2 mm)", mni152_cases(root / "mni152"), root / "mni152" / "plan",
                args)
        if args.only in (None, "vessels"):
            run("Vessel phantoms (4 x 48^3)", vessel_cases(root / "vessels", 32 if args.quick else 48),
                root / "vessels" / "plan", args)


if __name__ == "__main__":
    main()
