"""Glue the bundles' configs call: find the bundle and its data, train, predict, evaluate.

The MONAI bundles under ``bundles/`` wire the library modules together in JSON
(``configs/*.json``); the few steps that are plain Python — listing the input files, writing
phantom datalists, looping over cases, writing ``metrics.json`` — live here, so that a config
reads like a pipeline diagram and the CLI (``slab demo``) runs the same code as
``python -m monai.bundle run``. Nothing here predicts, post-processes or scores by itself: each
function calls :mod:`slab.pipeline.inference`, :mod:`slab.pipeline.evaluation.metrics`, :mod:`slab.pipeline.evaluation.render`,
:mod:`slab.pipeline.training` and :mod:`slab.pipeline.data.phantom`; a bundle's training builds its
``train#trainer`` with :func:`slab.pipeline.training.build_trainer`.
"""
from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from slab.pipeline.paths import BUNDLES_DIR, DATA_DIR, bundle_dir, sample_dir
from slab.core.errors import SlabError

# What every bundle directory holds (models/model.pt only where weights ship).
BUNDLE_FILES = ("configs/metadata.json", "configs/inference.json", "configs/train.json", "configs/evaluate.json",
                "configs/multi_gpu_train.json", "docs/README.md", "LICENSE")
_NIFTI = re.compile(r"\.nii(\.gz)?$")


# ---------------------------------------------------------------------------------------------
# Where things are


def require_files(root, files: Sequence[str] = ("configs/inference.json", "models/model.pt")) -> Path:
    """``root`` as a Path when every one of ``files`` (relative to it) exists, else a SlabError
    naming the first missing path. ``root`` may name a shipped bundle (:func:`bundle_dir`)."""
    root = bundle_dir(root)
    if not root.is_dir():
        raise SlabError(f"{root}: bundle directory not found")
    for name in files:
        if not (root / name).is_file():
            raise SlabError(f"{root / name}: missing; a bundle needs {', '.join(files)}")
    return root


def list_inputs(dataset_dir, pattern: str = "*") -> list[str]:
    """Files (or slice-stack folders) in ``dataset_dir`` matching ``pattern``, in sorted order."""
    if dataset_dir is None:
        raise SlabError("dataset_dir: required; pass --dataset_dir DIR (a folder of volumes)")
    folder = Path(dataset_dir)
    if not folder.is_dir():
        raise SlabError(f"{folder}: dataset_dir not found; expected a folder of volumes")
    found = sorted(str(p) for p in folder.glob(pattern) if not p.name.startswith("."))
    if not found:
        raise SlabError(f"{folder}: no input matches {pattern!r}")
    return found


def list_pairs(dataset_dir, image_pattern: str = "image*", label_pattern: str = "label*") -> list[dict]:
    """``[{"image", "label"}]``: the matches of the two patterns in ``dataset_dir``, paired in
    sorted order (so ``imagesTs/case_1.nii.gz`` pairs with ``labelsTs/case_1.nii.gz``)."""
    images, labels = list_inputs(dataset_dir, image_pattern), list_inputs(dataset_dir, label_pattern)
    if len(images) != len(labels):
        raise SlabError(f"{dataset_dir}: {len(images)} images ({image_pattern}) but {len(labels)} labels "
                        f"({label_pattern}); expected one label per image")
    return [{"image": i, "label": lab} for i, lab in zip(images, labels)]


def zoo_json(value) -> str:
    """``value`` as the model zoo's ``pretty-format-json --no-sort-keys --indent=4`` hook formats a
    bundle's JSON (keys in order, ASCII, a final newline), so that written files pass it as they are."""
    return json.dumps(value, indent=4, default=float) + "\n"


def _stem(path) -> str:
    name = Path(path).name
    return _NIFTI.sub("", name) if _NIFTI.search(name) else Path(name).stem


