"""``slab phantom``: write a deterministic synthetic volume and its label."""
from __future__ import annotations

from slab.pipeline.cli.arguments import non_negative_int, positive_float, positive_int

HELP = "write a synthetic phantom (image.nii.gz, label.nii.gz) with a known ground truth"


def add_arguments(parser) -> None:
    from slab.core.checks import PHANTOM_KINDS as KINDS

    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder for image.nii.gz and label.nii.gz")
    parser.add_argument("--shape", nargs=3, type=positive_int, required=True, metavar=("X", "Y", "Z"),
                        help="volume size in voxels")
    parser.add_argument("--seed", type=non_negative_int, required=True, help="random seed; the same seed gives the same files")
    parser.add_argument("--spacing", nargs=3, type=positive_float, default=(1.0, 1.0, 1.0), metavar=("SX", "SY", "SZ"),
                        help="voxel size in mm (default 1 1 1)")
    parser.add_argument("--kind", choices=KINDS, default="vessels",
                        help="vessels (HiP-CT-like tree), organs (3-label MRI-like), tumour (BraTS-like, 4 contrasts)")
    parser.add_argument("--sparse", action="store_true", help="vessels: leave one-voxel vessels out of the label")


def paths(args) -> tuple[dict, dict]:
    from pathlib import Path

    return {}, {"OUT_DIR": [Path(args.out_dir) / "image.nii.gz", Path(args.out_dir) / "label.nii.gz"]}


def run(args) -> int:
    from slab.pipeline.data.phantom import write_phantom

    image, label = write_phantom(args.out_dir, shape=args.shape, seed=args.seed, spacing=args.spacing, kind=args.kind,
                                 sparse=args.sparse)
    print(f"image: {image}")
    print(f"label: {label}")
    return 0
