"""``slab export MODEL model.zip``: a trained model (a training run, a checkpoint, or a cross-validated
plan directory) as one archive for another machine; see :mod:`slab.pipeline.model.archive`.

``slab export --nnunet DATALIST DatasetXXX_Name``: a dataset in nnU-Net v2's raw layout, so that
both tools run on the same cases and folds; see :func:`slab.pipeline.data.nnunet.export_nnunet`."""
from __future__ import annotations

from pathlib import Path

HELP = ("pack a trained model (run, checkpoint or cross-validated plan) into a zip for slab install, "
        "or write a dataset in nnU-Net's raw layout (--nnunet)")


def add_arguments(parser) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help="a run directory, a checkpoint, or a plan directory after slab cv (with --nnunet: a "
                        "datalist, a Decathlon task or an nnU-Net raw dataset folder)")
    parser.add_argument("archive", metavar="ARCHIVE.zip",
                        help="the archive to write (with --nnunet: the dataset folder, DatasetXXX_Name)")
    parser.add_argument("--nnunet", action="store_true",
                        help="export MODEL's cases as an nnU-Net v2 raw dataset: imagesTr/{id}_XXXX.nii.gz, "
                        "labelsTr/{id}.nii.gz, dataset.json, splits_final.json (slab's folds)")


def paths(args) -> tuple[dict, dict]:
    from slab.pipeline.cli.predict import model_contents

    if args.nnunet:
        from slab.pipeline.data.datalist import datalist_paths

        source = Path(args.model)
        listed = datalist_paths(source) if source.is_file() else []
        return {"DATALIST": [source, *map(Path, listed)]}, {"OUT": args.archive}
    return {"MODEL": model_contents(args.model)}, {"ARCHIVE": args.archive}


def run(args) -> int:
    from slab.core.errors import SlabError

    if args.nnunet:
        from slab.pipeline.data.nnunet import dataset_folder, export_nnunet

        source = dataset_folder(args.model) if Path(args.model).is_dir() else args.model
        out = export_nnunet(source, args.archive)
        cases = len(list((out / "labelsTr").iterdir()))
        print(f"wrote {out}: {cases} case(s); nnUNetv2_plan_and_preprocess finds it under $nnUNet_raw"
              + ("; splits_final.json holds slab's folds (copy it into nnU-Net's preprocessed folder)"
                 if (out / "splits_final.json").exists() else ""))
        return 0
    from slab.pipeline.model.archive import export_model

    if not str(args.archive).endswith(".zip"):
        raise SlabError(f"ARCHIVE: expected a .zip name, got {args.archive}")
    data = export_model(args.model, args.archive)
    size = Path(args.archive).stat().st_size / 2**20
    print(f"wrote {args.archive}: {len(data['members'])} member(s), {size:.1f} MiB")
    return 0
