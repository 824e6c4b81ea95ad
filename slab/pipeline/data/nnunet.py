"""nnU-Net v2's raw dataset layout: ``dataset.json`` (``channel_names``, ``labels``,
``file_ending``), ``imagesTr/{case}_{XXXX}`` channel files and ``labelsTr/{case}`` label maps.

Read as it comes (``slab dataset nnunet``, ``slab plan DIR``), region-based labels included
(each region becomes a binary label channel), and written from any slab datalist
(``slab export --nnunet``) so that both tools run on the same cases and folds.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np

from slab.pipeline.data.staging import Staging, require_dir, require_file
from slab.core.errors import SlabError
from slab.io.volumes import natural_key

# nnU-Net finds a raw dataset by its folder name: Dataset, three digits, _, a name.
DATASET_NAME = re.compile(r"^Dataset\d{3}_[A-Za-z0-9][A-Za-z0-9_.-]*$")


def label_regions(labels, source) -> list[tuple[str, list[int]]] | None:
    """nnU-Net v2's region-based ``labels`` (``{"background": 0, "whole tumour": [1, 2, 3],
    "enhancing": 3}``) as ``[(name, values), ...]`` in their order; None for plain labels (no
    value is a list)."""
    if not isinstance(labels, dict) or not any(isinstance(v, list) for v in labels.values()):
        return None
    regions = []
    for name, values in labels.items():
        values = values if isinstance(values, list) else [values]
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            raise SlabError(f"{source}: 'labels' {name!r}: {values!r}; expected a label value or a list of them")
        if values != [0]:
            if 0 in values:
                raise SlabError(f"{source}: 'labels' {name!r} includes the background value 0")
            regions.append((str(name), [int(v) for v in values]))
    if not regions:
        raise SlabError(f"{source}: 'labels' names no region besides the background")
    return regions


def nnunet_items(root: Path, out: Staging) -> list[dict]:
    """An nnU-Net v2 raw dataset: ``dataset.json`` (``channel_names``, ``labels``,
    ``file_ending``), ``imagesTr/{case}_{XXXX}{file_ending}`` (one file per channel) and
    ``labelsTr/{case}{file_ending}`` (one label map). The image is the case's channel files in
    channel order; the labels' names and the channels' modalities come from ``dataset.json``.

    Region-based labels (:func:`label_regions`) are converted: each case's label becomes one
    binary channel per region (``isin`` of its values, as nnU-Net trains regions), written through
    ``out``; the datalist's ``label_format`` is then ``channels`` and it keeps the ``regions`` and
    ``regions_class_order``."""
    from slab.pipeline.data.datalist import read_datalist
    from slab.core.checks import read_json_object
    from slab.io.volumes import load_volume

    meta = read_json_object(require_file(root / "dataset.json", "nnU-Net's dataset.json"), "dataset.json")
    channels = meta.get("channel_names", meta.get("modality"))
    ending = meta.get("file_ending", ".nii.gz")
    if not isinstance(channels, dict) or not channels or not isinstance(ending, str) or not ending.startswith("."):
        raise SlabError(f"{root / 'dataset.json'}: expected 'channel_names' (an object) and 'file_ending' (e.g. "
                        f"'.nii.gz'), got {channels!r} and {ending!r}")
    regions = label_regions(meta.get("labels"), root / "dataset.json")
    if regions:
        labels = [name for name, _ in regions]
    else:
        labels = read_datalist({"training": [], "labels": meta.get("labels")}, str(root / "dataset.json"))["labels"] \
            if isinstance(meta.get("labels"), dict) else None
    if not labels:
        raise SlabError(f"{root / 'dataset.json'}: expected 'labels', e.g. {{\"background\": 0, \"liver\": 1}}")
    images, label_dir = require_dir(root / "imagesTr", "imagesTr/"), require_dir(root / "labelsTr", "labelsTr/")
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
        label = require_file(label_dir / f"{case}{ending}", f"the label of case {case}")
        if regions:
            value_map = load_volume(label)
            values = np.asarray(value_map)[0]
            masks = np.stack([np.isin(values, region) for _, region in regions]).astype(np.uint8)
            label = out.save(masks, f"{case}/label.nii.gz", affine=np.asarray(value_map.affine))
        paths = [str(found[c]) for c in range(len(channels))]
        items.append({"id": case, "case": case, "image": paths if len(paths) > 1 else paths[0], "label": str(label)})
    out.meta = {"labels": labels, "modality": {str(k): v for k, v in channels.items()}}
    if regions:
        out.meta.update({"label_format": "channels", "regions": {name: values for name, values in regions},
                         "regions_class_order": meta.get("regions_class_order")})
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
    from slab.core.checks import read_json_object

    meta = read_json_object(meta_path, "dataset.json")
    if "training" in meta:
        return meta_path
    if label_regions(meta.get("labels"), meta_path):
        raise SlabError(f"{meta_path}: region-based labels; convert them to label channels first: slab dataset "
                        f"nnunet {folder} OUT, then slab plan OUT/datalist.json")
    staging = Staging(folder / ".unused", folder / ".unused")  # nnU-Net's raw files are read as they are
    items = nnunet_items(folder, staging)
    return {"training": items, "label_format": "values", **staging.meta, "name": str(meta.get("name", folder.name))}


# ---------------------------------------------------------------------------------------------
# Writing the raw layout


def _value_map(label: np.ndarray, fmt: str, names: list[str], source) -> np.ndarray:
    """One label map (values 1..N are ``names``) of a label volume in slab's ``fmt``."""
    if fmt == "values":
        values = np.asarray(label[0])
        if values.size and (values.min() < 0 or values.max() > len(names) or not np.array_equal(values, np.round(values))):
            raise SlabError(f"{source}: label values {values.min()}..{values.max()}; expected 0..{len(names)}")
        return values.astype(np.uint8 if len(names) < 256 else np.uint16)
    masks = np.asarray(label) > 0
    overlap = masks.sum(axis=0) > 1
    if overlap.any():
        pairs = [f"{names[a]}+{names[b]}" for a in range(len(names)) for b in range(a + 1, len(names))
                 if (masks[a] & masks[b]).any()]
        raise SlabError(f"{source}: label channels overlap ({', '.join(pairs[:3])}); nnU-Net's raw layout holds one "
                        "label map per case (regions are not written)")
    out = np.zeros(masks.shape[1:], np.uint8 if len(names) < 256 else np.uint16)
    for i, mask in enumerate(masks):
        out[mask] = i + 1
    return out


