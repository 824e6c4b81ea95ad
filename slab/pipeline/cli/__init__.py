"""The ``slab`` command line: a thin dispatcher over the command modules beside it, and the one
boundary where errors become messages.

Each sub-command lives in its own module ``slab/pipeline/cli/<name>.py`` with ``HELP`` (one line),
``add_arguments(parser)``, ``run(args) -> int`` and optionally ``paths(args) -> (inputs,
outputs)``: the files it reads and writes, by argument name. Before ``run``, the dispatcher
refuses outputs that would touch an input (:func:`slab.core.outputs.check_outputs`). Modules are
imported only when their command runs, so ``slab --help`` stays fast.

The boundary: a :class:`~slab.core.errors.SlabError` (or a bad argument) is printed as one line
``slab: error: ...`` with exit status 2; Ctrl-C and SIGTERM remove what was being written and exit
with 130 / 143. Libraries' own log lines and warnings are silenced unless ``slab --verbose``;
slab's warnings (:class:`~slab.core.errors.SlabWarning`) are printed as ``slab: warning: ...``.
Anything else that escapes a command is a bug, and is shown as one.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
import warnings

from slab.core.errors import SlabError, SlabWarning

COMMANDS = {name: f"slab.pipeline.cli.{name}" for name in
            ("phantom", "convert", "dataset", "plan", "train", "cv", "predict", "postprocess", "evaluate", "errors",
             "render", "view", "export", "install", "demo")}
DESCRIPTION = "2.5D and 3D segmentation of 3D medical volumes."
# Loggers of libraries that print INFO/WARNING lines for conditions slab reports itself.
QUIET_LOGGERS = ("monai", "tifffile", "imagecodecs", "nibabel", "pyvista", "matplotlib", "PIL", "ignite")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``slab: error: argument -o: ... (see slab predict --help)``."""

    def error(self, message: str):
        self.exit(2, f"slab: error: {message} (see {self.prog} --help)\n")


def _module(name: str):
    return importlib.import_module(COMMANDS[name])


def command_help(name: str) -> str:
    """A command's ``HELP`` line, read from its module's source without importing it (so that
    ``slab --help`` imports no engine); the module itself where the source is not at hand."""
    import ast

    spec = importlib.util.find_spec(COMMANDS[name])
    try:
        tree = ast.parse(open(spec.origin, encoding="utf-8").read())
        for node in tree.body:
            if (isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "HELP" for t in node.targets)
                    and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
                return node.value.value
    except (OSError, TypeError, SyntaxError):
        pass
    return _module(name).HELP


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = Parser(prog="slab", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true", help="show libraries' log lines and warnings")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name in COMMANDS:
        if command is None or name == command:
            module = _module(name)
            module.add_arguments(sub.add_parser(name, help=module.HELP, description=module.HELP))
        else:
            sub.add_parser(name, add_help=False)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None):  # noqa: ARG001
    print(f"slab: warning: {message}", file=sys.stderr)


def quiet_libraries(verbose: bool = False) -> None:
    """Silence other libraries' log lines and warnings (slab's own warnings still show)."""
    warnings.showwarning = _show_warning
    if verbose:
        import slab.io.common

        slab.io.common.SHOW_NATIVE_MESSAGES = True
        return
    warnings.simplefilter("ignore")
    warnings.simplefilter("default", SlabWarning)  # each distinct warning once per place
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # tensorboard's TensorFlow stub, if present


def _left() -> str:
    """What an interrupted command left: nothing half-written, and the work of a resumable run."""
    store = sys.modules.get("slab.pipeline.inference.store")
    return "nothing half-written was left" + (store.kept_message() if store is not None else "")


def main(argv: list[str] | None = None) -> int:
    from slab.core.outputs import Terminated, check_outputs, handle_signals

    argv = sys.argv[1:] if argv is None else list(argv)
    verbose = bool(argv) and argv[0] in ("-v", "--verbose")
    rest = argv[1:] if verbose else argv
    command = rest[0] if rest and rest[0] in COMMANDS else None
    if command is None and rest and not rest[0].startswith("-"):
        print(f"slab: error: unknown command {rest[0]!r}; expected one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if command is None:
        # `slab`, `slab --help`: list every command with its help line.
        parser = Parser(prog="slab", description=DESCRIPTION)
        parser.add_argument("-v", "--verbose", action="store_true", help="show libraries' log lines and warnings")
        sub = parser.add_subparsers(dest="command", metavar="COMMAND")
        for name in COMMANDS:
            sub.add_parser(name, help=command_help(name))
        parser.parse_args(argv)
        parser.print_help()
        return 0
    quiet_libraries(verbose)
    handle_signals()
    try:
        args = build_parser(command).parse_args(argv)
    except SystemExit as stop:  # --help, or a bad argument (already printed in one line)
        return int(stop.code or 0)
    try:
        module = _module(command)
        if hasattr(module, "paths"):
            check_outputs(*module.paths(args))
        if hasattr(args, "threads"):  # the commands that run networks
            from slab.core.device import configure_allocator, configure_threads

            configure_threads(args.threads)
            if getattr(args, "memory_budget", None) is None:  # a budget: freed memory goes back to the system
                configure_allocator()
        return int(module.run(args) or 0)
    except SlabError as err:
        print(f"slab: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"slab {command}: error: out of memory; give a smaller input or --memory-budget where the command "
              "has one", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"slab {command}: interrupted; {_left()}", file=sys.stderr)
        return 130
    except Terminated as stop:
        print(f"slab {command}: terminated by signal {stop.signum}; {_left()}", file=sys.stderr)
        return 128 + stop.signum
    except BrokenPipeError:  # `slab evaluate ... | head`
        return 0

