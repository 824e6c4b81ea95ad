"""``slab render PRED TRUTH -o OUT.png``: where a prediction hits and misses the truth, in 3D.

Hits (true positives) are yellow, false positives green, misses (false negatives) red; the
title holds the scores. ``--sections`` adds three orthogonal cross sections with outlines,
``--mesh`` a mesh file of the same surfaces. The volumes must share one geometry.
"""
from __future__ import annotations

from pathlib import Path

from slab.pipeline.cli.arguments import non_negative_float, non_negative_int, png_path, positive_int
from slab.core.errors import SlabError

HELP = "Render hits, false positives and misses of a prediction in 3D; cross sections and mesh export."


def add_arguments(parser) -> None:
    parser.add_argument("pred", metavar="PRED", help="predicted 0/1 mask, any format slab reads")
    parser.add_argument("truth", metavar="TRUTH", help="true 0/1 mask in PRED's geometry")
    parser.add_argument("-o", "--output", required=True, type=png_path, metavar="OUT.png", help="the 3D picture (PNG)")
    parser.add_argument("--views", type=positive_int, default=4, metavar="N", help="camera angles in the picture (default 4)")
    parser.add_argument("--image", metavar="IMAGE", help="image in the same geometry: grey floor in 3D, sections' background")
    parser.add_argument("--mesh", metavar="OUT.vtk|.ply|.glb", help="also write the surfaces as a mesh file")
    parser.add_argument("--sections", type=png_path, metavar="OUT.png", help="also write axial, coronal and sagittal cross sections")
    parser.add_argument("--channel", type=non_negative_int, metavar="C", help="label channel of multi-channel masks")
    parser.add_argument("--tolerance", type=non_negative_float, metavar="MM", help="also show surface dice at this tolerance (mm)")
    parser.add_argument("--size", type=positive_int, nargs=2, default=(1200, 900), metavar=("W", "H"),
                        help="picture size in pixels (default 1200 900)")


def _load(path: str):
    """Lazily where reading a slab at a time is cheap (slice stacks, uncompressed NIfTI)."""
    from slab.io.volumes import load_volume

    if path.lower().endswith(".nii") or Path(path).is_dir():
        try:
            return load_volume(path, lazy=True)
        except SlabError:  # e.g. a DICOM series directory: no lazy reader, read it whole
            pass
    return load_volume(path)


def paths(args) -> tuple[dict, dict]:
    return ({"PRED": args.pred, "TRUTH": args.truth, "--image": args.image},
            {"-o": args.output, "--sections": args.sections, "--mesh": args.mesh})


def run(args) -> int:
    import numpy as np

    from slab.pipeline.evaluation.render import mesh_path, render_hits, score_line
    from slab.pipeline.evaluation.sections import cross_sections
    from slab.io.volumes import check_same_geometry

    # Output names are checked before anything is read (the PNGs by their argument type).
    if args.mesh:
        mesh_path(args.mesh)
    pred, truth = _load(args.pred), _load(args.truth)
    volumes, names = [truth, pred], [args.truth, args.pred]
    image = None
    if args.image:
        image = _load(args.image)
        volumes.append(image)
        names.append(args.image)
    check_same_geometry(*volumes, names=names)
    spacing, affine = truth.meta["spacing"], np.asarray(truth.affine)

    result = render_hits(pred, truth, args.output, spacing=spacing, views=args.views, image=image,
                         title=f"{Path(args.pred).name} vs {Path(args.truth).name}", tolerance=args.tolerance,
                         size=tuple(args.size), channel=args.channel, mesh=args.mesh, affine=affine)
    counts = result["counts"]
    print(f"wrote {args.output}: {score_line(result['scores'])}; voxels: {counts['hit']} hit, "
          f"{counts['false_positive']} false positive, {counts['miss']} missed")
    for note in result["notes"]:
        print(f"note: {note}")
    if result["mesh"] is not None:
        print(f"wrote {result['mesh']}")
    if args.sections:
        sections = cross_sections(image, pred, truth, args.sections, spacing=spacing, channel=args.channel,
                                  title=f"{Path(args.pred).name} vs {Path(args.truth).name}", affine=affine)
        print(f"wrote {args.sections}: sections through voxel {sections['index']} "
              f"(voxel axes point {sections['orientation']}; radiological convention)")
    return 0
