"""Label maps: per-label 0/1 channels as one integer volume that viewers open as a segmentation.

A multi-label prediction is ``(L, X, Y, Z)`` binary channels. :func:`to_label_map` paints them
into one ``(1, X, Y, Z)`` uint8 (uint16 above 255) volume: channel ``i`` gets ``values[i]``
(default ``i + 1``), channels painted in ``order`` (default channel order), a later one over an
earlier one where they overlap. Nested regions become their classes this way, as nnU-Net's
``regions_class_order`` does: BraTS channels (TC, WT, ET) with values (1, 2, 4) painted in order
(WT, TC, ET) give edema 2, necrosis 1 and enhancing tumour 4.

:func:`segment_metadata` is 3D Slicer's ``.seg.nrrd`` header (segment names, colours, label
values, layers), so that a label map written as ``name.seg.nrrd`` opens in Slicer's Segment Editor
with its names; :func:`to_layers` keeps overlapping labels apart in layers as Slicer stores them;
numpy only.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from slab.core.errors import SlabError

# Distinct colours (RGB in [0, 1]) for segments without a colour of their own, cycled.
PALETTE = ((0.894, 0.102, 0.110), (0.216, 0.494, 0.722), (0.302, 0.686, 0.290), (0.596, 0.306, 0.639),
           (1.000, 0.498, 0.000), (1.000, 1.000, 0.200), (0.651, 0.337, 0.157), (0.969, 0.506, 0.749),
           (0.600, 0.600, 0.600), (0.400, 0.761, 0.647))


def check_label_map(spec, channels: int) -> dict:
    """``{"values": (..), "order": (..), "declared_order": bool}`` of a ``label_map`` setting
    (None or ``{"values": [...], "order": [...]}``) for ``channels`` output channels."""
    if spec is None:
        spec = {}
    if not isinstance(spec, Mapping):
        raise SlabError(f"label_map: expected an object with 'values' and/or 'order', got {spec!r}")
    unknown = sorted(set(spec) - {"values", "order"})
    if unknown:
        raise SlabError(f"label_map: unknown key {', '.join(unknown)}; expected values, order")
    values = spec.get("values", list(range(1, channels + 1)))
    if (not isinstance(values, Sequence) or isinstance(values, str) or len(values) != channels
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 1 <= v <= 65535 for v in values)
            or len(set(values)) != channels):
        raise SlabError(f"label_map values: expected {channels} distinct integers in 1..65535 "
                        f"(one per output channel), got {values!r}")
    order = spec.get("order", list(range(channels)))
    if (not isinstance(order, Sequence) or isinstance(order, str)
            or not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in order)
            or sorted(order) != list(range(channels))):
        raise SlabError(f"label_map order: expected the channel indices 0..{channels - 1} in painting order "
                        f"(a later one wins where they overlap), got {order!r}")
    return {"values": tuple(int(v) for v in values), "order": tuple(int(i) for i in order),
            "declared_order": "order" in spec}


def to_label_map(mask, values: Sequence[int], order: Sequence[int]) -> tuple[np.ndarray, int]:
    """``(label map (1, X, Y, Z), voxels in more than one channel)`` of a binary ``(L, X, Y, Z)``
    mask; uint8 when every value fits, else uint16."""
    mask = np.asarray(mask)
    if mask.ndim != 4 or mask.shape[0] != len(values):
        raise SlabError(f"mask: expected ({len(values)}, X, Y, Z) channels, got {mask.shape}")
    dtype = np.uint8 if max(values) <= 255 else np.uint16
    out = np.zeros(mask.shape[1:], dtype)
    count = np.zeros(mask.shape[1:], np.uint8) if mask.shape[0] > 1 else None
    for i in order:
        channel = mask[i] > 0
        out[channel] = values[i]
        if count is not None:
            count += channel
    overlaps = 0 if count is None else int(np.count_nonzero(count > 1))
    return out[None], overlaps


def to_layers(mask, values: Sequence[int]) -> tuple[np.ndarray, list[int]]:
    """``(layers (K, X, Y, Z), the layer of each channel)``: overlapping labels kept apart in
    3D Slicer's way of storing them. Channel ``i`` goes into the first layer where it overlaps no
    voxel already there, with value ``values[i]``; a channel that overlaps every layer opens a new
    one. Labels that never overlap share one layer (``K == 1``: a plain label map)."""
    mask = np.asarray(mask)
    if mask.ndim != 4 or mask.shape[0] != len(values):
        raise SlabError(f"mask: expected ({len(values)}, X, Y, Z) channels, got {mask.shape}")
    dtype = np.uint8 if max(values) <= 255 else np.uint16
    layers: list[np.ndarray] = []
    placed = []
    for i, value in enumerate(values):
        channel = mask[i] > 0
        layer = next((k for k, voxels in enumerate(layers) if not np.any(voxels[channel])), None)
        if layer is None:
            layers.append(np.zeros(mask.shape[1:], dtype))
            layer = len(layers) - 1
        layers[layer][channel] = value
        placed.append(layer)
    return np.stack(layers), placed


def from_label_map(label, values: Sequence[int]) -> np.ndarray:
    """The binary ``(L, X, Y, Z)`` uint8 channels of a label map (each value its own channel)."""
    label = np.asarray(label)
    label = label[0] if label.ndim == 4 else label
    return np.stack([label == v for v in values]).astype(np.uint8)


def segment_metadata(names: Sequence[str], values: Sequence[int], colors=None,
                     layers: Sequence[int] | None = None) -> dict[str, str]:
    """3D Slicer's ``.seg.nrrd`` fields: segment ``i`` is ``names[i]`` with label value
    ``values[i]`` in layer ``layers[i]`` (default 0: one label-map layer; see :func:`to_layers`)
    and ``colors[i]`` (RGB in [0, 1]; default :data:`PALETTE`)."""
    if len(names) != len(values):
        raise SlabError(f"segments: {len(names)} names for {len(values)} label values")
    layers = list(layers) if layers is not None else [0] * len(values)
    fields = {"Segmentation_MasterRepresentation": "Binary labelmap",
              "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
              "Segmentation_ReferenceImageExtentOffset": "0 0 0"}
    for i, (name, value) in enumerate(zip(names, values)):
        color = colors[i] if colors is not None else PALETTE[i % len(PALETTE)]
        fields.update({f"Segment{i}_ID": f"Segment_{value}", f"Segment{i}_Name": str(name),
                       f"Segment{i}_NameAutoGenerated": "0", f"Segment{i}_LabelValue": str(int(value)),
                       f"Segment{i}_Layer": str(int(layers[i])), f"Segment{i}_Color": " ".join(f"{c:g}" for c in color),
                       f"Segment{i}_ColorAutoGenerated": "0" if colors is not None else "1",
                       f"Segment{i}_Tags": "|"})
    return fields
