"""The dataset fingerprint ``slab plan`` plans from, and the integrity check of ``--verify``.

Cases are read one at a time (image and label; nothing is held once its case is summarised):

- geometry: shape, spacing, orientation code, anisotropy;
- intensities in the foreground (any label > 0; the whole volume where a case has none): exact
  0.5 / 50 / 99.5 percentiles, mean and standard deviation per channel, and up to
  ``SAMPLES_PER_CASE`` foreground voxels drawn at random (seeded) per case, pooled into the
  dataset-level statistics (nnU-Net's sampling; exact per case, sampled across cases);
- slices (:func:`slice_statistics`): how many of the three axes' slices hold foreground, the
  body voxels in those with and without, per label its body voxels — whether the 2.5D sampler's
  draws of slices without foreground add tissue or only air (:func:`drawn_body_shares`);
- labels: voxel fraction, connected components (26-connectivity, ``cc3d``) and their sizes,
  and a radius estimate: the Euclidean distance transform on the label's skeleton, median and
  5th percentile, in voxels and mm. A label is *tubular* when its skeleton is at least
  ``TUBULAR_RATIO`` median diameters long, curve-like (few branch voxels) and the label is
  what tubes around that skeleton hold: its voxels at most ``TUBE_FILL`` times the volume of
  a tube of the local radius along every skeleton voxel. Vessels pass (0.8-1.4 for straight,
  curved and branching tubes of radius 1-8 and the vessel phantoms); organs fail on length
  (9-20 times their skeleton's tubes), thin sheets such as the cortex on branching (a mesh of
  junctions), and thick sheets such as the MNI152 white matter (7-15 % of the volume, a
  skeleton of curves with few junctions) on the fill: 2.1 times its skeleton's tubes.

:func:`check_case` finds everything wrong with one case (unreadable files, image vs label
geometry, label values, channel counts, NaN/Inf) without stopping at the first problem, so
``slab plan --verify`` reports every bad case in one pass.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from slab.core.checks import cc3d_connectivity
from slab.core.errors import SlabError


SAMPLES_PER_CASE = 10_000
PERCENTILES = (0.5, 50.0, 99.5)
TUBULAR_RATIO = 8.0
CURVE_BRANCHING = 0.25
TUBE_FILL = 1.6


def _orientation(affine) -> str:
    import nibabel as nib

    return "".join(nib.aff2axcodes(np.asarray(affine, dtype=np.float64)))


def label_masks(label: np.ndarray, fmt: str, n_labels: int) -> list[np.ndarray]:
    """One boolean ``(X, Y, Z)`` mask per label of a label volume ``(C, X, Y, Z)``."""
    if fmt == "values":
        return [label[0] == i + 1 for i in range(n_labels)]
    return [label[i] > 0 for i in range(label.shape[0])]


def radius_estimate(mask: np.ndarray, spacing) -> dict:
    """Local radius of a binary mask on its skeleton (``skimage`` 3D skeletonisation): the
    distance from each skeleton voxel's centre to the nearest background voxel's centre, less
    half a voxel (to the boundary between them); median and 5th percentile, in voxels and mm,
    the skeleton's length in voxels, the share of its voxels with three or more skeleton
    neighbours (``skeleton_branching``) and ``tube_fill``: the mask's voxels over the volume of
    tubes of the local radius (the distance transform at each skeleton voxel) along it."""
    from scipy import ndimage

    from slab.pipeline.evaluation.skeleton import skeleton

    if not mask.any():
        return {"median_vox": 0.0, "p5_vox": 0.0, "median_mm": 0.0, "p5_mm": 0.0, "skeleton_voxels": 0,
                "skeleton_branching": 0.0, "tube_fill": 0.0}
    padded = np.pad(mask, 1)
    centre = skeleton(padded)
    edt = ndimage.distance_transform_edt(padded)
    if not centre.any():  # thinning can erase a symmetric blob whole: its centre stands for it
        centre = edt == edt.max()
    values = edt[centre] - 0.5
    half = 0.5 * min(float(s) for s in spacing)
    values_mm = ndimage.distance_transform_edt(padded, sampling=[float(s) for s in spacing])[centre] - half
    neighbours = ndimage.convolve(centre.astype(np.uint8), np.ones((3, 3, 3), np.uint8), mode="constant")[centre] - 1
    return {"median_vox": float(np.median(values)), "p5_vox": float(np.percentile(values, 5)),
            "median_mm": float(np.median(values_mm)), "p5_mm": float(np.percentile(values_mm, 5)),
            "skeleton_voxels": int(centre.sum()), "skeleton_branching": float((neighbours >= 3).mean()),
            "tube_fill": float(mask.sum() / max(np.pi * float(np.sum(edt[centre] ** 2)), 1e-12))}


def is_tubular(length_vox: int, radius_vox: float, branching: float = 0.0, fill: float = 1.0) -> bool:
    """Whether a skeleton ``length_vox`` long is at least ``TUBULAR_RATIO`` local diameters long,
    curve-like (at most ``CURVE_BRANCHING`` of its voxels have three or more skeleton neighbours:
    a vessel tree has a few branch points; a thin sheet such as the cortex thins to a mesh of
    curves, most voxels junctions) and the label is the tubes around it (``fill``, the label's
    voxels over its skeleton's tube volume, at most ``TUBE_FILL``: a thick sheet holds far more
    than the tubes along the curves it thins to)."""
    return (radius_vox > 0 and length_vox >= TUBULAR_RATIO * 2 * radius_vox and branching <= CURVE_BRANCHING
            and fill <= TUBE_FILL)


def label_summary(mask: np.ndarray, spacing) -> dict:
    """Fraction, components and sizes, radius and tubularity of one label of one case."""
    import cc3d

    voxels = int(mask.sum())
    out = {"voxels": voxels, "fraction": voxels / max(1, mask.size)}
    if voxels:
        components, n = cc3d.connected_components(mask.astype(np.uint8), connectivity=cc3d_connectivity(mask.shape, 26),
                                                   return_N=True)
        sizes = np.bincount(components.reshape(-1))[1:]
        sizes = sizes[sizes > 0]
        out.update(components=int(n), smallest=int(sizes.min()), median_size=float(np.median(sizes)),
                   largest=int(sizes.max()))
    else:
        out.update(components=0, smallest=0, median_size=0.0, largest=0)
    out["radius"] = radius_estimate(mask, spacing)
    out["tubular"] = is_tubular(out["radius"]["skeleton_voxels"], out["radius"]["median_vox"],
                                out["radius"]["skeleton_branching"], out["radius"]["tube_fill"])
    return out


def slice_statistics(image: np.ndarray, masks: list, foreground: np.ndarray) -> dict:
    """What the 2.5D sampler draws from, per axis (the slices along x, y, z): how many slices hold
    foreground (its positive draws) and how many not (its negative draws), and the body voxels in
    each kind (the first channel above Otsu's threshold, holes filled:
    :func:`slab.pipeline.evaluation.calibration.body_mask`); and per label its voxels in the body
    (all in slices with foreground, by definition)."""
    from slab.pipeline.evaluation.calibration import body_mask

    body = body_mask(image)
    out = {"positive": [], "negative": [], "body_positive": [], "body_negative": [],
           "label_body": [int((m & body).sum()) for m in masks]}
    for axis in range(3):
        positive = np.moveaxis(foreground, axis, 0).reshape(foreground.shape[axis], -1).any(axis=1)
        per_slice = np.moveaxis(body, axis, 0).reshape(body.shape[axis], -1).sum(axis=1)
        out["positive"].append(int(positive.sum()))
        out["negative"].append(int((~positive).sum()))
        out["body_positive"].append(int(per_slice[positive].sum()))
        out["body_negative"].append(int(per_slice[~positive].sum()))
    return out


def drawn_body_shares(slices: dict, positive_fraction: float, axes=(0, 1, 2)) -> list[tuple[float, float]]:
    """Per label ``(drawn, whole)``: its share of the body voxels in slices drawn as the 2.5D
    sampler draws them (an axis of ``axes`` alike, then ``positive_fraction`` a slice with
    foreground, else one without) and in the whole volumes, from :func:`slice_statistics` summed
    over a dataset's cases (``nan`` where there is no body)."""
    drawn_body, drawn_label = 0.0, np.zeros(len(slices["label_body"]))
    for axis in axes:
        n_pos, n_neg = slices["positive"][axis], slices["negative"][axis]
        f = positive_fraction if n_pos and n_neg else float(n_pos > 0)  # one kind only: every draw is of it
        drawn_body += (f * slices["body_positive"][axis] / max(1, n_pos)
                       + (1 - f) * slices["body_negative"][axis] / max(1, n_neg))
        drawn_label += f * np.asarray(slices["label_body"], dtype=float) / max(1, n_pos)
    whole_body = slices["body_positive"][0] + slices["body_negative"][0]  # every axis' slices hold the whole body
    return [(float(v / drawn_body) if drawn_body else float("nan"), float(w / whole_body) if whole_body else float("nan"))
            for v, w in zip(drawn_label, slices["label_body"])]


