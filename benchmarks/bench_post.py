"""Post-processing speed: slab's connected-component steps beside scikit-image's and cc3d's, same run.

    python benchmarks/bench_post.py            # 256^3 against scikit-image, 256-512^3 against cc3d
    python benchmarks/bench_post.py --quick    # 96^3, best of 2

Inputs are probability maps made from Gaussian-smoothed noise: a sparse, vessel-like one (about
2% of voxels above 0.5, as in SenNet kidney predictions) and a dense one (half the voxels).
Rows compare

* ``HysteresisFill(0.3, 0.7, connectivity=6)`` with ``skimage.filters.apply_hysteresis_threshold``
  (which labels with face connectivity), and
* ``RemoveSmallComponents(100, connectivity=26)`` with ``skimage.morphology.remove_small_objects``
  (connectivity 3) on the map thresholded at 0.5, and
* at 256^3, 384^3 and 512^3, ``HysteresisFill`` with the fastest composition of the compiled
  peers: cc3d labels ``x > low`` (face connectivity), ``fastremap.unique`` lists the labels under
  ``x > high`` and ``fastremap.mask_except`` keeps them (both masks made with slab's exact
  comparison, so that thresholds round alike).

Ours and the reference alternate, each timed best of N; the outputs must be identical (exit 1
otherwise). Targets: 4x scikit-image and 1x cc3d + fastremap for hysteresis, 3x scikit-image for
small components.
"""
from __future__ import annotations

import argparse
import inspect
import sys

import cc3d
import fastremap
import numpy as np
from scipy import ndimage as ndi
from skimage.filters import apply_hysteresis_threshold
from skimage.morphology import remove_small_objects

from common import ROOT, best_of, print_table

sys.path.insert(0, str(ROOT))
from slab.transforms import post  # noqa: E402
from slab.transforms.post import HysteresisFill, RemoveSmallComponents, greater_than  # noqa: E402

TARGETS = {"HysteresisFill": 4.0, "RemoveSmallComponents": 3.0}
PEER_SIZES = (256, 384, 512)


def probability_map(size: int, bias: float, seed: int = 0) -> np.ndarray:
    """sigmoid(3 (z - bias)) of unit-variance noise smoothed with sigma 2 voxels, float32."""
    noise = np.random.default_rng(seed).standard_normal((size,) * 3, dtype=np.float32)
    z = ndi.gaussian_filter(noise, 2.0)
    z = (z - z.mean()) / z.std()
    return (1.0 / (1.0 + np.exp(-3.0 * (z - bias)))).astype(np.float32)


def skimage_remove_small(mask: np.ndarray, min_size: int, connectivity: int) -> np.ndarray:
    """``remove_small_objects`` keeping components of >= min_size voxels, across versions."""
    if "max_size" in inspect.signature(remove_small_objects).parameters:  # scikit-image >= 0.26
        return remove_small_objects(mask, max_size=min_size - 1, connectivity=connectivity)
    return remove_small_objects(mask, min_size=min_size, connectivity=connectivity)


def cc3d_hysteresis(prob: np.ndarray, low: float, high: float) -> np.ndarray:
    """Hysteresis with cc3d + fastremap: label ``> low``, keep the labels found under ``> high``."""
    labels = cc3d.connected_components(greater_than(prob, low), connectivity=6, binary_image=True)
    seeds = fastremap.unique(labels[greater_than(prob, high)])
    return fastremap.mask_except(labels, [int(s) for s in seeds if s]).astype(bool)


def peer_rows(sizes, repeats: int) -> tuple[list, bool]:
    """``HysteresisFill(0.3, 0.7, 6)`` against cc3d + fastremap at each size, sparse and dense."""
    rows, identical = [], True
    for size in sizes:
        for label, bias in (("sparse", 2.0), ("dense", 0.0)):
            prob = probability_map(size, bias)
            t_ours, t_ref, out, ref = best_of(repeats, lambda p=prob: HysteresisFill(0.3, 0.7, connectivity=6)(p),
                                              lambda p=prob: cc3d_hysteresis(p, 0.3, 0.7))
            same = bool(np.array_equal(out.astype(bool), ref))
            identical &= same
            rows.append((f"{size}^3 {label}", f"{(prob > 0.5).mean():.1%}", f"{t_ref:.3f}", f"{t_ours:.3f}",
                         f"{t_ref / t_ours:.2f}x", f"{t_ours / prob.size * 1e9:.1f}", "yes" if same else "NO"))
            del prob, out, ref
    return rows, identical


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="96^3, best of 2")
    parser.add_argument("--size", type=int, help="edge of the cubic volume (default 256, 96 with --quick)")
    parser.add_argument("--repeats", type=int, help="timed runs of each (default 5, 2 with --quick)")
    args = parser.parse_args(argv)
    size = args.size or (96 if args.quick else 256)
    repeats = args.repeats or (2 if args.quick else 5)

    rows, identical = [], True
    for label, bias in (("sparse (vessel-like)", 2.0), ("dense", 0.0)):
        prob = probability_map(size, bias)
        mask = prob > 0.5
        cases = [
            ("HysteresisFill", "apply_hysteresis_threshold",
             lambda: HysteresisFill(0.3, 0.7, connectivity=6)(prob),
             lambda: apply_hysteresis_threshold(prob, 0.3, 0.7)),
            ("RemoveSmallComponents", "remove_small_objects",
             lambda: RemoveSmallComponents(100, connectivity=26)(mask),
             lambda: skimage_remove_small(mask, 100, connectivity=3)),
        ]
        for ours_name, reference_name, ours, reference in cases:
            t_ours, t_ref, out, ref = best_of(repeats, ours, reference)
            same = bool(np.array_equal(out.astype(bool), ref))
            identical &= same
            rows.append((ours_name, reference_name, label, f"{mask.mean():.1%}", t_ref, t_ours, same))

    kernel = "compiled seeded fill" if post._compiled_fill is not None else "cc3d labelling (no compiled fill)"
    print(f"Post-processing at {size}^3 (float32 probabilities), best of {repeats}, one thread; "
          f"HysteresisFill: {kernel}\n")
    print_table(("ours", "scikit-image", "input (> 0.5)", "scikit-image (s)", "ours (s)", "speed-up", "target",
                 "identical"), "lllrrrrl",
                [(f"`{ours_name}`", f"`{reference_name}`", f"{label}, {fraction}", f"{t_ref:.3f}", f"{t_ours:.3f}",
                  f"{t_ref / t_ours:.1f}x", f"{TARGETS[ours_name]:.0f}x", "yes" if same else "NO")
                 for ours_name, reference_name, label, fraction, t_ref, t_ours, same in rows])
    sizes = (size,) if args.quick or args.size else PEER_SIZES
    rows, same = peer_rows(sizes, repeats)
    identical &= same
    print(f"\n`HysteresisFill(0.3, 0.7, connectivity=6)` against cc3d + fastremap, best of {repeats}, one thread\n")
    print_table(("volume", "input (> 0.5)", "cc3d + fastremap (s)", "ours (s)", "speed-up", "ours (ns/voxel)",
                 "identical"), "lrrrrrl", rows)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
