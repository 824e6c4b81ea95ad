"""Training: 2.5D and 3D segmentation and 2.5D slice-sequence classification.

``train(datalist, config, out)`` is the one entry point: the CLI (``slab train``), the bundles'
``train.json`` and the tests all call it. It validates the configuration and the data before any
training starts, then runs epochs of AdamW steps under a per-step cosine schedule with linear
warm-up, validates on whole volumes with the inference engine, and writes to ``out``:

``config.json``     the configuration used, every default filled in
``network.json``    the network and slab settings ``slab predict --network`` takes (segmentation)
``last.pt``         model, optimizer, scheduler, AMP scaler, epoch, config, RNG states, history
``best.pt``         the same at the best validation score, with ``threshold`` chosen on validation
                    (both links into ``state/``, switched together in one step: they never disagree)
``log.csv``         one row per epoch (rewritten whole, so a resumed run keeps one clean table)
``curves.png``      loss and metric curves
``tensorboard/``    the same scalars for TensorBoard

Determinism and checkpoints: :mod:`pipeline.training.state`.

Distributed. Under ``torchrun`` every process takes its contiguous share of each *global* batch
(``batch_size`` is the global batch and must be a multiple of the number of processes), DDP
averages the gradients, and rank 0 alone writes files; the loss curve matches one process with
the same ``batch_size`` up to floating-point summation order (for 2.5D, when every slab of a batch
has one size: a ``patch_size`` or volumes whose planes share a size; otherwise each process pads
its share of the batch on its own). Validation volumes are split over the processes too.

The configuration schema is :mod:`pipeline.training.config`.
"""
from __future__ import annotations

import json
import math
import random
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from pipeline.device import amp_dtype, autocast, resolve_device
from pipeline.training.config import LOWER_IS_BETTER, config_error, read_config, validate_config
from pipeline.training.distributed import (
    DistInfo,
    all_reduce_mean,
    barrier,
    cleanup_distributed,
    init_distributed,
    process_device,
    rank_batch,
)
from pipeline.training.logs import RunLog, epoch_line, progress_bar
from pipeline.training.state import (
    check_epoch_state,
    config_differences,
    derive_seed,
    load_checkpoint,
    rng_states,
    save_epoch_state,
    seed_everything,
    seeded,
    set_rng_states,
)
from pipeline.training.task import TrainTask
from transforms.errors import SlabError, SlabWarning


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
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


class _Samples(torch.utils.data.Dataset):
    """Sample ``i`` of epoch ``e`` drawn under seed ``(seed, e, i)``, in whichever process draws it."""

    def __init__(self, task: TrainTask, seed: int) -> None:
        self.task, self.seed, self.epoch = task, seed, 0

    def __len__(self) -> int:
        return self.task.n_samples

    def __getitem__(self, index: int) -> Any:
        from monai.data.utils import set_rnd

        sample_seed = derive_seed(self.seed, self.epoch, index)
        with seeded(sample_seed):
            set_rnd(self.task, sample_seed)  # MONAI transforms keep their own RandomState
            return self.task.sample(index, self.epoch)


class _RankBatches(torch.utils.data.Sampler):
    """This rank's share of each global batch ``[s*B, (s+1)*B)`` of sample indices."""

    def __init__(self, n_samples: int, batch_size: int, info: DistInfo) -> None:
        self.steps, self.batch_size, self.info = n_samples // batch_size, batch_size, info

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for step in range(self.steps):
            indices = range(step * self.batch_size, (step + 1) * self.batch_size)
            yield rank_batch(indices, self.info.rank, self.info.world_size)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _choose_best(best: dict, row: dict, epoch: int, validated: bool) -> tuple[dict, bool]:
    """``(best, improved)`` after an epoch's ``row``.

    The best checkpoint is the one with the best ``val.metric``. While that metric is undefined
    on every epoch (an AUC on a validation split without both classes, a Dice of empty masks),
    the lowest validation loss (else training loss) stands in, recorded as ``fallback`` and
    reported once; the first epoch with a defined metric takes over from it.
    """
    metric = best["metric"]
    key = metric if metric.startswith("val_") else f"val_{metric}"
    if not validated:
        return {**best, "epoch": epoch}, True  # no validation: the last epoch is the best
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


def _better(metric: str, value: float | None, best: float | None) -> bool:
    if value is None or value != value:
        return False
    if best is None:
        return True
    return value < best if metric in LOWER_IS_BETTER else value > best


