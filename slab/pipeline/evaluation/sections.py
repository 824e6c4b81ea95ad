"""Axial, coronal and sagittal cross sections in the radiological convention, as a DICOM viewer,
3D Slicer or ITK-SNAP shows them, with the outlines of prediction and truth.

The voxel axes are matched to the patient's axes from the affine (nibabel's ``aff2axcodes``:
the direction, in RAS, each voxel index increases towards). Each panel is laid out so that:

- axial: the patient's right on the left of the picture, anterior at the top (seen from the feet);
- coronal: the patient's right on the left, superior at the top (seen from the front);
- sagittal: anterior on the left, superior at the top (seen from the patient's left);

and its four edges are labelled (R/L, A/P, S/I). For a standard axial DICOM series the axial
panel is the stored slice image itself, row 0 at the top. An oblique volume is laid out by the
patient axis nearest each voxel axis.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from slab.pipeline.evaluation.render import CHUNK, OUTLINES, Spatial, check_size, spatial_image, spatial_pair
from slab.core.checks import check_spacing
from slab.core.errors import SlabError
from slab.core.outputs import atomic_write

# view: (normal, horizontal axis pointing to the picture's right, vertical axis pointing up)
VIEWS = {"axial": ("S", "L", "A"), "coronal": ("A", "L", "S"), "sagittal": ("L", "P", "S")}
_OPPOSITE = {"R": "L", "L": "R", "A": "P", "P": "A", "S": "I", "I": "S"}


def _axis_of(codes: Sequence[str], letter: str) -> int:
    """The voxel axis along the patient axis of ``letter`` (either direction)."""
    return next(a for a, code in enumerate(codes) if code in (letter, _OPPOSITE[letter]))


def orientation(affine) -> tuple[str, str, str]:
    """The patient direction each voxel axis increases towards (``("R", "A", "S")`` for an
    identity affine); voxel order ``RAS`` where the affine does not name three distinct axes."""
    import nibabel as nib

    codes = tuple(nib.aff2axcodes(np.asarray(affine, dtype=np.float64)))
    if None in codes or len({_OPPOSITE[c] if c in "LPI" else c for c in codes}) < 3:
        return ("R", "A", "S")
    return codes


def section(volume, codes: Sequence[str], view: str, index: Sequence[int]) -> np.ndarray:
    """The ``view`` section of a ``(X, Y, Z)`` volume through voxel ``index``, laid out for
    display (rows x columns, row 0 at the top); ``codes`` is :func:`orientation`'s."""
    normal, right, up = VIEWS[view]
    a_normal, a_right, a_up = (_axis_of(codes, letter) for letter in (normal, right, up))
    take = [slice(None)] * 3
    take[a_normal] = int(index[a_normal])
    plane = np.asarray(volume[tuple(take)])  # the two remaining axes, in voxel order
    rest = [a for a in range(3) if a != a_normal]
    plane = plane if rest == [a_up, a_right] else plane.T  # rows along the up axis
    if codes[a_up] == up:  # the index grows upwards: the largest index is the top row
        plane = plane[::-1]
    if codes[a_right] != right:  # the index grows to the left
        plane = plane[:, ::-1]
    return np.ascontiguousarray(plane)


def _centre(mask: Spatial) -> tuple[int, int, int] | None:
    """Voxel nearest the centre of mass of a mask, read in slabs; None when empty."""
    total, sums = 0, np.zeros(3)
    for index, block in mask.slabs(CHUNK):
        idx = np.nonzero(block)
        if idx[0].size:
            total += idx[0].size
            sums += [i.sum() + s.start * i.size for i, s in zip(idx, index)]
    return None if total == 0 else tuple(int(round(s / total)) for s in sums)


