"""Argument checks shared by the stages: each returns the checked value or raises SlabError.

Light on imports (numpy only), so that a module streaming a metric over a large volume can
use them without the I/O stack.
"""
from __future__ import annotations

import math

import numpy as np

from slab.core.errors import SlabError

MAX_JSON_BYTES = 64 << 20
# Choices shared by the engines and the command line (kept here so that `slab --help` need not
# import the engines).
PLANES = ("xy", "zx", "zy")
# probability thresholds swept on validation: fine near the usual optima, not capped at 0.9
THRESHOLD_LEVELS = (0.02,) + tuple(round(0.05 * i, 2) for i in range(1, 20)) + (0.98,)
MODES = ("2.5d", "3d")
TTA_MODES = ("none", "flips", "full")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # inference arithmetic (slab.core.device.amp_dtype)
TTA_MODES_3D = ("none", "flips")
CONNECTIVITIES = (6, 18, 26)
FILL_MODES = ("3d", "slice")
SLICE_FORMATS = ("tif", "png", "jp2")  # what slice stacks are written as (jp2: lossless JPEG 2000)
PHANTOM_KINDS = ("vessels", "organs", "tumour")
DATASET_KINDS = ("sennet", "uwmgi", "brats", "rsna-spine", "nnunet")  # slab dataset's layouts


def is_int(value) -> bool:
    """An integer, not a bool (``2.0`` is not: a config that says 2.0 where a count goes is refused)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_number(value) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)) \
        and math.isfinite(value)


def positive_int(value, name: str) -> int:
    """``value`` as an int >= 1; anything else (0, -1, 2.0, True, "2") is a SlabError naming ``name``.

    Example
    -------
    >>> positive_int(3, "stride")
    3
    """
    if not is_int(value) or value < 1:
        raise SlabError(f"{name}: expected a positive integer, got {value!r}")
    return int(value)


def probability(value, name: str) -> float:
    """``value`` as a float in [0, 1]; else a SlabError naming ``name``."""
    if not is_number(value) or not 0 <= value <= 1:
        raise SlabError(f"{name}: expected a probability in [0, 1], got {value!r}")
    return float(value)


def non_negative(value, name: str) -> float:
    """``value`` as a float >= 0; else a SlabError naming ``name``."""
    if not is_number(value) or not value >= 0:
        raise SlabError(f"{name}: expected a number >= 0, got {value!r}")
    return float(value)


def check_spacing(spacing, name: str = "spacing") -> tuple[float, float, float]:
    """``spacing`` as three positive, finite voxel sizes ``(sx, sy, sz)`` in mm.

    Anything else is a SlabError naming the argument ``name``.

    Example
    -------
    >>> check_spacing([0.5, 0.5, 2])
    (0.5, 0.5, 2.0)
    """
    try:
        values = tuple(float(s) for s in np.ravel(spacing))
    except (TypeError, ValueError):
        raise SlabError(f"{name}: expected three positive numbers (sx, sy, sz), got {spacing!r}") from None
    if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
        raise SlabError(f"{name}: expected three positive numbers (sx, sy, sz), got {values}")
    return values


def read_json_object(path, what: str) -> dict:
    """The JSON object in the file ``path``; SlabError naming the file otherwise.

    Parameters
    ----------
    path : str or Path
    what : str
        What the file is, for the messages (e.g. ``"datalist"``, ``"config"``).

    Returns
    -------
    dict
    """
    import json
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise SlabError(f"{path}: no such {what} file")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise SlabError(f"{path}: {path.stat().st_size} bytes; a {what} file is at most {MAX_JSON_BYTES >> 20} MiB")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as err:
        raise SlabError(f"{path}: not UTF-8 text (byte {err.start}); save the {what} as UTF-8") from None
    except RecursionError:
        raise SlabError(f"{path}: JSON nested too deeply to be a {what}") from None
    except ValueError as err:  # JSONDecodeError, and integers of thousands of digits
        raise SlabError(f"{path}: not valid JSON ({' '.join(str(err).split())[:120]})") from None
    except OSError as err:
        raise SlabError(f"{path}: cannot read the {what} ({err.strerror})") from None
    if not isinstance(data, dict):
        raise SlabError(f"{path}: expected a JSON object ({what})")
    return data


def cc3d_connectivity(shape, connectivity: int) -> int:
    """The connectivity to give cc3d for a volume of ``shape``: ``connectivity``, or 6 where at most
    one axis is longer than one voxel. cc3d fails on such line volumes with 26 ("cannot be mapped
    to union-find array"); along a line every connectivity gives the same components."""
    return 6 if sum(int(n) > 1 for n in shape) <= 1 else int(connectivity)
