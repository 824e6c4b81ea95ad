"""Pretrained 2D encoders (``encoder_weights``): files in each published format, written by the
tests, load exactly into a ``flexible_unet``'s encoder; a wrong hash, a missing or unknown tensor
is one line; the first convolution is adapted for k = 1 and 5 slab channels as timm does; a run
trains from them, records their provenance, and predicts without them."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from slab.networks import build_network
from slab.networks.pretrained import IMAGENET, adapt_input_conv, load_encoder
from slab.core.errors import SlabError


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _efficientnet_b0_file(path: Path) -> Path:
    """EfficientNet-PyTorch's published layout (``efficientnet-b0-355c32eb.pth``): flat
    ``_blocks.N`` (16 blocks in b0), the stem, head and classifier; random values."""
    from monai.networks.nets import EfficientNetBN

    torch.manual_seed(3)
    net = EfficientNetBN("efficientnet-b0", pretrained=False, spatial_dims=2, in_channels=3, num_classes=1000)
    state = {}
    for key, value in net.state_dict().items():
        parts = key.split(".")
        if parts[0] == "_blocks":  # MONAI nests blocks by stage (_blocks.S.N); the file does not
            parts = parts[:1] + parts[2:]
        state[".".join(parts)] = value.clone() + (0.01 * torch.randn_like(value.float())).to(value.dtype)
    # the published file's own shapes (known answers): the first block is depthwise on 32 channels
    assert state["_blocks.0._depthwise_conv.weight"].shape == (32, 1, 3, 3) and "_blocks.15._project_conv.weight" in state
    assert "_blocks.16._project_conv.weight" not in state and state["_fc.weight"].shape == (1000, 1280)
    torch.save(state, path)
    return path


def _resnet50_file(path: Path) -> Path:
    """torchvision's published ResNet-50 layout (``resnet50-0676ba61.pth``): conv1, bn1, bottleneck
    layer1-4 with 1x1 convolution shortcuts (no bias), fc."""
    from monai.networks.nets import ResNet

    torch.manual_seed(4)
    net = ResNet("bottleneck", [3, 4, 6, 3], [64, 128, 256, 512], spatial_dims=2, n_input_channels=3,
                 num_classes=1000, shortcut_type="B", bias_downsample=False)
    state = {k: v.clone() + (0.01 * torch.randn_like(v.float())).to(v.dtype) for k, v in net.state_dict().items()}
    assert state["conv1.weight"].shape == (64, 3, 7, 7) and state["fc.weight"].shape == (1000, 2048)
    assert state["layer4.2.bn3.running_var"].shape == (2048,)
    assert state["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1) and "layer1.0.downsample.0.bias" not in state
    torch.save(state, path)
    return path


@pytest.mark.parametrize("backbone,writer", [("efficientnet-b0", _efficientnet_b0_file), ("resnet50", _resnet50_file)])
def test_a_published_file_loads_every_encoder_tensor_exactly(tmp_path, backbone, writer):
    path = writer(tmp_path / "weights.pth")
    published = torch.load(path, weights_only=True)
    net = build_network("flexible_unet", 2, 3, 2, backbone=backbone)
    provenance = load_encoder(net, {"path": str(path), "sha256": _sha(path)}, backbone)
    own = net.encoder.state_dict()
    compared = 0
    for key, value in own.items():
        parts = key.split(".")
        source = ".".join(parts[:1] + parts[2:]) if parts[0] == "_blocks" else key
        if source in published:
            assert torch.equal(value, published[source]), key
            compared += 1
    assert compared == provenance["tensors"] >= len([k for k in own if not k.endswith("num_batches_tracked")]) - 2
    assert provenance["sha256"] == _sha(path) and provenance["source"] == str(path)
    assert "adapted_input_conv" not in provenance


def _cadene_key(key: str) -> str:
    """MONAI's SENet key -> Cadene's pretrainedmodels key (the published SE-ResNeXt files)."""
    parts = key.split(".")
    if not parts[0].startswith("layer") or parts[0] == "layer0":
        return key
    head, rest = parts[:2], parts[2:]
    if rest[0].startswith("conv") and rest[1] == "conv":
        rest = [rest[0]] + rest[2:]
    elif rest[0].startswith("conv") and rest[1:3] == ["adn", "N"]:
        rest = ["bn" + rest[0][4:]] + rest[3:]
    elif rest[:2] == ["se_layer", "fc"]:
        rest = ["se_module", "fc1" if rest[2] == "0" else "fc2"] + rest[3:]
    elif rest[0] == "project":
        rest = ["downsample", "0" if rest[1] == "conv" else "1"] + rest[(2 if rest[1] == "conv" else 3):]
    return ".".join(head + rest)


def test_a_published_se_resnext_file_loads_as_monai_own_loader_reads_it(tmp_path, monkeypatch):
    """Cadene's ``se_resnext50_32x4d-a260b3a4.pth`` layout (layer0.conv1, layerN.I.convK / bnK,
    se_module.fc1/fc2 as 1x1 convolutions, downsample.0/1, last_linear): MONAI's own loader
    (``senet._load_state_dict``, the reference) and slab's read the same file into the same tensors."""
    from monai.networks.nets import SEResNext50
    from monai.networks.nets import senet

    torch.manual_seed(5)
    state = {}
    for key, value in SEResNext50(spatial_dims=2, in_channels=3, num_classes=1000).state_dict().items():
        value = value.clone() + (0.01 * torch.randn_like(value.float())).to(value.dtype)
        if ".se_layer.fc." in key and key.endswith("weight"):
            value = value[..., None, None]  # the published squeeze-excitation layers are 1x1 convolutions
        state[_cadene_key(key)] = value
    assert state["layer0.conv1.weight"].shape == (64, 3, 7, 7) and state["last_linear.weight"].shape == (1000, 2048)
    assert state["layer1.0.se_module.fc1.weight"].shape == (16, 256, 1, 1)
    assert state["layer1.0.bn3.running_var"].shape == (256,) and state["layer4.0.downsample.0.weight"].shape == (2048, 1024, 1, 1)
    path = tmp_path / "se_resnext50_32x4d-a260b3a4.pth"
    torch.save(state, path)
    reference = SEResNext50(spatial_dims=2, in_channels=3, num_classes=1000)
    monkeypatch.setattr(senet, "load_state_dict_from_url", lambda *a, **k: torch.load(path, weights_only=True))
    senet._load_state_dict(reference, "se_resnext50_32x4d", progress=False)
    expected = reference.state_dict()

    net = build_network("flexible_unet", 2, 3, 2, backbone="se_resnext50_32x4d")
    provenance = load_encoder(net, {"path": str(path), "sha256": _sha(path)}, "se_resnext50_32x4d")
    own = net.encoder.state_dict()
    assert set(own) == set(expected) - {"last_linear.weight", "last_linear.bias"}
    for key, value in own.items():
        assert torch.equal(value, expected[key]), key
    assert provenance["tensors"] == len(state) - 2  # every tensor but the classifier's two
    assert net(torch.zeros(1, 3, 64, 96)).shape == (1, 2, 64, 96)
    assert IMAGENET["se_resnext50_32x4d"][0].endswith("se_resnext50_32x4d-a260b3a4.pth")
    assert "Cadene" in IMAGENET["se_resnext50_32x4d"][1] and "non-commercial" in IMAGENET["se_resnext50_32x4d"][1]


