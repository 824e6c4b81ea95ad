"""Dataset adapters: a competition's files as they come → a MONAI/Decathlon-style ``datalist.json``.

``build_datalist(kind, root, out_dir)`` scans ``root``, converts what a loader cannot read as it
is (RLE CSVs, BraTS labels, UW-Madison PNG stacks, RSNA segmentations in another grid) into
``out_dir/volumes/<id>/``, and writes ``out_dir/datalist.json``::

    {"kind": "uwmgi", "root": "...", "labels": ["large_bowel", "small_bowel", "stomach"],
     "label_format": "channels", "n_folds": 5, "seed": 0,
     "training":   [{"id": "case1_day2", "case": "case1", "fold": 3,
                     "image": ".../image.nii.gz", "label": ".../label.nii.gz"}, ...],
     "validation": [...]}

Every item has a ``fold``; folds group items by ``case`` (a patient, a kidney), so no case
is in two folds. ``validation`` holds fold 0 and ``training`` the rest;
:func:`slab.pipeline.data.datalist.split_datalist` regroups for another fold. ``label_format`` is ``"channels"`` (label channel ``i`` is
``labels[i]``) or ``"values"`` (a one-channel label whose value ``i + 1`` is ``labels[i]``).
Paths are absolute. Nothing is written unless the whole dataset converts: the outputs are
staged and moved into ``out_dir`` at the end, the datalist last.
"""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
from scipy import ndimage

from slab.pipeline.data.nnunet import nnunet_items
from slab.pipeline.data.staging import Staging, natural_order, require_dir, require_file, subdirs
from slab.core.checks import DATASET_KINDS
from slab.core.errors import SlabError, SlabWarning
from slab.core.outputs import atomic_write
from slab.io.volumes import check_same_geometry, load_volume, natural_key
from slab.io.stacks import SliceFolder
from slab.io.rle import UWMGI_CLASSES, read_csv_rows, read_sennet_rles, read_uwmgi_rles, sennet_label, uwmgi_label

KINDS = DATASET_KINDS
UWMGI_SLICE_THICKNESS = 3.0  # mm; the competition's scans do not carry it
BRATS_MODALITIES = ("flair", "t1", "t1ce", "t2")
BRATS_LABELS = ("TC", "WT", "ET")
RSNA_VERTEBRAE = tuple(f"C{i}" for i in range(1, 8))
RSNA_TARGETS = RSNA_VERTEBRAE + ("patient_overall",)

_UWMGI_SCAN = re.compile(r"^slice_(\d+)_(\d+)_(\d+)_(\d+(?:\.\d*)?)_(\d+(?:\.\d*)?)\.png$")
_SENNET_KIDNEY = re.compile(r"^(kidney_\d+)(?:_|$)")

# ---------------------------------------------------------------------------------------------
# SenNet + HOA (HiP-CT kidney vessels)


def _sennet_images(volume: Path, volumes: list[Path]) -> list[Path] | None:
    """The image slices of a label-only volume (``kidney_3_dense``: its labels are a run of
    ``kidney_3_sparse``'s slices, with the same file names), or None."""
    labels = volume / "labels"
    names = [p.name for p in natural_order(labels.iterdir()) if p.is_file()] if labels.is_dir() else []
    if (volume / "images").is_dir() or not names:
        return None
    siblings = [v for v in volumes if v != volume and _sennet_case(v.name) == _sennet_case(volume.name)
                and (v / "images").is_dir()]
    for sibling in sorted(siblings, key=lambda v: "sparse" not in v.name):  # competitors paired with _sparse
        if all((sibling / "images" / name).is_file() for name in names):
            return [sibling / "images" / name for name in names]
    return None


