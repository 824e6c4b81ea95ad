"""Training data: Decathlon-style datalists, the 2.5D slab sampler and slice sequences.

:func:`load_datalist` reads a ``datalist.json`` (``training`` and ``validation`` lists of
``{"image": ..., "label": ..., "fold": k}``), resolves paths against the file's folder and
checks that every file exists. With ``fold=k`` the items of fold ``k`` (from both lists) are
the validation set and all others the training set; adapters assign folds by case, so no
case lands on both sides.

:class:`SlabDataset` draws 2.5D training samples. Sample ``i`` of epoch ``e`` is a function of
``(seed, e, i)`` only: a plane among ``planes`` (xy, zx, zy), a volume, and a slice — with
probability ``positive_fraction`` a slice whose label has foreground, otherwise a slice without
(any slice when every slice has foreground) — then the slab of ``offsets`` around it, an
optional crop to ``patch_size`` (centred on a foreground pixel for positive draws) and optional
augmentation. Volumes are loaded, checked and normalised once, when the dataset is built.

Slice sequences, the input of the slice-sequence classifier (training, validation and
inference build them the same way): :func:`volume_sequences` turns a volume and an optional
label of target values ``1..N`` into one sequence of ``n_slabs`` slabs per target present in
the label — slab centres (:func:`slab_centres`) evenly over the slices the target spans along
the plane's normal, cropped in-plane to the target's box and resized (:func:`build_sequence`) —
or, without a label, one sequence over the whole volume (target ``patient_overall``).
:func:`study_sequences` adds a datalist item's study id and targets for training.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from transforms.checks import read_json_object
from transforms.errors import SlabError
from transforms.intensity import PercentileNormalize
from transforms.slab import PLANE_AXIS, check_offsets, extract_slab, plane_axis

PATH_KEYS = ("image", "label")


# ---------------------------------------------------------------------------------------------
# Datalists


def _item_problem(item, split: str, i: int) -> str | None:
    """What is wrong with one datalist item, or None."""
    where = f"{split}[{i}]"
    if not isinstance(item, Mapping):
        return f"{where} is not an object with an 'image'"
    if "image" not in item:
        return f"{where} has no 'image'"
    image = item["image"]
    paths = image if isinstance(image, list) else [image]
    if not paths or not all(isinstance(p, str) and p.strip() for p in paths):
        return f"{where} 'image' is {image!r}; expected a file path or a list of paths (channels)"
    if "label" in item and not (isinstance(item["label"], str) and item["label"].strip()):
        return f"{where} 'label' is {item['label']!r}; expected a file path"
    fold = item.get("fold", 0)
    if isinstance(fold, bool) or not isinstance(fold, int) or fold < 0:
        return f"{where} 'fold' is {fold!r}; expected an integer >= 0"
    if "case" in item and not isinstance(item["case"], (str, int)) or isinstance(item.get("case"), bool):
        return f"{where} 'case' is {item['case']!r}; expected a name"
    if "targets" in item and not (isinstance(item["targets"], Mapping) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in item["targets"].values())):
        return f"{where} 'targets' is {item['targets']!r}; expected an object of 0/1 values"
    return None


def check_datalist(data, name: str) -> None:
    """SlabError naming the datalist and the first bad item or field: lists of objects with an
    ``image`` (a path or a list of paths), optional ``label`` (a path), ``fold`` (an integer
    >= 0), ``case``, ``targets``; ``n_folds`` a positive integer; ``labels`` a list of names."""
    if not isinstance(data, Mapping) or not isinstance(data.get("training"), list):
        raise SlabError(f"{name}: expected a JSON object with a 'training' list")
    if not isinstance(data.get("validation", []), list):
        raise SlabError(f"{name}: 'validation' must be a list")
    for split in ("training", "validation"):
        for i, item in enumerate(data.get(split, [])):
            problem = _item_problem(item, split, i)
            if problem:
                raise SlabError(f"{name}: {problem}")
    if "n_folds" in data:
        n = data["n_folds"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise SlabError(f"{name}: 'n_folds' is {n!r}; expected a positive integer")
        folds = [int(item.get("fold", 0)) for split in ("training", "validation") for item in data.get(split, [])]
        if folds and max(folds) >= n:
            raise SlabError(f"{name}: an item has fold {max(folds)}, but 'n_folds' is {n}")
    labels = data.get("labels")
    if labels is not None and not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
        raise SlabError(f"{name}: 'labels' is {labels!r}; expected a list of names")
    if not isinstance(data.get("label_format", "channels"), str):
        raise SlabError(f"{name}: 'label_format' must be channels or values")


def _resolve(value, base: Path | None, name: str, datalist_name: str = ""):
    if isinstance(value, (list, tuple)):
        return [_resolve(v, base, name, datalist_name) for v in value]
    if not isinstance(value, (str, Path)):
        return value  # already an array or tensor
    path = Path(value).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    if not path.exists():
        raise SlabError(f"{path}: {name} file listed in the datalist {datalist_name} does not exist")
    return str(path)


def datalist_paths(datalist) -> list[str]:
    """Every image and label path a datalist file lists, resolved against its folder (for the
    check that no output overwrites them); an unreadable datalist lists none (its load says why)."""
    path = Path(datalist)
    try:
        data = read_json_object(path, "datalist")
        check_datalist(data, str(path))
    except SlabError:
        return []
    found = []
    for item in data.get("training", []) + data.get("validation", []):
        for key in PATH_KEYS:
            values = item.get(key, [])
            for value in values if isinstance(values, list) else [values]:
                candidate = Path(value).expanduser()
                found.append(str(candidate if candidate.is_absolute() else path.parent / candidate))
    return found


def load_datalist(datalist, fold: int | None = 0, base_dir=None) -> tuple[list[dict], list[dict]]:
    """``(training, validation)`` items of a Decathlon-style datalist, paths resolved and checked.

    Parameters
    ----------
    datalist : path to a JSON file, or the parsed dict
        ``{"training": [{"image": ..., "label": ..., "fold": k}, ...], "validation": [...]}``
        as ``slab dataset`` writes it (fold 0 in ``validation``); ``image`` may be a list of
        files (channels).
    fold : int or None
        ``k``: every item whose ``fold`` is ``k`` (from both lists) is validation, every other
        item training (``pipeline.adapters.split_datalist``). A datalist whose items carry no
        ``fold`` has only its own split, fold 0. None: the file's own two lists.
    base_dir : folder relative paths are resolved against (default the datalist's folder, or the
        working directory for a dict).

    Returns
    -------
    (list of dict, list of dict)
        Copies of the items with absolute ``image``/``label`` paths, every file checked to exist.
    """
    path = None
    if isinstance(datalist, Mapping):
        data = datalist
    else:
        path = Path(datalist)
        data = read_json_object(path, "datalist")
    name = str(path) if path is not None else "datalist"
    check_datalist(data, name)
    validation = data.get("validation", [])
    base = Path(base_dir) if base_dir is not None else (path.parent if path is not None else None)

    def resolved(items: list, split: str) -> list[dict]:
        out = []
        for i, item in enumerate(items):
            if not isinstance(item, Mapping) or "image" not in item:
                raise SlabError(f"{name}: {split}[{i}] is not an object with an 'image'")
            entry = dict(item)
            for key in PATH_KEYS:
                if key in entry:
                    entry[key] = _resolve(entry[key], base, key, name)
            out.append(entry)
        return out

    training, validation = resolved(data["training"], "training"), resolved(validation, "validation")
    if fold is None:
        return training, validation
    if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)):
        raise SlabError(f"fold: expected an integer, got {fold!r}")
    pool = training + validation
    with_fold = [item for item in pool if "fold" in item]
    if not with_fold and int(fold) == 0:
        return training, validation
    if not pool:
        raise SlabError(f"{name}: no items to split into folds")
    if len(with_fold) != len(pool):
        raise SlabError(f"{name}: fold {fold} needs a 'fold' on every item; some items have none")
    from pipeline.adapters import split_datalist

    n_folds = int(data.get("n_folds", max(int(item["fold"]) for item in pool) + 1))
    return split_datalist({"n_folds": n_folds, "training": training, "validation": validation}, int(fold))


# ---------------------------------------------------------------------------------------------
# The 2.5D slab sampler


def _load(value, name: str):
    """A volume from a path (or list of paths), or an in-memory array / tensor as it is."""
    from transforms.io import load_volume

    paths = isinstance(value, (list, tuple)) and value and isinstance(value[0], (str, Path))
    if isinstance(value, (str, Path)) or paths:
        return load_volume(value)
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value
    raise SlabError(f"{name}: expected a file path or a (C, X, Y, Z) array, got {type(value).__name__}")


def _numpy(volume) -> np.ndarray:
    if isinstance(volume, torch.Tensor):
        volume = volume.as_tensor() if hasattr(volume, "as_tensor") else volume
        return volume.detach().cpu().numpy()
    return np.asarray(volume)


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise SlabError(f"{name}: expected a positive integer, got {value!r}")
    return int(value)


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
    offsets : slab offsets (``transforms.slab.slab_offsets``).
    planes : planes to sample, each with equal probability.
    samples_per_epoch : ``len(dataset)``.
    positive_fraction : share of samples drawn from slices whose label has foreground.
    patch_size : (H, W), optional
        Crop (or centre-pad with zeros) every sample to this size; needed for batching when the
        planes' slices differ in size. None: whole slices.
    normalize : PercentileNormalize, dict of its arguments, or None (image used as stored).
    augment : callable on ``{"image", "label"}`` (e.g. ``RandSlabAugmentd``), optional. A MONAI
        Randomizable is reseeded per sample, so augmentation is reproducible too.
    label_transform : callable mapping the label volume to the training target once at load
        (e.g. BraTS values to channels); its result's ``> 0`` marks foreground.
    seed : base seed; sample ``i`` of epoch ``e`` depends only on ``(seed, e, i)``.
    cache_dtype : ``float32`` or ``float16`` storage of normalised images (samples are float32).

    Each sample is ``{"image": float32 (C*k, H, W), "label": float32 (L, H, W) (or the
    label_transform's dtype), "case": int, "plane": str, "slice": int, "positive": bool}``; the
    default collate batches them.
    """

    def __init__(self, items: Sequence[Mapping], offsets=(-1, 0, 1), planes: Sequence[str] = ("xy", "zx", "zy"),
                 samples_per_epoch: int = 1000, positive_fraction: float = 0.5, patch_size=None,
                 normalize: PercentileNormalize | Mapping | None = None, augment: Callable | None = None,
                 label_transform: Callable | None = None, seed: int = 0, cache_dtype: str = "float32"):
        self.offsets = check_offsets(offsets)
        planes = [planes] if isinstance(planes, str) else list(planes)
        if not planes:
            raise SlabError("planes: expected at least one of xy, zx, zy")
        for plane in planes:
            plane_axis(plane)
        self.planes = tuple(planes)
        self.samples_per_epoch = _positive_int(samples_per_epoch, "samples_per_epoch")
        if isinstance(positive_fraction, bool) or not 0 <= float(positive_fraction) <= 1:
            raise SlabError(f"positive_fraction: expected a number in [0, 1], got {positive_fraction!r}")
        self.positive_fraction = float(positive_fraction)
        if patch_size is not None:
            patch_size = tuple(_positive_int(p, "patch_size") for p in patch_size)
            if len(patch_size) != 2:
                raise SlabError(f"patch_size: expected (H, W), got {patch_size}")
        self.patch_size = patch_size
        if isinstance(normalize, Mapping):
            normalize = PercentileNormalize(**normalize)
        self.normalize = normalize
        self.augment = augment
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise SlabError(f"seed: expected an integer, got {seed!r}")
        self.seed = int(seed)
        if cache_dtype not in ("float32", "float16"):
            raise SlabError(f"cache_dtype: expected float32 or float16, got {cache_dtype!r}")
        self.epoch = 0
        self.keep_label_dtype = label_transform is not None
        if not items:
            raise SlabError("items: no training volumes")
        self.images: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.names: list[str] = []
        # foreground flag of every slice, per volume and plane: {plane: bool (n_slices,)}
        self.slice_has_label: list[dict[str, np.ndarray]] = []
        for i, item in enumerate(items):
            self._add(i, item, label_transform, np.dtype(cache_dtype))

    # -- loading ------------------------------------------------------------------------------

    def _add(self, i: int, item: Mapping, label_transform, cache_dtype: np.dtype) -> None:
        from transforms.io import check_same_geometry

        if "image" not in item or "label" not in item:
            raise SlabError(f"items[{i}]: expected 'image' and 'label'")
        names = [str(item["image"]) if isinstance(item["image"], (str, Path, list, tuple)) else f"items[{i}] image",
                 str(item["label"]) if isinstance(item["label"], (str, Path)) else f"items[{i}] label"]
        image, label = _load(item["image"], names[0]), _load(item["label"], names[1])
        for volume, name in zip((image, label), names):
            if len(volume.shape) != 4:
                raise SlabError(f"{name}: expected a (C, X, Y, Z) volume, got shape {tuple(volume.shape)}")
        if hasattr(image, "affine") and hasattr(label, "affine"):
            check_same_geometry(image, label, names=names)
        elif tuple(image.shape[1:]) != tuple(label.shape[1:]):
            raise SlabError(f"{names[1]}: spatial shape {tuple(label.shape[1:])} does not match {names[0]} "
                            f"{tuple(image.shape[1:])}")
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
        """Sample ``index`` of ``epoch`` (what ``dataset[index]`` gives after ``set_epoch(epoch)``)."""
        volume, plane, slice_index, positive, rng = self.draw(index, epoch)
        image = extract_slab(self.images[volume], plane, slice_index, self.offsets).astype(np.float32, copy=False)
        label = extract_slab(self.labels[volume], plane, slice_index, (0,))
        if self.patch_size is not None:
            image, label = self._crop(image, label, positive, rng)
        if not self.keep_label_dtype:
            label = label.astype(np.float32)
        out = {"image": torch.from_numpy(np.ascontiguousarray(image)),
               "label": torch.from_numpy(np.ascontiguousarray(label))}
        if self.augment is not None:
            if hasattr(self.augment, "set_random_state"):
                self.augment.set_random_state(seed=int(rng.integers(2**32)))
            out = dict(self.augment(out))
            out = {k: (v.as_tensor() if hasattr(v, "as_tensor") else torch.as_tensor(v)) for k, v in out.items()}
        out.update(case=volume, plane=plane, slice=slice_index, positive=positive)
        return out

    def _crop(self, image: np.ndarray, label: np.ndarray, positive: bool, rng: np.random.Generator):
        centre = None
        if positive:
            pixels = np.argwhere(np.any(label > 0, axis=0))
            if len(pixels):
                centre = pixels[int(rng.integers(len(pixels)))]
        starts, pads = [], []
        for axis in range(2):
            start, pad = _crop_window(image.shape[axis + 1], self.patch_size[axis],
                                      None if centre is None else int(centre[axis]), rng)
            starts.append(start)
            pads.append(pad)
        h, w = self.patch_size
        window = (slice(None), slice(starts[0], starts[0] + h), slice(starts[1], starts[1] + w))
        image, label = image[window], label[window]
        if image.shape[1:] != (h, w):
            out_i = np.zeros((image.shape[0], h, w), image.dtype)
            out_l = np.zeros((label.shape[0], h, w), label.dtype)
            place = (slice(None), slice(pads[0], pads[0] + image.shape[1]), slice(pads[1], pads[1] + image.shape[2]))
            out_i[place], out_l[place] = image, label
            image, label = out_i, out_l
        return image, label


