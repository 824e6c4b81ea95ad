"""Topology of binary masks: Betti numbers, their errors, fragmentation, and recall by vessel radius.

Connectivity pairing: foreground 26-connected, background 6-connected (the pairing under which
the Euler characteristic of a 3D digital image is well defined and ``skimage.measure.euler_number``
with ``connectivity=3`` counts). With the volume padded by one background voxel:

- ``b0``: foreground components (26-connectivity, ``cc3d``);
- ``b2``: cavities, the background components (6-connectivity) other than the outside;
- ``b1``: tunnels / loops, from the Euler characteristic ``chi = b0 - b1 + b2``.

A torus has ``b0 = 1, b1 = 1, b2 = 0``; a hollow sphere ``1, 0, 1``; a tube cut in two ``2, 0, 0``.

Radius bins: the local radius of the truth on its skeleton is the distance from each skeleton
voxel's centre to the nearest background voxel's centre (voxels); each skeleton voxel falls in a
bin (``RADIUS_BINS``: 1, 2, 3-4, 5-8, >8 voxels) and the bin's *recall* is the share of its skeleton
voxels the prediction covers (clDice's topology sensitivity, per size). *Precision* per bin does
the same with the prediction's skeleton and radii against the truth. A model that misses small
vessels shows it at once in the first bins.
"""
from __future__ import annotations

import numpy as np

from slab.core.checks import cc3d_connectivity
from slab.core.errors import SlabError


RADIUS_BINS = (("1", 0.0, 1.5), ("2", 1.5, 2.5), ("3-4", 2.5, 4.5), ("5-8", 4.5, 8.5), (">8", 8.5, np.inf))


def _mask(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 3:
        raise SlabError(f"{name}: expected one (X, Y, Z) mask, got shape {a.shape}")
    return a.astype(bool)


def betti_numbers(mask) -> dict:
    """``{"b0", "b1", "b2", "euler"}`` of a binary mask (see the module docstring)."""
    import cc3d
    from skimage.measure import euler_number

    m = np.pad(_mask(mask, "mask"), 1)
    if not m.any():
        return {"b0": 0, "b1": 0, "b2": 0, "euler": 0}
    _, b0 = cc3d.connected_components(m.astype(np.uint8), connectivity=26, return_N=True)
    _, background = cc3d.connected_components((~m).astype(np.uint8), connectivity=6, return_N=True)
    b2 = int(background) - 1
    chi = int(euler_number(m, connectivity=3))
    return {"b0": int(b0), "b1": int(b0) + b2 - chi, "b2": b2, "euler": chi}


def topology_metrics(pred, truth) -> dict:
    """Betti numbers of both, their absolute errors, the share of the prediction in its largest
    component, and how many predicted components each true component is broken into."""
    import cc3d

    p, t = _mask(pred, "pred"), _mask(truth, "truth")
    if p.shape != t.shape:
        raise SlabError(f"pred: shape {p.shape} does not match truth {t.shape}")
    bp, bt = betti_numbers(p), betti_numbers(t)
    out = {"pred": bp, "truth": bt, **{f"{k}_error": abs(bp[k] - bt[k]) for k in ("b0", "b1", "b2")}}
    labels_p = cc3d.connected_components(p.astype(np.uint8), connectivity=cc3d_connectivity(p.shape, 26))
    sizes = np.bincount(labels_p.reshape(-1))[1:]
    out["largest_component_fraction"] = float(sizes.max() / sizes.sum()) if sizes.size and sizes.sum() else float("nan")
    labels_t, n_true = cc3d.connected_components(t.astype(np.uint8), connectivity=cc3d_connectivity(t.shape, 26),
                                               return_N=True)
    fragments = []
    for k in range(1, int(n_true) + 1):
        covering = np.unique(labels_p[(labels_t == k) & p])
        fragments.append(int(covering.size))
    out["fragments_per_true_component"] = {
        "mean": float(np.mean(fragments)) if fragments else float("nan"),
        "max": int(max(fragments)) if fragments else 0,
        "missed": int(sum(f == 0 for f in fragments)), "components": int(n_true)}
    return out


def _skeleton_radii(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Skeleton voxel indices and their radius (voxels) of a mask."""
    from scipy import ndimage

    from slab.pipeline.evaluation.skeleton import skeleton

    if not mask.any():
        return np.zeros((0, 3), np.intp), np.zeros(0)
    padded = np.pad(mask, 1)
    centre = skeleton(padded)
    edt = ndimage.distance_transform_edt(padded)
    if not centre.any():
        centre = edt == edt.max()
    index = np.argwhere(centre) - 1
    return index, edt[centre]


def radius_bins(pred, truth) -> list[dict]:
    """Recall and precision of the centrelines per radius bin (``RADIUS_BINS``):
    ``[{"bin", "truth_voxels", "recall", "pred_voxels", "precision"}, ...]`` (NaN where a bin is empty)."""
    p, t = _mask(pred, "pred"), _mask(truth, "truth")
    if p.shape != t.shape:
        raise SlabError(f"pred: shape {p.shape} does not match truth {t.shape}")
    ti, tr = _skeleton_radii(t)
    pi, pr = _skeleton_radii(p)
    covered = p[tuple(ti.T)] if ti.size else np.zeros(0, bool)
    inside = t[tuple(pi.T)] if pi.size else np.zeros(0, bool)
    out = []
    for name, low, high in RADIUS_BINS:
        tb = (tr >= low) & (tr < high)
        pb = (pr >= low) & (pr < high)
        out.append({"bin": name, "truth_voxels": int(tb.sum()),
                    "recall": float(covered[tb].mean()) if tb.any() else float("nan"),
                    "pred_voxels": int(pb.sum()),
                    "precision": float(inside[pb].mean()) if pb.any() else float("nan")})
    return out
