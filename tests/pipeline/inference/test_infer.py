"""Inference engines against known answers: exact flip equivariance, a per-slice reference loop,
analytic networks, the on-disk path against the in-memory one, MONAI's sliding window direct."""
import itertools

import numpy as np
import pytest
import torch
import torch.nn as nn
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference

from slab.networks import build_network, network_divisor, save_weights
from slab.core.device import cpu_supports_bf16
from slab.pipeline.inference import Predictor, predict_2p5d, predict_3d, predict_file
from slab.core.errors import SlabError
from slab.transforms.intensity import PercentileNormalize
from slab.io.volumes import load_volume, save_volume
from slab.transforms.post import postprocess
from slab.transforms.slabs import PLANE_AXIS, extract_slab, pad_to_divisor, unpad

ALL_FLIPS = [dims for r in (1, 2, 3) for dims in itertools.combinations((1, 2, 3), r)]
UNET = {"name": "unet", "spatial_dims": 2, "in_channels": 3, "out_channels": 2, "channels": [4, 8], "strides": [2]}


def tiny_unet(in_channels=3, out_channels=2, seed=0):
    torch.manual_seed(seed)
    return build_network("unet", 2, in_channels, out_channels, channels=(4, 8), strides=(2,))


def select_channel(channel: int, in_channels: int = 3, sign: float = 1.0) -> nn.Conv2d:
    """A 1x1 convolution whose logit is ``sign`` times input channel ``channel``."""
    conv = nn.Conv2d(in_channels, 1, 1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, channel] = sign
        conv.bias.zero_()
    return conv