def export_nnunet(datalist, out_dir) -> Path:
    """Write a slab datalist's cases (``training`` and ``validation``, every format slab reads) as
    an nnU-Net v2 raw dataset in ``out_dir`` (named ``DatasetXXX_Name``, not existing yet):
    ``imagesTr/{id}_{XXXX}.nii.gz`` per channel and ``labelsTr/{id}.nii.gz`` (a label map, the
    image's geometry), ``dataset.json`` (``channel_names`` from the datalist's ``modality``,
    ``labels`` name -> value, ``numTraining``, ``file_ending``), and, where the items carry folds,
    ``splits_final.json`` (slab's folds, for nnU-Net's preprocessed folder). Written in a
    staging folder renamed into place when every case has converted."""
    from slab.pipeline.data.datalist import case_ids, load_datalist, read_datalist
    from slab.io.volumes import check_same_geometry, load_volume, save_volume

    out = Path(out_dir)
    if not DATASET_NAME.match(out.name):
        raise SlabError(f"{out}: nnU-Net finds a raw dataset by its folder name, DatasetXXX_Name (three digits), "
                        "e.g. Dataset501_Vessels")
    if out.exists():
        raise SlabError(f"{out}: exists; the export writes a new folder")
    data = read_datalist(datalist)
    training, validation = load_datalist(datalist, fold=None)
    items = list(training) + list(validation)
    if not items:
        raise SlabError(f"{datalist}: no items to export")
    ids = case_ids(items)
    fmt, names = data.get("label_format", "channels"), list(data.get("labels") or [])
    import tempfile

    if not out.parent.is_dir():
        raise SlabError(f"{out.parent}: no such folder")
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (staging / "imagesTr").mkdir()
        (staging / "labelsTr").mkdir()
        n_channels = None
        for item, case in zip(items, ids):
            if "label" not in item:
                raise SlabError(f"{item['image']}: an item without a label; nnU-Net's imagesTr needs labelsTr")
            image, label = load_volume(item["image"]), load_volume(item["label"])
            check_same_geometry(image, label, names=[str(item["image"]), str(item["label"])])
            if n_channels not in (None, image.shape[0]):
                raise SlabError(f"{item['image']}: {image.shape[0]} channel(s), other cases {n_channels}")
            n_channels = image.shape[0]
            if not names:
                names = [f"label_{i + 1}" for i in range(label.shape[0])] if fmt == "channels" else []
                if not names:
                    raise SlabError(f"{datalist}: label_format values without 'labels' naming them")
            affine = np.asarray(image.affine)
            for c in range(n_channels):
                save_volume(np.asarray(image[c:c + 1]), staging / "imagesTr" / f"{case}_{c:04d}.nii.gz", affine=affine)
            save_volume(_value_map(np.asarray(label), fmt, names, item["label"])[None],
                        staging / "labelsTr" / f"{case}.nii.gz", affine=affine, labels=True)
        modality = data.get("modality")
        channel_names = {str(c): (modality.get(str(c)) if isinstance(modality, dict) else modality)
                         or ("image" if n_channels == 1 else f"image_{c}") for c in range(n_channels)}
        dataset = {"channel_names": channel_names, "labels": {"background": 0, **{n: i + 1 for i, n in enumerate(names)}},
                   "numTraining": len(items), "file_ending": ".nii.gz",
                   "name": str(data.get("name", out.name.split("_", 1)[1])),
                   "description": f"exported by slab from {datalist}"}
        (staging / "dataset.json").write_text(json.dumps(dataset, indent=4) + "\n", encoding="utf-8")
        fold_of = {c: int(i["fold"]) for i, c in zip(items, ids) if i.get("fold") is not None}
        folds = sorted(set(fold_of.values()))
        if len(folds) > 1 and len(fold_of) == len(ids):
            splits = [{"train": sorted((c for c in ids if fold_of[c] != k), key=natural_key),
                       "val": sorted((c for c in ids if fold_of[c] == k), key=natural_key)} for k in folds]
            (staging / "splits_final.json").write_text(json.dumps(splits, indent=4) + "\n", encoding="utf-8")
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


__all__ = ["DATASET_NAME", "label_regions", "nnunet_items", "dataset_folder", "export_nnunet"]
