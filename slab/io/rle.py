"""Kaggle run-length encoding: 2D masks to and from strings, RLE CSVs to and from volumes.

A Kaggle RLE string is ``"start length start length ..."`` over the flattened image, starts
1-indexed. SenNet and UW-Madison GI Tract flatten row-major (``order="C"``), HuBMAP
column-major (``order="F"``). An empty mask is ``""`` or ``"1 0"``; both decode to zeros.

Volumes follow the slice-stack convention of ``slab.io.volumes``: a slice image ``img[row, col]``
is ``vol[:, :, z] = img.T``, so a volume of shape ``(X, Y, Z)`` has slice images of shape ``(Y, X)``.
"""
from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from slab.core.errors import SlabError
from slab.core.outputs import atomic_write

SENNET_COLUMNS = ("id", "rle")
UWMGI_COLUMNS = ("id", "class", "segmentation")
UWMGI_CLASSES = ("large_bowel", "small_bowel", "stomach")

_SENNET_ID = re.compile(r"^(?P<name>.+)_(?P<z>[0-9]+)$")
_UWMGI_ID = re.compile(r"^(?P<case_day>case[0-9]+_day[0-9]+)_slice_(?P<slice>[0-9]+)$")
_INTEGER = re.compile(r"[+-]?[0-9]+")
_RLE_CHARACTERS = re.compile(r"[0-9+\-\s]*")  # int() alone would also take "1_000" and non-ASCII digits


def _check_order(order: str) -> str:
    if order not in ("C", "F"):
        raise SlabError(f"order: expected 'C' (row-major) or 'F' (column-major), got {order!r}")
    return order


def rle_encode(mask2d, order: str = "C", empty: str = "") -> str:
    """Run-length encode a 2D mask (non-zero = foreground) as a Kaggle RLE string.

    Parameters
    ----------
    mask2d : array_like, 2D
        The mask image ``img[row, col]``.
    order : {"C", "F"}
        Flattening order: ``"C"`` row-major (SenNet, UW-Madison), ``"F"`` column-major (HuBMAP).
    empty : str
        What an all-zero mask encodes to: ``""`` or ``"1 0"`` (SenNet submissions).

    Returns
    -------
    str
        ``"start length ..."`` with 1-indexed starts.

    Examples
    --------
    >>> rle_encode(np.array([[0, 1, 1], [1, 0, 0]]))
    '2 3'
    >>> rle_encode(np.array([[0, 1, 1], [1, 0, 0]]), order="F")
    '2 2 5 1'
    """
    mask = np.asarray(mask2d)
    if mask.ndim != 2:
        raise SlabError(f"mask2d: expected a 2D mask, got shape {mask.shape}")
    flat = mask.ravel(order=_check_order(order)) != 0
    padded = np.concatenate(([False], flat, [False]))
    # Positions where the value changes, 1-indexed: alternately a run's start and one past its end.
    edges = np.flatnonzero(padded[1:] != padded[:-1]) + 1
    if edges.size == 0:
        return empty
    edges[1::2] -= edges[0::2]
    return " ".join(map(str, edges.tolist()))


def _is_empty(rle) -> bool:
    if rle is None:
        return True
    if isinstance(rle, float) and math.isnan(rle):
        return True
    return isinstance(rle, str) and rle.strip().lower() in ("", "nan")


