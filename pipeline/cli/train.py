"""``slab train``: train a 2.5D / 3D segmentation or a slice-sequence classification network.

Multi-process (multi-GPU, multi-node) training: launch the same command under ``torchrun``, e.g.
``torchrun --nproc_per_node 4 -m pipeline.cli train --datalist D --config C --out RUN``.
"""
from __future__ import annotations

import argparse
import json

from pipeline.cli.arguments import non_negative_int, positive_int

HELP = "train a segmentation or classification network from a datalist and a JSON config"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--datalist", metavar="DATALIST.json",
                        help="Decathlon-style datalist (slab dataset writes one)")
    parser.add_argument("--config", metavar="CONFIG.json",
                        help="training configuration; missing keys take their defaults (--show-config lists them)")
    parser.add_argument("--out", metavar="RUN_DIR",
                        help="run directory: checkpoints, logs, curves and the config used")
    parser.add_argument("--fold", type=non_negative_int, metavar="K", help="validate on fold K, train on the others")
    parser.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from last.pt")
    parser.add_argument("--device", default=None, metavar="DEVICE",
                        help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.add_argument("--epochs", type=positive_int, metavar="N", help="override the config's epochs")
    parser.add_argument("--show-config", action="store_true",
                        help="print every configuration key with its default and meaning, then exit")


def paths(args) -> tuple[dict, dict]:
    """The datalist, the config and every volume the datalist lists are inputs; the run's files
    (not the run directory, which may hold the datalist) are outputs."""
    from pathlib import Path

    from pipeline.training import RUN_FILES

    inputs = {"--datalist": args.datalist, "--config": args.config}
    if args.datalist and Path(args.datalist).is_file():
        from pipeline.data.datalist import datalist_paths

        inputs["datalist entries"] = datalist_paths(args.datalist)
    return inputs, {"--out": [Path(args.out) / name for name in RUN_FILES] if args.out else None}


def run(args: argparse.Namespace) -> int:
    from pipeline.training import describe_config, train
    from transforms.errors import SlabError

    if args.show_config:
        print(describe_config())
        return 0
    for flag, value in (("--datalist", args.datalist), ("--out", args.out)):
        if not value:
            raise SlabError(f"{flag}: required")
    result = train(args.datalist, args.config, args.out, fold=args.fold, resume=args.resume,
                   device=args.device, epochs=args.epochs)
    from pipeline.training.distributed import dist_env

    if dist_env().is_main:
        best = result["best"]
        last = result["history"][-1] if result["history"] else {}
        summary = {
            "run_dir": args.out,
            "epochs": last.get("epoch"),
            "train_loss": last.get("train_loss"),
            "best_metric": best["metric"],
            "best_value": best["value"],
            "best_epoch": best["epoch"],
            "threshold": result["threshold"],
            "best_checkpoint": result["best_checkpoint"],
        }
        print(json.dumps(summary, indent=2))
    return 0
