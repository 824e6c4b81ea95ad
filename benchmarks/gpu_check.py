"""The CUDA paths, measured in one short run (at most ~8 minutes on one GPU): prepared for a task
that is lent a GPU (``device`` tool), runnable on the CPU as a smoke test (``--tiny``).

1. Training steps of the 2.5D network (UNet 16-32-64-128, 3-slice slabs, 128x128 patches, batch
   32) and the 3D network (UNet 16-32-64-128, 64^3 patches, batch 4) in fp32, bf16 and fp16
   autocast (fp16 with a GradScaler): steps/s, images/s, peak memory.
2. A short ``slab train`` of each (2 epochs on vessel phantoms) with ``amp`` on and off: the
   validation Dice of each, and their agreement.
3. Prediction of a 256^3 volume: ``predict_2p5d`` (three planes) and ``predict_3d`` (sliding
   window, overlap 0.5) in Mvoxel/s for each precision, beside the network's pure forward rate
   on the same batches (how much the engine costs around the network).

    python benchmarks/gpu_check.py --json gpu.json            # on the GPU machine
    python benchmarks/gpu_check.py --device cpu --tiny        # smoke test

On the device machine (torch 2.11, no MONAI): carry wheels of slab's dependencies built here
(``pip download`` into an ignored folder named in ``carry``) and install them with
``pip install --no-index --find-links``; see /work/.library/device/README.md.
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

PRECISIONS = ("fp32", "bf16", "fp16")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def train_steps(dims: int, precision: str, device, tiny: bool) -> dict:
    """Steps/s, images/s and peak memory of training steps at one precision."""
    from slab.networks import build_network
    from slab.core.device import amp_dtype, autocast

    dtype = amp_dtype(device, precision)
    net = build_network("unet", dims, 3 if dims == 2 else 1, 1, channels=[16, 32, 64, 128], strides=[2, 2, 2],
                        num_res_units=1).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    batch, size = (32, (128, 128)) if dims == 2 else (4, (64, 64, 64))
    if tiny:
        batch, size = (4, (32, 32)) if dims == 2 else (2, (16, 16, 16))
    x = torch.randn(batch, 3 if dims == 2 else 1, *size, device=device)
    y = (torch.rand(batch, 1, *size, device=device) > 0.8).float()
    loss_fn = torch.nn.BCEWithLogitsLoss()
    steps = 3 if tiny else 30
    _peak_reset(device)
    for i in range(steps + 3):
        if i == 3:
            _sync(device)
            start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            loss = loss_fn(net(x).float(), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    _sync(device)
    seconds = time.perf_counter() - start
    return {"steps_s": steps / seconds, "images_s": steps * batch / seconds, "peak_gib": _peak(device)}


def short_training(root: Path, dims: int, amp: bool, device, tiny: bool) -> float:
    """Validation Dice of a short ``slab train`` on the vessel phantoms."""
    from slab.pipeline.data.phantom import write_phantom
    from slab.pipeline.training import train

    size = 32 if tiny else 96
    items = []
    for seed in range(3):
        image, label = write_phantom(root / f"p{seed}", shape=(size,) * 3, seed=seed, kind="vessels")
        items.append({"image": str(image), "label": str(label), "fold": int(seed == 2)})
    datalist = {"training": items, "n_folds": 2}
    cfg = {"task": "segmentation_2p5d" if dims == 2 else "segmentation_3d", "epochs": 2, "amp": amp,
           "network": {"name": "unet", "channels": [16, 32, 64, 128], "strides": [2, 2, 2]}, "progress": False,
           "batch_size": 8 if tiny else (32 if dims == 2 else 4), "samples_per_epoch": 16 if tiny else 1024,
           "patch_size": [32, 32] if dims == 2 else [32, 32, 32], "report_volumes": 0,
           "val": {"metric": "dice"}}
    if dims == 3:
        cfg["samples_per_epoch"] = 8 if tiny else 64
    result = train(datalist, cfg, root / f"run{dims}{amp}", fold=1, device=device)
    return float(result["history"][-1]["val_dice"])


def prediction(dims: int, precision: str, device, tiny: bool) -> dict:
    """Mvoxel/s of whole-volume prediction and of the network's forward passes alone."""
    from slab.networks import build_network
    from slab.core.device import amp_dtype, autocast
    from slab.pipeline.inference import predict_2p5d, predict_3d

    n = 48 if tiny else 256
    volume = torch.rand(1, n, n, n)
    net = build_network("unet", dims, 3 if dims == 2 else 1, 1, channels=[16, 32, 64, 128], strides=[2, 2, 2]).to(device)
    _sync(device)
    start = time.perf_counter()
    if dims == 2:
        predict_2p5d(net, volume, batch_size=32, device=device, amp=precision, divisor=8)
        batches, shape = 3 * n // 32 + 3, (32, 3, n, n)
    else:
        predict_3d(net, volume, roi_size=(64, 64, 64) if not tiny else (16, 16, 16), overlap=0.5, sw_batch_size=4,
                   device=device, amp=precision)
        roi = 64 if not tiny else 16
        windows = int(np.ceil((n - roi) / (roi // 2)) + 1) ** 3
        batches, shape = -(-windows // 4), (4, 1, roi, roi, roi)
    _sync(device)
    engine = time.perf_counter() - start
    x = torch.randn(*shape, device=device)
    dtype = amp_dtype(device, precision)
    with torch.inference_mode(), autocast(device, dtype):
        net.eval()(x)
        _sync(device)
        start = time.perf_counter()
        for _ in range(batches):
            net(x)
        _sync(device)
    forward = time.perf_counter() - start
    voxels = n ** 3 / 1e6
    return {"engine_mvox_s": voxels / engine, "forward_mvox_s": voxels / forward, "engine_over_forward": engine / forward}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: a smoke test on any device")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    device = torch.device(args.device)
    precisions = [p for p in PRECISIONS if device.type == "cuda" or p == "fp32"]
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "train_steps": {}, "prediction": {}, "short_training": {}}
    for dims in (2, 3):
        for precision in precisions:
            out["train_steps"][f"{dims}d {precision}"] = train_steps(dims, precision, device, args.tiny)
            out["prediction"][f"{dims}d {precision}"] = prediction(dims, precision, device, args.tiny)
            print(f"{dims}d {precision}: train {out['train_steps'][f'{dims}d {precision}']}, "
                  f"predict {out['prediction'][f'{dims}d {precision}']}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for dims in (2, 3):
            dice = {amp: short_training(Path(tmp), dims, amp, device, args.tiny) for amp in (False, True)}
            out["short_training"][f"{dims}d"] = {"dice_fp32": dice[False], "dice_amp": dice[True],
                                                 "difference": abs(dice[True] - dice[False])}
            print(f"{dims}d short training: {out['short_training'][f'{dims}d']}", flush=True)
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
