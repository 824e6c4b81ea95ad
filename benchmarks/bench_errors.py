"""``slab errors`` on a speckled probability map: the clusters' mean probabilities in one pass
(``np.bincount`` over the component labels) against the previous release's scan of the whole
volume per cluster (``prob[labels == k].mean()``), same clusters, one run each, CPU seconds.

    python benchmarks/bench_errors.py [--sizes 48 80]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from common import print_table  # noqa: E402


def per_cluster_scan(pred, truth, prob) -> list[float]:
    """The previous release's mean probabilities: one scan of the volume per cluster."""
    import cc3d

    means = []
    for mask in (pred & ~truth, truth & ~pred):
        labels, n = cc3d.connected_components(mask.astype(np.uint8), connectivity=26, return_N=True)
        means += [float(prob[labels == k].mean()) for k in range(1, int(n) + 1)]
    return means


def main() -> None:
    from slab.pipeline.evaluation.clusters import error_clusters

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[48, 80])
    args = parser.parse_args()
    rows = []
    for n in args.sizes:
        rng = np.random.default_rng(0)
        prob = rng.random((n, n, n)).astype(np.float32)
        pred, truth = prob > 0.93, rng.random((n, n, n)) > 0.93  # speckle: thousands of small clusters
        start = time.process_time()
        ours = error_clusters(pred, truth, prob)
        mine = time.process_time() - start
        start = time.process_time()
        old = per_cluster_scan(pred, truth, prob)
        theirs = time.process_time() - start
        assert np.allclose(sorted(c["mean_probability"] for c in ours), sorted(old), atol=1e-5)  # the same means
        rows.append([f"{n}^3", len(ours), f"{theirs:.2f}", f"{mine:.3f}", f"{theirs / mine:.0f}x"])
    print_table(["volume", "clusters", "per-cluster scan CPU s", "one pass CPU s", "speed-up"], "lrrrr", rows)


if __name__ == "__main__":
    main()
