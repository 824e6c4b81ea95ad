"""``slab phantom``: write a deterministic synthetic volume and its label."""
from __future__ import annotations

HELP = "write a synthetic phantom (image.nii.gz, label.nii.gz) with a known ground truth"


def add_arguments(parser) -> None:
    from pipeline.phantom import KINDS

    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder for image.nii.gz and label.nii.gz")
    parser.add_argument("--shape", nargs=3, type=int, required=True, metavar=("X", "Y", "Z"),
                        help="volume size in voxels")
    parser.add_argument("--seed", type=int, required=True, help="random seed; the same seed gives the same files")
    parser.add_argument("--spacing", nargs=3, type=float, default=(1.0, 1.0, 1.0), metavar=("SX", "SY", "SZ"),
                        help="voxel size in mm (default 1 1 1)")
    parser.add_argument("--kind", choices=KINDS, default="vessels",
                        help="vessels (HiP-CT-like tree), organs (3-label MRI-like), tumour (BraTS-like, 4 contrasts)")
    parser.add_argument("--sparse", action="store_true", help="vessels: leave one-voxel vessels out of the label")


def run(args) -> int:
    from pipeline.phantom import write_phantom

    image, label = write_phantom(args.out_dir, shape=args.shape, seed=args.seed, spacing=args.spacing, kind=args.kind,
                                 sparse=args.sparse)
    print(f"image: {image}")
    print(f"label: {label}")
    return 0
