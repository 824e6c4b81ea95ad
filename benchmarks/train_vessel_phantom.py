"""Train a 2.5D vessel model on the phantom (CPU, a few minutes) and score how it is used.

    python benchmarks/train_vessel_phantom.py               # 3 train + 1 validation + 1 test phantom, 48^3
    python benchmarks/train_vessel_phantom.py --quick       # 32^3, fewer steps (a smoke run)
    python benchmarks/train_vessel_phantom.py --throughput  # training images/s, AMP vs fp32 on CUDA

Two models are trained with :func:`slab.pipeline.training.train` on the same vessel phantoms
(``slab.pipeline.data.phantom.make_phantom(kind="vessels")``), seeds fixed:

* ``2D``   — one slice (offsets ``[0]``), trained on xy slices only;
* ``2.5D`` — slabs of offsets ``[-1, 0, 1]``, trained on xy, zx and zy slices (the multi-view
  recipe).

Each is then run on a held-out test phantom through :func:`slab.pipeline.inference.predict_2p5d` in the
configurations below. The threshold of every configuration is the one chosen on the validation
phantom (``threshold_sweep``, surface dice at tolerance 0), so the test phantom is never used to
tune anything. Printed: surface dice at tolerance 0 (the SenNet metric), at 1 mm, and Dice, with
each row's ratio to the 2D row, then the training time. The numbers in the README come from this
script's own output.

``--throughput`` instead trains the factory's default 2.5D UNet (16-32-64-128 channels) on 128^3
phantoms with 128x128 crops for one epoch per setting and prints the training images (slabs) per
second from the run's log: fp32, and on CUDA also AMP (bfloat16 where supported, else float16).
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
import torch  # noqa: E402

from slab.networks import build_network, load_weights, network_divisor  # noqa: E402
from slab.core.device import amp_dtype, resolve_device  # noqa: E402
from slab.pipeline.inference import predict_2p5d  # noqa: E402
from slab.pipeline.evaluation.metrics import evaluate, threshold_sweep  # noqa: E402
from slab.pipeline.data.phantom import write_phantom  # noqa: E402
from slab.pipeline.training import load_checkpoint, train  # noqa: E402
from slab.transforms.intensity import PercentileNormalize  # noqa: E402
from slab.io.volumes import load_volume  # noqa: E402

THRESHOLDS = [round(0.05 * i, 2) for i in range(2, 19)]


def _datalist(root: Path, shape, n_train: int) -> tuple[Path, dict]:
    cases = {}
    for i, role in enumerate(["train"] * n_train + ["val", "test"]):
        image, label = write_phantom(root / f"{role}{i}", shape=shape, seed=100 + i, kind="vessels")
        cases.setdefault(role, []).append({"image": str(image), "label": str(label)})
    path = root / "datalist.json"
    path.write_text(json.dumps({"labels": ["vessel"], "training": cases["train"], "validation": cases["val"]}),
                    encoding="utf-8")
    return path, cases


def _predict(ckpt: dict, path: Path, image: torch.Tensor, planes, tta: str) -> np.ndarray:
    net = build_network(**ckpt["network"])
    load_weights(net, path)
    options = {k: v for k, v in ckpt["network"].items() if k not in ("name", "spatial_dims", "in_channels", "out_channels")}
    divisor = network_divisor(ckpt["network"]["name"], 2, **options)
    return np.asarray(predict_2p5d(net, image, planes=planes, offsets=ckpt["config"]["offsets"], tta=tta,
                                   batch_size=16, device="cpu", divisor=divisor))


def _load(item: dict, normalize: dict):
    image = load_volume(item["image"])
    spacing = tuple(image.meta["spacing"])
    label = (np.asarray(load_volume(item["label"])) > 0).astype(np.uint8)
    return torch.as_tensor(np.asarray(PercentileNormalize(**normalize)(image), dtype=np.float32)), label, spacing


def throughput(steps: int) -> None:
    """Training images per second of one epoch of ``steps`` steps, fp32 and (CUDA) AMP."""
    device = resolve_device(None)
    batch = 32 if device.type == "cuda" else 8
    with tempfile.TemporaryDirectory(prefix="slab-train-speed-") as tmp:
        root = Path(tmp)
        datalist, _ = _datalist(root, (128, 128, 128), n_train=2)
        for amp in ([False, True] if device.type == "cuda" else [False]):
            config = {"epochs": 1, "batch_size": batch, "samples_per_epoch": batch * steps, "patch_size": [128, 128],
                      "amp": amp, "progress": False, "warmup_epochs": 0, "val_every": 1,
                      "val": {"max_volumes": 1, "thresholds": [0.5], "tolerance_mm": 0.0}}
            result = train(datalist, config, root / f"amp{amp}", device=device)
            row = result["history"][-1]
            name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
            dtype = amp_dtype(device, amp)
            mode = "fp32" if dtype is None else f"AMP {'bf16' if dtype == torch.bfloat16 else 'fp16'}"
            print(f"{name}: {mode:8s} batch {batch}, {steps} steps of 3x128x128 slabs: "
                  f"{row['images_per_s']:.1f} images/s")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32^3 phantoms and fewer steps")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--throughput", action="store_true", help="training images/s (AMP vs fp32 on CUDA)")
    parser.add_argument("--steps", type=int, default=50, help="steps per --throughput epoch")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.throughput:
        throughput(args.steps)
        return 0
    shape = (32, 32, 32) if args.quick else (48, 48, 48)
    epochs, samples = (2, 64) if args.quick else (8, 256)
    common = {
        "epochs": epochs, "batch_size": 16, "samples_per_epoch": samples, "lr": 3e-3, "warmup_epochs": 1,
        "positive_fraction": 0.7, "seed": 0, "progress": False,
        "network": {"name": "unet", "channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1},
        "augment": {"prob": 0.3, "affine": False},
        "val": {"thresholds": THRESHOLDS, "tolerance_mm": 0.0, "tta": "none", "metric": "surface_dice_0"},
    }
    models = {
        "2D": {**common, "offsets": [0], "planes": ["xy"], "val": {**common["val"], "planes": ["xy"]}},
        "2.5D": {**common, "offsets": [-1, 0, 1], "planes": ["xy", "zx", "zy"],
                 "val": {**common["val"], "planes": ["xy", "zx", "zy"]}},
    }
    rows = [  # (name, model, planes, tta)
        ("2D: one slice, xy, no TTA", "2D", ("xy",), "none"),
        ("2.5D slabs, xy only, no TTA", "2.5D", ("xy",), "none"),
        ("2.5D slabs, xy+zx+zy, no TTA", "2.5D", ("xy", "zx", "zy"), "none"),
        ("2.5D slabs, xy+zx+zy, flips TTA", "2.5D", ("xy", "zx", "zy"), "flips"),
    ]
    with tempfile.TemporaryDirectory(prefix="slab-train-bench-") as tmp:
        root = Path(tmp)
        datalist, cases = _datalist(root, shape, n_train=2 if args.quick else 3)
        normalize = {"lower": 0.5, "upper": 99.5}
        val = _load(cases["val"][0], normalize)
        test = _load(cases["test"][0], normalize)
        trained, seconds = {}, {}
        for name, config in models.items():
            start = time.perf_counter()
            train(datalist, config, root / name, device="cpu")
            seconds[name] = time.perf_counter() - start
            trained[name] = (load_checkpoint(root / name / "best.pt"), root / name / "best.pt")
        results = []
        for label, model, planes, tta in rows:
            ckpt, path = trained[model]
            start = time.perf_counter()
            prob_val = _predict(ckpt, path, val[0], planes, tta)
            threshold = threshold_sweep(prob_val, val[1], THRESHOLDS, val[2], 0.0)["best"]["threshold"]
            prob_test = _predict(ckpt, path, test[0], planes, tta)
            scores = evaluate(prob_test, test[1], test[2], tolerances=(0.0, 1.0), threshold=threshold)
            results.append((label, threshold, scores["surface_dice"]["0.0"], scores["surface_dice"]["1.0"],
                            scores["dice"], time.perf_counter() - start))
    base = results[0][2]
    print(f"vessel phantom {shape[0]}^3 ({'quick' if args.quick else 'full'}), CPU, {args.threads} threads; "
          f"train {len(cases['train'])} / validation 1 / test 1 phantoms; {epochs} epochs x {samples} slabs")
    print(f"{'inference on the test phantom':34s} {'thr':>5s} {'SD@0':>7s} {'SD@1mm':>7s} {'Dice':>7s} "
          f"{'SD@0 vs 2D':>11s} {'time s':>7s}")
    for label, threshold, sd0, sd1, dice, secs in results:
        print(f"{label:34s} {threshold:5.2f} {sd0:7.4f} {sd1:7.4f} {dice:7.4f} {sd0 / base:10.2f}x {secs:7.1f}")
    print("training time: " + ", ".join(f"{name} {secs:.0f} s" for name, secs in seconds.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
