"""Devices and mixed precision, chosen the same way by training and inference.

GPU when present, CPU otherwise, through the same code path; AMP only on CUDA (bfloat16 where the
GPU supports it, else float16). :func:`resolve_device` turns a user's ``--device`` into a
:class:`torch.device`, :func:`amp_dtype` picks the autocast dtype and :func:`autocast` is the
context the forward passes run in (a no-op on CPU or without AMP).

Example
-------
>>> device = resolve_device("cpu")
>>> dtype = amp_dtype(device, amp=True)  # None: no AMP on CPU
>>> with autocast(device, dtype):
...     y = torch.ones(2) * 2
>>> device.type, dtype, y.dtype
('cpu', None, torch.float32)
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from transforms.errors import SlabError


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to compute on.

    Parameters
    ----------
    device : ``None`` or ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``,
        ``"cuda:N"`` or a :class:`torch.device`.

    Raises
    ------
    SlabError
        CUDA asked for on a machine without it, or not a CPU or CUDA device.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise SlabError(f"--device: expected cpu, cuda or cuda:N, got {device!r}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SlabError("--device cuda: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise SlabError(f"--device: expected cpu, cuda or cuda:N, got {device!r}")
    return device


def amp_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """The autocast dtype: bfloat16 (float16 where bfloat16 is unsupported) on CUDA with
    ``amp``; None (float32) on CPU or without ``amp``."""
    if not amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device``; a no-op context when ``dtype`` is None."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


__all__ = ["resolve_device", "amp_dtype", "autocast"]
