"""Where a prediction disagrees with the truth, cluster by cluster: connected false positives
(predicted voxels outside the truth) and misses (true voxels not predicted), 26-connected, each
with its size, volume, mean probability, centroid (voxel and world) and bounding box, ranked by
size then mean probability. A large confident false-positive cluster is the first place to look
for a missing annotation; a large miss, for a blind spot of the model. :func:`error_sheet` draws
the top clusters, each as a 3D crop (hits yellow, false positives green, misses red) beside the
image's axial section through its centroid.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from slab.core.checks import cc3d_connectivity
from slab.core.errors import SlabError


FIELDS = ("rank", "kind", "voxels", "volume_mm3", "mean_probability", "centroid_x", "centroid_y", "centroid_z",
          "world_x", "world_y", "world_z", "box_min", "box_max")


def error_clusters(pred: np.ndarray, truth: np.ndarray, prob: np.ndarray | None = None, affine=None,
                   spacing=(1.0, 1.0, 1.0)) -> list[dict]:
    """Every false-positive and missed cluster of two ``(X, Y, Z)`` masks, ranked (see the module)."""
    import cc3d

    pred, truth = np.asarray(pred).astype(bool), np.asarray(truth).astype(bool)
    if pred.shape != truth.shape:
        raise SlabError(f"pred: shape {pred.shape} does not match truth {truth.shape}")
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    voxel_mm3 = float(np.prod(spacing))
    clusters = []
    for kind, mask in (("false_positive", pred & ~truth), ("missed", truth & ~pred)):
        if not mask.any():
            continue
        labels, n = cc3d.connected_components(mask.astype(np.uint8), connectivity=cc3d_connectivity(mask.shape, 26),
                                              return_N=True)
        stats = cc3d.statistics(labels)
        # every cluster's summed probability in one pass (not a scan of the volume per cluster)
        sums = np.bincount(labels.reshape(-1), weights=np.asarray(prob, dtype=np.float64).reshape(-1),
                           minlength=int(n) + 1) if prob is not None else None
        for k in range(1, int(n) + 1):
            size = int(stats["voxel_counts"][k])
            if size == 0:
                continue
            centroid = np.asarray(stats["centroids"][k], dtype=np.float64)
            box = stats["bounding_boxes"][k]
            mean_p = float(sums[k] / size) if sums is not None else float("nan")
            world = affine @ np.append(centroid, 1.0)
            clusters.append({"kind": kind, "voxels": size, "volume_mm3": size * voxel_mm3, "mean_probability": mean_p,
                             "centroid_x": centroid[0], "centroid_y": centroid[1], "centroid_z": centroid[2],
                             "world_x": world[0], "world_y": world[1], "world_z": world[2],
                             "box_min": [int(b.start) for b in box], "box_max": [int(b.stop) for b in box]})
    clusters.sort(key=lambda c: (-c["voxels"], -(0.0 if np.isnan(c["mean_probability"]) else c["mean_probability"])))
    for rank, c in enumerate(clusters, 1):
        c["rank"] = rank
    return clusters


def write_clusters_csv(clusters: list[dict], path) -> Path:
    """The clusters as CSV (one row each, :data:`FIELDS`), written atomically."""
    from slab.core.outputs import atomic_write

    with atomic_write(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for c in clusters:
            row = {k: c[k] for k in FIELDS}
            row["box_min"], row["box_max"] = " ".join(map(str, c["box_min"])), " ".join(map(str, c["box_max"]))
            for k in ("volume_mm3", "mean_probability", "centroid_x", "centroid_y", "centroid_z",
                      "world_x", "world_y", "world_z"):
                row[k] = "" if np.isnan(row[k]) else f"{row[k]:.4f}"
            writer.writerow(row)
    return Path(path)


def error_sheet(clusters: list[dict], pred, truth, image, out_png, spacing=(1.0, 1.0, 1.0), top: int = 6,
                margin: int = 8) -> Path:
    """One PNG: for each of the ``top`` clusters, a 3D crop around it and the axial section
    through its centroid (image in grey; truth outlined red, prediction green)."""
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from slab.pipeline.evaluation.render import render_hits
    from slab.core.outputs import atomic_write

    chosen = clusters[:top]
    if not chosen:
        raise SlabError("errors: prediction and truth agree everywhere; no cluster to draw")
    pred, truth = np.asarray(pred).astype(bool), np.asarray(truth).astype(bool)
    fig, axes = plt.subplots(len(chosen), 2, figsize=(8, 3.6 * len(chosen)), squeeze=False)
    with tempfile.TemporaryDirectory(prefix="slab-errors-") as tmp:
        for row, c in enumerate(chosen):
            lo = [max(0, b - margin) for b in c["box_min"]]
            hi = [min(s, b + margin) for b, s in zip(c["box_max"], pred.shape)]
            crop = tuple(slice(a, b) for a, b in zip(lo, hi))
            picture = Path(tmp) / f"{row}.png"
            render_hits(pred[crop], truth[crop], picture, spacing=spacing, views=1, size=(480, 420),
                        title=f"#{c['rank']} {c['kind']}", scores={})
            axes[row][0].imshow(plt.imread(picture))
            z = int(round(c["centroid_z"]))
            section = np.asarray(image)[..., z] if image is not None else np.zeros(pred.shape[:2])
            axes[row][1].imshow(section.T, cmap="gray", origin="lower")
            axes[row][1].contour(truth[..., z].T, levels=[0.5], colors="red", linewidths=0.8)
            axes[row][1].contour(pred[..., z].T, levels=[0.5], colors="lime", linewidths=0.8)
            axes[row][1].plot(c["centroid_x"], c["centroid_y"], "+", color="yellow", markersize=12)
            prob = "" if np.isnan(c["mean_probability"]) else f", mean p {c['mean_probability']:.2f}"
            axes[row][1].set_title(f"z={z}: {c['voxels']} voxels{prob}", fontsize=9)
            for ax in axes[row]:
                ax.set_xticks([])
                ax.set_yticks([])
        fig.tight_layout()
        with atomic_write(out_png) as staged:
            fig.savefig(staged, dpi=90, format="png")
    plt.close(fig)
    return Path(out_png)
