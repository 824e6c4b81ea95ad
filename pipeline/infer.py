"""Inference: multi-plane 2.5D with test-time augmentation, 3D sliding window, and volumes
larger than memory.

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

:func:`predict_3d` is MONAI's ``sliding_window_inference`` (Gaussian blending) followed by the
sigmoid; ``tta="flips"`` averages the probabilities of the eight flipped volumes, flipped back
(nnU-Net mirrors each window and averages logits; flipping the whole volume keeps the result
exactly flip-equivariant). An input smaller than the ROI is padded to the ROI and the output
cropped back (MONAI's own handling).

Volumes larger than memory: when the input is a :class:`~transforms.io.LazyVolume`, when
``out_path`` is given, or when the float32 input plus accumulators would pass
``memory_budget`` bytes, :func:`predict_2p5d` reads the volume in blocks of slices along each
plane's axis (plus the slabs' halo), predicts a block at a time, and accumulates into ``.npy``
files in a temporary directory (``TMPDIR``; put it on a disk). The result is an ``.npy`` file of
``out_dtype`` (default float16), shape ``(L, X, Y, Z)`` in Fortran order (x fastest, as loaded
volumes), returned as a MetaTensor over its memory map. The budget is a target for the blocks
and batch buffers (the network's activations are not counted); a block holds at least one
batch, and always a whole number of batches so that the network sees the same batches as in
memory. The sums are float32 and are added in the same order as in memory, so a float32 result
is bit-identical to the in-memory one and a float16 result is the in-memory result rounded to
float16 (at most 2**-11 relative error).

:func:`predict_sequences` scores a volume with the slice-sequence classifier: the sequences of
slabs of each target (or of the whole volume) are built as training builds them
(:func:`pipeline.datasets.volume_sequences`) and :func:`score_sequences` gives the sigmoid of
both heads, per sequence and per slice.

Devices: CUDA when present (AMP in bfloat16 where supported, else float16; ``channels_last``;
pinned-memory, non-blocking copies when the volume stays on the host), CPU otherwise, through
the same code. Everything runs under ``torch.inference_mode``. The model is moved to the
device and put in eval mode in place.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch
import torch.nn as nn
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from tqdm.auto import tqdm

from networks import build_network, load_weights, network_divisor, network_min_size, padded_size
from pipeline.datasets import volume_sequences
from pipeline.device import amp_dtype, autocast, resolve_device
from transforms.checks import MODES, PLANES, TTA_MODES, TTA_MODES_3D, read_json_object
from transforms.errors import SlabError
from transforms.intensity import PercentileNormalize, scale_intensity
from transforms.io import LazyVolume, atomic_write, load_volume, output_format, save_volume
from transforms.outputs import reserve, temp_dir
from transforms.post import Postprocess
from transforms.rle import write_rle_csv
from transforms.slab import PLANE_AXIS, check_offsets, iter_slab_batches, pad_to_divisor, slab_offsets, unpad

OUT_DTYPES = ("float16", "float32")
# Working memory for a LazyVolume when no memory_budget is given.
DEFAULT_MEMORY_BUDGET = 1 << 30
# On-disk arrays are mapped this many bytes at a time, so mapped pages never pile up.
_MAP_BYTES = 64 << 20
DEFAULT_NORMALIZE = MappingProxyType({"lower": 0.5, "upper": 99.5})
# The network_config keys that configure inference rather than build_network.
INFERENCE_KEYS = ("offsets", "planes", "roi_size", "labels")
# The keys of a bundle's configs/inference.json "slab" section (see Predictor.from_bundle).
BUNDLE_KEYS = ("network", "labels", "mode", "planes", "offsets", "tta", "normalize", "postprocess", "roi_size",
               "overlap",
               "batch_size", "sw_batch_size")


# ---------------------------------------------------------------------------------------------
# Arguments


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


def _check_choice(name: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise SlabError(f"{name}: expected one of {', '.join(choices)}, got {value!r}")
    return value


def _check_positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise SlabError(f"{name}: expected a positive integer, got {value!r}")
    return int(value)


def _fits_on(device: torch.device, nbytes: int) -> bool:
    """Whether ``nbytes`` of volume and accumulators can stay on ``device`` (half its free memory)."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return 2 * nbytes <= free


def _check_finite(block: torch.Tensor, name: str) -> None:
    low, high = torch.aminmax(block)  # one pass; NaN propagates
    if not (torch.isfinite(low) and torch.isfinite(high)):
        raise SlabError(f"{name}: contains NaN or Inf; expected finite intensities")


def _as_float(block) -> torch.Tensor:
    return torch.as_tensor(block).to(torch.float32)


# ---------------------------------------------------------------------------------------------
# The network on its device


class _Forward:
    """``model`` in eval mode on ``device``: AMP and channels_last on CUDA, float32 logits out."""

    def __init__(self, model: nn.Module, device, amp: bool):
        self.device = resolve_device(device)
        self.cuda = self.device.type == "cuda"
        self.model = model.to(self.device).eval()
        self.dtype = amp_dtype(self.device, amp)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x)
        if self.cuda:
            if x.device.type == "cpu":
                x = x.pin_memory().to(self.device, non_blocking=True)
            x = x.contiguous(memory_format=torch.channels_last if x.ndim == 4 else torch.channels_last_3d)
        with autocast(self.device, self.dtype):
            y = self.model(x)
        return y.float()