# ---------------------------------------------------------------------------------------------
# Slice sequences


OVERALL = "patient_overall"


def slab_centres(z_lo: int, z_hi: int, n: int) -> np.ndarray:
    """``n`` slice indices evenly spaced over ``[z_lo, z_hi]`` (inclusive), rounded.

    >>> slab_centres(0, 28, 5).tolist()
    [0, 7, 14, 21, 28]
    """
    if n == 1:
        return np.array([int(round((z_lo + z_hi) / 2))])
    return np.rint(np.linspace(z_lo, z_hi, n)).astype(np.int64)


def _bbox(mask: np.ndarray, margin: float) -> tuple[slice, slice]:
    """In-plane bounding box ``(H, W)`` of a 2D mask, grown by ``margin`` of its size per side."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    h0, h1, w0, w1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    dh, dw = int(round((h1 - h0) * margin)), int(round((w1 - w0) * margin))
    return (slice(max(0, h0 - dh), min(mask.shape[0], h1 + dh)), slice(max(0, w0 - dw), min(mask.shape[1], w1 + dw)))


def build_sequence(image: np.ndarray, centres: np.ndarray, plane: str, offsets, size, box=None) -> torch.Tensor:
    """``(N, C*k, H, W)`` float16: the slab at each centre slice, cropped to ``box`` (in-plane
    slices) and resized (bilinear) to ``size``."""
    slabs = []
    for z in centres:
        slab = extract_slab(image, plane=plane, index=int(z), offsets=offsets)
        slab = torch.from_numpy(np.ascontiguousarray(slab, dtype=np.float32))
        if box is not None:
            slab = slab[:, box[0], box[1]]
        slabs.append(F.interpolate(slab[None], size=tuple(size), mode="bilinear", align_corners=False)[0])
    return torch.stack(slabs).to(torch.float16)


def volume_sequences(image: np.ndarray, label: np.ndarray | None = None, *, targets: Sequence[str] = (),
                     n_slabs: int, offsets, plane: str, size, crop_margin: float = 0.1) -> list[dict]:
    """The slice sequences of one volume: ``[{"target", "slices", "slabs"}]``.

    Parameters
    ----------
    image : (C, X, Y, Z) float array, normalised.
    label : (1, X, Y, Z) array of target values, optional
        Value ``i + 1`` is ``targets[i]``. Each target present gets one sequence: ``n_slabs``
        slab centres evenly over the slices it spans along ``plane``'s normal, every slab
        cropped to the target's in-plane box (grown by ``crop_margin`` of its size per side).
        Targets absent from the label get none. Without a label: one sequence over every slice
        of the whole volume, target ``"patient_overall"``.
    targets : names of the label values ``1..N`` (needed with a label).
    n_slabs, offsets, plane, size : slabs per sequence, slab offsets, plane, ``(H, W)``.

    Returns
    -------
    list of dict
        ``target`` (name), ``slices`` (int64 ``(n_slabs,)``, the centre slice of each slab)
        and ``slabs`` (float16 ``(n_slabs, C*k, H, W)``, :func:`build_sequence`).
    """
    axis = plane_axis(plane)
    if label is None:
        centres = slab_centres(0, image.shape[axis + 1] - 1, n_slabs)
        return [{"target": OVERALL, "slices": centres, "slabs": build_sequence(image, centres, plane, offsets, size)}]
    label = np.asarray(label)
    if label.ndim != 4 or label.shape[0] != 1 or label.shape[1:] != image.shape[1:]:
        raise SlabError(f"label: expected a one-channel (1, X, Y, Z) label of target values matching the image's "
                        f"{tuple(image.shape[1:])}, got shape {tuple(label.shape)}")
    if not targets:
        raise SlabError("targets: a label needs the names of its values 1..N (e.g. C1..C7)")
    out = []
    for i, name in enumerate(targets):
        mask = label[0] == i + 1
        along = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        if along.size == 0:
            continue  # this volume's label does not show the target: no sequence for it
        box = _bbox(mask.any(axis=axis), crop_margin)
        centres = slab_centres(int(along[0]), int(along[-1]), n_slabs)
        out.append({"target": name, "slices": centres,
                    "slabs": build_sequence(image, centres, plane, offsets, size, box)})
    return out


def study_sequences(item: dict, image: np.ndarray, label: np.ndarray | None, names: list[str], cfg: dict) -> list[dict]:
    """The training sequences of one study (:func:`volume_sequences` with the training config's
    ``classification`` settings and ``offsets``), each with the study id and its target ``y``
    from the item's ``targets``. The whole-volume sequence of an unlabelled study is scored
    against ``patient_overall`` (or, lacking it, whether any target is positive: target ``any``).
    """
    c = cfg["classification"]
    targets = item.get("targets")
    if not isinstance(targets, dict) or not targets:
        raise SlabError(f"{item['image']}: datalist item without 'targets' (e.g. {{\"C1\": 0, ...}})")
    if label is not None:
        for name in names:
            if name not in targets:
                raise SlabError(f"{item['image']}: targets lack {name!r} (datalist labels: {', '.join(names)})")
    sequences = volume_sequences(image, label, targets=names, n_slabs=c["n_slabs"], offsets=cfg["offsets"],
                                 plane=c["plane"], size=c["image_size"], crop_margin=c["crop_margin"])
    study = str(item.get("id", item["image"]))
    out = []
    for seq in sequences:
        target, y = seq["target"], None
        if label is None and OVERALL not in targets:
            target, y = "any", float(max(float(v) for v in targets.values()))
        out.append({"study": study, "target": target, "y": float(targets[target]) if y is None else y,
                    "slabs": seq["slabs"]})
    return out


__all__ = ["load_datalist", "SlabDataset", "slab_centres", "build_sequence", "volume_sequences", "study_sequences",
           "OVERALL"]
