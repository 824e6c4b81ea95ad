"""Show where a segmentation hits and misses: 3D pictures, cross sections and mesh files.

Every voxel of ``pred ∪ truth`` is a *hit* (true positive, yellow), a *false positive* (green)
or a *miss* (false negative, red). :func:`render_hits` draws the surfaces of the three
categories in one off-screen pyvista scene from several angles, with the scores in the title;
:func:`export_mesh` writes the same surfaces to a mesh file for interactive viewing;
:func:`slab.pipeline.evaluation.sections.cross_sections` shows three orthogonal sections of the image with the
outlines of prediction and truth.

Large volumes are reduced for display only: blocks of ``f³`` voxels become one display voxel
that is foreground when any voxel in the block is (so one-voxel vessels survive), labelled
with the category most of the block's voxels have. Volumes are read a slab at a time, so
a lazily loaded volume is never held in memory whole. Scores are always computed on the full
resolution volumes.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pyvista as pv
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from slab.pipeline.evaluation.metrics import evaluate
from slab.core.checks import check_spacing
from slab.core.errors import SlabError
from slab.core.outputs import atomic_write
from slab.io.volumes import LazyVolume

pv.OFF_SCREEN = True
logger = logging.getLogger(__name__)

CATEGORIES = ("hit", "false_positive", "miss")  # category codes 1, 2, 3 in label maps and meshes
COLOURS = {"hit": (255, 215, 0), "false_positive": (30, 170, 30), "miss": (220, 20, 20)}
LEGEND = {"hit": "hit (true positive)", "false_positive": "false positive", "miss": "miss (false negative)"}
OUTLINES = {"truth": "cyan", "prediction": "magenta"}
MESH_SUFFIXES = (".vtk", ".ply", ".glb")
CHUNK = 64  # planes read at a time along the axis slowest in memory (rounded to the block size)
_HEADER = 0.14  # fraction of a 3D picture's height for title, scores and legend


class Spatial:
    """One channel of a volume as an ``(X, Y, Z)`` array, read in slabs along ``axis``: the
    axis slowest in memory (a lazy volume's z, one slice file or NIfTI plane after another)."""

    def __init__(self, volume, name: str, channel: int | None):
        if isinstance(volume, torch.Tensor):
            volume = volume.detach().cpu().numpy()
        elif not isinstance(volume, LazyVolume):
            volume = np.asarray(volume)
        if volume.ndim == 3:
            volume = volume[None]
        if volume.ndim != 4:
            raise SlabError(f"{name}: expected a 3D volume (X, Y, Z) or (C, X, Y, Z), got shape {tuple(volume.shape)}")
        if channel is None:
            if volume.shape[0] != 1:
                raise SlabError(f"{name}: {volume.shape[0]} channels; choose one label channel")
            channel = 0
        if not 0 <= channel < volume.shape[0]:
            raise SlabError(f"{name}: channel {channel} out of range for {volume.shape[0]} channels")
        self.volume, self.channel, self.name = volume, channel, name
        self.shape = tuple(int(s) for s in volume.shape[1:])
        self.axis = 2 if isinstance(volume, LazyVolume) else int(np.argmax(volume.strides[1:]))

    def __getitem__(self, index) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        return np.asarray(self.volume[(self.channel, *index)])

    def slabs(self, step: int):
        """``(index, mask)`` for consecutive slabs of ``step`` planes along ``axis``."""
        for start in range(0, self.shape[self.axis], step):
            index = [slice(0, size) for size in self.shape]
            index[self.axis] = slice(start, min(start + step, self.shape[self.axis]))
            yield tuple(index), self.mask(tuple(index))

    def mask(self, index) -> np.ndarray:
        """Foreground at ``index``: nonzero voxels; for probabilities, above 0.5."""
        block = self[index]
        return block > 0.5 if block.dtype.kind == "f" else block != 0


def spatial_pair(pred, truth, channel: int | None) -> tuple[Spatial, Spatial]:
    p, t = Spatial(pred, "prediction", channel), Spatial(truth, "truth", channel)
    if p.shape != t.shape:
        raise SlabError(f"prediction: spatial shape {p.shape} does not match truth {t.shape}")
    return p, t


def spatial_image(image, shape: tuple[int, ...]) -> Spatial:
    """The first channel of an image that must match the masks' shape."""
    image = Spatial(image, "image", 0)
    if image.shape != shape:
        raise SlabError(f"image: spatial shape {image.shape} does not match the masks {shape}")
    return image


def check_size(size) -> tuple[int, int]:
    width, height = (int(s) for s in size)
    if width < 100 or height < 100:
        raise SlabError(f"size: expected a picture of at least 100 x 100 pixels, got {width} x {height}")
    return width, height


def display_factor(shape: Sequence[int], max_voxels: int) -> int:
    """The smallest block size ``f`` that brings ``shape`` to at most ``max_voxels`` display voxels."""
    f = 1
    while math.prod(-(-s // f) for s in shape) > max_voxels:
        f += 1
    return f


def block_sums(mask: np.ndarray, f: int) -> np.ndarray:
    """Foreground voxels in each ``f³`` block (edges zero-padded), as uint16."""
    if any(s % f for s in mask.shape):
        mask = np.pad(mask, [(0, -s % f) for s in mask.shape])
    total = mask.astype(np.uint16)
    for axis in range(3):
        parts = [total[(slice(None),) * axis + (slice(k, None, f),)] for k in range(f)]
        total = parts[0].copy(order="K")
        for part in parts[1:]:
            total += part
    return total


def category_map(pred, truth, factor: int = 1, channel: int | None = None) -> tuple[np.ndarray, dict[str, int]]:
    """Label map of hits (1), false positives (2) and misses (3), and full-resolution voxel counts.

    With ``factor > 1`` each ``factor³`` block is one voxel of the map: foreground when any of
    its voxels is, labelled with the category most of them have (ties: hit, false positive,
    miss).
    """
    p, t = spatial_pair(pred, truth, channel)
    f = int(factor)
    if f < 1:
        raise SlabError(f"factor: expected a positive integer, got {factor}")
    labels = np.zeros(tuple(-(-s // f) for s in p.shape), np.uint8)
    counts = np.zeros(3, np.int64)
    for index, pm in p.slabs(max(f, CHUNK // f * f)):
        tm = t.mask(index)
        hit, predicted, true = (block_sums(m, f) for m in (pm & tm, pm, tm))
        blocks = np.stack([hit, predicted - hit, true - hit])
        counts += blocks.sum(axis=(1, 2, 3), dtype=np.int64)
        labels[tuple(slice(i.start // f, -(-i.stop // f)) for i in index)] = np.where(
            predicted | true, blocks.argmax(axis=0) + 1, 0
        )
    return labels, dict(zip(CATEGORIES, map(int, counts)))


def _notes(counts: dict[str, int], factor: int) -> list[str]:
    notes = []
    predicted, true = counts["hit"] + counts["false_positive"], counts["hit"] + counts["miss"]
    if not predicted and not true:
        notes.append("prediction and truth are both empty: nothing to show")
    elif not predicted:
        notes.append("prediction is empty: all of the truth is missed")
    elif not true:
        notes.append("truth is empty: all of the prediction is false positive")
    elif not counts["hit"]:
        notes.append("no hits: prediction and truth do not overlap")
    if factor > 1:
        notes.append(f"shown at 1/{factor} resolution (blocks of {factor}³ voxels); scores at full resolution")
    return notes


def category_surfaces(labels: np.ndarray, spacing, factor: int, max_faces: int,
              names: Sequence[str] = CATEGORIES) -> pv.PolyData | None:
    """Smoothed surfaces of a category map (code ``i + 1`` is ``names[i]``) with a cell array
    ``category``; None when empty."""
    if not labels.any():
        return None
    step = tuple(factor * s for s in spacing)
    # Display voxel j covers voxels [j f, (j + 1) f): its centre sits at ((f - 1) / 2 + j f) * spacing.
    # One empty display voxel around the map closes every surface (a one-slice volume too).
    labels = np.pad(labels, 1)
    origin = tuple((factor - 1) / 2 * s - t for s, t in zip(spacing, step))
    grid = pv.ImageData(dimensions=labels.shape, spacing=step, origin=origin)
    grid.point_data["labels"] = labels.ravel(order="F")
    surface = grid.contour_labels("external", output_mesh_type="triangles", scalars="labels", simplify_output=True)
    if surface.n_cells == 0:
        return None
    category = np.asarray(surface.cell_data["boundary_labels"]).astype(np.uint8)  # the foreground side
    surface.clear_data()
    surface.cell_data["category"] = category
    if surface.n_cells > max_faces:
        # Decimate each category on its own so that every face keeps its category.
        parts = []
        for name, part in split_categories(surface, names).items():
            part = part.decimate(1 - max_faces / surface.n_cells)
            part.cell_data["category"] = np.full(part.n_cells, list(names).index(name) + 1, np.uint8)
            parts.append(part)
        surface = pv.merge(parts)
    return surface


def _verbosity():
    # VTK warns on stderr while it falls back from X to EGL/OSMesa off screen.
    return pv.vtk_verbosity("error")


def _camera_vectors(views: int) -> list[tuple[float, float, float]]:
    """Views around the z axis from 30° above, starting at the front-left."""
    angles = np.deg2rad(-120 + 360 * np.arange(views) / views)
    return [(float(np.cos(a)), float(np.sin(a)), 0.6) for a in angles]


def floor_plane(image: Spatial, labels: np.ndarray, spacing, factor: int) -> pv.ImageData:
    """The axial image slice just below the labels, as a grey plane."""
    zs = np.flatnonzero(labels.any(axis=(0, 1))) if labels.any() else np.array([labels.shape[2] // 2])
    z = max(int(zs[0]) - 1, 0) * factor
    section = np.asarray(image[:, :, z], dtype=np.float32)[::factor, ::factor]
    lo, hi = np.percentile(section, (1, 99)) if section.size else (0, 1)
    section = np.clip((section - lo) / max(hi - lo, 1e-6), 0, 1)
    step = tuple(factor * s for s in spacing)
    origin = tuple((factor - 1) / 2 * s for s in spacing[:2]) + (z * spacing[2],)
    plane = pv.ImageData(dimensions=(*section.shape, 1), spacing=step, origin=origin)
    plane.point_data["image"] = section.ravel(order="F")
    return plane


def _scores(p: Spatial, t: Spatial, spacing, tolerance: float | None) -> dict:
    """Full-resolution scores of one label channel, from :func:`slab.pipeline.evaluation.metrics.evaluate`."""
    tolerances = () if tolerance is None else (tolerance,)
    if isinstance(p.volume, LazyVolume) or isinstance(t.volume, LazyVolume):
        # Indexing a lazy volume by channel would read it whole: let the metrics stream it.
        result = evaluate(p.volume, t.volume, spacing, tolerances)["classes"][p.channel]
    else:
        result = evaluate(p.volume[p.channel], t.volume[t.channel], spacing, tolerances)["classes"][0]
    return {k: v for k, v in result.items() if k in ("dice", "iou", "precision", "recall", "surface_dice")}


def score_line(scores: dict) -> str:
    """``Dice 0.812   IoU 0.683   ...`` from a :func:`slab.pipeline.evaluation.metrics.evaluate`-style dict."""
    def value(v) -> str:
        return "n/a" if v is None or not math.isfinite(v) else f"{v:.3f}"

    parts = [f"{label} {value(scores[key])}" for key, label in
             (("dice", "Dice"), ("iou", "IoU"), ("precision", "precision"), ("recall", "recall")) if key in scores]
    surface = scores.get("surface_dice")
    if isinstance(surface, dict):
        parts += [f"surface Dice@{float(tol):g}mm {value(v)}" for tol, v in surface.items()]
    elif surface is not None:
        parts.append(f"surface Dice {value(surface)}")
    return "   ".join(parts)


def render_hits(
    pred,
    truth,
    out_png,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    views: int = 4,
    image=None,
    title: str | None = None,
    scores: dict | None = None,
    tolerance: float | None = None,
    size: tuple[int, int] = (1200, 900),
    max_voxels: int = 256**3,
    max_faces: int = 1_000_000,
    channel: int | None = None,
    mesh=None,
    affine=None,
) -> dict:
    """Picture of hits (yellow), false positives (green) and misses (red) in 3D from several angles.

    Parameters
    ----------
    pred, truth : array-like ``(X, Y, Z)`` or ``(C, X, Y, Z)``
        Binary masks: numpy, torch or a :class:`~slab.io.volumes.LazyVolume` (read a slab at a
        time).
    out_png : path
        The PNG written (atomically), ``size`` pixels.
    spacing : (sx, sy, sz)
        Voxel size in mm; the scene is in physical units.
    views : int
        Camera angles, evenly around the z axis; laid out in one row up to 3, else two rows.
    image : array-like, optional
        Image of the same shape; its axial section under the labels is drawn as a grey floor.
    title : str, optional
        First title line, e.g. the file names.
    scores : dict, optional
        Scores for the title as :func:`slab.pipeline.evaluation.metrics.evaluate` gives them (``dice``,
        ``iou``, ``precision``, ``recall``, ``surface_dice``); computed when not given.
    tolerance : float, optional
        Surface dice tolerance (mm) to compute and show; none by default (it costs a pass).
    size : (width, height)
        Picture size in pixels.
    max_voxels : int
        Display grid budget: larger volumes are shown in blocks (see the module notes).
    max_faces : int
        Surfaces with more faces are decimated.
    channel : int, optional
        Label channel of a multi-channel ``pred``/``truth``.
    mesh : path, optional
        Also write the surfaces as a mesh file, as :func:`export_mesh` does (skipped, with a
        note, when there is no surface), in world coordinates from ``affine``.
    affine : (4, 4), optional
        Voxel to world (RAS) of the volumes, for the mesh file; default ``diag(spacing)``.

    Returns
    -------
    dict
        ``path``, ``counts`` (full-resolution voxels per category), ``scores``, ``factor``
        (display block size), ``notes`` (e.g. an empty mask), which are also logged and
        written in the picture, and ``mesh`` (the mesh path, or None).

    Example
    -------
    >>> truth = np.zeros((32, 32, 32), np.uint8); truth[8:20, 8:20, 8:20] = 1
    >>> pred = np.roll(truth, 4, axis=0)
    >>> render_hits(pred, truth, "hits.png", views=2)["counts"]  # doctest: +SKIP
    {'hit': 1152, 'false_positive': 576, 'miss': 576}
    """
    spacing = check_spacing(spacing)
    if not 1 <= int(views) <= 16:
        raise SlabError(f"views: expected 1 to 16 camera angles, got {views}")
    mesh = None if mesh is None else mesh_path(mesh)
    width, height = check_size(size)
    p, t = spatial_pair(pred, truth, channel)
    image = None if image is None else spatial_image(image, p.shape)
    if scores is None:
        scores = _scores(p, t, spacing, tolerance)
    factor = display_factor(p.shape, max_voxels)
    labels, counts = category_map(p.volume, t.volume, factor, p.channel)
    notes = _notes(counts, factor)
    floor = None if image is None else floor_plane(image, labels, spacing, factor)
    surface = category_surfaces(labels, spacing, factor, max_faces)
    del labels
    if mesh is not None and surface is None:
        notes.append(f"no surface: {mesh} not written")
        mesh = None
    for note in notes:
        logger.info("render %s: %s", out_png, note)
    parts = {} if surface is None else split_categories(surface)

    handles = [
        Patch(color=np.array(COLOURS[name]) / 255, label=f"{LEGEND[name]}: {counts[name]:,} voxels")
        for name in CATEGORIES
    ]
    draw_picture([(part, COLOURS[name]) for name, part in parts.items()], floor, views, width, height, out_png,
             [title, score_line(scores)], notes, handles)
    if mesh is not None:
        _write_mesh(_to_world(surface, spacing, np.diag([*spacing, 1.0]) if affine is None else affine), mesh)
    return {"path": Path(out_png), "counts": counts, "scores": dict(scores), "factor": factor, "notes": notes,
            "mesh": mesh}


def draw_picture(parts, floor, views: int, width: int, height: int, out_png, lines, notes, handles) -> None:
    """The 3D scene of coloured surfaces ``parts`` (``(surface, (r, g, b))``) over an optional grey
    ``floor`` from ``views`` angles, under a header of title ``lines``, ``notes`` and a legend."""
    rows = 1 if views <= 3 else 2
    cols = -(-views // rows)
    header = int(round(height * _HEADER))
    with _verbosity():
        plotter = pv.Plotter(off_screen=True, shape=(rows, cols), window_size=(width, height - header), border=False)
        try:
            plotter.set_background("white")
            for i, vector in enumerate(_camera_vectors(views)):
                plotter.subplot(i // cols, i % cols)
                for part, colour in parts:
                    plotter.add_mesh(part, color=colour, smooth_shading=True, specular=0.2)
                if floor is not None:
                    plotter.add_mesh(floor, scalars="image", cmap="gray", clim=(0, 1), show_scalar_bar=False)
                plotter.view_vector(vector, viewup=(0, 0, 1))
                plotter.reset_camera()
                plotter.camera.zoom(1.2)
            scene = plotter.screenshot(return_img=True)
        finally:
            plotter.close()

    fig = Figure(figsize=(width / 100, height / 100), dpi=100, facecolor="white")
    ax = fig.add_axes((0, 0, 1, 1 - header / height))
    ax.imshow(scene, interpolation="nearest")
    ax.set_axis_off()
    fig.text(0.01, 0.99, "\n".join(line for line in lines if line), va="top", fontsize=11)
    if notes:
        fig.text(0.01, 1 - header / height, "; ".join(notes), va="bottom", fontsize=9, color="dimgray")
    fig.legend(handles=handles, loc="upper right", fontsize=9, frameon=False, borderaxespad=0.3)
    with atomic_write(out_png) as tmp:
        fig.savefig(tmp, dpi=100, format="png")


def split_categories(surface: pv.PolyData, names: Sequence[str] = CATEGORIES) -> dict[str, pv.PolyData]:
    """The non-empty categories of a surface (code ``i + 1`` is ``names[i]``), one surface each."""
    category = np.asarray(surface.cell_data["category"])
    return {
        name: surface.remove_cells(category != code)
        for code, name in enumerate(names, start=1)
        if np.any(category == code)
    }


def mesh_path(path) -> Path:
    """``path`` if it names a mesh format :func:`export_mesh` writes, else a SlabError."""
    path = Path(path)
    if path.suffix.lower() not in MESH_SUFFIXES:
        raise SlabError(
            f"{path}: unsupported mesh format {path.suffix or '(no suffix)'!r}; expected {', '.join(MESH_SUFFIXES)}"
        )
    return path


def _to_world(surface: pv.PolyData, spacing, affine) -> pv.PolyData:
    """A surface from voxel index x spacing (the picture's frame) to world coordinates in LPS mm,
    the frame 3D Slicer reads mesh files in (it shows them over the image they came from)."""
    world = surface.copy()
    index = np.asarray(surface.points, dtype=np.float64) / np.asarray(spacing)
    ras = index @ np.asarray(affine, dtype=np.float64)[:3, :3].T + np.asarray(affine, dtype=np.float64)[:3, 3]
    world.points = ras * np.array([-1.0, -1.0, 1.0])
    return world


def _write_mesh(surface: pv.PolyData, path: Path) -> dict[str, int]:
    """Write a categorised surface (see :func:`export_mesh`); return faces per category."""
    category = np.asarray(surface.cell_data["category"])
    palette = np.array([(0, 0, 0)] + [COLOURS[name] for name in CATEGORIES], np.uint8)
    surface.cell_data["RGB"] = palette[category]
    with atomic_write(path) as tmp:
        if path.suffix.lower() == ".glb":
            with _verbosity():
                plotter = pv.Plotter(off_screen=True)
                try:
                    for name, part in split_categories(surface).items():
                        plotter.add_mesh(part, color=COLOURS[name])
                    plotter.export_gltf(str(tmp), rotate_scene=False)
                finally:
                    plotter.close()
        elif path.suffix.lower() == ".ply":
            surface.save(tmp, texture="RGB")
        else:
            surface.save(tmp)
    return {name: int(np.count_nonzero(category == code)) for code, name in enumerate(CATEGORIES, start=1)}


def export_mesh(
    pred,
    truth,
    out_path,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    max_voxels: int = 256**3,
    max_faces: int = 1_000_000,
    channel: int | None = None,
    affine=None,
) -> dict:
    """Write the hit / false-positive / miss surfaces as one mesh file, in world coordinates.

    ``.vtk`` keeps a cell array ``category`` (1 hit, 2 false positive, 3 miss) and an ``RGB``
    cell colour array; ``.ply`` keeps the ``RGB`` colours; ``.glb`` holds one coloured mesh per
    category. Coordinates are world millimetres in LPS (the volumes' ``affine``, voxel to RAS,
    default ``diag(spacing)``), as 3D Slicer reads mesh files: the mesh overlays the image. Other
    arguments as for :func:`render_hits`.

    Returns
    -------
    dict
        ``path``, ``faces`` (per category), ``factor`` and ``notes``.
    """
    out_path = mesh_path(out_path)
    spacing = check_spacing(spacing)
    p, t = spatial_pair(pred, truth, channel)
    factor = display_factor(p.shape, max_voxels)
    labels, counts = category_map(p.volume, t.volume, factor, p.channel)
    surface = category_surfaces(labels, spacing, factor, max_faces)
    if surface is None:
        raise SlabError(f"{out_path}: prediction and truth are both empty; there is no surface to export")
    faces = _write_mesh(_to_world(surface, spacing, np.diag([*spacing, 1.0]) if affine is None else affine), out_path)
    return {"path": out_path, "faces": faces, "factor": factor, "notes": _notes(counts, factor)}
