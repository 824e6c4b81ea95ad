"""Slice-sequence classification training: the RSNA 2022 cervical-spine winning recipe.

Each *target* of a study (a vertebra C1..C7) becomes one sequence of ``n_slabs`` slabs: slab
centres evenly spaced over the z range the target occupies in the study's label (value
``i + 1`` is ``labels[i]``), or over the whole volume when the study has no label
(:func:`slab.pipeline.data.sequences.study_sequences`, built as inference builds them). The
:class:`~slab.networks.SliceSequenceClassifier` scores every slab and the whole sequence; the loss is

``slice_weight * BCE(slices) + seq_weight * BCE(sequence)``  (default 15 : 1),

where each BCE weights positive targets ``pos_weight`` (2) times, and every slice of a sequence
carries the sequence's target. Augmentation, as the recipe did:

- **mixup** with probability ``mixup_prob`` (0.5) per batch: the batch is blended with a
  permutation of itself, ``x = lam * x + (1 - lam) * x[perm]`` with ``lam ~ Beta(alpha, alpha)``,
  and the targets blended the same way;
- **sequence shuffling** with probability ``shuffle_prob`` per sequence: the order of its slabs is
  randomly permuted (the per-slice targets move with their slabs), so the LSTM cannot rely on
  anatomy appearing in one order only.

Validation metrics: per-target ROC AUC (``monai.metrics.compute_roc_auc``), its mean ``auc``,
and the competition's weighted log loss ``log_loss`` (:func:`competition_log_loss`).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from slab.pipeline.data.sequences import OVERALL, study_sequences
from slab.pipeline.training.task import TrainTask
from slab.pipeline.training.segmentation import build_model, network_args
from slab.pipeline.training import split_items
from slab.core.errors import SlabError

# The competition's sample weights: a vertebra row weighs 1 (negative) or 2 (positive); the
# patient_overall row weighs 7 (negative) or 14 (positive).
VERTEBRA_WEIGHTS = (1.0, 2.0)
OVERALL_WEIGHTS = (7.0, 14.0)
_EPS = 1e-7


def weighted_bce(logits: torch.Tensor, targets: torch.Tensor, pos_weight: float = 2.0) -> torch.Tensor:
    """Mean BCE-with-logits where a positive target's term weighs ``pos_weight`` (soft targets
    interpolate the weight, as mixup produces them)."""
    weights = 1.0 + (pos_weight - 1.0) * targets
    return F.binary_cross_entropy_with_logits(logits, targets, weight=weights)


def sequence_loss(
    slice_logits: torch.Tensor,
    seq_logits: torch.Tensor,
    slice_targets: torch.Tensor,
    seq_targets: torch.Tensor,
    slice_weight: float = 15.0,
    seq_weight: float = 1.0,
    pos_weight: float = 2.0,
) -> torch.Tensor:
    """``slice_weight * BCE(slices) + seq_weight * BCE(sequence)``, each positive-weighted."""
    slice_loss = weighted_bce(slice_logits.float(), slice_targets.float().reshape(slice_logits.shape), pos_weight)
    seq_loss = weighted_bce(seq_logits.float(), seq_targets.float().reshape(seq_logits.shape), pos_weight)
    return slice_weight * slice_loss + seq_weight * seq_loss


def mixup(
    images: torch.Tensor, targets: Sequence[torch.Tensor], alpha: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Blend a batch with a random permutation of itself; targets blended alike."""
    lam = float(np.random.beta(alpha, alpha))
    perm = torch.randperm(images.shape[0], generator=generator)
    mixed = lam * images + (1.0 - lam) * images[perm]
    return mixed, [lam * t.float() + (1.0 - lam) * t.float()[perm] for t in targets]


def shuffle_sequence(slabs: torch.Tensor, slice_targets: torch.Tensor,
                     prob: float) -> tuple[torch.Tensor, torch.Tensor]:
    """With probability ``prob``, permute the slab order of one sequence ``(N, C, H, W)``;
    the per-slice targets ``(N, ...)`` follow their slabs."""
    if prob > 0 and np.random.random() < prob:
        perm = torch.from_numpy(np.random.permutation(slabs.shape[0]))
        return slabs[perm], slice_targets[perm]
    return slabs, slice_targets


def roc_auc(scores: np.ndarray, targets: np.ndarray) -> float:
    """ROC AUC of one target (MONAI ``compute_roc_auc``); NaN when only one class is present."""
    from monai.metrics import compute_roc_auc

    targets = np.asarray(targets, dtype=np.float64).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if targets.size == 0 or targets.min() == targets.max():
        return float("nan")
    return float(compute_roc_auc(torch.as_tensor(scores), torch.as_tensor(targets)))


