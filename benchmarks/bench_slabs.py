"""Slab extraction for 2.5D inference: the batches of every plane of a volume loaded x-fastest
(as NIfTI volumes are), with the flips' second offset set, as ``predict_2p5d`` gathers them
(``slab_groups``: one plane-contiguous copy per plane, mirrored slabs derived by reversing
channels) beside gathering each offset set straight from the x-fastest volume
(``iter_slab_batches`` per set, what ``predict_2p5d`` did before).

    python benchmarks/bench_slabs.py            # 256^3
    python benchmarks/bench_slabs.py --size 128
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import best_of, print_table  # noqa: E402
from slab.pipeline.inference.multiplane import slab_groups  # noqa: E402
from slab.transforms.slabs import iter_slab_batches  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    n = args.size
    # x fastest, z slowest: the layout of a loaded NIfTI volume
    volume = torch.rand(1, n, n, n).permute(0, 3, 2, 1).contiguous().permute(0, 3, 2, 1)
    offset_sets = ((-1, 0, 1), (1, 0, -1))
    rows = []
    for plane in ("xy", "zx", "zy"):
        def ours():
            total = 0.0
            for _, group in slab_groups(volume, plane, offset_sets, args.batch, 0, n):
                total += float(sum(s[0, 0, 0, 0] for s in group))
            return total

        def reference():
            total = 0.0
            batches = [iter_slab_batches(volume, plane, o, args.batch, 0, n) for o in offset_sets]
            for group in zip(*batches):
                total += float(sum(s[0, 0, 0, 0] for _, s in group))
            return total

        t_ours, t_ref, a, b = best_of(args.repeats, ours, reference)
        assert a == b
        rows.append((plane, f"{t_ref:.3f}", f"{t_ours:.3f}", f"{t_ref / t_ours:.1f}x"))
    first = next(iter(slab_groups(volume, "zx", offset_sets, 4, 0, n)))[1]
    again = [s for _, s in next(zip(*[iter_slab_batches(volume, "zx", o, 4, 0, n) for o in offset_sets]))]
    assert all(torch.equal(x, y) for x, y in zip(first, again)), "slabs differ"
    print(f"{n}^3 float32, x fastest; batches of {args.batch}; offsets [-1, 0, 1] and the flips' mirror; "
          f"best of {args.repeats}; slabs identical")
    print_table(["plane", "gather per offset set s", "slab_groups s", "speed-up"], "lrrr", rows)


if __name__ == "__main__":
    main()