class TwoLabels(nn.Module):
    """Label 0: the centre slice; label 1: minus the slice before it (offset -1)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = select_channel(1), select_channel(0, sign=-1.0)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], 1)


def shifted(v: torch.Tensor, axis: int) -> torch.Tensor:
    """``v`` at index ``i - 1`` along spatial ``axis``, clamped at 0."""
    n = v.shape[axis + 1]
    index = torch.clamp(torch.arange(n) - 1, min=0)
    return v.index_select(axis + 1, index)


# ---------------------------------------------------------------------------------------------
# 2.5D


@pytest.mark.parametrize("tta", ["flips", "full"])
def test_flip_tta_is_exactly_equivariant(tta):
    # Two image channels (slab channels reversed per block of k), a shape no axis of which is a
    # multiple of the divisor (padding is asymmetric), an untrained network.
    net = tiny_unet(in_channels=6)
    v = torch.randn(2, 11, 9, 7)
    p = predict_2p5d(net, v, tta=tta, divisor=2)
    for dims in ALL_FLIPS:
        q = predict_2p5d(net, v.flip(dims), tta=tta, divisor=2)
        torch.testing.assert_close(q, p.flip(dims), atol=2e-6, rtol=0)
    # Without TTA the network is not equivariant: the test can tell.
    plain = predict_2p5d(net, v, divisor=2)
    assert (predict_2p5d(net, v.flip((1,)), divisor=2) - plain.flip((1,))).abs().max() > 1e-3


def test_full_tta_is_equivariant_to_swapping_axes_of_a_square_plane():
    # x <-> y maps the xy images to their transposes and swaps the zx and zy planes.
    net = tiny_unet()
    v = torch.randn(1, 8, 8, 6)
    p = predict_2p5d(net, v, tta="full", divisor=2)
    q = predict_2p5d(net, v.transpose(1, 2), tta="full", divisor=2)
    torch.testing.assert_close(q, p.transpose(1, 2), atol=2e-6, rtol=0)


def test_full_tta_on_non_square_planes_matches_explicit_views():
    # A plane of 6 x 10: the transposed views are 10 x 6 images, padded and cropped on their own.
    net = tiny_unet(out_channels=1)
    v = torch.randn(1, 6, 10, 5)
    got = predict_2p5d(net, v, planes=("xy",), tta="full", divisor=4)
    expected = torch.zeros(1, 6, 10, 5)
    with torch.no_grad():
        for z in range(5):
            for sign in (1, -1):
                slab = extract_slab(v, z, "xy", (-sign, 0, sign))[None]
                for transpose in (False, True):
                    for dims in ((), (-2,), (-1,), (-2, -1)):
                        x = slab.transpose(-2, -1) if transpose else slab
                        x = x.flip(dims) if dims else x
                        padded, pads = pad_to_divisor(x, 4)
                        y = unpad(net(padded), pads)
                        y = y.flip(dims) if dims else y
                        y = y.transpose(-2, -1) if transpose else y
                        expected[:, :, :, z] += torch.sigmoid(y[0])
    torch.testing.assert_close(got, expected / 16, atol=1e-6, rtol=0)


@pytest.mark.parametrize("plane", ["xy", "zx", "zy"])
def test_single_plane_equals_a_per_slice_loop(plane):
    net = tiny_unet().eval()
    v = torch.randn(1, 10, 7, 9)
    offsets = (0, 1, 3)  # forward offsets, clamped at the far edge
    got = predict_2p5d(net, v, planes=(plane,), offsets=offsets, batch_size=4, divisor=4)
    axis = PLANE_AXIS[plane]
    expected = torch.empty(2, 10, 7, 9)
    with torch.no_grad():
        for i in range(v.shape[axis + 1]):
            padded, pads = pad_to_divisor(extract_slab(v, i, plane, offsets)[None], 4)
            probs = torch.sigmoid(unpad(net(padded), pads))[0]  # (L, A, B), A and B in volume order
            expected.select(axis + 1, i).copy_(probs)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_centre_channel_network_gives_sigmoid_of_the_volume_for_any_plane_and_tta():
    v = torch.randn(1, 9, 8, 7)
    for tta in ("none", "flips", "full"):
        got = predict_2p5d(select_channel(1), v, tta=tta)
        torch.testing.assert_close(got, torch.sigmoid(v), atol=1e-6, rtol=0)


def test_multi_plane_average_puts_each_plane_back_in_its_orientation():
    # Label 1 reads the slice before the centre: a different volume per plane, known exactly.
    v = torch.randn(1, 9, 8, 7)
    got = predict_2p5d(TwoLabels(), v, batch_size=3)
    expected_1 = sum(torch.sigmoid(-shifted(v, axis)) for axis in (2, 1, 0)) / 3
    torch.testing.assert_close(got[0:1], torch.sigmoid(v), atol=1e-6, rtol=0)
    torch.testing.assert_close(got[1:2], expected_1, atol=1e-6, rtol=0)
    two = predict_2p5d(TwoLabels(), v, planes="zx,zy")
    torch.testing.assert_close(two[1:2], (torch.sigmoid(-shifted(v, 1)) + torch.sigmoid(-shifted(v, 0))) / 2,
                               atol=1e-6, rtol=0)


def test_metatensor_geometry_and_numpy_input():
    affine = torch.tensor([[0.0, 0.8, 0, -10], [-0.8, 0, 0, 20], [0, 0, 2.5, 3], [0, 0, 0, 1]], dtype=torch.float64)
    v = MetaTensor(torch.randn(1, 6, 5, 4), affine=affine, meta={"filename_or_obj": "case.nii.gz"})
    got = predict_2p5d(select_channel(1), v)
    assert isinstance(got, MetaTensor) and got.dtype == torch.float32
    torch.testing.assert_close(got.affine, affine)
    plain = predict_2p5d(select_channel(1), v.as_tensor().numpy())
    assert not isinstance(plain, MetaTensor)
    torch.testing.assert_close(plain, got.as_tensor())


@pytest.fixture
def stack(tmp_path, rng):
    """A uint16 (1, 13, 11, 17) volume as a TIFF slice stack."""
    data = rng.integers(0, 4000, (1, 13, 11, 17)).astype(np.uint16)
    save_volume(data, tmp_path / "stack")
    return tmp_path / "stack", data


def scaled(block):
    return block.to(torch.float32) / 4000


@pytest.mark.parametrize("tta", ["none", "flips"])
def test_on_disk_path_equals_in_memory(stack, tmp_path, tta):
    path, data = stack
    net = tiny_unet()
    lazy = load_volume(path, lazy=True)
    memory = predict_2p5d(net, torch.from_numpy(data), tta=tta, batch_size=4, divisor=2, preprocess=scaled)
    # A budget of one byte: blocks of one batch (4 slices) plus the halo, sums on disk.
    exact = predict_2p5d(net, lazy, tta=tta, batch_size=4, divisor=2, preprocess=scaled, memory_budget=1,
                         out_dtype="float32")
    assert torch.equal(exact.as_tensor(), memory)
    np.testing.assert_array_equal(exact.affine.numpy(), lazy.affine)
    half = predict_2p5d(net, lazy, tta=tta, batch_size=4, divisor=2, preprocess=scaled, memory_budget=1,
                        out_path=tmp_path / "probs.npy")
    assert half.dtype == torch.float16
    assert torch.equal(half.as_tensor(), memory.half())
    np.testing.assert_array_equal(np.load(tmp_path / "probs.npy"), memory.half().numpy())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probs.npy", "stack"]


def test_memory_budget_moves_an_in_memory_volume_to_disk():
    v = torch.randn(2, 9, 8, 7)
    net = tiny_unet(in_channels=6)
    memory = predict_2p5d(net, v, divisor=2)
    small = predict_2p5d(net, v, divisor=2, memory_budget=10_000, out_dtype="float32", batch_size=2)
    large = predict_2p5d(net, v, divisor=2, memory_budget=10**9)
    # Over budget: blocks of 2 slices, a Fortran-order .npy map (x fastest); within it: in memory.
    assert small.permute(3, 2, 1, 0).is_contiguous()
    assert torch.equal(small, predict_2p5d(net, v, divisor=2, batch_size=2))
    assert torch.equal(large, memory)


@pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no bfloat16 instructions")
def test_cpu_bf16_agrees_with_fp32():
    torch.manual_seed(0)
    net = build_network("unet", spatial_dims=2, in_channels=3, out_channels=1, channels=(8, 16), strides=(2,))
    volume = torch.rand(1, 12, 10, 9)
    fp32 = predict_2p5d(net, volume, device="cpu", amp="fp32", divisor=2)
    bf16 = predict_2p5d(net, volume, device="cpu", amp="bf16", divisor=2)
    assert bf16.dtype == torch.float32 and not torch.equal(fp32, bf16)  # computed in bfloat16 ...
    assert float((fp32 - bf16).abs().max()) < 2e-2  # ... and close to float32


def test_compile_failure_falls_back_to_eager(monkeypatch):
    import slab.pipeline.inference.forward as forward
    from slab.core.errors import SlabWarning

    def broken(model, **kwargs):
        def call(x):
            raise RuntimeError("inductor: no C++ compiler\nsecond line")
        return call

    net = nn.Conv2d(3, 1, 3, padding=1)
    volume = torch.rand(1, 6, 7, 5)
    expected = predict_2p5d(net, volume, device="cpu")
    monkeypatch.setattr(forward.torch, "compile", broken)
    with pytest.warns(SlabWarning, match="torch.compile is unavailable here .RuntimeError: inductor: no C.. compiler."):
        got = predict_2p5d(net, volume, device="cpu", compile=True)
    assert torch.equal(got, expected)


@pytest.mark.slow
def test_compiled_network_gives_the_eager_result():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 1))
    volume = torch.rand(1, 8, 8, 6)
    torch.testing.assert_close(predict_2p5d(net, volume, planes=("xy",), device="cpu", compile=True),
                               predict_2p5d(net, volume, planes=("xy",), device="cpu"), atol=1e-5, rtol=1e-5)


def test_bad_arguments_and_nan_are_refused():
    v = torch.randn(1, 6, 6, 6)
    with pytest.raises(SlabError, match="planes: unknown plane 'xz'"):
        predict_2p5d(select_channel(1), v, planes=("xy", "xz"))
    with pytest.raises(SlabError, match="tta: expected one of none, flips, full"):
        predict_2p5d(select_channel(1), v, tta="rotate")
    with pytest.raises(SlabError, match="tta: expected one of none, flips"):
        predict_3d(nn.Conv3d(1, 1, 1), v, roi_size=(4, 4, 4), tta="full")
    v[0, 3, 2, 1] = float("nan")
    with pytest.raises(SlabError, match="NaN"):
        predict_2p5d(select_channel(1), v)
    with pytest.raises(SlabError, match="NaN"):
        predict_3d(nn.Conv3d(1, 1, 1), v, roi_size=(4, 4, 4))


# ---------------------------------------------------------------------------------------------
# 3D


def tiny_unet3d():
    torch.manual_seed(0)
    return build_network("unet", 3, 1, 2, channels=(4, 8), strides=(2,)).eval()


def test_3d_equals_monai_sliding_window_direct():
    net = tiny_unet3d()
    v = torch.randn(1, 20, 18, 13)
    got = predict_3d(net, v, roi_size=(8, 8, 8), overlap=0.5, mode="gaussian", sw_batch_size=3)
    with torch.no_grad():
        direct = torch.sigmoid(sliding_window_inference(v[None], (8, 8, 8), 3, net, overlap=0.5, mode="gaussian"))
    assert torch.equal(got, direct[0])


def test_3d_flips_average_the_eight_mirrored_predictions():
    net = tiny_unet3d()
    v = torch.randn(1, 12, 10, 9)
    got = predict_3d(net, v, roi_size=(8, 8, 8), tta="flips")
    expected = torch.zeros(2, 12, 10, 9)
    with torch.no_grad():
        for dims in [()] + ALL_FLIPS:
            x = v.flip(dims) if dims else v
            y = torch.sigmoid(sliding_window_inference(x[None], (8, 8, 8), 4, net, overlap=0.5, mode="gaussian"))
            expected += y[0].flip(dims) if dims else y[0]
    torch.testing.assert_close(got, expected / 8, atol=1e-6, rtol=0)
    torch.testing.assert_close(predict_3d(net, v.flip((2,)), roi_size=(8, 8, 8), tta="flips"), got.flip((2,)),
                               atol=2e-6, rtol=0)


def test_3d_input_smaller_than_the_roi_is_padded_and_cropped_back():
    net = tiny_unet3d()
    v = torch.randn(1, 5, 8, 3)
    got = predict_3d(net, v, roi_size=(8, 8, 8))
    assert got.shape == (2, 5, 8, 3)
    # The reference: pad to the ROI (split around the input, as MONAI does), predict, crop back.
    padded = torch.nn.functional.pad(v, (2, 3, 0, 0, 1, 2))
    with torch.no_grad():
        whole = torch.sigmoid(sliding_window_inference(padded[None], (8, 8, 8), 4, net, mode="gaussian", overlap=0.5))
    torch.testing.assert_close(got, whole[0, :, 1:6, :, 2:5], atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# Predictor and files


def test_predictor_splits_inference_keys_and_checks_channels(tmp_path):
    config = {**UNET, "offsets": [0, 1, 2], "planes": ["xy"]}
    predictor = Predictor(config, normalize=None)
    assert predictor.offsets == (0, 1, 2) and predictor.planes == ("xy",) and predictor.mode == "2.5d"
    assert predictor.divisor == network_divisor("unet", 2, channels=[4, 8], strides=[2])
    v = torch.rand(1, 8, 6, 5)
    expected = predict_2p5d(predictor.model, v, planes=("xy",), offsets=(0, 1, 2), divisor=2)
    torch.testing.assert_close(predictor(v), expected, atol=0, rtol=0)
    with pytest.raises(SlabError, match=r"image: 2 channel\(s\) x 3 offsets = 6 slab channels; the network takes 3"):
        predictor(torch.rand(2, 8, 6, 5))
    with pytest.raises(SlabError, match="do not divide"):
        Predictor(UNET, normalize=None)(torch.rand(2, 8, 6, 5))
    with pytest.raises(SlabError, match="roi_size"):
        Predictor({**UNET, "spatial_dims": 3, "in_channels": 1})
    with pytest.raises(SlabError, match="postprocess: .*unexpected keyword argument 'thresh'"):
        Predictor(UNET, postprocess={"thresh": 0.3})


def test_predictor_3d_normalises_and_slides():
    config = {"name": "unet", "spatial_dims": 3, "in_channels": 1, "out_channels": 1, "channels": [4, 8],
              "strides": [2], "roi_size": [8, 8, 8]}
    predictor = Predictor(config, tta="flips", overlap=0.25)
    assert predictor.mode == "3d" and predictor.roi_size == (8, 8, 8)
    affine = torch.diag(torch.tensor([0.5, 0.5, 2.0, 1.0], dtype=torch.float64))
    v = MetaTensor(torch.rand(1, 10, 9, 8) * 1000, affine=affine)
    got = predictor(v)
    expected = predict_3d(predictor.model, PercentileNormalize()(v), roi_size=(8, 8, 8), overlap=0.25, tta="flips")
    assert torch.equal(got.as_tensor(), expected.as_tensor())
    torch.testing.assert_close(got.affine, affine)
    with pytest.raises(SlabError, match=r"image: 2 channel\(s\); the network takes 1"):
        predictor(torch.rand(2, 10, 9, 8))
    with pytest.raises(SlabError, match="roi_size: expected three multiples of the network's divisor 2"):
        Predictor({**config, "roi_size": [8, 7, 8]})


def test_predictor_weights_must_match_the_network(tmp_path):
    save_weights(tiny_unet(), tmp_path / "ok.pt")
    assert Predictor(UNET, tmp_path / "ok.pt") is not None
    save_weights(build_network("unet", 2, 3, 2, channels=(4, 8, 16), strides=(2, 2)), tmp_path / "other.pt")
    with pytest.raises(SlabError, match="weights do not match the network: .*unexpected keys"):
        Predictor(UNET, tmp_path / "other.pt")
    with pytest.raises(SlabError, match="no such weights file"):
        Predictor(UNET, tmp_path / "missing.pt")


def test_predict_file_lazy_equals_eager(stack, tmp_path):
    path, data = stack
    eager = Predictor({**UNET, "out_channels": 1}, postprocess={"threshold": 0.5, "min_size": 2})
    lazy = Predictor({**UNET, "out_channels": 1}, postprocess={"threshold": 0.5, "min_size": 2}, memory_budget=1)
    lazy.model.load_state_dict(eager.model.state_dict())
    a = predict_file(path, tmp_path / "a.nii.gz", eager, prob_path=tmp_path / "pa.nii.gz")
    b = predict_file(path, tmp_path / "b", lazy, prob_path=tmp_path / "pb")
    mask_a, mask_b = load_volume(a["mask"]), load_volume(b["mask"])
    assert mask_a.dtype == torch.uint8 and torch.equal(mask_a * 255, mask_b)  # a stack holds 0/255
    prob_a, prob_b = load_volume(a["prob"]), load_volume(b["prob"])
    assert prob_a.dtype == torch.float32 and prob_b.dtype == torch.float16
    assert torch.equal(prob_a.half(), prob_b)
    # The reference: normalise, predict, threshold, small components, by hand.
    probs = predict_2p5d(eager.model, PercentileNormalize()(torch.from_numpy(data)), divisor=2)
    np.testing.assert_array_equal(mask_a.numpy(), postprocess(probs.numpy(), threshold=0.5, min_size=2))


# ---------------------------------------------------------------------------------------------
# Slice sequences


def tiny_classifier(seed=0):
    torch.manual_seed(seed)
    return build_network("sequence_classifier", 2, 3, 1, backbone="resnet10", hidden_size=4, num_layers=1,
                         dropout=0.0)


def vertebrae(shape=(16, 18, 20)):
    rng = np.random.default_rng(0)
    volume = rng.random((1, *shape), dtype=np.float32)
    label = np.zeros((1, *shape), np.uint8)
    label[0, 2:12, 3:15, 1:9] = 1
    label[0, 4:14, 2:10, 12:19] = 3  # value 2 (C2) is absent: no sequence for it
    return volume, label


SEQ = {"n_slabs": 5, "offsets": (-1, 0, 1), "plane": "xy", "size": (16, 16), "crop_margin": 0.1}


def test_predict_sequences_equals_a_manual_forward_of_the_built_sequences():
    from slab.pipeline.data.sequences import build_sequence, slab_centres, volume_sequences
    from slab.pipeline.inference import predict_sequences

    model = tiny_classifier()
    volume, label = vertebrae()
    targets = ["C1", "C2", "C3"]
    out = predict_sequences(model, volume, label, targets=targets, batch_size=1, device="cpu", **SEQ)
    assert list(out) == ["C1", "C3"]
    sequences = volume_sequences(volume, label, targets=targets, **SEQ)
    model.eval()
    with torch.no_grad():
        slice_logits, seq_logits = model(torch.stack([s["slabs"].float() for s in sequences]))
    for i, s in enumerate(sequences):
        got = out[s["target"]]
        assert isinstance(got["probability"], float)
        assert got["probability"] == pytest.approx(float(torch.sigmoid(seq_logits[i, 0])), abs=1e-6)
        np.testing.assert_allclose(got["slice_probabilities"], torch.sigmoid(slice_logits[i]).numpy(), atol=1e-6)
        np.testing.assert_array_equal(got["slices"], s["slices"])
    # np.rint(linspace(1, 8, 5)) and np.rint(linspace(12, 18, 5)): each target's own slice range
    assert out["C1"]["slices"].tolist() == [1, 3, 4, 6, 8] and out["C3"]["slices"].tolist() == [12, 14, 15, 16, 18]

    # no label: one sequence over the whole volume; a MetaTensor as loaded
    whole = predict_sequences(model, MetaTensor(torch.from_numpy(volume), affine=torch.eye(4)), device="cpu", **SEQ)
    assert list(whole) == ["patient_overall"]
    centres = slab_centres(0, 19, 5)
    assert whole["patient_overall"]["slices"].tolist() == centres.tolist() == [0, 5, 10, 14, 19]
    with torch.no_grad():
        slice_logits, seq_logits = model(build_sequence(volume, centres, "xy", (-1, 0, 1), (16, 16)).float()[None])
    assert whole["patient_overall"]["probability"] == pytest.approx(float(torch.sigmoid(seq_logits[0, 0])), abs=1e-6)
    np.testing.assert_allclose(whole["patient_overall"]["slice_probabilities"], torch.sigmoid(slice_logits[0]),
                               atol=1e-6)


def test_score_sequences_batches_do_not_change_the_result():
    from slab.pipeline.data.sequences import volume_sequences
    from slab.pipeline.inference import score_sequences

    volume, label = vertebrae()
    slabs = [s["slabs"] for s in volume_sequences(volume, label, targets=["C1", "C2", "C3"], **SEQ)] * 2
    one, one_slices = score_sequences(tiny_classifier(), slabs, batch_size=1, device="cpu")
    all_, all_slices = score_sequences(tiny_classifier(), slabs, batch_size=4, device="cpu")
    assert one.shape == (4, 1) and one_slices.shape == (4, 5)
    torch.testing.assert_close(one, all_, atol=1e-6, rtol=0)
    torch.testing.assert_close(one_slices, all_slices, atol=1e-6, rtol=0)
    empty, empty_slices = score_sequences(tiny_classifier(), [], device="cpu")
    assert empty.numel() == 0 and empty_slices.numel() == 0


def test_predict_sequences_bad_input():
    from slab.pipeline.inference import predict_sequences

    model = tiny_classifier()
    volume, label = vertebrae()
    bad = volume.copy()
    bad[0, 1, 1, 1] = np.nan
    with pytest.raises(SlabError, match="NaN"):
        predict_sequences(model, bad, device="cpu", **SEQ)
    with pytest.raises(SlabError, match="^volume: expected shape"):
        predict_sequences(model, volume[0], device="cpu", **SEQ)
    with pytest.raises(SlabError, match="^label:"):
        predict_sequences(model, volume, label[:, :8], targets=["C1"], device="cpu", **SEQ)
    with pytest.raises(SlabError, match="^targets:"):
        predict_sequences(model, volume, label, device="cpu", **SEQ)
    with pytest.raises(SlabError, match="^size:"):
        predict_sequences(model, volume, device="cpu", **{**SEQ, "size": (16,)})
    with pytest.raises(SlabError, match="^n_slabs:"):
        predict_sequences(model, volume, device="cpu", **{**SEQ, "n_slabs": 0})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_predict_sequences_on_cuda_with_amp_matches_cpu():
    from slab.pipeline.inference import predict_sequences

    volume, label = vertebrae()
    cpu = predict_sequences(tiny_classifier(), volume, label, targets=["C1", "C2", "C3"], device="cpu", **SEQ)
    gpu = predict_sequences(tiny_classifier(), volume, label, targets=["C1", "C2", "C3"], device="cuda", amp=True,
                            **SEQ)
    assert list(gpu) == list(cpu)
    for key in cpu:
        assert gpu[key]["probability"] == pytest.approx(cpu[key]["probability"], abs=2e-2)
        np.testing.assert_allclose(gpu[key]["slice_probabilities"], cpu[key]["slice_probabilities"], atol=2e-2)


def test_multiscale_inference_averages_resampled_predictions():
    import torch.nn.functional as F

    from slab.pipeline.inference import Predictor

    torch.manual_seed(0)
    config = {"name": "unet", "spatial_dims": 2, "in_channels": 3, "out_channels": 1, "channels": [4, 8],
              "strides": [2]}
    predictor = Predictor(config, None, device="cpu", planes=["xy"])
    rng = np.random.default_rng(0)
    volume = torch.from_numpy(rng.random((1, 12, 10, 8)).astype(np.float32))
    plain = predictor(volume)
    same = Predictor(config, None, device="cpu", planes=["xy"], scales=[1])
    same.model.load_state_dict(predictor.model.state_dict())
    assert torch.equal(same(volume), plain)
    predictor.scales = (1.0, 1.5)
    both = predictor(volume)
    # by hand: the volume resampled by 1.5, predicted with the original's normalisation, resampled back
    preprocess = predictor.preprocess(volume)
    up = F.interpolate(volume[None], size=[18, 15, 12], mode="trilinear", align_corners=False)[0]
    from slab.pipeline.inference.multiplane import predict_2p5d

    p15 = predict_2p5d(predictor.model, up, planes=["xy"], offsets=(-1, 0, 1), device="cpu", divisor=predictor.divisor,
                       min_size=predictor.min_size, preprocess=preprocess)
    back = F.interpolate(p15[None].float(), size=(12, 10, 8), mode="trilinear", align_corners=False)[0]
    torch.testing.assert_close(both, (plain + back) / 2, atol=1e-6, rtol=0)
    with pytest.raises(SlabError, match="scales"):
        Predictor(config, None, device="cpu", scales=[0.1])


def test_a_checked_target_is_not_contradicted(tmp_path):
    """predict_file with a Target checked already takes its probabilities' path from it: another
    prob_path beside it is one line, before anything is read or written."""
    from slab.core.errors import SlabError
    from slab.pipeline.inference.files import check_target, predict_file

    target = check_target(tmp_path / "mask.nii.gz", prob_path=tmp_path / "p.nii.gz")
    assert (target.layout, target.format, target.prob_format) == ("volume", "nifti", "nifti")
    with pytest.raises(SlabError, match="prob_path: .*other.nii.gz differs"):
        predict_file(tmp_path / "missing.nii.gz", target, None, prob_path=tmp_path / "other.nii.gz")
    assert list(tmp_path.iterdir()) == []
