"""Files in, files out: :func:`predict_file` loads one volume (lazily when the predictor's memory
budget asks for it), predicts, post-processes and writes the mask (and probabilities, RLE CSV)
in the input's geometry."""
from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable
from pathlib import Path

import numpy as np
import torch

from slab.io.dicom_seg import check_dicom_seg, is_dicom_seg, write_dicom_seg
from slab.core.errors import SlabError, SlabWarning
from slab.io.registry import find
from slab.io.volumes import CHUNKED_OUTPUTS, LazyVolume, load_volume, output_format, save_volume
from slab.io.labelmap import segment_metadata, to_label_map, to_layers
from slab.io.rle import write_rle_csv


@runtime_checkable
class VolumePredictor(Protocol):
    """What :func:`predict_file` asks of a model: a :class:`~slab.pipeline.inference.Predictor`
    and an :class:`~slab.pipeline.inference.ensemble.Ensemble` both answer it, in memory and out
    of core alike."""

    out_channels: int
    memory_budget: int | None
    postprocess: Callable  # make_postprocess's chain: in memory, and read by the out-of-core chain
    label_map: dict

    def __call__(self, volume, out_path=None, shard=None): ...

    def label_names(self) -> list[str]: ...

    def check_input(self, info, name) -> None: ...

    def fits_in_memory(self, volume) -> bool: ...

    def out_of_core(self, volume) -> bool: ...

    @property
    def work_arrays(self) -> int: ...


@dataclass(frozen=True)
class Target:
    """Where one prediction is written, every name checked once (:func:`check_target`), before a
    model or a volume is read."""

    mask: Path
    layout: str  # "volume", "seg.nrrd" (3D Slicer's segmentation) or "dicom-seg"
    format: str | None  # the mask's format (slab.io.registry's name); None for a DICOM SEG
    prob: Path | None = None
    prob_format: str | None = None


def check_target(output_path, per_channel: bool = False, source=None, prob_path=None) -> Target:
    """Where :func:`predict_file` writes: a ``.dcm`` name is a DICOM SEG of the DICOM series
    ``source`` (checked by :func:`~slab.io.dicom_seg.check_dicom_seg` when ``source`` is
    given), ``*.seg.nrrd`` 3D Slicer's segmentation (one label map, or with ``per_channel`` one
    layer per group of labels that do not overlap), any other name a volume in the format
    :func:`~slab.io.volumes.output_format` gives it; ``prob_path`` a volume too. Else SlabError."""
    output_path = Path(output_path)
    if is_dicom_seg(output_path):
        if source is not None:
            check_dicom_seg(output_path, source)
        layout, fmt = "dicom-seg", None
    else:
        fmt = output_format(output_path)
        layout = "seg.nrrd" if str(output_path).lower().endswith(".seg.nrrd") else "volume"
    prob = Path(prob_path) if prob_path is not None else None
    return Target(output_path, layout, fmt, prob, output_format(prob) if prob is not None else None)


def _open(path, predictor: VolumePredictor):
    """The input volume, its format found once: lazily when it would not fit the memory budget
    (without one, half the memory this process can have); channel files and formats read only
    whole (NRRD, MHA, DICOM) are loaded."""
    if isinstance(path, (list, tuple)):
        return load_volume(path)
    source = find(path)
    if not source.format.lazy:
        return source.read()
    lazy = source.open()
    if predictor.fits_in_memory(lazy):
        try:
            return lazy.load()
        finally:
            lazy.close()
    return lazy


