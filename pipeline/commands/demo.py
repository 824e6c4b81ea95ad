"""``slab demo``: the vessel_2p5d bundle end to end on the embedded phantom sample.

Runs the bundle's ``configs/inference.json`` + ``configs/evaluate.json`` (the code
``python -m monai.bundle run`` runs) with the shipped weights on ``data/vessel_phantom``: load,
percentile normalisation, multi-plane 2.5D inference with flip TTA, hysteresis flood fill and
small-component removal, surface dice / Dice / precision / recall against the phantom's label,
the 3D hit/miss picture and cross sections; then a picture of a few input slabs.
"""
from __future__ import annotations

import argparse
import time

from pipeline.commands import positive_int

HELP = "run the vessel_2p5d bundle on the embedded phantom: predict, clean up, score, render (outputs/demo)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipeline.bundle import BUNDLES_DIR, sample_dir

    parser.add_argument("--out", default="outputs/demo", metavar="DIR", help="output folder (default outputs/demo)")
    parser.add_argument("--bundle", default=str(BUNDLES_DIR / "vessel_2p5d"), metavar="DIR",
                        help="bundle directory (default: the shipped vessel_2p5d)")
    parser.add_argument("--data", default=sample_dir("vessel_phantom"), metavar="DIR",
                        help="folder with image*.nii.gz and label*.nii.gz (default: data/vessel_phantom)")
    parser.add_argument("--planes", metavar="P[,P]", help="inference planes, e.g. xy or xy,zx,zy (default: the bundle's)")
    parser.add_argument("--tta", choices=("none", "flips", "full"), help="test-time augmentation (default: the bundle's)")
    parser.add_argument("--device", metavar="DEVICE", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--views", type=positive_int, default=4, metavar="N", help="camera angles in the 3D picture (default 4)")


def paths(args) -> tuple[dict, dict]:
    from pipeline.commands.predict import bundle_contents

    return {"--bundle": bundle_contents(args.bundle), "--data": args.data}, {"--out": args.out}


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipeline.bundle import require_files, run_bundle
    from pipeline.preview import preview_slabs
    from transforms.io import load_volume

    start = time.perf_counter()
    bundle = require_files(args.bundle, ("configs/metadata.json", "configs/inference.json", "configs/evaluate.json",
                                         "models/model.pt"))
    out = Path(args.out)
    overrides = {"dataset_dir": str(args.data), "output_dir": str(out), "output_name": "mask.nii.gz",
                 "views": args.views}
    if args.planes:
        overrides["slab#planes"] = [p.strip() for p in args.planes.split(",")]
    if args.tta:
        overrides["slab#tta"] = args.tta
    if args.device:
        overrides["device"] = args.device
    (report,) = run_bundle(bundle, ("inference.json", "evaluate.json"), **overrides)
    case = report["cases"][0]
    image, label = load_volume(case["image"]), load_volume(case["label"])
    offsets = report["settings"]["offsets"] or [-1, 0, 1]
    slabs = preview_slabs(image, out / "slabs.png", plane="xy", offsets=offsets, n=3, label=label,
                          title="input slabs (xy plane, offsets " + ", ".join(f"{o:+d}" for o in offsets) + ")")
    settings, sd = report["settings"], case["surface_dice"]
    post = "; ".join(" ".join([step["step"]] + [f"{k}={v}" for k, v in step.items() if k != "step"])
                     for step in settings["postprocess"])
    shape = "x".join(str(s) for s in image.shape[1:])
    spacing = "x".join(f"{s:g}" for s in case["spacing"])
    print(f"slab demo: bundle {bundle.name} on {case['image']} ({shape} voxels, {spacing} mm)")
    print(f"  inference: planes {','.join(settings['planes'])}, tta {settings['tta']}, "
          f"post-processing [{post}], device {settings['device']}: {case['predict_s']:.1f} s")
    print("  scores vs label: " + ", ".join(f"surface dice @{float(t):g} mm {v:.4f}" for t, v in sd.items())
          + f", dice {case['dice']:.4f}, precision {case['precision']:.4f}, recall {case['recall']:.4f}")
    print(f"  files in {out}/:")
    for path in [case["mask"], report["path"], *case.get("pictures", []), str(slabs)]:
        print(f"    {Path(path).name}")
    print(f"  done in {time.perf_counter() - start:.1f} s")
    return 0
