"""Surface dice speed and memory: slab.pipeline.evaluation.metrics beside surface-distance and MONAI, same run.

    python benchmarks/bench_metrics.py            # 256^3 pair, 1024^3 streaming pair
    python benchmarks/bench_metrics.py --quick    # 128^3 pair, 256^3 streaming pair

The pair is realistic: the vessel phantom's label (``slab.pipeline.data.phantom``, a branching tree of
tubes) and a perturbed copy (blurred, plus smooth noise, thresholded: dice about 0.95).

Rows:

* tolerance 0, spacing 1: ``surface_dice`` against DeepMind's ``surface-distance``
  (``compute_surface_distances`` + ``compute_surface_dice_at_tolerance``) and MONAI's
  ``compute_surface_dice(..., use_subvoxels=True)``. Targets 100x and 50x, same value.
* tolerance 1 and 2 mm, spacing (0.8, 0.8, 2.5): against surface-distance. Target 10x.
* streaming: the pair tiled (mirrored) to 1024^3 uint8 (2 GiB together), on disk as
  ``np.memmap``, tolerance 0, in a fresh process. Voxels per second and memory: VmHWM, the
  kernel's high-water mark of everything resident in the process (the interpreter with torch
  and MONAI imported, its shared libraries, and the memory-mapped input pages while they are
  mapped in), target 512 MiB; and VmHWM before the run (imports and a warm-up).
* with CUDA: tolerance 0 on CUDA tensors, voxels per second.

Ours is the best of three runs; a reference that takes seconds runs once. Exit status 1 when
a value differs from the reference (1e-9; 1e-6 for MONAI, which sums in float32).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import surface_distance as sd
import torch
from monai.metrics import compute_surface_dice
from scipy import ndimage as ndi

from common import ROOT, best_time, print_table, run_probe

sys.path.insert(0, str(ROOT))
from slab.pipeline.evaluation.metrics import surface_dice  # noqa: E402
from slab.pipeline.data.phantom import make_phantom  # noqa: E402

MIB = 1 << 20

# Runs in a fresh interpreter: surface dice of two uint8 memmaps; prints time and memory.
STREAM_PROBE = r"""
import json, time
import numpy as np
from common import proc_status
from slab.pipeline.evaluation.metrics import surface_dice

shape = tuple(json.loads(sys.argv[3]))
pred = np.memmap(sys.argv[1], dtype=np.uint8, mode="r", shape=shape)
truth = np.memmap(sys.argv[2], dtype=np.uint8, mode="r", shape=shape)
surface_dice(pred[:2], truth[:2])  # warm up: tables and caches
base = proc_status("VmHWM")["VmHWM"]
start = time.perf_counter()
value = surface_dice(pred, truth)
seconds = time.perf_counter() - start
end = proc_status("VmHWM", "RssFile")
print(json.dumps({"seconds": seconds, "value": value, "hwm": end["VmHWM"], "hwm_base": base,
                  "rss_file": end["RssFile"]}))
"""


def vessel_pair(size: int):
    """The vessel phantom's label and a perturbed copy, bool (X, Y, Z)."""
    truth = make_phantom((size,) * 3, seed=0, kind="vessels").label.numpy()[0].astype(bool)
    rng = np.random.default_rng(1)
    noise = ndi.gaussian_filter(rng.standard_normal(truth.shape).astype(np.float32), 2.0)
    noise /= noise.std()
    pred = (ndi.gaussian_filter(truth.astype(np.float32), 1.0) + 0.15 * noise) > 0.5
    return pred, truth


def deepmind(pred, truth, spacing, tolerance):
    distances = sd.compute_surface_distances(truth, pred, spacing)
    return float(sd.compute_surface_dice_at_tolerance(distances, tolerance))


def monai(pred, truth, spacing, tolerance):
    y_pred, y = (torch.from_numpy(a)[None, None].float() for a in (pred, truth))
    return float(compute_surface_dice(y_pred, y, [tolerance], include_background=True, spacing=spacing,
                                      use_subvoxels=True)[0, 0])


