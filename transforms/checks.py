"""Argument checks shared by the stages: each returns the checked value or raises SlabError.

Light on imports (numpy only), so that a module streaming a metric over a large volume can
use them without the I/O stack.
"""
from __future__ import annotations

import math

import numpy as np

from transforms.errors import SlabError


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
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SlabError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise SlabError(f"{path}: expected a JSON object ({what})")
    return data
