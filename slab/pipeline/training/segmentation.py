"""2.5D and 3D segmentation as training tasks: datalist split, label layouts, the network from the
config and the data, batches padded to the network's sizes, whole-volume validation with the
inference engines and thresholds swept per label."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from slab.pipeline.training.config import config_error
from slab.core.distributed import DistInfo
from slab.pipeline.training.losses import build_training_loss
from slab.pipeline.training.task import TrainTask
from slab.pipeline.training.validation import SegValidation, load_pair, volume_channels
from slab.core.errors import SlabError


def split_items(datalist, fold: int | None) -> tuple[list[dict], list[dict], dict]:
    """``(training, validation, datalist)``: items with paths resolved and checked to exist
    (:func:`slab.pipeline.data.datalist.load_datalist`), and the datalist itself (label names, format).

    With ``fold``, the items of that fold (from ``training`` and ``validation`` together) are the
    validation set; the folds group items by case, so no case is on both sides.
    """
    from slab.pipeline.data.datalist import load_datalist, read_datalist

    train_items, val_items = load_datalist(datalist, fold=fold)
    data = read_datalist(datalist)
    if not train_items:
        raise SlabError(f"datalist: no training items{'' if fold is None else f' outside fold {fold}'}")
    return list(train_items), list(val_items), data


def label_layout(datalist: dict, label_channels: int) -> tuple[str, int]:
    """``(label_format, number of labels)``: ``channels`` (one binary channel per label) or
    ``values`` (one channel, value ``i + 1`` is label ``i``), as the datalist declares."""
    fmt = datalist.get("label_format", "channels")
    if fmt not in ("channels", "values"):
        raise SlabError(f"datalist label_format: expected channels or values, got {fmt!r}")
    names = datalist.get("labels")
    if fmt == "values":
        if not names:
            raise SlabError("datalist: label_format 'values' needs the 'labels' list naming values 1..N")
        return fmt, len(names)
    if names and len(names) != label_channels:
        raise SlabError(f"datalist labels: {len(names)} names for labels of {label_channels} channels")
    return fmt, label_channels


def seg_target(label: np.ndarray, fmt: str, n_labels: int, loss: str) -> np.ndarray:
    """The training target of a label volume ``(C, X, Y, Z)``: float32 binary channels for
    ``dice_bce``, a one-channel int64 class map for ``dice_ce`` (0 = background)."""
    if loss == "dice_ce":
        if fmt == "values":
            return label[:1].astype(np.int64)
        classes = np.zeros((1, *label.shape[1:]), np.int64)
        for i in range(label.shape[0]):
            classes[0][label[i] > 0] = i + 1
        return classes
    if fmt == "values":
        return np.stack([label[0] == i + 1 for i in range(n_labels)]).astype(np.float32)
    return (label > 0).astype(np.float32)


def network_args(cfg: dict, spatial_dims: int, in_channels: int, out_channels: int) -> dict:
    """The ``build_network`` arguments: the config's, with dims and channels from the data."""
    net = dict(cfg["network"])
    for key, value in (("spatial_dims", spatial_dims), ("in_channels", in_channels), ("out_channels", out_channels)):
        if key in net and net[key] != value:
            raise config_error(f"network.{key}", f"{value} (from the task and the data)", net[key])
        net[key] = value
    return net


def network_options(net: dict) -> dict:
    """The MONAI options of ``build_network`` arguments (all but name, dims and channels)."""
    return {k: v for k, v in net.items() if k not in ("name", "spatial_dims", "in_channels", "out_channels")}


def build_model(net: dict, resumed: dict | None = None) -> nn.Module:
    """The network of a training config; training holds its weights, gradients and two AdamW
    moments, so the weights' bytes must fit four times before anything is allocated. A
    ``flexible_unet`` or ``sequence_classifier`` with ``encoder_weights`` starts from them
    (:func:`slab.networks.pretrained.load_encoder`); ``net["encoder_weights"]`` then becomes their
    provenance (source, sha256, licence), which the run's ``network.json`` and checkpoints carry.
    ``resumed``: the network of the checkpoint a resumed run continues from; its encoder's
    provenance stands for the encoder's file (not read again: the checkpoint's weights replace it)."""
    from slab.networks import build_network, parameter_count
    from slab.networks.pretrained import check_spec, load_encoder
    from slab.io.headers import check_memory

    try:
        count = parameter_count(net["name"], net["spatial_dims"], net["in_channels"], net["out_channels"],
                                **network_options(net))
        if count is not None:
            check_memory(16 * count, f"network {net['name']!r} ({count:,} parameters; weights, gradients and AdamW's "
                         "moments)", "; make it smaller")
        model = build_network(net["name"], net["spatial_dims"], net["in_channels"], net["out_channels"],
                              **network_options(net))
    except SlabError as err:
        raise SlabError(f"config {err}") from None
    recorded = (resumed or {}).get("encoder_weights")
    if net.get("encoder_weights") is not None and isinstance(recorded, dict) and "source" in recorded:
        net["encoder_weights"] = recorded
    spec = net.get("encoder_weights")
    if spec is not None and not (isinstance(spec, dict) and "source" in spec):  # a provenance is already loaded
        backbone = net.get("backbone", "efficientnet-b0")
        check_spec(spec, backbone, net["spatial_dims"])
        net["encoder_weights"] = load_encoder(model, spec, backbone)
    return model


