"""Does a shape loss raise surface dice? Dice+BCE against Dice+BCE plus the soft surface dice
(tolerance 0) and plus soft clDice, same budget and seeds, on the vessel phantoms.

    python benchmarks/bench_shape_loss.py           # ~6 min on 2 cores
    python benchmarks/bench_shape_loss.py --quick   # a smoke run

Three training phantoms and a validation phantom (48^3, ``kind="vessels"``), two held-out test
phantoms; the slab recipe of the README (2.5D UNet, three planes, slabs [-1, 0, 1]). The
threshold of each model is the one its validation chose; the test scores are surface dice at
tolerance 0 (the SenNet metric), Dice and clDice, means over the test phantoms.
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



def main() -> None:
    import torch

    from slab.pipeline.data.phantom import write_phantom
    from slab.pipeline.training import train
    from scoring import score_model, start

    args = start(__doc__)
    size = 32 if args.quick else 48
    epochs, samples = args.epochs, args.samples
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)

        def case(seed):
            image, label = write_phantom(root / f"ph{seed}", shape=(size,) * 3, seed=seed, kind="vessels")
            return {"image": str(image), "label": str(label), "case": f"ph{seed}"}

        datalist = root / "datalist.json"
        datalist.write_text(json.dumps({"training": [case(s) for s in range(3)], "validation": [case(10)]}))
        tests = [case(20), case(21)]
        rows = []
        for name, shape in (("Dice+BCE", {}), ("+ surface dice 1.0", {"surface_dice": 1.0}),
                            ("+ clDice 0.5", {"cldice": 0.5})):
            cfg = {"epochs": epochs, "batch_size": 16, "samples_per_epoch": samples, "patch_size": [48, 48],
                   "shape_loss": shape, "progress": False, "val": {"metric": "surface_dice_0"}}
            start = time.perf_counter()
            train(datalist, cfg, root / f"run{len(rows)}", device="cpu")
            seconds = time.perf_counter() - start
            rows.append((name, *score_model(root / f"run{len(rows)}", tests), seconds))
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {epochs} epochs x {samples} slabs, "
              f"3 training phantoms {size}^3, 2 test phantoms")
        print()
        print("| loss | surface dice @0 | dice | clDice | training s |")
        print("|---|---:|---:|---:|---:|")
        for name, sd0, dice, cl, seconds in rows:
            print(f"| {name} | {sd0:.3f} | {dice:.3f} | {cl:.3f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
