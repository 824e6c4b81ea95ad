"""``slab predict -i INPUT -o OUTPUT``: a trained network over volumes, to masks in their geometry.

The network comes from ``--bundle DIR`` (``DIR/configs/inference.json``, section ``"slab"``, and
``DIR/models/model.pt``, binarised at the thresholds recorded on validation beside the weights
as the bundle's own inference does; see :meth:`pipeline.infer.Predictor.from_bundle`) or from
``--network CONFIG.json --weights MODEL.pt`` (CONFIG.json: ``build_network`` arguments plus
optional ``offsets``, ``planes``, ``roi_size``). Flags given on the command line win over the
bundle's settings.

INPUT is one volume (a file, a slice directory or a DICOM directory) or a directory of volumes
(files and sub-directories, no slices of its own); then OUTPUT is a directory and each result
takes its input's name (a NIfTI/NRRD/MHA file keeps its suffix, a directory becomes a slice
stack of the same name), ``--prob`` is a directory too, and ``--rle-csv`` holds the rows of
every volume, with each volume's name as its id prefix.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from pipeline.infer import MODES, TTA_MODES, Predictor, check_planes, predict_file
from transforms.checks import read_json_object
from transforms.errors import SlabError
from transforms.io import ITK_SUFFIXES, NIFTI_SUFFIXES, SLICE_SUFFIXES, atomic_write, output_format
from transforms.post import CONNECTIVITIES, FILL_MODES

HELP = "Predict masks (and probabilities, an RLE CSV) with a 2.5D or 3D network."
_VOLUME_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES


def add_arguments(parser) -> None:
    parser.add_argument("-i", "--input", required=True, metavar="INPUT",
                        help="a volume file, a slice or DICOM directory, or a directory of volumes")
    parser.add_argument("-o", "--output", required=True, metavar="OUTPUT",
                        help="mask: .nii[.gz], .nrrd, .nhdr, .mha, .mhd, or a directory (slice stack; "
                             "one result per volume when INPUT is a directory of volumes)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--bundle", metavar="DIR", help="bundle with configs/inference.json and models/model.pt")
    source.add_argument("--network", metavar="CONFIG.json",
                        help="build_network arguments (+ offsets, planes, roi_size)")
    parser.add_argument("--weights", metavar="MODEL.pt", help="weights for --network")
    parser.add_argument("--mode", help=f"{' or '.join(MODES)} (default: from the network's spatial_dims)")
    parser.add_argument("--axes", metavar="PLANES", help="2.5D planes to average, e.g. xy,zx,zy (default: all three)")
    parser.add_argument("--tta", help=f"test-time augmentation: {', '.join(TTA_MODES)} "
                                      "(flips: 8 views; full: 16, 2.5D only)")
    parser.add_argument("--roi", type=int, nargs=3, metavar=("X", "Y", "Z"), help="3D sliding-window size")
    parser.add_argument("--overlap", type=float, help="3D sliding-window overlap (default 0.5)")
    binarise = parser.add_mutually_exclusive_group()
    binarise.add_argument("--threshold", type=float, metavar="T", help="foreground where probability > T (default 0.5)")
    binarise.add_argument("--hysteresis", type=float, nargs=2, metavar=("LOW", "HIGH"),
                          help="flood fill from voxels > HIGH through voxels > LOW")
    parser.add_argument("--min-size", type=int, metavar="N", help="remove components of fewer than N voxels")
    parser.add_argument("--keep-largest", type=int, metavar="K", help="keep the K largest components")
    parser.add_argument("--fill-holes", nargs="?", const="3d", choices=FILL_MODES, help="fill enclosed holes")
    parser.add_argument("--connectivity", type=int, choices=CONNECTIVITIES, help="component connectivity (default 26)")
    parser.add_argument("--prob", metavar="PROB_OUT", help="also write the probability map here")
    parser.add_argument("--rle-csv", metavar="CSV", help="also write a SenNet submission CSV (id,rle)")
    parser.add_argument("--id-prefix", metavar="NAME",
                        help="row id prefix of the RLE CSV for one volume (e.g. kidney_5)")
    parser.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available)")
    parser.add_argument("--batch-size", type=int, metavar="N", help="slabs (2.5D) or windows (3D) per forward pass")
    parser.add_argument("--memory-budget", type=float, metavar="GIB",
                        help="working memory in GiB; larger volumes are read lazily and accumulated on disk")
    parser.add_argument("--progress", action="store_true", help="show a progress bar")


def _postprocess(args) -> dict:
    """The post-processing options given on the command line."""
    options = {}
    if args.threshold is not None:
        options.update(threshold=args.threshold, hysteresis=None)
    if args.hysteresis is not None:
        options.update(hysteresis=tuple(args.hysteresis))
    for key in ("min_size", "keep_largest", "fill_holes", "connectivity"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    return options


def _batch_key(network_config: dict) -> str:
    return "sw_batch_size" if network_config.get("spatial_dims") == 3 else "batch_size"


def _predictor(args) -> Predictor:
    overrides = {
        "mode": args.mode,
        "planes": None if args.axes is None else check_planes(args.axes),
        "tta": args.tta,
        "roi_size": args.roi,
        "overlap": args.overlap,
        "device": args.device,
        "progress": args.progress or None,
        "memory_budget": None if args.memory_budget is None else int(args.memory_budget * (1 << 30)),
    }
    if args.bundle:
        if args.weights:
            raise SlabError("--weights: a bundle brings its own weights (models/model.pt); give one or the other")
        section = Predictor.bundle_section(args.bundle)
        overrides["postprocess"] = _postprocess(args)  # over the bundle's, recorded thresholds included
        overrides[_batch_key(section["network"])] = args.batch_size
        return Predictor.from_bundle(args.bundle, **overrides)
    if not args.weights:
        raise SlabError("--weights: --network needs the weights file (MODEL.pt)")
    config = read_json_object(args.network, "network config")
    overrides["postprocess"] = _postprocess(args)
    overrides[_batch_key(config)] = args.batch_size
    return Predictor(config, args.weights, **{k: v for k, v in overrides.items() if v is not None})


def _is_volume_collection(path: Path) -> bool:
    """A directory of volumes: no slices of its own, and volume files or sub-directories."""
    if not path.is_dir():
        return False
    entries = [p for p in path.iterdir() if not p.name.startswith(".")]
    if any(p.is_file() and p.suffix.lower() in SLICE_SUFFIXES for p in entries):
        return False
    return any(p.is_dir() or p.name.lower().endswith(_VOLUME_SUFFIXES) for p in entries)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in _VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _output_name(entry: Path) -> str:
    """A file keeps its name; a slice directory its name (a stack); a DICOM directory gets .nii.gz."""
    if entry.is_file() or any(p.suffix.lower() in SLICE_SUFFIXES for p in entry.iterdir()):
        return entry.name
    return entry.name + ".nii.gz"


def _jobs(args) -> tuple[bool, list[tuple[Path, Path, Path | None, str | None]]]:
    """Whether INPUT is a directory of volumes, and ``(input, output, prob, id_prefix)`` for each."""
    source = Path(args.input)
    if not source.exists():
        raise SlabError(f"{source}: no such file or directory")
    if not _is_volume_collection(source):
        return False, [(source, Path(args.output), Path(args.prob) if args.prob else None, args.id_prefix)]
    if args.id_prefix:
        raise SlabError("--id-prefix: INPUT is a directory of volumes; each volume's name is its id prefix")
    for flag, value in (("--output", args.output), ("--prob", args.prob)):
        if value and output_format(value) != "stack":
            raise SlabError(f"{flag}: INPUT is a directory of volumes, so {value} must be a directory name")
    entries = sorted((p for p in source.iterdir() if not p.name.startswith(".")
                      and (p.is_dir() or p.name.lower().endswith(_VOLUME_SUFFIXES))), key=lambda p: p.name)
    jobs = []
    for entry in entries:
        name = _output_name(entry)
        prob = Path(args.prob) / name if args.prob else None
        jobs.append((entry, Path(args.output) / name, prob, _stem(entry)))
    return True, jobs


def run(args) -> int:
    collection, jobs = _jobs(args)
    predictor = _predictor(args)
    for _, output, prob, _ in jobs:  # every output name is checked before anything is read
        output_format(output)
        if prob is not None:
            output_format(prob)
    with tempfile.TemporaryDirectory(prefix="slab-predict-") as tmp:
        csvs = []
        for index, (source, output, prob, prefix) in enumerate(jobs):
            csv = None
            if args.rle_csv:
                csv = Path(tmp) / f"{index}.csv" if collection else Path(args.rle_csv)
                csvs.append(csv)
            written = predict_file(source, output, predictor, prob_path=prob, rle_csv=csv, id_prefix=prefix)
            print(f"wrote {', '.join(str(p) for key, p in written.items() if key != 'rle_csv' or not collection)}")
        if args.rle_csv and collection:
            # One submission CSV: the header once, then every volume's rows in order.
            with atomic_write(args.rle_csv) as staged, open(staged, "w", newline="", encoding="utf-8") as out:
                for k, csv in enumerate(csvs):
                    lines = csv.read_text(encoding="utf-8").splitlines(keepends=True)
                    out.writelines(lines if k == 0 else lines[1:])
            print(f"wrote {args.rle_csv}")
    return 0