def run_bundle(bundle, configs: Sequence[str] = ("inference.json",), **overrides):
    """Run a bundle's workflow in this process, as ``python -m monai.bundle run`` does:
    ``configs`` (merged in order, from ``bundle/configs/``) with ``configs/metadata.json``,
    ``bundle_root`` set to ``bundle`` and ``overrides`` (config ids, e.g. ``slab#tta``).

    Returns the list of what the config's ``run`` items returned. A SlabError raised inside
    the workflow comes out as itself (MONAI wraps it in RuntimeError).
    """
    import logging

    from monai.bundle import ConfigWorkflow

    root = require_files(bundle, [f"configs/{c}" for c in configs] + ["configs/metadata.json"])
    files = [str(root / "configs" / c) for c in configs]
    level = logging.getLogger("monai").level
    logging.getLogger("monai").setLevel(logging.ERROR)  # the workflow's input summaries
    try:
        workflow = ConfigWorkflow(config_file=files, meta_file=str(root / "configs" / "metadata.json"),
                                  logging_file=False, workflow_type=None, bundle_root=str(root), **overrides)
        workflow.initialize()
        result = workflow.run()
        workflow.finalize()
    except (RuntimeError, KeyError, ValueError, TypeError) as err:
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, SlabError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise SlabError(str(cause)) from None
        raise
    finally:
        logging.getLogger("monai").setLevel(level)
    return result


# ---------------------------------------------------------------------------------------------
# Data for the bundles' training configs


def datalist_items(datalist, section: str = "training") -> list[dict]:
    """A datalist's ``training`` or ``validation`` items, paths resolved and checked: the data
    source of a bundle's ``train#dataset`` / ``validate#dataset`` (``...#dataset#data``, the model
    zoo's names), which its trainer trains on through :func:`with_items`."""
    from slab.pipeline.data.datalist import load_datalist

    if section not in ("training", "validation"):
        raise SlabError(f"section: expected training or validation, got {section!r}")
    training, validation = load_datalist(datalist, fold=None)
    return list(training if section == "training" else validation)


def with_items(datalist, training: Sequence[Mapping], validation: Sequence[Mapping]) -> dict:
    """``datalist`` (a file or an object: labels, label format, ...) with its ``training`` and
    ``validation`` lists replaced, so that overriding ``train#dataset#data`` or
    ``validate#dataset#data`` changes what a bundle trains and validates on."""
    from slab.pipeline.data.datalist import read_datalist

    data = read_datalist(datalist)
    data["training"], data["validation"] = [dict(i) for i in training], [dict(i) for i in validation]
    return data


def sample_phantom(out_dir, kind: str, shape: Sequence[int], seed: int = 0) -> str:
    """``out_dir`` holding one phantom image, ``image.nii.gz`` (seed 0, which no bundle trains or
    validates on), written once: the default ``dataset_dir`` of a bundle's inference, so that it
    runs as shipped, and MONAI's property check passes, without data. Evaluation needs labelled
    data: a bundle's ``evaluate.json`` asks for its own ``dataset_dir``."""
    from slab.pipeline.data.phantom import make_phantom
    from slab.io.volumes import save_volume

    image = Path(out_dir) / "image.nii.gz"
    if not image.is_file():
        phantom = make_phantom([int(s) for s in shape], int(seed), kind=kind)
        save_volume(phantom.image, image, affine=phantom.affine)
    return str(image.parent)


