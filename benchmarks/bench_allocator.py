"""End-to-end ``slab predict`` with the shipped ``vessel_2p5d`` bundle (three planes, its TTA) on a
phantom: the allocator left at glibc's defaults (``SLAB_MALLOC=default``) against slab's set-up
(``slab.core.device.configure_allocator``: no mmap for large blocks, no trimming), in fresh
processes, alternating; wall time, minor page faults, system CPU share, and the masks compared.

    python benchmarks/bench_allocator.py               # 256^3
    python benchmarks/bench_allocator.py --shape 512 512 256
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from common import print_table  # noqa: E402


def run(image: Path, out: Path, malloc: str | None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="2")
    if malloc:
        env["SLAB_MALLOC"] = malloc
    else:
        env.pop("SLAB_MALLOC", None)
    bundle = Path(__file__).resolve().parents[1] / "bundles" / "vessel_2p5d"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "slab.pipeline.cli", "predict", "-i", str(image), "-o", str(out),
                    "--bundle", str(bundle), "--device", "cpu", "--threads", "2"], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    return {"wall": wall, "faults": after.ru_minflt - before.ru_minflt, "system": system / (user + system)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[256, 256, 256])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    import nibabel as nib

    from slab.pipeline.data.phantom import write_phantom

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        image, _ = write_phantom(tmp / "ph", shape=tuple(args.shape), seed=0, kind="vessels")
        results = {"glibc defaults (SLAB_MALLOC=default)": [], "slab's set-up": []}
        for _ in range(args.repeats):
            results["glibc defaults (SLAB_MALLOC=default)"].append(run(image, tmp / "a.nii.gz", "default"))
            results["slab's set-up"].append(run(image, tmp / "b.nii.gz", None))
        same = np.array_equal(np.asarray(nib.load(tmp / "a.nii.gz").dataobj), np.asarray(nib.load(tmp / "b.nii.gz").dataobj))
    rows = []
    base = min(r["wall"] for r in results["glibc defaults (SLAB_MALLOC=default)"])
    for name, runs in results.items():
        best = min(runs, key=lambda r: r["wall"])
        rows.append((name, f"{best['wall']:.1f}", f"{best['faults'] / 1e6:.1f} M", f"{best['system']:.0%}",
                     f"{best['wall'] / base:.2f}x"))
    print(f"slab predict, bundle vessel_2p5d, {'x'.join(map(str, args.shape))} phantom, CPU, 2 threads; "
          f"best of {args.repeats}; masks identical: {'yes' if same else 'NO'}")
    print_table(["allocator", "wall s", "minor faults", "system CPU", "wall vs defaults"], "lrrrr", rows)


if __name__ == "__main__":
    main()