def rle_decode(rle, shape: Sequence[int], order: str = "C", where: str = "rle") -> np.ndarray:
    """Decode a Kaggle RLE string into a ``uint8`` mask of ``shape`` (1 = foreground).

    Parameters
    ----------
    rle : str or None
        ``"start length ..."``, 1-indexed starts, runs sorted and not overlapping.
        ``""``, ``"1 0"``, ``None`` and NaN (an empty CSV cell) decode to zeros.
    shape : (rows, cols)
        The image shape.
    order : {"C", "F"}
        Flattening order the string was written in.
    where : str
        Names the string in error messages (an argument, or a CSV file and row).

    Returns
    -------
    numpy.ndarray
        ``uint8`` array of ``shape``.

    Examples
    --------
    >>> rle_decode("2 3", (2, 3))
    array([[0, 1, 1],
           [1, 0, 0]], dtype=uint8)
    """
    _check_order(order)
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2 or min(shape) < 1:
        raise SlabError(f"shape: expected (rows, cols) of positive sizes, got {shape}")
    size = shape[0] * shape[1]
    if _is_empty(rle):
        return np.zeros(shape, np.uint8)
    if not isinstance(rle, str):
        raise SlabError(f"{where}: expected an RLE string, got {type(rle).__name__}")
    tokens = rle.split()
    if len(tokens) % 2:
        raise SlabError(f"{where}: odd number of tokens ({len(tokens)}); expected 'start length' pairs")
    if not _RLE_CHARACTERS.fullmatch(rle) or not all(_INTEGER.fullmatch(t) for t in tokens):
        bad = next((t for t in tokens if not _INTEGER.fullmatch(t)), rle.strip()[:20])
        raise SlabError(f"{where}: expected integers, got {bad!r}")
    # Below 10**18, a start plus a length stays inside int64; larger is no image's RLE.
    big = next((t for t in tokens if len(t.lstrip("+-").lstrip("0")) > 18), None)
    if big is not None:
        raise SlabError(f"{where}: number {big[:24]}{'...' if len(big) > 24 else ''} is larger than any image "
                        f"(this one has {size} pixels)")
    runs = np.fromiter(map(int, tokens), dtype=np.int64, count=len(tokens)).reshape(-1, 2)
    starts, lengths = runs[:, 0] - 1, runs[:, 1]
    if (lengths < 0).any():
        raise SlabError(f"{where}: negative run length {int(lengths[lengths < 0][0])}")
    if (starts < 0).any():
        raise SlabError(f"{where}: run start {int(starts[starts < 0][0]) + 1} below 1 (starts are 1-indexed)")
    keep = lengths > 0  # zero-length runs ("1 0") mark nothing
    starts, ends = starts[keep], starts[keep] + lengths[keep]
    if ends.size and ends.max() > size:
        raise SlabError(f"{where}: run ends at pixel {int(ends.max())}, "
                        f"past the {shape[0]}x{shape[1]} image ({size} pixels)")
    if (starts[1:] < ends[:-1]).any():
        i = int(np.flatnonzero(starts[1:] < ends[:-1])[0])
        raise SlabError(f"{where}: runs overlap or are unsorted (start {int(starts[i + 1]) + 1} "
                        f"after a run ending at {int(ends[i])})")
    # Sorted, disjoint runs: +1 at each start, -1 one past each end, cumulative sum is the mask.
    delta = np.zeros(size + 1, np.int8)
    delta[starts] = 1
    delta[ends] -= 1
    return np.cumsum(delta[:-1], dtype=np.int8).view(np.uint8).reshape(shape, order=order)


# --------------------------------------------------------------------------------------------
# CSV files (stdlib csv; an empty cell is an empty mask)


def read_csv_rows(csv_path, columns: Sequence[str]) -> Iterator[tuple[str, dict[str, str]]]:
    """Yield ``(where, row)`` for each data row of a CSV that must have ``columns``.

    ``where`` is ``"<csv_path>: row <n>"`` (``n`` counting the header as row 1), for messages.
    """
    path = Path(csv_path)
    if not path.is_file():
        raise SlabError(f"{path}: CSV file not found")
    csv.field_size_limit(1 << 30)  # an RLE of a 1303x912 slice is megabytes long
    # utf-8-sig: a byte-order mark before the header (Excel writes one) is not part of "id".
    with open(path, newline="", encoding="utf-8-sig") as f:
        try:
            reader = csv.reader(f)
            header = [c.strip() for c in next(reader, [])]
            missing = [c for c in columns if c not in header]
            if missing:
                raise SlabError(f"{path}: missing column(s) {', '.join(missing)} "
                                f"(has: {', '.join(header) or 'nothing'})")
            index = {c: header.index(c) for c in columns}
            for n, cells in enumerate(reader, start=2):
                if not cells:
                    continue  # a blank line
                if len(cells) <= max(index.values()):
                    raise SlabError(f"{path}: row {n} has {len(cells)} field(s); expected {', '.join(columns)}")
                yield f"{path}: row {n}", {c: cells[i] for c, i in index.items()}
        except UnicodeDecodeError as err:
            raise SlabError(f"{path}: not UTF-8 text (byte {err.start} of a line); save the CSV as UTF-8") from None
        except csv.Error as err:
            raise SlabError(f"{path}: not a readable CSV file ({err})") from None