def intensity_summary(image: np.ndarray, foreground: np.ndarray, rng: np.random.Generator) -> tuple[list, np.ndarray]:
    """Per-channel foreground statistics of one case, and ``(C, n)`` sampled foreground voxels."""
    from slab.transforms.percentiles import volume_percentiles

    where = foreground if foreground.any() else np.ones_like(foreground)
    index = np.flatnonzero(where.reshape(-1, order="F"))
    pick = index if index.size <= SAMPLES_PER_CASE else np.sort(rng.choice(index, SAMPLES_PER_CASE, replace=False))
    stats, samples = [], []
    for c in range(image.shape[0]):
        channel = image[c]
        values = channel[where]
        q = volume_percentiles(channel, PERCENTILES, mask=where, name="image")
        stats.append({"p0_5": float(q[0]), "p50": float(q[1]), "p99_5": float(q[2]),
                      "mean": float(values.mean(dtype=np.float64)), "std": float(values.std(dtype=np.float64)),
                      "min": float(channel.min()), "max": float(channel.max())})
        samples.append(channel.reshape(-1, order="F")[pick].astype(np.float64))
    return stats, np.asarray(samples)


def check_case(item: dict, fmt: str, n_labels: int | None, expected: dict | None) -> tuple[list[str], tuple | None]:
    """Every problem of one datalist case, and ``(image, label)`` when it is readable.

    ``expected``: ``{"channels": C, "label_channels": L}`` of the first good case, or None.
    """
    from slab.io.volumes import check_same_geometry, load_volume

    problems: list[str] = []
    image_name = ", ".join(item["image"]) if isinstance(item["image"], list) else str(item["image"])
    try:
        image = load_volume(item["image"])
    except SlabError as err:
        return [str(err)], None
    if "label" not in item:
        return [f"{image_name}: no label in the datalist"], None
    images = item["image"] if isinstance(item["image"], list) else [item["image"]]
    if any(Path(str(i)).resolve() == Path(str(item["label"])).resolve() for i in images):
        return [f"{item['label']}: the label is the image itself; expected a mask or label map"], None
    try:
        label = load_volume(item["label"])
    except SlabError as err:
        return [str(err)], None
    try:
        check_same_geometry(image, label, names=[image_name, str(item["label"])])
    except SlabError as err:
        problems.append(str(err))
    array = np.asarray(image)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        problems.append(f"{image_name}: {int((~np.isfinite(array)).sum())} NaN or Inf voxels")
    values = np.asarray(label)
    if values.dtype.kind == "f" and not np.all(values == np.round(values)):
        problems.append(f"{item['label']}: non-integer label values (expected 0/1 masks or class numbers)")
    elif values.size and values.min() < 0:
        problems.append(f"{item['label']}: negative label values (min {values.min()})")
    elif fmt == "channels" and values.size and values.max() > 1 and not np.isin(values, (0, 1, 255)).all():
        found = np.unique(values)
        problems.append(f"{item['label']}: {found.size} distinct label values ({', '.join(f'{v:g}' for v in found[:4])}"
                        f"{', ...' if found.size > 4 else ''}); expected 0/1 (or 0/255) masks, one channel per label, "
                        "or class numbers with \"label_format\": \"values\" and the \"labels\" naming them")
    if fmt == "values" and n_labels is not None and values.size and values.max() > n_labels:
        problems.append(f"{item['label']}: label value {int(values.max())} above the {n_labels} labels the "
                        "datalist names")
    if expected is not None:
        if array.shape[0] != expected["channels"]:
            problems.append(f"{image_name}: {array.shape[0]} channel(s); the first case has {expected['channels']}")
        if values.shape[0] != expected["label_channels"]:
            problems.append(f"{item['label']}: {values.shape[0]} label channel(s); the first case has "
                            f"{expected['label_channels']}")
    return problems, (image, label)