def predict_file(input_path, output_path: str | Path | Target, predictor: VolumePredictor, *, prob_path=None, rle_csv=None,
                 id_prefix: str | None = None, row_ids: Callable[[int], list[str]] | None = None,
                 statistics: bool = False, per_channel: bool = False, shard=None,
                 preview=None) -> dict[str, Path | dict]:
    """Predict one volume and write its mask (and probabilities, RLE CSV).

    Load ``input_path`` (any format ``load_volume`` reads, or a list of files as channels; lazily
    when the predictor's memory budget asks for it), normalise, predict, post-process
    (``predictor.postprocess``), and write the uint8 mask to ``output_path`` (NIfTI or NRRD/MHA
    with the input's geometry, or a slice stack of 0/255 for a directory name), optionally the
    probabilities to ``prob_path`` (float32; an on-disk float16 result stays float16 in a slice
    stack) and a submission CSV to ``rle_csv``: ``id,rle`` for one label (SenNet), else
    ``id,class,segmentation`` with the predictor's label names (UW-Madison). Row ids are
    ``row_ids(depth)``, or ``{id_prefix}_{z:04d}``.

    A multi-label mask is written as one label map (``predictor.label_map``: uint8, label ``i``
    has value ``values[i]``; a ``.seg.nrrd`` name adds 3D Slicer's segment names, colours and
    values); ``per_channel`` writes one 0/1 channel per label instead (overlapping labels, e.g.
    BraTS regions, kept apart). A ``.dcm`` name, when the input is a DICOM series directory, is a
    DICOM SEG with one segment per label referencing the input's instances
    (:func:`~slab.io.dicom_seg.write_dicom_seg`). Output names are checked before anything is
    read (``output_path`` may be a :class:`Target` checked already: its names and ``prob_path``
    are then not checked again); every file is written atomically. With ``statistics``, the result also holds each
    label's statistics (:func:`slab.pipeline.evaluation.statistics.label_statistics`: volume in mm³,
    components, centroid, the input's intensities inside it).

    ``preview`` (a PNG): a 3D picture of the prediction over the image
    (:func:`slab.pipeline.evaluation.prediction_picture.render_prediction`), no ground truth needed.

    Under ``torchrun``, ``shard`` (:class:`~slab.core.distributed.DistInfo`, the process
    group joined) makes the ranks share this one volume: out of core, each predicts its share of
    the blocks and rank 0 post-processes and writes; in memory, rank 0 alone predicts. Ranks other
    than 0 return an empty dict.

    Returns
    -------
    dict with the paths written: ``mask``, and ``prob`` / ``rle_csv`` when asked for; and
    ``statistics`` (a dict) with ``statistics``.
    """
    if isinstance(output_path, Target) and prob_path is not None and Path(prob_path) != output_path.prob:
        raise SlabError(f"prob_path: {prob_path} differs from the checked target's ({output_path.prob}); give it "
                        "to check_target")
    target = output_path if isinstance(output_path, Target) else check_target(output_path, per_channel, input_path,
                                                                              prob_path)
    output_path, prob_path, layout = target.mask, target.prob, target.layout
    if rle_csv is not None and not (id_prefix or row_ids):
        raise SlabError("id_prefix: an RLE CSV needs the id prefix of its rows (e.g. kidney_5)")
    main = shard is None or not shard.enabled or shard.is_main
    volume = _open(input_path, predictor)
    # chunked outputs of a volume that does not fit: zarr all the way, resumable after a kill
    out_of_core = layout == "volume" and target.format in CHUNKED_OUTPUTS and predictor.out_of_core(volume)
    if shard is not None and shard.enabled:  # every rank takes rank 0's decision (free memory differs)
        from slab.core.distributed import gather_objects

        out_of_core = gather_objects(bool(out_of_core), shard)[0]
        if out_of_core and not isinstance(volume, LazyVolume):
            volume = load_volume(input_path, lazy=True)
    if out_of_core:
        return _predict_out_of_core(volume, target, predictor, rle_csv, id_prefix, row_ids, statistics, per_channel,
                                    shard, preview)
    if not main:
        return {}
    probs = predictor(volume)
    mask = predictor.postprocess(probs)
    affine = np.asarray(volume.affine)
    meta = dict(getattr(volume, "meta", {}))
    if layout == "dicom-seg":  # one segment per label, on the instances of the input series
        from importlib.metadata import version  # the installed distribution's (slab.__version__ is its source)

        written = {"mask": write_dicom_seg(np.asarray(mask), input_path, output_path, predictor.label_names(),
                                           version=version("slab-seg"))}
    else:
        written = {"mask": _save_mask(mask, output_path, predictor, affine, meta, per_channel,
                                      layout == "seg.nrrd")}
    if prob_path is not None:
        if probs.dtype != torch.float32 and target.prob_format != "stack":
            probs = probs.float()  # NIfTI and ITK files have no float16
        written["prob"] = save_volume(probs, prob_path, affine=affine, meta=meta)
    if rle_csv is not None:
        depth = int(mask.shape[-1])
        ids = row_ids(depth) if row_ids is not None else [f"{id_prefix}_{z:04d}" for z in range(depth)]
        written["rle_csv"] = write_rle_csv(np.asarray(mask), rle_csv, ids, predictor.label_names())
    if statistics:
        from slab.pipeline.evaluation.statistics import label_statistics

        written["statistics"] = label_statistics(mask, volume, affine, predictor.label_names())
    if preview is not None:
        written["preview"] = _preview(mask, volume, preview, predictor)
    return written


def _preview(mask, volume, png, predictor: VolumePredictor) -> Path:
    from slab.pipeline.evaluation.prediction_picture import render_prediction

    name = volume.meta.get("filename_or_obj") if hasattr(volume, "meta") else None
    return render_prediction(mask, png, names=predictor.label_names(), spacing=volume.meta["spacing"], image=volume,
                             title=str(name) if name else None)["path"]


