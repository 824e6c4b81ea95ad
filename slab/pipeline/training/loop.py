"""Training: 2.5D and 3D segmentation and 2.5D slice-sequence classification.

``train(datalist, config, out)`` is the one entry point of the CLI (``slab train``) and the tests;
a bundle's ``train.json`` builds the same run with :func:`build_trainer` (its ``train#trainer``).
It validates the configuration and the data before any
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
``report.html``     one self-contained page: summary, curves, the epoch table (best marked),
                    sections of the first ``report_volumes`` validation volumes at the best epoch
                    (their PNGs in ``report/``), the configuration

Determinism and checkpoints: :mod:`slab.pipeline.training.state`. The loop itself runs on MONAI's
engines: :mod:`slab.pipeline.training.engine`.

Distributed. Under ``torchrun`` every process takes its contiguous share of each *global* batch
(``batch_size`` is the global batch and must be a multiple of the number of processes), DDP
averages the gradients, and rank 0 alone writes files; the loss curve matches one process with
the same ``batch_size`` up to floating-point summation order (for 2.5D, when every slab of a batch
has one size: a ``patch_size`` or volumes whose planes share a size; otherwise each process pads
its share of the batch on its own). Validation volumes are split over the processes too.

The configuration schema is :mod:`slab.pipeline.training.config`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from slab.core.device import resolve_device
from slab.pipeline.model.spec import inference_network
from slab.pipeline.training.config import read_config, validate_config
from slab.core.distributed import DistInfo, barrier, cleanup_distributed, init_distributed, process_device
from slab.pipeline.training.engine import SlabTrainer
from slab.pipeline.training.normalization import resolve_dataset_normalize, wants_dataset_statistics
from slab.pipeline.training.state import check_epoch_state, config_differences, load_checkpoint, seed_everything
from slab.pipeline.training.task import TrainTask
from slab.core.errors import SlabError


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
    device = resolve_device(device)
    joined = torch.distributed.is_available() and torch.distributed.is_initialized()
    info = init_distributed(device)
    try:
        return build_trainer(datalist, config, Path(out), fold=fold, resume=resume, device=device, info=info,
                             max_epochs=epochs).run()
    finally:
        if not joined:  # leave a process group the caller set up to the caller
            cleanup_distributed()


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
    try:  # keys added since the run was made take their defaults, as they did then
        recorded = validate_config(state["config"])
    except SlabError:
        recorded = state["config"]
    diff = config_differences(recorded, cfg)
    if diff:
        raise SlabError(f"--resume: {out} was trained with another config ({'; '.join(diff[:4])})")
    return state


def _build_task(datalist, cfg: dict, fold: int | None, info: DistInfo, resumed: dict | None = None) -> TrainTask:
    if cfg["task"] == "classification":
        from slab.pipeline.training.classification import ClassificationTask

        return ClassificationTask(datalist, cfg, fold, info, resumed)
    from slab.pipeline.training.segmentation import Segmentation2p5DTask, Segmentation3DTask

    if cfg["task"] == "segmentation_3d":
        return Segmentation3DTask(datalist, cfg, fold, info, resumed)
    return Segmentation2p5DTask(datalist, cfg, fold, info, resumed)


def _set_priors(task: TrainTask, cfg: dict) -> dict:
    """The loss's logit adjustment and the network's start (:mod:`slab.pipeline.training.prior`),
    from samples of an epoch training never draws and the training volumes' label counts."""
    from slab.pipeline.training.engine import TrainingSamples
    from slab.pipeline.training.prior import SAMPLES, SHARE_SAMPLES, init_output_bias, priors

    samples = TrainingSamples(task, cfg["seed"])
    drawn = [samples[(PRIOR_EPOCH, i)] for i in range(SHARE_SAMPLES if cfg["logit_adjustment"] else SAMPLES)]
    record = priors([d["label"] for d in drawn], task.volume_counts(), task.n_labels, cfg["loss"] == "dice_ce",
                    cfg["logit_adjustment"])
    if cfg["output_bias"] == "prior":
        start = torch.tensor(record["samples"]) - torch.tensor(record["adjustment"])
        record["output_bias"] = init_output_bias(task.model, task.collate(drawn[:SAMPLES]), start)
    return record


PRIOR_EPOCH = 2**31 - 1  # never an epoch of training: the prior's samples leave training's draws alone


def build_trainer(datalist, cfg: dict, out: Path, *, fold=None, resume: bool = False, device=None,
                  info: DistInfo | None = None, max_epochs: int | None = None, train_handlers=None,
                  val_handlers=None, inferer=None) -> SlabTrainer:
    """The run set up and ready: the configuration checked, the task built (data loaded and checked),
    ``config.json`` and ``network.json`` written, and a :class:`SlabTrainer` (resumed from
    ``last.pt`` with ``resume``) whose ``run()`` trains. Bundles build their ``train#trainer``
    through this, with their ``train#handlers`` / ``validate#handlers``; ``max_epochs``, when
    given, is the config's ``epochs`` (MONAI's property ``train#trainer#max_epochs``)."""
    cfg = validate_config(cfg if max_epochs is None else {**cfg, "epochs": max_epochs})
    if wants_dataset_statistics(cfg["normalize"]):
        from slab.pipeline.training.segmentation import split_items

        cfg["normalize"] = resolve_dataset_normalize(cfg["normalize"], split_items(datalist, fold)[0], cfg["seed"])
    info = info or init_distributed(resolve_device(device))
    device = process_device(resolve_device(device), info)
    out = Path(out)
    state = _resume_state(out, cfg, resume)
    seed_everything(cfg["seed"])  # the model's initial weights
    task = _build_task(datalist, cfg, fold, info, state.get("network") if state else None)
    if cfg["task"] != "classification":
        # a resumed run keeps the priors it started with (none: a run from before them, unadjusted)
        task.priors = _set_priors(task, cfg) if state is None else state.get("priors")
    if info.is_main:
        from slab.core.outputs import atomic_write

        out.mkdir(parents=True, exist_ok=True)
        with atomic_write(out / "config.json") as tmp:
            tmp.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        if cfg["task"] != "classification":
            with atomic_write(out / "network.json") as tmp:
                network = inference_network(cfg, task.network, task.label_names)
                tmp.write_text(json.dumps(network, indent=2) + "\n", encoding="utf-8")
    barrier(info)
    return SlabTrainer(task, cfg, out, device, info, state, train_handlers=train_handlers, val_handlers=val_handlers,
                       inferer=inferer)