def weighted_log_loss(probs: np.ndarray, targets: np.ndarray, weights: tuple[float, float] = VERTEBRA_WEIGHTS) -> float:
    """``sum(w * logloss) / sum(w)`` with ``w = weights[target]`` (negative, positive)."""
    probs = np.clip(np.asarray(probs, np.float64).ravel(), _EPS, 1 - _EPS)
    targets = np.asarray(targets, np.float64).ravel()
    if probs.shape != targets.shape:
        raise SlabError(f"log loss: {probs.size} probabilities for {targets.size} targets")
    w = np.where(targets > 0.5, weights[1], weights[0])
    loss = -(targets * np.log(probs) + (1 - targets) * np.log(1 - probs))
    return float((w * loss).sum() / w.sum()) if w.size else float("nan")


def competition_log_loss(
    vertebra_probs: np.ndarray, vertebra_targets: np.ndarray, overall_targets: np.ndarray | None = None
) -> float:
    """The RSNA 2022 metric: weighted log loss over every (study, target) row.

    ``vertebra_probs`` and ``vertebra_targets`` are ``(studies, vertebrae)``. Vertebra rows weigh
    1 (negative) / 2 (positive). With ``overall_targets`` (``(studies,)``), each study adds a
    patient_overall row weighing 7 / 14, its probability ``1 - prod(1 - p_vertebra)`` (a fracture
    anywhere). The total is ``sum(w * logloss) / sum(w)`` over all rows.

    >>> round(competition_log_loss(np.array([[0.5, 0.5]]), np.array([[0, 1]])), 4)
    0.6931
    """
    vp = np.clip(np.asarray(vertebra_probs, np.float64), _EPS, 1 - _EPS)
    vt = np.asarray(vertebra_targets, np.float64)
    probs, targets = [vp.ravel()], [vt.ravel()]
    weights = [np.where(vt.ravel() > 0.5, *VERTEBRA_WEIGHTS[::-1])]
    if overall_targets is not None:
        ot = np.asarray(overall_targets, np.float64).ravel()
        op = np.clip(1.0 - np.prod(1.0 - vp, axis=1), _EPS, 1 - _EPS)
        probs.append(op)
        targets.append(ot)
        weights.append(np.where(ot > 0.5, *OVERALL_WEIGHTS[::-1]))
    p, t, w = (np.concatenate(a) for a in (probs, targets, weights))
    loss = -(t * np.log(p) + (1 - t) * np.log(1 - p))
    return float((w * loss).sum() / w.sum()) if w.size else float("nan")


def _nan_mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


# ---------------------------------------------------------------------------------------------
# Studies


def _load_study(item: dict, normalize: dict | None) -> tuple[np.ndarray, np.ndarray | None]:
    from slab.transforms.intensity import make_normalize
    from slab.io.volumes import check_same_geometry, load_volume

    image = load_volume(item["image"])
    label = None
    if item.get("label"):
        label = load_volume(item["label"])
        check_same_geometry(image, label, names=[str(item["image"]), str(item["label"])])
        if label.shape[0] != 1:
            raise SlabError(f"{item['label']}: expected a one-channel label of target values 1..N, "
                            f"got {label.shape[0]} channels")
        label = np.asarray(label)
    if normalize is not None:
        image = make_normalize(normalize)(image)
    image = np.asarray(image, dtype=np.float32)
    if not np.isfinite(image).all():
        raise SlabError(f"{item['image']}: NaN or Inf intensities")
    return image, label


# ---------------------------------------------------------------------------------------------
# The task


