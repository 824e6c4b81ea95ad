"""Training and validation on MONAI's engines: :class:`SlabTrainer` is a ``SupervisedTrainer`` and
:class:`SlabEvaluator` a ``SupervisedEvaluator``, so ignite events and MONAI handlers (MLflow,
TensorBoard, early stopping, metric logging) attach to them, in Python or from a bundle's
``train.json`` (``train#trainer``, ``train#handlers``, ``validate#evaluator``,
``validate#handlers``), and ``python -m monai.bundle run --tracking mlflow`` finds them.

slab's own pieces are what the engines take: the task's deterministic per-(epoch, index) samples
and rank-sharded batches as the data loader, the task's loss in the iteration, whole-volume
validation as the evaluator's iterations (one validation item each, summarised at the end of its
epoch). slab's handlers run first at each event, so that the metrics a user's handler reads are
there: at ``EPOCH_STARTED`` the epoch's seeds; at ``EPOCH_COMPLETED`` the row of the epoch (mean
loss over ranks), validation every ``val_every`` epochs and after the last, the best checkpoint's
choice, the epoch line on stdout, the checkpoint pair (:func:`slab.pipeline.training.state.save_epoch_state`)
and the logs. The operations run in the order of a plain loop, so ``--resume`` from ``last.pt``
repeats an uninterrupted run bit for bit (the engine's state resumes at the checkpoint's epoch).
"""
from __future__ import annotations

import math
import random
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from ignite.engine import Events
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.inferers import SimpleInferer
from monai.utils import MAX_SEED

from slab.core.device import amp_dtype, autocast
from slab.pipeline.training.config import LOWER_IS_BETTER, config_error
from slab.core.distributed import DistInfo, all_reduce_mean, barrier, dist_env, rank_batch
from slab.pipeline.training.logs import RunLog, epoch_line, progress_bar
from slab.pipeline.training.report import PICTURES, save_pictures, write_report
from slab.pipeline.training.state import derive_seed, rng_states, save_epoch_state, seeded, set_rng_states
from slab.pipeline.training.task import TrainTask
from slab.core.errors import SlabError, SlabWarning


def warmup_cosine(total_steps: int, warmup_steps: int):
    """LR factor at optimizer step ``step``: linear warm-up to 1, then cosine decay to 0.

    >>> f = warmup_cosine(10, 2)
    >>> [round(f(s), 3) for s in (0, 1, 2, 6, 9)]
    [0.5, 1.0, 1.0, 0.5, 0.038]
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup_steps, span) / span))

    return factor


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a DDP wrapper."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class TrainingSamples(torch.utils.data.Dataset):
    """Sample ``i`` of epoch ``e`` drawn under seed ``(seed, e, i)``, in whichever process draws it.

    Indexed with ``(epoch, i)`` pairs (what :class:`_RankBatches` yields), so that persistent
    loader workers, forked once per run, draw the epoch the trainer is in; a plain ``i`` draws
    from ``self.epoch``."""

    def __init__(self, task: TrainTask, seed: int) -> None:
        self.task, self.seed, self.epoch = task, seed, 0
        self._randomizable: list | None = None

    def __len__(self) -> int:
        return self.task.n_samples

    def __getitem__(self, index) -> Any:
        epoch, index = index if isinstance(index, tuple) else (self.epoch, index)
        sample_seed = derive_seed(self.seed, epoch, index)
        if self._randomizable is None:  # found once: MONAI's set_rnd walks the task's every attribute
            self._randomizable = randomizable_members(self.task)[0]
        with seeded(sample_seed):
            for member, offset in self._randomizable:  # as set_rnd(task, sample_seed) seeds them
                member.set_random_state(seed=(sample_seed + offset) % MAX_SEED)
            return self.task.sample(index, epoch)


def randomizable_members(obj: Any, offset: int = 0) -> tuple[list[tuple[Any, int]], int]:
    """``([(member, seed offset), ...], next offset)``: what ``monai.data.utils.set_rnd(obj, seed)``
    seeds and with which ``seed + offset``, found by the same walk (attributes in order, an object
    with ``set_random_state`` taken whole, every item of a list or tuple from the list's own
    offset, the list then advancing it by one if its last item did), so that seeding the members
    found once equals calling ``set_rnd`` for every sample."""
    if isinstance(obj, (tuple, list)):
        found, end = [], offset
        for item in obj:
            members, end = randomizable_members(item, offset)
            found += members
        return found, offset if end == offset else offset + 1
    if not hasattr(obj, "__dict__"):
        return [], offset
    if hasattr(obj, "set_random_state"):
        return [(obj, offset)], offset + 1
    found = []
    for key, value in obj.__dict__.items():
        if not key.startswith("__"):
            members, offset = randomizable_members(value, offset)
            found += members
    return found, offset


class _RankBatches(torch.utils.data.Sampler):
    """This rank's share of each global batch ``[s*B, (s+1)*B)`` of sample indices."""

    def __init__(self, n_samples: int, batch_size: int, info: DistInfo) -> None:
        self.steps, self.batch_size, self.info = n_samples // batch_size, batch_size, info
        self.epoch = 0

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        epoch = self.epoch  # read when the loader starts the epoch, in the main process
        for step in range(self.steps):
            indices = range(step * self.batch_size, (step + 1) * self.batch_size)
            yield [(epoch, i) for i in rank_batch(indices, self.info.rank, self.info.world_size)]


