"""Resolution shift: train on vessel phantoms at one resolution, test on phantoms scanned 1.5x
coarser, and measure how much scale augmentation and multi-scale inference close the gap.

    python benchmarks/bench_resolution.py           # ~6 min on 2 cores
    python benchmarks/bench_resolution.py --quick   # a smoke run

The SenNet test kidneys were imaged at another resolution than the training ones; here the
same vessel trees (``slab.pipeline.data.phantom``, kind ``vessels``) are rendered at 96^3 and
block-averaged to 48^3 at 1 mm (training and the "native" test) or to 32^3 at 1.5 mm (the
"1.5x coarser" test: every vessel 1.5x thinner in voxels). Two 2.5D models train with the same budget and seeds: without and with scale
augmentation (``augment.scale_range`` 0.35, i.e. random zooms of the slab plane in 0.65-1.35).
Each is scored on held-out phantoms at both resolutions, with single-scale and multi-scale
inference (``Predictor(scales=(1, 1.5))``: the coarse scan is also predicted upsampled 1.5x to the
training scale and the probabilities averaged). Thresholds are chosen on a validation phantom at
the native resolution, as a user without coarse labelled data would.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def render(seed: int, fine: int, factor: int):
    """A phantom rendered at ``fine``^3 and block-averaged by ``factor`` (image mean, label > 0.5)."""
    from slab.pipeline.data.phantom import make_phantom

    ph = make_phantom((fine,) * 3, seed=seed, kind="vessels")
    image = np.asarray(ph.image, dtype=np.float32)[0]
    label = np.asarray(ph.label, dtype=np.float32)[0]
    n = fine // factor

    def down(a):
        return a[: n * factor, : n * factor, : n * factor].reshape(n, factor, n, factor, n, factor).mean((1, 3, 5))

    return down(image), down(label) > 0.5


def write(root: Path, name: str, image, label, spacing: float) -> dict:
    import nibabel as nib

    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    nib.save(nib.Nifti1Image(np.round(image).astype(np.uint16), affine), folder / "image.nii.gz")
    nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), folder / "label.nii.gz")
    return {"image": str(folder / "image.nii.gz"), "label": str(folder / "label.nii.gz"), "case": name}


def main() -> None:
    import torch

    from slab.pipeline.training import train
    from scoring import score_model, start

    args = start(__doc__)
    fine = 48 if args.quick else 96
    epochs, samples = args.epochs, args.samples
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        native, coarse = 2, 3  # block sizes: 96^3 -> 48^3 at 1 mm, -> 32^3 at 1.5 mm
        train_items = [write(root, f"train{s}", *render(s, fine, native), 1.0) for s in range(3)]
        val = write(root, "val", *render(10, fine, native), 1.0)
        tests = {"native": [write(root, f"native{s}", *render(s, fine, native), 1.0) for s in (20, 21)],
                 "1.5x coarser": [write(root, f"coarse{s}", *render(s, fine, coarse), 1.5) for s in (20, 21)]}
        datalist = root / "datalist.json"
        datalist.write_text(json.dumps({"training": train_items, "validation": [val]}), encoding="utf-8")
        rows = []
        for name, augment in (("no scale augmentation", {"scale_range": 0.1}),
                              ("scale augmentation 0.35", {"scale_range": 0.35})):
            cfg = {"epochs": epochs, "batch_size": 16, "samples_per_epoch": samples, "patch_size": [48, 48],
                   "augment": augment, "progress": False,
                   "val": {"metric": "surface_dice_0", "tolerance_mm": 1.0}}
            start = time.perf_counter()
            train(datalist, cfg, root / name, device="cpu")
            seconds = time.perf_counter() - start
            for resolution, items in tests.items():
                for scales in ((1.0,), (1.0, 1.5)):
                    if resolution == "native" and scales != (1.0,):
                        continue
                    sd0, dice, _ = score_model(root / name, items, scales=scales)
                    rows.append((name, resolution, "1, 1.5" if len(scales) > 1 else "1", sd0, dice, seconds))
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {epochs} epochs x {samples} slabs, "
              f"3 training phantoms at 1 mm, 2 test phantoms per resolution")
        print()
        print("| model | test scans | inference scales | surface dice @0 | dice |")
        print("|---|---|---|---:|---:|")
        for name, resolution, scales, sd0, dice, _ in rows:
            print(f"| {name} | {resolution} | {scales} | {sd0:.3f} | {dice:.3f} |")
        print()
        print("training: " + ", ".join(f"{n} {s:.0f} s" for n, s in {r[0]: r[5] for r in rows}.items()))


if __name__ == "__main__":
    main()
