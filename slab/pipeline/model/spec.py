"""The inference spec every training checkpoint carries: the network's ``build_network``
arguments, the slab offsets and planes (2.5D) or window (3D), the label names, the normalisation
it was trained with (the same settings object training used, read by the same
:func:`slab.transforms.intensity.make_normalize`), the TTA of its validation, the activation
(a sigmoid per label, or a softmax over exclusive classes) and the post-processing chosen on
validation. Training writes it (:func:`inference_spec`); prediction, export and install read it
back as data (:func:`spec_of_state`), every part checked for its type.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from slab.core.errors import SlabError
from slab.pipeline.model.checkpoints import load_checkpoint
from slab.transforms.post import merge_postprocess

# The Predictor settings a stored spec may carry beside its network and post-processing.
SPEC_OPTIONS = ("normalize", "tta", "mode", "activation")


@dataclass(frozen=True)
class InferenceSpec:
    """What a model predicts with, typed: the network (``build_network`` arguments plus offsets,
    planes, ``roi_size``, labels), the :class:`~slab.pipeline.inference.Predictor` settings the
    model brings (normalisation, TTA, mode, activation; a bundle's any of its ``"slab"`` keys) and
    its post-processing.

    :meth:`with_overrides` is the one place a user's settings meet a model's, for a checkpoint,
    an ensemble's members and a bundle alike.

    Example
    -------
    >>> spec = InferenceSpec({"name": "unet"}, {"tta": "flips"}, {"threshold": 0.7, "min_size": 5})
    >>> given = spec.with_overrides(tta=None, device="cpu", postprocess={"hysteresis": (0.3, 0.8)})
    >>> given.options, given.postprocess
    ({'tta': 'flips', 'device': 'cpu'}, {'min_size': 5, 'hysteresis': (0.3, 0.8)})
    """

    network: Mapping
    options: Mapping = field(default_factory=dict)
    postprocess: Mapping = field(default_factory=dict)

    @classmethod
    def from_dict(cls, spec: Mapping) -> InferenceSpec:
        """The JSON form every checkpoint stores (:func:`inference_spec`; checked by :func:`spec_of_state`)."""
        return cls(dict(spec["network"]), {k: spec[k] for k in SPEC_OPTIONS if k in spec},
                   dict(spec.get("postprocess") or {}))

    @classmethod
    def of_state(cls, state: dict, path) -> InferenceSpec:
        """The spec of a checkpoint already read (``path`` names it in errors)."""
        return cls.from_dict(spec_of_state(state, path))

    def with_overrides(self, postprocess: Mapping | None = None, **overrides) -> InferenceSpec:
        """The spec with the settings given: every one that is not None wins over the model's; a
        ``postprocess`` given is merged into the model's (:func:`~slab.transforms.post.merge_postprocess`:
        a given threshold or hysteresis replaces the model's binarisation, other settings add)."""
        options = {**self.options, **{k: v for k, v in overrides.items() if v is not None}}
        return replace(self, options=options, postprocess=merge_postprocess(self.postprocess, postprocess))


def inference_network(cfg: dict, network: Mapping, label_names=None) -> dict:
    """The ``network_config`` of :class:`Predictor` for a segmentation run: the ``build_network``
    arguments, the slab offsets and planes (2.5D) or the window (3D), and the label names."""
    config = dict(network)
    if cfg["task"] == "segmentation_2p5d":
        config.update(offsets=cfg["offsets"], planes=cfg["val"]["planes"] or cfg["planes"])
    else:
        config["roi_size"] = cfg["patch_size"]
    if label_names:
        config["labels"] = list(label_names)
    return config


def inference_spec(cfg: dict, network: Mapping, label_names=None, threshold=0.5) -> dict:
    """Everything :class:`Predictor` needs to predict as the run validated: JSON data, stored in
    every checkpoint as ``"inference"``. A run trained on exclusive classes (``dice_ce``) predicts
    a softmax and masks by argmax; others a sigmoid per label and the validation's threshold."""
    exclusive = cfg.get("loss") == "dice_ce"
    return {"network": inference_network(cfg, network, label_names), "normalize": cfg["normalize"],
            "tta": cfg["val"]["tta"], "activation": "softmax" if exclusive else "sigmoid",
            "postprocess": {"argmax": True} if exclusive else {"threshold": threshold}}


def spec_of_checkpoint(path) -> dict:
    """The inference spec of a training checkpoint (``best.pt``, ``last.pt``) or of an exported
    model file, read with ``weights_only=True``. Checkpoints written before specs were stored
    give one rebuilt from their config and network. The weights are mapped, not read."""
    return spec_of_state(load_checkpoint(Path(path), mmap=True), path)


SPEC_TYPES = {"network": (dict,), "normalize": (dict, type(None)), "tta": (str,), "mode": (str,),
              "activation": (str,), "postprocess": (dict,)}


def spec_of_state(state: dict, path) -> dict:
    """:func:`spec_of_checkpoint` of a checkpoint already read (``path`` names it in errors);
    every part of a stored spec is checked for its type, so a doctored checkpoint is one line."""
    if not isinstance(state, dict):
        raise SlabError(f"{path}: expected a slab checkpoint (a dictionary), got {type(state).__name__}")
    spec = state.get("inference")
    if spec is not None:
        if not isinstance(spec, dict):
            raise SlabError(f"{path}: its inference spec is {type(spec).__name__}; expected an object")
        for key, types in SPEC_TYPES.items():
            if (key in spec or key == "network") and not isinstance(spec.get(key), types):
                raise SlabError(f"{path}: inference spec '{key}' is {spec.get(key)!r:.80}; expected "
                                + " or ".join("null" if t is type(None) else "an object" if t is dict else "a name"
                                              for t in types))
        return spec
    cfg, network = state.get("config"), state.get("network")
    if not isinstance(cfg, dict) or not isinstance(network, dict):
        raise SlabError(f"{path}: a checkpoint without an inference spec needs its 'config' and 'network' objects; "
                        f"found {type(cfg).__name__} and {type(network).__name__}")
    if cfg.get("task") == "classification":
        raise SlabError(f"{path}: a classification checkpoint; slab predict takes segmentation models "
                        "(score sequences with the spine bundle)")
    try:
        return inference_spec(cfg, network, threshold=state.get("threshold", 0.5))
    except (KeyError, TypeError) as err:
        raise SlabError(f"{path}: its 'config' lacks what prediction needs ({err})") from None


def check_probability_thresholds(postprocess: Mapping) -> None:
    """A predictor binarises probabilities: every threshold (and hysteresis pair) of
    ``postprocess`` (shared, or per label in ``labels``) lies in [0, 1]."""
    per_label = postprocess.get("labels") if isinstance(postprocess.get("labels"), list) else [postprocess]
    for options in per_label:
        if not isinstance(options, Mapping):
            continue  # make_postprocess names it
        for key in ("threshold", "hysteresis"):
            value = options.get(key)
            flat = np.ravel(np.asarray(value, dtype=object)).tolist() if value is not None else []
            if any(isinstance(v, (int, float)) and not isinstance(v, bool) and not 0 <= v <= 1 for v in flat):
                raise SlabError(f"postprocess {key}: {value!r}; probabilities are thresholded in [0, 1]")
