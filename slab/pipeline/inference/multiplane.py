"""Multi-plane 2.5D inference with test-time augmentation, also for volumes larger than memory.

:func:`predict_2p5d` runs a slab (2.5D) network over every slice of each requested plane
(``xy``, ``zx``, ``zy``), pads each batch to the network's divisor, takes the sigmoid, puts each
prediction back in the volume's orientation and averages over planes and test-time
augmentations (TTA):

- ``"flips"``: the eight flips of the three volume axes. Per plane these are the four flips of
  the 2D image and, along the slab's own axis, the negated offsets (for centred offsets, the
  slab's channels reversed within each image channel's block of k). Flipping the volume, then
  predicting, then flipping back is the same computation as predicting on one of these views, so
  the average over the eight is exactly flip-equivariant: ``predict(flip(v)) == flip(predict(v))``
  up to float rounding.
- ``"full"``: the flips and, in every plane, the transposed image too: with the flips, the four
  90° rotations and four mirrorings of the plane, 16 views per plane with the slab-axis flip.
  With all three planes of a cube, the result is also equivariant to 90° rotations and axis
  swaps of the volume (they permute the views and the planes). A non-square plane's transposed
  image is ``W x H``; it is padded to the divisor on its own and cropped back like any other,
  so non-square planes get the same 16 views (no resampling, nothing cropped).

Volumes larger than memory: when the input is a :class:`~slab.io.volumes.LazyVolume`, when
``out_path`` is given, or when the float32 input plus accumulators would pass
``memory_budget`` bytes, :func:`predict_2p5d` reads the volume in blocks of slices along each
plane's axis (plus the slabs' halo), predicts a block at a time, and accumulates into ``.npy``
files in a temporary directory (``TMPDIR``; put it on a disk), or, for an ``out_path`` ending in
``.zarr``, into per-plane zarr arrays beside it, resumable after a kill
(:mod:`slab.pipeline.inference.store`), finished into an OME-Zarr image returned as a lazy
volume. Otherwise the result is an ``.npy`` file of
``out_dtype`` (default float16), shape ``(L, X, Y, Z)`` in Fortran order (x fastest, as loaded
volumes), returned as a MetaTensor over its memory map. The budget is a target for the blocks
and batch buffers (the network's activations are not counted); a block holds at least one
batch, and always a whole number of batches so that the network sees the same batches as in
memory. The sums are float32 and are added in the same order as in memory, so a float32 result
is bit-identical to the in-memory one and a float16 result is the in-memory result rounded to
float16 (at most 2**-11 relative error).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from monai.data import MetaTensor
from tqdm.auto import tqdm

from slab.networks import padded_size
from slab.pipeline.inference.forward import (
    Forward,
    activate,
    as_float,
    check_choice,
    check_finite,
    check_planes,
    fits_on,
    volume_meta,
)
from slab.pipeline.inference.ondisk import DiskSink, fortran_empty
from slab.core.checks import PLANES, TTA_MODES, positive_int
from slab.core.errors import SlabError
from slab.core.outputs import atomic_write
from slab.io.volumes import LazyVolume
from slab.core.outputs import temp_dir
from slab.transforms.slabs import PLANE_AXIS, check_offsets, iter_slab_batches, pad_to_divisor, unpad


OUT_DTYPES = ("float16", "float32")


# Working memory for a LazyVolume when no memory_budget is given.
DEFAULT_MEMORY_BUDGET = 1 << 30


def _views(tta: str) -> list[tuple[bool, tuple[int, ...]]]:
    flips = [()] if tta == "none" else [(), (-2,), (-1,), (-2, -1)]
    transposes = (False, True) if tta == "full" else (False,)
    return [(t, dims) for t in transposes for dims in flips]


def _predict_view(forward: Forward, slabs: torch.Tensor, view, size) -> torch.Tensor:
    """Probabilities of the network (:func:`~slab.pipeline.inference.forward.activate`) on one view
    of ``slabs``, mapped back: ``(B, L, H, W)``.
    ``size`` is ``(divisor, min_size)``: each image is padded to both and cropped back."""
    transpose, dims = view
    x = slabs.transpose(-2, -1) if transpose else slabs
    x = x.flip(dims) if dims else x
    x, pads = pad_to_divisor(x, size[0], min_size=size[1])
    y = unpad(forward(x), pads)
    y = y.flip(dims) if dims else y
    y = y.transpose(-2, -1) if transpose else y
    return activate(y, forward.activation)


def slab_groups(block: torch.Tensor, plane: str, offset_sets, batch_size: int, start: int, stop: int):
    """``(indices, [slabs per offset set])`` for the batches of slices ``start:stop`` of ``plane``.

    The block is copied once with the plane's axis first after the channels, so that every
    slab is a run of whole contiguous slices (a volume loaded x-fastest, as NIfTI gives it, would
    otherwise be gathered element by element for the zx and zy planes). The negated offsets of
    the slab-axis flip are, for centred offsets, the slabs' channels reversed within each image
    channel: they are derived from the first set's slabs instead of being gathered again.
    """
    axis = PLANE_AXIS[plane]
    channels = block.shape[0]
    plane_first = block.movedim(axis + 1, 1).contiguous()  # (C, n, A, B): slices of the plane contiguous
    first = offset_sets[0]
    mirrored = len(offset_sets) == 2 and tuple(offset_sets[1]) == tuple(reversed(first))
    sets = offset_sets[:1] if mirrored else offset_sets
    batches = [iter_slab_batches(plane_first, "zy", offsets, batch_size, start, stop) for offsets in sets]
    for group in zip(*batches):
        slabs = [s for _, s in group]
        if mirrored:
            b, _, h, w = slabs[0].shape
            slabs.append(slabs[0].reshape(b, channels, len(first), h, w).flip(2).reshape(b, -1, h, w))
        yield group[0][0], slabs


def _predict_slices(forward, block, plane, offset_sets, views, size, batch_size, start, stop, target, first, bar):
    """Predict slices ``start:stop`` of ``block`` in ``plane``; write (``first``) or add the sum
    over the views into ``target``, whose slice 0 along the plane's axis is ``start``."""
    axis = PLANE_AXIS[plane]
    for indices, group in slab_groups(block, plane, offset_sets, batch_size, start, stop):
        total = None
        for slabs in group:
            for view in views:
                probs = _predict_view(forward, slabs, view, size)
                total = probs if total is None else total.add_(probs)
        dest = target.narrow(axis + 1, int(indices[0]) - start, len(indices))
        total = total.to(dest.device).movedim(0, axis + 1)
        if first:
            dest.copy_(total)
        else:
            dest.add_(total)
        bar.update(len(indices))


