"""Data-parallel helpers for training and inference launched by ``torchrun``.

``torchrun --nproc_per_node N -m slab.pipeline.cli train ...`` (or ``python -m torch.distributed.run``)
sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in each process; :func:`init_distributed` reads
them and joins the process group (``nccl`` on CUDA, ``gloo`` on CPU). Without them every
helper here is a no-op for a single process, so one code path serves both.

Training shards each *global* batch by rank (:func:`rank_batch`), which makes a run on N processes
with global batch B follow the same loss curve as one process with batch B. Inference over many
volumes takes ``shard_items(items, rank, world_size)``: every item goes to exactly one rank;
:func:`map_sharded` runs a function over the shards and gathers the results in item order.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist

from slab.core.errors import SlabError


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a data-parallel run (a single process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, logs and plots."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise SlabError(f"environment variable {name}: expected an integer, got {value!r}") from None


def dist_env() -> DistInfo:
    """The rank, world size and local rank ``torchrun`` put in the environment."""
    info = DistInfo(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))
    if info.world_size < 1 or not 0 <= info.rank < info.world_size:
        raise SlabError(f"environment RANK={info.rank}, WORLD_SIZE={info.world_size}: expected 0 <= RANK < WORLD_SIZE")
    return info


def init_distributed(device: str | torch.device = "cpu") -> DistInfo:
    """Join the process group when launched by ``torchrun`` with more than one process.

    The backend is ``nccl`` for CUDA and ``gloo`` for CPU. On CUDA each process takes the GPU of
    its ``LOCAL_RANK``. Returns the :class:`DistInfo` of this process.
    """
    info = dist_env()
    if not info.enabled:
        return info
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", rank=info.rank, world_size=info.world_size)
    return info


def cleanup_distributed() -> None:
    """Leave the process group if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def process_device(device: str | torch.device, info: DistInfo) -> torch.device:
    """The device this rank computes on: ``cuda:LOCAL_RANK`` for CUDA runs, else as given."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", info.local_rank if info.enabled else torch.cuda.current_device())
    return device


def shard_items(items: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """The items rank ``rank`` of ``world_size`` handles: every ``world_size``-th from ``rank``.

    The shards are disjoint and their union is ``items``; an item keeps its relative order.

    Example
    -------
    >>> shard_items(list("abcde"), 1, 2)
    ['b', 'd']
    """
    if world_size < 1:
        raise SlabError(f"world_size: expected at least 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise SlabError(f"rank: expected 0 <= rank < {world_size}, got {rank}")
    return list(items)[rank::world_size]


def rank_batch(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """This rank's contiguous part of a global batch of sample indices.

    The global batch size must be a multiple of ``world_size`` so that every rank computes the
    same number of samples and averaging gradients over ranks equals the global batch's gradient.
    """
    if len(indices) % world_size:
        raise SlabError(f"batch_size: the global batch {len(indices)} must be a multiple of the {world_size} processes")
    per_rank = len(indices) // world_size
    return list(indices[rank * per_rank : (rank + 1) * per_rank])


def all_reduce_mean(values: Sequence[float] | torch.Tensor, info: DistInfo) -> list[float]:
    """The mean over ranks of each value (the values themselves on one process)."""
    tensor = torch.as_tensor(values, dtype=torch.float64).flatten()
    if info.enabled:
        # gloo reduces CPU tensors; nccl needs them on this rank's GPU.
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        tensor = tensor.to(device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor = tensor / info.world_size
    return [float(v) for v in tensor.cpu()]


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op on one process)."""
    if info.enabled:
        dist.barrier()


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` on one process)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def map_sharded(fn, items: Sequence[Any], info: DistInfo) -> list[Any]:
    """``[fn(item) for item in items]`` with each item computed on one rank only.

    Every rank runs ``fn`` on its :func:`shard_items` share; the results are gathered to every
    rank in item order. Results travel between processes, so keep them small (metrics, paths of
    written outputs); on one process this is a plain loop.
    """
    mine = [(index, fn(item)) for index, item in shard_items(list(enumerate(items)), info.rank, info.world_size)]
    gathered = sorted((pair for part in gather_objects(mine, info) for pair in part), key=lambda pair: pair[0])
    return [result for _, result in gathered]
