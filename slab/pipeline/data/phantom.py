"""Deterministic phantoms: small synthetic volumes with a known ground truth.

Three kinds, each a ``(image, label)`` pair of MetaTensors with affine ``diag(spacing)``:

- ``vessels`` — a HiP-CT-like uint16 volume ``(1, X, Y, Z)``: a branching tree of tubes whose
  radii shrink from thick (about ``min(shape) / 14``) down to one voxel, bright vessels with a
  brighter wall, textured background, Gaussian noise and a slow multiplicative intensity drift.
  Label ``(1, X, Y, Z)`` uint8. ``sparse=True`` leaves the one-voxel vessels out of the label, as
  sparse annotations do.
- ``organs`` — an MRI-like uint16 body ``(1, X, Y, Z)`` holding three blob organs of different
  brightness; multi-label ``(3, X, Y, Z)`` uint8 (one channel per organ, overlaps allowed).
  ``fractures`` names organs (0, 1, 2) crossed by a dark crack, a plane through the organ's
  centroid containing the z axis (so every axial slice through the organ shows it): what a
  slice-sequence classifier can learn to find, as the cervical-spine recipe finds fractures.
- ``tumour`` — a BraTS-like uint16 brain ``(4, X, Y, Z)`` with flair, t1, t1ce and t2 contrasts
  and a single-channel label with BraTS values {0, 1, 2, 4} (1 necrotic core, 2 oedema,
  4 enhancing rim). Converting it to tumour-core / whole-tumour / enhancing channels is the
  dataset adapters' job, as for real BraTS cases.

The same arguments always give the same arrays (one ``numpy`` generator seeded with ``seed``).
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from monai.data import MetaTensor
from scipy import ndimage

from slab.core.checks import PHANTOM_KINDS, check_spacing
from slab.core.errors import SlabError

KINDS = PHANTOM_KINDS
MIN_SIZE = 8
# Peak working memory per voxel while a phantom is made (measured with tracemalloc at 64^3:
# 61, 48 and 191 bytes), rounded up; a shape whose phantom would not fit is refused up front.
BYTES_PER_VOXEL = {"vessels": 80, "organs": 64, "tumour": 256}
_UINT16_MAX = 65535


class Phantom(NamedTuple):
    """A phantom: ``image`` (C, X, Y, Z) uint16 and ``label`` (L, X, Y, Z) uint8 MetaTensors, and
    their shared ``affine`` (4x4 float64 numpy, ``diag(sx, sy, sz, 1)``)."""

    image: MetaTensor
    label: MetaTensor
    affine: np.ndarray


# ---------------------------------------------------------------------------------------------
# Arguments


def check_shape(shape) -> tuple[int, int, int]:
    """Three integers of at least ``MIN_SIZE``, else SlabError."""
    try:
        items = list(shape)
    except TypeError:
        raise SlabError(f"shape: expected three positive integers (X, Y, Z), got {shape!r}") from None
    ok = len(items) == 3 and all(
        not isinstance(s, (bool, np.bool_)) and isinstance(s, (int, np.integer)) and s > 0 for s in items
    )
    if not ok:
        raise SlabError(f"shape: expected three positive integers (X, Y, Z), got {tuple(items)}")
    if min(items) < MIN_SIZE:
        raise SlabError(f"shape: a phantom needs at least {MIN_SIZE} voxels per axis, got {tuple(map(int, items))}")
    return tuple(int(s) for s in items)


def _check_seed(seed) -> int:
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SlabError(f"seed: expected a non-negative integer, got {seed!r}")
    return int(seed)


# ---------------------------------------------------------------------------------------------
# Shared pieces


def _grid(shape):
    """Coordinates along each axis, shaped to broadcast: (X,1,1), (1,Y,1), (1,1,Z)."""
    return [np.arange(n, dtype=np.float32).reshape([-1 if a == i else 1 for a in range(3)])
            for i, n in enumerate(shape)]


def _smooth_field(rng: np.random.Generator, shape, waves: int = 6, max_cycles: float = 2.0) -> np.ndarray:
    """A zero-mean, unit-scale field varying over ``max_cycles`` cycles per volume at most."""
    gx, gy, gz = _grid(shape)
    field = np.zeros(shape, dtype=np.float32)
    for _ in range(waves):
        cycles = rng.uniform(-max_cycles, max_cycles, 3)
        phase = rng.uniform(0, 2 * np.pi)
        arg = (2 * np.pi * cycles[0] / shape[0]) * gx + (2 * np.pi * cycles[1] / shape[1]) * gy
        field += np.cos(arg + ((2 * np.pi * cycles[2] / shape[2]) * gz + phase))
    return field / np.sqrt(waves / 2)


def _texture(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    """Band-limited noise, unit standard deviation."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, mode="wrap")
    return noise / max(float(noise.std()), 1e-6)


