"""``slab evaluate PRED TRUTH``: dice, IoU, precision, recall and surface dice as JSON; with
``--cldice``, ``--topology``, ``--radius-bins`` also the vessel-aware metrics
(:mod:`slab.pipeline.evaluation.skeleton`, :mod:`slab.pipeline.evaluation.topology`).

PRED is a 0/1 mask (integer or bool dtype) or a probability map (floating point, binarised
``> --threshold`` as ``slab postprocess`` does); TRUTH a 0/1 mask with the same geometry and
one channel per class. NIfTI files and slice stacks are read lazily, a few slices at a time.
"""
from __future__ import annotations

import json
import math
import sys

from slab.pipeline.cli.arguments import check_view, html_path, non_negative_float, png_path, probability
from slab.core.errors import SlabError

HELP = "Score a mask or probability map against the truth: dice, IoU, precision, recall, surface dice (JSON)."


def add_arguments(parser) -> None:
    parser.add_argument("pred", metavar="PRED",
                        help="predicted 0/1 mask or probability map (floating point), any format slab reads")
    parser.add_argument("truth", metavar="TRUTH",
                        help="ground-truth 0/1 mask, one channel per class, same geometry as PRED")
    parser.add_argument("--tolerance", nargs="+", type=non_negative_float, default=[0.0], metavar="T",
                        help="surface dice tolerance(s) in mm (default: 0, the SenNet definition)")
    parser.add_argument("--threshold", type=probability, default=0.5, metavar="t",
                        help="a probability map's voxel is foreground when > t, t in [0, 1] (default: 0.5)")
    parser.add_argument("--sweep", nargs="*", type=probability, metavar="t",
                        help="also score these thresholds (default 0.05, 0.10, ..., 0.95) and report the best "
                             "by surface dice at the first tolerance")
    parser.add_argument("--cldice", action="store_true",
                        help="also centreline Dice (clDice: topology precision / sensitivity from 3D skeletons)")
    parser.add_argument("--topology", action="store_true",
                        help="also Betti numbers (b0 components, b1 loops, b2 cavities; 26/6 connectivity), "
                             "their errors, largest-component share and fragments per true component")
    parser.add_argument("--radius-bins", action="store_true",
                        help="also centreline recall and precision per vessel radius (1, 2, 3-4, 5-8, >8 voxels)")
    parser.add_argument("--json", metavar="OUT", help="also write the JSON to OUT")
    parser.add_argument("--image", metavar="IMAGE", help="the image PRED was predicted from (for --view)")
    parser.add_argument("--view", type=html_path, metavar="OUT.html",
                        help="also write the page of slab view: IMAGE with PRED (at --threshold), TRUTH, the hits, "
                             "false positives and misses, scores and error clusters (needs --image)")
    parser.add_argument("--plot", type=png_path, metavar="PNG", help="plot the sweep's curves to PNG (needs --sweep)")


def _open(path):
    """Lazily where the reader can (NIfTI, slice stacks), so that big volumes stream."""
    from slab.io.volumes import load_volume

    try:
        return load_volume(path, lazy=True)
    except SlabError:
        return load_volume(path)


def _jsonable(value):
    """NaN (an undefined ratio) as null; JSON has no NaN."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _shape_metrics(result: dict, pred, truth, args, probabilities: bool) -> None:
    """clDice, topology and radius bins per class (whole masks in memory: skeletons are global)."""
    import numpy as np

    from slab.pipeline.evaluation.skeleton import cldice
    from slab.pipeline.evaluation.topology import radius_bins, topology_metrics

    p = np.asarray(pred.load() if hasattr(pred, "load") else pred)
    t = np.asarray(truth.load() if hasattr(truth, "load") else truth) > 0
    p = p > args.threshold if probabilities else p > 0
    for i, entry in enumerate(result["classes"]):
        if args.cldice:
            entry.update(cldice(p[i], t[i]))
        if args.topology:
            entry["topology"] = topology_metrics(p[i], t[i])
        if args.radius_bins:
            entry["radius_bins"] = radius_bins(p[i], t[i])
    if args.cldice:
        from slab.pipeline.evaluation.surface import nan_mean

        result["cldice"] = nan_mean([c["cldice"] for c in result["classes"]])


def paths(args) -> tuple[dict, dict]:
    return ({"PRED": args.pred, "TRUTH": args.truth, "--image": args.image},
            {"--json": args.json, "--plot": args.plot, "--view": args.view})


def run(args) -> int:
    import numpy as np

    from slab.pipeline.evaluation.metrics import evaluate, plot_sweep, threshold_sweep
    from slab.pipeline.evaluation.readers import is_float
    from slab.pipeline.evaluation.surface import check_thresholds, check_tolerances
    from slab.core.outputs import atomic_write
    from slab.io.volumes import check_same_geometry

    tolerances = check_tolerances(args.tolerance)
    check_view(args.view, args.image)
    thresholds = None
    if args.sweep is not None:
        thresholds = check_thresholds(args.sweep or np.round(np.arange(1, 20) * 0.05, 2))
    if args.plot and thresholds is None:
        raise SlabError("--plot: plots the threshold sweep; add --sweep")
    pred, truth = _open(args.pred), _open(args.truth)
    names = (args.pred, args.truth)
    check_same_geometry(pred, truth, names=names)
    if pred.shape[0] != truth.shape[0]:
        raise SlabError(f"{args.pred}: {pred.shape[0]} channel(s), but {args.truth} has {truth.shape[0]}")
    probabilities = is_float(pred)
    if thresholds is not None and not probabilities:
        raise SlabError(f"{args.pred}: --sweep needs a probability map (floating point), got a {pred.dtype} mask")
    spacing = tuple(float(s) for s in truth.meta["spacing"])

    result = {"pred": args.pred, "truth": args.truth}
    result.update(evaluate(pred, truth, spacing, tolerances, args.threshold if probabilities else None, names=names))
    if args.cldice or args.topology or args.radius_bins:
        _shape_metrics(result, pred, truth, args, probabilities)
    if thresholds is not None:
        result["sweep"] = threshold_sweep(pred, truth, thresholds, spacing, tolerances, names=names, cldice=args.cldice)
        if args.plot:
            plot_sweep(result["sweep"], args.plot)
    text = json.dumps(_jsonable(result), indent=2, allow_nan=False)
    if args.json:
        with atomic_write(args.json) as tmp:
            tmp.write_text(text + "\n", encoding="utf-8")
    print(text)
    if args.view:
        from slab.pipeline.evaluation.viewer import write_page

        write_page(args.image, args.pred, args.truth, args.view, threshold=args.threshold)
    written = [p for p in (args.json, args.plot, args.view) if p]
    if written:
        print(f"wrote {', '.join(written)}", file=sys.stderr)
    return 0
