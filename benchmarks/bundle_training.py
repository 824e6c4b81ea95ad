"""Train every bundle with its own ``configs/train.json`` (as shipped: phantoms, epochs, seed 0)
and score the exported weights on phantoms that training never saw: the training time and the
scores each bundle's docs quote come from one run of this script.

    python benchmarks/bundle_training.py [--bundles vessel_2p5d gi_tract_2p5d brats_3d spine_cls_2p5d]
        [--out /tmp/bundle_training] [--ship]

Segmentation bundles are scored through their own inference settings (``Predictor.from_bundle``
with the exported weights and the thresholds recorded on validation) on two held-out phantoms
(seeds 200, 201): surface dice at 0 and 1 mm, Dice, precision, recall. The classification
bundle is scored the same way on six held-out phantoms whose vertebrae carry cracks (ROC AUC
and the competition's log loss over every study and vertebra), beside its validation scores
from training.
Nothing is written into the repository, unless ``--ship``: then each bundle's exported
``model.pt`` and ``model.json`` are copied into ``bundles/<name>/models/`` (the shipped weights)
and its held-out scores into ``eval_metrics`` of its ``configs/metadata.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from common import ROOT, print_table

BUNDLES = ("vessel_2p5d", "gi_tract_2p5d", "brats_3d", "spine_cls_2p5d")
HELD_OUT = (200, 201)
# Held-out fractured phantoms of the classifier, and which vertebrae (C1, C2, C3) each has broken.
SPINE_HELD_OUT = (200, 201, 202, 203, 204, 205)
SPINE_TARGETS = {"C1": [1, 0, 0, 1, 0, 1], "C2": [0, 1, 0, 1, 1, 0], "C3": [1, 1, 0, 0, 0, 1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundles", nargs="+", default=list(BUNDLES), choices=BUNDLES)
    parser.add_argument("--out", default="/tmp/bundle_training")
    parser.add_argument("--ship", action="store_true", help="copy the weights and scores into the bundles")
    args = parser.parse_args()
    import torch

    from slab.pipeline.bundle import phantom_datalist, run_bundle, run_evaluation
    from slab.pipeline.inference import Predictor

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    rows = []
    for name in args.bundles:
        bundle = ROOT / "bundles" / name
        out = Path(args.out) / name
        start, cpu = time.perf_counter(), time.process_time()
        (result,) = run_bundle(bundle, ("train.json",), output_dir=str(out / "run"), device="cpu",
                               **{"training#progress": False})
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        row = {"bundle": name, "train wall (s)": f"{wall:.0f}", "train CPU (s)": f"{cpu:.0f}",
               "epochs": len(result["history"]), "best epoch": result["best"]["epoch"]}
        train = json.loads((bundle / "configs" / "train.json").read_text(encoding="utf-8"))
        if name == "spine_cls_2p5d":
            best = result["history"][result["best"]["epoch"] - 1]
            held = spine_held_out(train, Path(result["exported"]), out / "held_out")
            row.update({"validation": f"AUC {best['val_auc']:.3f}, log loss {best['val_log_loss']:.3f} "
                                      f"({len(train['phantom']['val_seeds'])} studies)",
                        "held-out": f"AUC {held['auc']:.3f}, log loss {held['log_loss']:.3f} "
                                    f"({len(SPINE_HELD_OUT)} studies)"})
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.ship:
                ship(bundle, result, {"auc": round(held["auc"], 4), "log_loss": round(held["log_loss"], 4),
                                      "val_auc": round(best["val_auc"], 4), "val_log_loss": round(best["val_log_loss"], 4),
                                      "note": f"auc, log_loss: held-out fractured phantoms (seeds "
                                              f"{', '.join(map(str, SPINE_HELD_OUT))}, every (study, vertebra) row) "
                                              "through inference.json's settings; val_*: train.json's validation "
                                              "studies at the best epoch; benchmarks/bundle_training.py"})
            continue
        phantom = train["phantom"]
        labels = train["datalist"].get("labels")
        datalist = phantom_datalist(out / "held_out", kind=phantom["kind"], shape=phantom["shape"], train_seeds=[],
                                    val_seeds=HELD_OUT, labels=labels,
                                    image_format=phantom.get("image_format", "nifti"))
        pairs = json.loads(Path(datalist).read_text(encoding="utf-8"))["validation"]
        predictor = Predictor.from_bundle(bundle, weights=result["exported"], device="cpu")
        report = run_evaluation(predictor, pairs, out / "eval", tolerances=(0.0, 1.0), render=False)
        mean = report["mean"]
        row.update({"held-out SD@0": f"{mean['surface_dice']['0.0']:.3f}",
                    "SD@1mm": f"{mean['surface_dice']['1.0']:.3f}", "Dice": f"{mean['dice']:.3f}",
                    "precision": f"{mean['precision']:.3f}", "recall": f"{mean['recall']:.3f}",
                    "threshold": json.dumps(json.loads(Path(result["exported"]).with_suffix(".json").read_text(
                        encoding="utf-8"))["threshold"])})
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.ship:
            ship(bundle, result, {"surface_dice_0": round(mean["surface_dice"]["0.0"], 4),
                                  "surface_dice_1mm": round(mean["surface_dice"]["1.0"], 4),
                                  "dice": round(mean["dice"], 4), "precision": round(mean["precision"], 4),
                                  "recall": round(mean["recall"], 4),
                                  "note": f"held-out phantoms (seeds {', '.join(map(str, HELD_OUT))}) through "
                                          "inference.json's settings, benchmarks/bundle_training.py"})
    columns = list(dict.fromkeys(k for row in rows for k in row))
    print(f"\nBundles trained with their own train.json (CPU, {torch.get_num_threads()} threads), scored on "
          f"held-out phantoms (seeds {', '.join(map(str, HELD_OUT))})\n")
    print_table(columns, "l" + "r" * (len(columns) - 1), [[row.get(c, "") for c in columns] for row in rows])


def spine_held_out(train: dict, weights: Path, out: Path) -> dict:
    """The classifier's exported weights on held-out fractured phantoms, through the settings of
    the bundle's inference.json (normalisation, slabs, sequence length, image size): ROC AUC
    and the competition's log loss over every (study, vertebra) row."""
    import numpy as np
    from monai.bundle import ConfigParser

    from slab.networks import load_weights
    from slab.pipeline.bundle import phantom_datalist
    from slab.pipeline.inference.sequences import predict_sequences
    from slab.pipeline.training.classification import competition_log_loss, roc_auc
    from slab.transforms.intensity import make_normalize
    from slab.io.volumes import load_volume

    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundles" / "spine_cls_2p5d" / "configs" / "inference.json"))
    cfg = parser.get_parsed_content("classifier")
    model = load_weights(parser.get_parsed_content("network_def"), str(weights))
    phantom, labels = train["phantom"], train["datalist"]["labels"]
    datalist = phantom_datalist(out, kind=phantom["kind"], shape=phantom["shape"], train_seeds=[],
                                val_seeds=SPINE_HELD_OUT, labels=labels, label_format="values",
                                targets=SPINE_TARGETS, fractures=True)
    probs, targets = [], []
    for item in json.loads(Path(datalist).read_text(encoding="utf-8"))["validation"]:
        image = make_normalize(cfg["normalize"])(load_volume(item["image"]))
        scores = predict_sequences(model, image, np.asarray(load_volume(item["label"])), n_slabs=cfg["n_slabs"],
                                   offsets=cfg["offsets"], plane=cfg["plane"], size=tuple(cfg["image_size"]),
                                   targets=labels, device="cpu", amp=False)
        probs.append([scores[name]["probability"] for name in labels])
        targets.append([item["targets"][name] for name in labels])
    probs, targets = np.asarray(probs), np.asarray(targets)
    return {"auc": roc_auc(probs, targets), "log_loss": competition_log_loss(probs, targets)}


def ship(bundle: Path, result: dict, metrics: dict) -> None:
    """Copy a training's exported weights and summary into ``bundle/models`` and ``metrics`` into
    ``eval_metrics`` of its metadata."""
    import shutil

    from slab.pipeline.bundle import zoo_json

    exported = Path(result["exported"])
    for source in (exported, exported.with_suffix(".json")):
        shutil.copyfile(source, bundle / "models" / source.name)
    meta_path = bundle / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta["eval_metrics"] = metrics
    meta_path.write_text(zoo_json(meta), encoding="utf-8")


if __name__ == "__main__":
    main()