def sennet_items(root: Path, out: Staging) -> list[dict]:
    """``train/<name>/images/*.tif`` with ``labels/*.tif``, or labels from ``train_rles.csv``.

    The image is the slice directory itself. A volume without a label stack gets its label
    decoded from the CSV (ids ``<name>_<slice:04d>``) and written as NIfTI (0/1); a label stack
    is used as it is (0/255). A volume with labels but no images (``kidney_3_dense``) takes the
    slices of the same names from its kidney's other volume (``kidney_3_sparse/images``), as the
    competitors paired them: a folder of links to them is written. Volumes of one kidney
    (``kidney_1_dense``, ``kidney_1_voi``) share a case.
    """
    train = require_dir(root / "train", "train/<volume>/images/*.tif")
    volumes = subdirs(train)
    if not volumes:
        raise SlabError(f"{train}: no volume directories; expected train/<volume>/images/*.tif")
    csv_path, rles = root / "train_rles.csv", None
    items = []
    for volume in volumes:
        images, labels = volume / "images", volume / "labels"
        paired = _sennet_images(volume, volumes)
        if paired is None:
            image = load_volume(require_dir(images, f"the image slices of {volume.name} (images/*.tif)"), lazy=True)
        else:
            image = SliceFolder(paired[0].parent, paired)
            images = Path(out.link(paired, f"{volume.name}/images"))
        if isinstance(image, SliceFolder):  # a half-downloaded slice is found now, not when training reads it
            image.check_files()
        item = {"id": volume.name, "case": _sennet_case(volume.name), "image": str(images)}
        if labels.is_dir():
            label_stack = load_volume(labels, lazy=True)
            check_same_geometry(image, label_stack, names=[str(images), str(labels)])
            if isinstance(label_stack, SliceFolder):
                label_stack.check_files()
            item["label"] = str(labels)
        else:
            if rles is None:
                rles = read_sennet_rles(require_file(csv_path, f"train_rles.csv for the labels of {volume.name} "
                                                                f"({labels} is absent)"))
            if volume.name not in rles:
                raise SlabError(f"{csv_path}: no rows for {volume.name}, whose {labels} is absent")
            label = sennet_label(rles[volume.name], image.shape[1:])
            item["label"] = out.save(label[np.newaxis], f"{volume.name}/label.nii.gz", image.affine)
        items.append(item)
    return items


def _sennet_case(name: str) -> str:
    match = _SENNET_KIDNEY.match(name)
    return match[1] if match else name


# ---------------------------------------------------------------------------------------------
# UW-Madison GI Tract (MRI, 16-bit PNG slices, RLE labels)


def uwmgi_items(root: Path, out: Staging) -> list[dict]:
    """``train/caseN/caseN_dayM/scans/slice_XXXX_W_H_SX_SY.png`` and ``train.csv``.

    Each case-day becomes ``image.nii.gz`` with spacing ``(SX, SY, 3)`` mm and a 3-channel
    ``label.nii.gz`` (large_bowel, small_bowel, stomach) in the same geometry.
    """
    train = require_dir(root / "train", "train/caseN/caseN_dayM/scans/*.png")
    csv_path = require_file(root / "train.csv", "train.csv with columns id, class, segmentation")
    rles = read_uwmgi_rles(csv_path)
    days = [day for case in subdirs(train) for day in subdirs(case)]
    if not days:
        raise SlabError(f"{train}: no case-day directories; expected train/caseN/caseN_dayM/scans/*.png")
    items = []
    for day in days:
        scans = require_dir(day / "scans", f"the slices of {day.name} (scans/slice_XXXX_W_H_SX_SY.png)")
        numbers, size, spacing = _uwmgi_scans(scans)
        image = load_volume(scans, spacing=spacing + (UWMGI_SLICE_THICKNESS,))
        if tuple(image.shape[1:3]) != size:
            raise SlabError(f"{scans}: slices are {image.shape[1]}x{image.shape[2]}, "
                            f"the file names say {size[0]}x{size[1]}")
        if day.name not in rles:
            raise SlabError(f"{csv_path}: no rows for {day.name} ({scans})")
        label = uwmgi_label(rles.pop(day.name), image.shape[1:], numbers)
        items.append({
            "id": day.name, "case": day.parent.name,
            "image": out.save(image, f"{day.name}/image.nii.gz"),
            "label": out.save(label, f"{day.name}/label.nii.gz", image.affine),
        })
    if rles:
        day = sorted(rles, key=natural_key)[0]
        case = day.split("_")[0]
        raise SlabError(f"{train / case / day / 'scans'}: missing; {csv_path} has labels for {day}")
    return items