def read_sennet_rles(csv_path) -> dict[str, dict[int, tuple[str, str]]]:
    """Group a SenNet ``id,rle`` CSV by volume: ``{name: {z: (where, rle)}}``.

    Ids are ``<name>_<z>`` with ``z`` the slice number (``kidney_1_dense_0000``).
    """
    volumes: dict[str, dict[int, tuple[str, str]]] = {}
    for where, row in read_csv_rows(csv_path, SENNET_COLUMNS):
        match = _SENNET_ID.match(row["id"].strip())
        if match is None:
            raise SlabError(f"{where}: id {row['id']!r} is not <volume>_<slice number>")
        slices = volumes.setdefault(match["name"], {})
        z = int(match["z"])
        if z in slices:
            raise SlabError(f"{where}: id {row['id']!r} repeats {slices[z][0]}")
        slices[z] = (f"{where} (id {row['id']})", row["rle"])
    return volumes


def sennet_label(rles: Mapping[int, tuple[str, str]], shape: Sequence[int]) -> np.ndarray:
    """Label volume ``(X, Y, Z)`` ``uint8`` from one volume's ``{z: (where, rle)}`` (row-major RLE).

    Slices absent from ``rles`` are empty.
    """
    X, Y, Z = (int(s) for s in shape)
    label = np.zeros((X, Y, Z), np.uint8)
    for z, (where, rle) in rles.items():
        if not 0 <= z < Z:
            raise SlabError(f"{where}: slice {z} outside the volume's {Z} slices")
        label[:, :, z] = rle_decode(rle, (Y, X), where=where).T
    return label


def read_sennet_label(csv_path, name: str, shape: Sequence[int]) -> np.ndarray:
    """Label volume ``(X, Y, Z)`` of volume ``name`` from a SenNet ``id,rle`` CSV."""
    volumes = read_sennet_rles(csv_path)
    if name not in volumes:
        raise SlabError(f"{csv_path}: no rows for volume {name!r} (ids {name}_0000, ...)")
    return sennet_label(volumes[name], shape)


def read_uwmgi_rles(csv_path) -> dict[str, dict[int, dict[str, tuple[str, str]]]]:
    """Group a UW-Madison ``id,class,segmentation`` CSV: ``{case_day: {slice: {class: (where, rle)}}}``."""
    days: dict[str, dict[int, dict[str, tuple[str, str]]]] = {}
    for where, row in read_csv_rows(csv_path, UWMGI_COLUMNS):
        match = _UWMGI_ID.match(row["id"].strip())
        if match is None:
            raise SlabError(f"{where}: id {row['id']!r} is not caseN_dayM_slice_XXXX")
        cls = row["class"].strip()
        if cls not in UWMGI_CLASSES:
            raise SlabError(f"{where}: class {cls!r} is not one of {', '.join(UWMGI_CLASSES)}")
        classes = days.setdefault(match["case_day"], {}).setdefault(int(match["slice"]), {})
        if cls in classes:
            raise SlabError(f"{where}: id {row['id']!r} class {cls} repeats {classes[cls][0]}")
        classes[cls] = (f"{where} (id {row['id']}, {cls})", row["segmentation"])
    return days


