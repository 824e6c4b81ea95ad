"""Any volume size through every network family, 2.5D and 3D, every TTA mode, one and three
planes, in memory and on disk (property-based): the output has the input's shape and geometry,
and equals a reference computed slice by slice (2.5D) or by MONAI's sliding window (3D).

Sizes are drawn from 1..70 per axis (odd, prime, one-slice volumes, volumes smaller than the
slab, the network's divisor or the ROI). The networks are the README's families, built tiny.
"""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference

from slab.networks import build_network, network_divisor, network_min_size
from slab.pipeline.inference import Predictor, predict_2p5d
from slab.transforms.slabs import extract_slab, pad_to_divisor, unpad

# Each family small enough to run hundreds of slabs in a second or two.
FAMILIES = {
    "unet": {"channels": [2, 4, 8], "strides": [2, 2], "num_res_units": 0},
    "basic_unet": {"features": [2, 2, 2, 2, 2, 2]},
    "flexible_unet": {"backbone": "resnet10", "decoder_channels": [2, 2, 2, 2, 2]},
    "segresnet": {"init_filters": 8, "blocks_down": [1, 1], "blocks_up": [1]},
    "swin_unetr": {"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]},
}
# The heavier encoders see fewer and smaller volumes so that the suite stays fast.
LIMITS = {"unet": (70, 12), "basic_unet": (70, 6), "segresnet": (70, 8), "flexible_unet": (24, 3),
          "swin_unetr": (24, 3)}
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None)


def config(name: str, dims: int, in_channels: int = 3, out_channels: int = 1) -> dict:
    return {"name": name, "spatial_dims": dims, "in_channels": in_channels, "out_channels": out_channels,
            **FAMILIES[name]}