# ---------------------------------------------------------------------------------------------
# Choosing the best checkpoint


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _better(metric: str, value: float | None, best: float | None) -> bool:
    if value is None or value != value:
        return False
    if best is None:
        return True
    return value < best if metric in LOWER_IS_BETTER else value > best


def choose_best(best: dict, row: dict, epoch: int, validated: bool) -> tuple[dict, bool]:
    """``(best, improved)`` after an epoch's ``row``.

    The best checkpoint is the one with the best ``val.metric``. While that metric is undefined
    on every epoch (an AUC on a validation split without both classes, a Dice of empty masks),
    the lowest validation loss (else training loss) stands in, recorded as ``fallback`` and
    reported once; the first epoch with a defined metric takes over from it. Without validation
    the last epoch is the best.
    """
    metric = best["metric"]
    key = metric if metric.startswith("val_") else f"val_{metric}"
    if not validated:
        return {**best, "epoch": epoch}, True
    if _finite(row.get(key)):
        if best.get("fallback") or _better(metric, row[key], best["value"]):
            return {"metric": metric, "value": row[key], "epoch": epoch}, True
        return best, False
    if best["value"] is not None and not best.get("fallback"):
        return best, False
    fallback = "val_loss" if _finite(row.get("val_loss")) and metric != "val_loss" else "train_loss"
    if not best.get("fallback"):
        warnings.warn(f"val.metric {metric} is undefined at epoch {epoch} (e.g. a validation split without both "
                      f"classes); the best checkpoint is chosen by {fallback} until it is defined", SlabWarning,
                      stacklevel=3)
    if best.get("fallback") and not _better(fallback, row.get(fallback), best.get("fallback_value")):
        return best, False
    return {"metric": metric, "value": None, "epoch": epoch, "fallback": fallback,
            "fallback_value": row.get(fallback)}, True


# ---------------------------------------------------------------------------------------------
# The engines


class SlabEvaluator(SupervisedEvaluator):
    """Whole-volume validation of a task as a MONAI evaluator: each iteration validates one of this
    rank's validation items (:meth:`TrainTask.validate_item`: a volume through the inference
    engine, swept over thresholds), and at the end of the run the parts of every rank are
    summarised (:meth:`TrainTask.summarize_validation`) into ``state.metrics``.

    ``val_handlers`` (e.g. an ``MLFlowHandler``) attach after slab's own handler, so they see
    the metrics.
    """

    def __init__(self, task: TrainTask, network: nn.Module, device, info: DistInfo | None = None,
                 val_handlers=None):
        self.task, self.info, self.items = task, info or dist_env(), list(task.validation_items())
        super().__init__(device=device, val_data_loader=self.items, network=network, epoch_length=len(self.items),
                         iteration_update=self._validate_item, decollate=False, inferer=SimpleInferer())
        self.parts: list = []
        self.add_event_handler(Events.EPOCH_STARTED, self._start)
        self.add_event_handler(Events.EPOCH_COMPLETED, self._summarize)
        if val_handlers:
            self._register_handlers(list(val_handlers))

    def _start(self, engine) -> None:
        self.parts = []
        self.network.eval()

    def _validate_item(self, engine, item):
        part = self.task.validate_item(self.network, self.state.device, item)
        self.parts.append(part)
        return part

    def _summarize(self, engine) -> None:
        self.state.metrics = self.task.summarize_validation(self.parts, self.info)
        self.network.train()

    def evaluate(self, epoch: int) -> dict:
        """Validate after training epoch ``epoch``; the metrics (the same dict on every rank)."""
        if not self.items:  # nothing to validate here, but the summary gathers from every rank
            self.parts = []
            self.state.metrics = self.task.summarize_validation(self.parts, self.info)
        else:
            self.run(global_epoch=epoch)
        return dict(self.state.metrics)