class _SegmentationTask(TrainTask):
    """Shared by 2.5D and 3D: data split, label layout, network, loss, validation."""

    spatial_dims = 2

    def __init__(self, datalist, cfg: dict, fold: int | None, info: DistInfo, resumed: dict | None = None) -> None:
        """``resumed``: the network of the checkpoint a resumed run continues from (:func:`build_model`)."""
        from slab.networks import network_divisor, network_min_size

        self.cfg = cfg
        train_items, val_items, data = split_items(datalist, fold)
        for item in train_items + val_items:
            if "label" not in item:
                raise SlabError(f"{item['image']}: datalist item without a label")
        self.train_items = train_items
        self.n_samples = cfg["samples_per_epoch"]
        self.loss_fn = build_training_loss(cfg, self.spatial_dims)
        first = train_items[0]
        self.image_channels = sum(volume_channels(p, "image") for p in first["image"]) \
            if isinstance(first["image"], list) else volume_channels(first["image"], "image")
        self.label_channels = volume_channels(first["label"], "label")
        self.fmt, self.n_labels = label_layout(data, self.label_channels)
        names = data.get("labels")
        self.label_names = list(names) if isinstance(names, list) and len(names) == self.n_labels else None
        self.network = network_args(cfg, self.spatial_dims, self.in_channels(), self.n_labels)
        self.model = build_model(self.network, resumed)
        self.divisor = network_divisor(self.network["name"], self.spatial_dims, **network_options(self.network))
        self.min_size = network_min_size(self.network["name"], self.spatial_dims, **network_options(self.network))
        self.validation = None
        self.val_items = val_items
        self.info = info
        # exclusive classes (dice_ce) are a softmax with the background logit 0, masks by argmax
        self.activation = "softmax" if cfg["loss"] == "dice_ce" else "sigmoid"
        self.priors: dict | None = None  # the loss's logit adjustment (slab.pipeline.training.prior)
        self._adjustment: torch.Tensor | None = None

    def start_validation(self) -> None:
        """Load (this rank's share of) the validation volumes; after the training data checks."""
        if self.val_items:
            self.validation = SegValidation(self.val_items, self.cfg, self.fmt, self.n_labels, self.predict, self.info,
                                            self.image_channels)

    def in_channels(self) -> int:
        raise NotImplementedError

    def inference_spec(self, threshold) -> dict:
        from slab.pipeline.model.spec import inference_spec

        return inference_spec(self.cfg, self.network, self.label_names, threshold)

    def label_transform(self, label) -> np.ndarray:
        return seg_target(np.asarray(label), self.fmt, self.n_labels, self.cfg["loss"])

    def check_channels(self, name: str, image_channels: int, label_channels: int) -> None:
        if image_channels != self.image_channels or label_channels != self.label_channels:
            raise SlabError(
                f"{name}: {image_channels} image / {label_channels} label channels; the first training "
                f"item has {self.image_channels} / {self.label_channels}"
            )

    def predict(self, model: nn.Module, image: torch.Tensor, device: torch.device, **streamed) -> np.ndarray:
        """Validation probabilities of ``image``; with ``streamed`` (out_path, out_dtype,
        preprocess) a lazy volume predicted out of core, returned lazily."""
        raise NotImplementedError

    def volume_counts(self) -> np.ndarray:
        """The training labels' value counts (:func:`slab.pipeline.data.stream.value_counts`),
        summed over the training volumes: the prior that prediction meets."""
        raise NotImplementedError

    def loss(self, model, batch, device):
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        logits = model(images).float()
        adjustment = (self.priors or {}).get("adjustment")
        if adjustment and any(adjustment):  # the samples' prior over the volumes' (prior.py)
            if self._adjustment is None or self._adjustment.device != logits.device:
                self._adjustment = torch.tensor(adjustment, dtype=torch.float32, device=logits.device)
            logits = logits + self._adjustment.view(1, -1, *([1] * (logits.ndim - 2)))
        return self.loss_fn(logits, labels)

    def batch_images(self, batch) -> int:
        return int(batch["image"].shape[0])

    def has_validation(self) -> bool:
        return self.validation is not None

    def validation_items(self) -> list:
        return self.validation.indices()

    def validate_item(self, model, device, item):
        return self.validation.curves(model, device, item)

    def summarize_validation(self, parts, info):
        return self.validation.summarize(parts, info)

    def report_pictures(self, folder: Path, threshold) -> list[tuple[str, Path]]:
        return self.validation.pictures(folder, threshold, self.label_names or []) if self.validation else []