def phantom_datalist(out_dir, kind: str = "vessels", shape: Sequence[int] = (96, 96, 96),
                     train_seeds: Sequence[int] = (1, 2, 3, 4), val_seeds: Sequence[int] = (100,),
                     spacing: Sequence[float] = (1.0, 1.0, 1.0), labels: Sequence[str] | None = None,
                     label_format: str = "channels", targets: Mapping[str, Sequence[int]] | None = None,
                     image_format: str = "nifti", fractures: bool = False) -> str:
    """Write phantoms (:func:`slab.pipeline.data.phantom.write_phantom`) and a Decathlon datalist over them.

    Phantoms are written once per ``(kind, shape, seed, spacing)`` under ``out_dir`` and reused.
    ``kind="tumour"`` labels (BraTS values) become TC/WT/ET channels with
    :func:`slab.pipeline.data.adapters.brats_label`, as the BraTS adapter does. ``label_format="values"``
    turns a multi-channel label into one channel of values ``1..L`` (for the slice-sequence
    classifier's targets); ``targets`` then gives, per label name, one 0/1 per case in seed
    order (train seeds, then validation seeds). ``fractures=True`` (kind ``organs``) draws a
    crack through organ ``i`` of every case whose target ``labels[i]`` is 1, so the targets can
    be learnt from the image. ``image_format="png"`` stores each image as a
    stack of 16-bit PNG slices (``image/0000.png``...), as UW-Madison scans come.

    Returns
    -------
    str
        ``out_dir/datalist.json``: ``training`` (train seeds) and ``validation`` (val seeds).
    """
    from slab.pipeline.data.adapters import brats_label
    from slab.pipeline.data.phantom import write_phantom
    from slab.core.outputs import atomic_write
    from slab.io.volumes import load_volume, save_volume

    out = Path(out_dir).resolve()  # the datalist's paths are absolute: they resolve from anywhere
    shape = [int(s) for s in shape]
    tag = f"{kind}_{'x'.join(map(str, shape))}_sp{'x'.join(f'{float(s):g}' for s in spacing)}"
    seeds = [int(s) for s in train_seeds] + [int(s) for s in val_seeds]
    for name, values in (targets or {}).items():
        if len(values) < len(seeds):
            raise SlabError(f"targets: {name} has {len(values)} values for {len(seeds)} cases (train seeds, then "
                            "validation seeds)")
    if fractures and (kind != "organs" or not targets or not labels or set(targets) - set(labels)):
        raise SlabError("fractures: draw cracks for targets of kind organs; give labels and targets by label name")
    items = []
    for n, seed in enumerate(seeds):
        cracked = [i for i, name in enumerate(labels or ()) if fractures and name in targets and int(targets[name][n])]
        case = out / tag / (f"seed{seed}" + (f"_fractures{''.join(map(str, cracked))}" if cracked else ""))
        if image_format not in ("nifti", "png"):
            raise SlabError(f"image_format: expected nifti or png, got {image_format!r}")
        paths = {"image": case / ("image.nii.gz" if image_format == "nifti" else "image_png"),
                 "label": case / f"label_{label_format}.nii.gz"}
        if not paths["label"].is_file() or not paths["image"].exists():
            _, label_path = write_phantom(case, shape=shape, seed=seed, kind=kind, spacing=spacing, fractures=cracked)
            label = load_volume(label_path)
            array = np.asarray(label)
            if kind == "tumour":
                array = brats_label(array[0], label_path)
            if label_format == "values":
                array = (np.argmax(array, axis=0) + 1) * array.any(axis=0)
                array = array[None].astype(np.uint8)
            save_volume(array, paths["label"], affine=np.asarray(label.affine))
            if image_format == "png":
                save_volume(load_volume(case / "image.nii.gz"), paths["image"], slice_format="png")
        item = {"id": f"{kind}_seed{seed}", "case": f"seed{seed}", "fold": 0 if n >= len(train_seeds) else 1,
                "image": str(paths["image"]), "label": str(paths["label"])}
        if targets:
            item["targets"] = {name: int(values[n]) for name, values in targets.items()}
        items.append(item)
    datalist = {"kind": f"phantom:{kind}", "label_format": label_format, "n_folds": 2,
                "training": items[:len(train_seeds)], "validation": items[len(train_seeds):]}
    if labels:
        datalist["labels"] = list(labels)
    path = out / "datalist.json"
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(datalist, indent=1) + "\n", encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------------------------------------
# Train, predict, evaluate


def export_training(trainer, export_weights=None) -> dict:
    """Run a bundle's ``train#trainer`` (a :class:`slab.pipeline.training.SlabTrainer`), then write the best
    checkpoint's weights (state dict only) to ``export_weights`` and its summary beside them (``model.json``:
    best metric, threshold, epochs, time, a pretrained encoder's provenance). A bundle's ``train.json`` exports
    under its ``output_dir``; into a bundle only when asked (``--export_weights
    bundles/<name>/models/model.pt``).

    Returns the training result with ``time_s`` and ``exported`` added.
    """
    from slab.core.distributed import dist_env
    from slab.core.outputs import atomic_write
    from slab.networks import read_state_dict
    from slab.pipeline.model.checkpoints import load_checkpoint

    start = time.perf_counter()
    result = trainer.run()
    result["time_s"] = round(time.perf_counter() - start, 1)
    if export_weights and dist_env().is_main:
        target = Path(export_weights)
        checkpoint = load_checkpoint(result["best_checkpoint"])  # read once: the weights and their network
        state = read_state_dict(checkpoint["model"], name=result["best_checkpoint"])
        with atomic_write(target) as tmp:
            torch.save({k: v.contiguous() for k, v in state.items()}, tmp)
        summary = {"best": result["best"], "threshold": result["threshold"], "time_s": result["time_s"],
                   "history": result["history"]}
        encoder = (checkpoint.get("network") or {}).get("encoder_weights")
        if isinstance(encoder, dict):  # the pretrained encoder the weights started from: source, sha256, licence
            summary["encoder_weights"] = encoder
        with atomic_write(target.with_suffix(".json")) as tmp:
            tmp.write_text(zoo_json(summary), encoding="utf-8")
        result["exported"] = str(target)
    return result


