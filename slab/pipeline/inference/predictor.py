"""A configured network and everything inference needs: :class:`Predictor` (from a network
config and weights, or from a bundle's ``"slab"`` section read as data), and the thresholds
recorded on validation beside a model (:func:`recorded_postprocess`)."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch

from slab.networks import build_network, load_weights, network_divisor, network_min_size
from slab.core.device import amp_dtype, resolve_device
from slab.pipeline.inference.forward import ACTIVATIONS, as_float, check_choice, check_planes
from slab.pipeline.inference.multiplane import predict_2p5d
from slab.pipeline.inference.window import predict_3d
from slab.pipeline.paths import bundle_dir
from slab.core.checks import MODES, PLANES, TTA_MODES, TTA_MODES_3D, positive_int, read_json_object
from slab.core.errors import SlabError
from slab.pipeline.model.spec import InferenceSpec, check_probability_thresholds
from slab.transforms.intensity import make_normalize
from slab.io.volumes import LazyVolume
from slab.io.labelmap import check_label_map
from slab.transforms.post import make_postprocess
from slab.transforms.slabs import check_offsets, slab_offsets


DEFAULT_NORMALIZE = MappingProxyType({"lower": 0.5, "upper": 99.5})


# The network_config keys that configure inference rather than build_network.
INFERENCE_KEYS = ("offsets", "planes", "roi_size", "labels", "label_map")


# The keys of a bundle's configs/inference.json "slab" section (see Predictor.from_bundle).
BUNDLE_KEYS = ("network", "labels", "label_map", "mode", "planes", "offsets", "tta", "normalize", "postprocess", "roi_size",
               "overlap", "scales", "activation",
               "batch_size", "sw_batch_size")


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
        A local checkpoint (``slab.networks.load_weights``); None keeps the initial weights.
    mode : ``"2.5d"`` or ``"3d"``; default from ``spatial_dims`` (2 or 3).
    planes, offsets, tta : 2.5D settings (:func:`predict_2p5d`); default all planes, no TTA.
    normalize : normalisation settings (``slab.transforms.intensity.make_normalize``: per-volume
        percentiles, a fixed dataset window, z-score), a normalisation, or None for an input
        that is already normalised. Default: 0.5 and 99.5 percentiles of each volume.
    postprocess : dict of ``slab.transforms.post.postprocess`` arguments (``threshold``,
        ``hysteresis``, ``min_size``, ``keep_largest``, ``fill_holes``, ``connectivity``);
        default ``{"threshold": 0.5}``. ``threshold`` may be one value per output channel
        (``hysteresis`` one ``(low, high)`` pair per channel). With ``activation="softmax"`` the
        default is ``{"argmax": true}``: each voxel to its most probable class.
    activation : ``"sigmoid"`` (default: each label on its own, overlapping labels and regions)
        or ``"softmax"`` (exclusive classes, the background logit 0, as ``dice_ce`` trains them;
        :func:`slab.pipeline.inference.forward.activate`).
    device, amp, batch_size, memory_budget, progress, compile : see :func:`predict_2p5d`
        (``amp`` may be a precision: ``"auto"``, ``"fp32"``, ``"bf16"``, ``"fp16"``).
    roi_size, overlap, sw_batch_size : 3D settings (:func:`predict_3d`).
    scales : multi-scale test-time inference: the volume is also predicted resampled by each
        factor (trilinear; e.g. ``(1, 1.5)`` for test scans coarser than the training ones) and
        the probabilities, resampled back, averaged. Default ``(1,)``. In memory.
    labels : names of the output channels (written into multi-label RLE CSVs); default
        ``label_1``, ``label_2``, ... A network config may carry them as ``labels``.
    label_map : how a multi-label mask becomes one label volume
        (:func:`slab.io.labelmap.to_label_map`): ``{"values": [...], "order": [...]}``,
        the value of each channel (default 1..L) and the painting order (default channel order;
        a later channel wins where they overlap). A network config may carry it.
    """

    def __init__(self, network_config: Mapping, weights=None, *, mode: str | None = None, planes=None, offsets=None,
                 tta: str = "none", normalize=DEFAULT_NORMALIZE, postprocess: Mapping | None = None, device=None,
                 amp: bool | str = True, batch_size: int = 8, memory_budget: int | None = None, roi_size=None,
                 overlap: float = 0.5, sw_batch_size: int = 4, progress: bool = False, labels=None, scales=(1.0,),
                 compile: bool = False, label_map: Mapping | None = None, activation: str = "sigmoid"):
        if not isinstance(network_config, Mapping):
            raise SlabError(f"network config: expected an object of build_network arguments, got {network_config!r}")
        config = dict(network_config)
        extra = {key: config.pop(key) for key in INFERENCE_KEYS if key in config}
        missing = [key for key in ("name", "spatial_dims", "in_channels", "out_channels") if key not in config]
        if missing:
            raise SlabError(f"network config: missing {', '.join(missing)}")
        self.model = build_network(**config)
        dims = config["spatial_dims"]
        self.mode = check_choice("mode", mode or {2: "2.5d", 3: "3d"}[dims], MODES)
        if {"2.5d": 2, "3d": 3}[self.mode] != dims:
            raise SlabError(f"mode: {self.mode} needs a network with spatial_dims {2 if self.mode == '2.5d' else 3}, "
                            f"the network config has {dims}")
        if weights is not None:
            load_weights(self.model, weights)
        self.in_channels = int(config["in_channels"])
        self.out_channels = int(config["out_channels"])
        self.labels = _check_labels(labels if labels is not None else extra.get("labels"), self.out_channels)
        self.label_map = check_label_map(label_map if label_map is not None else extra.get("label_map"),
                                         self.out_channels)
        options = {k: v for k, v in config.items() if k not in ("name", "spatial_dims", "in_channels", "out_channels")}
        self.divisor = network_divisor(config["name"], dims, **options)
        self.min_size = network_min_size(config["name"], dims, **options)
        self.planes = check_planes(planes if planes is not None else extra.get("planes", PLANES))
        offsets = offsets if offsets is not None else extra.get("offsets")
        self.offsets = None if offsets is None else check_offsets(offsets)
        self.tta = check_choice("tta", tta, TTA_MODES if self.mode == "2.5d" else TTA_MODES_3D)
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
        self.normalize = make_normalize(normalize)
        self.activation = check_choice("activation", activation, ACTIVATIONS)
        if postprocess is None and self.activation == "softmax":
            postprocess = {"argmax": True}
        self.postprocess = make_postprocess(postprocess)
        check_probability_thresholds(postprocess or {})
        self.device = resolve_device(device)
        if not (isinstance(overlap, (int, float)) and 0 <= overlap < 1):
            raise SlabError(f"overlap: expected a fraction in [0, 1), got {overlap!r}")
        if memory_budget is not None and not (isinstance(memory_budget, (int, np.integer)) and memory_budget > 0):
            raise SlabError(f"memory_budget: expected a positive number of bytes, got {memory_budget!r}")
        amp_dtype(self.device, amp)  # an unknown precision, or one the device lacks, fails here
        self.amp, self.memory_budget, self.overlap, self.progress = amp, memory_budget, float(overlap), progress
        self.compile = bool(compile)
        self.batch_size = positive_int(batch_size, "batch_size")
        if (not isinstance(scales, (list, tuple)) or not scales
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0.25 <= v <= 4 for v in scales)):
            raise SlabError(f"scales: expected resampling factors in [0.25, 4], e.g. [1, 1.5], got {scales!r}")
        self.scales = tuple(float(v) for v in scales)
        self.sw_batch_size = positive_int(sw_batch_size, "sw_batch_size")

    @staticmethod
    def bundle_section(directory) -> dict:
        """The ``"slab"`` section of ``directory/configs/inference.json``, checked.

        It holds ``network`` (the ``network_config``: ``build_network`` arguments, optionally
        ``offsets``, ``planes``, ``roi_size``) and optionally ``mode``, ``planes``, ``offsets``,
        ``tta``, ``normalize``, ``postprocess``, ``roi_size``, ``overlap``, ``batch_size``,
        ``sw_batch_size``: the keyword arguments of :class:`Predictor` of the same names.
        ``directory`` may name a shipped bundle (``"vessel_2p5d"``).
        """
        config_path = bundle_dir(directory) / "configs" / "inference.json"
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
        directory = bundle_dir(directory)
        section = cls.bundle_section(directory)
        weights = directory / "models" / "model.pt" if weights is None else Path(weights)
        recorded = recorded_postprocess(section.get("postprocess"), weights, section["network"].get("out_channels"))
        spec = InferenceSpec(section["network"], {k: v for k, v in section.items() if k not in ("network", "postprocess")},
                             recorded).with_overrides(**overrides)
        config_path = directory / "configs" / "inference.json"
        given = {k for k, v in overrides.items() if v is not None}
        try:
            return cls(spec.network, weights, postprocess=spec.postprocess, **spec.options)
        except SlabError as err:
            message = str(err)
            if str(weights) in message or str(config_path) in message:
                raise
            key = message.split(":", 1)[0].strip()
            if key in given:  # the user's own setting (--scales 1000), not the bundle's
                raise SlabError(f"--{key.replace('_', '-')}: {message.split(':', 1)[1].strip()}") from None
            raise SlabError(f"{config_path}: {message}") from None

    @classmethod
    def from_spec(cls, spec, weights=None, *, state: Mapping | None = None, **overrides) -> "Predictor":
        """A predictor from an inference spec (:class:`~slab.pipeline.model.spec.InferenceSpec`, or
        the JSON form every training checkpoint records) and its weights: the file ``weights``,
        or ``state`` (its state dict, already read: a checkpoint is read once). ``overrides``
        meet the model's settings in :meth:`InferenceSpec.with_overrides`: those not None win, a
        ``postprocess`` is merged into the spec's, and one that binarises (``threshold`` /
        ``hysteresis``) replaces the threshold chosen on validation."""
        if not isinstance(spec, InferenceSpec):
            if not isinstance(spec, Mapping) or not isinstance(spec.get("network"), Mapping):
                raise SlabError(f"{weights}: its inference spec has no network")
            spec = InferenceSpec.from_dict(spec)
        spec = spec.with_overrides(**overrides)
        where = weights if weights is not None else "inference spec"
        try:
            predictor = cls(spec.network, weights if state is None else None, postprocess=spec.postprocess,
                            **spec.options)
            if state is not None:
                load_weights(predictor.model, state, name=where)
            return predictor
        except SlabError as err:
            message = str(err)
            raise SlabError(message if str(where) in message else f"{where}: {message}") from None

    @property
    def exclusive(self) -> bool:
        """Whether the labels are exclusive classes (a softmax; masks by argmax)."""
        return self.activation == "softmax"

    def label_names(self) -> list[str]:
        """The name of every output channel (``label_1``... where the network config names none)."""
        return list(self.labels) if self.labels else [f"label_{i + 1}" for i in range(self.out_channels)]

    def check_input(self, info, name) -> None:
        """SlabError naming ``name`` unless a volume of ``info`` = ``(shape (C, X, Y, Z), ...)``
        (:func:`slab.io.volumes.volume_info`) suits this network: its channel count."""
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
        """The block transform for ``volume``: its normalisation (statistics computed over the
        whole volume; a LazyVolume is read once for them), or a cast to float32."""
        if self.normalize is None:
            return as_float
        return self.normalize.block_transform(volume, name=str(volume.meta.get("filename_or_obj", "image"))
                                              if hasattr(volume, "meta") else "image")

    def out_of_core(self, volume) -> bool:
        """Whether ``volume`` is predicted into a zarr store (``__call__(volume, out_path=...)``):
        a LazyVolume that does not fit the memory budget, at one scale."""
        return isinstance(volume, LazyVolume) and self.scales == (1.0,) and not self.fits_in_memory(volume)

    @property
    def work_arrays(self) -> int:
        """The float32 arrays of an out-of-core run's work store: one per plane (2.5D), per flip
        (3D with flips), else one."""
        return len(self.planes) if self.mode == "2.5d" else (8 if self.tta == "flips" else 1)

    def working_bytes(self, volume) -> int:
        """The float32 input and probabilities of in-memory prediction of ``volume`` (3D: also
        the sliding window's importance sums and the flips' running total)."""
        planes = self.out_channels if self.mode == "2.5d" else 2 * self.out_channels + 1
        return (int(volume.shape[0]) + planes) * int(np.prod(volume.shape[1:])) * 4

    def __call__(self, volume, out_path=None, shard=None) -> torch.Tensor:
        """``(L, X, Y, Z)`` probabilities of ``volume`` (raw intensities: normalised here); with
        ``scales``, the mean over the volume resampled by each scale (trilinear) and the
        probabilities resampled back. With ``out_path`` (a ``.zarr``; one scale) they are
        written there out of core, resumably, and returned as a lazy volume, its blocks shared by
        the ranks of ``shard`` under ``torchrun`` (:func:`~slab.pipeline.inference.multiplane.predict_2p5d`,
        :func:`~slab.pipeline.inference.window.predict_3d`)."""
        if len(volume.shape) != 4:
            raise SlabError(f"image: expected shape (C, X, Y, Z), got {tuple(volume.shape)}")
        if out_path is not None:
            if self.scales != (1.0,):
                raise SlabError("out_path: out-of-core prediction into a zarr store is at one scale")
            return self._predict(volume, self.preprocess(volume), out_path, shard)
        if self.mode == "3d" and isinstance(volume, LazyVolume):
            volume = volume.load()  # the sliding window takes the volume in memory
        if self.scales == (1.0,):
            return self._predict(volume, self.preprocess(volume))
        source = volume.load() if isinstance(volume, LazyVolume) else volume
        preprocess = self.preprocess(source)  # the scan's own statistics, whatever the scale
        base = torch.as_tensor(np.asarray(source), dtype=torch.float32)
        total = None
        for scale in self.scales:
            if scale == 1.0:
                probs = self._predict(source, preprocess).float()
            else:
                size = [max(1, int(round(n * scale))) for n in base.shape[1:]]
                x = torch.nn.functional.interpolate(base[None], size=size, mode="trilinear", align_corners=False)[0]
                probs = self._predict(x, preprocess).float()
                probs = torch.nn.functional.interpolate(probs[None].cpu(), size=tuple(base.shape[1:]),
                                                        mode="trilinear", align_corners=False)[0]
            total = probs.cpu().clone() if total is None else total + probs.cpu()
        return total / len(self.scales)

    def _predict(self, volume, preprocess, out_path=None, shard=None) -> torch.Tensor:
        channels = int(volume.shape[0])
        if self.mode == "3d":
            if channels != self.in_channels:
                raise SlabError(f"image: {channels} channel(s); the network takes {self.in_channels}")
            options = dict(roi_size=self.roi_size, overlap=self.overlap, tta=self.tta, sw_batch_size=self.sw_batch_size,
                           device=self.device, amp=self.amp, progress=self.progress, compile=self.compile,
                           activation=self.activation)
            if out_path is not None:
                return predict_3d(self.model, volume, out_path=out_path, memory_budget=self.memory_budget,
                                  preprocess=preprocess, shard=shard, **options)
            return predict_3d(self.model, preprocess(volume), **options)  # a MetaTensor stays one
        return predict_2p5d(self.model, volume, planes=self.planes, offsets=self._offsets(channels), tta=self.tta,
                            batch_size=self.batch_size, device=self.device, amp=self.amp, divisor=self.divisor,
                            min_size=self.min_size, memory_budget=self.memory_budget, preprocess=preprocess,
                            progress=self.progress, compile=self.compile, out_path=out_path, shard=shard,
                            activation=self.activation)

    def fits_in_memory(self, volume) -> bool:
        """Whether ``volume`` can be predicted in memory within ``memory_budget`` (without one:
        in half the memory this process can have)."""
        if self.memory_budget is None:
            from slab.io.headers import available_memory

            free = available_memory()
            return free is None or self.working_bytes(volume) <= free // 2
        return self.working_bytes(volume) <= self.memory_budget


def recorded_postprocess(postprocess: Mapping | None, weights=None, labels: int | None = None) -> dict:
    """``postprocess`` (:func:`slab.transforms.post.postprocess` arguments) with the threshold that
    training chose on validation for ``weights``, where one was recorded.

    The threshold (one number, or one per label channel) is read from ``model.json`` beside
    ``weights`` (``models/model.pt``; :func:`slab.pipeline.bundle.export_training` writes both), else
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
    if weights is None or options.get("hysteresis") is not None or options.get("threshold", 0.5) is None \
            or options.get("argmax"):
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

