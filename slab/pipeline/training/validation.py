"""Whole-volume validation of segmentation tasks: each validation volume through the inference
engine, Dice and surface dice swept over thresholds per label (:class:`SegValidation`), and the
thresholds and metrics summarised over volumes (:func:`summarize_sweeps`). With ``stream`` in
the training config the volumes are opened lazily when validated, predicted out of core into a
store in the run folder and scored by the streaming metrics, so none is ever held whole."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from slab.pipeline.training.config import SEG_METRICS
from slab.core.distributed import DistInfo
from slab.core.errors import SlabError


def volume_channels(path, name: str) -> int:
    """Channels of a volume file, from its header where the format allows."""
    from slab.io.volumes import load_volume

    try:
        volume = load_volume(path, lazy=True)
    except SlabError:
        volume = load_volume(path)
    if len(volume.shape) != 4:
        raise SlabError(f"{path}: expected a (C, X, Y, Z) {name}, got shape {tuple(volume.shape)}")
    return int(volume.shape[0])


def truth_masks(label: np.ndarray, fmt: str, n_labels: int) -> np.ndarray:
    """Binary ``(L, X, Y, Z)`` masks (uint8) of a label volume, one channel per label."""
    if fmt == "values":
        return np.stack([label[0] == i + 1 for i in range(n_labels)]).astype(np.uint8)
    return (label > 0).astype(np.uint8)


def load_pair(item: dict, normalize: dict | None) -> tuple[torch.Tensor, np.ndarray, tuple[float, float, float],
                                                        np.ndarray]:
    """``(image float32 (C, X, Y, Z) normalised, label (C', X, Y, Z), spacing, affine)`` of a
    datalist item; image and label must share shape and geometry."""
    from slab.transforms.intensity import make_normalize
    from slab.io.volumes import check_same_geometry, load_volume

    image = load_volume(item["image"])
    if "label" not in item:
        raise SlabError(f"{item['image']}: datalist item without a label")
    label = load_volume(item["label"])
    check_same_geometry(image, label, names=[str(item["image"]), str(item["label"])])
    spacing = tuple(float(s) for s in image.meta["spacing"])
    affine = np.asarray(image.affine, dtype=np.float64)
    if normalize is not None:
        image = make_normalize(normalize)(image)
    array = torch.as_tensor(np.asarray(image, dtype=np.float32))
    if not torch.isfinite(array).all():
        raise SlabError(f"{item['image']}: NaN or Inf intensities; normalise or clean the volume first")
    return array, np.asarray(label), spacing, affine


class SegValidation:
    """Whole validation volumes through the inference engine; surface dice at tolerance 0 and at
    ``val.tolerance_mm``, Dice, each swept over ``val.thresholds``.

    The threshold of each label is the one maximising the mean (over volumes) of the chosen
    metric; the reported metrics are means over volumes and labels at those thresholds.
    Volumes are sharded over ranks and the curves gathered.
    """

    def __init__(self, items: list[dict], cfg: dict, fmt: str, n_labels: int,
                 predict: Callable[[nn.Module, torch.Tensor, torch.device], np.ndarray], info: DistInfo,
                 channels: int | None = None) -> None:
        from slab.core.distributed import shard_items

        limit = cfg["val"]["max_volumes"]
        self.items = items[:limit] if limit else items
        self.cfg, self.predict = cfg, predict
        tol = cfg["val"]["tolerance_mm"]
        self.tolerances = [0.0] if tol == 0 else [0.0, tol]
        self.volumes, self.affines, self.fmt, self.n_labels, self.channels = [], {}, fmt, n_labels, channels
        # streaming training keeps no validation volume: each is opened when it is validated and
        # predicted out of core into a store in ``work`` (the run folder; its image channels are
        # checked from the header now, its labels when opened), and draws no report pictures
        self.stream, self.work = bool(cfg.get("stream")), None
        self.exclusive = cfg.get("loss") == "dice_ce"
        for index, item in shard_items(list(enumerate(self.items)), info.rank, info.world_size):
            if self.stream:
                images = item["image"] if isinstance(item["image"], list) else [item["image"]]
                self._check(sum(volume_channels(p, "image") for p in images), None)
            self.volumes.append((index, None, None, None) if self.stream else self._load(index, item))
        # the probabilities of this epoch's first volumes, for the report's pictures
        self.drawn = cfg["report_volumes"] if info.is_main and not self.stream else 0
        self.probabilities: dict[int, np.ndarray] = {}
        self.reliability: dict[int, list[dict]] = {}  # this epoch's reliability curves, per volume and label

    def _check(self, channels: int, labels: int | None) -> None:
        if (self.channels is not None and channels != self.channels) or (labels is not None and labels != self.n_labels):
            seen = "?" if labels is None else labels
            raise SlabError(f"validation volumes: {channels} image channels / {seen} labels; training has "
                            f"{self.channels} / {self.n_labels}")

    def _load(self, index: int, item: dict) -> tuple:
        image, label, spacing, self.affines[index] = load_pair(item, self.cfg["normalize"])
        truth = truth_masks(label, self.fmt, self.n_labels)
        self._check(image.shape[0], truth.shape[0])
        return index, image, truth, spacing

    def volume(self, k: int) -> tuple:
        """``(index, image, truth, spacing)`` of this process's ``k``-th volume (opened lazily now
        when streaming, or loaded where its format is read whole)."""
        from slab.pipeline.data.stream import open_validation

        index, image, truth, spacing = self.volumes[k]
        if image is not None:
            return index, image, truth, spacing
        opened = open_validation(self.items[index], lambda part: truth_masks(part, self.fmt, self.n_labels),
                                 self.n_labels)
        if opened is None:
            return self._load(index, self.items[index])
        image, truth, spacing, self.affines[index] = opened
        self._check(image.shape[0], truth.shape[0])
        return index, image, truth, spacing

    def indices(self) -> list[int]:
        return list(range(len(self.volumes)))

    def curves(self, model: nn.Module, device: torch.device, k: int) -> tuple:
        """``(index, thresholds, per-label curves)`` of this process's ``k``-th volume."""
        from slab.pipeline.evaluation.metrics import threshold_sweep

        import contextlib
        import tempfile

        from slab.pipeline.data.stream import streamed_prediction
        from slab.io.lazy import LazyVolume

        index, image, truth, spacing = self.volume(k)
        lazy = isinstance(image, LazyVolume)
        if lazy and self.work is not None:
            Path(self.work).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.work, prefix=".validation-") if lazy else contextlib.nullcontext() as tmp:
            extra = streamed_prediction(self.cfg, image, Path(tmp) / "prob.zarr") if lazy else {}
            prob = self.predict(model, image, device, **extra)
            thresholds, scored = self.cfg["val"]["thresholds"], prob
            if self.exclusive:  # exclusive classes are masks by argmax: nothing to sweep
                from slab.transforms.post import argmax_masks

                thresholds, scored = [0.5], argmax_masks(np.asarray(prob)).astype(np.float32)
            if k < self.drawn:
                self.probabilities[k] = scored.astype(np.float16)
            sweep = threshold_sweep(scored, truth, thresholds, spacing, self.tolerances,
                                    cldice=self.cfg["val"]["cldice"])
            curves = self._calibration(prob, truth, image)
            if curves is not None and self.drawn:
                self.reliability[k] = curves
            ece = [c["ece"] for c in curves] if curves is not None else None
        return (index, sweep["thresholds"], [
            {"dice": c["dice"], "surface_dice_0": c["surface_dice"][str(0.0)],
             "surface_dice_tol": c["surface_dice"][str(float(self.tolerances[-1]))],
             **({"cldice": c["cldice"]} if "cldice" in c else {}), **({"ece": ece[i]} if ece else {})}
            for i, c in enumerate(sweep["classes"])
        ])

    @staticmethod
    def _calibration(prob, truth, image) -> list[dict] | None:
        """Per label, the reliability curve and expected calibration error over the body (an
        in-memory volume only: a streamed one is not read whole for it)."""
        from slab.pipeline.evaluation.calibration import calibration
        from slab.io.lazy import LazyVolume

        if isinstance(image, LazyVolume) or not isinstance(prob, np.ndarray):
            return None
        return calibration(prob, truth, np.asarray(image))

    def pictures(self, folder: Path | None, threshold, names: list[str]) -> list[tuple[str, Path]]:
        """Sections of the kept volumes, prediction at ``threshold`` (one per label, or a list)
        against truth, one PNG per volume and label (:func:`~slab.pipeline.evaluation.sections.cross_sections`);
        the kept probabilities are let go (only dropped when ``folder`` is None)."""
        from slab.pipeline.evaluation.sections import cross_sections

        kept, self.probabilities = self.probabilities, {}
        reliability, self.reliability = self.reliability, {}
        if folder is None:
            return []
        thresholds = list(threshold) if isinstance(threshold, (list, tuple)) else None
        drawn = []
        for k, prob in sorted(kept.items()):
            index, image, truth, spacing = self.volume(k)
            item = self.items[index]
            case = str(item.get("id") or item.get("case") or Path(str(item["image"])).name)
            masks = []
            for c in range(prob.shape[0]):
                t = float(thresholds[c] if thresholds else threshold)
                name = names[c] if c < len(names) else f"label {c + 1}"
                png = folder / f"val{index}_{c}.png"
                masks.append(prob[c] > t)
                cross_sections(image[0].numpy(), masks[-1], truth[c], png, spacing=spacing,
                               title=f"{case}: {name}, threshold {t:g}", affine=self.affines[index])
                drawn.append((f"{case}: {name}", png))
            write_viewer_page(folder / f"val{index}.html", image, np.stack(masks), truth, self.affines[index], case,
                              names)
        if reliability:  # the reliability curve of every label, pooled over this process's volumes
            from slab.pipeline.evaluation.calibration import plot_reliability, pooled

            n = len(next(iter(reliability.values())))
            curves = {(names[c] if c < len(names) else f"label {c + 1}"): pooled([r[c] for r in reliability.values()])
                      for c in range(n)}
            png = folder / "reliability.png"
            plot_reliability(curves, png, "reliability over the body, validation volumes")
            drawn.append(("reliability over the body (validation volumes): predicted probability against the share "
                          "truly foreground", png))
        return drawn

    def summarize(self, parts: list, info: DistInfo) -> dict:
        from slab.core.distributed import gather_objects

        gathered = sorted((c for part in gather_objects(parts, info) for c in part), key=lambda c: c[0])
        return summarize_sweeps(gathered, self.cfg["val"]["metric"])