class _PadCollate:
    """Batch samples of different sizes: zero-pad images and labels to the largest, rounded up
    to the network's divisor and at least its minimum size (extra voxels after the data, so
    crops stay aligned)."""

    def __init__(self, divisor: int, min_size: int = 1) -> None:
        self.divisor, self.min_size = divisor, min_size

    def __call__(self, samples: list[dict]) -> dict:
        import torch.nn.functional as F

        from slab.networks import padded_size

        dims = samples[0]["image"].ndim - 1
        size = [max(s["image"].shape[1 + d] for s in samples) for d in range(dims)]
        size = [padded_size(n, self.divisor, self.min_size) for n in size]
        out = {}
        for key in ("image", "label"):
            padded = []
            for s in samples:
                x = torch.as_tensor(s[key])
                pad = []
                for d in reversed(range(dims)):
                    pad += [0, size[d] - x.shape[1 + d]]
                padded.append(F.pad(x, pad) if any(pad) else x)
            out[key] = torch.stack(padded)
        return out


class Segmentation2p5DTask(_SegmentationTask):
    """2.5D slabs from :class:`slab.pipeline.data.slabs.SlabDataset`: planes, offsets, positive-weighted
    slices, optional crop, :class:`slab.transforms.augment.RandSlabAugmentd`; whole-volume validation
    through :func:`slab.pipeline.inference.predict_2p5d` over ``val.planes`` with ``val.tta``."""

    def __init__(self, datalist, cfg, fold, info, resumed=None) -> None:
        super().__init__(datalist, cfg, fold, info, resumed)
        from slab.pipeline.data.slabs import SlabDataset
        from slab.transforms.augment import RandSlabAugmentd

        augment = None
        if cfg["augment"] is not None:
            try:
                augment = RandSlabAugmentd(**cfg["augment"])
            except SlabError as err:
                raise SlabError(f"config augment.{err}") from None
        self.dataset = SlabDataset(
            self.train_items, offsets=cfg["offsets"], planes=cfg["planes"], samples_per_epoch=self.n_samples,
            positive_fraction=cfg["positive_fraction"], patch_size=cfg["patch_size"], normalize=cfg["normalize"],
            augment=augment, label_transform=self.label_transform, seed=cfg["seed"], stream=cfg["stream"],
        )
        targets = self.dataset.label_channels[0]
        for name, image, labels in zip(self.dataset.names, self.dataset.images, self.dataset.label_channels):
            if image.shape[0] != self.image_channels or labels != targets:
                raise SlabError(f"{name}: {image.shape[0]} image channels / {labels} label targets; the first "
                                f"training item has {self.image_channels} / {targets}")
        self.collate = _PadCollate(self.divisor, self.min_size)
        self.start_validation()

    def volume_counts(self) -> np.ndarray:
        from slab.pipeline.data.stream import add_counts, value_counts

        parts = [source.values for source in self.dataset.sources] if self.dataset.stream else \
            [value_counts(label) for label in self.dataset.labels]
        return functools.reduce(add_counts, parts)

    def in_channels(self) -> int:
        return self.image_channels * len(self.cfg["offsets"])

    def sample(self, index: int, epoch: int):
        return self.dataset.sample(index, epoch)

    def predict(self, model, image, device, **streamed):
        from slab.pipeline.inference import predict_2p5d

        val = self.cfg["val"]
        prob = predict_2p5d(model, image, planes=val["planes"] or self.cfg["planes"], offsets=self.cfg["offsets"],
                            tta=val["tta"], batch_size=val["batch_size"], device=device, amp=self.cfg["amp"],
                            divisor=self.divisor, min_size=self.min_size, activation=self.activation, **streamed)
        return prob if streamed else np.asarray(prob)


