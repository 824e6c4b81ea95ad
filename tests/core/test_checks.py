"""The shared argument and file checks in slab/core/checks.py."""
import json

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