def check_inputs(predictor, images: Sequence, labels: Sequence | None = None) -> None:
    """Every input's header checked (and its channels against the network, its label's shape and
    geometry against it) before anything is written: a bad third case fails before the first is
    predicted."""
    from slab.io.volumes import volume_info

    for n, image in enumerate(images):
        info = volume_info(image)
        predictor.check_input(info, image)
        if labels is not None:
            shape, _, affine = volume_info(labels[n])
            if tuple(shape[1:]) != tuple(info[0][1:]) or not np.allclose(affine, info[2], atol=1e-4):
                raise SlabError(f"{labels[n]}: shape {tuple(shape[1:])} or geometry does not match {image} "
                                f"{tuple(info[0][1:])}")


def image_dataset(inputs):
    """A bundle's ``dataset`` (MONAI's InferProperties): a ``monai.data.Dataset`` of
    ``{"image": path}``, one item per input file (or slice-stack folder)."""
    from monai.data import Dataset

    inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    return Dataset(data=[{"image": str(path)} for path in inputs])


def segmentation_evaluator(predictor, dataset, output_dir, *, output_name: str = "{stem}_mask.nii.gz",
                           prob_name: str | None = None, per_channel: bool = False, handlers=None):
    """A bundle's ``evaluator``: a :class:`slab.pipeline.inference.engine.FileEvaluator` that writes
    ``output_dir/<output_name>`` for every image of ``dataset`` with
    :func:`slab.pipeline.inference.predict_file` (the cleaned mask on the input's geometry: a
    label map for several labels, or one channel per label with ``per_channel``) and optionally
    the probabilities ``<prob_name>``. Names may hold ``{stem}``, the input's name without its
    extension. Every input's header is checked before the first is predicted."""
    from slab.pipeline.inference import predict_file
    from slab.pipeline.inference.engine import FileEvaluator

    out = Path(output_dir)

    def check(paths):
        names = [output_name.format(stem=_stem(p)) for p in paths]
        if len(set(names)) != len(names):
            raise SlabError(f"output_name: {output_name!r} gives the same file for several inputs; use {{stem}}")
        check_inputs(predictor, paths)

    def predict(path):
        prob = None if prob_name is None else out / prob_name.format(stem=_stem(path))
        written = predict_file(path, out / output_name.format(stem=_stem(path)), predictor, prob_path=prob,
                               per_channel=per_channel)
        return {"image": str(path), **{k: str(v) for k, v in written.items()}}

    return FileEvaluator(dataset, predict, network=predictor.model, check=check, handlers=handlers,
                         device=predictor.device)


def run_evaluator(evaluator):
    """Run a bundle's ``evaluator`` (``run: ["@inference"]``); returns what it wrote."""
    return evaluator.run()


def run_inference(predictor, inputs: Sequence, output_dir, *, output_name: str = "{stem}_mask.nii.gz",
                  prob_name: str | None = None, per_channel: bool = False) -> list[dict]:
    """Predict every input as a bundle's ``evaluator`` does (:func:`segmentation_evaluator`);
    returns ``[{"image", "mask", ...}]``, what was written for each."""
    return segmentation_evaluator(predictor, image_dataset(inputs), output_dir, output_name=output_name,
                                  prob_name=prob_name, per_channel=per_channel).run()