def _uwmgi_scans(scans: Path) -> tuple[list[int], tuple[int, int], tuple[float, float]]:
    """Slice numbers (in load order), slice size ``(W, H)`` and pixel spacing from the file names."""
    numbers, geometry = [], {}
    for path in natural_order(scans.iterdir()):
        match = _UWMGI_SCAN.match(path.name)
        if match is None:
            raise SlabError(f"{path}: expected a scan named slice_XXXX_W_H_SX_SY.png")
        numbers.append(int(match[1]))
        geometry.setdefault((int(match[2]), int(match[3]), float(match[4]), float(match[5])), path)
    if not numbers:
        raise SlabError(f"{scans}: no slice_XXXX_W_H_SX_SY.png scans")
    if len(geometry) > 1:
        first, other = list(geometry.values())[:2]
        raise SlabError(f"{other}: size or spacing differs from {first.name}; expected one per case-day")
    width, height, sx, sy = next(iter(geometry))
    return numbers, (width, height), (sx, sy)


# ---------------------------------------------------------------------------------------------
# BraTS 2020 (multi-modal brain MRI)


def brats_items(root: Path, out: Staging) -> list[dict]:
    """Case folders ``BraTS20_Training_XXX/*_{flair,t1,t1ce,t2,seg}.nii[.gz]`` at any depth under
    ``root`` (the Kaggle download nests them in ``MICCAI_BraTS2020_TrainingData/``).

    The image is the list of the four modality files (loaded as channels); the label
    ``{0, 1, 2, 4}`` becomes 3 channels: tumour core (1, 4), whole tumour (1, 2, 4),
    enhancing tumour (4). A case whose segmentation is misnamed (``BraTS20_Training_355`` ships
    ``W39_1998.09.19_Segm.nii``) uses its one ``*Segm.nii[.gz]``; a case missing a file is
    skipped and reported, not the whole dataset.
    """
    cases = natural_order({p.parent for p in root.rglob("*.nii*") if p.parent.name.startswith("BraTS")})
    if not cases:
        raise SlabError(f"{root}: no BraTS20_Training_XXX case directories (at any depth)")
    items = []
    for case in cases:
        try:
            images = [str(_brats_file(case, m)) for m in BRATS_MODALITIES]
            seg_path = _brats_file(case, "seg")
            seg = load_volume(seg_path)
            check_same_geometry(*(load_volume(p, lazy=True) for p in images), seg, names=images + [str(seg_path)])
            label = brats_label(seg.numpy()[0], seg_path)
        except SlabError as err:
            out.skip(case.name, str(err))
            continue
        items.append({"id": case.name, "case": case.name, "image": images,
                      "label": out.save(label, f"{case.name}/label.nii.gz", seg.affine)})
    if not items:
        raise SlabError(f"{root}: no usable BraTS case ({len(out.skipped)} skipped; first: {out.skipped[0]['reason']})")
    return items


def _brats_file(case: Path, modality: str) -> Path:
    found = [p for p in case.iterdir() if p.name.endswith((f"_{modality}.nii", f"_{modality}.nii.gz"))]
    if not found and modality == "seg":
        found = [p for p in case.iterdir() if re.search(r"seg(m)?\.nii(\.gz)?$", p.name, re.IGNORECASE)]
    if len(found) != 1:
        what = "missing" if not found else f"{len(found)} files"
        raise SlabError(f"{case / f'{case.name}_{modality}.nii.gz'}: {what}; expected one *_{modality}.nii[.gz]")
    return found[0]


