"""N5 reading and writing: slab's own N5 code beside tensorstore's N5 driver (Google's C++), same run.

    python benchmarks/bench_n5.py            # 384^3 uint16, 64^3 gzip blocks, best of 3

Rows: a whole-volume read of a dataset tensorstore wrote (``load_volume``, blocks decompressed
in threads, against ``tensorstore.open(...).read()``); a 256^2 x 3 window read (what a streamed
2.5D sample reads); a whole-volume write (``save_volume`` to ``.n5``, gzip level 1, against
tensorstore writing gzip level 1). Outputs must be identical (exit 1 otherwise).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from common import ROOT, best_of, print_table

sys.path.insert(0, str(ROOT))
from slab.io.volumes import load_volume, save_volume  # noqa: E402


def main() -> int:
    import tensorstore as ts

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    n = args.size
    rng = np.random.default_rng(0)
    data = np.clip(rng.normal(20000, 3000, (n, n, n)), 0, 65535).astype(np.uint16)  # (X, Y, Z)
    folder = Path(tempfile.mkdtemp(prefix="slab-n5-"))
    try:
        spec = {"driver": "n5", "kvstore": {"driver": "file", "path": str(folder / "ts.n5")},
                "metadata": {"dimensions": [n] * 3, "blockSize": [64] * 3, "dataType": "uint16",
                             "compression": {"type": "gzip", "level": 1}}, "create": True, "delete_existing": True}
        ts.open(spec).result()[...] = data
        store = ts.open({"driver": "n5", "kvstore": {"driver": "file", "path": str(folder / "ts.n5")}}).result()
        rows, ok = [], True
        window = (slice(100, 356), slice(60, 316), slice(200, 203))
        cases = [("whole volume read", lambda: load_volume(folder / "ts.n5").numpy()[0],
                  lambda: np.asarray(store.read().result())),
                 ("256x256x3 window read", lambda: load_volume(folder / "ts.n5", lazy=True)[(0,) + window],
                  lambda: np.asarray(store[window].read().result()))]
        for name, ours, theirs in cases:
            t_ours, t_ref, a, b = best_of(args.repeats, ours, theirs)
            ok &= np.array_equal(a, b)
            rows.append([name, f"{t_ours * 1e3:.1f} ms", f"{t_ref * 1e3:.1f} ms", f"{t_ref / t_ours:.2f}x"])

        def write_ours():
            shutil.rmtree(folder / "slab.n5", ignore_errors=True)
            save_volume(data[None], folder / "slab.n5", affine=np.eye(4))

        def write_ts():
            ts.open({**spec, "kvstore": {"driver": "file", "path": str(folder / "ts2.n5")}}).result()[...] = data

        t_ours, t_ref, _, _ = best_of(args.repeats, write_ours, write_ts)
        back = np.asarray(ts.open({"driver": "n5", "kvstore": {"driver": "file",
                                                               "path": str(folder / "slab.n5")}}).result().read().result())
        ok &= np.array_equal(back, data)
        rows.append(["whole volume write (gzip 1)", f"{t_ours * 1e3:.1f} ms", f"{t_ref * 1e3:.1f} ms",
                     f"{t_ref / t_ours:.2f}x"])
        print(f"N5 {n}^3 uint16, 64^3 gzip blocks, best of {args.repeats}; outputs identical: {ok}\n")
        print_table(["", "slab", "tensorstore", "slab's speed"], "lrrr", rows)
        return 0 if ok else 1
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
