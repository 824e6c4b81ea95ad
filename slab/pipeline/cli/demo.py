"""``slab demo``: the vessel_2p5d bundle end to end on the embedded phantom sample.

Runs what the bundle's ``configs/inference.json`` + ``configs/evaluate.json`` run (the same
library functions ``python -m monai.bundle run`` calls) with the shipped weights on
``data/vessel_phantom``: load, percentile normalisation, multi-plane 2.5D inference with flip TTA,
hysteresis flood fill and small-component removal, surface dice / Dice / precision / recall
against the phantom's label, the 3D hit/miss picture and cross sections; then a picture of a few
input slabs.

A bundle is read as data: its ``"slab"`` section (network, planes, TTA, normalisation,
post-processing) and plain values of ``evaluate.json``; nothing in its JSON is evaluated, so a
bundle from anywhere runs no code here (``python -m monai.bundle run`` does evaluate a bundle's
expressions: run only bundles you trust that way).
"""
from __future__ import annotations

import argparse
import time

from slab.pipeline.cli.arguments import positive_int

HELP = "run the vessel_2p5d bundle on the embedded phantom: predict, clean up, score, render (outputs/demo)"
# What the demo takes from configs/evaluate.json when the value there is plain data.
_EVALUATE_DEFAULTS = {"tolerances": [0.0, 1.0], "image_glob": "image*", "label_glob": "label*", "render": True}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from slab.pipeline.paths import BUNDLES_DIR, sample_dir

    parser.add_argument("--out", default="outputs/demo", metavar="DIR", help="output folder (default outputs/demo)")
    parser.add_argument("--bundle", default=str(BUNDLES_DIR / "vessel_2p5d"), metavar="DIR",
                        help="bundle directory or a shipped bundle's name (default: the shipped vessel_2p5d); "
                        "read as data, never executed")
    parser.add_argument("--data", default=sample_dir("vessel_phantom"), metavar="DIR",
                        help="folder with image*.nii.gz and label*.nii.gz (default: data/vessel_phantom)")
    parser.add_argument("--planes", metavar="P[,P]", help="inference planes, e.g. xy or xy,zx,zy (default: the bundle's)")
    parser.add_argument("--tta", choices=("none", "flips", "full"), help="test-time augmentation (default: the bundle's)")
    parser.add_argument("--device", metavar="DEVICE", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--views", type=positive_int, default=4, metavar="N",
                        help="camera angles in the 3D picture (default 4)")


def paths(args) -> tuple[dict, dict]:
    from slab.pipeline.cli.predict import bundle_contents

    return {"--bundle": bundle_contents(args.bundle), "--data": args.data}, {"--out": args.out}


def evaluate_settings(bundle) -> dict:
    """The plain values of ``bundle/configs/evaluate.json`` the demo uses (anything else there, an
    expression or a component, is left alone: it is for ``monai.bundle run``)."""
    from slab.core.checks import read_json_object

    config = read_json_object(bundle / "configs" / "evaluate.json", "bundle evaluation config")
    settings = dict(_EVALUATE_DEFAULTS)
    tolerances = config.get("tolerances")
    if isinstance(tolerances, list) and tolerances and all(
            isinstance(t, (int, float)) and not isinstance(t, bool) and t >= 0 for t in tolerances):
        settings["tolerances"] = [float(t) for t in tolerances]
    for key in ("image_glob", "label_glob"):
        if isinstance(config.get(key), str) and not config[key].startswith(("$", "@", "%")):
            settings[key] = config[key]
    return settings


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from slab.pipeline.bundle import list_pairs, require_files, run_evaluation
    from slab.pipeline.inference import Predictor, check_planes
    from slab.pipeline.evaluation.preview import preview_slabs
    from slab.io.volumes import load_volume

    start = time.perf_counter()
    bundle = require_files(args.bundle, ("configs/metadata.json", "configs/inference.json", "configs/evaluate.json",
                                         "models/model.pt"))
    settings = evaluate_settings(bundle)
    out = Path(args.out)
    predictor = Predictor.from_bundle(bundle, planes=None if args.planes is None else check_planes(args.planes),
                                      tta=args.tta, device=args.device)
    pairs = list_pairs(args.data, settings["image_glob"], settings["label_glob"])
    report = run_evaluation(predictor, pairs, out, tolerances=settings["tolerances"], output_name="mask.nii.gz",
                            render=settings["render"], views=args.views)
    case = report["cases"][0]
    image, label = load_volume(case["image"]), load_volume(case["label"])
    offsets = report["settings"]["offsets"] or [-1, 0, 1]
    slabs = preview_slabs(image, out / "slabs.png", plane="xy", offsets=offsets, n=3, label=label,
                          title="input slabs (xy plane, offsets " + ", ".join(f"{o:+d}" for o in offsets) + ")")
    used, sd = report["settings"], case["surface_dice"]
    post = "; ".join(" ".join([step["step"]] + [f"{k}={v}" for k, v in step.items() if k != "step"])
                     for step in used["postprocess"])
    shape = "x".join(str(s) for s in image.shape[1:])
    spacing = "x".join(f"{s:g}" for s in case["spacing"])
    print(f"slab demo: bundle {bundle.name} on {case['image']} ({shape} voxels, {spacing} mm)")
    print(f"  inference: planes {','.join(used['planes'])}, tta {used['tta']}, "
          f"post-processing [{post}], device {used['device']}: {case['predict_s']:.1f} s")
    print("  scores vs label: " + ", ".join(f"surface dice @{float(t):g} mm {v:.4f}" for t, v in sd.items())
          + f", dice {case['dice']:.4f}, precision {case['precision']:.4f}, recall {case['recall']:.4f}")
    print(f"  files in {out}/:")
    for path in [case["mask"], report["path"], *case.get("pictures", []), str(slabs)]:
        print(f"    {Path(path).name}")
    print(f"  done in {time.perf_counter() - start:.1f} s")
    return 0
