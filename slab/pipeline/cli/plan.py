"""``slab plan DATALIST -o PLAN_DIR``: fingerprint a dataset, check every case, and plan 2d, 2.5d
and 3d training configurations (``fingerprint.json``, ``plans.json``, ``datalist.json``), each
decision with its reason; see :mod:`slab.pipeline.planning`. ``--verify`` checks every case and
reports all problems in one pass, writing nothing."""
from __future__ import annotations

import sys
from pathlib import Path

from slab.pipeline.cli.arguments import positive_float, positive_int
from slab.core.errors import SlabError

HELP = "fingerprint a dataset and plan its 2d, 2.5d and 3d configurations (or --verify its cases)"


def add_arguments(parser) -> None:
    parser.add_argument("datalist", metavar="DATALIST.json",
                        help="Decathlon-style datalist of labelled cases, a Decathlon task's dataset.json, or an "
                             "nnU-Net v2 raw dataset folder")
    parser.add_argument("-o", "--out", metavar="PLAN_DIR", help="where the fingerprint and plans go")
    parser.add_argument("--verify", action="store_true",
                        help="only check every case (geometry, label values, channels, NaN) and list every problem")
    parser.add_argument("--memory", type=positive_float, metavar="GIB",
                        help="memory budget for training (default: 80%% of the GPU, or a quarter of free RAM "
                             "up to 8 GiB)")
    parser.add_argument("--device", metavar="DEVICE", help="cpu or cuda[:N]: where batch sizes are measured and "
                                                           "training will run (default: cuda when available)")
    parser.add_argument("--configurations", metavar="LIST", default="2d,2p5d,3d",
                        help="configurations to plan, from 2d, 2p5d, 3d (default: all)")
    parser.add_argument("--epochs", type=positive_int, metavar="N", help="epochs of every configuration")
    parser.add_argument("--budget", type=positive_float, metavar="MINUTES",
                        help="scale every configuration's schedule so that one training run (one fold) takes about "
                             "this long on --device (from a timed training step); the plan prints each one's "
                             "expected time either way")
    parser.add_argument("--encoder", metavar="auto|BACKBONE",
                        help="allow a pretrained 2D encoder: the 2d and 2p5d configurations train an encoder UNet from "
                             "published ImageNet weights (auto: EfficientNet-B0 on a CPU, SE-ResNeXt-50 on a GPU that "
                             "fits it; or efficientnet-b0..b7, resnet50/101/152, se_resnext50_32x4d/101_32x4d); the "
                             "file comes from $SLAB_HOME/encoders (see README). Default: UNets from scratch")
    parser.add_argument("--folds", type=positive_int, default=5, metavar="K",
                        help="folds for a datalist without its own (default: 5, at most the number of cases)")


def paths(args) -> tuple[dict, dict]:
    from slab.pipeline.data.datalist import datalist_paths

    inputs = {"DATALIST": args.datalist}
    if Path(args.datalist).is_dir() and (Path(args.datalist) / "dataset.json").is_file():
        inputs["DATALIST"] = str(Path(args.datalist) / "dataset.json")
        inputs["the dataset folder"] = [str(Path(args.datalist) / "imagesTr"), str(Path(args.datalist) / "labelsTr")]
    elif Path(args.datalist).is_file():
        inputs["datalist entries"] = datalist_paths(args.datalist)
    outputs = None
    if args.out and not args.verify:
        out = Path(args.out)
        outputs = [out / name for name in ("fingerprint.json", "plans.json", "datalist.json")]
    return inputs, {"-o": outputs}


def configurations(text: str) -> list[str]:
    from slab.pipeline.planning.plans import CONFIGURATIONS

    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in CONFIGURATIONS]
    if not names or bad or len(set(names)) != len(names):
        raise SlabError(f"--configurations: expected distinct names from {', '.join(CONFIGURATIONS)}, got {text!r}")
    return names


def run(args) -> int:
    from slab.pipeline.planning.fingerprint import fingerprint

    if Path(args.datalist).is_dir():  # a Decathlon task or an nnU-Net raw dataset, as it comes
        from slab.pipeline.data.nnunet import dataset_folder

        args.datalist = dataset_folder(args.datalist)

    if args.verify:
        fp, problems = fingerprint(args.datalist)
        for problem in problems:
            print(f"slab plan: {' '.join(problem.split())}", file=sys.stderr)
        good = len(fp.get("cases", []))
        print(f"{good} good case(s), {len(problems)} problem(s)")
        return 2 if problems else 0
    if not args.out:
        raise SlabError("-o: required (the plan directory), unless --verify")
    from slab.pipeline.planning.crossval import write_plan
    from slab.pipeline.planning.plans import describe

    fp, plans = write_plan(args.datalist, args.out, device=args.device, memory_gib=args.memory, epochs=args.epochs,
                           n_folds=args.folds, configurations=configurations(args.configurations),
                           minutes=args.budget, encoder=args.encoder)
    print(describe(fp, plans))
    print(f"wrote {Path(args.out) / 'fingerprint.json'}, {Path(args.out) / 'plans.json'}, "
          f"{Path(args.out) / 'datalist.json'} ({len(plans['folds'])} folds)")
    total = sum(p["time"]["total_min"] for p in plans["configurations"].values()) * len(plans["folds"])
    print(f"expected time of slab cv over every configuration and fold: {total:.1f} min")
    return 0
