"""``slab convert SRC DST``: any supported volume format to any other."""
from __future__ import annotations

import sys

from slab.pipeline.cli.arguments import positive_float
from slab.transforms.checks import SLICE_FORMATS

HELP = "Convert a volume between NIfTI, NRRD/MHA/MHD, DICOM (input) and 2D slice stacks (a directory)."


def add_arguments(parser) -> None:
    parser.add_argument("src", metavar="SRC", nargs="+",
                        help="a .nii[.gz], .nrrd, .nhdr, .mha, .mhd file, a DICOM directory or a slice directory; "
                             "several files are the channels of one volume")
    parser.add_argument("dst", metavar="DST",
                        help="a .nii[.gz], .nrrd, .nhdr, .mha or .mhd file, or a directory for a slice stack")
    parser.add_argument("--spacing", nargs=3, type=positive_float, metavar=("X", "Y", "Z"),
                        help="voxel size in mm; sets a slice stack's spacing, replaces a file's")
    parser.add_argument("--slice-format", choices=SLICE_FORMATS, default="tif",
                        help="slice file format when DST is a directory (default: tif; png for uint8/uint16)")


def paths(args) -> tuple[dict, dict]:
    return {"SRC": args.src}, {"DST": args.dst}


def run(args) -> int:
    import numpy as np

    from slab.transforms.io import load_volume, output_format, save_volume

    kind = output_format(args.dst)  # a bad DST fails before anything is read
    source = args.src[0] if len(args.src) == 1 else args.src
    volume = load_volume(source, spacing=args.spacing)
    if kind == "stack" and not np.allclose(volume.affine.numpy(), np.eye(4)):
        print(f"slab convert: note: a slice stack keeps no geometry; {', '.join(args.src)}'s affine is not written",
              file=sys.stderr)
    save_volume(volume, args.dst, slice_format=args.slice_format)
    spacing = " x ".join(f"{s:g}" for s in volume.meta["spacing"])
    print(f"wrote {args.dst}: {tuple(volume.shape)} {str(volume.dtype).removeprefix('torch.')}, spacing {spacing} mm")
    return 0
