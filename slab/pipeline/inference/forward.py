"""The network on its device, and the argument checks both inference engines share.

Devices: CUDA when present (AMP in bfloat16 where supported, else float16; ``channels_last``;
pinned-memory, non-blocking copies when the volume stays on the host), CPU otherwise, through
the same code. Everything runs under ``torch.inference_mode``. The model is moved to the
device and put in eval mode in place.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.data import MetaTensor

from slab.core.device import amp_dtype, autocast, resolve_device
from slab.core.checks import PLANES
from slab.core.errors import SlabError
from slab.io.volumes import LazyVolume
from slab.transforms.slabs import PLANE_AXIS


def check_planes(planes) -> tuple[str, ...]:
    """Planes as a tuple of names; a string may list them with commas (``"xy,zx"``)."""
    if isinstance(planes, str):
        items = planes.split(",")
    elif isinstance(planes, (list, tuple)):
        items = list(planes)
    else:
        raise SlabError(f"planes: expected a list of xy, zx, zy, got {planes!r}")
    if not all(isinstance(p, str) for p in items):
        raise SlabError(f"planes: expected a list of xy, zx, zy, got {planes!r}")
    items = tuple(p.strip() for p in items)
    if not items or not all(items):
        raise SlabError(f"planes: expected a list of xy, zx, zy, got {planes!r}")
    for plane in items:
        if plane not in PLANE_AXIS:
            raise SlabError(f"planes: unknown plane {plane!r}; expected any of {', '.join(PLANES)}")
    if len(set(items)) != len(items):
        raise SlabError(f"planes: a plane is listed twice in {', '.join(items)}")
    return items


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise SlabError(f"{name}: expected one of {', '.join(choices)}, got {value!r}")
    return value




def fits_on(device: torch.device, nbytes: int) -> bool:
    """Whether ``nbytes`` of volume and accumulators can stay on ``device`` (half its free memory)."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return 2 * nbytes <= free


def check_finite(block: torch.Tensor, name: str) -> None:
    low, high = torch.aminmax(block)  # one pass; NaN propagates
    if not (torch.isfinite(low) and torch.isfinite(high)):
        raise SlabError(f"{name}: contains NaN or Inf; expected finite intensities")


def as_float(block) -> torch.Tensor:
    return torch.as_tensor(block).to(torch.float32)


ACTIVATIONS = ("sigmoid", "softmax")


def activate(logits: torch.Tensor, activation: str) -> torch.Tensor:
    """Probabilities of ``(B, L, ...)`` logits, in place where it can: ``sigmoid``, each label
    on its own (overlapping labels, regions), or ``softmax`` over exclusive classes, the
    background logit fixed at 0 (the parametrisation :class:`slab.pipeline.training.losses.DiceCE`
    trains): ``p_i = exp(l_i) / (1 + sum_j exp(l_j))``, the background's probability what is left.
    With one label both are the same sigmoid."""
    if activation == "sigmoid" or logits.shape[1] == 1:
        return logits.sigmoid_()
    if activation != "softmax":
        raise SlabError(f"activation: expected one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    background = torch.zeros_like(logits[:, :1])
    return torch.softmax(torch.cat([background, logits], dim=1), dim=1)[:, 1:]


class Forward:
    """``model`` in eval mode on ``device``: autocast to ``amp``'s dtype (:func:`amp_dtype`),
    channels_last on CUDA, float32 logits out; ``activation`` (:func:`activate`) names how its
    logits become probabilities, for the engines that blend logits or probabilities.

    ``compile``: run the model through ``torch.compile``; where compiling fails (no C++
    compiler, an unsupported layer) the first call falls back to the model as it is, silently
    but for a SlabWarning, and the result is the same; after a first compiled call succeeds,
    errors are raised as they are. Compiling costs tens of seconds per input
    shape on a CPU (once per plane and batch size), repaid on large volumes only.
    """

    def __init__(self, model: nn.Module, device, amp, compile: bool = False, activation: str = "sigmoid"):
        if activation not in ACTIVATIONS:
            raise SlabError(f"activation: expected one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        self.activation = activation
        self.device = resolve_device(device)
        self.cuda = self.device.type == "cuda"
        self.model = model.to(self.device).eval()
        self.dtype = amp_dtype(self.device, amp)
        self.compiled, self._compiled_ran = None, False
        if compile:
            try:
                self.compiled = torch.compile(self.model)
            except Exception as err:  # noqa: BLE001 - any failure means: run eagerly
                self._fall_back(err)

    def _fall_back(self, err: Exception) -> None:
        import warnings

        from slab.core.errors import SlabWarning

        self.compiled = None
        warnings.warn(f"torch.compile is unavailable here ({type(err).__name__}: {str(err).splitlines()[0][:120]}); "
                  "running the network uncompiled", SlabWarning, stacklevel=3)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        if self.compiled is not None:
            if self._compiled_ran:  # compiled and ran once: later errors are the model's own
                return self.compiled(x)
            try:
                y = self.compiled(x)
                self._compiled_ran = True
                return y
            except Exception as err:  # noqa: BLE001 - a compile failure surfaces at the first call
                self._fall_back(err)
        return self.model(x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x)
        if self.cuda:
            if x.device.type == "cpu":
                x = x.pin_memory().to(self.device, non_blocking=True)
            x = x.contiguous(memory_format=torch.channels_last if x.ndim == 4 else torch.channels_last_3d)
        with autocast(self.device, self.dtype):
            y = self._run(x)
        return y.float()


def volume_meta(volume) -> tuple:
    """``(affine, meta)`` of a MetaTensor or LazyVolume, else ``(None, None)``."""
    if isinstance(volume, MetaTensor):
        return volume.affine, {k: v for k, v in volume.meta.items() if k != "affine"}
    if isinstance(volume, LazyVolume):
        return torch.as_tensor(volume.affine), dict(volume.meta)
    return None, None

