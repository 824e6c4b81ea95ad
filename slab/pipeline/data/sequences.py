"""Slice sequences, the input of the slice-sequence classifier (training, validation and inference
build them the same way).

:func:`volume_sequences` turns a volume and an optional label of target values ``1..N`` into one
sequence of ``n_slabs`` slabs per target present in the label — slab centres
(:func:`slab_centres`) evenly over the slices the target spans along the plane's normal, cropped
in-plane to the target's box and resized (:func:`build_sequence`) — or, without a label, one
sequence over the whole volume (target ``patient_overall``). :func:`study_sequences` adds a
datalist item's study id and targets for training.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from slab.core.errors import SlabError
from slab.transforms.slabs import extract_slab, plane_axis


OVERALL = "patient_overall"


def slab_centres(z_lo: int, z_hi: int, n: int) -> np.ndarray:
    """``n`` slice indices evenly spaced over ``[z_lo, z_hi]`` (inclusive), rounded.

    >>> slab_centres(0, 28, 5).tolist()
    [0, 7, 14, 21, 28]
    """
    if n == 1:
        return np.array([int(round((z_lo + z_hi) / 2))])
    return np.rint(np.linspace(z_lo, z_hi, n)).astype(np.int64)


def _bbox(mask: np.ndarray, margin: float) -> tuple[slice, slice]:
    """In-plane bounding box ``(H, W)`` of a 2D mask, grown by ``margin`` of its size per side."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    h0, h1, w0, w1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    dh, dw = int(round((h1 - h0) * margin)), int(round((w1 - w0) * margin))
    return (slice(max(0, h0 - dh), min(mask.shape[0], h1 + dh)), slice(max(0, w0 - dw), min(mask.shape[1], w1 + dw)))


def build_sequence(image: np.ndarray, centres: np.ndarray, plane: str, offsets, size, box=None) -> torch.Tensor:
    """``(N, C*k, H, W)`` float16: the slab at each centre slice, cropped to ``box`` (in-plane
    slices) and resized (bilinear) to ``size``."""
    slabs = []
    for z in centres:
        slab = extract_slab(image, plane=plane, index=int(z), offsets=offsets)
        slab = torch.from_numpy(np.ascontiguousarray(slab, dtype=np.float32))
        if box is not None:
            slab = slab[:, box[0], box[1]]
        slabs.append(F.interpolate(slab[None], size=tuple(size), mode="bilinear", align_corners=False)[0])
    return torch.stack(slabs).to(torch.float16)


def volume_sequences(image: np.ndarray, label: np.ndarray | None = None, *, targets: Sequence[str] = (),
                     n_slabs: int, offsets, plane: str, size, crop_margin: float = 0.1) -> list[dict]:
    """The slice sequences of one volume: ``[{"target", "slices", "slabs"}]``.

    Parameters
    ----------
    image : (C, X, Y, Z) float array, normalised.
    label : (1, X, Y, Z) array of target values, optional
        Value ``i + 1`` is ``targets[i]``. Each target present gets one sequence: ``n_slabs``
        slab centres evenly over the slices it spans along ``plane``'s normal, every slab
        cropped to the target's in-plane box (grown by ``crop_margin`` of its size per side).
        Targets absent from the label get none. Without a label: one sequence over every slice
        of the whole volume, target ``"patient_overall"``.
    targets : names of the label values ``1..N`` (needed with a label).
    n_slabs, offsets, plane, size : slabs per sequence, slab offsets, plane, ``(H, W)``.

    Returns
    -------
    list of dict
        ``target`` (name), ``slices`` (int64 ``(n_slabs,)``, the centre slice of each slab)
        and ``slabs`` (float16 ``(n_slabs, C*k, H, W)``, :func:`build_sequence`).
    """
    axis = plane_axis(plane)
    if label is None:
        centres = slab_centres(0, image.shape[axis + 1] - 1, n_slabs)
        return [{"target": OVERALL, "slices": centres, "slabs": build_sequence(image, centres, plane, offsets, size)}]
    label = np.asarray(label)
    if label.ndim != 4 or label.shape[0] != 1 or label.shape[1:] != image.shape[1:]:
        raise SlabError(f"label: expected a one-channel (1, X, Y, Z) label of target values matching the image's "
                        f"{tuple(image.shape[1:])}, got shape {tuple(label.shape)}")
    if not targets:
        raise SlabError("targets: a label needs the names of its values 1..N (e.g. C1..C7)")
    out = []
    for i, name in enumerate(targets):
        mask = label[0] == i + 1
        along = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        if along.size == 0:
            continue  # this volume's label does not show the target: no sequence for it
        box = _bbox(mask.any(axis=axis), crop_margin)
        centres = slab_centres(int(along[0]), int(along[-1]), n_slabs)
        out.append({"target": name, "slices": centres,
                    "slabs": build_sequence(image, centres, plane, offsets, size, box)})
    return out


def study_sequences(item: dict, image: np.ndarray, label: np.ndarray | None, names: list[str], cfg: dict) -> list[dict]:
    """The training sequences of one study (:func:`volume_sequences` with the training config's
    ``classification`` settings and ``offsets``), each with the study id and its target ``y``
    from the item's ``targets``. The whole-volume sequence of an unlabelled study is scored
    against ``patient_overall`` (or, lacking it, whether any target is positive: target ``any``).
    """
    c = cfg["classification"]
    targets = item.get("targets")
    if not isinstance(targets, dict) or not targets:
        raise SlabError(f"{item['image']}: datalist item without 'targets' (e.g. {{\"C1\": 0, ...}})")
    if label is not None:
        for name in names:
            if name not in targets:
                raise SlabError(f"{item['image']}: targets lack {name!r} (datalist labels: {', '.join(names)})")
    sequences = volume_sequences(image, label, targets=names, n_slabs=c["n_slabs"], offsets=cfg["offsets"],
                                 plane=c["plane"], size=c["image_size"], crop_margin=c["crop_margin"])
    study = str(item.get("id", item["image"]))
    out = []
    for seq in sequences:
        target, y = seq["target"], None
        if label is None and OVERALL not in targets:
            target, y = "any", float(max(float(v) for v in targets.values()))
        out.append({"study": study, "target": target, "y": float(targets[target]) if y is None else y,
                    "slabs": seq["slabs"]})
    return out



__all__ = ["OVERALL", "slab_centres", "build_sequence", "volume_sequences", "study_sequences"]