def compare_rows(pred, truth, label: str) -> list[dict]:
    rows = []
    cases = [((1.0, 1.0, 1.0), 0.0, "surface-distance", deepmind, 100, 1e-9),
             ((1.0, 1.0, 1.0), 0.0, "MONAI compute_surface_dice", monai, 50, 1e-6),
             ((0.8, 0.8, 2.5), 1.0, "surface-distance", deepmind, 10, 1e-9),
             ((0.8, 0.8, 2.5), 2.0, "surface-distance", deepmind, 10, 1e-9)]
    for spacing, tolerance, name, reference, target, atol in cases:
        ours_s, ours = best_time(3, lambda: surface_dice(pred, truth, spacing, tolerance))
        ref_s, ref = best_time(1, lambda: reference(pred, truth, spacing, tolerance))
        rows.append({"case": f"{label}, tolerance {tolerance:g} mm, spacing {spacing}", "reference": name,
                     "ours_s": ours_s, "ref_s": ref_s, "ours": ours, "ref": ref, "target": target,
                     "same": abs(ours - ref) <= atol})
    return rows


def write_tiled(path: Path, base: np.ndarray, size: int) -> None:
    """``base`` tiled to ``size``^3 with mirrored copies (no seams), written slab by slab."""
    n = base.shape[0]
    folded = np.arange(size) % (2 * n)
    index = np.where(folded < n, folded, 2 * n - 1 - folded)  # 0..n-1, n-1..0, 0..n-1, ...
    out = np.memmap(path, dtype=np.uint8, mode="w+", shape=(size,) * 3)
    for x0 in range(0, size, n):
        out[x0:x0 + n] = base[index[x0:x0 + n]][:, index][:, :, index]
    out.flush()
    del out


def stream_row(pred, truth, size: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_metrics_") as tmp:
        paths = [Path(tmp) / "pred.u8", Path(tmp) / "truth.u8"]
        for path, mask in zip(paths, (pred, truth)):
            write_tiled(path, mask.view(np.uint8), size)
        probe = run_probe(STREAM_PROBE, *paths, json.dumps([size] * 3))
    probe["size"] = size
    return probe


def cuda_row(pred, truth) -> dict | None:
    if not torch.cuda.is_available():
        return None
    p, t = (torch.from_numpy(a).cuda() for a in (pred, truth))

    def run():
        value = surface_dice(p, t)
        torch.cuda.synchronize()
        return value

    run()
    seconds, value = best_time(3, run)
    return {"seconds": seconds, "value": value, "same": abs(value - surface_dice(pred, truth)) <= 1e-9,
            "device": torch.cuda.get_device_name()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="128^3 pair, 256^3 streaming pair")
    args = parser.parse_args()
    size, stream = (128, 256) if args.quick else (256, 1024)
    pred, truth = vessel_pair(size)
    label = f"{size}^3 vessels (dice {2 * (pred & truth).sum() / (pred.sum() + truth.sum()):.3f})"

    rows = compare_rows(pred, truth, label)
    probe = stream_row(pred, truth, stream)
    gpu = cuda_row(pred, truth)

    print(f"\n### Surface dice: ours vs the references ({label})\n")
    print_table(("case", "reference", "ours (s)", "reference (s)", "speed-up", "target", "ours", "reference value",
                 "same"), "llrrrrrrc",
                [(r["case"], r["reference"], f"{r['ours_s']:.3f}", f"{r['ref_s']:.2f}",
                  f"{r['ref_s'] / r['ours_s']:.0f}x", f"{r['target']}x", f"{r['ours']:.10f}", f"{r['ref']:.10f}",
                  "yes" if r["same"] else "NO")
                 for r in rows])
    voxels = probe["size"] ** 3
    print(f"\n### Streaming: {probe['size']}^3 uint8 pair as np.memmap, tolerance 0 (fresh process)\n")
    print_table(("seconds", "voxels/s", "VmHWM (everything resident, mapped input pages included)", "target",
                 "VmHWM before the run", "value"), "rrrrrr",
                [(f"{probe['seconds']:.1f}", f"{voxels / probe['seconds'] / 1e6:.0f} M",
                  f"{probe['hwm'] / MIB:.0f} MiB", "512 MiB", f"{probe['hwm_base'] / MIB:.0f} MiB",
                  f"{probe['value']:.10f}")])
    if gpu is None:
        print("\nCUDA: not available, row skipped.")
    else:
        print(f"\n### CUDA tensors ({gpu['device']}), tolerance 0, {label}\n")
        print_table(("seconds", "voxels/s", "same as CPU"), "rrc",
                    [(f"{gpu['seconds']:.4f}", f"{size ** 3 / gpu['seconds'] / 1e6:.0f} M",
                      "yes" if gpu["same"] else "NO")])
    ok = all(r["same"] for r in rows) and (gpu is None or gpu["same"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
