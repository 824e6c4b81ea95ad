"""CPU inference arithmetic: float32, bfloat16 autocast, channels_last and torch.compile on the
same forward passes, beside ``predict_2p5d`` in the fastest of them, one run.

    python benchmarks/bench_precision.py            # 128^3, one thread, best of 2
    python benchmarks/bench_precision.py --quick    # 64^3, no torch.compile rows

The shipped ``vessel_2p5d`` bundle's network (a 2D UNet, 16-32-64-128 channels, trained weights)
on a normalised 128^3 vessel phantom, three planes, no TTA, batch 8. Rows:

* matmul peak: a 2048x2048 matrix product in float32 and in bfloat16 (the core's ceiling);
* the network's forward passes over the slab batches ``predict_2p5d`` makes, built beforehand and
  run in a plain loop, in each arithmetic; GFLOP/s counts the convolutions' multiply-adds
  (``torch.utils.flop_counter``) over the loop's time;
* ``predict_2p5d`` wall time (slabs, padding, accumulation, sigmoid included) with
  ``amp="bf16"`` (and ``compile=True``), against the fastest plain loop. Goal <= 1.05x.
* agreement of bfloat16 with float32: the largest probability difference and the Dice of the
  masks at 0.5.

``torch.compile`` is timed after its first call; the compile time is shown apart. bfloat16 rows
need a CPU with bfloat16 instructions (``slab.core.device.cpu_supports_bf16``), else are skipped.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from common import ROOT, print_table

sys.path.insert(0, str(ROOT))
from slab.pipeline.data.phantom import make_phantom  # noqa: E402
from slab.core.device import configure_allocator, cpu_supports_bf16  # noqa: E402
from slab.pipeline.inference import PLANES, Predictor, predict_2p5d  # noqa: E402
from slab.transforms.intensity import PercentileNormalize  # noqa: E402
from slab.transforms.slabs import iter_slab_batches  # noqa: E402

GOAL = 1.05


def best(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_peak(dtype: torch.dtype, repeats: int) -> float:
    a, b = torch.randn(2048, 2048).to(dtype), torch.randn(2048, 2048).to(dtype)
    a @ b
    return 2 * 2048 ** 3 / best(repeats, lambda: a @ b) / 1e9


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64^3, no torch.compile rows")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each (default 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    configure_allocator()  # as the CLI does, for every row alike
    size = 64 if args.quick else 128
    bf16 = cpu_supports_bf16()
    net = Predictor.from_bundle(ROOT / "bundles" / "vessel_2p5d").model.eval()
    phantom = make_phantom((size,) * 3, seed=3, kind="vessels")
    volume = PercentileNormalize(0.5, 99.5)(phantom.image).as_tensor().float()
    batches = [b for plane in PLANES for _, b in iter_slab_batches(volume, plane, (-1, 0, 1), 8)]
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        for batch in batches:
            net(batch)
    flops = counter.get_total_flops()

    compiled = {}
    variants = {"float32": (net, None, False)}
    variants["float32, channels_last"] = (net, None, True)
    if bf16:
        variants["bfloat16 autocast"] = (net, torch.bfloat16, False)
    if not args.quick:
        start = time.perf_counter()
        compiled_net = torch.compile(net)
        with torch.inference_mode():
            compiled_net(batches[0])
        compiled["float32"] = time.perf_counter() - start
        variants["float32, torch.compile"] = (compiled_net, None, False)
        if bf16:
            start = time.perf_counter()
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                compiled_net(batches[0])
            compiled["bfloat16"] = time.perf_counter() - start
            variants["bfloat16, torch.compile"] = (compiled_net, torch.bfloat16, False)

    def loop(model, dtype, channels_last):
        def run():
            with torch.inference_mode(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                for batch in batches:
                    model(batch.contiguous(memory_format=torch.channels_last) if channels_last else batch)
        return run

    peak32 = matmul_peak(torch.float32, 5)
    peak16 = matmul_peak(torch.bfloat16, 5) if bf16 else None
    rows = [("matmul 2048^2, float32", "-", f"{peak32:.0f}", "-", "-"),
            ("matmul 2048^2, bfloat16", "-", f"{peak16:.0f}" if peak16 else "skipped (no CPU bfloat16)", "-", "-")]
    times = {}
    for name, (model, dtype, cl) in variants.items():
        if cl:
            model = model.to(memory_format=torch.channels_last)
        loop(model, dtype, cl)()  # warm-up
        times[name] = best(args.repeats, loop(model, dtype, cl))
        if cl:
            net.to(memory_format=torch.contiguous_format)
        peak = peak16 if dtype is not None else peak32
        rows.append((f"forward passes alone, {name}", f"{times[name]:.2f}", f"{flops / times[name] / 1e9:.0f}",
                     f"{flops / times[name] / 1e9 / peak:.0%}", f"{times[name] / times['float32']:.2f}x"))
    fastest = min(times, key=times.get)

    def predict(amp, compile_):
        return lambda: predict_2p5d(net, volume, device="cpu", amp=amp, compile=compile_, batch_size=8)

    reference = predict("fp32", False)()
    runs = [("fp32", False)] + ([("bf16", False)] if bf16 else []) + ([("bf16", True)] if bf16 and not args.quick else [])
    ok = True
    for amp, compile_ in runs:
        predict(amp, compile_)()  # warm-up (and compile)
        wall = best(args.repeats, predict(amp, compile_))
        ratio = wall / times[fastest]
        ok &= ratio <= GOAL or amp == "fp32"
        rows.append((f"`predict_2p5d` wall, amp={amp}{', compile' if compile_ else ''}", f"{wall:.2f}",
                     f"{flops / wall / 1e9:.0f}", "-", f"{ratio:.2f}x the fastest loop ({fastest}); goal <= {GOAL}x"
                     if amp != "fp32" else f"{ratio:.2f}x the fastest loop"))
    print(f"CPU inference arithmetic, vessel_2p5d UNet, {size}^3 phantom, xy+zx+zy, {len(batches)} batches of 8, "
          f"{args.threads} thread{'s' * (args.threads != 1)}, best of {args.repeats}; "
          f"{flops / 1e9:.1f} GFLOP per pass over the volume\n")
    print_table(("what", "seconds", "GFLOP/s", "of the matmul peak", "vs float32 loop"), "lrrrl", rows)
    if compiled:
        print("\ntorch.compile, first call (compiling): " + ", ".join(f"{k} {v:.0f} s" for k, v in compiled.items()))
    if bf16:
        ours = predict("bf16", False)()
        error = float((ours - reference).abs().max())
        a, b = reference > 0.5, ours > 0.5
        dice = float(2 * (a & b).sum() / max(1, int(a.sum() + b.sum())))
        print(f"\nbfloat16 against float32 (predict_2p5d): max |probability difference| {error:.2e}, "
              f"Dice of the masks at 0.5 {dice:.5f}, voxels that differ {int((a ^ b).sum())} of {a.numel()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
