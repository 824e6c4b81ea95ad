"""nnU-Net v2's raw dataset layout, read as it comes: ``dataset.json`` (``channel_names``,
``labels``, ``file_ending``), ``imagesTr/{case}_{XXXX}`` channel files and ``labelsTr/{case}``
label maps (``slab dataset nnunet``, ``slab plan DIR``)."""
from __future__ import annotations

import re
from pathlib import Path

from slab.pipeline.data.staging import Staging, _require_dir, _require_file
from slab.transforms.errors import SlabError
from slab.transforms.io import natural_key


def nnunet_items(root: Path, out: Staging) -> list[dict]:
    """An nnU-Net v2 raw dataset: ``dataset.json`` (``channel_names``, ``labels``,
    ``file_ending``), ``imagesTr/{case}_{XXXX}{file_ending}`` (one file per channel) and
    ``labelsTr/{case}{file_ending}`` (one label map). The image is the case's channel files in
    channel order; the labels' names and the channels' modalities come from ``dataset.json``
    (region-based labels are refused)."""
    from slab.pipeline.data.datalist import read_datalist
    from slab.transforms.checks import read_json_object

    meta = read_json_object(_require_file(root / "dataset.json", "nnU-Net's dataset.json"), "dataset.json")
    channels = meta.get("channel_names", meta.get("modality"))
    ending = meta.get("file_ending", ".nii.gz")
    if not isinstance(channels, dict) or not channels or not isinstance(ending, str) or not ending.startswith("."):
        raise SlabError(f"{root / 'dataset.json'}: expected 'channel_names' (an object) and 'file_ending' (e.g. "
                        f"'.nii.gz'), got {channels!r} and {ending!r}")
    labels = read_datalist({"training": [], "labels": meta.get("labels")}, str(root / "dataset.json"))["labels"] \
        if isinstance(meta.get("labels"), dict) else None
    if not labels:
        raise SlabError(f"{root / 'dataset.json'}: expected 'labels', e.g. {{\"background\": 0, \"liver\": 1}}")
    images, label_dir = _require_dir(root / "imagesTr", "imagesTr/"), _require_dir(root / "labelsTr", "labelsTr/")
    pattern = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})" + re.escape(ending) + "$")
    cases: dict[str, dict[int, Path]] = {}
    for path in images.iterdir():
        match = pattern.match(path.name)
        if match:
            cases.setdefault(match["case"], {})[int(match["channel"])] = path
    if not cases:
        raise SlabError(f"{images}: no {{case}}_0000{ending} files")
    items = []
    for case in sorted(cases, key=natural_key):
        found = cases[case]
        if sorted(found) != list(range(len(channels))):
            raise SlabError(f"{images}: case {case} has channel files {sorted(found)}; dataset.json names "
                            f"{len(channels)} channel(s) (0000 to {len(channels) - 1:04d})")
        label = _require_file(label_dir / f"{case}{ending}", f"the label of case {case}")
        paths = [str(found[c]) for c in range(len(channels))]
        items.append({"id": case, "case": case, "image": paths if len(paths) > 1 else paths[0], "label": str(label)})
    out.meta = {"labels": labels, "modality": {str(k): v for k, v in channels.items()}}
    return items


def dataset_folder(folder) -> dict | Path:
    """What ``slab plan DIR`` plans from a dataset folder as it comes: an nnU-Net v2 raw dataset
    (``dataset.json`` with ``channel_names``, ``imagesTr/``, ``labelsTr/``) as a datalist of its
    cases (:func:`nnunet_items`), or a Decathlon task's ``dataset.json`` (its ``training`` list)."""
    folder = Path(folder).resolve()
    meta_path = folder / "dataset.json"
    if not meta_path.is_file():
        raise SlabError(f"{folder}: a folder holding no dataset.json; give a datalist file, a Decathlon task or an "
                        "nnU-Net raw dataset folder")
    from slab.transforms.checks import read_json_object

    meta = read_json_object(meta_path, "dataset.json")
    if "training" in meta:
        return meta_path
    staging = Staging(folder / ".unused", folder / ".unused")  # nnU-Net's raw files are read as they are
    items = nnunet_items(folder, staging)
    return {"training": items, "label_format": "values", **staging.meta, "name": str(meta.get("name", folder.name))}


__all__ = ["nnunet_items", "dataset_folder"]