def run_evaluation(predictor, pairs: Sequence[Mapping], output_dir, *, tolerances: Sequence[float] = (0.0, 1.0),
                   output_name: str = "{stem}_mask.nii.gz", render: bool = True, views: int = 4,
                   metrics_name: str = "metrics.json") -> dict:
    """Predict each image (:func:`run_inference`), score the mask written against its label
    (:func:`slab.pipeline.evaluation.metrics.evaluate`, spacing-aware), draw hits and misses
    (:func:`slab.pipeline.evaluation.render.render_hits`, ``<stem>_hits.png``) and cross sections
    (:func:`slab.pipeline.evaluation.render.cross_sections`, ``<stem>_sections.png``), and write
    ``output_dir/metrics.json``: every case and the mean over cases.

    Returns the content of ``metrics.json``.
    """
    from slab.pipeline.evaluation.metrics import evaluate
    from slab.core.outputs import atomic_write
    from slab.io.volumes import check_same_geometry, load_volume

    out = Path(output_dir)
    check_inputs(predictor, [p["image"] for p in pairs], [p["label"] for p in pairs])
    cases = []
    for pair in pairs:
        start = time.perf_counter()
        # scored per channel: nested regions (BraTS) cannot be recovered from a label map
        (written,) = run_inference(predictor, [pair["image"]], out, output_name=output_name, per_channel=True)
        predict_s = time.perf_counter() - start
        mask, truth = load_volume(written["mask"]), load_volume(pair["label"])
        check_same_geometry(mask, truth, names=[written["mask"], str(pair["label"])])
        spacing = tuple(float(s) for s in truth.meta["spacing"])
        scores = evaluate(np.asarray(mask), np.asarray(truth) > 0, spacing, tolerances)
        case = {"image": str(pair["image"]), "label": str(pair["label"]), "mask": written["mask"],
                "predict_s": round(predict_s, 2), **{k: scores[k] for k in ("dice", "iou", "precision", "recall",
                                                                             "surface_dice")},
                "classes": scores["classes"], "spacing": list(spacing)}
        if render:
            from slab.pipeline.evaluation.render import render_hits
            from slab.pipeline.evaluation.sections import cross_sections

            stem = _stem(pair["image"])
            image = load_volume(pair["image"])
            title = f"{Path(pair['image']).name} vs {Path(pair['label']).name}"
            for c, scored in enumerate(scores["classes"]):
                suffix = "" if mask.shape[0] == 1 else f"_class{c}"
                shown = {k: scored[k] for k in ("dice", "iou", "precision", "recall", "surface_dice")}
                hits = render_hits(mask, truth, out / f"{stem}_hits{suffix}.png", spacing=spacing, views=views,
                                   image=image[0], title=title, scores=shown, channel=c)
                sections = cross_sections(image[0], mask, truth, out / f"{stem}_sections{suffix}.png",
                                          spacing=spacing, title=title, channel=c, affine=np.asarray(truth.affine))
                case.setdefault("pictures", []).extend([str(hits["path"]), str(sections["path"])])
        cases.append(case)
    keys = ("dice", "iou", "precision", "recall")
    mean = {k: _nanmean([c[k] for c in cases]) for k in keys}
    mean["surface_dice"] = {t: _nanmean([c["surface_dice"][t] for c in cases]) for t in cases[0]["surface_dice"]}
    report = {"mean": mean, "cases": cases, "settings": predictor_settings(predictor)}
    with atomic_write(out / metrics_name) as tmp:
        text = json.dumps(report, indent=1, default=_json_default, allow_nan=True).replace("NaN", "null")
        tmp.write_text(text + "\n", encoding="utf-8")
    report["path"] = str(out / metrics_name)
    return report


def predictor_settings(predictor) -> dict:
    """The inference settings of a :class:`slab.pipeline.inference.Predictor`, for reports: mode, planes,
    offsets, TTA, device and the post-processing steps with their parameters."""
    post = predictor.postprocess
    steps = [getattr(post, "binarise", None), *getattr(post, "steps", [])]
    plain = (int, float, str, bool, list, tuple, type(None))
    offsets = getattr(predictor, "offsets", None)
    return {"mode": predictor.mode, "planes": list(getattr(predictor, "planes", []) or []),
            "offsets": None if offsets is None else list(offsets), "tta": predictor.tta,
            "roi_size": None if getattr(predictor, "roi_size", None) is None else list(predictor.roi_size),
            "postprocess": [{"step": type(step).__name__, **{k: v for k, v in vars(step).items()
                                                            if isinstance(v, plain)}}
                            for step in steps if step is not None],
            "device": str(predictor.device)}


