"""slab: MONAI-based 2.5D and 3D segmentation and classification of 3D medical volumes.

The public API, in one place: ``import slab; slab.Predictor, slab.train, slab.evaluate, ...``.

The code is in three packages under this one namespace. :mod:`slab.pipeline` follows the data
flow: :mod:`slab.pipeline.data` (adapters, datalists, samplers, phantoms, cases) →
:mod:`slab.pipeline.training` (loop, config, tasks, checkpoints) → :mod:`slab.pipeline.inference`
(2.5D and 3D engines, predictor, files) → :mod:`slab.pipeline.evaluation` (metrics, pictures);
:mod:`slab.pipeline.cli` is the ``slab`` command and :mod:`slab.pipeline.bundle` the glue the
MONAI bundles call. Volumes, intensities, slabs and post-processing are in :mod:`slab.transforms`,
networks in :mod:`slab.networks`.

Names are imported when first used, so that ``import slab`` (and ``slab --help``) stays light.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    # data
    "build_datalist": "slab.pipeline.data.adapters", "load_datalist": "slab.pipeline.data.datalist",
    "SlabDataset": "slab.pipeline.data.slabs", "volume_sequences": "slab.pipeline.data.sequences",
    "find_cases": "slab.pipeline.data.cases", "make_phantom": "slab.pipeline.data.phantom", "write_phantom": "slab.pipeline.data.phantom",
    # training
    "train": "slab.pipeline.training", "validate_config": "slab.pipeline.training", "describe_config": "slab.pipeline.training",
    "load_checkpoint": "slab.pipeline.training",
    # inference
    "Predictor": "slab.pipeline.inference", "predict_2p5d": "slab.pipeline.inference", "predict_3d": "slab.pipeline.inference",
    "predict_file": "slab.pipeline.inference", "predict_sequences": "slab.pipeline.inference",
    "recorded_postprocess": "slab.pipeline.inference",
    # evaluation
    "evaluate": "slab.pipeline.evaluation.metrics", "surface_dice": "slab.pipeline.evaluation.metrics",
    "overlap_metrics": "slab.pipeline.evaluation.metrics", "threshold_sweep": "slab.pipeline.evaluation.metrics",
    "SurfaceDiceMetric": "slab.pipeline.evaluation.metrics", "OverlapMetric": "slab.pipeline.evaluation.metrics",
    "render_hits": "slab.pipeline.evaluation.render", "export_mesh": "slab.pipeline.evaluation.render",
    "cross_sections": "slab.pipeline.evaluation.sections",
    # volumes, transforms, networks
    "load_volume": "slab.io.volumes", "save_volume": "slab.io.volumes",
    "write_dicom_seg": "slab.io.dicom_seg", "postprocess": "slab.transforms.post",
    "PercentileNormalize": "slab.transforms.intensity", "build_network": "slab.networks", "load_weights": "slab.networks",
    # what this installation ships: the bundles (by name, e.g. Predictor.from_bundle("vessel_2p5d")) and sample data
    "sample_dir": "slab.pipeline.paths", "shipped_bundles": "slab.pipeline.paths",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'slab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
