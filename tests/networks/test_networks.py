"""networks: the factory over MONAI, the divisor, the slice-sequence classifier, weights."""
import pytest
import torch
from monai.networks import nets

from slab.networks import SliceSequenceClassifier, build_network, load_weights, network_divisor, save_weights
from slab.core.errors import SlabError

# Tiny configurations so every forward pass takes milliseconds.
TINY = {
    "unet": {"channels": (4, 8, 16), "strides": (2, 2)},
    "basic_unet": {"features": (4, 4, 8, 8, 16, 4)},
    "flexible_unet": {"backbone": "resnet10", "decoder_channels": (16, 8, 8, 4, 4)},
    "segresnet": {"init_filters": 8, "blocks_down": (1, 1, 1), "blocks_up": (1, 1)},
    "swin_unetr": {"feature_size": 12, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1)},
}
MONAI_CLASS = {
    "unet": nets.UNet,
    "basic_unet": nets.BasicUNet,
    "flexible_unet": nets.FlexibleUNet,
    "segresnet": nets.SegResNet,
    "swin_unetr": nets.SwinUNETR,
}


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", list(TINY))
def test_forward_keeps_spatial_size_at_divisor_multiples(name, dims):
    net = build_network(name, dims, in_channels=3, out_channels=2, **TINY[name]).eval()
    assert type(net) is MONAI_CLASS[name]
    div = network_divisor(name, dims, **TINY[name])
    size = (div, 2 * div, div)[:dims] if div >= 16 else (2 * div, 3 * div, 2 * div)[:dims]
    with torch.no_grad():
        out = net(torch.rand(1, 3, *size))
    assert out.shape == (1, 2, *size)


def test_divisor_known_values():
    assert network_divisor("unet", 2) == 8  # default strides (2, 2, 2)
    assert network_divisor("unet", 3, channels=(4, 8, 16, 32, 64), strides=(2, 2, 2, 2)) == 16
    assert network_divisor("unet", 2, channels=(4, 8, 16), strides=((2, 1), 2)) == 4  # lcm over axes of (4, 2)
    assert network_divisor("basic_unet", 3) == 16
    assert network_divisor("flexible_unet", 2, backbone="efficientnet-b3") == 32
    assert network_divisor("segresnet", 3) == 8  # MONAI default blocks_down (1, 2, 2, 4)
    assert network_divisor("segresnet", 3, blocks_down=[1, 1]) == 2
    assert network_divisor("swin_unetr", 3) == 32
    assert network_divisor("swin_unetr", 2, patch_size=1) == 1


def test_unet_divisor_is_needed():
    net = build_network("unet", 2, 1, 1, **TINY["unet"]).eval()
    with pytest.raises(RuntimeError):
        net(torch.rand(1, 1, 10, 8))  # 10 is not a multiple of 4


def test_defaults_and_json_lists():
    net = build_network("unet", 2, 3, 1)
    assert [m.out_channels for m in net.modules() if isinstance(m, torch.nn.Conv2d)][0] == 16
    net = build_network("unet", 2, 3, 1, channels=[4, 8], strides=[2])  # as JSON gives them
    assert isinstance(net, nets.UNet)
    assert build_network("swin_unetr", 2, 1, 1).swinViT.embed_dim == 12


def test_unknown_network_and_option_are_named():
    with pytest.raises(SlabError, match="unknown network 'vnet'.*unet, basic_unet"):
        build_network("vnet", 3, 1, 1)
    with pytest.raises(SlabError, match=r"unknown option 'chanels'; valid options: channels, strides"):
        build_network("unet", 2, 1, 1, chanels=(4, 8))
    with pytest.raises(SlabError, match="spatial_dims must be one of"):
        build_network("unet", 4, 1, 1)
    with pytest.raises(SlabError, match="pretrained"):
        build_network("flexible_unet", 2, 1, 1, pretrained=True)


def test_monai_rejection_becomes_slab_error():
    with pytest.raises(SlabError, match="swin_unetr.*divisible by 12"):
        build_network("swin_unetr", 3, 1, 1, feature_size=10)
    with pytest.raises(SlabError, match="flexible_unet"):
        build_network("flexible_unet", 2, 1, 1, backbone="vgg16")


