"""A volume 4x larger than the memory the process may use, through ``slab predict`` (2.5D, into
zarr, hysteresis and small components out of core) and ``slab evaluate`` (surface dice at
tolerance 0, streamed), each in a fresh process inside a memory cgroup this script creates
(cgroup v2 ``memory.max`` or v1 ``memory.limit_in_bytes``; root needed). Prints peak RSS, the
cgroup's peak (page cache included), wall and voxels/s per step, and checks the out-of-core
probabilities against in-memory prediction of a crop.

The volume is a uint16 phantom (a gyroid's thin walls, bright, in noise), generated as a zarr
store slab by slab; the network is a tiny 2.5D UNet trained here for a few seconds on a crop of
the same phantom.

    python benchmarks/bench_outofcore.py                          # 2048 x 1536 x 1024 uint16 (6 GiB), 1.5 GiB cap
    python benchmarks/bench_outofcore.py --shape 2048 1280 1024 --cap-gib 1.25
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from common import print_table  # noqa: E402

PERIOD = 40.0  # voxels per gyroid period


def phantom(x0, x1, y0, y1, z0, z1, seed: int):
    """``(image uint16, truth uint8)`` of the box, shape (X, Y, Z)."""
    k = 2 * np.pi / PERIOD
    x = (np.arange(x0, x1, dtype=np.float32) * k)[:, None, None]
    y = (np.arange(y0, y1, dtype=np.float32) * k)[None, :, None]
    z = (np.arange(z0, z1, dtype=np.float32) * k)[None, None, :]
    g = np.sin(x) * np.cos(y) + np.sin(y) * np.cos(z) + np.sin(z) * np.cos(x)
    truth = np.abs(g) < 0.35
    rng = np.random.default_rng([seed, z0, y0, x0])
    image = rng.normal(9000.0, 2500.0, truth.shape).astype(np.float32)
    image += truth * np.float32(9000.0)
    return np.clip(image, 0, 65535).astype(np.uint16), truth.astype(np.uint8)


def write_phantom(folder: Path, shape, chunks=(8, 256, 256)) -> None:
    from slab.io.zarr import write_zarr

    class Generated:
        """The phantom as a lazy (1, X, Y, Z) volume, made slab by slab (what write_zarr asks for)."""

        def __init__(self, which: int, dtype):
            self.which, self.shape, self.dtype, self.cache = which, (1,) + tuple(shape), np.dtype(dtype), (None, None)

        def __getitem__(self, index):
            z = index[3]
            if self.cache[0] != (z.start, z.stop):
                block = phantom(0, shape[0], 0, shape[1], z.start, min(z.stop, shape[2]), seed=0)[self.which]
                self.cache = ((z.start, z.stop), block[None])
            return self.cache[1][(slice(None),) + tuple(index[1:3])]

    affine = np.diag([0.05, 0.05, 0.05, 1.0])
    # by default chunks thin in z, as a store meant for slice-wise (2.5D) reading would have them
    write_zarr(Generated(0, np.uint16), affine, folder / "image.zarr", levels=1, chunks=tuple(chunks),
               block_bytes=1 << 40)
    write_zarr(Generated(1, np.uint8), affine, folder / "truth.zarr", labels=True, levels=1, chunks=tuple(chunks),
               block_bytes=1 << 40)


def train_tiny(folder: Path) -> tuple[Path, Path]:
    import torch

    from slab.networks import build_network, save_weights
    from slab.transforms.intensity import PercentileNormalize

    config = {"name": "unet", "spatial_dims": 2, "in_channels": 3, "out_channels": 1, "channels": [4, 8],
              "strides": [2], "norm": "batch", "planes": ["xy"]}  # batch norm: a voxel sees only its neighbours
    torch.manual_seed(0)
    net = build_network(**{k: v for k, v in config.items() if k != "planes"})
    image, truth = phantom(0, 160, 0, 160, 0, 66, seed=1)
    x = PercentileNormalize()(torch.from_numpy(image.astype(np.float32))[None])[0]
    rng = np.random.default_rng(0)
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for _ in range(300):
        batch, target = [], []
        for _ in range(8):
            i, j, k = rng.integers(0, 96), rng.integers(0, 96), rng.integers(1, 65)
            batch.append(x[i:i + 64, j:j + 64, k - 1:k + 2].permute(2, 0, 1))
            target.append(torch.from_numpy(truth[i:i + 64, j:j + 64, k].astype(np.float32))[None])
        optimiser.zero_grad()
        loss = loss_fn(net(torch.stack(batch)), torch.stack(target))
        loss.backward()
        optimiser.step()
    (folder / "net.json").write_text(json.dumps(config), encoding="utf-8")
    save_weights(net, folder / "net.pt")
    return folder / "net.json", folder / "net.pt"


class Cgroup:
    """A memory cgroup with a hard limit; processes started with :meth:`preexec` join it."""

    def __init__(self, limit: int):
        self.v2 = Path("/sys/fs/cgroup/cgroup.controllers").exists()
        root = Path("/sys/fs/cgroup") if self.v2 else Path("/sys/fs/cgroup/memory")
        self.path = root / f"slab-bench-{os.getpid()}"
        try:
            self.path.mkdir()
            if self.v2:
                (self.path / "memory.max").write_text(str(limit))
                (self.path / "memory.swap.max").write_text("0")
            else:
                (self.path / "memory.limit_in_bytes").write_text(str(limit))
                swap = self.path / "memory.memsw.limit_in_bytes"
                if swap.exists():
                    swap.write_text(str(limit))
        except OSError as err:
            sys.exit(f"bench_outofcore: cannot create a memory cgroup at {self.path} ({err}); run as root")

    def preexec(self):
        path = self.path / "cgroup.procs"
        return lambda: path.write_text(str(os.getpid()))

    def peak(self) -> int:
        name = "memory.peak" if self.v2 else "memory.max_usage_in_bytes"
        try:
            return int((self.path / name).read_text())
        except (OSError, ValueError):
            return -1

    def reset_peak(self) -> None:
        if not self.v2:
            (self.path / "memory.max_usage_in_bytes").write_text("0")

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass


def capped(cgroup: Cgroup, args: list[str], check: bool = True) -> dict:
    """One ``slab`` command in the cgroup: exit status, wall, peak RSS (the child's ru_maxrss),
    cgroup peak; a failure ends the benchmark when ``check``."""
    cgroup.reset_peak()
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "slab.pipeline.cli", *args], env=env,
                             preexec_fn=cgroup.preexec(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    out, err = child.stdout.read().decode(), child.stderr.read().decode()
    code = os.waitstatus_to_exitcode(status)
    if code != 0 and check:
        sys.exit(f"bench_outofcore: slab {args[0]} failed ({code}): {err.strip()[-500:]}")
    return {"code": code, "wall": wall, "rss": usage.ru_maxrss * 1024, "cgroup": cgroup.peak(), "out": out,
            "err": err.strip()[-300:]}


def crop_check(folder: Path, net_json: Path, weights: Path, shape) -> tuple[float, int, int]:
    """Out-of-core probabilities against in-memory prediction of a crop (same normalisation
    window, the whole volume's percentiles): max |difference| and differing mask voxels inside
    the crop's interior (away from its borders by the network's reach; the network normalises
    by batch statistics, so a voxel's output depends on its neighbourhood alone)."""
    import torch

    from slab.pipeline.inference import Predictor
    from slab.transforms.intensity import PercentileNormalize
    from slab.io.volumes import load_volume

    image = load_volume(folder / "image.zarr", lazy=True)
    low, high = PercentileNormalize().percentiles(image, name="image")
    config = json.loads(net_json.read_text())
    predictor = Predictor(config, weights, device="cpu",
                          normalize={"scheme": "percentile", "low": np.asarray(low).tolist(),
                                     "high": np.asarray(high).tolist()})
    # even offsets keep the stride-2 grid of the whole volume's slices
    x0, y0, z0 = (n // 3 // 4 * 4 for n in shape)
    box = (slice(None), slice(x0, x0 + 192), slice(y0, y0 + 192), slice(z0, z0 + 48))
    crop = torch.from_numpy(np.asarray(image[box]))
    ours = predictor(crop).numpy().astype(np.float16)
    disk = np.asarray(load_volume(folder / "prob.zarr", lazy=True)[box])
    inner = (slice(None), slice(32, -32), slice(32, -32), slice(1, -1))
    diff = float(np.abs(ours[inner].astype(np.float32) - disk[inner].astype(np.float32)).max())
    masks = int(np.count_nonzero((ours[inner] > 0.5) != (disk[inner] > 0.5)))
    return diff, masks, int(np.prod(ours[inner].shape))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(2048, 1536, 1024), metavar=("X", "Y", "Z"))
    parser.add_argument("--cap-gib", type=float, default=1.5, help="the cgroup's memory limit (GiB)")
    parser.add_argument("--budget-gib", type=float, default=0.2, help="slab's --memory-budget (GiB)")
    parser.add_argument("--work", type=Path, help="folder for the stores (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the stores")
    args = parser.parse_args()
    shape = tuple(args.shape)
    cap = int(args.cap_gib * (1 << 30))
    folder = args.work or Path(tempfile.mkdtemp(prefix="slab-ooc-", dir=os.environ.get("SLAB_BENCH_DIR")))
    folder.mkdir(parents=True, exist_ok=True)
    voxels = int(np.prod(shape))
    print(f"volume {shape[0]}x{shape[1]}x{shape[2]} uint16 = {voxels * 2 / (1 << 30):.2f} GiB, "
          f"cap {args.cap_gib:g} GiB ({voxels * 2 / cap:.1f}x), --memory-budget {args.budget_gib:g} GiB")
    start = time.perf_counter()
    if not (folder / "image.zarr").exists():
        write_phantom(folder, shape)
    print(f"phantom written in {time.perf_counter() - start:.0f} s")
    net_json, weights = train_tiny(folder)
    cgroup = Cgroup(cap)
    try:
        predict = capped(cgroup, ["predict", "-i", str(folder / "image.zarr"), "-o", str(folder / "mask.zarr"),
                                  "--prob", str(folder / "prob.zarr"), "--network", str(net_json), "--weights",
                                  str(weights), "--axes", "xy", "--hysteresis", "0.3", "0.7", "--min-size", "20",
                                  "--memory-budget", str(args.budget_gib), "--batch-size", "1", "--device", "cpu",
                                  "--threads", "2",
                                  "--quiet"])
        evaluate = capped(cgroup, ["evaluate", str(folder / "mask.zarr"), str(folder / "truth.zarr"),
                                   "--tolerance", "0", "--json", str(folder / "scores.json")])
    finally:
        cgroup.remove()
    scores = json.loads((folder / "scores.json").read_text())
    diff, differing, inner = crop_check(folder, net_json, weights, shape)
    gib = 1 << 30
    rows = [[name, f"{r['wall']:.0f}", f"{voxels / r['wall'] / 1e6:.1f}", f"{r['rss'] / gib:.2f}",
             f"{r['cgroup'] / gib:.2f}" if r["cgroup"] >= 0 else "n/a"]
            for name, r in (("slab predict (xy, hysteresis, min-size) -> zarr", predict),
                            ("slab evaluate (surface dice, tolerance 0)", evaluate))]
    print_table(["step (fresh process, capped)", "wall s", "Mvoxel/s", "peak RSS GiB", "cgroup peak GiB"],
                "lrrrr", rows)
    print(f"volume / cap: {voxels * 2 / cap:.1f}x; scores: {json.dumps(scores)[:300]}")
    print(f"crop {inner} voxels: out-of-core vs in-memory probabilities max |diff| {diff:.3g}, "
          f"mask voxels that differ at 0.5: {differing}")
    if not args.keep and args.work is None:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
