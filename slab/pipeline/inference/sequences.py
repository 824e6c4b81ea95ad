"""Scoring with the slice-sequence classifier.

:func:`predict_sequences` scores a volume with the slice-sequence classifier: the sequences of
slabs of each target (or of the whole volume) are built as training builds them
(:func:`slab.pipeline.data.sequences.volume_sequences`) and :func:`score_sequences` gives the sigmoid of
both heads, per sequence and per slice.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
from monai.data import MetaTensor

from slab.pipeline.data.sequences import volume_sequences
from slab.core.device import amp_dtype, autocast, resolve_device
from slab.pipeline.inference.forward import as_float, check_finite
from slab.core.checks import positive_int
from slab.core.errors import SlabError
from slab.transforms.slabs import check_offsets


def score_sequences(model: nn.Module, sequences: Sequence[torch.Tensor], *, batch_size: int = 8, device=None,
                    amp: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Both heads of a slice-sequence classifier, as probabilities, over sequences of slabs.

    Parameters
    ----------
    model : :class:`slab.networks.SliceSequenceClassifier` (or a module with its forward). Moved to
        ``device`` and put in eval mode in place.
    sequences : ``(N, C*k, H, W)`` tensors of one shape (float16 as
        :func:`slab.pipeline.data.sequences.build_sequence` builds them, or float32); ``batch_size`` of them
        per forward pass.
    device, amp : see :func:`predict_2p5d`.

    Returns
    -------
    (sequence, slices) : float32 CPU tensors
        The sigmoid of the sequence head, ``(S, L)``, and of the slice head, ``(S, N)`` (one
        output channel) or ``(S, N, L)``, for the ``S`` sequences in order.
    """
    batch_size = positive_int(batch_size, "batch_size")
    device = resolve_device(device)
    model = model.to(device).eval()
    dtype = amp_dtype(device, amp)
    sequence_probs, slice_probs = [], []
    with torch.inference_mode():
        for start in range(0, len(sequences), batch_size):
            x = torch.stack([torch.as_tensor(s) for s in sequences[start:start + batch_size]])
            x = x.to(device, non_blocking=True).float()
            with autocast(device, dtype):
                # both heads, also of a bundle's network_def (SliceLogits, whose forward gives one)
                slice_logits, sequence_logits = model.logits(x) if hasattr(model, "logits") else model(x)
            sequence_probs.append(sequence_logits.float().sigmoid().cpu())
            slice_probs.append(slice_logits.float().sigmoid().cpu())
    if not sequence_probs:
        return torch.empty(0, 1), torch.empty(0, 0)
    return torch.cat(sequence_probs), torch.cat(slice_probs)


def predict_sequences(model: nn.Module, volume, label=None, *, n_slabs: int = 15, offsets=(-1, 0, 1),
                      plane: str = "xy", size=(128, 128), targets: Sequence[str] = (), crop_margin: float = 0.1,
                      batch_size: int = 8, device=None, amp: bool = True) -> dict[str, dict]:
    """Score a volume with a slice-sequence classifier, per target.

    The sequences are built as for training (:func:`slab.pipeline.data.sequences.volume_sequences`): with a
    ``label`` of target values ``1..N`` (``targets`` names them), one sequence of ``n_slabs``
    slabs over each target present, cropped to its in-plane box; without one, one sequence over
    the whole volume, target ``"patient_overall"``. :func:`score_sequences` runs the network.

    Parameters
    ----------
    model : :class:`slab.networks.SliceSequenceClassifier`, moved to ``device`` and put in eval mode.
    volume : ``(C, X, Y, Z)`` array, tensor or MetaTensor, normalised as for training.
    label : ``(1, X, Y, Z)`` target values (e.g. a vertebra segmentation), optional.
    n_slabs, offsets, plane, size, crop_margin : the sequences: slabs per sequence, slab
        offsets, the plane of the slabs, their ``(H, W)`` after resizing, the box margin.
    targets : names of the label values ``1..N`` (needed with a label).
    batch_size : sequences per forward pass.
    device, amp : see :func:`predict_2p5d`.

    Returns
    -------
    dict
        ``{target: {"probability", "slice_probabilities", "slices"}}`` in target order: the
        sequence head's sigmoid (a float for a one-output network, else an ``(L,)`` array),
        the slice head's sigmoid (float32 ``(n_slabs,)``, or ``(n_slabs, L)``) and the centre
        slice of each slab (int64 ``(n_slabs,)``).
    """
    if len(volume.shape) != 4:
        raise SlabError(f"volume: expected shape (C, X, Y, Z), got {tuple(volume.shape)}")
    n_slabs = positive_int(n_slabs, "n_slabs")
    if len(size) != 2 or not all(isinstance(v, (int, np.integer)) and v > 0 for v in size):
        raise SlabError(f"size: expected two positive integers (H, W), got {size!r}")
    name = str(getattr(volume, "meta", {}).get("filename_or_obj") or "volume")
    image = as_float(volume.as_tensor() if isinstance(volume, MetaTensor) else volume)
    check_finite(image, name)
    label = None if label is None else np.asarray(label)
    sequences = volume_sequences(image.cpu().numpy(), label, targets=list(targets), n_slabs=n_slabs,
                                 offsets=check_offsets(offsets), plane=plane, size=size, crop_margin=crop_margin)
    probs, slice_probs = score_sequences(model, [s["slabs"] for s in sequences], batch_size=batch_size,
                                         device=device, amp=amp)
    return {s["target"]: {"probability": float(p[0]) if p.numel() == 1 else p.numpy(),
                          "slice_probabilities": q.numpy(), "slices": s["slices"]}
            for s, p, q in zip(sequences, probs, slice_probs)}

