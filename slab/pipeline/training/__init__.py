"""Training: the loop (:mod:`.loop`, ``train()``), its configuration (:mod:`.config`), state and
checkpoints (:mod:`.state`), logs (:mod:`.logs`), losses (:mod:`.losses`), the tasks
(:mod:`.segmentation`, :mod:`.classification`); multi-process set-up is :mod:`slab.core.distributed`,
below training and inference both."""
from slab.pipeline.training.config import DEFAULTS, SCHEMA, describe_config, read_config, validate_config
from slab.pipeline.training.engine import SlabEvaluator, SlabTrainer, warmup_cosine
from slab.pipeline.training.loop import build_trainer, inference_network, train
from slab.pipeline.training.losses import DiceCE, build_loss
from slab.pipeline.training.segmentation import split_items
from slab.pipeline.training.validation import summarize_sweeps
from slab.pipeline.model.checkpoints import load_checkpoint
from slab.pipeline.training.state import RUN_FILES, derive_seed, save_checkpoint, seeded

__all__ = ["train", "validate_config", "describe_config", "read_config", "DEFAULTS", "SCHEMA", "load_checkpoint",
           "save_checkpoint", "RUN_FILES", "DiceCE", "build_loss", "warmup_cosine", "split_items", "summarize_sweeps",
           "derive_seed", "seeded", "inference_network", "build_trainer", "SlabTrainer", "SlabEvaluator"]
