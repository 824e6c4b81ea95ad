"""slab's inference as MONAI's workflow objects, so that the bundles' ``inference.json`` holds
MONAI's InferProperties (``dataset``, ``inferer``, ``evaluator``, ``handlers``) and the tools
that look for them (``monai.bundle run --tracking mlflow``, MONAI Label, Deploy, FL, the model
zoo's property checks) find a working inference workflow.

- :class:`VolumeInferer` is a MONAI ``Inferer``: ``inferer(images, network)`` predicts a batch of
  whole volumes ``(B, C, X, Y, Z)`` of raw intensities with a :class:`Predictor`'s settings
  (normalisation, 2.5D planes / 3D sliding window, TTA) and the network it is handed.
- :class:`FileEvaluator` is a MONAI ``Evaluator`` (an ignite engine) over a dataset of
  ``{"image": path}``: one iteration per file, which it predicts and writes with one callable
  (:func:`slab.pipeline.inference.files.predict_file` for segmentation), so every file gets the
  same checks, geometry and atomic writes as ``slab predict``. Handlers attach as to any MONAI
  engine; ``state.output`` of an iteration is what it wrote.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.engines import Evaluator
from monai.inferers import Inferer

from slab.core.errors import SlabError


def _only(batch):
    """The DataLoader's collate for one item per batch: the item itself (paths stay strings)."""
    return batch[0]


class VolumeInferer(Inferer):
    """A MONAI ``Inferer`` that predicts whole volumes as ``predictor`` does.

    ``inferer(inputs, network=None)``: ``inputs`` ``(B, C, X, Y, Z)`` (raw intensities; a
    MetaTensor keeps its geometry) gives ``(B, L, X, Y, Z)`` float32 probabilities on the CPU.
    ``network`` (e.g. the one a MONAI app loaded its own weights into) is used for this call in
    place of the predictor's model; the predictor is left as it was.
    """

    def __init__(self, predictor) -> None:
        super().__init__()
        self.predictor = predictor

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module | None = None, *args, **kwargs) -> torch.Tensor:
        if inputs.ndim != 5:
            raise SlabError(f"inputs: expected a batch of volumes (B, C, X, Y, Z), got shape {tuple(inputs.shape)}")
        model = self.predictor.model
        if network is not None:
            self.predictor.model = network
        try:
            return torch.stack([self.predictor(volume).float().cpu() for volume in inputs])
        finally:
            self.predictor.model = model


class FileEvaluator(Evaluator):
    """A MONAI ``Evaluator`` whose iterations predict and write one file each.

    Parameters
    ----------
    dataset : a sequence (e.g. ``monai.data.Dataset``) of ``{"image": path}``.
    predict : ``predict(path) -> dict`` predicts ``path`` and writes its outputs, returning what
        it wrote (the iteration's ``state.output``; all of them are collected in ``written``).
    network : the network, as ``engine.network`` for handlers that look for it.
    check : ``check(paths)`` run before the first file is predicted (headers, channels, output
        names), so that a bad third input fails before the first output is written.
    finish : ``finish(written) -> result`` after the last file (e.g. one CSV for all); its result
        is :meth:`run`'s. Default: ``written``.
    handlers : MONAI/ignite handlers (``attach(engine)``), e.g. what ``--tracking mlflow`` adds.
    device : the device of ``state.device`` (the predictor keeps its own).
    """

    def __init__(self, dataset: Sequence, predict: Callable[[str], dict], *, network=None,
                 check: Callable[[list], None] | None = None, finish: Callable[[list], object] | None = None,
                 handlers: Sequence | None = None, device=None) -> None:
        from torch.utils.data import DataLoader

        loader = DataLoader(dataset, batch_size=1, shuffle=False, num_workers=0, collate_fn=_only)
        super().__init__(device=torch.device("cpu") if device is None else torch.device(device),
                         val_data_loader=loader, val_handlers=list(handlers or []), decollate=False)
        self.dataset, self.network = dataset, network
        self._predict, self._check, self._finish = predict, check, finish
        self.written: list[dict] = []

    def _iteration(self, engine, batchdata) -> dict:  # noqa: ARG002 - ignite's signature
        if not isinstance(batchdata, dict) or "image" not in batchdata:
            raise SlabError(f"dataset: expected items {{'image': path}}, got {batchdata!r}")
        written = self._predict(batchdata["image"])
        self.written.append(written)
        return written

    def run(self):  # type: ignore[override]
        """Check every input, predict each (one iteration, one epoch), finish; returns what the
        ``finish`` callable returns (default: the list of what each file wrote)."""
        paths = [item["image"] for item in self.dataset]
        if not paths:
            raise SlabError("dataset: no inputs to predict")
        if self._check is not None:
            self._check(paths)
        self.written = []
        super().run()  # Evaluator.run: one epoch from the start, however often it is called
        return self.written if self._finish is None else self._finish(self.written)


class SequenceInferer(Inferer):
    """A MONAI ``Inferer`` scoring whole studies with the slice-sequence classifier.

    ``inferer(inputs, network)``: ``inputs`` ``(B, C, X, Y, Z)`` of raw intensities, each
    normalised (``normalize``) and scored by :func:`slab.pipeline.inference.predict_sequences` as
    one unlabelled sequence of ``n_slabs`` slabs evenly over its slices along ``plane``, gives
    ``{"probability": (B, L), "slice_probabilities": (B, n_slabs, L)}`` (sigmoids, float32, CPU).
    ``network`` is a :class:`slab.networks.SliceSequenceClassifier` (a bundle's ``network_def``,
    :class:`slab.networks.sequence.SliceLogits`, is one: both heads are used).
    """

    def __init__(self, *, offsets=(-1, 0, 1), normalize=None, plane: str = "xy", n_slabs: int = 15,
                 image_size: Sequence[int] = (128, 128), device=None, amp: bool = True) -> None:
        from slab.transforms.intensity import make_normalize

        super().__init__()
        self.normalize = None if normalize is None else make_normalize(normalize)
        self.options = dict(offsets=offsets, plane=plane, n_slabs=n_slabs, size=tuple(image_size), device=device,
                            amp=amp)

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args, **kwargs) -> dict:
        from slab.pipeline.inference.sequences import predict_sequences

        if inputs.ndim != 5:
            raise SlabError(f"inputs: expected a batch of volumes (B, C, X, Y, Z), got shape {tuple(inputs.shape)}")
        probability, slices = [], []
        for volume in inputs:
            if self.normalize is not None:
                volume = self.normalize(volume)
            (scores,) = predict_sequences(network, volume, **self.options).values()
            probability.append(torch.as_tensor(scores["probability"], dtype=torch.float32).reshape(-1))
            per_slice = torch.as_tensor(scores["slice_probabilities"], dtype=torch.float32)
            slices.append(per_slice.reshape(per_slice.shape[0], -1))
        return {"probability": torch.stack(probability), "slice_probabilities": torch.stack(slices)}


__all__ = ["VolumeInferer", "FileEvaluator", "SequenceInferer"]