def brats_label(seg: np.ndarray, source="seg") -> np.ndarray:
    """BraTS labels ``{0, 1, 2, 4}`` → ``uint8`` channels (TC, WT, ET) of shape ``(3, *seg.shape)``."""
    values = np.unique(seg)
    unexpected = values[~np.isin(values, (0, 1, 2, 4))]
    if unexpected.size:
        raise SlabError(f"{source}: unexpected label values {unexpected.tolist()[:5]}; expected 0, 1, 2, 4")
    return np.stack([(seg == 1) | (seg == 4), seg > 0, seg == 4]).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# RSNA 2022 cervical spine fracture (CT DICOM, vertebra segmentations for some studies)


def rsna_spine_items(root: Path, out: Staging) -> list[dict]:
    """``train_images/<StudyUID>/*.dcm``, ``segmentations/<StudyUID>.nii``, ``train.csv``.

    The image is the DICOM directory; ``targets`` holds C1..C7 and patient_overall (0/1).
    A study with a segmentation gets ``label``: the vertebra label map resampled (nearest
    neighbour, by world coordinates) onto the DICOM grid, values kept (1..7 = C1..C7).
    """
    csv_path = root / "train.csv"
    images = require_dir(root / "train_images", "train_images/<StudyInstanceUID>/*.dcm")
    targets = {}
    for where, row in read_csv_rows(csv_path, ("StudyInstanceUID",) + RSNA_TARGETS):
        uid = row["StudyInstanceUID"].strip()
        if uid in targets:
            raise SlabError(f"{where}: study {uid} repeats")
        values = {name: row[name].strip() for name in RSNA_TARGETS}
        bad = [name for name, value in values.items() if value not in ("0", "1")]
        if bad:
            raise SlabError(f"{where}: {bad[0]} is {values[bad[0]]!r}; expected 0 or 1")
        targets[uid] = {name: int(value) for name, value in values.items()}
    if not targets:
        raise SlabError(f"{csv_path}: no studies")
    segmentations = {}
    seg_dir = root / "segmentations"
    for path in natural_order(seg_dir.iterdir()) if seg_dir.is_dir() else []:
        uid = re.sub(r"\.nii(\.gz)?$", "", path.name)
        if uid == path.name:
            continue
        if uid not in targets:
            raise SlabError(f"{path}: segmentation of a study not in {csv_path}")
        segmentations[uid] = path
    items = []
    for uid in sorted(targets, key=natural_key):
        study = images / uid
        if not study.is_dir() or not any(study.glob("*.dcm")):
            raise SlabError(f"{study}: missing or without .dcm files; {csv_path} lists study {uid}")
        item = {"id": uid, "case": uid, "image": str(study), "targets": targets[uid]}
        if uid in segmentations:
            dicom = load_volume(study)
            label = resample_label(load_volume(segmentations[uid]), dicom, segmentations[uid])
            if label.dtype != np.uint8:
                if label.min() < 0 or label.max() > 255 or not np.array_equal(label, np.round(label)):
                    raise SlabError(f"{segmentations[uid]}: expected integer vertebra labels 0..255")
                label = label.astype(np.uint8)
            item["label"] = out.save(label, f"{uid}/label.nii.gz", dicom.affine)
        items.append(item)
    return items


def resample_label(label, reference, source="label") -> np.ndarray:
    """A label volume resampled onto ``reference``'s grid by world coordinates, nearest neighbour.

    Parameters
    ----------
    label, reference : MetaTensor ``(C, X, Y, Z)`` with ``.affine`` (voxel to world).
    source : names the label in the error raised when it does not overlap the reference.

    Returns
    -------
    numpy.ndarray
        ``(1, *reference spatial shape)`` in the label's dtype; outside the label, 0.
    """
    # reference voxel -> world -> label voxel; flips and axis swaps make this a signed permutation.
    matrix = np.linalg.inv(np.asarray(label.affine, np.float64)) @ np.asarray(reference.affine, np.float64)
    data = label.numpy()[0]
    out = ndimage.affine_transform(data, matrix[:3, :3], matrix[:3, 3], output_shape=tuple(reference.shape[1:]),
                                   order=0, mode="constant", cval=0)
    if data.any() and not out.any():
        raise SlabError(f"{source}: does not overlap the image in world coordinates; check its affine")
    return out[np.newaxis]


