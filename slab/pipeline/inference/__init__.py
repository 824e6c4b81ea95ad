"""Inference: multi-plane 2.5D with test-time augmentation (:mod:`.multiplane`, also for volumes
larger than memory, :mod:`.ondisk`), 3D sliding window (:mod:`.window`), slice-sequence scoring
(:mod:`.sequences`), the configured :class:`Predictor` (:mod:`.predictor`) and file in, file out
(:mod:`.files`)."""
from slab.pipeline.inference.files import predict_file
from slab.pipeline.inference.forward import check_planes
from slab.pipeline.inference.multiplane import DEFAULT_MEMORY_BUDGET, OUT_DTYPES, predict_2p5d
from slab.pipeline.inference.predictor import BUNDLE_KEYS, DEFAULT_NORMALIZE, INFERENCE_KEYS, Predictor, recorded_postprocess
from slab.pipeline.inference.sequences import predict_sequences, score_sequences
from slab.pipeline.inference.window import predict_3d
from slab.core.checks import MODES, PLANES, TTA_MODES, TTA_MODES_3D

__all__ = ["predict_2p5d", "predict_3d", "predict_file", "predict_sequences", "score_sequences", "Predictor",
           "recorded_postprocess", "check_planes", "MODES", "PLANES", "TTA_MODES", "TTA_MODES_3D", "OUT_DTYPES",
           "DEFAULT_MEMORY_BUDGET", "DEFAULT_NORMALIZE", "INFERENCE_KEYS", "BUNDLE_KEYS"]