@pytest.mark.parametrize("channels", [1, 5])
def test_the_first_convolution_is_adapted_for_k_slab_channels(tmp_path, channels):
    path = _efficientnet_b0_file(tmp_path / "b0.pth")
    stem = torch.load(path, weights_only=True)["_conv_stem.weight"]
    net = build_network("flexible_unet", 2, channels, 1, backbone="efficientnet-b0")
    provenance = load_encoder(net, {"path": str(path), "sha256": _sha(path)}, "efficientnet-b0")
    expected = stem.sum(dim=1, keepdim=True) if channels == 1 else \
        torch.cat([stem, stem], dim=1)[:, :channels] * (3 / channels)  # timm's adapt_input_conv
    torch.testing.assert_close(net.encoder.state_dict()["_conv_stem.weight"], expected)
    assert provenance["adapted_input_conv"] == f"3 -> {channels} channels (timm's adapt_input_conv)"
    # the response to a constant image is kept where k is 1 or a multiple of 3 (timm's approximation otherwise)
    for k in (1, 6):
        torch.testing.assert_close(adapt_input_conv(stem, k).sum(dim=1), stem.sum(dim=1))


def test_refusals_are_one_line(tmp_path, monkeypatch):
    path = _efficientnet_b0_file(tmp_path / "b0.pth")
    net = build_network("flexible_unet", 2, 3, 1, backbone="efficientnet-b0")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    cases = []
    cases.append(({"path": str(path), "sha256": "0" * 64}, "sha256"))
    state = torch.load(path, weights_only=True)
    missing = dict(state)
    del missing["_blocks.3._bn1.weight"]
    torch.save(missing, tmp_path / "missing.pth")
    cases.append(({"path": str(tmp_path / "missing.pth"), "sha256": _sha(tmp_path / "missing.pth")},
                  "1 encoder tensor(s) missing (_blocks.3._bn1.weight"))
    extra = {**state, "extra.weight": torch.zeros(3)}
    torch.save(extra, tmp_path / "extra.pth")
    cases.append(({"path": str(tmp_path / "extra.pth"), "sha256": _sha(tmp_path / "extra.pth")}, "unknown to a"))
    resnet = _resnet50_file(tmp_path / "r50.pth")
    cases.append(({"path": str(resnet), "sha256": _sha(resnet)}, "does not fit efficientnet-b0"))
    monkeypatch.setenv("SLAB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SLAB_ALLOW_DOWNLOADS", raising=False)
    cases.append(("imagenet", "efficientnet-b0-355c32eb.pth is not in"))
    for spec, words in cases:
        with pytest.raises(SlabError) as err:
            load_encoder(net, spec, "efficientnet-b0")
        assert words in str(err.value) and "\n" not in str(err.value), str(err.value)
    # a file in the cache under the published name, but not the published file: its hash says so
    (tmp_path / "home" / "encoders").mkdir(parents=True)
    (tmp_path / "home" / "encoders" / "efficientnet-b0-355c32eb.pth").write_bytes(path.read_bytes())
    with pytest.raises(SlabError, match="the published file's starts 355c32eb"):
        load_encoder(net, "imagenet", "efficientnet-b0")
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # nothing loaded partially
    with pytest.raises(SlabError, match="pretrained encoders are 2D"):
        from slab.networks.pretrained import check_spec

        check_spec("imagenet", "efficientnet-b0", 3)
    with pytest.raises(SlabError, match="no ImageNet weights are published for 'resnet18'"):
        check_spec("imagenet", "resnet18", 2)  # MONAI's parameter-free shortcuts: torchvision's file cannot fit
    assert "efficientnet-b0" in IMAGENET and IMAGENET["resnet50"][0].endswith("resnet50-0676ba61.pth")