def _ellipsoid_distance(shape, centre, radii) -> np.ndarray:
    """Normalised ellipsoid distance: 1 on the surface of the ellipsoid."""
    gx, gy, gz = _grid(shape)
    return np.sqrt(((gx - centre[0]) / radii[0]) ** 2 + ((gy - centre[1]) / radii[1]) ** 2
                   + ((gz - centre[2]) / radii[2]) ** 2)


def _to_uint16(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, _UINT16_MAX).astype(np.uint16)


def _metatensor(array: np.ndarray, spacing, source: str) -> MetaTensor:
    affine = np.diag([*spacing, 1.0])
    meta = {"filename_or_obj": source, "spacing": tuple(spacing), "spatial_shape": tuple(array.shape[1:])}
    return MetaTensor(torch.as_tensor(np.ascontiguousarray(array)), affine=torch.as_tensor(affine), meta=meta)


# ---------------------------------------------------------------------------------------------
# Vessels


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-9)


def _turn(rng: np.random.Generator, direction: np.ndarray, angle: float, axis_hint: np.ndarray | None = None):
    """``direction`` rotated by ``angle`` about an axis perpendicular to it; also returns that axis."""
    axis = axis_hint if axis_hint is not None else _unit(np.cross(direction, rng.standard_normal(3)))
    # Rodrigues' rotation with axis perpendicular to direction
    return _unit(direction * np.cos(angle) + np.cross(axis, direction) * np.sin(angle)), axis


def _vessel_tree(rng: np.random.Generator, shape) -> list[tuple[np.ndarray, float]]:
    """Centre-line points and radius of every tube segment, root first.

    A root enters through a face and random-walks inward; each segment ends in two children
    with an asymmetric split of the parent's cross-section (``r1 = r sqrt(f)``,
    ``r2 = r sqrt(1 - f)``). Radii at or below 1.25 voxels become exactly 1 and end their branch.
    A walk that leaves the volume ends its branch.
    """
    size = np.asarray(shape, dtype=np.float64)
    centre = size / 2
    root_radius = max(1.5, float(min(shape)) / 14)
    axis = int(rng.integers(3))
    start = size * rng.uniform(0.35, 0.65, 3)
    start[axis] = 0.0
    direction = np.zeros(3)
    direction[axis] = 1.0
    pending = [(start, _unit(direction + rng.normal(0, 0.2, 3)), root_radius)]
    segments: list[tuple[np.ndarray, float]] = []
    max_segments = int(60 + 240 * np.prod(size) / 128**3)
    while pending and len(segments) < max_segments:
        point, direction, radius = pending.pop(0)
        length = radius * rng.uniform(4.0, 8.0) + rng.uniform(5.0, 9.0)
        step = 0.5 if radius <= 2 else min(1.0, radius / 4)
        points, inside = [point], True
        for _ in range(int(length / step)):
            pull = _unit(centre - point) * 0.03  # keeps trees from leaving through the nearest face
            direction = _unit(direction + rng.normal(0, 0.06, 3) + pull)
            point = point + direction * step
            if np.any(point < -radius) or np.any(point > size - 1 + radius):
                inside = False
                break
            points.append(point)
        segments.append((np.asarray(points), radius))
        if not inside or radius <= 1.0:
            continue
        split = rng.uniform(0.3, 0.7)
        angle = rng.uniform(0.45, 0.95)
        first, plane_axis = _turn(rng, direction, angle * (1 - split) * 1.5)
        second, _ = _turn(rng, direction, -angle * split * 1.5, plane_axis)
        for child_direction, fraction in ((first, split), (second, 1 - split)):
            child_radius = radius * fraction ** 0.5
            pending.append((point, child_direction, 1.0 if child_radius <= 1.25 else child_radius))
    return segments


