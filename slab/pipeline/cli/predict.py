"""``slab predict -i INPUT [INPUT ...] -o OUTPUT``: a trained network over volumes, to masks in
their geometry.

The network comes from ``--model MODEL`` (a training run or checkpoint, a cross-validated plan
directory or an installed model: everything the model was trained and validated with is in it;
see :func:`slab.pipeline.inference.ensemble.load_model`), from ``--bundle DIR``
(``DIR/configs/inference.json``, section ``"slab"``, and ``DIR/models/model.pt``, binarised at
the thresholds recorded on validation beside the weights as the bundle's own inference does; see :meth:`slab.pipeline.inference.Predictor.from_bundle`) or from
``--network CONFIG.json --weights MODEL.pt`` (CONFIG.json: ``build_network`` arguments plus
optional ``offsets``, ``planes``, ``roi_size``, ``labels``). Flags given on the command line win
over the bundle's settings. Bundles are read as data: nothing in their JSON is evaluated.

INPUT is one volume (a file, a slice directory or a DICOM directory), several files (the
channels of one volume), a case folder (SenNet's ``kidney_5`` holding ``images/``) or a
directory of volumes (files, slice/DICOM/case folders, nnU-Net's ``{case}_0000.nii.gz`` channel
files); see :mod:`slab.pipeline.data.cases`. For a directory of volumes OUTPUT is a directory and each
result takes its case's name, ``--prob`` is a directory too, and ``--rle-csv`` holds the rows of
every volume. Every input's header and channel count is checked before anything is written.
"""
from __future__ import annotations

from pathlib import Path

from slab.pipeline.cli.arguments import add_progress, add_threads, fold_list, non_negative_int, positive_float, positive_int, probability, show_progress
from slab.core.checks import CONNECTIVITIES, FILL_MODES, MODES, PRECISIONS, TTA_MODES
from slab.core.errors import SlabError

HELP = "Predict masks (and probabilities, an RLE CSV) with a 2.5D or 3D network."