# ---------------------------------------------------------------------------------------------
# Folds and the datalist

ADAPTERS = {
    "sennet": (sennet_items, ["blood_vessel"], "channels"),
    "uwmgi": (uwmgi_items, list(UWMGI_CLASSES), "channels"),
    "brats": (brats_items, list(BRATS_LABELS), "channels"),
    "rsna-spine": (rsna_spine_items, list(RSNA_VERTEBRAE), "values"),
    "nnunet": (nnunet_items, None, "values"),  # the labels' names come from its dataset.json
}


def assign_folds(cases, n_folds: int, seed: int = 0) -> dict[str, int]:
    """Fold of each case: cases shuffled by ``seed``, then, largest first, each to the fold with
    the fewest items so far (group k-fold). ``cases`` lists one case per item."""
    counts: dict[str, int] = {}
    for case in cases:
        counts[case] = counts.get(case, 0) + 1
    if not 1 <= n_folds <= len(counts):
        raise SlabError(f"folds: expected 1 to {len(counts)} (the number of cases), got {n_folds}")
    order = sorted(counts, key=natural_key)
    order = [order[i] for i in np.random.default_rng(seed).permutation(len(order))]
    order.sort(key=lambda case: -counts[case])  # stable: the shuffle breaks ties
    sizes, folds = [0] * n_folds, {}
    for case in order:
        fold = sizes.index(min(sizes))
        folds[case] = fold
        sizes[fold] += counts[case]
    return folds


def build_datalist(kind: str, root, out_dir, n_folds: int = 5, seed: int = 0) -> Path:
    """Scan a dataset, convert what must be converted, write ``out_dir/datalist.json``.

    Parameters
    ----------
    kind : ``"sennet"``, ``"uwmgi"``, ``"brats"``, ``"rsna-spine"`` or ``"nnunet"`` (a v2 raw dataset).
    root : the dataset as downloaded (see each ``*_items`` function for its layout).
    out_dir : where ``datalist.json`` and converted volumes (``volumes/<id>/``) go.
    n_folds : folds, grouped by case; fold 0 is the ``validation`` list.
    seed : shuffles which cases share a fold.

    Returns
    -------
    Path
        ``out_dir/datalist.json``.
    """
    if kind not in ADAPTERS:
        raise SlabError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    root, out_dir = Path(root).resolve(), Path(out_dir).resolve()
    require_dir(root, f"a {kind} dataset root")
    adapter, labels, label_format = ADAPTERS[kind]
    created = not out_dir.exists()
    try:
        with atomic_write(out_dir / "datalist.json") as tmp:
            out = Staging(tmp.parent / "volumes", out_dir / "volumes")
            items = sorted(adapter(root, out), key=lambda item: natural_key(item["id"]))
            for skipped in out.skipped:
                warnings.warn(f"{root}: skipped case {skipped['case']}: {skipped['reason']}", SlabWarning,
                              stacklevel=2)
            cases = len({item["case"] for item in items})
            if n_folds > cases:
                warnings.warn(f"folds: {n_folds} folds for {cases} case{'s' * (cases != 1)}; using "
                              f"{max(1, cases)} (folds never split a case)", SlabWarning, stacklevel=2)
                n_folds = max(1, cases)
            folds = assign_folds([item["case"] for item in items], n_folds, seed)
            for item in items:
                item["fold"] = folds[item["case"]]
            validation = [item for item in items if item["fold"] == 0] if n_folds > 1 else []
            datalist = {
                "kind": kind, "root": str(root), "labels": labels, "label_format": label_format, **out.meta,
                "n_folds": n_folds, "seed": seed,
                "training": [item for item in items if item not in validation],
                "validation": validation, "skipped": out.skipped,
            }
            tmp.write_text(json.dumps(datalist, indent=1) + "\n", encoding="utf-8")
    except BaseException:
        if created and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    return out_dir / "datalist.json"