# ---------------------------------------------------------------------------------------------
# 2.5D views: (transpose, flipped image dims) of a (B, C*k, H, W) batch


def _views(tta: str) -> list[tuple[bool, tuple[int, ...]]]:
    flips = [()] if tta == "none" else [(), (-2,), (-1,), (-2, -1)]
    transposes = (False, True) if tta == "full" else (False,)
    return [(t, dims) for t in transposes for dims in flips]


def _predict_view(forward: _Forward, slabs: torch.Tensor, view, size) -> torch.Tensor:
    """Sigmoid of the network on one view of ``slabs``, mapped back: ``(B, L, H, W)``.
    ``size`` is ``(divisor, min_size)``: each image is padded to both and cropped back."""
    transpose, dims = view
    x = slabs.transpose(-2, -1) if transpose else slabs
    x = x.flip(dims) if dims else x
    x, pads = pad_to_divisor(x, size[0], min_size=size[1])
    y = unpad(forward(x), pads)
    y = y.flip(dims) if dims else y
    y = y.transpose(-2, -1) if transpose else y
    return y.sigmoid_()


def _predict_slices(forward, block, plane, offset_sets, views, size, batch_size, start, stop, target, first, bar):
    """Predict slices ``start:stop`` of ``block`` in ``plane``; write (``first``) or add the sum
    over the views into ``target``, whose slice 0 along the plane's axis is ``start``."""
    axis = PLANE_AXIS[plane]
    batches = [iter_slab_batches(block, plane, offsets, batch_size, start, stop) for offsets in offset_sets]
    for group in zip(*batches):
        indices = group[0][0]
        total = None
        for _, slabs in group:
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


# ---------------------------------------------------------------------------------------------
# On-disk arrays