def train(
    datalist: str | Path | dict,
    config: dict | str | Path | None = None,
    out: str | Path = "run",
    *,
    fold: int | None = None,
    resume: bool = False,
    device: str | torch.device | None = None,
    epochs: int | None = None,
) -> dict:
    """Train a segmentation or classification network; see the module docstring for the outputs.

    Parameters
    ----------
    datalist : path to a ``datalist.json`` (or the loaded dict)
        Decathlon style: ``training`` (and optional ``validation``) lists of ``{"image", "label"}``
        with a ``fold`` per case; paths relative to the datalist's directory.
    config : dict or path to a JSON file, optional
        The training configuration (:data:`DEFAULTS`, checked by :func:`validate_config`).
    out : path
        The run directory. It must not hold a run unless ``resume``.
    fold : int, optional
        Validate on the cases of this fold and train on the others; without it, train on every
        ``training`` case and validate on ``validation``.
    resume : bool
        Continue the run in ``out`` from ``last.pt``; the configuration must be the same.
    device : ``cpu``, ``cuda``, ``cuda:N`` or None (CUDA when available)
    epochs : int, optional
        Overrides ``config["epochs"]``.

    Returns
    -------
    dict
        ``history`` (one dict per epoch), ``best`` (metric, value, epoch), ``threshold``,
        ``best_checkpoint`` and ``last_checkpoint`` paths.

    Raises
    ------
    SlabError
        Bad configuration or data, or a resume that does not match the run: before any training.
    """
    if isinstance(config, (str, Path)):
        config = read_config(config)
    config = dict(config or {})
    if epochs is not None:
        config["epochs"] = epochs
    cfg = validate_config(config)
    device = resolve_device(device)
    joined = torch.distributed.is_available() and torch.distributed.is_initialized()
    info = init_distributed(device)
    try:
        return _train(datalist, cfg, Path(out), fold, resume, process_device(device, info), info)
    finally:
        if not joined:  # leave a process group the caller set up to the caller
            cleanup_distributed()


def inference_network(cfg: dict, task) -> dict:
    """What ``slab predict --network RUN/network.json --weights RUN/best.pt`` needs of a
    segmentation run: the ``build_network`` arguments, the slab offsets and planes (2.5D) or
    the window (3D), and the label names."""
    config = dict(task.network)
    if cfg["task"] == "segmentation_2p5d":
        config.update(offsets=cfg["offsets"], planes=cfg["val"]["planes"] or cfg["planes"])
    else:
        config["roi_size"] = cfg["patch_size"]
    if getattr(task, "label_names", None):
        config["labels"] = list(task.label_names)
    return config


def _resume_state(out: Path, cfg: dict, resume: bool) -> dict | None:
    last = out / "last.pt"
    if not resume:
        if last.exists():
            raise SlabError(f"{out}: already holds a run (last.pt); pass --resume to continue it "
                            "or choose another --out")
        return None
    if not last.exists():
        raise SlabError(f"--resume: {last} not found; nothing to resume")
    state = load_checkpoint(last)
    check_epoch_state(out, state)
    diff = config_differences(state["config"], cfg)
    if diff:
        raise SlabError(f"--resume: {out} was trained with another config ({'; '.join(diff[:4])})")
    return state


def _build_task(datalist, cfg: dict, fold: int | None, info: DistInfo) -> TrainTask:
    if cfg["task"] == "classification":
        from pipeline.training.classification import ClassificationTask

        return ClassificationTask(datalist, cfg, fold, info)
    from pipeline.training.segmentation import Segmentation2p5DTask, Segmentation3DTask

    if cfg["task"] == "segmentation_3d":
        return Segmentation3DTask(datalist, cfg, fold, info)
    return Segmentation2p5DTask(datalist, cfg, fold, info)