def _nanmean(values) -> float:
    values = [float(v) for v in values if v is not None and not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, (Path, torch.device)):
        return str(value)
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return np.asarray(value).tolist()
    return str(value)


def classification_evaluator(network, inferer, dataset, output_dir, *, csv_name: str = "predictions.csv",
                              handlers=None):
    """A bundle's ``evaluator`` for the slice-sequence classifier: each study of ``dataset`` is
    loaded and scored by ``inferer`` (a :class:`slab.pipeline.inference.engine.SequenceInferer`)
    with ``network``; after the last, ``output_dir/<csv_name>`` is written with the rows
    ``image,probability,max_slice_probability`` (the sequence head's probability, the largest
    per-slice probability). Returns the CSV's path when run."""
    from slab.pipeline.inference.engine import FileEvaluator
    from slab.core.outputs import atomic_write
    from slab.io.volumes import load_volume, volume_info

    def check(paths):
        for path in paths:
            volume_info(path)  # every header readable before the first study is scored

    def predict(path):
        scores = inferer(load_volume(path)[None], network)
        return {"image": str(path), "probability": float(scores["probability"].max()),
                "max_slice_probability": float(scores["slice_probabilities"].max())}

    def finish(written):
        target = Path(output_dir) / csv_name
        rows = ["image,probability,max_slice_probability"]
        rows += [f"{w['image']},{w['probability']:.6f},{w['max_slice_probability']:.6f}" for w in written]
        with atomic_write(target) as tmp:
            tmp.write_text("\n".join(rows) + "\n", encoding="utf-8")
        return str(target)

    return FileEvaluator(dataset, predict, network=network, check=check, finish=finish, handlers=handlers,
                         device=inferer.options["device"])


def run_classification(network_config: Mapping, weights, inputs: Sequence, output_dir, *, offsets=(-1, 0, 1),
                       normalize: Mapping | None = None, plane: str = "xy", n_slabs: int = 15,
                       image_size: Sequence[int] = (128, 128), device=None, amp: bool = True,
                       csv_name: str = "predictions.csv") -> str:
    """Score whole studies with the slice-sequence classifier (``network_config`` with
    ``weights``) and write ``output_dir/<csv_name>``, as the bundle's ``evaluator`` does
    (:func:`classification_evaluator`, :class:`~slab.pipeline.inference.engine.SequenceInferer`)."""
    from slab.networks import load_weights
    from slab.pipeline.inference.engine import SequenceInferer

    inferer = SequenceInferer(offsets=offsets, normalize=normalize, plane=plane, n_slabs=n_slabs,
                              image_size=image_size, device=device, amp=amp)
    return classification_evaluator(load_weights(network(network_config), weights), inferer, image_dataset(inputs),
                                    output_dir, csv_name=csv_name).run()


# ---------------------------------------------------------------------------------------------
# Networks as bundle components


def network(config: Mapping) -> nn.Module:
    """:func:`slab.networks.build_network` from one config object (a bundle's ``slab#network``), so
    that ``network_def`` follows whatever network the bundle names (e.g. ``unet`` or
    ``swin_unetr``)."""
    from slab.networks import build_network

    return build_network(**dict(config))



def SliceLogits(config: Mapping) -> nn.Module:  # noqa: N802 - the configs' component name
    """The bundle's sequence classifier (:func:`network` of ``config``) as
    :class:`slab.networks.sequence.SliceLogits`: one tensor out, the per-slice logits ``(B, N)``,
    which is what MONAI's ``verify_net_in_out``, TorchScript (``ckpt_export``) and ONNX
    (``onnx_export``) expect of a bundle's ``network_def``. The state dict is the classifier's."""
    from slab.networks.sequence import SliceLogits as Logits

    return Logits.of(network(config))


__all__ = ["zoo_json", "BUNDLES_DIR", "DATA_DIR", "sample_dir", "require_files", "run_bundle", "list_inputs", "list_pairs", "datalist_items", "with_items", "sample_phantom", "phantom_datalist",
           "export_training", "image_dataset", "segmentation_evaluator", "classification_evaluator", "run_evaluator",
           "run_inference", "run_evaluation", "run_classification",
           "predictor_settings", "network", "SliceLogits"]