def _read_block(volume, axis: int, start: int, stop: int, preprocess: Callable, name: str) -> torch.Tensor:
    """Slices ``start:stop`` along spatial ``axis`` (of a plain tensor, numpy array or
    LazyVolume) as a float32 tensor, checked for NaN and Inf."""
    box = [(0, int(n)) for n in volume.shape[1:]]
    box[axis] = (start, stop)
    return read_box(volume, box, preprocess, name)


def read_box(volume, box, preprocess: Callable, name: str) -> torch.Tensor:
    """The voxels of ``box = ((x0, x1), (y0, y1), (z0, z1))`` of a plain tensor, numpy array or
    LazyVolume, through ``preprocess``, as a float32 tensor checked for NaN and Inf."""
    raw = volume
    if isinstance(volume, LazyVolume) or any((a, b) != (0, n) for (a, b), n in zip(box, volume.shape[1:])):
        raw = volume[(slice(None),) + tuple(slice(a, b) for a, b in box)]
    block = preprocess(torch.from_numpy(raw) if isinstance(raw, np.ndarray) else raw)
    block = block.as_tensor() if isinstance(block, MetaTensor) else block
    check_finite(block, name)
    return block


def _slices_per_block(budget: int, volume_shape, axis: int, labels: int, itemsize: int, batch_size: int,
                      k: int, halo: int) -> int:
    """How many slices along ``axis`` one block may hold within ``budget`` bytes.

    A whole number of batches (at least one), so that every batch holds the same slices as in
    memory and the network sees identical inputs.
    """
    channels, spatial = volume_shape[0], volume_shape[1:]
    area = int(np.prod(spatial)) // spatial[axis]
    per_slice = area * (channels * (4 + itemsize) + labels * 4)  # raw read, float block, sums
    per_batch = batch_size * area * 4 * (3 * channels * k + 4 * labels)  # slabs, views, outputs
    slices = (budget - per_batch) // per_slice - 2 * halo
    return min(spatial[axis], max(batch_size, slices // batch_size * batch_size))


def predict_2p5d(model: nn.Module, volume, *, planes=PLANES, offsets=(-1, 0, 1), tta: str = "none",
                 batch_size: int = 8, device=None, amp: bool | str = True, divisor=None, min_size=None,
                 memory_budget: int | None = None, out_path=None, out_dtype: str = "float16",
                 preprocess: Callable | None = None, progress: bool = False, compile: bool = False,
                 shard=None, activation: str = "sigmoid") -> torch.Tensor:
    """Multi-plane 2.5D inference, averaged over planes and test-time augmentations.

    Parameters
    ----------
    model : torch.nn.Module
        A 2D network taking ``C*k`` channels (slabs, channel-major, see ``slab.transforms.slabs``) and
        giving ``L`` logits. Moved to ``device`` and set to eval mode in place.
    volume : ``(C, X, Y, Z)`` MetaTensor, torch tensor, numpy array or LazyVolume
        Normalised intensities (or raw ones with ``preprocess``).
    planes : planes to predict in and average, any of ``"xy"``, ``"zx"``, ``"zy"``.
    offsets : slab slice offsets, e.g. ``(-1, 0, 1)``.
    tta : ``"none"``, ``"flips"`` (8 views per plane) or ``"full"`` (16; see the module docs).
    batch_size : slabs per forward pass.
    device : ``"cpu"``, ``"cuda"``...; default CUDA when available.
    amp : True: autocast on CUDA (bfloat16 where supported, else float16), float32 on CPU;
        or a precision, ``"fp32"``, ``"bf16"`` (CUDA, or a CPU with bfloat16 instructions),
        ``"fp16"`` (CUDA): see :func:`slab.core.device.amp_dtype`.
    compile : run the network through ``torch.compile`` (falls back to eager where it fails).
    activation : ``"sigmoid"`` (labels on their own) or ``"softmax"`` (exclusive classes, the
        background logit 0): :func:`slab.pipeline.inference.forward.activate`.
    divisor : int, optional
        The network's input size multiple (``slab.networks.network_divisor``); images are padded up
        to it and cropped back.
    min_size : int, optional
        The network's smallest input size (``slab.networks.network_min_size``; default twice the
        divisor, where the deepest feature map is two voxels wide): smaller images (a one-slice
        volume's zx plane, say) are padded up to it.
    memory_budget : int, optional
        Bytes of working memory. When the float32 input and accumulators would pass it (or the
        input is a LazyVolume: default 1 GiB), blocks of slices are read on demand and sums
        accumulate on disk.
    out_path : path, optional
        Write the result to this ``.npy`` (Fortran order, ``out_dtype``) through the on-disk path,
        or to this ``.zarr`` (OME-Zarr with a pyramid, in the input's geometry): sums go to
        ``<out_path>.partial/`` block by block and a re-run of the same prediction resumes there.
    out_dtype : ``"float16"`` or ``"float32"``, the dtype of an on-disk result.
    preprocess : callable, optional
        Applied to every block of the volume as read, ``(C, ...)`` tensor → float32 tensor
        (e.g. the intensity scaling of a lazy volume); default: cast to float32.
    progress : show a progress bar over slices.
    shard : :class:`~slab.core.distributed.DistInfo`, optional
        With a zarr ``out_path``, under ``torchrun`` (the process group joined): the ranks that
        share this volume; each predicts every ``world_size``-th block into the shared store and
        rank 0 finishes it (every rank returns the result).

    Returns
    -------
    ``(L, X, Y, Z)`` probabilities: float32 in memory, or ``out_dtype`` over a memory-mapped
    ``.npy`` on the on-disk path (a lazy volume over the ``.zarr`` output for a zarr ``out_path``). A MetaTensor with the input's affine and meta when the input
    has them (MetaTensor or LazyVolume).

    Raises
    ------
    SlabError
        Unknown plane or TTA, bad offsets, NaN or Inf in the input.

    Example
    -------
    >>> net = torch.nn.Conv2d(3, 1, 3, padding=1)
    >>> predict_2p5d(net, torch.rand(1, 8, 8, 8), tta="flips").shape
    torch.Size([1, 8, 8, 8])
    """
    planes = check_planes(planes)
    offsets = check_offsets(offsets)
    check_choice("tta", tta, TTA_MODES)
    check_choice("out_dtype", out_dtype, OUT_DTYPES)
    batch_size = positive_int(batch_size, "batch_size")
    if len(volume.shape) != 4:
        raise SlabError(f"volume: expected shape (C, X, Y, Z), got {tuple(volume.shape)}")
    preprocess = preprocess or as_float
    source = volume.as_tensor() if isinstance(volume, MetaTensor) else volume
    forward = Forward(model, device, amp, compile, activation)
    divisor = 1 if divisor is None else positive_int(divisor, "divisor")
    min_size = (1 if divisor == 1 else 2 * divisor) if min_size is None else positive_int(min_size, "min_size")
    size = (divisor, min_size)
    views = _views(tta)
    offset_sets = (offsets,) if tta == "none" else (offsets, tuple(-o for o in offsets))
    count = len(planes) * len(offset_sets) * len(views)
    shape = tuple(int(s) for s in volume.shape)
    voxels = int(np.prod(shape[1:]))
    name = str(getattr(volume, "meta", {}).get("filename_or_obj") or "volume")
    total_slices = sum(shape[PLANE_AXIS[p] + 1] for p in planes)

    with torch.inference_mode():
        axis = PLANE_AXIS[planes[0]]
        labels = _count_labels(forward, shape[0] * len(offsets), [n for a, n in enumerate(shape[1:]) if a != axis],
                               size)
        lazy = isinstance(volume, LazyVolume)
        budget = memory_budget if memory_budget is not None else (DEFAULT_MEMORY_BUDGET if lazy else None)
        in_memory = not lazy and out_path is None and (budget is None or (shape[0] + labels) * voxels * 4 <= budget)
        with tqdm(total=total_slices, disable=not progress, desc="2.5D", unit="slice") as bar:
            if in_memory:
                probs = _predict_in_memory(forward, source, planes, offset_sets, views, size, batch_size,
                                           labels, count, preprocess, name, bar)
            elif out_path is not None and str(out_path).lower().endswith(".zarr"):
                return _predict_to_store(forward, volume, planes, offset_sets, views, size, batch_size, labels,
                                         count, preprocess, name, bar, budget or DEFAULT_MEMORY_BUDGET, out_path,
                                         out_dtype, {"offsets": list(offsets), "tta": tta, "divisor": divisor,
                                                     "min_size": min_size, "amp": str(amp), "preprocess": preprocess,
                                                     "activation": activation},
                                         shard)
            else:
                probs = _predict_on_disk(forward, source, planes, offset_sets, views, size, batch_size, labels,
                                         count, preprocess, name, bar, budget or DEFAULT_MEMORY_BUDGET, out_path,
                                         out_dtype)
    affine, meta = volume_meta(volume)
    return probs if affine is None else MetaTensor(probs, affine=affine, meta=meta)


def _count_labels(forward: Forward, channels: int, image_shape, size) -> int:
    """The network's output channels, from one blank slab of the first plane's padded size (the
    volume is not read); a network that cannot run on it is a configuration error."""
    h, w = (padded_size(n, *size) for n in image_shape)
    try:
        return int(forward(torch.zeros(1, channels, h, w)).shape[1])
    except (RuntimeError, ValueError, IndexError) as err:
        raise SlabError(f"network: does not run on a {channels}-channel {h}x{w} input "
                        f"({' '.join(str(err).split())[:200]})") from None


def _predict_in_memory(forward, volume, planes, offset_sets, views, size, batch_size, labels, count, preprocess,
                       name, bar) -> torch.Tensor:
    shape = tuple(int(s) for s in volume.shape)
    voxels = int(np.prod(shape[1:]))
    where = forward.device if fits_on(forward.device, (shape[0] + labels) * voxels * 4) else torch.device("cpu")
    block = _read_block(volume, 2, 0, shape[3], preprocess, name).to(where)
    acc = fortran_empty((labels,) + shape[1:], where)
    for p, plane in enumerate(planes):
        n = shape[PLANE_AXIS[plane] + 1]
        _predict_slices(forward, block, plane, offset_sets, views, size, batch_size, 0, n, acc, p == 0, bar)
    if count > 1:
        acc.div_(count)
    return acc.cpu()


def _block_sums(forward, volume, plane, start, stop, halo, offset_sets, views, size, batch_size, labels, preprocess,
                name, bar) -> torch.Tensor:
    """The sums over the views of slices ``start:stop`` of ``plane``, from a block read with the
    slabs' ``halo`` (clamped only where the block's edges are the volume's)."""
    axis = PLANE_AXIS[plane]
    shape = tuple(int(s) for s in volume.shape)
    lo, hi = max(0, start - halo), min(shape[axis + 1], stop + halo)
    block = _read_block(volume, axis, lo, hi, preprocess, name)
    sums_shape = list((labels,) + shape[1:])
    sums_shape[axis + 1] = stop - start
    sums = fortran_empty(tuple(sums_shape), "cpu")
    _predict_slices(forward, block, plane, offset_sets, views, size, batch_size, start - lo, stop - lo, sums, True, bar)
    return sums


def _predict_to_store(forward, volume, planes, offset_sets, views, size, batch_size, labels, count, preprocess,
                      name, bar, budget, out_path, out_dtype, settings, shard=None):
    """The on-disk path into a zarr store, block by block, resumable (see the module docs)."""
    from slab.pipeline.inference.store import predict_blocks

    shape = tuple(int(s) for s in volume.shape)
    halo = max(abs(o) for o in offset_sets[0])
    itemsize = np.dtype(volume.dtype).itemsize if isinstance(volume, LazyVolume) else 4
    k = len(offset_sets[0])
    axes = [PLANE_AXIS[p] for p in planes]
    tiles = []  # whole slices, a number of them along each plane's axis
    for axis in axes:
        tile = list(shape[1:])
        tile[axis] = _slices_per_block(budget, shape, axis, labels, itemsize, batch_size, k, halo)
        tiles.append(tile)

    def compute(p, box):
        start, stop = box[axes[p]]
        return _block_sums(forward, volume, planes[p], start, stop, halo, offset_sets, views, size, batch_size,
                           labels, preprocess, name, bar)

    return predict_blocks(forward.model, volume, out_path, (labels,) + shape[1:], tiles,
                          {**settings, "planes": list(planes), "batch_size": batch_size, "labels": labels},
                          compute, count, out_dtype, bar, budget, shard,
                          units=lambda p, box: box[axes[p]][1] - box[axes[p]][0])


def _predict_on_disk(forward, volume, planes, offset_sets, views, size, batch_size, labels, count, preprocess,
                     name, bar, budget, out_path, out_dtype) -> torch.Tensor:
    shape = tuple(int(s) for s in volume.shape)
    halo = max(abs(o) for o in offset_sets[0])
    itemsize = np.dtype(volume.dtype).itemsize if isinstance(volume, LazyVolume) else 4
    k = len(offset_sets[0])
    with temp_dir("infer") as tmp:
        target = Path(out_path) if out_path else tmp / "probabilities.npy"
        with atomic_write(target) as staged:
            sink = DiskSink(tmp, staged, (labels,) + shape[1:], out_dtype, len(planes), count)
            for p, plane in enumerate(planes):
                axis = PLANE_AXIS[plane]
                n = shape[axis + 1]
                step = _slices_per_block(budget, shape, axis, labels, itemsize, batch_size, k, halo)
                for start in range(0, n, step):
                    sums = _block_sums(forward, volume, plane, start, min(n, start + step), halo, offset_sets,
                                       views, size, batch_size, labels, preprocess, name, bar)
                    sink.add(p, axis, start, sums)
        # Copy-on-write: the caller may change the tensor, the file stays as written. The map
        # outlives the temporary directory's removal.
        return torch.from_numpy(np.load(target, mmap_mode="c"))