def oblique_affine(spacing, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    rotation = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    affine[:3, 3] = (-12.5, 40.0, 3.25)
    return affine


def volume_of(shape, seed: int, spacing=(0.8, 0.8, 2.5), angle: float = 0.4) -> MetaTensor:
    data = torch.from_numpy(np.random.default_rng(seed).random((1, *shape), dtype=np.float32))
    return MetaTensor(data, affine=torch.as_tensor(oblique_affine(spacing, angle)))


def reference_xy(model, volume: np.ndarray, offsets, divisor: int, min_size: int) -> np.ndarray:
    """The xy plane predicted one slice at a time, padded and cropped by hand."""
    out = []
    with torch.inference_mode():
        for z in range(volume.shape[3]):
            slab = torch.from_numpy(extract_slab(volume, "xy", z, offsets))[None]
            x, pads = pad_to_divisor(slab, divisor, min_size=min_size)
            out.append(unpad(model(x), pads).sigmoid()[0].numpy())
    return np.stack(out, axis=-1)


def check_2p5d(name, shape, tta, planes, on_disk, offsets):
    torch.manual_seed(0)
    predictor = Predictor(config(name, 2), tta=tta, planes=planes, offsets=offsets, normalize=None,
                          memory_budget=(1 << 16) if on_disk else None, batch_size=4)
    volume = volume_of(shape, seed=sum(shape))
    probs = predictor(volume)
    assert tuple(probs.shape) == (1, *shape)
    assert np.allclose(np.asarray(probs.affine), np.asarray(volume.affine))
    values = np.asarray(probs, dtype=np.float32)
    assert np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1
    if planes == ["xy"] and tta == "none":
        expected = reference_xy(predictor.model, np.asarray(volume), offsets, predictor.divisor, predictor.min_size)
        np.testing.assert_allclose(values, expected, atol=1e-3 if on_disk else 1e-5)
    if on_disk:  # the on-disk result is the in-memory one, rounded to float16
        in_memory = Predictor(config(name, 2), tta=tta, planes=planes, offsets=offsets, normalize=None,
                              batch_size=4)
        in_memory.model.load_state_dict(predictor.model.state_dict())
        np.testing.assert_allclose(values, np.asarray(in_memory(volume)), atol=2e-3)


def _property_2p5d(name: str):
    largest, examples = LIMITS[name]

    @settings(**SETTINGS, max_examples=examples)
    @given(shape=st.tuples(*[st.integers(1, largest)] * 3), tta=st.sampled_from(["none", "flips", "full"]),
           planes=st.sampled_from([["xy"], ["zx"], ["zy"], ["xy", "zx", "zy"]]), on_disk=st.booleans(),
           offsets=st.sampled_from([[-1, 0, 1], [0, 2, 4], [-3, 0, 3]]))
    def test(shape, tta, planes, on_disk, offsets):
        check_2p5d(name, shape, tta, planes, on_disk, offsets)

    test.__name__ = test.__qualname__ = f"test_2p5d_any_shape_any_mode_{name}"
    return test


for _name in FAMILIES:
    globals()[f"test_2p5d_any_shape_any_mode_{_name}"] = _property_2p5d(_name)


def check_3d(name, shape, tta, roi_steps):
    options = FAMILIES[name]
    least, divisor = network_min_size(name, 3, **options), network_divisor(name, 3, **options)
    roi = tuple(least + step * divisor for step in roi_steps)
    torch.manual_seed(0)
    predictor = Predictor(config(name, 3, in_channels=1), roi_size=list(roi), tta=tta, normalize=None,
                          overlap=0.25, sw_batch_size=2)
    volume = volume_of(shape, seed=sum(shape))
    probs = predictor(volume)
    assert tuple(probs.shape) == (1, *shape)
    assert np.allclose(np.asarray(probs.affine), np.asarray(volume.affine))
    if tta == "none":
        with torch.inference_mode():
            expected = sliding_window_inference(volume.as_tensor()[None], roi, 2, predictor.model, overlap=0.25,
                                                mode="gaussian").sigmoid()[0]
        np.testing.assert_allclose(np.asarray(probs), expected.numpy(), atol=1e-5)


def _property_3d(name: str):
    # The heavy encoders need 64^3 windows: fewer, smaller volumes.
    largest, examples = (40, 6) if name in ("unet", "segresnet", "basic_unet") else (20, 2)

    @settings(**SETTINGS, max_examples=examples)
    @given(shape=st.tuples(*[st.integers(1, largest)] * 3), tta=st.sampled_from(["none", "flips"]),
           roi_steps=st.tuples(*[st.integers(0, 1)] * 3))
    def test(shape, tta, roi_steps):
        check_3d(name, shape, tta, roi_steps)

    test.__name__ = test.__qualname__ = f"test_3d_any_shape_{name}"
    return test


for _name in FAMILIES:
    globals()[f"test_3d_any_shape_{_name}"] = _property_3d(_name)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_runs_at_its_minimum_size(name):
    """``network_min_size`` is enough: every family runs there, in 2D and 3D, in eval and in
    training mode with a batch of one (where batch norm needs more than one value)."""
    for dims in (2, 3):
        options = FAMILIES[name]
        net = build_network(name, dims, 3, 1, **options)
        least, divisor = network_min_size(name, dims, **options), network_divisor(name, dims, **options)
        assert least % divisor == 0
        for training in (False, True):
            net.train(training)
            with torch.no_grad():
                net(torch.zeros((1, 3) + (least,) * dims))


def test_one_slice_and_one_voxel_volumes_through_the_shipped_sizes():
    """A 1x1x1 volume through a 16-divisor network and every plane: padded to its minimum size."""
    predictor = Predictor({"name": "unet", "spatial_dims": 2, "in_channels": 3, "out_channels": 2,
                           "channels": [4, 8, 16, 32], "strides": [2, 2, 2]}, tta="full", normalize=None)
    for shape in [(1, 1, 1), (1, 7, 1), (5, 1, 3), (266, 1, 1)]:
        probs = predictor(volume_of(shape, seed=1))
        assert tuple(probs.shape) == (2, *shape)


def test_predict_2p5d_defaults_to_twice_the_divisor():
    """Called directly with a divisor alone, the engine pads to twice the divisor (the minimum
    of every family slab ships), so an instance-normalised UNet runs on a 3x5 plane."""
    torch.manual_seed(0)
    net = build_network("unet", 2, 3, 1, channels=(2, 4, 8), strides=(2, 2))
    probs = predict_2p5d(net, torch.rand(1, 3, 5, 2), divisor=4, planes=["xy", "zx", "zy"])
    assert tuple(probs.shape) == (1, 3, 5, 2)


# ---------------------------------------------------------------------------------------------
# Training: any volume size, any patch size, volumes smaller than the patch


def write_case(root, name: str, shape, seed: int) -> dict:
    import nibabel as nib

    rng = np.random.default_rng(seed)
    image = rng.random(shape, dtype=np.float32) * 100
    label = (image > 60).astype(np.uint8)
    affine = oblique_affine((0.7, 0.9, 2.0), 0.3)
    root.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image, affine), root / f"{name}_image.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), root / f"{name}_label.nii.gz")
    return {"image": str(root / f"{name}_image.nii.gz"), "label": str(root / f"{name}_label.nii.gz")}


