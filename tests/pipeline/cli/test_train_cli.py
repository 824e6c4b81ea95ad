"""``slab train``: a tiny run end to end, and bad input as one line on stderr with exit code 2."""
import json
from pathlib import Path

import pytest

from slab.pipeline.cli import main

from test_train import TINY, write_datalist  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    datalist = write_datalist(root, n=3)
    config = root / "config.json"
    config.write_text(json.dumps({**TINY, "epochs": 1, "planes": ["xy"]}), encoding="utf-8")
    return datalist, config


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("slab: error: ") and "\n" not in err, err
    return err


def test_train_command(data, tmp_path, capsys):
    datalist, config = data
    out = tmp_path / "run"
    assert main(["train", "--datalist", str(datalist), "--config", str(config), "--out", str(out),
                 "--device", "cpu", "--epochs", "2", "--fold", "1"]) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert lines[0].startswith("epoch 1/2  train_loss ") and lines[1].startswith("epoch 2/2  train_loss ")
    assert "val_surface_dice_0 " in lines[1] and "threshold " in lines[1] and lines[1].endswith(" s")
    summary = json.loads(printed[printed.index("{"):])
    assert summary["epochs"] == 2 and summary["best_metric"] == "surface_dice_0"
    assert Path(summary["best_checkpoint"]).is_file()
    used = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert used["epochs"] == 2 and used["planes"] == ["xy"]
    # --resume of a finished run trains nothing and reports the same
    assert main(["train", "--datalist", str(datalist), "--config", str(config), "--out", str(out),
                 "--device", "cpu", "--epochs", "2", "--fold", "1", "--resume"]) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("{"):])["best_value"] == summary["best_value"]


def test_show_config(capsys):
    assert main(["train", "--show-config"]) == 0
    text = capsys.readouterr().out
    assert "val.tolerance_mm = 1.0" in text and "classification.slice_weight = 15.0" in text


def test_bad_input_exits_2(data, tmp_path, capsys):
    datalist, config = data
    run = ["train", "--datalist", str(datalist), "--config", str(config), "--device", "cpu"]

    assert main(["train", "--datalist", str(tmp_path / "none.json"), "--config", str(config),
                 "--out", str(tmp_path / "a")]) == 2
    assert "none.json" in _error(capsys)

    bad_config = tmp_path / "bad.json"
    bad_config.write_text(json.dumps({"epochs": 1, "learning_rate": 0.1}), encoding="utf-8")
    assert main(["train", "--datalist", str(datalist), "--config", str(bad_config), "--out", str(tmp_path / "b")]) == 2
    assert "'learning_rate'" in _error(capsys)

    bad_config.write_text(json.dumps({"epochs": 1, "val": {"tolerance_mm": -2}}), encoding="utf-8")
    assert main(["train", "--datalist", str(datalist), "--config", str(bad_config), "--out", str(tmp_path / "b")]) == 2
    assert "val.tolerance_mm" in _error(capsys)

    missing = json.loads(datalist.read_text(encoding="utf-8"))
    missing["training"][0]["image"] = str(tmp_path / "gone.nii.gz")
    (tmp_path / "missing.json").write_text(json.dumps(missing), encoding="utf-8")
    assert main(["train", "--datalist", str(tmp_path / "missing.json"), "--config", str(config),
                 "--out", str(tmp_path / "c")]) == 2
    assert "gone.nii.gz" in _error(capsys)

    assert main(run + ["--out", str(tmp_path / "d"), "--fold", "7"]) == 2
    assert "fold" in _error(capsys)

    assert main(run + ["--out", str(tmp_path / "e"), "--epochs", "0"]) == 2
    assert "epochs" in _error(capsys)

    assert main(["train", "--datalist", str(datalist)]) == 2
    assert "--out" in _error(capsys)
    for name in "abcde":
        assert not (tmp_path / name).exists()


def test_resume_from_another_config_exits_2(data, tmp_path, capsys):
    datalist, config = data
    out = tmp_path / "run"
    args = ["train", "--datalist", str(datalist), "--out", str(out), "--device", "cpu"]
    assert main(args + ["--config", str(config)]) == 0
    capsys.readouterr()
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**json.loads(config.read_text(encoding="utf-8")), "batch_size": 2}), encoding="utf-8")
    assert main(args + ["--config", str(other), "--resume"]) == 2
    assert "batch_size: 4 -> 2" in _error(capsys)
    assert main(args + ["--config", str(config)]) == 2  # no --resume: the run is kept
    assert "already holds a run" in _error(capsys)