class Segmentation3DTask(_SegmentationTask):
    """3D patches: ``RandCropByPosNegLabeld`` (pos/neg balance ``pos_neg``) from volumes held in
    memory (with ``stream``, the same draw from volumes read in parts:
    :class:`slab.pipeline.data.patches.StreamedPatches`), then RandFlipd (each axis), RandRotate90d (xy, square patches only),
    RandScaleIntensityd and RandShiftIntensityd (``AUGMENT_3D``)."""

    spatial_dims = 3

    def __init__(self, datalist, cfg, fold, info, resumed=None) -> None:
        super().__init__(datalist, cfg, fold, info, resumed)
        from monai.transforms import Compose, FgBgToIndicesd, SpatialPadd

        prepare = Compose([SpatialPadd(["image", "label"], cfg["patch_size"]), FgBgToIndicesd("label")])
        if any(p % self.divisor or p < self.min_size for p in cfg["patch_size"]):
            raise config_error("patch_size", f"multiples of the network's divisor {self.divisor}, each at least "
                        f"{self.min_size}", cfg["patch_size"])
        from slab.pipeline.data.stream import value_counts

        self.volumes, self.counts = [], []
        if cfg["stream"]:
            self._stream()
        else:
            for item in self.train_items:
                image, label, _, _ = load_pair(item, cfg["normalize"])
                self.check_channels(str(item["image"]), image.shape[0], label.shape[0])
                target = torch.as_tensor(self.label_transform(label))
                self.counts.append(value_counts(target))  # before the padding: what prediction meets
                self.volumes.append(prepare({"image": image, "label": target}))
            self.transform = self._augmentation()
        self.start_validation()

    def _stream(self) -> None:
        """The training volumes opened, not loaded (:mod:`slab.pipeline.data.patches`)."""
        from monai.transforms import Compose

        from slab.pipeline.data.patches import StreamedPatches, StreamedVolume
        from slab.transforms.intensity import make_normalize
        from slab.io.volumes import check_same_geometry, open_volume

        normalize = make_normalize(self.cfg["normalize"])
        for item in self.train_items:
            names = [str(item["image"]), str(item["label"])]
            image, label = open_volume(item["image"]), open_volume(item["label"])
            check_same_geometry(image, label, names=names)
            self.check_channels(names[0], image.shape[0], label.shape[0])
            block = None if normalize is None else normalize.block_transform(image, names[0])
            self.volumes.append(StreamedVolume(image, label, self.cfg["patch_size"], block, self.label_transform,
                                               names[0]))
        augment = self._augmentation().transforms[1:]  # all but the crop, which the volumes do
        self.patches = StreamedPatches(self.volumes, self.cfg["pos_neg"], Compose(augment) if augment else None)

    def volume_counts(self) -> np.ndarray:
        from slab.pipeline.data.stream import add_counts

        return functools.reduce(add_counts, [v.values for v in self.volumes] if self.cfg["stream"] else self.counts)

    def in_channels(self) -> int:
        return self.image_channels

    def _augmentation(self):
        from monai.transforms import (Compose, RandCropByPosNegLabeld, RandFlipd, RandRotate90d,
                                      RandScaleIntensityd, RandShiftIntensityd)

        cfg, keys = self.cfg, ["image", "label"]
        pos, neg = cfg["pos_neg"]
        steps = [RandCropByPosNegLabeld(keys, "label", cfg["patch_size"], pos=pos, neg=neg, num_samples=1,
                                        fg_indices_key="label_fg_indices", bg_indices_key="label_bg_indices")]
        aug = cfg["augment"]
        if aug is not None:
            steps += [RandFlipd(keys, prob=aug["flip_prob"], spatial_axis=a) for a in range(3)]
            if cfg["patch_size"][0] == cfg["patch_size"][1]:
                steps.append(RandRotate90d(keys, prob=aug["rot90_prob"], spatial_axes=(0, 1)))
            steps += [RandScaleIntensityd("image", factors=aug["scale_intensity"], prob=aug["intensity_prob"]),
                      RandShiftIntensityd("image", offsets=aug["shift_intensity"], prob=aug["intensity_prob"])]
        return Compose(steps)

    def sample(self, index: int, epoch: int):
        # every volume equally often: a permutation per round of len(volumes) samples
        n = len(self.volumes)
        order = np.random.default_rng([self.cfg["seed"], epoch, index // n]).permutation(n)
        if self.cfg["stream"]:
            return self.patches.sample(int(order[index % n]), np.random.default_rng([self.cfg["seed"], epoch, index]))
        volume = self.volumes[order[index % n]]
        patch = self.transform(volume)[0]  # RandCropByPosNegLabeld gives a list of num_samples=1
        return {k: torch.as_tensor(patch[k]).as_subclass(torch.Tensor) for k in ("image", "label")}

    def predict(self, model, image, device, **streamed):
        from slab.pipeline.inference import predict_3d

        val = self.cfg["val"]
        prob = predict_3d(model, image, roi_size=self.cfg["patch_size"], overlap=val["overlap"], tta=val["tta"],
                          sw_batch_size=val["batch_size"], device=device, amp=self.cfg["amp"],
                          activation=self.activation, **streamed)
        return prob if streamed else np.asarray(prob)

