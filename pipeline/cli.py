"""The ``slab`` command line: a thin dispatcher over ``pipeline.commands``.

Each sub-command lives in its own module under ``pipeline/commands/`` with three names:
``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported
only when their command runs, so ``slab --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from transforms.errors import SlabError

COMMANDS = {
    "phantom": "pipeline.commands.phantom",
    "convert": "pipeline.commands.convert",
    "dataset": "pipeline.commands.dataset",
    "train": "pipeline.commands.train",
    "predict": "pipeline.commands.predict",
    "postprocess": "pipeline.commands.postprocess",
    "evaluate": "pipeline.commands.evaluate",
    "render": "pipeline.commands.render",
    "demo": "pipeline.commands.demo",
}


def _module(name: str):
    return importlib.import_module(COMMANDS[name])


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slab", description="2.5D and 3D segmentation of 3D medical volumes.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        if command is None or name == command:
            module = _module(name)
            module.add_arguments(sub.add_parser(name, help=module.HELP, description=module.HELP))
        else:
            sub.add_parser(name, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    if command is None and argv and not argv[0].startswith("-"):
        print(f"slab: error: unknown command {argv[0]!r}; expected one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if command is None:
        # `slab`, `slab --help`: list every command with its help line.
        parser = argparse.ArgumentParser(prog="slab", description="2.5D and 3D segmentation of 3D medical volumes.")
        sub = parser.add_subparsers(dest="command", metavar="COMMAND")
        for name in COMMANDS:
            sub.add_parser(name, help=_module(name).HELP)
        parser.parse_args(argv)
        parser.print_help()
        return 0
    args = build_parser(command).parse_args(argv)
    try:
        return int(_module(command).run(args) or 0)
    except SlabError as err:
        print(f"slab: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
