"""Out-of-core 3D sliding window (block by block into zarr) against the in-memory one (MONAI's
sliding_window_inference through predict_3d) on one 160x144x120 volume, small UNet, ROI 48^3,
50 % overlap, 2 threads: wall of each, windows predicted (the blocks' recomputed windows) and the
largest difference of the probabilities, at four memory budgets: the whole volume as one block
(64 MiB), blocks cut in y (40 MiB), in x and y (24 MiB), and the smallest block, ROI-sized, for a
budget below its 17 MiB (16 MiB): the block shape chosen (the fewest windows within the budget)
and the memory one block's work takes.

    python benchmarks/bench_window_blocks.py
"""
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from slab.networks import build_network  # noqa: E402
from slab.pipeline.inference.window import predict_3d  # noqa: E402
from slab.pipeline.inference.window_blocks import block_bytes, block_tile  # noqa: E402


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    net = build_network(name="unet", spatial_dims=3, in_channels=1, out_channels=1, channels=[8, 16, 32],
                        strides=[2, 2])
    calls = [0]
    forward = net.forward

    def counted(x):
        calls[0] += x.shape[0]
        return forward(x)

    net.forward = counted
    x = torch.randn(1, 160, 144, 120)
    opts = dict(roi_size=(48, 48, 48), overlap=0.5, sw_batch_size=2, device="cpu")
    start = time.perf_counter()
    ref = predict_3d(net, x, **opts)
    t_mem, n_mem = time.perf_counter() - start, calls[0]
    for budget in (64 << 20, 40 << 20, 24 << 20, 16 << 20):
        tile = block_tile(budget, tuple(x.shape), (48, 48, 48), 1, 1, 4, 2, 0.5)
        work = block_bytes(tile, tuple(x.shape), (48, 48, 48), 1, 1, 4, 2)
        calls[0] = 0
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            out = predict_3d(net, x, out_path=f"{folder}/p.zarr", out_dtype="float32", memory_budget=budget, **opts)
            t_ooc = time.perf_counter() - start
            diff = float(np.abs(out.load().numpy() - ref.numpy()).max())
        print(f"budget {budget >> 20} MiB, blocks {'x'.join(map(str, tile))} ({work / 2**20:.1f} MiB of work): "
              f"in memory {t_mem:.1f} s ({n_mem} windows); out of core {t_ooc:.1f} s ({calls[0]} windows, "
              f"{calls[0] / n_mem:.2f}x), wall ratio {t_ooc / t_mem:.2f}, max |diff| {diff:.2g}")

if __name__ == "__main__":
    main()
