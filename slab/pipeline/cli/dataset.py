"""``slab dataset KIND ROOT OUT_DIR``: a competition dataset → ``OUT_DIR/datalist.json``."""
from __future__ import annotations

import json

from slab.pipeline.cli.arguments import non_negative_int, positive_int
from slab.core.checks import DATASET_KINDS as KINDS

HELP = "Write OUT_DIR/datalist.json (folds grouped by case) for a dataset, converting labels where needed."


def add_arguments(parser) -> None:
    parser.add_argument("kind", metavar="KIND", choices=KINDS, help=f"dataset layout: {', '.join(KINDS)}")
    parser.add_argument("root", metavar="ROOT", help="the dataset directory as downloaded")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="where datalist.json and converted volumes go")
    parser.add_argument("--folds", type=positive_int, default=5,
                        help="number of folds, grouped by case (default: 5; at most the number of cases)")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="seed that shuffles cases into folds (default: 0)")


def paths(args) -> tuple[dict, dict]:
    from pathlib import Path

    out = Path(args.out_dir)
    return {"ROOT": args.root}, {"OUT_DIR": [out / "datalist.json", out / "volumes"]}


def run(args) -> int:
    from slab.pipeline.data.adapters import build_datalist

    path = build_datalist(args.kind, args.root, args.out_dir, n_folds=args.folds, seed=args.seed)
    datalist = json.loads(path.read_text(encoding="utf-8"))
    items = datalist["training"] + datalist["validation"]
    labelled = sum("label" in item for item in items)
    cases = len({item["case"] for item in items})
    skipped = f", {len(datalist['skipped'])} case(s) skipped" if datalist.get("skipped") else ""
    print(f"wrote {path}: {len(items)} items ({labelled} labelled) from {cases} cases, "
          f"{len(datalist['training'])} training / {len(datalist['validation'])} validation "
          f"(fold 0 of {datalist['n_folds']}){skipped}")
    return 0