@pytest.mark.parametrize("offsets", [[0], [-1, 0, 1], [-2, -1, 0, 1, 2]])
def test_a_run_trains_from_the_encoder_records_it_and_predicts_without_it(tmp_path, offsets):
    from slab.pipeline.inference.ensemble import load_model
    from slab.pipeline.training import load_checkpoint, train
    from test_train import write_datalist

    datalist = write_datalist(tmp_path / "data", shape=(32, 32, 12))
    path = _efficientnet_b0_file(tmp_path / "b0.pth")
    spec = {"path": str(path), "sha256": _sha(path)}
    config = {"epochs": 1, "batch_size": 2, "samples_per_epoch": 4, "planes": ["xy"], "offsets": offsets,
              "patch_size": [32, 32], "progress": False, "val": {"thresholds": [0.5], "tolerance_mm": 1.0},
              "network": {"name": "flexible_unet", "backbone": "efficientnet-b0", "encoder_weights": spec}}
    out = tmp_path / "run"
    train(datalist, config, out, device="cpu")
    recorded = load_checkpoint(out / "best.pt")["network"]["encoder_weights"]
    assert recorded["sha256"] == _sha(path) and recorded["source"] == str(path) and recorded["tensors"] > 300
    assert ("adapted_input_conv" in recorded) == (len(offsets) != 3)
    assert json.loads((out / "network.json").read_text())["encoder_weights"]["sha256"] == _sha(path)
    path.unlink()  # prediction never reads the encoder's file: the checkpoint carries the weights
    from slab.io.volumes import load_volume

    # nor does a resumed run (it continues from last.pt's weights); its record stays the file's
    resumed = train(datalist, config, out, device="cpu", resume=True)  # the run is whole: nothing left to train
    assert len(resumed["history"]) == 1
    assert load_checkpoint(out / "last.pt")["network"]["encoder_weights"] == recorded
    # a bundle's export of the run carries the encoder's provenance beside the weights
    from slab.pipeline.bundle import export_training

    class Finished:
        def run(self):
            return resumed

    export_training(Finished(), tmp_path / "bundle" / "model.pt")
    exported = json.loads((tmp_path / "bundle" / "model.json").read_text())
    assert exported["encoder_weights"] == recorded and exported["threshold"] == resumed["threshold"]
    weights = torch.load(tmp_path / "bundle" / "model.pt", weights_only=True)
    assert weights.keys() == load_checkpoint(out / "best.pt")["model"].keys()

    items = json.loads(Path(datalist).read_text())["validation"]
    probabilities = load_model(out, device="cpu")(load_volume(items[0]["image"]))
    assert probabilities.shape[1:] == (32, 32, 12) and torch.isfinite(torch.as_tensor(probabilities)).all()


