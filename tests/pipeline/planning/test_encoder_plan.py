"""A plan picks a pretrained encoder family only where the user allows it (``slab plan
--encoder``): EfficientNet-B0 on a CPU, SE-ResNeXt-50 on a GPU whose measured batch fits it, a
named backbone as asked; 3D keeps its UNet; the plan trains with a local file in place of the
published one, and a bad ``--encoder`` is one line before any case is read."""
import hashlib
import json

import pytest
import torch

from slab.pipeline.cli import main
from slab.pipeline.planning import plans as planning

from test_planning import CPU, _fp  # noqa: E402
from test_pretrained import _efficientnet_b0_file  # noqa: E402
from test_train import write_datalist  # noqa: E402


def test_without_encoder_the_plan_keeps_unets_with_it_an_encoder_unet(tmp_path, monkeypatch):
    monkeypatch.setenv("SLAB_HOME", str(tmp_path / "home"))
    fp = _fp((1, 1, 1), shape=(70, 50, 40))
    small = 1 << 26  # a small memory budget: batch 2, a quick timed step
    plain = planning.plan_configuration(fp, "2p5d", CPU, small)
    assert plain["config"]["network"]["name"] == "unet"
    plan = planning.plan_configuration(fp, "2p5d", CPU, small, encoder="auto")
    cfg = plan["config"]
    assert cfg["network"] == {"name": "flexible_unet", "backbone": "efficientnet-b0", "encoder_weights": "imagenet"}
    # the encoder's divisor is 32 and its smallest input two of them: 70x50 slices -> 64x64 patches
    assert all(p % 32 == 0 and p >= 64 for p in cfg["patch_size"]) and cfg["offsets"] == [-1, 0, 1]
    reason = plan["reasons"]["network"]
    assert "efficientnet-b0's ImageNet weights" in reason and "CPU budget buys steps" in reason
    assert f"place efficientnet-b0-355c32eb.pth in {tmp_path / 'home' / 'encoders'}" in reason
    assert plan["memory"]["parameters"] > plain["memory"]["parameters"]  # measured on the network it plans
    (tmp_path / "home" / "encoders").mkdir(parents=True)
    (tmp_path / "home" / "encoders" / "efficientnet-b0-355c32eb.pth").write_bytes(b"placed")
    assert "efficientnet-b0-355c32eb.pth is in" in planning.plan_configuration(
        fp, "2d", CPU, small, encoder="auto")["reasons"]["network"]
    named = planning.plan_configuration(fp, "2d", CPU, small, encoder="resnet50")
    assert named["config"]["network"]["backbone"] == "resnet50" and "the one asked" in named["reasons"]["network"]
    three = planning.plan_configuration(_fp((1, 1, 1), shape=(24, 24, 24)), "3d", CPU, small, encoder="auto")
    assert three["config"]["network"]["name"] == "unet" and "pretrained encoders are 2D" in three["reasons"]["network"]


@pytest.mark.parametrize("budget_gib,expected", [(20, "se_resnext50_32x4d"), (2, "efficientnet-b0")])
def test_on_a_gpu_auto_takes_se_resnext_where_its_measured_batch_fits(monkeypatch, budget_gib, expected):
    """The batch is the plan's own rule over the measured memory: (budget - fixed) // per sample;
    SE-ResNeXt-50 is taken where that is at least ENCODER_MIN_BATCH (8)."""
    measured = []

    def trial(net, dims, in_channels, out_channels, patch, device):
        measured.append((net["backbone"], dims, in_channels, patch))
        return {"per_sample": 1 << 30, "fixed": 1 << 30, "parameters": 1}

    monkeypatch.setattr(planning, "trial_memory", trial)
    net, divisor, reason = planning.encoder_unet("auto", [200, 150], torch.device("cuda"), budget_gib << 30, 3, 1)
    assert net["backbone"] == expected and divisor == 32
    assert measured == [("se_resnext50_32x4d", 2, 3, [192, 128])]
    assert (f"batch {budget_gib - 1}" in reason) if expected.startswith("se_") else "fits batch 2 < 8" in reason


def test_a_plan_with_an_encoder_trains_from_a_local_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SLAB_HOME", str(tmp_path / "home"))
    datalist = write_datalist(tmp_path / "data", shape=(40, 36, 12))
    plan = tmp_path / "plan"
    assert main(["plan", str(datalist), "-o", str(plan), "--configurations", "2p5d", "--encoder", "auto",
                 "--device", "cpu", "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "encoder UNet efficientnet-b0 (imagenet)" in out and "place efficientnet-b0-355c32eb.pth" in out
    plans = json.loads((plan / "plans.json").read_text())
    assert plans["encoder"] == "auto"
    # offline, a user names the file they have; the plan's network is kept, its weights replaced
    path = _efficientnet_b0_file(tmp_path / "b0.pth")
    spec = {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    overrides = tmp_path / "overrides.json"
    overrides.write_text(json.dumps({"network": {"encoder_weights": spec}, "samples_per_epoch": 4, "batch_size": 2,
                                     "progress": False, "val": {"thresholds": [0.5]}, "report_volumes": 0}))
    assert main(["train", "--plan", str(plan), "--configuration", "2p5d", "--fold", "0", "--config", str(overrides),
                 "--device", "cpu"]) == 0
    network = json.loads((plan / "runs" / "2p5d" / "fold_0" / "network.json").read_text())
    assert network["backbone"] == "efficientnet-b0" and network["encoder_weights"]["sha256"] == spec["sha256"]


def test_a_bad_encoder_is_one_line_before_any_case_is_read(tmp_path, capsys, monkeypatch):
    from slab.pipeline.planning import fingerprint

    datalist = write_datalist(tmp_path / "data", shape=(20, 20, 8))
    monkeypatch.setattr(fingerprint, "fingerprint", lambda *a, **k: pytest.fail("a case was read"))
    assert main(["plan", str(datalist), "-o", str(tmp_path / "plan"), "--encoder", "resnet18"]) == 2
    err = capsys.readouterr().err
    assert "--encoder: expected auto or one of efficientnet-b0" in err and "'resnet18'" in err
    assert err.count("\n") == 1 and not (tmp_path / "plan").exists()