def write_viewer_page(path: Path, image, masks: np.ndarray, truth, affine, case: str, names: list[str]) -> Path:
    """The page of ``slab view`` (:mod:`slab.pipeline.evaluation.viewer`) of one validation volume:
    its (normalised) image, the prediction at the chosen thresholds, the truth, hits / false
    positives / misses, scores and error clusters; ``report.html`` links it."""
    from slab.core.outputs import atomic_write
    from slab.io.lazy import metatensor
    from slab.pipeline.evaluation.viewer import build_page

    volumes = [metatensor(np.asarray(a, dtype=dtype), affine, case) for a, dtype in
               ((np.asarray(image)[:1], np.float32), (masks, np.uint8), (np.asarray(truth) > 0, np.uint8))]
    page, _ = build_page(*volumes, names=list(names) or None, title=case)
    with atomic_write(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path


def summarize_sweeps(curves: list, metric: str) -> dict:
    """Per-label thresholds of ``metric`` (mean over volumes; the centre of its flat optimum,
    :func:`~slab.pipeline.evaluation.metrics.choose_threshold`) and the metrics there; ``<metric>_at_0.5``
    (the metric at 0.5, where 0.5 was swept) and ``<metric>_pm0.1`` (the worse of the metric 0.1
    below and above the choice) say what the choice gains and how sharp it is; ``ece`` is the
    mean expected calibration error over the body, where the curves carry one."""
    from slab.pipeline.evaluation.metrics import choose_threshold

    thresholds = curves[0][1]
    n_labels = len(curves[0][2])
    keys = [k for k in SEG_METRICS if k in curves[0][2][0]]
    chosen, scores = [], {k: [] for k in keys}
    at_half, sharp, ece = [], [], []
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for c in range(n_labels):
                means = {k: np.nanmean(np.array([v[2][c][k] for v in curves], np.float64), axis=0) for k in keys}
                threshold, info = choose_threshold(thresholds, means[metric])
                best = int(np.argmin(np.abs(np.asarray(thresholds, np.float64) - threshold)))
                chosen.append(float(thresholds[best]))
                for k in keys:
                    scores[k].append(float(means[k][best]))
                half = np.flatnonzero(np.isclose(np.asarray(thresholds, np.float64), 0.5))
                at_half.append(float(means[metric][half[0]]) if half.size else float("nan"))
                sharp.append(float(np.nanmin([info["below"], info["above"]])))
                ece += [v[2][c]["ece"] for v in curves if "ece" in v[2][c]]
            out = {k: float(np.nanmean(v)) if not np.isnan(v).all() else float("nan") for k, v in scores.items()}
            if metric in SEG_METRICS:
                out[f"{metric}_at_0.5"] = float(np.nanmean(at_half)) if not np.isnan(at_half).all() else float("nan")
                out[f"{metric}_pm0.1"] = float(np.nanmean(sharp)) if not np.isnan(sharp).all() else float("nan")
            if ece:
                out["ece"] = float(np.nanmean(ece)) if not np.isnan(ece).all() else float("nan")
    out["threshold"] = chosen[0] if n_labels == 1 else chosen
    return out


__all__ = ["SegValidation", "load_pair", "summarize_sweeps", "truth_masks", "volume_channels"]