def cross_sections(
    image,
    pred,
    truth,
    out_png,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    index: Sequence[int] | None = None,
    title: str | None = None,
    size: tuple[int, int] = (1200, 450),
    channel: int | None = None,
    affine=None,
) -> dict:
    """Axial, coronal and sagittal sections of the image with prediction and truth outlines,
    in the radiological convention (see the module docs), edges labelled.

    Parameters
    ----------
    image : array-like ``(X, Y, Z)`` or ``(C, X, Y, Z)``, or None
        Shown in grey (its first channel); None shows the outlines on black.
    pred, truth : array-like
        Masks as for :func:`slab.pipeline.evaluation.render.render_hits`.
    out_png : path
        The PNG written (atomically), ``size`` pixels.
    spacing : (sx, sy, sz)
        Voxel size; sets each panel's aspect ratio (axes in mm).
    index : (x, y, z), optional
        The voxel the three sections pass through; default the truth's centre of mass (the
        prediction's when the truth is empty, else the volume centre).
    affine : (4, 4), optional
        Voxel to world (RAS): which voxel axis is which patient axis. Default: voxel order is
        right, anterior, superior.

    Returns
    -------
    dict
        ``path``, ``index`` and ``orientation`` (the direction each voxel axis points to).
    """
    spacing = check_spacing(spacing)
    width, height = check_size(size)
    p, t = spatial_pair(pred, truth, channel)
    image = None if image is None else spatial_image(image, p.shape)
    if index is None:
        index = _centre(t) or _centre(p) or tuple(s // 2 for s in p.shape)
    index = tuple(int(i) for i in index)
    if len(index) != 3 or not all(0 <= i < s for i, s in zip(index, p.shape)):
        raise SlabError(f"index: expected a voxel (x, y, z) inside shape {p.shape}, got {index}")
    codes = orientation(np.diag([*spacing, 1.0]) if affine is None else affine)
    fig = Figure(figsize=(width / 100, height / 100), dpi=100, facecolor="black")
    for ax, view in zip(fig.subplots(1, 3), VIEWS):
        normal, right, up = VIEWS[view]
        normal_axis, rows, cols = (_axis_of(codes, letter) for letter in (normal, up, right))
        extent = (0, p.shape[cols] * spacing[cols], 0, p.shape[rows] * spacing[rows])
        if image is not None:
            grey = section(image, codes, view, index).astype(np.float32)
            lo, hi = np.percentile(grey, (1, 99))
            ax.imshow(grey, cmap="gray", origin="upper", extent=extent, vmin=lo, vmax=max(hi, lo + 1e-6),
                      interpolation="nearest")
        else:
            ax.imshow(np.zeros((2, 2)), cmap="gray", origin="upper", extent=extent, vmin=0, vmax=1)
        for mask, colour in ((t, OUTLINES["truth"]), (p, OUTLINES["prediction"])):
            values = section(_Mask(mask), codes, view, index).astype(np.float32)
            if values.any() and min(values.shape) > 1:
                ax.contour(values, levels=[0.5], colors=[colour], linewidths=1.2, origin="upper", extent=extent)
        for (x, y, ha, va), letter in zip(((0.02, 0.5, "left", "center"), (0.98, 0.5, "right", "center"),
                                           (0.5, 0.98, "center", "top"), (0.5, 0.02, "center", "bottom")),
                                          (_OPPOSITE[right], right, up, _OPPOSITE[up])):
            ax.text(x, y, letter, transform=ax.transAxes, ha=ha, va=va, color="yellow", fontsize=11,
                    fontweight="bold")
        ax.set_aspect("equal")
        ax.set_title(f"{view} {'xyz'[normal_axis]}={index[normal_axis]}", color="white", fontsize=10)
        ax.set_axis_off()
    handles = [Line2D([], [], color=c, label=name) for name, c in OUTLINES.items()]
    fig.legend(handles=handles, loc="upper right", fontsize=9, frameon=False, labelcolor="white")
    if title:
        fig.suptitle(title, color="white", fontsize=11, x=0.01, ha="left")
    with atomic_write(out_png) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    return {"path": Path(out_png), "index": index, "orientation": "".join(codes)}


class _Mask:
    """Indexing a :class:`slab.pipeline.evaluation.render.Spatial` as its foreground mask (for :func:`section`)."""

    def __init__(self, spatial):
        self.spatial = spatial

    def __getitem__(self, index):
        return self.spatial.mask(index)


__all__ = ["VIEWS", "orientation", "section", "cross_sections"]
