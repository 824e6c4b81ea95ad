"""Kaggle RLE: round trips (hypothesis), known answers, bad strings, CSV readers and writer."""
import csv

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from slab.core.errors import SlabError
from slab.io.rle import (
    read_sennet_label,
    read_uwmgi_label,
    rle_decode,
    rle_encode,
    write_submission_csv,
)

# A hand-computed mask: rows are read left to right, top to bottom (C) or columns top to bottom (F).
#   0 1 1 0
#   1 1 0 0
#   0 0 0 1
MASK = np.array([[0, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 1]], np.uint8)
MASK_C = "2 2 5 2 12 1"   # flat C: 0 1 1 0 1 1 0 0 0 0 0 1
MASK_F = "2 1 4 2 7 1 12 1"  # flat F: 0 1 0 1 1 0 1 0 0 0 0 1


def reference_decode(rle, shape, order="C"):
    """Plain pixel loop, as the Kaggle starter notebooks decode."""
    flat = np.zeros(shape[0] * shape[1], np.uint8)
    tokens = [int(t) for t in rle.split()]
    for start, length in zip(tokens[0::2], tokens[1::2]):
        flat[start - 1:start - 1 + length] = 1
    return flat.reshape(shape, order=order)


def test_known_answer():
    assert rle_encode(MASK) == MASK_C
    assert rle_encode(MASK, order="F") == MASK_F
    np.testing.assert_array_equal(rle_decode(MASK_C, MASK.shape), MASK)
    np.testing.assert_array_equal(rle_decode(MASK_F, MASK.shape, order="F"), MASK)
    assert rle_decode(MASK_C, MASK.shape).dtype == np.uint8


def test_full_and_edge_runs():
    assert rle_encode(np.ones((2, 3))) == "1 6"
    assert rle_encode(np.array([[True, False, True]])) == "1 1 3 1"
    # Non-zero of any value is foreground; adjacent runs decode as one.
    assert rle_encode(np.array([[0, 255, 7]])) == "2 2"
    np.testing.assert_array_equal(rle_decode("1 1 2 1", (1, 2)), [[1, 1]])


@pytest.mark.parametrize("empty_rle", ["", "1 0", "  ", None, float("nan"), "nan"])
def test_empty_decodes_to_zeros(empty_rle):
    out = rle_decode(empty_rle, (3, 4))
    assert out.shape == (3, 4) and not out.any()


def test_empty_encodes_as_asked():
    zeros = np.zeros((3, 4), np.uint8)
    assert rle_encode(zeros) == ""
    assert rle_encode(zeros, empty="1 0") == "1 0"


@settings(max_examples=200, deadline=None)
@given(
    mask=st.tuples(st.integers(1, 17), st.integers(1, 23)).flatmap(
        lambda shape: arrays(np.uint8, shape, elements=st.integers(0, 1))),
    order=st.sampled_from(["C", "F"]),
)
def test_round_trip_property(mask, order):
    rle = rle_encode(mask, order=order)
    np.testing.assert_array_equal(rle_decode(rle, mask.shape, order=order), mask)
    # Against the loop decoder: our encoder writes what the Kaggle notebooks read.
    if rle:
        np.testing.assert_array_equal(reference_decode(rle, mask.shape, order), mask)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**16), density=st.floats(0.0, 1.0))
def test_round_trip_larger_random(seed, density):
    mask = (np.random.default_rng(seed).random((64, 48)) < density).astype(np.uint8)
    for order in ("C", "F"):
        np.testing.assert_array_equal(rle_decode(rle_encode(mask, order=order), mask.shape, order), mask)


@pytest.mark.parametrize("rle, message", [
    ("1 2 3", "odd number of tokens"),
    ("1 x", "expected integers, got 'x'"),
    ("1 2.5", "expected integers, got '2.5'"),
    ("1 1_0", "expected integers"),
    ("1 -2", "negative run length"),
    ("0 2", "below 1"),
    ("-3 2", "below 1"),
    ("11 3", "past the 3x4 image"),
    ("5 2 1 1", "overlap or are unsorted"),
    ("1 3 2 1", "overlap or are unsorted"),
])
def test_bad_rle_names_the_argument(rle, message):
    with pytest.raises(SlabError, match=message) as err:
        rle_decode(rle, (3, 4), where="my.csv: row 7")
    assert str(err.value).startswith("my.csv: row 7: ")
    assert "\n" not in str(err.value)


def test_bad_arguments():
    with pytest.raises(SlabError, match="order"):
        rle_encode(MASK, order="K")
    with pytest.raises(SlabError, match="mask2d"):
        rle_encode(np.zeros((2, 2, 2)))
    with pytest.raises(SlabError, match="shape"):
        rle_decode("1 1", (4,))
    with pytest.raises(SlabError, match="rle: expected an RLE string"):
        rle_decode(12, (3, 4))


# --------------------------------------------------------------------------------------------
# CSV files