@pytest.mark.parametrize("backbone,writer", [("efficientnet-b0", _efficientnet_b0_file), ("resnet50", _resnet50_file)])
def test_the_slice_sequence_classifier_starts_from_a_published_file(tmp_path, backbone, writer):
    """The RSNA 2022 recipe's CNN + BiLSTM: its 2D encoder takes the same files; MONAI's ResNet
    shortcuts there carry a bias that torchvision's file does not have: zero, its function exactly."""
    from slab.pipeline.training.segmentation import build_model

    path = writer(tmp_path / "weights.pth")
    published = torch.load(path, weights_only=True)
    net = {"name": "sequence_classifier", "spatial_dims": 2, "in_channels": 5, "out_channels": 2,
           "backbone": backbone, "hidden_size": 8, "encoder_weights": {"path": str(path), "sha256": _sha(path)}}
    model = build_model(net)
    provenance = net["encoder_weights"]
    own = model.encoder.state_dict()
    for key, value in own.items():
        parts = key.split(".")
        source = ".".join(parts[:1] + parts[2:]) if parts[0] == "_blocks" else key
        if key.endswith("downsample.0.bias"):
            assert not value.any(), key
        elif key == ("_conv_stem.weight" if backbone.startswith("efficientnet") else "conv1.weight"):
            torch.testing.assert_close(value, torch.cat([published[source]] * 2, 1)[:, :5] * (3 / 5))
        elif not key.endswith("num_batches_tracked") or source in published:
            assert torch.equal(value, published[source]), key
    assert provenance["zero_biases" if backbone == "resnet50" else "tensors"] == (4 if backbone == "resnet50" else
                                                                              provenance["tensors"])
    assert provenance["adapted_input_conv"] == "3 -> 5 channels (timm's adapt_input_conv)"
    # a resumed run takes the checkpoint's record for the file: the file is not read again
    path.unlink()
    again = {**net, "encoder_weights": {"path": str(path), "sha256": "0" * 64}}
    build_model(again, resumed={"encoder_weights": provenance})
    assert again["encoder_weights"] == provenance
    with pytest.raises(SlabError, match="no ImageNet weights are published for 'resnet10'"):
        build_model({**net, "backbone": "resnet10", "encoder_weights": "imagenet"})
