"""The same 2.5D plan with a from-scratch UNet and with an encoder UNet, at equal CPU budgets.

Issue 33's evidence: the write-ups' recipe puts a slab into a 2D encoder pretrained on ImageNet.
No published weights are reachable from this machine, so both networks start from scratch; what
is measured is the architecture at an equal budget, not what ImageNet initialisation adds.

Each task (``bench_calibration``'s: MNI152 grey matter and tissue in blocks along y, the vessel
phantoms) is planned by ``slab plan --configurations 2p5d --budget MINUTES`` twice: as it comes
(a UNet) and with ``--encoder efficientnet-b0`` (MONAI's ``FlexibleUNet``; ``encoder_weights``
set to null: from scratch). The plan scales each schedule to the same minutes from its own timed
step; each run is trained on the training block, validated on the validation block, and scored on
the held-out test block beside the intensity window. CPU seconds are counted
(``resource.getrusage``).

    python benchmarks/bench_encoder.py [--tasks gm,vessels] [--minutes 5] [--json out.json]
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

from bench_calibration import mean_scores, mni_task, score, vessel_task, window_baseline  # noqa: E402

NETWORKS = {"unet": None, "efficientnet-b0 encoder UNet": "efficientnet-b0"}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run(task: str, datalist: Path, plan_dir: Path, encoder, minutes: float) -> dict:
    from slab.io.volumes import load_volume
    from slab.networks import parameter_count
    from slab.pipeline.inference.ensemble import load_model
    from slab.pipeline.planning.crossval import train_fold, write_plan
    from slab.pipeline.training.validation import truth_masks

    _, plans = write_plan(datalist, plan_dir, device="cpu", configurations=["2p5d"], minutes=minutes, encoder=encoder)
    path = plan_dir / "plans.json"
    plans = json.loads(path.read_text())
    cfg = plans["configurations"]["2p5d"]["config"]
    cfg["report_volumes"] = 0
    if encoder:
        cfg["network"]["encoder_weights"] = None  # no published weights reach this machine: from scratch
    path.write_text(json.dumps(plans, indent=2))
    fold = plans["validation_fold"]
    start, wall = cpu_seconds(), time.perf_counter()
    train_fold(plan_dir, "2p5d", fold, resume=False)
    train_cpu, train_wall = cpu_seconds() - start, time.perf_counter() - wall
    model = load_model(plan_dir / "runs" / "2p5d" / f"fold_{fold}", device="cpu")
    data = json.loads(datalist.read_text())
    fmt, n_labels = data.get("label_format", "channels"), len(data["labels"])
    per_case, cases = [], []
    for item in data["test"]:
        image = load_volume(datalist.parent / item["image"])
        raw = np.asarray(image)[0]
        air = raw < 5 if task != "vessels" else raw < np.percentile(raw, 5)
        truth = truth_masks(np.asarray(load_volume(datalist.parent / item["label"])), fmt, n_labels)
        start = cpu_seconds()
        per_case.append(score(model, image, truth, air, getattr(model, "exclusive", False)))
        cases.append((image, truth))
    network = {k: v for k, v in cfg["network"].items() if k not in ("name", "encoder_weights")}
    in_channels = len(cfg["offsets"])
    out = mean_scores(per_case)
    out.update(network=cfg["network"]["name"], patch=cfg["patch_size"], batch=cfg["batch_size"],
               epochs=cfg["epochs"], samples_per_epoch=cfg["samples_per_epoch"], train_cpu_s=train_cpu,
               train_wall_s=train_wall, expected_min=plans["configurations"]["2p5d"]["time"]["total_min"],
               parameters=parameter_count(cfg["network"]["name"], 2, in_channels, n_labels + (1 if getattr(
                   model, "exclusive", False) else 0), **network))
    return out


def window(datalist: Path, plan_dir: Path) -> list[float]:
    """The intensity window with the best mean Dice on the training cases, on the test cases."""
    from slab.io.volumes import load_volume
    from slab.pipeline.training.validation import truth_masks
    from slab.transforms.intensity import make_normalize

    data = json.loads(datalist.read_text())
    fmt, n_labels = data.get("label_format", "channels"), len(data["labels"])
    plans = json.loads((plan_dir / "plans.json").read_text())
    run = plan_dir / "runs" / "2p5d" / f"fold_{plans['validation_fold']}"
    norm = make_normalize(json.loads((run / "config.json").read_text())["normalize"])  # the run's own statistics

    def case(item):
        image = load_volume(datalist.parent / item["image"])
        return (np.asarray(norm(image) if norm else image, np.float32),
                truth_masks(np.asarray(load_volume(datalist.parent / item["label"])), fmt, n_labels))

    return window_baseline([case(i) for i in data["training"]], [case(i) for i in data["test"]])


def table(results: dict) -> str:
    lines = ["| task | network | parameters | patch x batch | steps (epochs x samples / batch) | train CPU s | "
             "label | Dice @0.5 | Dice @chosen | best threshold | Dice @best | ECE body | window Dice |",
             "|" + "---|" * 13]
    for task, result in results.items():
        for name, r in result["networks"].items():
            steps = r["epochs"] * r["samples_per_epoch"] // r["batch"]
            for c, s in enumerate(r["labels"]):
                lines.append(f"| {task} | {name} | {r['parameters'] / 1e6:.1f} M | {'x'.join(map(str, r['patch']))} x "
                             f"{r['batch']} | {steps} ({r['epochs']} x {r['samples_per_epoch']}) | {r['train_cpu_s']:.0f} | "
                             f"{c + 1} | {s['dice_0.5']:.3f} | {s['dice_chosen']:.3f} | {s['best_threshold']:g} | "
                             f"{s['dice_best']:.3f} | {s['ece_body']:.3f} | {result['window'][c]:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="gm,vessels")
    parser.add_argument("--minutes", type=float, default=5.0, help="the plan's --budget of each training run")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    import torch

    from slab.pipeline.cli import quiet_libraries

    quiet_libraries()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, --budget {args.minutes:g} min per run",
          flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks.split(","):
            root = Path(tmp) / task
            datalist = vessel_task(root) if task == "vessels" else mni_task(root, task)
            results[task] = {"networks": {}}
            for name, encoder in NETWORKS.items():
                plan_dir = root / f"plan_{encoder or 'unet'}"
                results[task]["networks"][name] = run(task, datalist, plan_dir, encoder, args.minutes)
                print(f"  {task} {name}: " + json.dumps(results[task]["networks"][name]), flush=True)
            results[task]["window"] = window(datalist, plan_dir)
    print()
    print(table(results))
    ratios = [r["networks"]["efficientnet-b0 encoder UNet"]["train_cpu_s"] / r["networks"]["unet"]["train_cpu_s"]
              for r in results.values()]
    print(f"\ntraining CPU seconds, encoder UNet / UNet: {', '.join(f'{x:.2f}' for x in ratios)}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