def _train(datalist, cfg: dict, out: Path, fold, resume: bool, device: torch.device, info: DistInfo) -> dict:
    state = _resume_state(out, cfg, resume)
    seed_everything(cfg["seed"])  # the model's initial weights
    task = _build_task(datalist, cfg, fold, info)
    if cfg["batch_size"] % info.world_size:
        raise config_error("batch_size", f"a multiple of the {info.world_size} processes", cfg["batch_size"])
    model = task.model.to(device)
    dtype = amp_dtype(device, cfg["amp"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    steps = task.n_samples // cfg["batch_size"]
    if steps == 0:
        raise config_error("batch_size", f"at most the {task.n_samples} training samples per epoch", cfg["batch_size"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(steps * cfg["epochs"], round(cfg["warmup_epochs"] * steps))
    )
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    history: list[dict] = []
    best = {"metric": cfg["val"]["metric"], "value": None, "epoch": None}
    threshold: Any = 0.5  # of the latest validation
    best_threshold: Any = 0.5
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        set_rng_states(state["rng"])
        history, best, start = list(state["history"]), dict(state["best"]), state["epoch"]
        threshold, best_threshold = state["threshold"], state["best_threshold"]
    if info.is_main:
        from transforms.io import atomic_write

        out.mkdir(parents=True, exist_ok=True)
        with atomic_write(out / "config.json") as tmp:
            tmp.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        if cfg["task"] != "classification":
            with atomic_write(out / "network.json") as tmp:
                tmp.write_text(json.dumps(inference_network(cfg, task), indent=2) + "\n", encoding="utf-8")
    barrier(info)
    net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if info.enabled else model
    samples = _Samples(task, cfg["seed"])
    loader = torch.utils.data.DataLoader(
        samples,
        batch_sampler=_RankBatches(task.n_samples, cfg["batch_size"], info),
        num_workers=cfg["num_workers"],
        collate_fn=task.collate,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg["seed"]),  # loader draws never touch the global RNG
    )
    log = RunLog(out, info.is_main, start * steps)
    try:
        for epoch in range(start, cfg["epochs"]):
            row = _epoch(net, task, loader, samples, optimizer, scheduler, scaler, cfg, epoch, device, dtype, info, log)
            if task.has_validation() and ((epoch + 1) % cfg["val_every"] == 0 or epoch + 1 == cfg["epochs"]):
                metrics = task.validate(unwrap(net), device, info)
                row.update({f"val_{k}" if not k.startswith("val_") and k != "threshold" else k: v
                            for k, v in metrics.items()})
                if "threshold" in metrics:
                    threshold = metrics["threshold"]
            history.append(row)
            best, improved = _choose_best(best, row, epoch + 1, task.has_validation())
            if improved:
                best_threshold = threshold
            if info.is_main:
                print(epoch_line(row, cfg["epochs"]), flush=True)
            if info.is_main:
                ckpt = {
                    "model": {k: v.detach().cpu() for k, v in unwrap(net).state_dict().items()},
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "epoch": epoch + 1,
                    "config": cfg,
                    "network": task.network,
                    "threshold": threshold,
                    "best_threshold": best_threshold,
                    "metrics": row,
                    "best": best,
                    "history": history,
                    "rng": rng_states(),
                }
                save_epoch_state(out, ckpt, ckpt if improved else None)
                log.epoch(history, (epoch + 1) * steps)
            barrier(info)
    finally:
        log.close()
    return {
        "history": history,
        "best": best,
        "threshold": best_threshold,
        "best_checkpoint": str(out / "best.pt"),
        "last_checkpoint": str(out / "last.pt"),
    }


def _epoch(net, task, loader, samples, optimizer, scheduler, scaler, cfg, epoch, device, dtype, info, log) -> dict:
    seed = derive_seed(cfg["seed"], epoch, info.rank)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    samples.epoch = epoch
    net.train()
    losses: list[float] = []
    images = 0
    lr = optimizer.param_groups[0]["lr"]
    start = time.perf_counter()
    bar = progress_bar(len(loader), cfg["progress"] and info.is_main, f"epoch {epoch + 1}/{cfg['epochs']}")
    for step, batch in enumerate(loader):
        with autocast(device, dtype):
            loss = task.loss(net, batch, device)
        if not torch.isfinite(loss):
            raise SlabError(f"training diverged at epoch {epoch + 1}, step {step + 1} (loss {float(loss)}); lower lr")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg["grad_clip"] is not None:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(net.parameters(), cfg["grad_clip"])
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        losses.append(float(loss.detach()))
        images += task.batch_images(batch) * info.world_size
        elapsed = time.perf_counter() - start
        bar.set_postfix(loss=f"{losses[-1]:.4f}", img_s=f"{images / max(elapsed, 1e-9):.1f}")
        bar.update()
        log.step("step/train_loss", losses[-1], epoch * len(loader) + step)
    bar.close()
    elapsed = time.perf_counter() - start
    train_loss = all_reduce_mean([float(np.mean(losses)) if losses else float("nan")], info)[0]
    return {
        "epoch": epoch + 1,
        "lr": lr,
        "train_loss": train_loss,
        "images_per_s": images / max(elapsed, 1e-9),
        "epoch_s": elapsed,
    }

