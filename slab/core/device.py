"""Devices and mixed precision, chosen the same way by training and inference.

GPU when present, CPU otherwise, through the same code path; AMP by default only on CUDA
(bfloat16 where the GPU supports it, else float16), and bfloat16 on a CPU with bfloat16
instructions when asked for (``precision="bf16"``: about 0.6x the fp32 time of the 2.5D UNet on
an AVX512-BF16 core, probabilities within about 2e-2; ``benchmarks/bench_precision.py``). :func:`resolve_device` turns a user's ``--device`` into a
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

from slab.core.errors import SlabError


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to compute on.

    Parameters
    ----------
    device : ``None`` or ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``,
        ``"cuda:N"``, ``"mps"`` (Apple GPUs, float32) or a :class:`torch.device`.

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
        raise SlabError(f"--device: expected cpu, cuda, cuda:N or mps, got {device!r}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SlabError("--device cuda: CUDA is not available on this machine")
    if device.type == "mps":  # Apple GPUs: float32 (no autocast), the same code path as CUDA
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise SlabError("--device mps: MPS (Apple GPU) is not available on this machine")
        return device
    if device.type not in ("cpu", "cuda"):
        raise SlabError(f"--device: expected cpu, cuda, cuda:N or mps, got {device!r}")
    return device


def cpu_supports_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (x86 ``avx512_bf16`` or ``amx_bf16``,
    Arm ``bf16``), read from ``/proc/cpuinfo``; False where that cannot be read. Without them
    oneDNN emulates bfloat16, slower than float32."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    except OSError:
        pass
    return False


def amp_dtype(device: torch.device, amp) -> torch.dtype | None:
    """The autocast dtype of ``amp`` on ``device``; None is float32.

    ``amp``: True or ``"auto"``: bfloat16 on CUDA (float16 where bfloat16 is unsupported),
    float32 on CPU; False or ``"fp32"``: float32; ``"bf16"``: bfloat16 on CUDA or on a CPU
    with bfloat16 instructions (:func:`cpu_supports_bf16`); ``"fp16"``: float16 on CUDA. A
    precision the device cannot do is a SlabError naming it."""
    if amp in (False, None, "fp32"):
        return None
    if amp is True or amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        raise SlabError(f"--precision {amp}: MPS runs in float32 here; use auto or fp32")
    if amp == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise SlabError("--precision bf16: this GPU has no bfloat16; use fp16 or fp32")
        if device.type == "cpu" and not cpu_supports_bf16():
            raise SlabError("--precision bf16: this CPU has no bfloat16 instructions (avx512_bf16, amx_bf16); "
                            "use fp32")
        return torch.bfloat16
    if amp == "fp16":
        if device.type != "cuda":
            raise SlabError("--precision fp16: CUDA only; on a CPU use bf16 or fp32")
        return torch.float16
    raise SlabError(f"precision: expected auto, fp32, bf16 or fp16, got {amp!r}")


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device``; a no-op context when ``dtype`` is None."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity, bounded by a cgroup CPU quota."""
    import os

    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max", encoding="ascii").read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def default_threads(workers: int = 0) -> int:
    """Threads that do not oversubscribe: ``OMP_NUM_THREADS`` when the user set it, else the
    available cores not already busy (the 1-minute load average), shared by ``workers`` loader
    processes; at least 1."""
    import os

    given = os.environ.get("OMP_NUM_THREADS", "")
    if given.isdigit() and int(given) > 0:
        return max(1, int(given) // (1 + max(0, workers)))
    cores = available_cores()
    try:
        busy = int(os.getloadavg()[0])
    except OSError:
        busy = 0
    free = max(1, cores - min(busy, cores - 1))
    return max(1, free // (1 + max(0, workers)))


def configure_threads(threads: int | None = None, workers: int = 0) -> int:
    """Set torch's intra-op threads to ``threads`` (None: :func:`default_threads`); returns it."""
    n = default_threads(workers) if threads is None else int(threads)
    if n < 1:
        raise SlabError(f"--threads: expected a positive integer, got {threads!r}")
    cores = available_cores()
    if threads is not None and n > cores:
        raise SlabError(f"--threads: {n} is more than the {cores} core(s) this process may use "
                        "(its CPU affinity and cgroup quota); more threads than cores only slow torch down")
    torch.set_num_threads(n)
    return n


_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4


def configure_allocator() -> bool:
    """Keep freed memory in the process (glibc ``mallopt``): no ``mmap`` for large blocks and no
    trimming of the heap, so that the per-batch activations and accumulators of inference and
    training reuse pages instead of mapping, faulting in and unmapping fresh ones every batch
    (a third to a half of all CPU time in the kernel on 256^3 and larger volumes). The memory a
    command peaks at stays with it until it exits, so the command line skips this set-up when a
    ``--memory-budget`` is given. ``SLAB_MALLOC=default`` leaves the allocator alone; non-glibc systems are left alone. Returns whether the settings were applied."""
    import ctypes
    import ctypes.util
    import os

    if os.environ.get("SLAB_MALLOC", "").lower() == "default":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_MAX, 0) == 1
    ok &= mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    ok &= mallopt(_M_TOP_PAD, 64 << 20) == 1
    return bool(ok)


__all__ = ["resolve_device", "cpu_supports_bf16", "amp_dtype", "autocast", "available_cores", "default_threads", "configure_threads",
           "configure_allocator"]
