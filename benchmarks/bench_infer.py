"""Inference speed and memory: slab's engines beside the computation they cannot avoid, same run.

    python benchmarks/bench_infer.py            # 128^3 2.5D, 96^3 3D, a 1024x1024x512 stack
    python benchmarks/bench_infer.py --quick    # 64^3 2.5D, 64^3 3D, a 256x256x128 stack

Rows:

* pipeline overhead: ``predict_2p5d`` over xy, zx and zy of a cube with a MONAI UNet (the
  factory's default 16-32-64-128 channels, 3 slab channels) on the CPU. The ratio is the run's
  total wall time over the time its network forward passes take in the same run (the network
  is wrapped in a timer). Target at most 1.10x. For scale, the notes give the forward passes
  over the same slab batches built beforehand and timed in a plain loop, alternated with our
  runs (on a machine shared with other work this one drifts with the load more than the ratio).
* 3D: ``predict_3d`` against MONAI's ``sliding_window_inference`` called directly (under
  ``torch.no_grad``, then the sigmoid) with the same 3D UNet, ROI, overlap 0.5 and Gaussian
  blending; outputs must be identical. Target: at least as fast (ratio >= 1).
* memory: a uint16 slice stack of uncompressed TIFFs read lazily, a one-layer network
  (``Conv2d(3, 1, 3)``), ``memory_budget`` 1 GiB, float16 result on disk; the peak resident set
  of a fresh process (VmHWM, imports included), for one plane and for all three. Targets 3 GiB
  and 4 GiB at 1024x1024x512. Four xy slices of the result are checked against the network
  applied to slabs read straight from the TIFFs.
* with CUDA: voxels per second of three-plane 2.5D inference in float32 and with AMP, and the
  peak GPU memory.

Timed rows alternate ours and the reference, best of N. Data is generated into a temporary
directory and removed afterwards. Exit status 1 when an output differs.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch
from monai.inferers import sliding_window_inference
from scipy import ndimage as ndi

from common import ROOT, best_of, print_table, run_probe

sys.path.insert(0, str(ROOT))
from slab.networks import build_network  # noqa: E402
from slab.pipeline.inference import PLANES, predict_2p5d, predict_3d  # noqa: E402
from slab.transforms.slabs import iter_slab_batches  # noqa: E402

GIB = 1 << 30

# Runs in a fresh interpreter: the lazy stack through predict_2p5d with a one-layer network;
# prints the peak resident set (VmHWM: the kernel's high-water mark of the whole process).
MEMORY_PROBE = r"""
import json, time
import numpy as np, tifffile, torch
from pathlib import Path
from common import proc_status
from slab.pipeline.inference import predict_2p5d
from slab.io.volumes import load_volume

stack, planes, budget, out = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3]), sys.argv[4]

torch.manual_seed(0)
net = torch.nn.Conv2d(3, 1, 3, padding=1)
scale = lambda block: block.to(torch.float32).mul_(1 / 65535)
volume = load_volume(stack, lazy=True)
baseline = proc_status("VmRSS")["VmRSS"]
start = time.perf_counter()
probs = predict_2p5d(net, volume, planes=planes, memory_budget=budget, out_path=out, preprocess=scale)
seconds = time.perf_counter() - start
peak = proc_status("VmHWM")["VmHWM"]
error = 0.0
if planes == ["xy"]:
    files = sorted(Path(stack).glob("*.tif"))
    with torch.no_grad():
        for z in np.linspace(0, volume.shape[3] - 1, 4).astype(int):
            slab = [tifffile.imread(files[min(max(z + o, 0), volume.shape[3] - 1)]).T for o in (-1, 0, 1)]
            x = scale(torch.from_numpy(np.stack(slab).astype(np.int32)))[None]
            expected = torch.sigmoid(net(x))[0, 0]
            error = max(error, float((probs[0, :, :, z].float() - expected).abs().max()))
print(json.dumps({"peak": peak, "baseline": baseline, "seconds": seconds, "error": error,
                  "dtype": str(probs.dtype), "shape": list(probs.shape)}))
"""


class Timed(torch.nn.Module):
    """A network that adds up the time spent in its forward passes."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net, self.seconds = net, 0.0

    def forward(self, x):
        if x.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        y = self.net(x)
        if y.is_cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - start
        return y


