"""The interface between the training loop and a task (2.5D or 3D segmentation, slice-sequence
classification): what the loop asks of it, and nothing else."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

from slab.core.distributed import DistInfo


class TrainTask:
    """What the training loop needs from a task (2.5D, 3D segmentation, classification).

    Attributes set by subclasses: ``model`` (built, on CPU), ``n_samples`` (samples per epoch),
    ``network`` (the ``build_network`` arguments, stored in checkpoints so that the checkpoint
    alone rebuilds the network).
    """

    model: nn.Module
    n_samples: int
    network: dict
    collate: Callable = staticmethod(torch.utils.data.default_collate)

    def sample(self, index: int, epoch: int) -> Any:
        """Training sample ``index`` of ``epoch``; called under :func:`seeded`, so it may draw freely."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
        """The batch's loss (the loop runs this under autocast)."""
        raise NotImplementedError

    def batch_images(self, batch: Any) -> int:
        """2D images (slabs) or 3D patches in a batch, for the throughput."""
        raise NotImplementedError

    def has_validation(self) -> bool:
        raise NotImplementedError

    def validation_items(self) -> list:
        """This process's validation items (the evaluator's iterations); may be empty."""
        raise NotImplementedError

    def validate_item(self, model: nn.Module, device: torch.device, item) -> Any:
        """One item's contribution to the validation metrics (the model is in eval mode)."""
        raise NotImplementedError

    def inference_spec(self, threshold) -> dict | None:
        """What prediction needs to reproduce this task's validation (segmentation; see
        :func:`slab.pipeline.model.spec.inference_spec`), stored in every checkpoint; None for
        tasks ``slab predict`` does not take."""
        return None

    def report_pictures(self, folder, threshold) -> list:
        """``(caption, PNG)`` pictures of this validation's predictions at ``threshold``, drawn
        into ``folder`` for the run's report (rank 0); none by default."""
        return []

    def summarize_validation(self, parts: list, info: DistInfo) -> dict:
        """The metrics of every process's ``parts`` (a collective: every rank calls it, the same
        dict comes back on each); ``threshold`` among them where one is chosen."""
        raise NotImplementedError