def add_arguments(parser) -> None:
    parser.add_argument("-i", "--input", required=True, nargs="+", metavar="INPUT",
                        help="a volume file, a slice or DICOM directory, several files (channels of one volume), "
                             "a case folder (holding images/) or a directory of volumes")
    parser.add_argument("-o", "--output", required=True, metavar="OUTPUT",
                        help="mask: .nii[.gz], .nrrd, .nhdr, .mha, .mhd, .seg.nrrd, .zarr, .h5, .tif, .dcm (a DICOM "
                             "SEG of a DICOM series INPUT, one segment per label), or a directory (slice stack, "
                             "0/255; one result per volume when INPUT is a directory of volumes)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--bundle", metavar="DIR", help="bundle with configs/inference.json and models/model.pt, "
                        "or the name of a shipped bundle (vessel_2p5d, gi_tract_2p5d, brats_3d, spine_cls_2p5d)")
    source.add_argument("--model", metavar="MODEL",
                        help="a trained model: a training run directory or checkpoint (best.pt), a slab cv plan "
                             "directory (its fold ensemble), or the name of an installed model; it brings its "
                             "network, slabs, normalisation, threshold and post-processing")
    source.add_argument("--network", metavar="CONFIG.json",
                        help="build_network arguments (+ offsets, planes, roi_size, labels)")
    parser.add_argument("--weights", metavar="MODEL.pt",
                        help="weights for --network (a training run's best.pt), or in place of a bundle's "
                             "models/model.pt (e.g. runs/NAME/models/model.pt from its train.json)")
    parser.add_argument("--mode", choices=MODES, help="2.5d or 3d (default: from the network's spatial_dims)")
    parser.add_argument("--axes", metavar="PLANES", help="2.5D planes to average, e.g. xy,zx,zy (default: all three)")
    parser.add_argument("--tta", choices=TTA_MODES,
                        help="test-time augmentation: none, flips (8 views), full (16, 2.5D only)")
    parser.add_argument("--scales", type=positive_float, nargs="+", metavar="S",
                        help="multi-scale inference: also predict the volume resampled by each factor and average "
                             "(e.g. 1 1.5 for scans coarser than the training data; default 1)")
    parser.add_argument("--roi", type=positive_int, nargs=3, metavar=("X", "Y", "Z"), help="3D sliding-window size")
    parser.add_argument("--overlap", type=probability, help="3D sliding-window overlap in [0, 1) (default 0.5)")
    binarise = parser.add_mutually_exclusive_group()
    binarise.add_argument("--threshold", type=probability, metavar="T",
                          help="foreground where probability > T, T in [0, 1] (default 0.5)")
    binarise.add_argument("--hysteresis", type=probability, nargs=2, metavar=("LOW", "HIGH"),
                          help="flood fill from voxels > HIGH through voxels > LOW (both in [0, 1])")
    parser.add_argument("--min-size", type=non_negative_int, metavar="N",
                        help="remove components of fewer than N voxels")
    parser.add_argument("--keep-largest", type=positive_int, metavar="K", help="keep the K largest components")
    parser.add_argument("--fill-holes", nargs="?", const="3d", choices=FILL_MODES, help="fill enclosed holes")
    parser.add_argument("--connectivity", type=int, choices=CONNECTIVITIES, help="component connectivity (default 26)")
    parser.add_argument("--prob", metavar="PROB_OUT", help="also write the probability map here")
    parser.add_argument("--per-channel", action="store_true",
                        help="write a multi-label mask as one 0/1 channel per label (overlapping labels, e.g. BraTS "
                             "regions) instead of one label map (label i = value i+1, or the model's label_map); "
                             "an output named *.seg.nrrd opens in 3D Slicer with the label names (with --per-channel: "
                             "overlapping labels in separate layers)")
    parser.add_argument("--preview", metavar="PNG",
                        help="also draw the prediction in 3D over the image's section (each label its colour, "
                             "no ground truth needed); a directory of PNGs when INPUT is a directory of volumes")
    parser.add_argument("--view", metavar="OUT.html",
                        help="also write the page of slab view (the image and the prediction, one file for any "
                             "browser); one INPUT volume")
    parser.add_argument("--statistics", metavar="JSON",
                        help="write per-label statistics here: voxels, volume (mm^3), components, bounding box, "
                             "centroid (RAS mm), the input's intensities inside (mean, std, percentiles); "
                             "one object per case for a directory of volumes")
    parser.add_argument("--rle-csv", metavar="CSV",
                        help="also write a submission CSV: id,rle (one label, SenNet) or id,class,segmentation "
                             "(several, UW-Madison)")
    parser.add_argument("--id-prefix", metavar="NAME",
                        help="row id prefix of the RLE CSV for one volume (default: the case's name, e.g. kidney_5)")
    parser.add_argument("--folds", metavar="K,K", type=fold_list,
                        help="with --model DIR of a cross-validation: the folds whose models are averaged "
                             "(default: all)")
    parser.add_argument("--device", help="cpu, cuda[:N] or mps (default: cuda when available)")
    parser.add_argument("--precision", choices=PRECISIONS,
                        help="arithmetic of the network: auto (bf16/fp16 on CUDA, fp32 on CPU; the default), fp32, "
                             "bf16 (CUDA, or a CPU with bfloat16 instructions: ~0.6x the fp32 time), fp16 (CUDA)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the network (tens of seconds per input shape; for large volumes; "
                             "falls back to eager where it fails)")
    add_threads(parser)
    parser.add_argument("--batch-size", type=positive_int, metavar="N",
                        help="slabs (2.5D) or windows (3D) per forward pass")
    parser.add_argument("--memory-budget", type=positive_float, metavar="GIB",
                        help="working memory in GiB; larger volumes are read lazily and accumulated on disk")
    add_progress(parser)


def bundle_contents(bundle) -> list[Path]:
    """What of a bundle directory is its own (outputs may go elsewhere in the folder)."""
    if not bundle:
        return []
    from slab.pipeline.paths import bundle_dir

    return [bundle_dir(bundle) / name for name in ("configs", "models", "docs", "scripts", "LICENSE")]


def model_contents(model) -> list[Path]:
    """The files of a model (its checkpoints and model.json), which outputs must not touch."""
    if not model:
        return []
    path = Path(model)
    if path.is_dir():
        return [p for p in (path / "model.json", path / "best.pt", path / "last.pt", path / "states",
                            path / "runs", path / "members") if p.exists()] or [path]
    return [path]


def paths(args) -> tuple[dict, dict]:
    return ({"-i": args.input, "--network": args.network, "--weights": args.weights,
             "--bundle": bundle_contents(args.bundle), "--model": model_contents(args.model)},
            {"-o": args.output, "--prob": args.prob, "--rle-csv": args.rle_csv, "--statistics": args.statistics,
             "--preview": args.preview, "--view": args.view})