class SlabTrainer(SupervisedTrainer):
    """A task trained as a MONAI ``SupervisedTrainer``: AdamW under a per-step warm-up + cosine
    schedule, AMP on CUDA (a GradScaler for float16), DDP under torchrun, the task's loss in every
    iteration, validation by :attr:`evaluator`, and the run's files in ``out`` (see
    :mod:`slab.pipeline.training.loop`). ``state`` is a ``last.pt`` to resume from.

    :meth:`run` returns the run's result: ``history``, ``best``, ``threshold``,
    ``best_checkpoint``, ``last_checkpoint``.
    """

    def __init__(self, task: TrainTask, cfg: dict, out, device: torch.device, info: DistInfo | None = None,
                 state: dict | None = None, train_handlers=None, val_handlers=None, inferer=None):
        info = info or dist_env()
        if cfg["batch_size"] % info.world_size:
            raise config_error("batch_size", f"a multiple of the {info.world_size} processes", cfg["batch_size"])
        steps = task.n_samples // cfg["batch_size"]
        if steps == 0:
            raise config_error("batch_size", f"at most the {task.n_samples} training samples per epoch",
                               cfg["batch_size"])
        self.task, self.cfg, self.out, self.info = task, cfg, Path(out), info
        if getattr(task, "validation", None) is not None:  # streamed validation stores its work in the run
            task.validation.work = self.out
        model = task.model.to(device)
        self.dtype = amp_dtype(device, cfg["amp"])
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(steps * cfg["epochs"], round(cfg["warmup_epochs"] * steps)))
        self.grad_scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
            if info.enabled else model
        self.samples = TrainingSamples(task, cfg["seed"])
        self.batches = _RankBatches(task.n_samples, cfg["batch_size"], info)
        loader = torch.utils.data.DataLoader(
            self.samples, batch_sampler=self.batches, num_workers=cfg["num_workers"],
            persistent_workers=cfg["num_workers"] > 0,  # forked once per run, not once per epoch
            collate_fn=task.collate, pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(cfg["seed"]),  # loader draws never touch the global RNG
        )
        super().__init__(device=device, max_epochs=cfg["epochs"], train_data_loader=loader, network=net,
                         optimizer=optimizer, loss_function=task.loss, epoch_length=steps,
                         iteration_update=self._step, inferer=inferer or SimpleInferer(), decollate=False)
        self.evaluator = SlabEvaluator(task, model, device, info, val_handlers) if task.has_validation() else None
        self.history: list[dict] = []
        self.best = {"metric": cfg["val"]["metric"], "value": None, "epoch": None}
        self.threshold: Any = 0.5  # of the latest validation
        self.best_threshold: Any = 0.5
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.grad_scaler.load_state_dict(state["scaler"])
            set_rng_states(state["rng"])
            self.history, self.best = list(state["history"]), dict(state["best"])
            self.threshold, self.best_threshold = state["threshold"], state["best_threshold"]
            self.state.epoch, self.state.iteration = state["epoch"], state["epoch"] * steps
        self.log = RunLog(self.out, info.is_main, self.state.epoch * steps)
        self.add_event_handler(Events.EPOCH_STARTED, self.start_epoch)
        self.add_event_handler(Events.ITERATION_COMPLETED, self._after_step)
        self.add_event_handler(Events.EPOCH_COMPLETED, self.end_epoch)
        if train_handlers:
            self._register_handlers(list(train_handlers))

    # -- events -------------------------------------------------------------------------------

    def start_epoch(self, engine) -> None:
        """The epoch's seeds (every draw of epoch ``e`` comes from ``(seed, e)``), train mode, bar."""
        epoch = self.state.epoch - 1  # ignite counts from 1 once the epoch has started
        seed = derive_seed(self.cfg["seed"], epoch, self.info.rank)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        self.samples.epoch = self.batches.epoch = epoch
        self.network.train()
        self.losses: list[float] = []
        self.images = 0
        self.lr = self.optimizer.param_groups[0]["lr"]
        self.started = time.perf_counter()
        self.bar = progress_bar(self.state.epoch_length, self.cfg["progress"] and self.info.is_main,
                                f"epoch {self.state.epoch}/{self.cfg['epochs']}")

    def _step(self, engine, batch) -> dict:
        with autocast(self.state.device, self.dtype):
            loss = self.task.loss(self.network, batch, self.state.device)
        if not torch.isfinite(loss):
            raise SlabError(f"training diverged at epoch {self.state.epoch}, step {len(self.losses) + 1} "
                            f"(loss {float(loss)}); lower lr")
        self.optimizer.zero_grad(set_to_none=True)
        self.grad_scaler.scale(loss).backward()
        if self.cfg["grad_clip"] is not None:
            self.grad_scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.network.parameters(), self.cfg["grad_clip"])
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()
        self.scheduler.step()
        # MONAI's decollated form (a list of dicts), which the handlers of a bundle's tracking
        # settings read with from_engine(["loss"], first=True)
        return [{"loss": float(loss.detach()), "images": self.task.batch_images(batch)}]

    def _after_step(self, engine) -> None:
        output = self.state.output[0]
        self.losses.append(output["loss"])
        self.images += output["images"] * self.info.world_size
        elapsed = time.perf_counter() - self.started
        self.bar.set_postfix(loss=f"{self.losses[-1]:.4f}", img_s=f"{self.images / max(elapsed, 1e-9):.1f}")
        self.bar.update()
        self.log.step("step/train_loss", self.losses[-1], self.state.iteration - 1)

    def end_epoch(self, engine) -> None:
        """The epoch's row, validation, the best checkpoint's choice, the line, the files."""
        self.bar.close()
        epoch, cfg = self.state.epoch, self.cfg
        elapsed = time.perf_counter() - self.started
        train_loss = all_reduce_mean([float(np.mean(self.losses)) if self.losses else float("nan")], self.info)[0]
        row = {"epoch": epoch, "lr": self.lr, "train_loss": train_loss,
               "images_per_s": self.images / max(elapsed, 1e-9), "epoch_s": elapsed}
        validated = self.evaluator is not None and (epoch % cfg["val_every"] == 0 or epoch == cfg["epochs"])
        if validated:
            metrics = self.evaluator.evaluate(epoch)
            row.update({f"val_{k}" if not k.startswith("val_") and k != "threshold" else k: v
                        for k, v in metrics.items()})
            self.threshold = metrics.get("threshold", self.threshold)
        self.history.append(row)
        self.state.metrics = {k: v for k, v in row.items() if isinstance(v, (int, float))}
        self.best, improved = choose_best(self.best, row, epoch, self.evaluator is not None)
        if improved:
            self.best_threshold = self.threshold
        if self.info.is_main:
            print(epoch_line(row, cfg["epochs"]), flush=True)
            checkpoint = {
                "model": {k: v.detach().cpu() for k, v in unwrap(self.network).state_dict().items()},
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.grad_scaler.state_dict(), "epoch": epoch, "config": cfg, "network": self.task.network,
                "threshold": self.threshold, "best_threshold": self.best_threshold, "metrics": row,
                "inference": self.task.inference_spec(self.threshold),
                "best": self.best, "history": self.history, "rng": rng_states(),
                "priors": getattr(self.task, "priors", None),
            }
            save_epoch_state(self.out, checkpoint, checkpoint if improved else None)
            if validated:
                self._draw_best(epoch, improved)
            self.log.epoch(self.history, epoch * self.state.epoch_length)
            write_report(self.out, cfg, self.history, self.best)
        barrier(self.info)

    def _draw_best(self, epoch: int, improved: bool) -> None:
        """At a new best, the report's pictures of the first validation volumes (rank 0)."""
        folder = self.out / PICTURES if improved and self.cfg["report_volumes"] else None
        try:
            drawn = self.task.report_pictures(folder, self.threshold)
        except (SlabError, ValueError, RuntimeError) as err:  # a picture is never worth the run
            warnings.warn(SlabWarning(f"report.html: no pictures of epoch {epoch} ({err})"), stacklevel=2)
            return
        if folder is not None:
            save_pictures(self.out, drawn, epoch)

    # -- running ------------------------------------------------------------------------------

    def run(self) -> dict:  # type: ignore[override]
        try:
            if self.state.epoch < self.state.max_epochs:  # a finished run resumes to itself
                super().run()
        finally:
            self.log.close()
        return {"history": self.history, "best": self.best, "threshold": self.best_threshold,
                "best_checkpoint": str(self.out / "best.pt"), "last_checkpoint": str(self.out / "last.pt")}


__all__ = ["SlabTrainer", "SlabEvaluator", "choose_best", "warmup_cosine", "unwrap"]
