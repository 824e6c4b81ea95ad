"""``slab view IMAGE [PRED] [TRUTH] -o case.html``: one self-contained HTML page to review a case in
any browser (see :mod:`slab.pipeline.evaluation.viewer`)."""
from __future__ import annotations

from slab.pipeline.cli.arguments import html_path, positive_int

HELP = "write one self-contained HTML page (NiiVue) of an image, its prediction and the hits, false positives and misses"


def add_arguments(parser) -> None:
    parser.add_argument("image", metavar="IMAGE", help="the image, any format slab reads (channel 0 is shown); or a "
                        "directory of volumes: one page per case and an index, worst first (PRED, TRUTH: directories)")
    parser.add_argument("pred", metavar="PRED", nargs="?", help="the prediction: a mask, label map or one channel per label")
    parser.add_argument("truth", metavar="TRUTH", nargs="?", help="the truth in PRED's layout: adds hits, false positives, "
                        "misses, scores and the largest error clusters")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.html", help="the page to write (for a directory "
                        "of cases: the folder of pages and index.html)")
    parser.add_argument("--labels", nargs="+", metavar="NAME", help="label names, value 1 first (default: label 1, ...)")
    parser.add_argument("--max-voxels", type=positive_int, default=None, metavar="N",
                        help="larger volumes are shown in blocks of f^3 voxels (default 160^3)")


def paths(args) -> tuple[dict, dict]:
    return {"IMAGE": args.image, "PRED": args.pred, "TRUTH": args.truth}, {"-o": args.output}


def run(args) -> int:
    import argparse
    from pathlib import Path

    from slab.pipeline.data.cases import find_cases
    from slab.pipeline.evaluation.viewer import MAX_VOXELS, write_index, write_page
    from slab.core.errors import SlabError

    if find_cases(args.image)[0]:  # a directory of volumes (an empty one is refused there, naming it)
        if args.output.lower().endswith((".html", ".htm")):
            raise SlabError(f"-o {args.output}: IMAGE is a directory of cases; give a folder for their pages")
        rows = write_index(args.image, args.pred, args.truth, args.output, names=args.labels,
                           max_voxels=args.max_voxels or MAX_VOXELS)
        print(f"wrote {Path(args.output) / 'index.html'}: {len(rows)} case page(s), worst first")
        return 0
    try:
        html_path(args.output)
    except argparse.ArgumentTypeError as err:
        raise SlabError(f"-o: {err}") from None
    summary = write_page(args.image, args.pred, args.truth, args.output, names=args.labels,
                         max_voxels=args.max_voxels or MAX_VOXELS)
    shown = f"blocks of {summary['factor']}^3 voxels" if summary["factor"] > 1 else "full resolution"
    print(f"wrote {args.output}: {', '.join(summary['layers'])} ({shown}), {summary['bytes'] / 2**20:.1f} MiB")
    return 0
