"""A picture of a few 2.5D slabs: what the network actually sees.

Each row is one slab (slices spread evenly along the plane's normal), each column one of its
channels (channel ``c*k + j`` is image channel ``c`` at offset ``o_j``), with an optional last
column showing the label of the slab's centre slice over it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from slab.core.errors import SlabError
from slab.transforms.slabs import PLANE_AXIS, check_offsets, extract_slab, plane_axis


def preview_slabs(volume, out_png, plane: str = "xy", offsets=(-1, 0, 1), n: int = 4, label=None,
                  title: str | None = None) -> Path:
    """Write a PNG of ``n`` slabs of ``volume`` (rows) with their channels side by side.

    Parameters
    ----------
    volume : ``(C, X, Y, Z)`` numpy array, torch tensor or LazyVolume
    out_png : path of the PNG; written atomically
    plane : ``"xy"``, ``"zx"`` or ``"zy"``
    offsets : slab offsets
    n : number of slabs, at evenly spaced slices (at most the number of slices)
    label : ``(L, X, Y, Z)``, optional; adds a column: channel 0 at the slab's slice, label outlined in red
    title : figure title (default: plane and offsets)

    Returns
    -------
    Path of the PNG written.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from slab.core.outputs import atomic_write

    axis = plane_axis(plane)
    offsets = check_offsets(offsets)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise SlabError(f"n: expected a positive integer, got {n!r}")
    if len(volume.shape) != 4:
        raise SlabError(f"volume: expected shape (C, X, Y, Z), got {tuple(volume.shape)}")
    size = int(volume.shape[axis + 1])
    if label is not None and tuple(label.shape[1:]) != tuple(volume.shape[1:]):
        raise SlabError(f"label: spatial shape {tuple(label.shape[1:])} does not match the volume's "
                        f"{tuple(volume.shape[1:])}")
    rows = min(int(n), size)
    indices = np.unique(np.linspace(0, size - 1, rows + 2)[1:-1].round().astype(int)) if size > 2 else np.arange(size)
    k = len(offsets)
    channels = int(volume.shape[0]) * k
    columns = channels + (label is not None)
    fig, axes = plt.subplots(len(indices), columns, figsize=(2.2 * columns, 2.2 * len(indices)), squeeze=False)
    for row, index in enumerate(indices):
        slab = np.asarray(extract_slab(volume, plane, int(index), offsets), dtype=np.float32)
        low, high = np.percentile(slab, [0.5, 99.5]) if slab.size else (0.0, 1.0)
        for col in range(channels):
            ax = axes[row, col]
            # rows of the picture are the plane's second axis, as a slice image img[row, col] = vol.T
            ax.imshow(slab[col].T, cmap="gray", vmin=low, vmax=high if high > low else low + 1, origin="upper")
            if row == 0:
                ax.set_title(f"ch {col // k}, {offsets[col % k]:+d}", fontsize=8)
            if col == 0:
                ax.set_ylabel(f"slice {int(index)}", fontsize=8)
        if label is not None:
            ax = axes[row, channels]
            centre = slab[offsets.index(0) if 0 in offsets else 0]  # image channel 0 at the slab's own slice
            ax.imshow(centre.T, cmap="gray", vmin=low, vmax=high if high > low else low + 1)
            mask = np.any(np.asarray(extract_slab(label, plane, int(index), (0,))) > 0, axis=0)
            if mask.any():
                ax.contour(mask.T.astype(float), levels=[0.5], colors="red", linewidths=0.8)
            if row == 0:
                ax.set_title("label", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title or f"plane {plane} (slabs along axis {'xyz'[PLANE_AXIS[plane]]}), offsets {list(offsets)}",
                 fontsize=9)
    fig.tight_layout()
    out = Path(out_png)
    try:
        with atomic_write(out) as tmp:
            fig.savefig(tmp, format="png", dpi=80)
    finally:
        plt.close(fig)
    return out


__all__ = ["preview_slabs"]
