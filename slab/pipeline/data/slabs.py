"""The 2.5D training sampler: slabs over the xy, zx and zy planes of a list of volumes.

:class:`SlabDataset` draws 2.5D training samples. Sample ``i`` of epoch ``e`` is a function of
``(seed, e, i)`` only: a plane among ``planes`` (xy, zx, zy), a volume, and a slice — with
probability ``positive_fraction`` a slice whose label has foreground, otherwise a slice without
(any slice when every slice has foreground) — then the slab of ``offsets`` around it, an
optional crop to ``patch_size`` (centred on a foreground pixel for positive draws) and optional
augmentation. Volumes are loaded, checked and normalised once, when the dataset is built.

With ``stream=True`` no volume is held: each is opened lazily (zarr, N5, HDF5, TIFF, slice
stacks, NIfTI; other formats are loaded) as a :class:`slab.pipeline.data.stream.SlabSource`: its
normalisation window computed once in blocks, the label's foreground counted once per row of
every slice, and a sample reads one label row (to centre a positive draw), the label window and
the slab's window of the image, normalising those voxels: the same samples as in memory, bit for
bit, for a dataset larger than RAM. A ``label_transform`` then runs on the parts read, so it must
be voxel-wise (as BraTS values to channels is).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from slab.core.checks import positive_int
from slab.core.errors import SlabError
from slab.transforms.intensity import PercentileNormalize, ZScoreNormalize, make_normalize
from slab.transforms.slabs import PLANE_AXIS, check_offsets, plane_axis, slab_indices


def _load(value, name: str):
    """A volume from a path (or list of paths), or an in-memory array / tensor as it is."""
    from slab.io.volumes import load_volume

    paths = isinstance(value, (list, tuple)) and value and isinstance(value[0], (str, Path))
    if isinstance(value, (str, Path)) or paths:
        return load_volume(value)
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value
    raise SlabError(f"{name}: expected a file path or a (C, X, Y, Z) array, got {type(value).__name__}")


def _open(value, name: str):
    """A path (or list of paths) opened lazily where its format allows (else loaded), or an
    in-memory array / tensor as it is."""
    from slab.io.volumes import open_volume

    if isinstance(value, (str, Path)):
        return open_volume(value)
    return _load(value, name)


def _numpy(volume) -> np.ndarray:
    if isinstance(volume, torch.Tensor):
        volume = volume.as_tensor() if hasattr(volume, "as_tensor") else volume
        return volume.detach().cpu().numpy()
    return np.asarray(volume)




def _crop_window(size: int, patch: int, centre: int | None, rng: np.random.Generator) -> tuple[int, int]:
    """``(start, pad_before)``: where a window of ``patch`` starts in an axis of ``size``."""
    if patch >= size:
        return 0, (patch - size) // 2
    if centre is None:
        return int(rng.integers(0, size - patch + 1)), 0
    return int(np.clip(centre - patch // 2, 0, size - patch)), 0


class SlabDataset(torch.utils.data.Dataset):
    """2.5D training samples over the xy, zx and zy planes of a list of volumes.

    Parameters
    ----------
    items : list of dict
        ``{"image": path(s) or (C, X, Y, Z) array, "label": path or (L, X, Y, Z) array}``, as
        :func:`load_datalist` gives.
    offsets : slab offsets (``slab.transforms.slabs.slab_offsets``).
    planes : planes to sample, each with equal probability.
    samples_per_epoch : ``len(dataset)``.
    positive_fraction : share of samples drawn from slices whose label has foreground.
    patch_size : (H, W), optional
        Crop (or centre-pad with zeros) every sample to this size; needed for batching when the
        planes' slices differ in size. None: whole slices.
    normalize : a normalisation or its settings (``slab.transforms.intensity.make_normalize``), or None
        (image used as stored).
    augment : callable on ``{"image", "label"}`` (e.g. ``RandSlabAugmentd``), optional. A MONAI
        Randomizable is reseeded per sample, so augmentation is reproducible too.
    label_transform : callable mapping the label volume to the training target once at load
        (e.g. BraTS values to channels); its result's ``> 0`` marks foreground.
    seed : base seed; sample ``i`` of epoch ``e`` depends only on ``(seed, e, i)``.
    cache_dtype : ``float32`` or ``float16`` storage of normalised images (samples are float32).
    stream : read every sample's voxels from the volumes on disk instead of holding them (see
        the module docs); ``images`` and ``labels`` then hold the opened volumes.

    Each sample is ``{"image": float32 (C*k, H, W), "label": float32 (L, H, W) (or the
    label_transform's dtype), "case": int, "plane": str, "slice": int, "positive": bool}``; the
    default collate batches them.
    """

    def __init__(self, items: Sequence[Mapping], offsets=(-1, 0, 1), planes: Sequence[str] = ("xy", "zx", "zy"),
                 samples_per_epoch: int = 1000, positive_fraction: float = 0.5, patch_size=None,
                 normalize: PercentileNormalize | ZScoreNormalize | Mapping | None = None, augment: Callable | None = None,
                 label_transform: Callable | None = None, seed: int = 0, cache_dtype: str = "float32",
                 stream: bool = False):
        self.offsets = check_offsets(offsets)
        planes = [planes] if isinstance(planes, str) else list(planes)
        if not planes:
            raise SlabError("planes: expected at least one of xy, zx, zy")
        for plane in planes:
            plane_axis(plane)
        self.planes = tuple(planes)
        self.samples_per_epoch = positive_int(samples_per_epoch, "samples_per_epoch")
        if isinstance(positive_fraction, bool) or not 0 <= float(positive_fraction) <= 1:
            raise SlabError(f"positive_fraction: expected a number in [0, 1], got {positive_fraction!r}")
        self.positive_fraction = float(positive_fraction)
        if patch_size is not None:
            patch_size = tuple(positive_int(p, "patch_size") for p in patch_size)
            if len(patch_size) != 2:
                raise SlabError(f"patch_size: expected (H, W), got {patch_size}")
        self.patch_size = patch_size
        self.normalize = make_normalize(normalize)
        self.augment = augment
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise SlabError(f"seed: expected an integer, got {seed!r}")
        self.seed = int(seed)
        if cache_dtype not in ("float32", "float16"):
            raise SlabError(f"cache_dtype: expected float32 or float16, got {cache_dtype!r}")
        self.epoch = 0
        self.stream = bool(stream)
        self.cache_dtype = np.dtype(cache_dtype)
        self.label_transform = label_transform
        self.sources: list = []  # streamed: each volume's SlabSource
        self.keep_label_dtype = label_transform is not None
        if not items:
            raise SlabError("items: no training volumes")
        self.images: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.names: list[str] = []
        self.label_channels: list[int] = []  # targets per volume, after the label transform
        # foreground flag of every slice, per volume and plane: {plane: bool (n_slices,)}
        self.slice_has_label: list[dict[str, np.ndarray]] = []
        for i, item in enumerate(items):
            self._add(i, item, label_transform, np.dtype(cache_dtype))

    # -- loading ------------------------------------------------------------------------------

    def _add(self, i: int, item: Mapping, label_transform, cache_dtype: np.dtype) -> None:
        from slab.io.volumes import check_same_geometry

        if "image" not in item or "label" not in item:
            raise SlabError(f"items[{i}]: expected 'image' and 'label'")
        names = [str(item["image"]) if isinstance(item["image"], (str, Path, list, tuple)) else f"items[{i}] image",
                 str(item["label"]) if isinstance(item["label"], (str, Path)) else f"items[{i}] label"]
        opener = _open if self.stream else _load
        image, label = opener(item["image"], names[0]), opener(item["label"], names[1])
        for volume, name in zip((image, label), names):
            if len(volume.shape) != 4:
                raise SlabError(f"{name}: expected a (C, X, Y, Z) volume, got shape {tuple(volume.shape)}")
        if hasattr(image, "affine") and hasattr(label, "affine"):
            check_same_geometry(image, label, names=names)
        elif tuple(image.shape[1:]) != tuple(label.shape[1:]):
            raise SlabError(f"{names[1]}: spatial shape {tuple(label.shape[1:])} does not match {names[0]} "
                            f"{tuple(image.shape[1:])}")
        if self.stream:
            self._add_streamed(image, label, names, label_transform)
            return
        if self.normalize is not None:
            image = self.normalize(image)
        image = _numpy(image)
        if image.dtype.kind == "f" and not np.all(np.isfinite(image)):
            raise SlabError(f"{names[0]}: NaN or Inf intensities; normalise or clean the volume first")
        label = _numpy(label)
        if label_transform is not None:
            label = _numpy(label_transform(label))
            if len(label.shape) != 4 or tuple(label.shape[1:]) != tuple(image.shape[1:]):
                raise SlabError(f"label_transform: returned shape {tuple(label.shape)} for {names[1]}")
        elif label.dtype == np.bool_:
            label = label.astype(np.uint8)
        foreground = np.any(label > 0, axis=0)
        flags = {}
        for plane in self.planes:
            axis = PLANE_AXIS[plane]
            others = tuple(a for a in range(3) if a != axis)
            flags[plane] = np.any(foreground, axis=others)
        self.images.append(image.astype(cache_dtype, copy=False))
        self.labels.append(label)
        self.names.append(names[0])
        self.slice_has_label.append(flags)
        self.label_channels.append(int(label.shape[0]))

    def _add_streamed(self, image, label, names, label_transform) -> None:
        """A volume read per sample (:class:`slab.pipeline.data.stream.SlabSource`)."""
        from slab.pipeline.data.stream import SlabSource

        source = SlabSource(image, label, self.planes, self.normalize, label_transform, names, self.cache_dtype)
        self.sources.append(source)
        self.images.append(image)
        self.labels.append(label)
        self.names.append(names[0])
        self.slice_has_label.append(source.flags)
        self.label_channels.append(int(source.channels))

    # -- sampling -----------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Samples of ``epoch`` follow; the same (seed, epoch, index) always gives the same sample."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.samples_per_epoch

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples per epoch")
        return self.sample(int(index) % len(self), self.epoch)

    def draw(self, index: int, epoch: int) -> tuple[int, str, int, bool, np.random.Generator]:
        """``(volume, plane, slice, positive, rng)`` of sample ``index`` of ``epoch``."""
        rng = np.random.default_rng([self.seed, int(epoch), int(index)])
        positive = bool(rng.random() < self.positive_fraction)
        plane = self.planes[int(rng.integers(len(self.planes)))]
        wanted = [np.flatnonzero(f[plane] == positive) for f in self.slice_has_label]
        candidates = [v for v, slices in enumerate(wanted) if slices.size]
        if not candidates:  # no slice of the wanted kind anywhere: any slice will do
            volume = int(rng.integers(len(self.images)))
            size = self.images[volume].shape[PLANE_AXIS[plane] + 1]
            return volume, plane, int(rng.integers(size)), positive, rng
        volume = candidates[int(rng.integers(len(candidates)))]
        slices = wanted[volume]
        return volume, plane, int(slices[int(rng.integers(slices.size))]), positive, rng

    def sample(self, index: int, epoch: int) -> dict:
        """Sample ``index`` of ``epoch`` (what ``dataset[index]`` gives after ``set_epoch(epoch)``).

        Crop first: the window is chosen on the label's slice (a view), then only the window of
        the slab's slices is gathered, so a 64x64 sample of a 512x512 volume copies 64x64xk
        voxels, not k whole slices. The result is the slab of ``extract_slab`` cropped (and
        zero-padded) to ``patch_size``."""
        volume, plane, slice_index, positive, rng = self.draw(index, epoch)
        axis = PLANE_AXIS[plane]
        image_volume, label_volume = self.images[volume], self.labels[volume]
        window, pads = (slice(None), slice(None)), (0, 0)
        if self.stream:  # the label's row counts find a positive centre; only the window is read
            source = self.sources[volume]
            if self.patch_size is not None:
                centre = source.positive_centre(plane, slice_index, rng) if positive else None
                spatial = [n for a, n in enumerate(image_volume.shape[1:]) if a != axis]
                window, pads = self._window(spatial, centre, rng)
            label = source.label_window(plane, slice_index, window)
        else:
            label_slice = label_volume[(slice(None),) * (axis + 1) + (slice_index,)]  # (L, A, B) view
            if self.patch_size is not None:
                centre = None
                if positive:
                    pixels = np.argwhere(np.any(label_slice > 0, axis=0))
                    if len(pixels):
                        centre = pixels[int(rng.integers(len(pixels)))]
                window, pads = self._window(label_slice.shape[1:], centre, rng)
            label = label_slice[(slice(None), *window)]
        indices = slab_indices(slice_index, image_volume.shape[axis + 1], self.offsets)
        if self.stream:
            image = self.sources[volume].slab(axis, indices, window)
        else:
            where = [slice(None)] * 4
            where[axis + 1] = indices
            others = [a for a in (1, 2, 3) if a != axis + 1]
            where[others[0]], where[others[1]] = window
            image = np.moveaxis(image_volume[tuple(where)], axis + 1, 1)  # (C, k, h, w)
        image = image.reshape(-1, *image.shape[2:]).astype(np.float32)
        if self.patch_size is not None and image.shape[1:] != self.patch_size:
            image, label = _pad_to(image, self.patch_size, pads), _pad_to(label, self.patch_size, pads)
        label = label.astype(label.dtype if self.keep_label_dtype else np.float32)  # a copy, never the cache
        out = {"image": torch.from_numpy(np.ascontiguousarray(image)),
               "label": torch.from_numpy(np.ascontiguousarray(label))}
        if self.augment is not None:
            if hasattr(self.augment, "set_random_state"):
                self.augment.set_random_state(seed=int(rng.integers(2**32)))
            out = dict(self.augment(out))
            out = {k: (v.as_tensor() if hasattr(v, "as_tensor") else torch.as_tensor(v)) for k, v in out.items()}
        out.update(case=volume, plane=plane, slice=slice_index, positive=positive)
        return out

    def _window(self, shape, centre, rng: np.random.Generator):
        """``((rows, cols), (pad_rows, pad_cols))``: the crop of a slice of ``shape`` and the padding
        that centres it in ``patch_size``; a positive draw centres on ``centre``, one of its
        foreground pixels."""
        window, pads = [], []
        for axis in range(2):
            start, pad = _crop_window(int(shape[axis]), self.patch_size[axis],
                                      None if centre is None else int(centre[axis]), rng)
            window.append(slice(start, start + self.patch_size[axis]))
            pads.append(pad)
        return tuple(window), tuple(pads)


def _pad_to(array: np.ndarray, size: tuple[int, int], pads: tuple[int, int]) -> np.ndarray:
    """``(C, h, w)`` placed at ``pads`` in zeros of ``(C, *size)``."""
    out = np.zeros((array.shape[0], *size), array.dtype)
    out[:, pads[0]:pads[0] + array.shape[1], pads[1]:pads[1] + array.shape[2]] = array
    return out


__all__ = ["SlabDataset"]