class _DiskArray:
    """An ``(L, X, Y, Z)`` ``.npy`` array in Fortran order (x fastest, z slowest, as loaded
    volumes), reached through short-lived memory maps of a few z planes, so that mapped pages
    never pile up in memory."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype):
        self.path, self.shape, self.dtype = Path(path), tuple(shape), np.dtype(dtype)
        array = np.lib.format.open_memmap(self.path, mode="w+", dtype=self.dtype, shape=self.shape, fortran_order=True)
        self.offset = array.offset
        del array
        self.plane_bytes = int(np.prod(self.shape[:3])) * self.dtype.itemsize
        # Every block on disk now: a full disk is an error here, not a bus error mid-write.
        reserve(self.path, self.offset + self.plane_bytes * self.shape[3])

    def map(self, zs: int, ze: int) -> torch.Tensor:
        """A writable tensor over ``[..., zs:ze]``; unmapped when the last reference goes."""
        shape = self.shape[:3] + (ze - zs,)
        return torch.from_numpy(np.memmap(self.path, self.dtype, "r+", self.offset + zs * self.plane_bytes, shape, "F"))


class _DiskSink:
    """Plane sums of blocks, accumulated in an on-disk float32 array and finished into ``out``.

    The first plane's blocks are copied, later ones added, and the last plane's are added and
    divided by ``count`` straight into ``out``: the operations of the in-memory path, in its order.
    """

    def __init__(self, directory: Path, out: Path, shape, out_dtype, n_planes: int, count: int):
        self.shape, self.n_planes, self.count = tuple(shape), n_planes, count
        self.out = _DiskArray(out, shape, out_dtype)
        self.sum = _DiskArray(directory / "sum.npy", shape, np.float32) if n_planes > 1 else None
        self.step = max(1, _MAP_BYTES // (int(np.prod(self.shape[:3])) * 4))

    def add(self, plane_index: int, axis: int, start: int, block: torch.Tensor) -> None:
        """Add ``block``, the sums of slices ``start:`` along spatial ``axis`` of plane ``plane_index``."""
        stop = start + block.shape[axis + 1]
        z0, z1 = (start, stop) if axis == 2 else (0, self.shape[3])
        for zs in range(z0, z1, self.step):
            ze = min(z1, zs + self.step)
            part = block[..., zs - z0: ze - z0]

            def region(array: _DiskArray) -> torch.Tensor:
                mapped = array.map(zs, ze)
                return mapped if axis == 2 else mapped.narrow(axis + 1, start, stop - start)

            if plane_index < self.n_planes - 1:
                if plane_index == 0:
                    region(self.sum).copy_(part)
                else:
                    region(self.sum).add_(part)
                continue
            if self.sum is not None:
                part = region(self.sum) + part
            region(self.out).copy_(part.div(self.count) if self.count > 1 else part)


def _fortran_empty(shape, device) -> torch.Tensor:
    """A float32 ``(L, X, Y, Z)`` tensor stored x fastest, z slowest (like loaded volumes)."""
    return torch.empty(tuple(reversed(shape)), dtype=torch.float32, device=device).permute(3, 2, 1, 0)


# ---------------------------------------------------------------------------------------------
# 2.5D


def _read_block(volume, axis: int, start: int, stop: int, preprocess: Callable, name: str) -> torch.Tensor:
    """Slices ``start:stop`` along spatial ``axis`` (of a plain tensor, numpy array or
    LazyVolume) as a float32 tensor, checked for NaN and Inf."""
    raw = volume
    if isinstance(volume, LazyVolume) or (start, stop) != (0, volume.shape[axis + 1]):
        index = [slice(None)] * 4
        index[axis + 1] = slice(start, stop)
        raw = volume[tuple(index)]
    block = preprocess(torch.from_numpy(raw) if isinstance(raw, np.ndarray) else raw)
    block = block.as_tensor() if isinstance(block, MetaTensor) else block
    _check_finite(block, name)
    return block


def _volume_meta(volume) -> tuple:
    """``(affine, meta)`` of a MetaTensor or LazyVolume, else ``(None, None)``."""
    if isinstance(volume, MetaTensor):
        return volume.affine, {k: v for k, v in volume.meta.items() if k != "affine"}
    if isinstance(volume, LazyVolume):
        return torch.as_tensor(volume.affine), dict(volume.meta)
    return None, None


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
                 batch_size: int = 8, device=None, amp: bool = True, divisor=None, min_size=None,
                 memory_budget: int | None = None, out_path=None, out_dtype: str = "float16",
                 preprocess: Callable | None = None, progress: bool = False) -> torch.Tensor:
    """Multi-plane 2.5D inference, averaged over planes and test-time augmentations.

    Parameters
    ----------
    model : torch.nn.Module
        A 2D network taking ``C*k`` channels (slabs, channel-major, see ``transforms.slab``) and
        giving ``L`` logits. Moved to ``device`` and set to eval mode in place.
    volume : ``(C, X, Y, Z)`` MetaTensor, torch tensor, numpy array or LazyVolume
        Normalised intensities (or raw ones with ``preprocess``).
    planes : planes to predict in and average, any of ``"xy"``, ``"zx"``, ``"zy"``.
    offsets : slab slice offsets, e.g. ``(-1, 0, 1)``.
    tta : ``"none"``, ``"flips"`` (8 views per plane) or ``"full"`` (16; see the module docs).
    batch_size : slabs per forward pass.
    device : ``"cpu"``, ``"cuda"``...; default CUDA when available.
    amp : autocast on CUDA (bfloat16 where supported, else float16); ignored on CPU.
    divisor : int, optional
        The network's input size multiple (``networks.network_divisor``); images are padded up
        to it and cropped back.
    min_size : int, optional
        The network's smallest input size (``networks.network_min_size``; default twice the
        divisor, where the deepest feature map is two voxels wide): smaller images (a one-slice
        volume's zx plane, say) are padded up to it.
    memory_budget : int, optional
        Bytes of working memory. When the float32 input and accumulators would pass it (or the
        input is a LazyVolume: default 1 GiB), blocks of slices are read on demand and sums
        accumulate on disk.
    out_path : path, optional
        Write the result to this ``.npy`` (Fortran order, ``out_dtype``) through the on-disk path.
    out_dtype : ``"float16"`` or ``"float32"``, the dtype of an on-disk result.
    preprocess : callable, optional
        Applied to every block of the volume as read, ``(C, ...)`` tensor → float32 tensor
        (e.g. the intensity scaling of a lazy volume); default: cast to float32.
    progress : show a progress bar over slices.

    Returns
    -------
    ``(L, X, Y, Z)`` probabilities: float32 in memory, or ``out_dtype`` over a memory-mapped
    ``.npy`` on the on-disk path. A MetaTensor with the input's affine and meta when the input
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
    _check_choice("tta", tta, TTA_MODES)
    _check_choice("out_dtype", out_dtype, OUT_DTYPES)
    batch_size = _check_positive("batch_size", batch_size)
    if len(volume.shape) != 4:
        raise SlabError(f"volume: expected shape (C, X, Y, Z), got {tuple(volume.shape)}")
    preprocess = preprocess or _as_float
    source = volume.as_tensor() if isinstance(volume, MetaTensor) else volume
    forward = _Forward(model, device, amp)
    divisor = 1 if divisor is None else _check_positive("divisor", divisor)
    min_size = (1 if divisor == 1 else 2 * divisor) if min_size is None else _check_positive("min_size", min_size)
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
            else:
                probs = _predict_on_disk(forward, source, planes, offset_sets, views, size, batch_size, labels,
                                         count, preprocess, name, bar, budget or DEFAULT_MEMORY_BUDGET, out_path,
                                         out_dtype)
    affine, meta = _volume_meta(volume)
    return probs if affine is None else MetaTensor(probs, affine=affine, meta=meta)


def _count_labels(forward: _Forward, channels: int, image_shape, size) -> int:
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
    where = forward.device if _fits_on(forward.device, (shape[0] + labels) * voxels * 4) else torch.device("cpu")
    block = _read_block(volume, 2, 0, shape[3], preprocess, name).to(where)
    acc = _fortran_empty((labels,) + shape[1:], where)
    for p, plane in enumerate(planes):
        n = shape[PLANE_AXIS[plane] + 1]
        _predict_slices(forward, block, plane, offset_sets, views, size, batch_size, 0, n, acc, p == 0, bar)
    if count > 1:
        acc.div_(count)
    return acc.cpu()


def _predict_on_disk(forward, volume, planes, offset_sets, views, size, batch_size, labels, count, preprocess,
                     name, bar, budget, out_path, out_dtype) -> torch.Tensor:
    shape = tuple(int(s) for s in volume.shape)
    halo = max(abs(o) for o in offset_sets[0])
    itemsize = np.dtype(volume.dtype).itemsize if isinstance(volume, LazyVolume) else 4
    k = len(offset_sets[0])
    with temp_dir("infer") as tmp:
        target = Path(out_path) if out_path else tmp / "probabilities.npy"
        with atomic_write(target) as staged:
            sink = _DiskSink(tmp, staged, (labels,) + shape[1:], out_dtype, len(planes), count)
            for p, plane in enumerate(planes):
                axis = PLANE_AXIS[plane]
                n = shape[axis + 1]
                step = _slices_per_block(budget, shape, axis, labels, itemsize, batch_size, k, halo)
                for start in range(0, n, step):
                    stop = min(n, start + step)
                    lo, hi = max(0, start - halo), min(n, stop + halo)
                    # Clamping at the block's edges happens only where they are the volume's.
                    block = _read_block(volume, axis, lo, hi, preprocess, name)
                    sums_shape = list((labels,) + shape[1:])
                    sums_shape[axis + 1] = stop - start
                    sums = _fortran_empty(tuple(sums_shape), "cpu")
                    _predict_slices(forward, block, plane, offset_sets, views, size, batch_size,
                                    start - lo, stop - lo, sums, True, bar)
                    del block
                    sink.add(p, axis, start, sums)
        # Copy-on-write: the caller may change the tensor, the file stays as written. The map
        # outlives the temporary directory's removal.
        return torch.from_numpy(np.load(target, mmap_mode="c"))


# ---------------------------------------------------------------------------------------------
# 3D


def _flip_sets(tta: str) -> list[tuple[int, ...]]:
    if tta == "none":
        return [()]
    return [tuple(d for d, bit in zip((2, 3, 4), (a, b, c)) if bit)
            for a in (0, 1) for b in (0, 1) for c in (0, 1)]


def predict_3d(model: nn.Module, volume, *, roi_size, overlap: float = 0.5, mode: str = "gaussian",
               tta: str = "none", sw_batch_size: int = 4, device=None, amp: bool = True,
               progress: bool = False) -> torch.Tensor:
    """3D sliding-window inference (MONAI), sigmoid, optional flip TTA.

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
    device, amp, progress : as in :func:`predict_2p5d`.

    Returns
    -------
    float32 ``(L, X, Y, Z)`` probabilities, a MetaTensor with the input's affine when it has one.

    Example
    -------
    >>> net = torch.nn.Conv3d(1, 1, 3, padding=1)
    >>> predict_3d(net, torch.rand(1, 10, 12, 8), roi_size=(8, 8, 8)).shape
    torch.Size([1, 10, 12, 8])
    """
    _check_choice("tta", tta, TTA_MODES_3D)
    _check_choice("mode", mode, ("gaussian", "constant"))
    roi = tuple(roi_size) if isinstance(roi_size, (list, tuple)) else None
    if roi is None or len(roi) != 3 or not all(isinstance(r, (int, np.integer)) and r > 0 for r in roi):
        raise SlabError(f"roi_size: expected three positive integers, got {roi_size!r}")
    if not 0 <= overlap < 1:
        raise SlabError(f"overlap: expected a fraction in [0, 1), got {overlap!r}")
    sw_batch_size = _check_positive("sw_batch_size", sw_batch_size)
    if len(volume.shape) != 4:
        raise SlabError(f"volume: expected shape (C, X, Y, Z), got {tuple(volume.shape)}")
    source = volume.load() if isinstance(volume, LazyVolume) else volume
    name = str(getattr(volume, "meta", {}).get("filename_or_obj") or "volume")
    forward = _Forward(model, device, amp)
    with torch.inference_mode():
        x = _as_float(source.as_tensor() if isinstance(source, MetaTensor) else source)
        _check_finite(x, name)
        where = forward.device if _fits_on(forward.device, 3 * x.numel() * 4) else torch.device("cpu")
        x = x.to(where)[None]
        flips = _flip_sets(tta)
        total = None
        for dims in tqdm(flips, disable=not progress or len(flips) == 1, desc="3D flips"):
            y = sliding_window_inference(x.flip(dims) if dims else x, [int(r) for r in roi], sw_batch_size, forward,
                                         overlap=overlap, mode=mode, sw_device=forward.device, device=where,
                                         progress=progress and len(flips) == 1)
            y = y.sigmoid_()
            y = y.flip(dims) if dims else y
            total = y if total is None else total.add_(y)
        if len(flips) > 1:
            total.div_(len(flips))
    affine, meta = _volume_meta(volume)
    probs = total[0].cpu()
    return probs if affine is None else MetaTensor(probs, affine=affine, meta=meta)


# ---------------------------------------------------------------------------------------------
# Slice sequences


def score_sequences(model: nn.Module, sequences: Sequence[torch.Tensor], *, batch_size: int = 8, device=None,
                    amp: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Both heads of a slice-sequence classifier, as probabilities, over sequences of slabs.

    Parameters
    ----------
    model : :class:`networks.SliceSequenceClassifier` (or a module with its forward). Moved to
        ``device`` and put in eval mode in place.
    sequences : ``(N, C*k, H, W)`` tensors of one shape (float16 as
        :func:`pipeline.datasets.build_sequence` builds them, or float32); ``batch_size`` of them
        per forward pass.
    device, amp : see :func:`predict_2p5d`.

    Returns
    -------
    (sequence, slices) : float32 CPU tensors
        The sigmoid of the sequence head, ``(S, L)``, and of the slice head, ``(S, N)`` (one
        output channel) or ``(S, N, L)``, for the ``S`` sequences in order.
    """
    batch_size = _check_positive("batch_size", batch_size)
    device = resolve_device(device)
    model = model.to(device).eval()
    dtype = amp_dtype(device, amp)
    sequence_probs, slice_probs = [], []
    with torch.inference_mode():
        for start in range(0, len(sequences), batch_size):
            x = torch.stack([torch.as_tensor(s) for s in sequences[start:start + batch_size]])
            x = x.to(device, non_blocking=True).float()
            with autocast(device, dtype):
                slice_logits, sequence_logits = model(x)
            sequence_probs.append(sequence_logits.float().sigmoid().cpu())
            slice_probs.append(slice_logits.float().sigmoid().cpu())
    if not sequence_probs:
        return torch.empty(0, 1), torch.empty(0, 0)
    return torch.cat(sequence_probs), torch.cat(slice_probs)


def predict_sequences(model: nn.Module, volume, label=None, *, n_slabs: int = 15, offsets=(-1, 0, 1),
                      plane: str = "xy", size=(128, 128), targets: Sequence[str] = (), crop_margin: float = 0.1,
                      batch_size: int = 8, device=None, amp: bool = True) -> dict[str, dict]:
    """Score a volume with a slice-sequence classifier, per target.

    The sequences are built as for training (:func:`pipeline.datasets.volume_sequences`): with a
    ``label`` of target values ``1..N`` (``targets`` names them), one sequence of ``n_slabs``
    slabs over each target present, cropped to its in-plane box; without one, one sequence over
    the whole volume, target ``"patient_overall"``. :func:`score_sequences` runs the network.

    Parameters
    ----------
    model : :class:`networks.SliceSequenceClassifier`, moved to ``device`` and put in eval mode.
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
    n_slabs = _check_positive("n_slabs", n_slabs)
    if len(size) != 2 or not all(isinstance(v, (int, np.integer)) and v > 0 for v in size):
        raise SlabError(f"size: expected two positive integers (H, W), got {size!r}")
    name = str(getattr(volume, "meta", {}).get("filename_or_obj") or "volume")
    image = _as_float(volume.as_tensor() if isinstance(volume, MetaTensor) else volume)
    _check_finite(image, name)
    label = None if label is None else np.asarray(label)
    sequences = volume_sequences(image.cpu().numpy(), label, targets=list(targets), n_slabs=n_slabs,
                                 offsets=check_offsets(offsets), plane=plane, size=size, crop_margin=crop_margin)
    probs, slice_probs = score_sequences(model, [s["slabs"] for s in sequences], batch_size=batch_size,
                                         device=device, amp=amp)
    return {s["target"]: {"probability": float(p[0]) if p.numel() == 1 else p.numpy(),
                          "slice_probabilities": q.numpy(), "slices": s["slices"]}
            for s, p, q in zip(sequences, probs, slice_probs)}


# ---------------------------------------------------------------------------------------------
# A configured network, and files in and out


class Predictor:
    """A network and everything inference needs: ``predictor(volume) -> probabilities``.

    Parameters
    ----------
    network_config : dict
        ``build_network`` keyword arguments (``name``, ``spatial_dims``, ``in_channels``,
        ``out_channels`` and options) plus, optionally, inference keys: ``offsets`` (slab
        offsets; default centred, k = in_channels / image channels), ``planes``, ``roi_size``.
        Explicit arguments below win over these.
    weights : path, optional
        A local checkpoint (``networks.load_weights``); None keeps the initial weights.
    mode : ``"2.5d"`` or ``"3d"``; default from ``spatial_dims`` (2 or 3).
    planes, offsets, tta : 2.5D settings (:func:`predict_2p5d`); default all planes, no TTA.
    normalize : dict of ``PercentileNormalize`` arguments, a ``PercentileNormalize``, or None
        for an input that is already normalised. Default: 0.5 and 99.5 percentiles.
    postprocess : dict of ``transforms.post.postprocess`` arguments (``threshold``,
        ``hysteresis``, ``min_size``, ``keep_largest``, ``fill_holes``, ``connectivity``);
        default ``{"threshold": 0.5}``. ``threshold`` may be one value per output channel
        (``hysteresis`` one ``(low, high)`` pair per channel).
    device, amp, batch_size, memory_budget, progress : see :func:`predict_2p5d`.
    roi_size, overlap, sw_batch_size : 3D settings (:func:`predict_3d`).
    labels : names of the output channels (written into multi-label RLE CSVs); default
        ``label_1``, ``label_2``, ... A network config may carry them as ``labels``.
    """

    def __init__(self, network_config: Mapping, weights=None, *, mode: str | None = None, planes=None, offsets=None,
                 tta: str = "none", normalize=DEFAULT_NORMALIZE, postprocess: Mapping | None = None, device=None,
                 amp: bool = True, batch_size: int = 8, memory_budget: int | None = None, roi_size=None,
                 overlap: float = 0.5, sw_batch_size: int = 4, progress: bool = False, labels=None):
        if not isinstance(network_config, Mapping):
            raise SlabError(f"network config: expected an object of build_network arguments, got {network_config!r}")
        config = dict(network_config)
        extra = {key: config.pop(key) for key in INFERENCE_KEYS if key in config}
        missing = [key for key in ("name", "spatial_dims", "in_channels", "out_channels") if key not in config]
        if missing:
            raise SlabError(f"network config: missing {', '.join(missing)}")
        self.model = build_network(**config)
        dims = config["spatial_dims"]
        self.mode = _check_choice("mode", mode or {2: "2.5d", 3: "3d"}[dims], MODES)
        if {"2.5d": 2, "3d": 3}[self.mode] != dims:
            raise SlabError(f"mode: {self.mode} needs a network with spatial_dims {2 if self.mode == '2.5d' else 3}, "
                            f"the network config has {dims}")
        if weights is not None:
            load_weights(self.model, weights)
        self.in_channels = int(config["in_channels"])
        self.out_channels = int(config["out_channels"])
        self.labels = _check_labels(labels if labels is not None else extra.get("labels"), self.out_channels)
        options = {k: v for k, v in config.items() if k not in ("name", "spatial_dims", "in_channels", "out_channels")}
        self.divisor = network_divisor(config["name"], dims, **options)
        self.min_size = network_min_size(config["name"], dims, **options)
        self.planes = check_planes(planes if planes is not None else extra.get("planes", PLANES))
        offsets = offsets if offsets is not None else extra.get("offsets")
        self.offsets = None if offsets is None else check_offsets(offsets)
        self.tta = _check_choice("tta", tta, TTA_MODES if self.mode == "2.5d" else TTA_MODES_3D)
        roi_size = roi_size if roi_size is not None else extra.get("roi_size")
        if self.mode == "3d":
            if roi_size is None:
                raise SlabError("roi_size: a 3D network needs the sliding-window size (--roi X Y Z)")
            if (not isinstance(roi_size, (list, tuple)) or len(roi_size) != 3
                    or not all(isinstance(r, (int, np.integer)) and not isinstance(r, bool)
                               and r >= self.min_size and r % self.divisor == 0 for r in roi_size)):
                raise SlabError(f"roi_size: expected three multiples of the network's divisor {self.divisor}, "
                                f"each at least {self.min_size}, got {roi_size!r}")
        self.roi_size = None if roi_size is None else tuple(int(r) for r in roi_size)
        if normalize is None or isinstance(normalize, PercentileNormalize):
            self.normalize = normalize
        elif isinstance(normalize, Mapping):
            self.normalize = _construct(PercentileNormalize, normalize, "normalize")
        else:
            raise SlabError(f"normalize: expected percentile settings or None, got {normalize!r}")
        self.postprocess = _construct(Postprocess, {"threshold": 0.5, **(postprocess or {})}, "postprocess")
        _check_probabilities(postprocess or {})
        self.device = resolve_device(device)
        if not (isinstance(overlap, (int, float)) and 0 <= overlap < 1):
            raise SlabError(f"overlap: expected a fraction in [0, 1), got {overlap!r}")
        if memory_budget is not None and not (isinstance(memory_budget, (int, np.integer)) and memory_budget > 0):
            raise SlabError(f"memory_budget: expected a positive number of bytes, got {memory_budget!r}")
        self.amp, self.memory_budget, self.overlap, self.progress = amp, memory_budget, float(overlap), progress
        self.batch_size = _check_positive("batch_size", batch_size)
        self.sw_batch_size = _check_positive("sw_batch_size", sw_batch_size)

    @staticmethod
    def bundle_section(directory) -> dict:
        """The ``"slab"`` section of ``directory/configs/inference.json``, checked.

        It holds ``network`` (the ``network_config``: ``build_network`` arguments, optionally
        ``offsets``, ``planes``, ``roi_size``) and optionally ``mode``, ``planes``, ``offsets``,
        ``tta``, ``normalize``, ``postprocess``, ``roi_size``, ``overlap``, ``batch_size``,
        ``sw_batch_size``: the keyword arguments of :class:`Predictor` of the same names.
        """
        config_path = Path(directory) / "configs" / "inference.json"
        section = read_json_object(config_path, "bundle inference config (configs/inference.json)").get("slab")
        if not isinstance(section, dict) or not isinstance(section.get("network"), dict):
            raise SlabError(f"{config_path}: expected a \"slab\" object with a \"network\" object")
        if not isinstance(section.get("postprocess", {}), dict):
            raise SlabError(f"{config_path}: \"postprocess\" in \"slab\" must be an object")
        unknown = sorted(set(section) - set(BUNDLE_KEYS))
        if unknown:
            raise SlabError(f"{config_path}: unknown key {', '.join(unknown)} in \"slab\"; "
                            f"expected {', '.join(BUNDLE_KEYS)}")
        return section

    @classmethod
    def from_bundle(cls, directory, weights=None, **overrides) -> "Predictor":
        """A predictor from a bundle: the ``"slab"`` section of ``configs/inference.json`` (see
        :meth:`bundle_section`) and the weights ``models/model.pt`` (or ``weights``, e.g. a
        training run's export, with its ``model.json`` beside it). ``overrides`` (keyword
        arguments of :class:`Predictor`) that are not None win over the bundle's values; a
        ``postprocess`` override is merged into the bundle's ``postprocess``.

        The bundle binarises as its own inference does: at the threshold recorded on
        validation beside the weights (:func:`recorded_postprocess`), unless the overrides give
        a ``threshold`` or ``hysteresis`` themselves.
        """
        section = cls.bundle_section(directory)
        weights = Path(directory) / "models" / "model.pt" if weights is None else Path(weights)
        options = {k: v for k, v in section.items() if k != "network"}
        options.update({k: v for k, v in overrides.items() if v is not None and k != "postprocess"})
        given = dict(overrides.get("postprocess") or {})
        postprocess = {**(section.get("postprocess") or {}), **given}
        if "threshold" not in given:
            postprocess = recorded_postprocess(postprocess, weights, section["network"].get("out_channels"))
        options["postprocess"] = postprocess
        config_path = Path(directory) / "configs" / "inference.json"
        try:
            return cls(section["network"], weights, **options)
        except SlabError as err:
            message = str(err)
            if str(weights) in message or str(config_path) in message:
                raise
            raise SlabError(f"{config_path}: {message}") from None

    def label_names(self) -> list[str]:
        """The name of every output channel (``label_1``... where the network config names none)."""
        return list(self.labels) if self.labels else [f"label_{i + 1}" for i in range(self.out_channels)]

    def check_input(self, info, name) -> None:
        """SlabError naming ``name`` unless a volume of ``info`` = ``(shape (C, X, Y, Z), ...)``
        (:func:`transforms.io.volume_info`) suits this network: its channel count."""
        channels = int(info[0][0])
        try:
            if self.mode == "3d":
                if channels != self.in_channels:
                    raise SlabError(f"{channels} channel(s); the network takes {self.in_channels}")
            else:
                self._offsets(channels)
        except SlabError as err:
            where = ", ".join(map(str, name)) if isinstance(name, (list, tuple)) else name
            raise SlabError(f"{where}: {str(err).removeprefix('image: ')}") from None

    def _offsets(self, channels: int) -> tuple[int, ...]:
        if self.offsets is not None:
            if channels * len(self.offsets) != self.in_channels:
                raise SlabError(f"image: {channels} channel(s) x {len(self.offsets)} offsets = "
                                f"{channels * len(self.offsets)} slab channels; the network takes {self.in_channels}")
            return self.offsets
        if self.in_channels % channels:
            raise SlabError(f"image: {channels} channel(s) do not divide the network's "
                            f"{self.in_channels} input channels")
        return slab_offsets(self.in_channels // channels)

    def preprocess(self, volume) -> Callable:
        """The block transform for ``volume``: its percentile scaling (computed over the whole
        volume; a LazyVolume is read once for it), or a cast to float32."""
        if self.normalize is None:
            return _as_float
        low, high = self.normalize.percentiles(volume, name=str(volume.meta.get("filename_or_obj", "image"))
                                               if hasattr(volume, "meta") else "image")
        return functools.partial(scale_intensity, low=low, high=high, soft_clip_alpha=self.normalize.soft_clip_alpha)

    def __call__(self, volume) -> torch.Tensor:
        """``(L, X, Y, Z)`` probabilities of ``volume`` (raw intensities: normalised here)."""
        if len(volume.shape) != 4:
            raise SlabError(f"image: expected shape (C, X, Y, Z), got {tuple(volume.shape)}")
        channels = int(volume.shape[0])
        if self.mode == "3d":
            if channels != self.in_channels:
                raise SlabError(f"image: {channels} channel(s); the network takes {self.in_channels}")
            source = volume.load() if isinstance(volume, LazyVolume) else volume
            x = self.preprocess(source)(source)  # a MetaTensor stays one, geometry included
            return predict_3d(self.model, x, roi_size=self.roi_size, overlap=self.overlap, tta=self.tta,
                              sw_batch_size=self.sw_batch_size, device=self.device, amp=self.amp,
                              progress=self.progress)
        return predict_2p5d(self.model, volume, planes=self.planes, offsets=self._offsets(channels), tta=self.tta,
                            batch_size=self.batch_size, device=self.device, amp=self.amp, divisor=self.divisor,
                            min_size=self.min_size,
                            memory_budget=self.memory_budget, preprocess=self.preprocess(volume),
                            progress=self.progress)

    def fits_in_memory(self, volume) -> bool:
        """Whether ``volume`` can be predicted in memory within ``memory_budget``."""
        if self.memory_budget is None:
            return True
        voxels = int(np.prod(volume.shape[1:]))
        return (volume.shape[0] + self.out_channels) * voxels * 4 <= self.memory_budget


def recorded_postprocess(postprocess: Mapping | None, weights=None, labels: int | None = None) -> dict:
    """``postprocess`` (:func:`transforms.post.postprocess` arguments) with the threshold that
    training chose on validation for ``weights``, where one was recorded.

    The threshold (one number, or one per label channel) is read from ``model.json`` beside
    ``weights`` (``models/model.pt``; :func:`pipeline.bundle.run_training` writes both), else
    from ``weights`` itself when it is a training checkpoint (``best.pt`` / ``last.pt``: its
    ``"threshold"``).
    When neither records one (e.g. weights trained elsewhere), when ``weights`` is None or
    missing, or when ``postprocess`` binarises by ``hysteresis`` or not at all
    (``"threshold": null``), ``postprocess`` is returned as given (the bundle's defaults).

    Parameters
    ----------
    postprocess : dict or None
    weights : path to the network weights the thresholds belong to, or None
    labels : the network's output channels; a per-channel threshold of another length is a
        SlabError naming the file it came from.
    """
    options = dict(postprocess or {})
    if weights is None or options.get("hysteresis") is not None or options.get("threshold", 0.5) is None:
        return options
    path = Path(weights)
    summary = path.with_suffix(".json")
    threshold = None
    if summary.is_file():
        threshold = read_json_object(summary, "training summary").get("threshold")
        source = summary
    elif path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - not a checkpoint; loading the weights names the problem
            state = None
        if isinstance(state, dict) and "model" in state:
            threshold = state.get("threshold")
        source = path
    if threshold is None:
        return options
    if isinstance(threshold, list) and labels is not None and len(threshold) != labels:
        raise SlabError(f"{source}: threshold has {len(threshold)} values; the network predicts {labels} labels")
    options["threshold"] = threshold
    return options


def _check_probabilities(postprocess: Mapping) -> None:
    """A predictor binarises probabilities: its thresholds (and hysteresis pairs) lie in [0, 1]."""
    for key in ("threshold", "hysteresis"):
        value = postprocess.get(key)
        flat = np.ravel(np.asarray(value, dtype=object)).tolist() if value is not None else []
        if any(isinstance(v, (int, float)) and not isinstance(v, bool) and not 0 <= v <= 1 for v in flat):
            raise SlabError(f"postprocess {key}: {value!r}; probabilities are thresholded in [0, 1]")


def _check_labels(labels, out_channels: int) -> tuple[str, ...] | None:
    """Output channel names: None, or one distinct non-empty string per output channel."""
    if labels is None:
        return None
    if (not isinstance(labels, (list, tuple)) or len(labels) != out_channels
            or not all(isinstance(n, str) and n.strip() and "," not in n for n in labels)
            or len(set(labels)) != len(labels)):
        raise SlabError(f"labels: expected {out_channels} distinct names (one per output channel, no commas), "
                        f"got {labels!r}")
    return tuple(labels)


def _construct(cls, options: Mapping, name: str):
    """``cls(**options)`` with unknown or bad options as a one-line SlabError."""
    if not isinstance(options, Mapping):
        raise SlabError(f"{name}: expected an object of settings, got {options!r}")
    try:
        return cls(**options)
    except TypeError as err:
        raise SlabError(f"{name}: {err}".replace("__init__() ", "")) from None


def _open(path, predictor: Predictor):
    """The input volume: lazily when a memory budget is set and it would not fit."""
    if predictor.memory_budget is not None:
        try:
            lazy = load_volume(path, lazy=True)
        except SlabError:
            lazy = None  # a format that only loads whole (or an error the eager load names)
        if lazy is not None:
            return lazy.load() if predictor.fits_in_memory(lazy) else lazy
    return load_volume(path)


def predict_file(input_path, output_path, predictor: Predictor, *, prob_path=None, rle_csv=None,
                 id_prefix: str | None = None, row_ids: Callable[[int], list[str]] | None = None) -> dict[str, Path]:
    """Predict one volume and write its mask (and probabilities, RLE CSV).

    Load ``input_path`` (any format ``load_volume`` reads, or a list of files as channels; lazily
    when the predictor's memory budget asks for it), normalise, predict, post-process
    (``predictor.postprocess``), and write the uint8 mask to ``output_path`` (NIfTI or NRRD/MHA
    with the input's geometry, or a slice stack of 0/255 for a directory name), optionally the
    probabilities to ``prob_path`` (float32; an on-disk float16 result stays float16 in a slice
    stack) and a submission CSV to ``rle_csv``: ``id,rle`` for one label (SenNet), else
    ``id,class,segmentation`` with the predictor's label names (UW-Madison). Row ids are
    ``row_ids(depth)``, or ``{id_prefix}_{z:04d}``. Output names are checked before anything is
    read; every file is written atomically.

    Returns
    -------
    dict with the paths written: ``mask``, and ``prob`` / ``rle_csv`` when asked for.
    """
    output_format(output_path)
    if prob_path is not None:
        output_format(prob_path)
    if rle_csv is not None and not (id_prefix or row_ids):
        raise SlabError("id_prefix: an RLE CSV needs the id prefix of its rows (e.g. kidney_5)")
    volume = _open(input_path, predictor)
    probs = predictor(volume)
    mask = predictor.postprocess(probs)
    affine = np.asarray(volume.affine)
    meta = dict(getattr(volume, "meta", {}))
    written = {"mask": save_volume(mask, output_path, affine=affine, meta=meta, mask=True)}
    if prob_path is not None:
        if probs.dtype != torch.float32 and output_format(prob_path) != "stack":
            probs = probs.float()  # NIfTI and ITK files have no float16
        written["prob"] = save_volume(probs, prob_path, affine=affine, meta=meta)
    if rle_csv is not None:
        depth = int(mask.shape[-1])
        ids = row_ids(depth) if row_ids is not None else [f"{id_prefix}_{z:04d}" for z in range(depth)]
        written["rle_csv"] = write_rle_csv(np.asarray(mask), rle_csv, ids, predictor.label_names())
    return written
