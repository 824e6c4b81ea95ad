"""``slab train``: train a 2.5D / 3D segmentation or a slice-sequence classification network.

Multi-process (multi-GPU, multi-node) training: launch the same command under ``torchrun``, e.g.
``torchrun --nproc_per_node 4 -m slab.pipeline.cli train --datalist D --config C --out RUN``.
"""
from __future__ import annotations

import argparse
import json

from slab.pipeline.cli.arguments import add_threads, non_negative_int, positive_int

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
    parser.add_argument("--plan", metavar="PLAN_DIR", help="train a configuration of a plan (slab plan); "
                        "--config keys override the plan's, --out defaults to PLAN_DIR/runs/CONFIGURATION/fold_K")
    parser.add_argument("--configuration", metavar="NAME", help="with --plan: 2d, 2p5d or 3d")
    add_threads(parser)
    parser.add_argument("--show-config", action="store_true",
                        help="print every configuration key with its default and meaning, then exit")


def paths(args) -> tuple[dict, dict]:
    """The datalist, the config and every volume the datalist lists are inputs; the run's files
    (not the run directory, which may hold the datalist) are outputs."""
    from pathlib import Path

    from slab.pipeline.training import RUN_FILES

    datalist = Path(args.plan) / "datalist.json" if args.plan else args.datalist
    inputs = {"--datalist": datalist, "--config": args.config}
    if args.plan:
        inputs["--plan"] = [Path(args.plan) / n for n in ("plans.json", "fingerprint.json")]
    if datalist and Path(datalist).is_file():
        from slab.pipeline.data.datalist import datalist_paths

        inputs["datalist entries"] = datalist_paths(datalist)
    out = _out(args)
    return inputs, {"--out": [Path(out) / name for name in RUN_FILES] if out else None}


def _out(args):
    if args.out or not args.plan or not args.configuration:
        return args.out
    from slab.pipeline.planning.crossval import run_dir

    return run_dir(args.plan, args.configuration, args.fold or 0)


def run(args: argparse.Namespace) -> int:
    from slab.pipeline.training import describe_config, train
    from slab.core.errors import SlabError

    if args.show_config:
        print(describe_config())
        return 0
    if args.plan:
        from slab.pipeline.planning.crossval import train_fold
        from slab.core.checks import read_json_object

        if args.datalist:
            raise SlabError("--datalist: --plan brings its own (PLAN_DIR/datalist.json)")
        if not args.configuration:
            raise SlabError("--configuration: required with --plan (2d, 2p5d or 3d)")
        overrides = read_json_object(args.config, "config") if args.config else None
        result = train_fold(args.plan, args.configuration, args.fold or 0, overrides=overrides, device=args.device,
                            out=_out(args), resume=args.resume, epochs=args.epochs)
        args.out = str(_out(args))
    else:
        if args.configuration:
            raise SlabError("--configuration: only with --plan")
        for flag, value in (("--datalist", args.datalist), ("--out", args.out)):
            if not value:
                raise SlabError(f"{flag}: required")
        result = train(args.datalist, args.config, args.out, fold=args.fold, resume=args.resume,
                       device=args.device, epochs=args.epochs)
    from slab.core.distributed import dist_env

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
