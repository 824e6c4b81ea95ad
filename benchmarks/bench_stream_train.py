"""Training that streams its samples from zarr, against training that holds the volumes.

1. Side by side on a volume that fits (default 512 x 512 x 256 uint16): the 2.5D sampler in
   memory and streamed (``SlabDataset(stream=True)``) draw the same samples (checked bit for
   bit); samples/s of each and the time to build each dataset, from a store chunked thin in z
   and one chunked in cubes, drawing from xy only and from all three planes.
2. ``slab train`` (2.5D, ``stream: true``, 256^2 patches, one epoch) on a generated volume larger
   than the memory cap of a cgroup this script creates (cgroup v2 or v1, root needed; the
   phantom and the cgroup of ``bench_outofcore.py``), then the same command with ``stream:
   false``, which is expected to be killed at the cap: exit status, peak RSS, wall, samples/s.

    python benchmarks/bench_stream_train.py                  # 2048 x 1536 x 768 (4.5 GiB + 2.25 GiB label), 1.5 GiB cap
    python benchmarks/bench_stream_train.py --shape 1024 1024 512 --cap-gib 1
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from bench_outofcore import Cgroup, capped, phantom, write_phantom  # noqa: E402
from common import print_table  # noqa: E402

NETWORK = {"name": "unet", "channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1}


def side_by_side(folder: Path, shape, samples: int) -> tuple[list, bool]:
    """Rows of part 1: build time and samples/s of the sampler in memory and streamed, from a
    store chunked thin in z (8 x 256 x 256, for xy reading) and one chunked in cubes (64^3)."""
    import torch

    from slab.pipeline.data.slabs import SlabDataset

    torch.set_num_threads(2)
    rows, same, reference = [], True, None
    for chunks in ((8, 256, 256), (64, 64, 64)):
        store = folder / "x".join(map(str, chunks))
        write_phantom(store, shape, chunks)
        items = [{"image": str(store / "image.zarr"), "label": str(store / "truth.zarr")}]
        for planes in (("xy",), ("xy", "zx", "zy")):
            options = dict(samples_per_epoch=samples, patch_size=(256, 256), planes=planes,
                           normalize={"lower": 0.5, "upper": 99.5}, seed=0)
            drawn = {}
            for stream in (False, True):
                start = time.perf_counter()
                dataset = SlabDataset(items, stream=stream, **options)
                built = time.perf_counter() - start
                start = time.perf_counter()
                drawn[stream] = [dataset.sample(i, 0) for i in range(samples)]
                speed = samples / (time.perf_counter() - start)
                reference = speed if not stream else reference
                rows.append([f"stream={stream}", "x".join(map(str, chunks)), "+".join(planes), f"{built:.1f}",
                             f"{speed:.0f}", f"{speed / reference:.2f}x"])
            same &= all(np.array_equal(a[k].numpy(), b[k].numpy()) for a, b in zip(drawn[False], drawn[True])
                        for k in ("image", "label"))
            if len(planes) > 1:  # streamed through a DataLoader of 2 worker processes, as training reads it
                loader = torch.utils.data.DataLoader(dataset, batch_size=8, num_workers=2)
                start = time.perf_counter()
                count = sum(len(batch["image"]) for batch in loader)
                speed = count / (time.perf_counter() - start)
                rows.append(["stream=True, 2 workers", "x".join(map(str, chunks)), "+".join(planes), "",
                             f"{speed:.0f}", f"{speed / reference:.2f}x"])
    return rows, same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(2048, 1536, 768), metavar=("X", "Y", "Z"))
    parser.add_argument("--small", type=int, nargs=3, default=(512, 512, 256), metavar=("X", "Y", "Z"))
    parser.add_argument("--cap-gib", type=float, default=1.5, help="the cgroup's memory limit (GiB)")
    parser.add_argument("--samples", type=int, default=64, help="training samples (one epoch)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="slab-stream-", dir=os.environ.get("SLAB_BENCH_DIR")))
    try:
        rows, same = side_by_side(root / "small", tuple(args.small), args.samples)
        print(f"1. the sampler on {'x'.join(map(str, args.small))} uint16, {args.samples} samples of 256^2 "
              f"(xy, zx, zy), 2 threads; samples identical: {same}\n")
        print_table(["SlabDataset", "zarr chunks (z, y, x)", "planes", "build s", "samples/s", "vs in memory"],
                    "lllrrr", rows)

        shape, cap = tuple(args.shape), int(args.cap_gib * (1 << 30))
        big = root / "big"
        start = time.perf_counter()
        write_phantom(big, shape)
        data_bytes = int(np.prod(shape)) * 3  # uint16 image + uint8 label
        print(f"\n2. slab train on {'x'.join(map(str, shape))} (image uint16 + label uint8 = "
              f"{data_bytes / (1 << 30):.2f} GiB, {data_bytes / cap:.1f}x the {args.cap_gib:g} GiB cap; written in "
              f"{time.perf_counter() - start:.0f} s)\n")
        from slab.io.volumes import save_volume

        image, truth = phantom(0, 96, 0, 96, 0, 96, seed=1)
        affine = np.diag([0.05, 0.05, 0.05, 1.0])
        save_volume(image[None], big / "val_image.zarr", affine=affine)
        save_volume(truth[None], big / "val_truth.zarr", affine=affine)
        datalist = big / "datalist.json"
        datalist.write_text(json.dumps({
            "training": [{"image": str(big / "image.zarr"), "label": str(big / "truth.zarr")}],
            "validation": [{"image": str(big / "val_image.zarr"), "label": str(big / "val_truth.zarr")}]}))
        results = []
        cgroup = Cgroup(cap)
        try:
            for stream in (True, False):
                config = big / f"config_{stream}.json"
                config.write_text(json.dumps({"network": NETWORK, "patch_size": [256, 256], "epochs": 1,
                                              "samples_per_epoch": args.samples, "batch_size": 8,
                                              "planes": ["xy", "zx", "zy"], "stream": stream, "progress": False,
                                              "report_volumes": 0, "val": {"planes": ["xy"], "batch_size": 8}}))
                result = capped(cgroup, ["train", "--datalist", str(datalist), "--config", str(config),
                                             "--out", str(big / f"run_{stream}"), "--device", "cpu", "--threads", "2"],
                                check=False)
                results.append((stream, result))
        finally:
            cgroup.remove()
        gib = 1 << 30
        table = []
        for stream, r in results:
            done = r["code"] == 0
            log = big / f"run_{stream}" / "log.csv"
            rows_log = list(csv.DictReader(log.open())) if done and log.exists() else []
            speed = f"{float(rows_log[0]['images_per_s']):.1f}" if rows_log else ""
            table.append([f"stream: {str(stream).lower()}", "finished" if done else f"exit {r['code']} (killed at the cap)"
                          if r["code"] in (-9, 137) else f"exit {r['code']}: {r['err'][-80:]}", f"{r['wall']:.0f}",
                          speed, f"{r['rss'] / gib:.2f}", f"{r['cgroup'] / gib:.2f}" if r["cgroup"] >= 0 else "n/a"])
        print_table(["slab train (fresh process, capped)", "result", "wall s", "train samples/s", "peak RSS GiB",
                     "cgroup peak GiB"], "llrrrr", table)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