def _rasterise_tubes(shape, segments, skip_radius: float | None = None) -> np.ndarray:
    """Minimum over stamped spheres of ``distance / radius``: below 1 inside a tube."""
    rel = np.full(shape, np.inf, dtype=np.float32)
    for points, radius in segments:
        if skip_radius is not None and radius <= skip_radius:
            continue
        reach = radius + 1.5
        for p in points:
            lo = np.maximum(np.floor(p - reach).astype(int), 0)
            hi = np.minimum(np.ceil(p + reach).astype(int) + 1, shape)
            if np.any(hi <= lo):
                continue
            dx = (np.arange(lo[0], hi[0], dtype=np.float32) - p[0])[:, None, None] ** 2
            dy = (np.arange(lo[1], hi[1], dtype=np.float32) - p[1])[None, :, None] ** 2
            dz = (np.arange(lo[2], hi[2], dtype=np.float32) - p[2])[None, None, :] ** 2
            box = rel[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
            np.minimum(box, np.sqrt(dx + dy + dz) / np.float32(radius), out=box)
    return rel


def _vessels(rng, shape, sparse: bool):
    segments = _vessel_tree(rng, shape)
    rel = _rasterise_tubes(shape, segments)
    label = rel <= 1.0
    if sparse:
        label = _rasterise_tubes(shape, segments, skip_radius=1.0) <= 1.0
    # Vessel contrast with partial volume at the boundary and a wall brighter than the lumen.
    inside = np.clip((1.15 - rel) / 0.3, 0.0, 1.0)
    wall = np.clip(1.0 - np.abs(rel - 0.8) / 0.25, 0.0, 1.0)
    tissue = 0.30 + 0.04 * _texture(rng, shape, 2.0) + 0.02 * _texture(rng, shape, 0.8)
    signal = tissue + inside * 0.40 + wall * 0.12
    drift = 1.0 + 0.15 * _smooth_field(rng, shape, waves=4, max_cycles=1.0)
    image = signal * drift + rng.normal(0.0, 0.03, shape).astype(np.float32)
    return _to_uint16(image * 40000 + 2000)[None], label.astype(np.uint8)[None]


# ---------------------------------------------------------------------------------------------
# Organs and tumour


def _blob(rng, shape, centre, radii, roughness: float) -> np.ndarray:
    distance = _ellipsoid_distance(shape, centre, radii)
    return distance < 1.0 + roughness * _smooth_field(rng, shape, waves=5, max_cycles=3.0)


def _separated_centres(rng, shape, count: int, low: float, high: float, min_distance: float) -> list[np.ndarray]:
    size = np.asarray(shape, dtype=np.float64)
    centres: list[np.ndarray] = []
    for _ in range(200 * count):
        candidate = size * rng.uniform(low, high, 3)
        if all(np.linalg.norm((candidate - c) / size) >= min_distance for c in centres):
            centres.append(candidate)
            if len(centres) == count:
                break
    while len(centres) < count:  # tiny volumes: accept whatever fits
        centres.append(size * rng.uniform(low, high, 3))
    return centres


def _crack(organ: np.ndarray, seed: int, index: int) -> np.ndarray:
    """The voxels of ``organ`` within a crack: a slab about ``2 + min(shape) / 64`` voxels thick
    around a plane through its centroid whose normal lies in xy, at an angle drawn from
    ``(seed, index)`` (the phantom's own generator is left untouched, so a fracture changes
    nothing else)."""
    if not organ.any():
        return organ
    angle = np.random.default_rng([seed, 1009, index]).uniform(0.0, np.pi)
    centre = np.argwhere(organ).mean(axis=0)
    x, y = np.ogrid[:organ.shape[0], :organ.shape[1]]
    distance = np.abs((x - centre[0]) * np.cos(angle) + (y - centre[1]) * np.sin(angle))
    return organ & (distance <= 1.0 + min(organ.shape) / 128)[:, :, None]


def _organs(rng, shape, seed: int = 0, fractures=()):
    size = np.asarray(shape, dtype=np.float64)
    body = _blob(rng, shape, size / 2 - 0.5, size * 0.45, 0.04)
    centres = _separated_centres(rng, shape, 3, 0.3, 0.7, 0.25)
    labels, brightness = [], (0.55, 0.72, 0.9)
    signal = np.where(body, 0.35, 0.04).astype(np.float32)
    signal += body * (0.03 * _texture(rng, shape, 1.5))
    for centre, level in zip(centres, brightness):
        radii = size * rng.uniform(0.09, 0.16, 3)
        organ = _blob(rng, shape, centre, radii, 0.12) & body
        labels.append(organ)
        signal[organ] = level + 0.03 * rng.standard_normal(int(organ.sum()), dtype=np.float32)
    for index in fractures:
        signal[_crack(labels[index], seed, index)] = 0.2  # darker than the body around the organs
    drift = 1.0 + 0.12 * _smooth_field(rng, shape, waves=4, max_cycles=1.0)
    image = signal * drift + rng.normal(0.0, 0.025, shape).astype(np.float32)
    return _to_uint16(image * 30000 + 1000)[None], np.stack(labels).astype(np.uint8)


# (flair, t1, t1ce, t2) levels per tissue, like the four BraTS contrasts
_TUMOUR_CONTRASTS = {
    "background": (0.0, 0.0, 0.0, 0.0),
    "brain": (0.45, 0.55, 0.50, 0.40),
    "csf": (0.10, 0.20, 0.20, 0.90),
    "oedema": (0.85, 0.40, 0.42, 0.75),
    "enhancing": (0.70, 0.45, 0.95, 0.60),
    "necrosis": (0.50, 0.25, 0.20, 0.85),
}


def _tumour(rng, shape):
    size = np.asarray(shape, dtype=np.float64)
    brain = _blob(rng, shape, size / 2 - 0.5, size * 0.42, 0.03)
    csf = np.zeros(shape, dtype=bool)
    for side in (-1, 1):
        centre = size / 2 + np.array([side * 0.06, 0.02, 0.0]) * size
        csf |= _ellipsoid_distance(shape, centre, size * np.array([0.035, 0.12, 0.06])) < 1
    csf &= brain
    # Tumour centre away from the ventricles, inside the brain.
    centre = size / 2 + size * rng.choice([-1, 1], 3) * rng.uniform(0.12, 0.18, 3)
    radius = size * rng.uniform(0.13, 0.17, 3)
    core_distance = _ellipsoid_distance(shape, centre, radius * 0.55)
    core_distance *= 1.0 + 0.08 * _smooth_field(rng, shape, waves=5, max_cycles=3.0)
    oedema = _blob(rng, shape, centre, radius, 0.15) & brain
    core = (core_distance < 1.0) & brain
    necrosis = (core_distance < 0.6) & brain
    label = np.zeros(shape, dtype=np.uint8)
    label[oedema] = 2
    label[core] = 4
    label[necrosis] = 1
    tissue = np.zeros(shape, dtype=np.uint8)  # index into the contrast table
    names = list(_TUMOUR_CONTRASTS)
    tissue[brain] = names.index("brain")
    tissue[csf] = names.index("csf")
    tissue[label == 2] = names.index("oedema")
    tissue[label == 4] = names.index("enhancing")
    tissue[label == 1] = names.index("necrosis")
    table = np.asarray(list(_TUMOUR_CONTRASTS.values()), dtype=np.float32)  # (tissues, 4)
    texture = _texture(rng, shape, 1.5)
    channels = []
    for c in range(4):
        signal = table[tissue, c] + brain * (0.03 * texture)
        drift = 1.0 + 0.1 * _smooth_field(rng, shape, waves=3, max_cycles=1.0)
        channels.append(signal * drift + rng.normal(0.0, 0.02, shape).astype(np.float32))
    image = np.stack(channels)
    return _to_uint16(image * 3000 + 50), label[None]


# ---------------------------------------------------------------------------------------------
# Public API


def _check_fractures(fractures, kind: str) -> tuple[int, ...]:
    if fractures is None or (isinstance(fractures, (list, tuple)) and not fractures):
        return ()
    if kind != "organs":
        raise SlabError(f"fractures: cracks are drawn in kind organs, not {kind}")
    if not isinstance(fractures, (list, tuple)) or not all(
            isinstance(f, (int, np.integer)) and not isinstance(f, bool) and 0 <= f < 3 for f in fractures):
        raise SlabError(f"fractures: expected organ indices 0, 1 or 2, got {fractures!r}")
    return tuple(sorted({int(f) for f in fractures}))


def make_phantom(shape=(64, 64, 64), seed: int = 0, spacing=(1.0, 1.0, 1.0), kind: str = "vessels",
                 sparse: bool = False, fractures=()) -> Phantom:
    """Build a phantom volume and its label.

    Parameters
    ----------
    shape : (X, Y, Z), each at least ``MIN_SIZE``
    seed : non-negative int; the same arguments always give identical arrays
    spacing : voxel size (sx, sy, sz) in mm; the affine is ``diag(sx, sy, sz, 1)``
    kind : ``"vessels"``, ``"organs"`` or ``"tumour"`` (see the module docstring)
    sparse : vessels only: leave the one-voxel-radius vessels out of the label
    fractures : organs only: the organs (0, 1, 2) a dark crack crosses; the label is unchanged

    Returns
    -------
    Phantom(image, label, affine)
        uint16 image ``(C, X, Y, Z)`` and uint8 label ``(L, X, Y, Z)`` MetaTensors, and the affine.

    Example
    -------
    >>> image, label, affine = make_phantom((32, 32, 32), seed=1)
    >>> tuple(image.shape), image.dtype, tuple(label.shape)
    ((1, 32, 32, 32), torch.uint16, (1, 32, 32, 32))
    """
    shape = check_shape(shape)
    seed = _check_seed(seed)
    spacing = check_spacing(spacing)
    if kind not in KINDS:
        raise SlabError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    from slab.io.headers import check_memory

    check_memory(int(np.prod(shape, dtype=object)) * BYTES_PER_VOXEL[kind], f"shape {'x'.join(map(str, shape))}")
    if sparse and kind != "vessels":
        raise SlabError(f"sparse: sparse annotation applies to kind vessels, not {kind}")
    fractures = _check_fractures(fractures, kind)
    rng = np.random.default_rng(seed)
    if kind == "vessels":
        image, label = _vessels(rng, shape, bool(sparse))
    elif kind == "organs":
        image, label = _organs(rng, shape, seed, fractures)
    else:
        image, label = _tumour(rng, shape)
    source = f"phantom:{kind}:seed={seed}"
    return Phantom(_metatensor(image, spacing, source), _metatensor(label, spacing, source), np.diag([*spacing, 1.0]))


def write_phantom(out_dir, shape=(64, 64, 64), seed: int = 0, spacing=(1.0, 1.0, 1.0), kind: str = "vessels",
                  sparse: bool = False, fractures=()) -> tuple[Path, Path]:
    """Write ``OUT_DIR/image.nii.gz`` and ``OUT_DIR/label.nii.gz`` (affine from ``spacing``).

    Arguments as :func:`make_phantom`; bad arguments write nothing. Files are written
    atomically. Returns ``(image_path, label_path)``.
    """
    from slab.io.volumes import save_volume

    phantom = make_phantom(shape, seed, spacing, kind, sparse, fractures)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SlabError(f"{out}: exists and is not a directory")
    image_path, label_path = out / "image.nii.gz", out / "label.nii.gz"
    save_volume(phantom.image, image_path, affine=phantom.affine)
    save_volume(phantom.label, label_path, affine=phantom.affine)
    return image_path, label_path


__all__ = ["KINDS", "Phantom", "check_shape", "make_phantom", "write_phantom"]
