"""``slab convert SRC DST``: any supported volume format to any other."""
from __future__ import annotations

import sys

from slab.pipeline.cli.arguments import positive_float
from slab.core.checks import SLICE_FORMATS
from slab.core.errors import SlabError

HELP = ("Convert a volume between NIfTI, NRRD/MHA/MHD, OME-Zarr/zarr, N5, HDF5, multi-page TIFF, DICOM (input) and 2D "
        "slice stacks (a directory of .tif/.png/.jp2); zarr, N5, HDF5 and TIFF are read and written block by block.")


def add_arguments(parser) -> None:
    parser.add_argument("src", metavar="SRC", nargs="+",
                        help="a .nii[.gz], .nrrd, .nhdr, .mha, .mhd, multi-page .tif or .h5 file (scan.h5/DATASET for "
                             "one of several datasets), a .zarr store (an OME-Zarr level: image.zarr/2), an .n5 container "
                             "(scan.n5/DATASET), a DICOM "
                             "directory or a slice directory; several files are the channels of one volume")
    parser.add_argument("dst", metavar="DST",
                        help="a .nii[.gz], .nrrd, .nhdr, .mha, .mhd, .tif (OME-TIFF) or .h5 file, a .zarr store "
                             "(OME-Zarr 0.4 with a pyramid), an .n5 container, or a directory for a slice stack")
    parser.add_argument("--spacing", nargs=3, type=positive_float, metavar=("X", "Y", "Z"),
                        help="voxel size in mm; sets a slice stack's spacing, replaces a file's")
    parser.add_argument("--slice-format", choices=SLICE_FORMATS, default="tif",
                        help="slice file format when DST is a directory (default: tif; png and jp2, lossless JPEG "
                             "2000, for 8/16-bit integers)")


def paths(args) -> tuple[dict, dict]:
    return {"SRC": args.src}, {"DST": args.dst}


def run(args) -> int:
    import numpy as np

    from slab.io.volumes import CHUNKED_OUTPUTS, load_volume, output_format, save_volume

    kind = output_format(args.dst)  # a bad DST fails before anything is read
    source = args.src[0] if len(args.src) == 1 else args.src
    # .nii.gz is read whole: a lazy gzip read would decompress the file again for every block
    streamed = kind in CHUNKED_OUTPUTS and len(args.src) == 1 and not args.src[0].lower().endswith(".gz")
    volume = None
    if streamed:  # a lazy source goes to a chunked target block by block, never whole in memory
        try:
            volume = load_volume(source, spacing=args.spacing, lazy=True)
        except SlabError:
            volume = None  # a format read whole (NRRD, DICOM, .nii.gz): its own load reports errors
    if volume is None:
        volume = load_volume(source, spacing=args.spacing)
    if kind == "stack" and not np.allclose(np.asarray(volume.affine), np.eye(4)):
        print(f"slab convert: note: a slice stack keeps no geometry; {', '.join(args.src)}'s affine is not written",
              file=sys.stderr)
    save_volume(volume, args.dst, slice_format=args.slice_format)
    spacing = " x ".join(f"{s:g}" for s in volume.meta["spacing"])
    print(f"wrote {args.dst}: {tuple(volume.shape)} {str(volume.dtype).removeprefix('torch.')}, spacing {spacing} mm")
    if hasattr(volume, "close"):
        volume.close()
    return 0