def _pooled(samples: list[np.ndarray]) -> list[dict]:
    pooled = np.concatenate(samples, axis=1)
    out = []
    for values in pooled:
        q = np.percentile(values, PERCENTILES)
        out.append({"p0_5": float(q[0]), "p50": float(q[1]), "p99_5": float(q[2]),
                    "mean": float(values.mean()), "std": float(values.std())})
    return out


def _label_names(data: dict, n: int) -> list[str]:
    names = data.get("labels")
    return list(names) if isinstance(names, list) and len(names) == n else [f"label_{i + 1}" for i in range(n)]


def fingerprint(datalist, *, seed: int = 0, progress=None) -> tuple[dict, list[str]]:
    """``(fingerprint, problems)`` of every labelled case of a datalist (training and validation).

    ``problems`` lists every bad case's problems (one line each, naming its file); the
    fingerprint summarises the good cases. ``progress(i, n, name)`` is called per case.
    """
    from slab.pipeline.data.datalist import load_datalist, read_datalist
    from slab.pipeline.training.segmentation import label_layout

    data = read_datalist(datalist)
    train_items, val_items = load_datalist(datalist, fold=None)
    items = list(train_items) + list(val_items)
    if not items:
        raise SlabError("datalist: no cases")
    fmt = data.get("label_format", "channels")
    declared = len(data["labels"]) if fmt == "values" and isinstance(data.get("labels"), list) else None
    rng = np.random.default_rng(seed)
    cases, problems, samples = [], [], []
    expected = None
    n_labels = None
    from slab.pipeline.data.datalist import case_ids

    for index, (item, name) in enumerate(zip(items, case_ids(items))):
        if progress is not None:
            progress(index, len(items), name)
        found, volumes = check_case(item, fmt, declared, expected)
        if found or volumes is None:
            problems += found
            continue
        image, label = volumes
        array, values = np.asarray(image), np.asarray(label)
        if expected is None:
            expected = {"channels": int(array.shape[0]), "label_channels": int(values.shape[0])}
            n_labels = label_layout(data, int(values.shape[0]))[1]
        spacing = [float(s) for s in image.meta["spacing"]]
        masks = label_masks(values, fmt, n_labels)
        foreground = np.logical_or.reduce(masks) if masks else np.zeros(array.shape[1:], bool)
        overlap = int((np.sum(masks, axis=0, dtype=np.uint16) > 1).sum()) if len(masks) > 1 else 0
        stats, sample = intensity_summary(array, foreground, rng)
        samples.append(sample)
        cases.append({
            "case": name, "group": str(item.get("case", name)), "image": item["image"], "label": item["label"], "fold": int(item.get("fold", 0)),
            "shape": [int(s) for s in array.shape[1:]], "channels": int(array.shape[0]), "spacing": spacing,
            "orientation": _orientation(image.affine), "dtype": str(array.dtype),
            "anisotropy": max(spacing) / min(spacing), "foreground_voxels": int(foreground.sum()),
            "overlap_voxels": overlap,
            "intensity": stats, "labels": [label_summary(m, spacing) for m in masks],
            "slices": slice_statistics(array[0], masks, foreground),
        })
        del image, label, array, values, masks, foreground
    if not cases:
        return {"cases": []}, problems
    names = _label_names(data, n_labels)
    labels = []
    for i, label_name in enumerate(names):
        per_case = [c["labels"][i] for c in cases]
        present = [p for p in per_case if p["voxels"]]
        radii = [p["radius"]["median_vox"] for p in present]
        labels.append({
            "name": label_name, "cases_with_label": len(present),
            "mean_fraction": float(np.mean([p["fraction"] for p in per_case])),
            "median_components": float(np.median([p["components"] for p in per_case])),
            "smallest_component": int(min((p["smallest"] for p in present), default=0)),
            "median_size": float(np.median([p["median_size"] for p in present])) if present else 0.0,
            "median_radius_vox": float(np.median(radii)) if radii else 0.0,
            "smallest_radius_vox": float(min((p["radius"]["p5_vox"] for p in present), default=0.0)),
            "median_radius_mm": float(np.median([p["radius"]["median_mm"] for p in present])) if present else 0.0,
            "tubular": bool(present) and sum(p["tubular"] for p in present) * 2 >= len(present),
        })
    slices = {key: [int(sum(c["slices"][key][a] for c in cases)) for a in range(3)] for key in
              ("positive", "negative", "body_positive", "body_negative")}
    slices["label_body"] = [int(sum(c["slices"]["label_body"][i] for c in cases)) for i in range(len(names))]
    shapes = np.asarray([c["shape"] for c in cases])
    spacings = np.asarray([c["spacing"] for c in cases])
    modality = data.get("modality")
    summary = {
        "cases": cases,
        "n_cases": len(cases),
        "channels": expected["channels"],
        "label_format": fmt,
        "labels": labels,
        "modality": modality if isinstance(modality, (dict, str)) else None,
        "median_shape": [int(v) for v in np.median(shapes, axis=0)],
        "min_shape": [int(v) for v in shapes.min(axis=0)],
        "median_spacing": [float(v) for v in np.median(spacings, axis=0)],
        "spacings_agree": bool(np.allclose(spacings, spacings[0], rtol=0.05)),
        "anisotropy": float(np.median([c["anisotropy"] for c in cases])),
        "intensity": _pooled(samples),
        "dtype": cases[0]["dtype"],
        "folds": sorted({c["fold"] for c in cases}),
        "slices": slices,
    }
    return summary, problems