def _predict_out_of_core(volume, target: Target, predictor: VolumePredictor, rle_csv, id_prefix, row_ids,
                         statistics: bool, per_channel: bool, shard=None, preview=None) -> dict:
    """A volume larger than the budget, to a zarr/HDF5/TIFF output: probabilities into a zarr store
    chunk by chunk (``prob_path`` when it is a ``.zarr``, else ``<output>.partial/probabilities.zarr``;
    finished blocks survive a kill, and the same command resumes), then the post-processing slab by
    slab (:mod:`slab.transforms.blockwise`) into the mask, written block by block."""
    import shutil

    from slab.pipeline.inference.store import ACTIVE, check_work_space, work_dir
    from slab.transforms.blockwise import BlockwisePostprocess, MaskVolume

    if statistics:
        raise SlabError("--statistics: needs the volume in memory; this one is predicted out of core "
                        "(raise --memory-budget, or drop --statistics)")
    output_path, prob_path, segmentation = target.mask, target.prob, target.layout == "seg.nrrd"
    BlockwisePostprocess.settings(predictor.postprocess, predictor.out_channels)  # refusals first
    # before the input's statistics are read: a header claiming 100000^3 voxels is one line, not days
    check_work_space(output_path, (predictor.out_channels,) + tuple(int(n) for n in volume.shape[1:]),
                     predictor.work_arrays,
                     volume.meta.get("filename_or_obj") if hasattr(volume, "meta") else None)
    work = work_dir(output_path)
    ACTIVE.add(work)
    own_store = prob_path is None or target.prob_format != "zarr"
    store = work / "probabilities.zarr" if own_store else Path(prob_path)
    probs = predictor(volume, out_path=store, shard=shard)
    if shard is not None and shard.enabled and not shard.is_main:
        ACTIVE.discard(work)
        return {}  # rank 0 post-processes and writes
    affine = np.asarray(volume.affine)
    post = BlockwisePostprocess(probs, predictor.postprocess, predictor.memory_budget or (1 << 30))
    values, order = predictor.label_map["values"], predictor.label_map["order"]
    fields = segment_metadata(predictor.label_names(), values) if segmentation else None
    source = str(volume.meta.get("filename_or_obj"))
    single = per_channel or (probs.shape[0] == 1 and values == (1,))
    if single:
        mask = MaskVolume(post, affine, source)
    else:
        mask = MaskVolume(post, affine, source, lambda block: to_label_map(block, values, order)[0], channels=1)
    written = {"mask": save_volume(mask, output_path, affine=affine, meta=dict(volume.meta), mask=single,
                                   labels=not single, fields=fields)}
    if prob_path is not None:
        written["prob"] = Path(prob_path) if not own_store else save_volume(
            probs if target.prob_format in CHUNKED_OUTPUTS else probs.load().float(), prob_path,
            affine=affine, meta=dict(volume.meta))
    if rle_csv is not None:
        full = np.asarray(mask.load())
        depth = int(full.shape[-1])
        ids = row_ids(depth) if row_ids is not None else [f"{id_prefix}_{z:04d}" for z in range(depth)]
        written["rle_csv"] = write_rle_csv(full, rle_csv, ids, predictor.label_names())
    if preview is not None:  # the channels' masks, read a slab at a time
        written["preview"] = _preview(MaskVolume(post, affine, source), volume, preview, predictor)
    if hasattr(probs, "close"):
        probs.close()
    shutil.rmtree(work, ignore_errors=True)
    ACTIVE.discard(work)
    return written


def _save_mask(mask, output_path, predictor: VolumePredictor, affine, meta, per_channel: bool, segmentation: bool) -> Path:
    """The mask as a label map (multi-label, unless ``per_channel``), with Slicer's segment
    fields for a ``.seg.nrrd``."""
    values, order = predictor.label_map["values"], predictor.label_map["order"]
    if segmentation and per_channel:  # overlapping labels kept apart, in Slicer's layers
        layers, placed = to_layers(np.asarray(mask), values)
        fields = segment_metadata(predictor.label_names(), values, layers=placed)
        return save_volume(layers, output_path, affine=affine, meta=meta, labels=True, fields=fields)
    fields = segment_metadata(predictor.label_names(), values) if segmentation else None
    if per_channel or (mask.shape[0] == 1 and values == (1,)):
        return save_volume(mask, output_path, affine=affine, meta=meta, mask=True, fields=fields)
    label, overlaps = to_label_map(np.asarray(mask), values, order)
    if overlaps and not predictor.label_map["declared_order"]:
        warnings.warn(SlabWarning(f"{output_path}: {overlaps} voxels are in more than one label; the label map "
                                  "keeps the later label (--per-channel writes one channel per label)"), stacklevel=3)
    return save_volume(label, output_path, affine=affine, meta=meta, labels=True, fields=fields)