def write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_sennet_label_axes(tmp_path):
    # Volume (X=4, Y=3, Z=2): slice images are (3 rows, 4 cols) and vol[:, :, z] = img.T.
    path = write_csv(tmp_path / "train_rles.csv", ["id", "rle"], [
        ["kidney_9_0000", MASK_C],
        ["kidney_9_0001", "1 0"],
        ["other_0000", "1 12"],
    ])
    label = read_sennet_label(path, "kidney_9", (4, 3, 2))
    assert label.shape == (4, 3, 2) and label.dtype == np.uint8
    np.testing.assert_array_equal(label[:, :, 0], MASK.T)
    assert not label[:, :, 1].any()
    assert label[1, 0, 0] == 1 and label[0, 1, 0] == 1 and label[3, 2, 0] == 1  # img[0,1], img[1,0], img[2,3]


def test_sennet_errors(tmp_path):
    path = write_csv(tmp_path / "a.csv", ["id", "mask"], [["v_0000", "1 1"]])
    with pytest.raises(SlabError, match=r"a\.csv: missing column\(s\) rle"):
        read_sennet_label(path, "v", (4, 3, 1))
    path = write_csv(tmp_path / "b.csv", ["id", "rle"], [["v_0000", "1 1"], ["v_0001", "1 2 3"]])
    with pytest.raises(SlabError, match=r"b\.csv: row 3 \(id v_0001\): odd number"):
        read_sennet_label(path, "v", (4, 3, 2))
    with pytest.raises(SlabError, match=r"b\.csv: row 3 \(id v_0001\): slice 1 outside"):
        read_sennet_label(path, "v", (4, 3, 1))
    with pytest.raises(SlabError, match="no rows for volume 'w'"):
        read_sennet_label(path, "w", (4, 3, 2))
    with pytest.raises(SlabError, match="CSV file not found"):
        read_sennet_label(tmp_path / "none.csv", "v", (4, 3, 2))


def test_uwmgi_label(tmp_path):
    path = write_csv(tmp_path / "train.csv", ["id", "class", "segmentation"], [
        ["case1_day2_slice_0001", "large_bowel", ""],
        ["case1_day2_slice_0001", "small_bowel", MASK_C],
        ["case1_day2_slice_0001", "stomach", ""],
        ["case1_day2_slice_0002", "stomach", "1 1"],
        ["case1_day3_slice_0001", "stomach", "1 12"],
    ])
    label = read_uwmgi_label(path, "case1_day2", (4, 3, 2))
    assert label.shape == (3, 4, 3, 2) and label.dtype == np.uint8
    np.testing.assert_array_equal(label[1, :, :, 0], MASK.T)
    assert label[2, 0, 0, 1] == 1 and label.sum() == MASK.sum() + 1
    # Slice numbers map to z through the scans' numbering.
    label = read_uwmgi_label(path, "case1_day2", (4, 3, 2), slice_numbers=[2, 1])
    np.testing.assert_array_equal(label[1, :, :, 1], MASK.T)


def test_uwmgi_errors(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["id", "segmentation"], [])
    with pytest.raises(SlabError, match=r"t\.csv: missing column\(s\) class"):
        read_uwmgi_label(path, "case1_day2", (4, 3, 2))
    path = write_csv(tmp_path / "u.csv", ["id", "class", "segmentation"],
                     [["case1_day2_slice_0001", "liver", ""]])
    with pytest.raises(SlabError, match=r"u\.csv: row 2: class 'liver'"):
        read_uwmgi_label(path, "case1_day2", (4, 3, 2))
    path = write_csv(tmp_path / "v.csv", ["id", "class", "segmentation"],
                     [["case1_day2_slice_0003", "stomach", "1 1"]])
    with pytest.raises(SlabError, match=r"v\.csv: row 2 .*slice 3 has no scan"):
        read_uwmgi_label(path, "case1_day2", (4, 3, 2))
    path = write_csv(tmp_path / "w.csv", ["id", "class", "segmentation"],
                     [["case1_day2_slice_0001", "stomach", "13 1"]])
    with pytest.raises(SlabError, match=r"w\.csv: row 2 \(id case1_day2_slice_0001, stomach\): run ends"):
        read_uwmgi_label(path, "case1_day2", (4, 3, 2))


def test_submission_round_trip(tmp_path, rng):
    mask = (rng.random((5, 4, 3)) < 0.4).astype(np.uint8)
    mask[:, :, 1] = 0
    path = write_submission_csv(mask, tmp_path / "sub.csv", "kidney_5")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["id", "rle"]
    assert [r[0] for r in rows[1:]] == ["kidney_5_0000", "kidney_5_0001", "kidney_5_0002"]
    assert rows[2][1] == "1 0"
    assert rows[1][1] == rle_encode(mask[:, :, 0].T)
    np.testing.assert_array_equal(read_sennet_label(path, "kidney_5", mask.shape), mask)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub.csv"]


def test_submission_rejects_2d(tmp_path):
    with pytest.raises(SlabError, match="mask: expected a volume"):
        write_submission_csv(np.zeros((3, 4)), tmp_path / "sub.csv", "k")
    assert not (tmp_path / "sub.csv").exists()
