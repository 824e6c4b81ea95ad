"""``slab cv PLAN_DIR``: train every fold of every planned configuration (resumable), predict
the held-out cases, and choose the configuration or ensemble and its post-processing on those
out-of-fold predictions; writes ``cv/table.md``, ``postprocessing.json`` and ``model.json``
(``slab predict --model PLAN_DIR``). See :mod:`slab.pipeline.planning.crossval`."""
from __future__ import annotations

from pathlib import Path

from slab.pipeline.cli.arguments import add_threads, fold_list

HELP = "cross-validate the planned configurations, choose ensemble and post-processing, write the model"


def add_arguments(parser) -> None:
    parser.add_argument("plan", metavar="PLAN_DIR", help="a directory written by slab plan")
    parser.add_argument("--configurations", metavar="LIST", help="from the plan's, e.g. 2d,2p5d (default: all)")
    parser.add_argument("--folds", type=fold_list, metavar="K,K", help="folds to run (default: all of the plan's)")
    parser.add_argument("--config", metavar="OVERRIDES.json", help="training config keys over every plan's")
    parser.add_argument("--device", metavar="DEVICE", help="cpu, cuda or cuda:N (default: cuda when available)")
    add_threads(parser)


def paths(args) -> tuple[dict, dict]:
    plan = Path(args.plan)
    inputs = {"PLAN_DIR": [plan / n for n in ("plans.json", "fingerprint.json", "datalist.json")],
              "--config": args.config}
    return inputs, {"PLAN_DIR": [plan / n for n in ("runs", "cv", "postprocessing.json", "model.json")]}


def run(args) -> int:
    from slab.pipeline.planning.crossval import run_cv
    from slab.pipeline.cli.plan import configurations
    from slab.core.checks import read_json_object

    overrides = read_json_object(args.config, "config") if args.config else None
    result = run_cv(args.plan, configurations=configurations(args.configurations) if args.configurations else None,
                    folds=args.folds, device=args.device, overrides=overrides)
    print(result["markdown"], end="")
    print(f"chosen: {result['best']} (score {result['final']['score']:.4f}); wrote {Path(args.plan) / 'model.json'}, "
          f"{Path(args.plan) / 'postprocessing.json'}, {Path(args.plan) / 'cv' / 'table.md'}")
    return 0