def _postprocess(args) -> dict:
    """The post-processing options given on the command line."""
    options = {}
    if args.threshold is not None:
        options.update(threshold=args.threshold, hysteresis=None)
    if args.hysteresis is not None:
        low, high = args.hysteresis
        if low > high:
            raise SlabError(f"--hysteresis: LOW {low:g} is above HIGH {high:g}; expected LOW <= HIGH")
        options.update(hysteresis=(low, high))
    for key in ("min_size", "keep_largest", "fill_holes", "connectivity"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    return options


def _predictor(args):
    from slab.pipeline.inference import Predictor, check_planes, recorded_postprocess
    from slab.core.checks import read_json_object

    if args.overlap is not None and args.overlap >= 1:
        raise SlabError(f"--overlap: expected a fraction in [0, 1), got {args.overlap:g}")
    if args.precision is not None:  # before any model is read: the device must be able to
        from slab.core.device import amp_dtype, resolve_device

        amp_dtype(resolve_device(args.device), args.precision)
    overrides = {
        "mode": args.mode,
        "planes": None if args.axes is None else check_planes(args.axes),
        "tta": args.tta,
        "roi_size": args.roi,
        "overlap": args.overlap,
        "device": args.device,
        "progress": show_progress(args),
        "memory_budget": None if args.memory_budget is None else int(args.memory_budget * (1 << 30)),
        "scales": args.scales,
        "amp": args.precision,
        "compile": args.compile or None,
    }
    if args.folds is not None and not args.model:
        raise SlabError("--folds: only with --model (a cross-validated model directory)")
    if args.model:
        from slab.pipeline.inference.ensemble import load_model

        if args.weights:
            raise SlabError("--weights: --model brings its own weights")
        overrides["postprocess"] = _postprocess(args)
        overrides["batch_size"] = overrides["sw_batch_size"] = args.batch_size  # whichever the model's mode uses
        return load_model(args.model, folds=args.folds, **overrides)
    if args.bundle:
        section = Predictor.bundle_section(args.bundle)
        overrides["postprocess"] = _postprocess(args)  # over the bundle's, recorded thresholds included
        overrides[_batch_key(section["network"])] = args.batch_size
        return Predictor.from_bundle(args.bundle, weights=args.weights, **overrides)
    if not args.weights:
        raise SlabError("--weights: --network needs the weights file (MODEL.pt)")
    config = read_json_object(args.network, "network config")
    if "task" in config and "network" in config:
        raise SlabError(f"--network: {args.network} is a training configuration; predict with the run itself: "
                        f"--model {Path(args.network).parent}")
    given = _postprocess(args)
    # The threshold chosen on validation, where the weights record one (a training checkpoint).
    overrides["postprocess"] = given if "threshold" in given else recorded_postprocess(
        given, args.weights, config.get("out_channels") if isinstance(config.get("out_channels"), int) else None)
    overrides[_batch_key(config)] = args.batch_size
    try:
        return Predictor(config, args.weights, **{k: v for k, v in overrides.items() if v is not None})
    except SlabError as err:  # name the file that holds the network, unless the message names a file already
        message = str(err)
        if message.startswith(("network", "labels", "label_map", "roi_size")):
            raise SlabError(f"--network {args.network}: {message}") from None
        raise


def _batch_key(network_config: dict) -> str:
    return "sw_batch_size" if network_config.get("spatial_dims") == 3 else "batch_size"


def run(args) -> int:
    from slab.core.distributed import cleanup_distributed

    try:
        return _run(args)
    finally:
        cleanup_distributed()


def _run(args) -> int:
    from slab.pipeline.data.cases import find_cases
    from slab.pipeline.inference.batch import check_inputs, plan_jobs, predict_cases

    if args.statistics and Path(args.statistics).suffix.lower() != ".json":
        raise SlabError(f"--statistics: expected a .json file name, got {args.statistics}")
    collection, cases = find_cases(args.input)
    if args.view and (collection or not args.view.lower().endswith((".html", ".htm"))):
        raise SlabError(f"--view {args.view}: expected a .html name and one INPUT volume (slab view pages a directory)")
    # every output name (a DICOM SEG: its series) checked once, before the model is read
    jobs = plan_jobs(cases, args.output, collection=collection, prob=args.prob, preview=args.preview,
                     per_channel=args.per_channel, id_prefix=args.id_prefix)
    if args.view and jobs[0].target.layout == "dicom-seg":
        raise SlabError(f"--view: a DICOM SEG output ({args.output}) is not read back; write a volume, then slab view")
    predictor = _predictor(args)
    check_inputs(jobs, predictor)  # every input's header and channels, before anything is written
    predict_cases(jobs, predictor, collection=collection, rle_csv=args.rle_csv, statistics=args.statistics,
                  id_prefix=args.id_prefix, per_channel=args.per_channel, device=args.device or "cpu")
    if args.view and jobs[0].target.mask.exists():
        from slab.pipeline.evaluation.viewer import write_page

        write_page(jobs[0].case.source, jobs[0].target.mask, None, args.view, names=predictor.label_names())
        print(f"wrote {args.view}")
    return 0
