"""``slab export MODEL model.zip``: a trained model (a training run, a checkpoint, or a cross-validated
plan directory) as one archive for another machine; see :mod:`slab.pipeline.planning.archive`."""
from __future__ import annotations

from pathlib import Path

HELP = "pack a trained model (run, checkpoint or cross-validated plan) into a zip for slab install"


def add_arguments(parser) -> None:
    parser.add_argument("model", metavar="MODEL", help="a run directory, a checkpoint, or a plan directory after slab cv")
    parser.add_argument("archive", metavar="ARCHIVE.zip", help="the archive to write")


def paths(args) -> tuple[dict, dict]:
    from slab.pipeline.cli.predict import model_contents

    return {"MODEL": model_contents(args.model)}, {"ARCHIVE": args.archive}


def run(args) -> int:
    from slab.pipeline.planning.archive import export_model
    from slab.transforms.errors import SlabError

    if not str(args.archive).endswith(".zip"):
        raise SlabError(f"ARCHIVE: expected a .zip name, got {args.archive}")
    data = export_model(args.model, args.archive)
    size = Path(args.archive).stat().st_size / 2**20
    print(f"wrote {args.archive}: {len(data['members'])} member(s), {size:.1f} MiB")
    return 0