TRAIN_NET = {"name": "unet", "channels": [2, 4, 8], "strides": [2, 2], "num_res_units": 0}


@settings(**SETTINGS, max_examples=8)
@given(shapes=st.lists(st.tuples(*[st.integers(1, 24)] * 3), min_size=2, max_size=2),
       patch=st.one_of(st.none(), st.tuples(st.integers(1, 40), st.integers(1, 40))),
       planes=st.sampled_from([["xy"], ["zx", "zy"], ["xy", "zx", "zy"]]))
def test_train_2p5d_any_volume_and_patch_size(tmp_path_factory, shapes, patch, planes):
    import json

    from slab.pipeline.training import train

    root = tmp_path_factory.mktemp("shapes2p5d")
    items = [write_case(root, f"c{i}", shape, i) for i, shape in enumerate(shapes)]
    (root / "datalist.json").write_text(json.dumps({"training": items[:1], "validation": items[1:]}))
    cfg = {"epochs": 1, "batch_size": 2, "samples_per_epoch": 4, "planes": planes, "network": TRAIN_NET,
           "patch_size": None if patch is None else list(patch), "progress": False,
           "val": {"thresholds": [0.5]}}
    result = train(root / "datalist.json", cfg, root / "run", device="cpu")
    assert np.isfinite(result["history"][0]["train_loss"])
    assert (root / "run" / "best.pt").is_file()


@settings(**SETTINGS, max_examples=6)
@given(shapes=st.lists(st.tuples(*[st.integers(1, 20)] * 3), min_size=2, max_size=2),
       patch_steps=st.tuples(*[st.integers(0, 3)] * 3))
def test_train_3d_any_volume_and_patch_size(tmp_path_factory, shapes, patch_steps):
    import json

    from slab.pipeline.training import train

    root = tmp_path_factory.mktemp("shapes3d")
    items = [write_case(root, f"c{i}", shape, i) for i, shape in enumerate(shapes)]
    (root / "datalist.json").write_text(json.dumps({"training": items[:1], "validation": items[1:]}))
    patch = [8 + 4 * step for step in patch_steps]  # min size 8, divisor 4: often larger than the volume
    cfg = {"task": "segmentation_3d", "epochs": 1, "batch_size": 2, "samples_per_epoch": 2, "network": TRAIN_NET,
           "patch_size": patch, "progress": False, "val": {"thresholds": [0.5]}}
    result = train(root / "datalist.json", cfg, root / "run", device="cpu")
    assert np.isfinite(result["history"][0]["train_loss"])


# ---------------------------------------------------------------------------------------------
# The command line: files of any shape in, files of the same shape and geometry out


@settings(**SETTINGS, max_examples=8)
@given(shape=st.tuples(*[st.integers(1, 40)] * 3), name=st.sampled_from(["unet", "segresnet", "basic_unet"]),
       tta=st.sampled_from(["none", "flips"]), axes=st.sampled_from(["xy", "xy,zx,zy"]),
       on_disk=st.booleans(), stack=st.booleans())
def test_slab_predict_any_shape_keeps_shape_and_geometry(tmp_path_factory, shape, name, tta, axes, on_disk, stack):
    import json

    import nibabel as nib

    from slab.networks import save_weights
    from slab.pipeline.cli import main
    from slab.io.volumes import load_volume, save_volume

    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    net = config(name, 2)
    (root / "net.json").write_text(json.dumps(net), encoding="utf-8")
    save_weights(build_network(**net), root / "net.pt")
    data = (np.random.default_rng(sum(shape)).random(shape) * 1000).astype(np.uint16)
    affine = oblique_affine((0.7, 0.9, 2.5), 0.5)
    if stack:
        source = save_volume(torch.from_numpy(data)[None], root / "slices", slice_format="png")
        affine = np.eye(4)
    else:
        source = root / "scan.nii.gz"
        nib.save(nib.Nifti1Image(data, affine), source)
    args = ["predict", "-i", str(source), "-o", str(root / "mask.nii.gz"), "--prob", str(root / "prob.nii.gz"),
            "--network", str(root / "net.json"), "--weights", str(root / "net.pt"), "--tta", tta, "--axes", axes,
            "--device", "cpu"] + (["--memory-budget", "0.0001"] if on_disk else [])
    assert main(args) == 0
    for written in ("mask.nii.gz", "prob.nii.gz"):
        out = load_volume(root / written)
        assert tuple(out.shape) == (1, *shape)
        np.testing.assert_allclose(np.asarray(out.affine), affine, atol=1e-5)
