"""``slab predict --preview``: a 3D picture of a prediction without ground truth, each label's
surface in its own colour over the image's axial section (the scene of :mod:`render`)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.patches import Patch

from slab.pipeline.evaluation.render import (
    CHUNK,
    Spatial,
    block_sums,
    floor_plane,
    draw_picture,
    split_categories,
    category_surfaces,
    check_size,
    display_factor,
    spatial_image,
)
from slab.core.checks import check_spacing
from slab.core.errors import SlabError


def label_display_map(mask, factor: int = 1) -> tuple[np.ndarray, list[int]]:
    """``(display map, voxels per label)`` of ``(L, X, Y, Z)`` 0/1 channels (numpy, torch or a
    LazyVolume, read a slab at a time): code ``i + 1`` where label ``i`` holds most of a
    ``factor³`` block's voxels (ties: the lower label), 0 where none does."""
    channels = [Spatial(mask, "prediction", c) for c in range(int(mask.shape[0]))]
    if len(channels) > 255:
        raise SlabError(f"prediction: {len(channels)} labels; a preview shows at most 255")
    f = int(factor)
    labels = np.zeros(tuple(-(-s // f) for s in channels[0].shape), np.uint8)
    counts = np.zeros(len(channels), np.int64)
    for index, first in channels[0].slabs(max(f, CHUNK // f * f)):
        sums = np.stack([block_sums(first if c == 0 else ch.mask(index), f) for c, ch in enumerate(channels)])
        counts += sums.sum(axis=(1, 2, 3), dtype=np.int64)
        labels[tuple(slice(i.start // f, -(-i.stop // f)) for i in index)] = np.where(
            sums.any(axis=0), sums.argmax(axis=0) + 1, 0)
    return labels, [int(c) for c in counts]


def render_prediction(mask, out_png, names: Sequence[str] | None = None, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                      views: int = 4, image=None, title: str | None = None, size: tuple[int, int] = (1200, 900),
                      max_voxels: int = 256**3, max_faces: int = 1_000_000) -> dict:
    """A 3D picture of a prediction without ground truth (``slab predict --preview``): each label's
    surface in its own colour (:data:`slab.io.labelmap.PALETTE`), over the image's axial
    section under it, from ``views`` angles; the legend gives each label's voxels and volume.

    ``mask`` is ``(L, X, Y, Z)`` 0/1 channels (numpy, torch or LazyVolume); ``names`` the labels'
    names. Large volumes are shown in blocks, as :func:`~slab.pipeline.evaluation.render.render_hits` does. Returns ``path``,
    ``counts`` (voxels per label), ``factor`` and ``notes``.
    """
    from slab.io.labelmap import PALETTE

    spacing = check_spacing(spacing)
    if not 1 <= int(views) <= 16:
        raise SlabError(f"views: expected 1 to 16 camera angles, got {views}")
    width, height = check_size(size)
    channels = int(mask.shape[0]) if len(mask.shape) == 4 else 1
    mask = mask if len(mask.shape) == 4 else mask[None]
    names = list(names) if names is not None else [f"label {i + 1}" for i in range(channels)]
    if len(names) != channels:
        raise SlabError(f"names: {len(names)} label names for {channels} channel(s)")
    shape = tuple(int(s) for s in mask.shape[1:])
    image = None if image is None else spatial_image(image, shape)
    factor = display_factor(shape, max_voxels)
    labels, counts = label_display_map(mask, factor)
    notes = [] if any(counts) else ["the prediction is empty: nothing to show"]
    if factor > 1:
        notes.append(f"shown at 1/{factor} resolution (blocks of {factor}³ voxels)")
    floor = None if image is None else floor_plane(image, labels, spacing, factor)
    surface = category_surfaces(labels, spacing, factor, max_faces, names)
    del labels
    parts = {} if surface is None else split_categories(surface, names)
    colour = {name: tuple(int(round(255 * v)) for v in PALETTE[i % len(PALETTE)]) for i, name in enumerate(names)}
    voxel = float(np.prod(spacing))
    handles = [Patch(color=np.array(colour[name]) / 255,
                     label=f"{name}: {count:,} voxels, {count * voxel / 1000:,.1f} mL")
               for name, count in zip(names, counts)]
    draw_picture([(part, colour[name]) for name, part in parts.items()], floor, views, width, height, out_png,
             [title, "prediction (no ground truth)"], notes, handles)
    return {"path": Path(out_png), "counts": dict(zip(names, counts)), "factor": factor, "notes": notes}


__all__ = ["label_display_map", "render_prediction"]
