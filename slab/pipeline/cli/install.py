"""``slab install model.zip [--name NAME]``: unpack a model written by ``slab export`` into the
models folder (``$SLAB_HOME/models``, default ``~/.cache/slab/models``), checked first, so that
``slab predict --model NAME`` finds it."""
from __future__ import annotations

HELP = "install a model archive (slab export) so that slab predict --model NAME finds it"


def add_arguments(parser) -> None:
    parser.add_argument("archive", metavar="ARCHIVE.zip", help="an archive written by slab export")
    parser.add_argument("--name", metavar="NAME", help="the model's name (default: the archive's name)")
    parser.add_argument("--force", action="store_true", help="replace an installed model of that name")


def paths(args) -> tuple[dict, dict]:
    return {"ARCHIVE": args.archive}, {}


def run(args) -> int:
    from slab.pipeline.model.archive import install_model

    target = install_model(args.archive, args.name, force=args.force)
    print(f"installed {target}; predict with: slab predict --model {target.name} -i INPUT -o OUTPUT")
    return 0
