"""slab and nnU-Net v2 side by side at equal CPU seconds, on real MRI, scored by one code path.

The task: grey matter of synthetic subjects built from the real MNI152 2009a template that
nilearn's wheel ships (``mni.subject``: smooth deformation, bias field, gamma, noise; images and
labels deformed together), 2 mm: six training, two validation and four test heads
(``bench_calibration.subjects_task``). Both systems train on the same training heads, validate on
the same validation heads (exported with ``slab export --nnunet``, whose ``splits_final.json``
nnU-Net's fold 0 uses) and predict the same four test heads.

For each budget B (CPU seconds of one training, both cores):

* slab: ``slab plan --budget`` fits each configuration's schedule to B (2.5D and 3D), trains the
  validation fold and predicts the test heads with ``slab predict --model`` (its plan's TTA and
  post-processing);
* nnU-Net v2 (2d and 3d_fullres, its own plans and recipe) with a small trainer subclass
  (``nnUNetTrainerSlabBudget``): its poly learning-rate schedule compressed to the number of
  epochs that fit the CPU seconds slab's matching configuration used (measured on the first
  epoch), data augmentation in the training process (``nnUNet_n_proc_DA=0``) so that every CPU
  second is counted, no final validation; ``nnUNetv2_predict`` with its default mirroring.

Both predictions are scored by ``slab.pipeline.evaluation.metrics``: Dice, surface dice at 0 and
2 mm (one voxel; 1 mm is below the 2 mm voxel and equals 0 mm); with the intensity-window baseline (the best window on the training heads). CPU seconds
are counted with ``resource.getrusage`` (self for slab's training, children for every command).
Neither system is converged at these budgets.

nnU-Net runs in its own venv (``--venv``, created on first use): ``nnunetv2`` installed with the
CPU torch pin of ``constraints.txt``; the index builds of torchvision and timm that it pulls in do
not load with that torch, and nnU-Net imports neither except for its ``primus`` trainers, so both
are removed and the ``primus`` trainers moved out of the package.

    make bench-nnunet                     # or: python benchmarks/bench_vs_nnunet.py
    python benchmarks/bench_vs_nnunet.py --budgets 240 720 [--work DIR] [--venv DIR] [--json out.json]
    python benchmarks/bench_vs_nnunet.py --quick  # a smoke run (tiny budgets)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

DATASET_ID = 951
PAIRS = (("2p5d", "2d"), ("3d", "3d_fullres"))  # slab configuration, nnU-Net configuration
# nnU-Net's iterations per epoch (training, validation): its 3d_fullres step (a 96x128x112 patch, batch
# 2, 32-320 features) takes tens of CPU seconds here, so its epochs are short enough to fit a budget
ITERATIONS = {"2d": (10, 2), "3d_fullres": (2, 1)}
# One CPU second of wall on each of the 2 cores, about: slab's plan fits wall minutes.
CPU_PER_WALL = 1.8
TRAINER = '''"""nnU-Net's recipe within a CPU-second budget (written by slab's benchmarks/bench_vs_nnunet.py)."""
import os
import resource

import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


def _cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class nnUNetTrainerSlabBudget(nnUNetTrainer):
    """Epochs of SLAB_ITERS iterations (SLAB_VAL_ITERS validation); after the first epoch, as many
    epochs as fit SLAB_BUDGET_CPU_S, the poly learning rate decaying over them; no final validation."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_iterations_per_epoch = int(os.environ.get("SLAB_ITERS", "10"))
        self.num_val_iterations_per_epoch = int(os.environ.get("SLAB_VAL_ITERS", "2"))
        self.budget = float(os.environ["SLAB_BUDGET_CPU_S"])
        self.num_epochs = 1000

    def run_training(self):
        self.on_train_start()
        start = _cpu()
        for epoch in range(self.current_epoch, 1000):
            if epoch >= self.num_epochs:
                break
            self.on_epoch_start()
            self.on_train_epoch_start()
            outputs = [self.train_step(next(self.dataloader_train)) for _ in range(self.num_iterations_per_epoch)]
            self.on_train_epoch_end(outputs)
            with torch.no_grad():
                self.on_validation_epoch_start()
                outputs = [self.validation_step(next(self.dataloader_val)) for _ in range(self.num_val_iterations_per_epoch)]
                self.on_validation_epoch_end(outputs)
            self.on_epoch_end()
            if epoch == 0:
                self.num_epochs = max(1, int(self.budget // max(_cpu() - start, 1e-6)))
                self.lr_scheduler.max_steps = self.num_epochs
                self.print_to_log_file(f"slab budget: {self.num_epochs} epochs fit {self.budget:.0f} CPU s")
        self.on_train_end()

    def perform_actual_validation(self, save_probabilities: bool = False):
        return None
'''


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run(command: list, env: dict | None = None, log: Path | None = None) -> float:
    """Run a command to completion; its CPU seconds (children's rusage)."""
    before = children_cpu()
    with open(log or os.devnull, "a") as out:
        done = subprocess.run([str(c) for c in command], env={**os.environ, **(env or {})}, stdout=out,
                              stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"{command[0]} failed ({done.returncode}); see {log}")
    return children_cpu() - before


def nnunet_venv(venv: Path) -> Path:
    """nnU-Net v2 in its own venv with the CPU torch; torchvision/timm removed, primus aside."""
    python = venv / "bin" / "python"
    if (venv / ".slab-ready").exists():
        return venv / "bin"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", "-c", ROOT / "constraints.txt", "nnunetv2"], check=True)
    subprocess.run([python, "-m", "pip", "uninstall", "-q", "-y", "torchvision", "timm"], check=True)
    package = Path(subprocess.run([python, "-c", "import nnunetv2, os; print(os.path.dirname(nnunetv2.__file__))"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    trainers = package / "training" / "nnUNetTrainer"
    if (trainers / "primus").exists():
        shutil.move(trainers / "primus", venv / "primus_unused")
    (trainers / "variants" / "slab_budget.py").write_text(TRAINER, encoding="utf-8")
    (venv / ".slab-ready").write_text("nnunetv2 installed for bench_vs_nnunet.py\n")
    return venv / "bin"


def prepare(work: Path) -> tuple[Path, Path, list[dict]]:
    """(slab datalist, nnU-Net raw dataset, test items): the subjects task written once."""
    from bench_calibration import subjects_task

    from slab.pipeline.cli import main as slab
    from slab.io.volumes import load_volume, save_volume

    datalist = subjects_task(work / "subjects")
    data = json.loads(datalist.read_text())
    raw = work / "nnUNet_raw" / f"Dataset{DATASET_ID}_Subjects"
    if not raw.exists():
        raw.parent.mkdir(parents=True, exist_ok=True)
        folds = {**data, "training": [{**i, "fold": 1} for i in data["training"]],
                 "validation": [{**i, "fold": 0} for i in data["validation"]]}  # nnU-Net's fold 0: slab's split
        (datalist.parent / "nnunet_folds.json").write_text(json.dumps(folds))
        assert slab(["export", "--nnunet", str(datalist.parent / "nnunet_folds.json"), str(raw)]) == 0
        (raw / "imagesTs").mkdir()
        for item in data["test"]:
            name = Path(item["image"]).parent.name
            save_volume(load_volume(datalist.parent / item["image"]), raw / "imagesTs" / f"{name}_0000.nii.gz")
    tests = [{"name": Path(i["image"]).parent.name, "image": datalist.parent / i["image"],
              "label": datalist.parent / i["label"]} for i in data["test"]]
    return datalist, raw, tests


def score(pred_path: Path, truth_path: Path) -> dict:
    from slab.pipeline.evaluation.metrics import surface_dice
    from slab.io.volumes import load_volume

    pred, truth = load_volume(pred_path), load_volume(truth_path)
    spacing = [float(s) for s in truth.meta["spacing"]]
    p, t = np.asarray(pred)[0] > 0, np.asarray(truth)[0] > 0
    total = p.sum() + t.sum()
    return {"dice": float(2 * (p & t).sum() / total) if total else float("nan"),
            "sd0": surface_dice(p, t, spacing, 0.0), "sd2": surface_dice(p, t, spacing, 2.0)}


def mean(rows: list[dict]) -> dict:
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def slab_side(datalist: Path, tests: list[dict], budget: float, work: Path) -> dict:
    """Plan with the budget, train each configuration's validation fold, predict the tests."""
    from slab.pipeline.planning.crossval import train_fold, write_plan

    plan = work / f"slab_plan_{int(budget)}"
    shutil.rmtree(plan, ignore_errors=True)
    _, plans = write_plan(datalist, plan, device="cpu", configurations=[s for s, _ in PAIRS],
                          minutes=budget / CPU_PER_WALL / 60)
    fold = plans["validation_fold"]
    out = {}
    inputs = work / "nnUNet_raw" / f"Dataset{DATASET_ID}_Subjects" / "imagesTs"
    for configuration, _ in PAIRS:
        before, start = self_cpu(), time.perf_counter()
        train_fold(plan, configuration, fold, resume=False)
        train_cpu, wall = self_cpu() - before, time.perf_counter() - start
        run_dir = plan / "runs" / configuration / f"fold_{fold}"
        masks = work / f"slab_pred_{configuration}_{int(budget)}"
        shutil.rmtree(masks, ignore_errors=True)
        predict_cpu = run([sys.executable, "-m", "slab", "predict", "-i", inputs, "-o", masks, "--model", run_dir,
                           "--device", "cpu"], log=work / "slab_predict.log")
        found = {re.sub(r"(_0000)?\.nii\.gz$", "", p.name): p for p in masks.iterdir()}
        scores = mean([score(found[t["name"]], t["label"]) for t in tests])
        epochs = json.loads((plan / "plans.json").read_text())["configurations"][configuration]["config"]["epochs"]
        out[configuration] = {**scores, "train_cpu_s": train_cpu, "train_wall_s": wall, "predict_cpu_s": predict_cpu,
                              "epochs": epochs}
        print(f"  slab {configuration} @ {budget:.0f}: {json.dumps(out[configuration])}", flush=True)
    return out


def nnunet_side(bin_dir: Path, work: Path, tests: list[dict], configuration: str, budget: float, tag: str,
                preprocessed: set) -> dict:
    env = {"nnUNet_raw": str(work / "nnUNet_raw"), "nnUNet_preprocessed": str(work / "nnUNet_preprocessed"),
           "nnUNet_results": str(work / f"nnUNet_results_{tag}"), "nnUNet_n_proc_DA": "1",
           "SLAB_BUDGET_CPU_S": str(budget), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
           "SLAB_ITERS": str(ITERATIONS[configuration][0]), "SLAB_VAL_ITERS": str(ITERATIONS[configuration][1])}
    log = work / "nnunet.log"
    out = {}
    if configuration not in preprocessed:
        out["preprocess_cpu_s"] = run([bin_dir / "nnUNetv2_plan_and_preprocess", "-d", DATASET_ID, "-c", configuration,
                                       "-np", "1", "--verify_dataset_integrity"], env, log)
        preprocessed.add(configuration)
        folder = work / "nnUNet_preprocessed" / f"Dataset{DATASET_ID}_Subjects"
        shutil.copy(work / "nnUNet_raw" / f"Dataset{DATASET_ID}_Subjects" / "splits_final.json", folder)
    # augmentation in the training process itself (0 workers), so that its CPU seconds are counted
    out["train_cpu_s"] = run([bin_dir / "nnUNetv2_train", DATASET_ID, configuration, "0", "-tr", "nnUNetTrainerSlabBudget",
                              "-device", "cpu"], {**env, "nnUNet_n_proc_DA": "0"}, log)
    pred = work / f"nnunet_pred_{configuration}_{tag}"
    shutil.rmtree(pred, ignore_errors=True)
    out["predict_cpu_s"] = run([bin_dir / "nnUNetv2_predict", "-i", work / "nnUNet_raw" / f"Dataset{DATASET_ID}_Subjects"
                                / "imagesTs", "-o", pred, "-d", DATASET_ID, "-c", configuration, "-f", "0", "-tr",
                                "nnUNetTrainerSlabBudget", "-device", "cpu", "-npp", "1", "-nps", "1"], env, log)
    out.update(mean([score(pred / f"{t['name']}.nii.gz", t["label"]) for t in tests]))
    results = work / f"nnUNet_results_{tag}"
    logs = sorted(results.rglob("training_log_*.txt"))
    epochs = [line for line in logs[-1].read_text().splitlines() if "slab budget:" in line] if logs else []
    out["epochs"] = int(epochs[-1].split("slab budget:")[1].split()[0]) if epochs else None
    print(f"  nnU-Net {configuration} @ {budget:.0f}: {json.dumps(out)}", flush=True)
    return out


def window(datalist: Path, tests: list[dict]) -> float:
    """The best intensity window on the training heads, scored on the test heads (Dice)."""
    from bench_calibration import window_baseline

    from slab.transforms.intensity import make_normalize
    from slab.io.volumes import load_volume

    norm = make_normalize({"scheme": "percentile", "lower": 0.5, "upper": 99.5})
    data = json.loads(datalist.read_text())

    def case(image, label):
        return np.asarray(norm(load_volume(image)), np.float32), (np.asarray(load_volume(label)) > 0).astype(np.uint8)

    train = [case(datalist.parent / i["image"], datalist.parent / i["label"]) for i in data["training"]]
    return window_baseline(train, [case(t["image"], t["label"]) for t in tests])[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[240.0, 720.0], help="CPU seconds per training")
    parser.add_argument("--work", default="/tmp/bench_vs_nnunet", help="data, plans, results (kept)")
    parser.add_argument("--venv", default=str(ROOT / ".nnunet-venv"), help="nnU-Net's own venv (made on first use)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: budgets of 30 CPU s")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    import torch

    from slab.pipeline.cli import quiet_libraries

    quiet_libraries()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    budgets = [30.0] if args.quick else args.budgets
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    start = self_cpu() + children_cpu()
    bin_dir = nnunet_venv(Path(args.venv))
    datalist, _, tests = prepare(work)
    results = {"window": window(datalist, tests), "budgets": {}}
    print(f"intensity window on the test heads: Dice {results['window']:.3f}", flush=True)
    preprocessed: set = set()
    for budget in budgets:
        ours = slab_side(datalist, tests, budget, work)
        theirs = {}
        for configuration, nnunet in PAIRS:  # nnU-Net gets the CPU seconds slab's matching configuration used
            theirs[nnunet] = nnunet_side(bin_dir, work, tests, nnunet, ours[configuration]["train_cpu_s"],
                                         f"{nnunet}_{int(budget)}", preprocessed)
        results["budgets"][str(int(budget))] = {"slab": ours, "nnunet": theirs}
    print()
    print(table(results))
    print(f"\nbenchmark total: {self_cpu() + children_cpu() - start:.0f} CPU s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")


def table(results: dict) -> str:
    rows = ["| budget (CPU s) | system | configuration | epochs | train CPU s | predict CPU s (4 heads) | Dice | "
            "surface dice @0 | @2 mm (1 voxel) |", "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for budget, sides in results["budgets"].items():
        for system, configs in (("slab", sides["slab"]), ("nnU-Net v2", sides["nnunet"])):
            for name, r in configs.items():
                rows.append(f"| {budget} | {system} | {name} | {r.get('epochs')} | {r['train_cpu_s']:.0f} | "
                            f"{r['predict_cpu_s']:.0f} | {r['dice']:.3f} | {r['sd0']:.3f} | {r['sd2']:.3f} |")
    rows.append(f"| – | intensity window (best on the training heads) | – | – | – | – | {results['window']:.3f} | | |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
