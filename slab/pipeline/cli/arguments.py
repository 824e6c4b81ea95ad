"""The argument types the ``slab`` sub-commands share (:mod:`slab.pipeline.cli`). A type raises
``argparse.ArgumentTypeError``, which the parser prints as one line naming the argument."""
from __future__ import annotations

import argparse
import math


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def probability(text: str) -> float:
    """A probability threshold in [0, 1]."""
    value = finite_float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {text!r}")
    return value


def _int_at_least(text: str, low: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0, "an integer >= 0")


def png_path(text: str) -> str:
    """A picture's output path: slab draws PNGs, so the name ends in ``.png`` (a ``.jpg`` given
    PNG bytes opens as a broken JPEG)."""
    if not text.lower().endswith(".png"):
        raise argparse.ArgumentTypeError(f"expected a .png file name (slab writes PNG pictures), got {text!r}")
    return text


def html_path(text: str) -> str:
    """A page's output path: the name ends in ``.html`` (or ``.htm``), so that a browser opens it."""
    if not text.lower().endswith((".html", ".htm")):
        raise argparse.ArgumentTypeError(f"expected a .html file name, got {text!r}")
    return text


def check_view(view, image) -> None:
    """``--view`` draws the page over the image the masks belong to: it needs ``--image``."""
    if view and not image:
        from slab.core.errors import SlabError

        raise SlabError("--view: needs --image IMAGE (the volume the page shows under the masks)")


def fold_list(text: str) -> list[int]:
    """``0,2``: distinct fold numbers >= 0."""
    try:
        folds = [int(part) for part in text.split(",")]
    except ValueError:
        folds = [-1]
    if not folds or min(folds) < 0 or len(set(folds)) != len(folds):
        raise argparse.ArgumentTypeError(f"expected distinct fold numbers >= 0 separated by commas, got {text!r}")
    return folds


def add_threads(parser) -> None:
    """``--threads N`` (applied by the CLI before the command runs; see
    :func:`slab.core.device.configure_threads`)."""
    parser.add_argument("--threads", type=positive_int, metavar="N",
                        help="CPU threads for torch (default: the cores this process may use that are not busy)")


def add_progress(parser) -> None:
    """``--progress`` / ``--quiet``: a progress bar is shown by default when stderr is a terminal."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--progress", action="store_true",
                       help="show a progress bar even when stderr is not a terminal (default: on a terminal)")
    group.add_argument("--quiet", action="store_true", help="no progress bar")


def show_progress(args, stream=None) -> bool:
    """Whether to draw progress bars: not with ``--quiet``; with ``--progress``; else when
    ``stream`` (default stderr) is a terminal, as nnU-Net and pip do."""
    import sys

    if args.quiet:
        return False
    stream = sys.stderr if stream is None else stream
    return bool(args.progress or (hasattr(stream, "isatty") and stream.isatty()))
