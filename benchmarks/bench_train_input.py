"""Training input pipeline: slab's sampler and training step beside the network's own step rate.

    python benchmarks/bench_train_input.py            # 2 phantoms of 128^3, 64x64 crops, 40 steps
    python benchmarks/bench_train_input.py --quick    # 64^3, 10 steps

One run, one torch thread (``--threads``), the shipped 2.5D recipe: the factory's default UNet
(16-32-64-128 channels), 3-slice slabs over xy, zx and zy, 64x64 crops, batch 16, slab's default
augmentation (flips, 90° turns, affine, intensity). Rows:

* the sampler alone: samples/s of the training dataset as the loader calls it (draw, crop-first
  slab, augmentation, per-(epoch, index) seeding);
* the network alone: forward + backward + AdamW step on batches built beforehand (the rate
  training cannot beat);
* ``slab train``'s epoch (its own ``images_per_s``, loading included), in the main process and
  with one DataLoader worker (the worker takes the second core).

Goal: training at >= 0.9x the network-alone rate.
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

import torch  # noqa: E402

from common import print_table  # noqa: E402
from slab.pipeline.data.phantom import write_phantom  # noqa: E402
from slab.pipeline.training.loop import build_trainer  # noqa: E402

GOAL = 0.9


def datalist(root: Path, shape) -> Path:
    cases = []
    for i in range(2):
        image, label = write_phantom(root / f"case{i}", shape=shape, seed=10 + i, kind="vessels")
        cases.append({"image": str(image), "label": str(label)})
    path = root / "datalist.json"
    path.write_text(json.dumps({"labels": ["vessel"], "training": cases}), encoding="utf-8")
    return path


def config(batch: int, steps: int, workers: int) -> dict:
    return {"epochs": 1, "batch_size": batch, "samples_per_epoch": batch * steps, "patch_size": [64, 64],
            "offsets": [-1, 0, 1], "planes": ["xy", "zx", "zy"], "progress": False, "warmup_epochs": 0,
            "num_workers": workers, "seed": 0}


def network_rate(trainer, batches: list) -> float:
    """Images/s of forward + backward + optimizer step on prepared batches, the trainer's own
    model, loss and optimizer."""
    model, task, optimizer = trainer.network, trainer.task, trainer.optimizer
    model.train()
    for batch in batches[:2]:  # warm-up
        optimizer.zero_grad(set_to_none=True)
        task.loss(model, batch, torch.device("cpu")).backward()
        optimizer.step()
    start, images = time.perf_counter(), 0
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        task.loss(model, batch, torch.device("cpu")).backward()
        optimizer.step()
        images += task.batch_images(batch)
    return images / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64^3 phantoms, 10 steps")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    parser.add_argument("--steps", type=int, help="training steps per measured epoch (default 40, 10 with --quick)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = (64, 64, 64) if args.quick else (128, 128, 128)
    steps = args.steps or (10 if args.quick else 40)
    batch = 16
    with tempfile.TemporaryDirectory(prefix="slab-train-input-") as tmp:
        root = Path(tmp)
        path = datalist(root, shape)
        trainer = build_trainer(path, config(batch, steps, 0), root / "probe", device="cpu")
        n = batch * steps
        trainer.samples[0]
        start = time.perf_counter()
        samples = [trainer.samples[i] for i in range(n)]
        sampler_rate = n / (time.perf_counter() - start)
        batches = [trainer.task.collate(samples[i:i + batch]) for i in range(0, n, batch)]
        net_rate = network_rate(trainer, batches)
        del trainer, samples, batches
        rows = [("sampler alone (draw, slab, augmentation)", f"{sampler_rate:.0f} samples/s", "-", "-"),
                ("network alone: forward + backward + step, batches prepared", f"{net_rate:.1f} images/s", "1.00x", "-")]
        ok = True
        for workers in (0, 1):
            result = build_trainer(path, config(batch, steps, workers), root / f"run{workers}", device="cpu").run()
            rate = result["history"][-1]["images_per_s"]
            ok &= rate / net_rate >= GOAL
            where = "main process" if workers == 0 else "1 DataLoader worker"
            rows.append((f"`slab train` epoch, loading in the {where}", f"{rate:.1f} images/s", f"{rate / net_rate:.2f}x",
                         f">= {GOAL}x"))
    print(f"Training input, {shape[0]}^3 vessel phantoms x 2, 3x64x64 slabs, batch {batch}, {steps} steps, "
          f"{args.threads} torch thread{'s' * (args.threads != 1)}, CPU\n")
    print_table(("what", "rate", "vs network alone", "goal"), "lrrr", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
