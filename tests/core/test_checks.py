"""The shared argument and file checks in slab/core/checks.py."""
import json

import numpy as np
import pytest

from slab.core.checks import check_spacing, read_json_object
from slab.core.errors import SlabError


def test_check_spacing_accepts_three_positive_numbers():
    assert check_spacing([0.8, "0.8", 2.5]) == (0.8, 0.8, 2.5)


@pytest.mark.parametrize("bad", [(1, 1), (1, 0, 1), (1, -2, 1), (1, float("nan"), 1), "abc", None])
def test_check_spacing_names_the_argument(bad):
    with pytest.raises(SlabError, match="^voxel: "):
        check_spacing(bad, name="voxel")


def test_read_json_object(tmp_path):
    good = tmp_path / "c.json"
    good.write_text(json.dumps({"a": [1, 2], "b": "é"}), encoding="utf-8")
    assert read_json_object(good, "config") == {"a": [1, 2], "b": "é"}
    with pytest.raises(SlabError, match=r"missing\.json: no such config file"):
        read_json_object(tmp_path / "missing.json", "config")
    (tmp_path / "broken.json").write_text("{", encoding="utf-8")
    with pytest.raises(SlabError, match=r"broken\.json: not valid JSON"):
        read_json_object(tmp_path / "broken.json", "config")
    (tmp_path / "list.json").write_text("[1]", encoding="utf-8")
    with pytest.raises(SlabError, match=r"list\.json: expected a JSON object \(datalist\)"):
        read_json_object(tmp_path / "list.json", "datalist")


@pytest.mark.parametrize("value", [0, -1, 2.0, True, "2", None, np.float32(3.0), np.int64(0)])
def test_one_rule_for_a_count_everywhere(value):
    """positive_int is the one check of a count: 2.0 is refused by the slab transform, the training
    sampler and the inference engines alike (they disagreed before)."""
    from slab.core.checks import positive_int
    from slab.pipeline.inference.predictor import Predictor
    from slab.transforms.slabs import slab_offsets

    with pytest.raises(SlabError, match=r"^stride: expected a positive integer"):
        positive_int(value, "stride")
    with pytest.raises(SlabError, match=r"^k: expected a positive integer"):
        slab_offsets(value, 1)
    with pytest.raises(SlabError, match=r"batch_size: expected a positive integer"):
        Predictor({"name": "unet", "spatial_dims": 2, "in_channels": 1, "out_channels": 1, "channels": [4, 8],
                   "strides": [2]}, batch_size=value)
    assert positive_int(np.int64(3), "stride") == 3


def test_probability_and_non_negative():
    from slab.core.checks import non_negative, probability

    assert probability(1, "p") == 1.0 and non_negative(0, "x") == 0.0
    for bad in (-0.1, 1.5, float("nan"), True, "0.5"):
        with pytest.raises(SlabError, match="^p: expected a probability"):
            probability(bad, "p")
    for bad in (-1, float("inf"), False):
        with pytest.raises(SlabError, match="^x: expected a number >= 0"):
            non_negative(bad, "x")