class ClassificationTask(TrainTask):
    """Training sequences, the loss of the recipe and its validation metrics, for ``train()``.

    Every sequence is built once, when the task is built (float16, ``n_slabs x C*k x H x W``
    each); volumes are not kept.
    """

    def __init__(self, datalist, cfg: dict, fold, info, resumed: dict | None = None) -> None:
        from slab.core.distributed import shard_items

        self.cfg, self.c = cfg, cfg["classification"]
        train_items, val_items, data = split_items(datalist, fold)
        names = list(data.get("labels") or [])
        if any(item.get("label") for item in train_items + val_items) and not names:
            raise SlabError("datalist: studies with a label need 'labels' naming the label values 1..N")
        self.names = names
        self.train = [s for item in train_items for s in study_sequences(item, *_load_study(item, cfg["normalize"]),
                                                                          names, cfg)]
        if not self.train:
            raise SlabError("datalist: no training sequences (no labelled target in any training study)")
        channels = {s["slabs"].shape[1] for s in self.train}
        if len(channels) != 1:
            raise SlabError(f"datalist: studies with different image channels ({sorted(channels)} slab channels)")
        self.val = []
        for index, item in shard_items(list(enumerate(val_items)), info.rank, info.world_size):
            self.val += [dict(s, order=(index, k)) for k, s in
                         enumerate(study_sequences(item, *_load_study(item, cfg["normalize"]), names, cfg))]
        self.has_val = bool(val_items)
        self.n_samples = cfg["samples_per_epoch"] or len(self.train)
        self.network = network_args(cfg, 2, channels.pop(), 1)
        self.model = build_model(self.network, resumed)

    def sample(self, index: int, epoch: int) -> dict:
        n = len(self.train)
        order = np.random.default_rng([self.cfg["seed"], epoch, index // n]).permutation(n)
        seq = self.train[order[index % n]]
        slabs = seq["slabs"].float()
        slice_targets = torch.full((slabs.shape[0],), seq["y"])
        slabs, slice_targets = shuffle_sequence(slabs, slice_targets, self.c["shuffle_prob"])
        return {"image": slabs, "slice_target": slice_targets, "target": torch.tensor([seq["y"]])}

    def loss(self, model, batch, device) -> torch.Tensor:
        images = batch["image"].to(device, non_blocking=True)
        slice_t, seq_t = batch["slice_target"].to(device), batch["target"].to(device)
        if self.c["mixup_prob"] > 0 and np.random.random() < self.c["mixup_prob"]:
            images, (slice_t, seq_t) = mixup(images, [slice_t, seq_t], self.c["mixup_alpha"])
        slice_logits, seq_logits = model(images)
        return sequence_loss(slice_logits, seq_logits, slice_t, seq_t,
                             self.c["slice_weight"], self.c["seq_weight"], self.c["pos_weight"])

    def batch_images(self, batch) -> int:
        return int(batch["image"].shape[0] * batch["image"].shape[1])

    def has_validation(self) -> bool:
        return self.has_val

    def validation_items(self) -> list:
        return [0] if self.val else []  # one iteration scores this process's sequences together

    def validate_item(self, model, device, item) -> list:
        from slab.pipeline.inference import score_sequences

        probs, _ = score_sequences(model, [s["slabs"] for s in self.val], batch_size=self.cfg["val"]["batch_size"],
                                   device=device, amp=self.cfg["amp"])
        return [(s["order"], s["study"], s["target"], p, s["y"]) for s, p in zip(self.val, probs.reshape(-1).tolist())]

    def summarize_validation(self, parts, info) -> dict:
        from slab.core.distributed import gather_objects

        rows = [row for part in parts for row in part]
        rows = sorted((r for part in gather_objects(rows, info) for r in part), key=lambda r: r[0])
        return classification_metrics([r[1:] for r in rows], self.c["pos_weight"])


def classification_metrics(rows: list[tuple[str, str, float, float]], pos_weight: float = 2.0) -> dict:
    """Validation metrics of ``(study, target, probability, truth)`` rows.

    ``auc``: the mean over targets (C1, C2, ..., patient_overall) of each target's ROC AUC
    across studies (NaN targets, with one class only, skipped); ``auc_<target>`` each.
    ``log_loss``: the competition's weighted log loss: target rows weigh 1 / 2 (negative /
    positive), ``patient_overall`` rows 7 / 14; a study with target rows but no overall row gets
    one from ``1 - prod(1 - p)`` when its targets say nothing else. ``val_loss``: the mean
    positive-weighted BCE of the sequence probabilities.
    """
    out: dict = {}
    targets = sorted({r[1] for r in rows}, key=lambda t: (t == OVERALL, t))
    aucs = []
    for t in targets:
        sel = [r for r in rows if r[1] == t]
        auc = roc_auc(np.array([r[2] for r in sel]), np.array([r[3] for r in sel]))
        out[f"auc_{t}"] = auc
        aucs.append(auc)
    out["auc"] = _nan_mean(aucs)
    probs = np.clip(np.array([r[2] for r in rows], np.float64), _EPS, 1 - _EPS)
    truth = np.array([r[3] for r in rows], np.float64)
    weights = np.array([(OVERALL_WEIGHTS if r[1] == OVERALL else VERTEBRA_WEIGHTS)[int(r[3] > 0.5)] for r in rows])
    studies: dict[str, list] = {}
    for r in rows:
        studies.setdefault(r[0], []).append(r)
    extra_p, extra_t, extra_w = [], [], []
    for study_rows in studies.values():
        if any(r[1] == OVERALL for r in study_rows) or any(r[1] == "any" for r in study_rows):
            continue
        p = 1.0 - np.prod([1.0 - r[2] for r in study_rows])
        y = float(max(r[3] for r in study_rows))
        extra_p.append(p)
        extra_t.append(y)
        extra_w.append(OVERALL_WEIGHTS[int(y > 0.5)])
    p_all = np.clip(np.concatenate([probs, extra_p]), _EPS, 1 - _EPS)
    t_all = np.concatenate([truth, extra_t])
    w_all = np.concatenate([weights, extra_w])
    loss = -(t_all * np.log(p_all) + (1 - t_all) * np.log(1 - p_all))
    out["log_loss"] = float((w_all * loss).sum() / w_all.sum()) if w_all.size else float("nan")
    bce = -(truth * np.log(probs) + (1 - truth) * np.log(1 - probs))
    w = np.where(truth > 0.5, pos_weight, 1.0)
    out["val_loss"] = float((w * bce).mean()) if bce.size else float("nan")
    return out
