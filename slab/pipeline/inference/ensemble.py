"""A trained model, ready to predict: what ``slab predict --model`` rebuilds from a training run, a
checkpoint, a cross-validated plan directory or an installed model (:func:`load_model`; the
model's files and spec are :mod:`slab.pipeline.model`'s). A model directory's members are
averaged by :class:`Ensemble`, one member in memory at a time.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from slab.core.errors import SlabError
from slab.pipeline.model.folders import MODEL_FILE, read_model_file, resolve_model
from slab.pipeline.model.checkpoints import load_checkpoint
from slab.pipeline.model.spec import InferenceSpec, spec_of_checkpoint


def _fold_of(member: Mapping):
    fold = member.get("fold")
    return fold if isinstance(fold, int) and not isinstance(fold, bool) else None


def load_model(name, *, folds=None, configurations=None, **overrides):
    """A :class:`Predictor` (one checkpoint) or an :class:`Ensemble` (a model directory) for
    ``name`` (see :func:`resolve_model`). ``overrides`` are :class:`Predictor` keyword arguments
    that win over the model's (None: the model's); a ``postprocess`` override is merged into
    the model's post-processing. ``folds`` / ``configurations`` pick members of an ensemble."""
    from slab.pipeline.inference.predictor import Predictor

    path = resolve_model(name)
    if path.name != MODEL_FILE:
        if folds is not None or configurations is not None:
            raise SlabError("--folds: a single checkpoint has no folds to choose from; give a model directory")
        state = load_checkpoint(path)  # read once: its spec and its weights
        return Predictor.from_spec(InferenceSpec.of_state(state, path), path, state=state["model"], **overrides)
    data = read_model_file(path)
    members = data["members"]
    if configurations is not None:
        members = [m for m in members if m.get("configuration") in configurations]
        if not members:
            raise SlabError(f"--configurations: {', '.join(configurations)} not among the model's "
                            f"{', '.join(sorted({str(m.get('configuration')) for m in data['members']}))}")
    if folds is not None:
        have = sorted({f for m in members if (f := _fold_of(m)) is not None})
        missing = [f for f in folds if f not in have]
        if missing:
            raise SlabError(f"--folds: fold {missing[0]} is not in the model (folds {', '.join(map(str, have))})")
        members = [m for m in members if _fold_of(m) in folds]
    if overrides.get("tta") is None and data.get("tta") is not None:
        overrides["tta"] = data["tta"]
    return Ensemble([path.parent / m["checkpoint"] for m in members], chosen=data.get("postprocess") or {},
                    **overrides)


class Ensemble:
    """The mean probabilities of several checkpoints (folds, configurations), post-processed by
    the model's ``chosen`` post-processing (``postprocess`` among the overrides: settings given
    over it, as on the command line). Members are built one after the other: at most two
    networks are in memory (the first, which answers for the ensemble's settings, and the
    current one), and one float32 sum of the probabilities.

    It answers what :func:`slab.pipeline.inference.predict_file` asks of a model
    (:class:`~slab.pipeline.inference.files.VolumePredictor`), out of core too: each member
    predicts into a store of its own, then their mean is written block by block. Every member
    must predict the same labels.
    """

    def __init__(self, checkpoints, chosen: Mapping | None = None, **overrides):
        if not checkpoints:
            raise SlabError("ensemble: no members")
        from slab.transforms.post import make_postprocess, merge_postprocess

        self.checkpoints = [Path(c) for c in checkpoints]
        self.specs = [spec_of_checkpoint(c) for c in self.checkpoints]
        options = merge_postprocess(chosen, overrides.pop("postprocess", None))
        self.overrides = overrides
        # The first member, built now: it checks the settings and answers the questions about inputs.
        self.first = self._member(0)
        outputs = {(s["network"].get("out_channels"), tuple(s["network"].get("labels") or ()),
                    s.get("activation", "sigmoid")) for s in self.specs}
        if len(outputs) > 1:
            raise SlabError(f"ensemble: its members predict different labels or activations ({sorted(outputs)})")
        self.postprocess = make_postprocess(options)
        self.memory_budget = self.first.memory_budget
        self.out_channels = self.first.out_channels
        self.activation = self.first.activation

    @property
    def exclusive(self) -> bool:
        return self.first.exclusive

    def _member(self, index: int):
        from slab.pipeline.inference.predictor import Predictor

        return Predictor.from_spec(self.specs[index], self.checkpoints[index], **self.overrides)

    def __len__(self) -> int:
        return len(self.checkpoints)

    def label_names(self) -> list[str]:
        return self.first.label_names()

    @property
    def label_map(self) -> dict:
        return self.first.label_map

    def check_input(self, info, name) -> None:
        """Each distinct network's channel check (the folds of one configuration share theirs)."""
        import json

        seen = set()
        for index, spec in enumerate(self.specs):
            key = json.dumps(spec["network"], sort_keys=True)
            if key not in seen:
                seen.add(key)
                (self.first if index == 0 else self._member(index)).check_input(info, name)

    def fits_in_memory(self, volume) -> bool:
        return self.first.fits_in_memory(volume)

    def out_of_core(self, volume) -> bool:
        return self.first.out_of_core(volume)

    @property
    def work_arrays(self) -> int:
        """One member's float32 work arrays, and every member's result kept until the mean is written."""
        return self.first.work_arrays + len(self)

    def __call__(self, volume, out_path=None, shard=None):
        """The members' mean probabilities ``(L, X, Y, Z)`` (float32), summed one member at a time;
        with ``out_path`` (a ``.zarr``), out of core: each member's into a store of its own in
        ``out_path``'s work folder (a member finished before a kill is not predicted again), then
        their mean into ``out_path`` block by block, returned as a lazy volume."""
        if out_path is not None:
            return self._out_of_core(volume, Path(out_path), shard)
        total = None
        for index in range(len(self)):
            member = self.first if index == 0 else self._member(index)
            probs = member(volume)
            if total is None:
                total = probs.float().clone() if probs.dtype != torch.float32 else probs.clone()
            else:
                total += probs.float()
            del member, probs
        if len(self) > 1:
            total /= len(self)
        return total


    def _out_of_core(self, volume, out_path: Path, shard):
        import shutil

        from slab.core.distributed import DistInfo, barrier
        from slab.io.zarr import write_zarr
        from slab.io.volumes import load_volume
        from slab.pipeline.inference.store import ACTIVE, MeanVolume, work_dir

        info = shard if shard is not None and shard.enabled else DistInfo()
        folder = work_dir(out_path)
        ACTIVE.add(folder)
        results = []
        for index in range(len(self)):
            member = self.first if index == 0 else self._member(index)
            results.append(member(volume, out_path=folder / f"member{index}.zarr", shard=shard))
            del member
        if info.is_main:
            write_zarr(MeanVolume(results, len(results), results[0].dtype), results[0].affine, out_path)
        barrier(info)
        for result in results:
            result.close()
        if info.is_main:
            shutil.rmtree(folder, ignore_errors=True)
        ACTIVE.discard(folder)
        return load_volume(out_path, lazy=True)


def mean_probabilities(arrays) -> np.ndarray:
    """The mean of probability arrays, accumulated in float32 one at a time."""
    total = None
    count = 0
    for a in arrays:
        a = np.asarray(a, dtype=np.float32)
        total = a.copy() if total is None else total + a
        count += 1
    if total is None:
        raise SlabError("ensemble: nothing to average")
    return total / count