def uwmgi_label(rles: Mapping[int, Mapping[str, tuple[str, str]]], shape: Sequence[int],
                slice_numbers: Sequence[int] | None = None) -> np.ndarray:
    """3-channel label ``(3, X, Y, Z)`` ``uint8`` (large_bowel, small_bowel, stomach) of one case-day.

    ``rles`` is ``{slice number: {class: (where, rle)}}``; ``slice_numbers[z]`` is the number of
    slice ``z`` (default ``1..Z``, as the scans are numbered). Slices or classes absent are empty.
    """
    X, Y, Z = (int(s) for s in shape)
    numbers = list(range(1, Z + 1)) if slice_numbers is None else [int(n) for n in slice_numbers]
    if len(numbers) != Z:
        raise SlabError(f"slice_numbers: expected {Z} numbers, one per slice, got {len(numbers)}")
    z_of = {n: z for z, n in enumerate(numbers)}
    label = np.zeros((len(UWMGI_CLASSES), X, Y, Z), np.uint8)
    for number, classes in rles.items():
        for cls, (where, rle) in classes.items():
            if number not in z_of:
                raise SlabError(f"{where}: slice {number} has no scan (slices {numbers[0]}..{numbers[-1]})")
            label[UWMGI_CLASSES.index(cls), :, :, z_of[number]] = rle_decode(rle, (Y, X), where=where).T
    return label


def read_uwmgi_label(csv_path, case_day: str, shape: Sequence[int],
                     slice_numbers: Sequence[int] | None = None) -> np.ndarray:
    """3-channel label ``(3, X, Y, Z)`` of ``case_day`` (``case123_day20``) from a UW-Madison CSV."""
    days = read_uwmgi_rles(csv_path)
    if case_day not in days:
        raise SlabError(f"{csv_path}: no rows for {case_day!r} (ids {case_day}_slice_0001, ...)")
    return uwmgi_label(days[case_day], shape, slice_numbers)


def write_rle_csv(mask, csv_path, row_ids: Sequence[str], classes: Sequence[str] | None = None) -> Path:
    """Write a submission CSV for a mask ``(L, X, Y, Z)`` (or ``(X, Y, Z)``), one row per slice.

    One label: ``id,rle`` (SenNet), an empty slice ``"1 0"``. Several: ``id,class,segmentation``
    (UW-Madison), one row per slice and class in ``classes`` order, an empty slice ``""``. Slice
    ``z``'s image is ``mask[c, :, :, z].T``, encoded row-major; its id is ``row_ids[z]``.
    Written atomically.
    """
    mask = np.asarray(mask)
    mask = mask[np.newaxis] if mask.ndim == 3 else mask
    if mask.ndim != 4:
        raise SlabError(f"mask: expected a volume (X, Y, Z) or (L, X, Y, Z), got shape {mask.shape}")
    labels, depth = mask.shape[0], mask.shape[3]
    if len(row_ids) != depth:
        raise SlabError(f"row_ids: {len(row_ids)} ids for {depth} slices")
    classes = list(classes) if classes is not None else [f"label_{i + 1}" for i in range(labels)]
    if labels > 1 and len(classes) != labels:
        raise SlabError(f"classes: {len(classes)} names for {labels} label channels")
    path = Path(csv_path)
    with atomic_write(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        if labels == 1:
            writer.writerow(SENNET_COLUMNS)
            for z in range(depth):
                writer.writerow((row_ids[z], rle_encode(mask[0, :, :, z].T, empty="1 0")))
        else:
            writer.writerow(UWMGI_COLUMNS)
            for z in range(depth):
                for c in range(labels):
                    writer.writerow((row_ids[z], classes[c], rle_encode(mask[c, :, :, z].T)))
    return path


def write_submission_csv(mask, csv_path, id_prefix: str) -> Path:
    """Write a SenNet submission ``id,rle`` for a mask volume ``(X, Y, Z)``: row ``z`` has id
    ``f"{id_prefix}_{z:04d}"`` (:func:`write_rle_csv`)."""
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise SlabError(f"mask: expected a volume (X, Y, Z), got shape {mask.shape}")
    return write_rle_csv(mask, csv_path, [f"{id_prefix}_{z:04d}" for z in range(mask.shape[2])])
