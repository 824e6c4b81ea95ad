"""Centreline Dice (clDice; Shit et al., CVPR 2021) of binary masks, from 3D skeletons
(``skimage.morphology.skeletonize``).

``Tprec = |S(P) & T| / |S(P)|`` (the predicted centreline inside the truth) and
``Tsens = |S(T) & P| / |S(T)|`` (the true centreline covered by the prediction);
``clDice = 2 Tprec Tsens / (Tprec + Tsens)``. Undefined ratios (an empty skeleton) are NaN;
both masks empty give NaN, one empty gives 0.
"""
from __future__ import annotations

import numpy as np

from slab.core.errors import SlabError


def skeleton(mask) -> np.ndarray:
    """The 3D (or 2D) skeleton of a binary mask, as bool."""
    from skimage.morphology import skeletonize

    mask = np.asarray(mask).astype(bool)
    if not mask.any():
        return mask.copy()
    return skeletonize(mask).astype(bool)


def cldice(pred, truth) -> dict:
    """``{"cldice", "topology_precision", "topology_sensitivity"}`` of two binary masks
    ``(X, Y, Z)`` (or ``(1, X, Y, Z)``).

    Example
    -------
    >>> t = np.zeros((9, 9, 20), bool); t[3:6, 3:6, 2:18] = True
    >>> cldice(t, t)["cldice"]
    1.0
    """
    p, t = np.asarray(pred).astype(bool), np.asarray(truth).astype(bool)
    if p.shape != t.shape:
        raise SlabError(f"pred: shape {p.shape} does not match truth {t.shape}")
    if p.ndim == 4 and p.shape[0] == 1:
        p, t = p[0], t[0]
    if not p.any() and not t.any():
        nan = float("nan")
        return {"cldice": nan, "topology_precision": nan, "topology_sensitivity": nan}
    sp, st = skeleton(p), skeleton(t)
    prec = float((sp & t).sum() / sp.sum()) if sp.any() else 0.0
    sens = float((st & p).sum() / st.sum()) if st.any() else 0.0
    score = 2 * prec * sens / (prec + sens) if prec + sens > 0 else 0.0
    return {"cldice": float(score), "topology_precision": prec, "topology_sensitivity": sens}
