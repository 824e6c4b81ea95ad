"""3D sliding-window inference.

:func:`predict_3d` is MONAI's ``sliding_window_inference`` (Gaussian blending) followed by the
sigmoid; ``tta="flips"`` averages the probabilities of the eight flipped volumes, flipped back
(nnU-Net mirrors each window and averages logits; flipping the whole volume keeps the result
exactly flip-equivariant). An input smaller than the ROI is padded to the ROI and the output
cropped back (MONAI's own handling).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from tqdm.auto import tqdm

from slab.pipeline.inference.forward import (Forward, activate, as_float, check_choice, check_finite,
                                             fits_on, volume_meta)
from slab.core.checks import TTA_MODES_3D, positive_int
from slab.core.errors import SlabError
from slab.io.volumes import LazyVolume


def _flip_sets(tta: str) -> list[tuple[int, ...]]:
    if tta == "none":
        return [()]
    return [tuple(d for d, bit in zip((2, 3, 4), (a, b, c)) if bit)
            for a in (0, 1) for b in (0, 1) for c in (0, 1)]


def predict_3d(model: nn.Module, volume, *, roi_size, overlap: float = 0.5, mode: str = "gaussian",
               tta: str = "none", sw_batch_size: int = 4, device=None, amp: bool | str = True,
               progress: bool = False, compile: bool = False, out_path=None, out_dtype: str = "float16",
               memory_budget: int | None = None, preprocess=None, shard=None,
               activation: str = "sigmoid") -> torch.Tensor:
    """3D sliding-window inference (MONAI), sigmoid (or ``activation``), optional flip TTA.

    Parameters
    ----------
    model : a 3D network taking ``C`` channels; moved to ``device``, eval mode, in place.
    volume : ``(C, X, Y, Z)`` MetaTensor, tensor or numpy array (a LazyVolume is loaded).
    roi_size : ``(rx, ry, rz)`` window size (a multiple of the network's divisor). An input
        smaller than the ROI is padded to it and the output cropped back.
    overlap, mode : ``sliding_window_inference``'s window overlap and blending
        (``"gaussian"`` or ``"constant"``).
    tta : ``"none"`` or ``"flips"``: the mean probability over the 8 axis flips, flipped back.
    sw_batch_size : windows per forward pass.
    device, amp, progress, compile, activation : as in :func:`predict_2p5d`.
    out_path : a ``.zarr`` to predict into out of core (an OME-Zarr of ``out_dtype``, in the
        input's geometry): blocks of z slices within ``memory_budget`` bytes (default 1 GiB),
        each block's windows read, predicted and blended on their own, resumable after a kill
        and shared by the ranks of ``shard`` under ``torchrun``
        (:mod:`slab.pipeline.inference.window_blocks`). The volume (a LazyVolume too) is never
        held whole; ``preprocess`` normalises each block as read (default: cast to float32).
        The result equals the in-memory one to float rounding.

    Returns
    -------
    float32 ``(L, X, Y, Z)`` probabilities, a MetaTensor with the input's affine when it has one
    (with ``out_path``, a lazy volume over the store).

    Example
    -------
    >>> net = torch.nn.Conv3d(1, 1, 3, padding=1)
    >>> predict_3d(net, torch.rand(1, 10, 12, 8), roi_size=(8, 8, 8)).shape
    torch.Size([1, 10, 12, 8])
    """
    check_choice("tta", tta, TTA_MODES_3D)
    check_choice("mode", mode, ("gaussian", "constant"))
    roi = tuple(roi_size) if isinstance(roi_size, (list, tuple)) else None
    if roi is None or len(roi) != 3 or not all(isinstance(r, (int, np.integer)) and r > 0 for r in roi):
        raise SlabError(f"roi_size: expected three positive integers, got {roi_size!r}")
    if not 0 <= overlap < 1:
        raise SlabError(f"overlap: expected a fraction in [0, 1), got {overlap!r}")
    sw_batch_size = positive_int(sw_batch_size, "sw_batch_size")
    if len(volume.shape) != 4:
        raise SlabError(f"volume: expected shape (C, X, Y, Z), got {tuple(volume.shape)}")
    if out_path is not None:
        return _predict_3d_to_store(model, volume, roi, overlap, mode, tta, sw_batch_size, device, amp, progress,
                                    compile, out_path, out_dtype, memory_budget, preprocess, shard, activation)
    source = volume.load() if isinstance(volume, LazyVolume) else volume
    name = str(getattr(volume, "meta", {}).get("filename_or_obj") or "volume")
    forward = Forward(model, device, amp, compile, activation)
    with torch.inference_mode():
        x = as_float(source.as_tensor() if isinstance(source, MetaTensor) else source)
        check_finite(x, name)
        where = forward.device if fits_on(forward.device, 3 * x.numel() * 4) else torch.device("cpu")
        x = x.to(where)[None]
        flips = _flip_sets(tta)
        total = None
        for dims in tqdm(flips, disable=not progress or len(flips) == 1, desc="3D flips"):
            y = sliding_window_inference(x.flip(dims) if dims else x, [int(r) for r in roi], sw_batch_size, forward,
                                         overlap=overlap, mode=mode, sw_device=forward.device, device=where,
                                         progress=progress and len(flips) == 1)
            y = activate(y, forward.activation)
            y = y.flip(dims) if dims else y
            total = y if total is None else total.add_(y)
        if len(flips) > 1:
            total.div_(len(flips))
    affine, meta = volume_meta(volume)
    probs = total[0].cpu()
    return probs if affine is None else MetaTensor(probs, affine=affine, meta=meta)


def _predict_3d_to_store(model, volume, roi, overlap, mode, tta, sw_batch_size, device, amp, progress, compile,
                         out_path, out_dtype, memory_budget, preprocess, shard, activation="sigmoid"):
    from slab.pipeline.inference.multiplane import DEFAULT_MEMORY_BUDGET, OUT_DTYPES
    from slab.pipeline.inference.window_blocks import predict_3d_blocks

    check_choice("out_dtype", out_dtype, OUT_DTYPES)
    if not str(out_path).lower().endswith(".zarr"):
        raise SlabError(f"out_path: out-of-core 3D prediction writes a .zarr store, got {out_path}")
    if memory_budget is not None:
        memory_budget = positive_int(memory_budget, "memory_budget")
    preprocess = preprocess or as_float
    name = str(getattr(volume, "meta", {}).get("filename_or_obj") or "volume")
    forward = Forward(model, device, amp, compile, activation)
    flips = _flip_sets(tta)
    settings = {"tta": tta, "sw_batch_size": sw_batch_size, "amp": str(amp), "preprocess": preprocess}
    with torch.inference_mode(), tqdm(total=int(volume.shape[3]) * len(flips), disable=not progress, desc="3D",
                                      unit="slice") as bar:
        return predict_3d_blocks(forward, volume, roi=roi, overlap=float(overlap), mode=mode, flip_sets=flips,
                                 preprocess=preprocess, name=name, budget=memory_budget or DEFAULT_MEMORY_BUDGET,
                                 out_path=out_path, out_dtype=out_dtype, settings=settings, bar=bar, shard=shard)

