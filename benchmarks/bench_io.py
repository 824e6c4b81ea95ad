"""Volume I/O speed and memory: slab's loaders beside the plain loops they replace, same run.

    python benchmarks/bench_io.py            # 200 slices of 768x768, 512^3 percentiles, best of 3
    python benchmarks/bench_io.py --quick    # 40 slices of 256x256, 128^3 percentiles, best of 2

Rows:

* a 16-bit PNG stack: ``load_volume(dir)`` (slices decoded in parallel threads into one buffer)
  against a sequential PIL loop + ``np.stack``; target 1.8x on 2 cores;
* the same stack as uncompressed TIFF against a sequential ``tifffile.imread`` loop; target 1x;
* both stacks against the decoders alone (``imagecodecs`` png/tiff decode of each file's bytes
  in threads into one buffer, no header checks): the cost of slab's checks; target 0.9x;
* percentiles (0.5, 99.5) of a uint16 cube: ``volume_percentiles`` (histogram) against
  ``np.percentile``; target 5x, values identical;
* the same of a float32 zarr store read lazily (radix selection in blocks, two passes, never
  loaded) against loading it and ``np.percentile``: no target (it trades time for memory), values
  identical;
* peak memory of ``load_volume`` on the PNG stack, measured in a fresh process (peak resident
  set while loading, above what the process held before), against the volume's own size;
  target at most 1.3x.

Ours and the reference alternate, each timed best of N after one untimed read that warms the
page cache; outputs must be identical (exit 1 otherwise). Data is generated into a temporary
directory and removed afterwards.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from scipy import ndimage as ndi

from common import ROOT, best_of, print_table, run_probe

sys.path.insert(0, str(ROOT))
from slab.transforms.percentiles import volume_percentiles  # noqa: E402
from slab.io.volumes import load_volume, natural_key, save_volume  # noqa: E402

PERCENTILES = [0.5, 99.5]

# Runs in a fresh interpreter: peak resident memory while loading, above the resident memory
# before. Writing 5 to /proc/self/clear_refs resets the kernel's high-water mark (VmHWM), so
# imports and first-use set-up (decoder, threads, MetaTensor: a tiny stack loaded first) do not
# count; without it, ru_maxrss (a lifetime peak) is the fallback.
MEMORY_PROBE = r"""
import json, resource
from common import proc_status
from slab.io.volumes import load_volume
load_volume(sys.argv[2])

try:
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
        f.write("5")
    method = "VmHWM"
except OSError:
    method = "ru_maxrss"
before = proc_status("VmRSS")["VmRSS"]
volume = load_volume(sys.argv[1])
if method == "VmHWM":
    peak = proc_status("VmHWM")["VmHWM"]
else:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"peak": peak - before, "nbytes": volume.numpy().nbytes, "method": method}))
"""


def make_stack(depth: int, size: int, seed: int = 0) -> np.ndarray:
    """A ``(1, X, Y, Z)`` uint16 volume: smooth structure that drifts along z, plus noise."""
    rng = np.random.default_rng(seed)
    field = ndi.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), size / 32)
    field = (field - field.min()) / (field.max() - field.min())
    volume = np.empty((depth, size, size), dtype=np.uint16)  # (Z, rows, cols), slices contiguous
    for z in range(depth):
        image = 4000 + 40000 * np.roll(field, 3 * z, axis=0) + rng.normal(0, 300, (size, size))
        volume[z] = np.clip(image, 0, 65535).astype(np.uint16)
    return volume.transpose(2, 1, 0)[np.newaxis]


def make_cube(size: int, seed: int = 1) -> np.ndarray:
    """uint16 CT-like intensities: a mixture of two normal populations, made in slabs."""
    rng = np.random.default_rng(seed)
    cube = np.empty((size,) * 3, dtype=np.uint16)
    for start in range(0, size, 32):
        part = cube[start:start + 32]
        tissue = rng.random(part.shape) < 0.7
        values = np.where(tissue, rng.normal(12000, 2500, part.shape), rng.normal(30000, 6000, part.shape))
        part[...] = np.clip(values, 0, 65535)
    return cube


def pil_loop(directory: Path) -> np.ndarray:
    files = sorted(directory.iterdir(), key=lambda p: natural_key(p.name))
    return np.stack([np.asarray(Image.open(f)) for f in files])


def tifffile_loop(directory: Path) -> np.ndarray:
    files = sorted(directory.iterdir(), key=lambda p: natural_key(p.name))
    return np.stack([tifffile.imread(f) for f in files])


def imagecodecs_threads(directory: Path) -> np.ndarray:
    """The decoders alone: each file read and decoded by imagecodecs (C, the GIL released) in
    threads into one buffer, no header checks."""
    from concurrent.futures import ThreadPoolExecutor

    import imagecodecs

    files = sorted(directory.iterdir(), key=lambda p: natural_key(p.name))
    decode = imagecodecs.png_decode if files[0].suffix == ".png" else imagecodecs.tiff_decode
    first = decode(files[0].read_bytes())
    out = np.empty((len(files),) + first.shape, first.dtype)

    def fill(k: int) -> None:
        out[k] = decode(files[k].read_bytes())

    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(fill, range(len(files))))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="40 slices of 256x256, 128^3 cube, best of 2")
    parser.add_argument("--repeats", type=int, help="timed runs of each (default 3, 2 with --quick)")
    args = parser.parse_args(argv)
    depth, size, cube_size = (40, 256, 128) if args.quick else (200, 768, 512)
    repeats = args.repeats or (2 if args.quick else 3)

    rows, identical = [], True
    with tempfile.TemporaryDirectory(prefix="bench_io_") as tmp:
        volume = make_stack(depth, size)
        for fmt in ("png", "tif"):
            save_volume(volume, Path(tmp) / fmt, slice_format=fmt)
        expected = volume[0].transpose(2, 1, 0)  # (Z, rows, cols), as the loops return it
        for fmt, reference_name, reference, target in (
                ("png", "PIL loop", pil_loop, 1.8), ("png", "imagecodecs in threads", imagecodecs_threads, 0.9),
                ("tif", "tifffile loop", tifffile_loop, 1.0), ("tif", "imagecodecs in threads", imagecodecs_threads, 0.9)):
            directory = Path(tmp) / fmt
            load_volume(directory)  # warm the page cache
            t_ours, t_ref, out, ref = best_of(repeats, lambda: load_volume(directory), lambda: reference(directory))
            same = np.array_equal(out.numpy()[0].transpose(2, 1, 0), ref) and np.array_equal(ref, expected)
            identical &= same
            label = f"load {depth} x {size}x{size} uint16 .{fmt} slices"
            rows.append((label, "`load_volume`", reference_name, f"{t_ours:.3f} s", f"{t_ref:.3f} s",
                         f"{t_ref / t_ours:.2f}x", f">= {target:g}x", t_ref / t_ours >= target, same))
        del volume, expected, out, ref

        save_volume(make_stack(2, 8), Path(tmp) / "warm_up", slice_format="png")
        memory = run_probe(MEMORY_PROBE, Path(tmp) / "png", Path(tmp) / "warm_up")
        share = memory["peak"] / memory["nbytes"]
        rows.append((f"peak memory loading the .png stack ({memory['method']})", "`load_volume`", "volume size",
                     f"{memory['peak'] / 2**20:.0f} MiB", f"{memory['nbytes'] / 2**20:.0f} MiB",
                     f"{share:.2f}x the volume", "<= 1.3x", share <= 1.3, None))

    cube = make_cube(cube_size)
    t_ours, t_ref, out, ref = best_of(repeats, lambda: volume_percentiles(cube, PERCENTILES),
                                      lambda: np.percentile(cube, PERCENTILES))
    same = np.array_equal(out, ref)
    identical &= same
    rows.append((f"percentiles {PERCENTILES} of a {cube_size}^3 uint16 volume", "`volume_percentiles`",
                 "np.percentile", f"{t_ours:.3f} s", f"{t_ref:.3f} s", f"{t_ref / t_ours:.1f}x faster", ">= 5x",
                 t_ref / t_ours >= 5, same))

    # a float32 volume on disk that is never loaded: radix selection in blocks (two passes)
    floats = (cube.astype(np.float32) - 20000.0) / 7.0
    with tempfile.TemporaryDirectory(prefix="bench_io_") as tmp:
        save_volume(floats[None], Path(tmp) / "f.zarr", affine=np.eye(4))
        lazy = load_volume(Path(tmp) / "f.zarr", lazy=True)
        t_ours, t_ref, out, ref = best_of(repeats, lambda: volume_percentiles(lazy, PERCENTILES),
                                          lambda: np.percentile(load_volume(Path(tmp) / "f.zarr").numpy(),
                                                                PERCENTILES))
    same = np.array_equal(out, ref)
    identical &= same
    rows.append((f"percentiles of a {cube_size}^3 float32 zarr", "`volume_percentiles` (lazy, never loaded)",
                 "load + np.percentile", f"{t_ours:.3f} s", f"{t_ref:.3f} s", f"{t_ref / t_ours:.2f}x", "-", True, same))

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"Volume I/O, best of {repeats}, {cores} cores available to the loader threads\n")
    print_table(("task", "ours", "reference", "ours", "reference", "ratio", "target", "met", "identical"), "lllrrrrll",
                [(*row[:7], "yes" if row[7] else "no", "-" if row[8] is None else "yes" if row[8] else "NO")
                 for row in rows])
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