@pytest.mark.parametrize("backbone", ["efficientnet-b0", "resnet10", "densenet121"])
def test_sequence_classifier_shapes(backbone):
    net = SliceSequenceClassifier(in_channels=3, backbone=backbone, hidden_size=8).eval()
    with torch.no_grad():
        slices, sequence = net(torch.rand(2, 5, 3, 32, 32))
    assert slices.shape == (2, 5)
    assert sequence.shape == (2, 1)


def test_sequence_classifier_through_factory_and_batch_independence():
    net = build_network(
        "sequence_classifier", 2, in_channels=2, out_channels=7, backbone="resnet10", hidden_size=8, dropout=0.0
    ).eval()
    assert isinstance(net, SliceSequenceClassifier)
    assert net.lstm.num_layers == 2 and net.lstm.bidirectional
    x = torch.rand(2, 4, 2, 32, 32)
    with torch.no_grad():
        slices, sequence = net(x)
        first_slices, first_sequence = net(x[:1])
    assert slices.shape == (2, 4, 7) and sequence.shape == (2, 7)
    # In eval mode each sequence is scored on its own: batching changes nothing.
    torch.testing.assert_close(slices[:1], first_slices, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(sequence[:1], first_sequence, atol=1e-5, rtol=1e-4)


def test_sequence_classifier_bad_input():
    with pytest.raises(SlabError, match="unknown encoder 'vgg'"):
        SliceSequenceClassifier(in_channels=1, backbone="vgg")
    with pytest.raises(SlabError, match="spatial_dims must be one of"):
        build_network("sequence_classifier", 3, 1, 1)
    net = SliceSequenceClassifier(in_channels=1, backbone="resnet10", hidden_size=4)
    with pytest.raises(SlabError, match=r"\(B, N, C, H, W\)"):
        net(torch.rand(2, 1, 32, 32))


def _tiny_unet(channels=(4, 8, 16)):
    return build_network("unet", 2, 1, 1, channels=channels, strides=(2, 2)).eval()


def test_weights_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    source, target = _tiny_unet(), _tiny_unet()
    path = save_weights(source, tmp_path / "w.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pt"]  # no temporary left behind
    load_weights(target, path)
    x = torch.rand(1, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(source(x), target(x))


def test_checkpoint_dict_key_and_ddp_prefix(tmp_path):
    source = _tiny_unet()
    state = source.state_dict()
    x = torch.rand(1, 1, 8, 8)
    with torch.no_grad():
        expected = source(x)
    variants = {
        "model.pt": ({"model": state, "epoch": torch.tensor(3)}, None),
        "ddp.pt": ({"module." + k: v for k, v in state.items()}, None),
        "custom.pt": ({"net": {"module." + k: v for k, v in state.items()}}, "net"),
    }
    for name, (obj, key) in variants.items():
        torch.save(obj, tmp_path / name)
        target = load_weights(_tiny_unet(), tmp_path / name, key=key)
        with torch.no_grad():
            assert torch.equal(target(x), expected), name
    # Saving a DDP-style wrapper writes plain keys.
    wrapped = torch.nn.DataParallel(source)
    save_weights(wrapped, tmp_path / "plain.pt")
    assert set(torch.load(tmp_path / "plain.pt", weights_only=True)) == set(state)


def test_mismatched_checkpoint_names_keys_and_shapes(tmp_path):
    state = _tiny_unet().state_dict()
    first, missing = list(state)[0], list(state)[-1]
    del state[missing]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(SlabError) as err:
        load_weights(_tiny_unet(), tmp_path / "bad.pt")
    message = str(err.value)
    assert "bad.pt" in message and "\n" not in message
    assert f"missing keys [{missing}]" in message
    assert "unexpected keys [extra.weight]" in message
    # Another configuration: every conv has another shape.
    torch.save(_tiny_unet(channels=(8, 8, 16)).state_dict(), tmp_path / "other.pt")
    with pytest.raises(SlabError, match=rf"shape mismatches \(file vs network\) \[{first} \(8, 1, 3, 3\) vs \(4, 1, 3, 3\)"):
        load_weights(_tiny_unet(), tmp_path / "other.pt")
    # A long list is cut short.
    torch.save(build_network("basic_unet", 2, 1, 1, features=(4, 4, 8, 8, 16, 4)).state_dict(), tmp_path / "b.pt")
    with pytest.raises(SlabError, match=r"\(\+\d+ more\)"):
        load_weights(_tiny_unet(), tmp_path / "b.pt")


def test_missing_and_non_torch_files(tmp_path):
    with pytest.raises(SlabError, match="nope.pt: no such weights file"):
        load_weights(_tiny_unet(), tmp_path / "nope.pt")
    (tmp_path / "text.pt").write_text("not weights", encoding="utf-8")
    with pytest.raises(SlabError, match="text.pt: not a torch weights file"):
        load_weights(_tiny_unet(), tmp_path / "text.pt")
    torch.save({"model": {"a": 1}}, tmp_path / "odd.pt")
    with pytest.raises(SlabError, match="odd.pt: no state dict of tensors"):
        load_weights(_tiny_unet(), tmp_path / "odd.pt")
    torch.save(_tiny_unet().state_dict(), tmp_path / "w.pt")
    with pytest.raises(SlabError, match="no key 'ema'"):
        load_weights(_tiny_unet(), tmp_path / "w.pt", key="ema")


def test_arbitrary_pickles_are_refused(tmp_path):
    torch.save({"model": _tiny_unet()}, tmp_path / "pickled.pt")  # a whole module, not weights
    with pytest.raises(SlabError, match="pickled.pt: not a torch weights file"):
        load_weights(_tiny_unet(), tmp_path / "pickled.pt")


def test_sequence_classifier_widen_factor_scales_the_resnet():
    full = SliceSequenceClassifier(in_channels=3, backbone="resnet10", hidden_size=8)
    narrow = SliceSequenceClassifier(in_channels=3, backbone="resnet10", hidden_size=8, widen_factor=0.25)
    encoder = [sum(p.numel() for p in n.encoder.parameters()) for n in (full, narrow)]
    assert 12 < encoder[0] / encoder[1] < 20  # about 1/16: widths times 1/4, weights times 1/16
    assert narrow.lstm.input_size == 128 and narrow(torch.zeros(1, 4, 3, 32, 32))[0].shape == (1, 4)
    for bad, backbone in ((0, "resnet10"), (0.001, "resnet10"), (True, "resnet10"), (0.5, "efficientnet-b0")):
        with pytest.raises(SlabError, match="widen_factor"):
            SliceSequenceClassifier(in_channels=3, backbone=backbone, widen_factor=bad)


@pytest.mark.parametrize("name,options", [("flexible_unet", {"backbone": "efficientnet-b0"}),
                                          ("flexible_unet", {"backbone": "se_resnext50_32x4d"}),
                                          ("sequence_classifier", {"backbone": "efficientnet-b0"})])
def test_batch_norms_keep_pace_with_a_short_schedule(name, options):
    """MONAI's EfficientNet batch norms come at TensorFlow's momentum 0.01; slab builds every one at
    PyTorch's 0.1. Known answer: after 30 train-mode passes over batches of mean 3, the first
    norm's running mean is 3 (1 - 0.9^30) = 2.87 (at 0.01 it would be 3 (1 - 0.99^30) = 0.78)."""
    from monai.networks.nets.efficientnet import EfficientNetBN

    reference = EfficientNetBN("efficientnet-b0", pretrained=False, spatial_dims=2, in_channels=3)
    assert {m.momentum for m in reference.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.01}
    net = build_network(name, 2, 3, 1, **options)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and {m.momentum for m in norms} == {0.1}
    norm = norms[0]
    norm.train()
    with torch.no_grad():
        for _ in range(30):
            norm(torch.full((4, norm.num_features, 5, 5), 3.0) + torch.randn(4, norm.num_features, 5, 5) * 1e-3)
    torch.testing.assert_close(norm.running_mean, torch.full_like(norm.running_mean, 3 * (1 - 0.9 ** 30)),
                               atol=1e-3, rtol=0)
