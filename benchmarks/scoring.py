"""What the training benchmarks share: set-up of the process, and a trained model scored on
held-out files (``bench_shape_loss.py``, ``bench_resolution.py``)."""
from __future__ import annotations

import os

import numpy as np


def start(doc: str):
    """The command line (``--quick``; ``epochs`` and ``samples`` per epoch of each model) of a
    training benchmark, and the process set up: slab's
    warnings as the CLI shows them, torch threads from ``OMP_NUM_THREADS`` (default 2)."""
    import argparse

    import torch

    from slab.pipeline.cli import quiet_libraries

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    args = parser.parse_args()
    args.epochs, args.samples = (1, 64) if args.quick else (6, 960)  # the budget both benchmarks give each model
    quiet_libraries()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    return args


def score_model(run, items: list[dict], *, scales=(1.0,)) -> tuple[float, float, float]:
    """``(surface dice @0, Dice, clDice)`` means over ``items`` of the model in ``run`` (its own
    threshold and normalisation, ``slab predict --model``), each file at its own spacing."""
    from slab.pipeline.evaluation.metrics import evaluate
    from slab.pipeline.evaluation.skeleton import cldice
    from slab.pipeline.inference.ensemble import load_model
    from slab.io.volumes import load_volume

    model = load_model(run, device="cpu", scales=list(scales))
    scores = []
    for item in items:
        volume = load_volume(item["image"])
        mask = np.asarray(model.postprocess(model(volume)))
        truth = np.asarray(load_volume(item["label"]))
        spacing = tuple(float(v) for v in volume.meta["spacing"])
        m = evaluate(mask, truth, spacing, (0.0,))
        scores.append((m["surface_dice"]["0.0"], m["dice"], cldice(mask[0], truth[0])["cldice"]))
    return tuple(float(v) for v in np.mean(scores, axis=0))