def smooth_volume(size: int, channels: int = 1, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    field = ndi.gaussian_filter(rng.standard_normal((channels, size, size, size)).astype(np.float32), (0, 2, 2, 2))
    field = (field - field.min()) / (field.max() - field.min())
    return torch.from_numpy(field)


def overhead_row(size: int, repeats: int) -> tuple:
    torch.manual_seed(0)
    net = build_network("unet", 2, 3, 1).eval()
    timed = Timed(net)
    volume = smooth_volume(size)
    batches = [b for plane in PLANES for _, b in iter_slab_batches(volume, plane, (-1, 0, 1), 8)]
    runs = []  # (wall, forward) of each of our runs

    def forward_only():
        with torch.inference_mode():
            for batch in batches:
                net(batch)

    def ours():
        timed.seconds = 0.0
        start = time.perf_counter()
        out = predict_2p5d(timed, volume, device="cpu")
        runs.append((time.perf_counter() - start, timed.seconds))
        return out

    forward_only()  # warm-up
    _, t_loop, _, _ = best_of(repeats, ours, forward_only)
    wall, forward = min(runs)
    note = (f"{len(batches)} batches of 8; the same batches built beforehand, forward passes alone in a plain "
            f"loop: {t_loop:.2f} s")
    return (f"2.5D xy+zx+zy, {size}^3, UNet, CPU", "`predict_2p5d` wall", "its forward passes",
            f"{wall:.2f} s", f"{forward:.2f} s", f"{wall / forward:.3f}x the forward time", "<= 1.10x", None, note)


def sliding_window_row(size: int, roi: int, repeats: int) -> tuple:
    torch.manual_seed(0)
    net = build_network("unet", 3, 1, 1).eval()
    volume = smooth_volume(size)

    def direct():
        with torch.no_grad():
            return torch.sigmoid(sliding_window_inference(volume[None], (roi,) * 3, 4, net, overlap=0.5,
                                                          mode="gaussian"))[0]

    def ours():
        return predict_3d(net, volume, roi_size=(roi,) * 3, overlap=0.5, device="cpu")

    for _ in range(2):  # warm-up: oneDNN builds its kernels for each shape on first use
        ours(), direct()
    t_ours, t_ref, out, ref = best_of(repeats, ours, direct)
    same = torch.equal(out, ref)
    return (f"3D sliding window {size}^3, ROI {roi}^3, overlap 0.5, Gaussian", "`predict_3d`",
            "`sliding_window_inference`", f"{t_ours:.2f} s", f"{t_ref:.2f} s", f"{t_ref / t_ours:.3f}x as fast",
            ">= 1x", same, "")


def write_stack(directory: Path, x: int, y: int, z: int, seed: int = 0) -> None:
    """``z`` uncompressed uint16 TIFF slices of ``y`` rows and ``x`` columns."""
    directory.mkdir()
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 65535, (y, x), dtype=np.uint16)
    for k in range(z):
        tifffile.imwrite(directory / f"{k:04d}.tif", np.roll(base, 7 * k, axis=1), photometric="minisblack",
                         metadata=None)


def memory_rows(shape: tuple[int, int, int], tmp: Path) -> list[tuple]:
    stack = tmp / "stack"
    write_stack(stack, *shape)
    rows = []
    label = "x".join(map(str, shape))
    for planes, target in (("xy", "<= 3 GiB" if shape == (1024, 1024, 512) else "-"),
                           ("xy,zx,zy", "<= 4 GiB" if shape == (1024, 1024, 512) else "-")):
        out = tmp / "probs.npy"
        m = run_probe(MEMORY_PROBE, stack, planes, GIB, out)
        out.unlink()
        volume_bytes = int(np.prod(shape)) * 2
        note = (f"{m['seconds']:.1f} s; resident after imports {m['baseline'] / GIB:.2f} GiB; result {m['dtype']} "
                f"on disk")
        same = None
        if planes == "xy":
            same = m["error"] <= 2e-3
            note += f"; max error of 4 checked slices {m['error']:.1e}"
        rows.append((f"peak memory, {label} uint16 stack ({volume_bytes / GIB:.2f} GiB), planes {planes}",
                     "`predict_2p5d` (lazy, 1 GiB budget)", "volume size", f"{m['peak'] / GIB:.2f} GiB",
                     f"{volume_bytes / GIB:.2f} GiB", f"{m['peak'] / volume_bytes:.2f}x the volume", target, same,
                     note))
    return rows


def cuda_rows(size: int) -> list[tuple]:
    torch.manual_seed(0)
    net = build_network("unet", 2, 3, 1)
    volume = smooth_volume(size)
    rows = []
    for amp in (False, True):
        predict_2p5d(net, volume[:, :32, :32, :32], device="cuda", amp=amp)  # warm-up
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        start = time.perf_counter()
        predict_2p5d(net, volume, device="cuda", amp=amp, batch_size=32)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        rows.append((f"2.5D xy+zx+zy, {size}^3, UNet, {torch.cuda.get_device_name()}, {'AMP' if amp else 'float32'}",
                     "`predict_2p5d`", "-", f"{seconds:.2f} s", "-", f"{size ** 3 / seconds / 1e6:.1f} Mvoxel/s",
                     "-", None, f"peak GPU memory {torch.cuda.max_memory_allocated() / GIB:.2f} GiB"))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64^3 2.5D, 64^3 3D, a 256x256x128 stack, best of 2")
    parser.add_argument("--repeats", type=int, help="timed runs of each (default 3, 2 with --quick)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    args = parser.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    cube, size_3d, roi, stack = (64, 64, 32, (256, 256, 128)) if args.quick else (128, 96, 64, (1024, 1024, 512))

    # The 3D row is short, and its ratio near 1: more runs for a steadier best.
    rows = [overhead_row(cube, repeats), sliding_window_row(size_3d, roi, 3 * repeats)]
    with tempfile.TemporaryDirectory(prefix="bench_infer_") as tmp:
        rows += memory_rows(stack, Path(tmp))
    if torch.cuda.is_available():
        rows += cuda_rows(256 if not args.quick else 128)

    print(f"Inference, best of {repeats}, {torch.get_num_threads()} torch threads\n")
    print_table(("task", "ours", "reference", "ours", "reference", "ratio", "target", "identical", "notes"),
                "lllrrrrll", [(*row[:7], "-" if row[7] is None else "yes" if row[7] else "NO", row[8]) for row in rows])
    return 0 if all(row[7] is not False for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
