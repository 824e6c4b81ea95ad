"""``slab postprocess IN OUT``: probability map or mask to a cleaned mask, in IN's geometry.

The steps are :func:`slab.transforms.post.postprocess`'s, in its order: ROI, threshold or
hysteresis, small components, largest components, holes. IN is a probability map (then
``--threshold`` or ``--hysteresis`` is required: no threshold is assumed) or a mask of 0/1
values; the component and hole steps work on the binarised volume.
"""
from __future__ import annotations

from slab.pipeline.cli.arguments import finite_float, non_negative_int, positive_int
from slab.core.checks import CONNECTIVITIES, FILL_MODES
from slab.core.errors import SlabError

HELP = "Clean a probability map or mask: threshold or hysteresis flood fill, components, holes, ROI."


def add_arguments(parser) -> None:
    parser.add_argument("input", metavar="IN", help="probability map or 0/1 mask, any format slab reads")
    parser.add_argument("output", metavar="OUT",
                        help="uint8 mask: .nii[.gz], .nrrd, .nhdr, .mha, .mhd or a slice directory")
    binarise = parser.add_mutually_exclusive_group()
    binarise.add_argument("--threshold", type=finite_float, metavar="T",
                          help="foreground where IN > T (required when IN is not already 0/1)")
    binarise.add_argument("--hysteresis", type=finite_float, nargs=2, metavar=("LOW", "HIGH"),
                          help="flood fill from voxels > HIGH through voxels > LOW")
    parser.add_argument("--min-size", type=non_negative_int, default=0, metavar="N",
                        help="remove components of fewer than N voxels (default 0: keep all)")
    parser.add_argument("--keep-largest", type=positive_int, metavar="K", help="keep the K largest components")
    parser.add_argument("--fill-holes", nargs="?", const="3d", choices=FILL_MODES,
                        help="fill enclosed holes in 3D (default) or in each z slice")
    parser.add_argument("--roi", metavar="MASK", help="0/1 organ mask in IN's geometry; everything outside is zeroed")
    parser.add_argument("--connectivity", type=int, choices=CONNECTIVITIES, default=26,
                        help="voxel connectivity of components and flood fill (default 26)")


def paths(args) -> tuple[dict, dict]:
    return {"IN": args.input, "--roi": args.roi}, {"OUT": args.output}


def run(args) -> int:
    from slab.io.volumes import check_same_geometry, load_volume, output_format, save_volume
    from slab.transforms.post import Postprocess, check_binary

    # Parameters and OUT are checked before anything is read.
    post = Postprocess(threshold=args.threshold, hysteresis=args.hysteresis, min_size=args.min_size,
                       keep_largest=args.keep_largest, fill_holes=args.fill_holes, connectivity=args.connectivity)
    output_format(args.output)
    volume = load_volume(args.input)
    if args.threshold is None and args.hysteresis is None:
        try:
            check_binary(volume, args.input)
        except SlabError:
            raise SlabError(
                f"{args.input}: not a 0/1 mask; a probability map needs --threshold or --hysteresis") from None
    roi = None
    if args.roi:
        roi = load_volume(args.roi)
        check_same_geometry(volume, roi, names=[args.input, args.roi])
        check_binary(roi, args.roi)
    try:
        mask = post(volume, roi)
    except SlabError as err:
        raise SlabError(f"{args.input}: {err}") from None
    save_volume(mask, args.output, mask=True)  # a slice stack of 0/255, as SenNet's labels
    print(f"wrote {args.output}: {tuple(mask.shape)} uint8, {int(mask.sum())} foreground voxels")
    return 0
