"""slab's public API, in one place: ``from pipeline import Predictor, train, evaluate, ...``.

The rooms follow the data flow: :mod:`pipeline.data` (adapters, datalists, samplers, phantoms,
cases) → :mod:`pipeline.training` (loop, config, tasks, checkpoints) → :mod:`pipeline.inference`
(2.5D and 3D engines, predictor, files) → :mod:`pipeline.evaluation` (metrics, pictures);
:mod:`pipeline.cli` is the ``slab`` command and :mod:`pipeline.bundle` the glue the MONAI
bundles call. Volumes, intensities, slabs and post-processing are in :mod:`transforms`,
networks in :mod:`networks`.

Names are imported when first used, so that ``import pipeline`` (and ``slab --help``) stays light.
"""
from __future__ import annotations

import importlib

_API = {
    # data
    "build_datalist": "pipeline.data.adapters", "load_datalist": "pipeline.data.datalist",
    "SlabDataset": "pipeline.data.slabs", "volume_sequences": "pipeline.data.sequences",
    "find_cases": "pipeline.data.cases", "make_phantom": "pipeline.data.phantom", "write_phantom": "pipeline.data.phantom",
    # training
    "train": "pipeline.training", "validate_config": "pipeline.training", "describe_config": "pipeline.training",
    "load_checkpoint": "pipeline.training",
    # inference
    "Predictor": "pipeline.inference", "predict_2p5d": "pipeline.inference", "predict_3d": "pipeline.inference",
    "predict_file": "pipeline.inference", "predict_sequences": "pipeline.inference",
    "recorded_postprocess": "pipeline.inference",
    # evaluation
    "evaluate": "pipeline.evaluation.metrics", "surface_dice": "pipeline.evaluation.metrics",
    "overlap_metrics": "pipeline.evaluation.metrics", "threshold_sweep": "pipeline.evaluation.metrics",
    "SurfaceDiceMetric": "pipeline.evaluation.metrics", "OverlapMetric": "pipeline.evaluation.metrics",
    "render_hits": "pipeline.evaluation.render", "export_mesh": "pipeline.evaluation.render",
    "cross_sections": "pipeline.evaluation.sections",
    # volumes, transforms, networks
    "load_volume": "transforms.io", "save_volume": "transforms.io", "postprocess": "transforms.post",
    "PercentileNormalize": "transforms.intensity", "build_network": "networks", "load_weights": "networks",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
