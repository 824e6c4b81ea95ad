"""``slab errors PRED TRUTH -o CLUSTERS.csv [--sheet SHEET.png]``: false-positive and missed
clusters ranked by size and mean probability (where to look for missing annotations), with
centroids in voxels and world coordinates; see :mod:`slab.pipeline.evaluation.clusters`."""
from __future__ import annotations

import numpy as np

from slab.pipeline.cli.arguments import check_view, html_path, non_negative_int, png_path, positive_int, probability

HELP = "rank false-positive and missed clusters of a prediction (CSV), and draw the top ones (PNG)"


def add_arguments(parser) -> None:
    parser.add_argument("pred", metavar="PRED", help="predicted mask, or a probability map (floating point)")
    parser.add_argument("truth", metavar="TRUTH", help="true 0/1 mask in PRED's geometry")
    parser.add_argument("-o", "--output", required=True, metavar="CLUSTERS.csv", help="the ranked clusters")
    parser.add_argument("--prob", metavar="PROB", help="probability map for the clusters' mean probability "
                                                        "(default: PRED itself when it is one)")
    parser.add_argument("--threshold", type=probability, default=0.5, metavar="t",
                        help="a probability map is foreground where > t (default 0.5)")
    parser.add_argument("--image", metavar="IMAGE", help="image in the same geometry, drawn under the sections")
    parser.add_argument("--sheet", type=png_path, metavar="SHEET.png",
                        help="also draw the top clusters (3D crop + section each; a PNG)")
    parser.add_argument("--view", type=html_path, metavar="OUT.html",
                        help="also write the page of slab view, its error clusters as links (needs --image)")
    parser.add_argument("--top", type=positive_int, default=6, metavar="K", help="clusters on the sheet (default 6)")
    parser.add_argument("--channel", type=non_negative_int, default=0, metavar="C", help="label channel (default 0)")


def paths(args) -> tuple[dict, dict]:
    return ({"PRED": args.pred, "TRUTH": args.truth, "--prob": args.prob, "--image": args.image},
            {"-o": args.output, "--sheet": args.sheet, "--view": args.view})


def run(args) -> int:
    from slab.pipeline.evaluation.clusters import error_clusters, error_sheet, write_clusters_csv
    from slab.pipeline.evaluation.readers import binary_mask, finite_probabilities, is_float
    from slab.core.errors import SlabError
    from slab.io.volumes import check_same_geometry, load_volume
    from slab.transforms.post import greater_than

    check_view(args.view, args.image)
    pred, truth = load_volume(args.pred), load_volume(args.truth)
    check_same_geometry(pred, truth, names=[args.pred, args.truth])
    for name, volume in ((args.pred, pred), (args.truth, truth)):
        if args.channel >= volume.shape[0]:
            raise SlabError(f"--channel: {name} has {volume.shape[0]} channel(s), no channel {args.channel}")
    prob = None
    p = np.asarray(pred)[args.channel]
    if is_float(pred):  # checked as slab evaluate checks it: no NaN
        prob = finite_probabilities(p, args.pred)
        p = greater_than(p, args.threshold)
    else:
        p = binary_mask(p, args.pred)
    if args.prob:
        probs = load_volume(args.prob)
        check_same_geometry(probs, truth, names=[args.prob, args.truth])
        prob = finite_probabilities(np.asarray(probs)[min(args.channel, probs.shape[0] - 1)], args.prob)
    t = binary_mask(np.asarray(truth)[args.channel], args.truth)
    spacing = tuple(float(s) for s in truth.meta["spacing"])
    clusters = error_clusters(p, t, prob, affine=np.asarray(truth.affine), spacing=spacing)
    image = None
    if args.image:
        volume = load_volume(args.image)
        check_same_geometry(volume, truth, names=[args.image, args.truth])
        image = np.asarray(volume)[0]
    if args.sheet and not clusters:  # refused before anything is written
        raise SlabError(f"--sheet: {args.pred} and {args.truth} agree everywhere; there is no cluster to draw")
    write_clusters_csv(clusters, args.output)
    written = [args.output]
    if args.sheet:
        error_sheet(clusters, p, t, image, args.sheet, spacing=spacing, top=args.top)
        written.append(args.sheet)
    if args.view:
        from slab.pipeline.evaluation.viewer import write_page

        write_page(args.image, args.pred, args.truth, args.view, threshold=args.threshold)
        written.append(args.view)
    fp = sum(c["kind"] == "false_positive" for c in clusters)
    print(f"{fp} false-positive and {len(clusters) - fp} missed cluster(s); wrote {', '.join(written)}")
    return 0
