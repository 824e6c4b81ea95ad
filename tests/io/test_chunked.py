"""zarr / OME-Zarr, HDF5, multi-page TIFF and JPEG 2000 stacks: read back by the reference
libraries (ome-zarr-py, ome-zarr-models, tifffile, h5py, imagecodecs), files they write read by
slab, geometry kept, lazy reads equal to eager ones, bad containers refused in one line."""
import json
import warnings

import h5py
import imagecodecs
import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from monai.data import MetaTensor

from slab.networks import build_network, save_weights
from slab.pipeline.cli import main
from slab.pipeline.inference import predict_2p5d
from slab.io.arrays import _downsample
from slab.io.zarr import pyramid_shapes, write_zarr
from slab.core.errors import SlabError, SlabWarning
from slab.transforms.intensity import PercentileNormalize
from slab.io.volumes import load_volume, output_format, save_volume
from slab.io.lazy import LazyVolume

OBLIQUE = np.array([[0.0, -0.7, 0.0, 10.0], [0.5, 0.0, 0.0, -3.0], [0.0, 0.0, 2.5, 7.25], [0.0, 0.0, 0.0, 1.0]])
SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
shapes = st.tuples(st.sampled_from([1, 2, 7, 13]), st.sampled_from([1, 3, 11]), st.sampled_from([1, 2, 5]))


def _volume(rng, shape, dtype, channels=1):
    if np.dtype(dtype).kind == "f":
        return rng.normal(0, 100, (channels,) + shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, (channels,) + shape, endpoint=True).astype(dtype)


def _save(data, affine, path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SlabWarning)
        return save_volume(MetaTensor(torch.as_tensor(data), affine=torch.as_tensor(affine)), path, **kwargs)


@SETTINGS
@given(shape=shapes, dtype=st.sampled_from([np.uint8, np.int16, np.uint16, np.float32]), channels=st.sampled_from([1, 2]),
       fmt=st.sampled_from(["zarr", "h5", "tif"]))
def test_round_trip_values_and_geometry(tmp_path_factory, rng, shape, dtype, channels, fmt):
    data = _volume(rng, shape, dtype, channels)
    path = tmp_path_factory.mktemp("rt") / f"v.{fmt}"
    _save(data, OBLIQUE, path)
    back = load_volume(path)
    assert back.dtype == torch.as_tensor(data).dtype
    np.testing.assert_array_equal(back.numpy(), data)
    if fmt == "tif":  # TIFF keeps the voxel size only
        np.testing.assert_allclose(back.meta["spacing"], (0.5, 0.7, 2.5))
        np.testing.assert_allclose(back.affine.numpy(), np.diag([0.5, 0.7, 2.5, 1.0]))
    else:
        np.testing.assert_allclose(back.affine.numpy(), OBLIQUE, atol=1e-12)
        assert back.meta["spacing"] == pytest.approx((0.5, 0.7, 2.5))
    lazy = load_volume(path, lazy=True)
    assert isinstance(lazy, LazyVolume) and lazy.shape == data.shape
    index = (slice(None), slice(0, None, 2), min(1, shape[1] - 1), slice(None, None, -1))
    np.testing.assert_array_equal(lazy[index], data[index])
    np.testing.assert_array_equal(lazy[0, shape[0] - 1], data[0, shape[0] - 1])


def test_written_files_read_by_the_reference_readers(tmp_path, rng):
    data = _volume(rng, (13, 11, 5), np.uint16, 1)
    affine = np.diag([0.5, 0.25, 2.0, 1.0])
    _save(data, affine, tmp_path / "v.tif")
    with tifffile.TiffFile(tmp_path / "v.tif") as tif:
        assert tif.is_ome and len(tif.pages) == 5 and tif.series[0].axes == "ZYX"
        np.testing.assert_array_equal(tif.asarray(), data[0].transpose(2, 1, 0))
        assert 'PhysicalSizeX="0.5" PhysicalSizeXUnit="mm"' in tif.ome_metadata
    _save(data, affine, tmp_path / "v.h5")
    with h5py.File(tmp_path / "v.h5", "r") as handle:
        np.testing.assert_array_equal(handle["volume"][...], data[0].transpose(2, 1, 0))
        np.testing.assert_allclose(handle["volume"].attrs["element_size_um"], [2000.0, 250.0, 500.0])
    _save(data, affine, tmp_path / "stack", slice_format="jp2")
    files = sorted((tmp_path / "stack").iterdir())
    assert [f.name for f in files] == [f"{z:04d}.jp2" for z in range(5)]
    for z, f in enumerate(files):  # lossless: OpenJPEG gives the slice back exactly
        np.testing.assert_array_equal(imagecodecs.jpeg2k_decode(f.read_bytes()), data[0, :, :, z].T)


def test_files_written_by_other_tools_are_read(tmp_path, rng):
    zyx = _volume(rng, (7, 9, 11), np.uint16)[0]
    tifffile.imwrite(tmp_path / "ij.tif", zyx, imagej=True, resolution=(1 / 0.004, 1 / 0.002),
                     metadata={"spacing": 0.008, "unit": "micron", "axes": "ZYX"})
    ij = load_volume(tmp_path / "ij.tif")
    np.testing.assert_array_equal(ij[0].numpy(), zyx.transpose(2, 1, 0))
    assert ij.meta["spacing"] == pytest.approx((4e-6, 2e-6, 8e-6))
    with h5py.File(tmp_path / "fiji.h5", "w") as handle:
        handle.create_dataset("raw", data=zyx, chunks=(2, 3, 4), compression="gzip")
        handle["raw"].attrs["element_size_um"] = [50.0, 50.0, 25.0]
        handle.create_dataset("meta/labels", data=np.zeros(3))
    h5 = load_volume(tmp_path / "fiji.h5")  # the only 3D dataset
    np.testing.assert_array_equal(h5[0].numpy(), zyx.transpose(2, 1, 0))
    assert h5.meta["spacing"] == pytest.approx((0.025, 0.05, 0.05))
    assert load_volume(tmp_path / "fiji.h5" / "raw").shape == (1, 11, 9, 7)
    for z, name in enumerate(["a_0.j2k", "a_1.j2k", "a_2.j2k"]):
        (tmp_path / "j2k").mkdir(exist_ok=True)
        (tmp_path / "j2k" / name).write_bytes(imagecodecs.jpeg2k_encode(zyx[z], level=0, codecformat="j2k"))
    np.testing.assert_array_equal(load_volume(tmp_path / "j2k")[0].numpy(), zyx[:3].transpose(2, 1, 0))
    zarr.save_array(str(tmp_path / "plain.zarr"), zyx, zarr_format=3)
    np.testing.assert_array_equal(load_volume(tmp_path / "plain.zarr")[0].numpy(), zyx.transpose(2, 1, 0))


def test_ome_zarr_written_by_ome_zarr_py(tmp_path, rng):
    from ome_zarr.writer import write_image

    czyx = _volume(rng, (2, 9, 23, 31), np.uint16)[0]
    root = zarr.open_group(str(tmp_path / "ref.ome.zarr"), mode="w")
    write_image(czyx, root, axes="czyx", scale={"z": 2.0, "y": 0.5, "x": 0.25},
                axes_units={"z": "micrometer", "y": "micrometer", "x": "micrometer"},
                scale_factors=[{"z": 1, "y": 2, "x": 2}])
    volume = load_volume(tmp_path / "ref.ome.zarr")  # OME-Zarr 0.5 on zarr v3, level 0
    np.testing.assert_array_equal(volume.numpy(), czyx.transpose(0, 3, 2, 1))
    assert volume.meta["spacing"] == pytest.approx((0.25e-3, 0.5e-3, 2e-3))
    meta = json.loads((tmp_path / "ref.ome.zarr" / "zarr.json").read_text())["attributes"]["ome"]["multiscales"][0]
    second = meta["datasets"][1]
    scale, translation = (t[t["type"]] for t in second["coordinateTransformations"])
    level = load_volume(tmp_path / "ref.ome.zarr" / second["path"])
    assert level.shape == (2,) + tuple(zarr.open_array(str(tmp_path / "ref.ome.zarr" / second["path"])).shape[1:])[::-1]
    np.testing.assert_allclose(level.affine.numpy()[:3, :3], np.diag(scale[::-1][:3]) * 1e-3)
    np.testing.assert_allclose(level.affine.numpy()[:3, 3], np.asarray(translation[::-1][:3]) * 1e-3)


def test_ome_zarr_pyramid_validates_and_reads_in_ome_zarr_py(tmp_path, rng):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from ome_zarr_models.v04 import Image
    from skimage.transform import downscale_local_mean

    data = _volume(rng, (70, 40, 33), np.uint8)
    affine = np.diag([0.3, 0.3, 1.2, 1.0])
    affine[:3, 3] = [5, 6, 7]
    write_zarr(data, affine, tmp_path / "img.zarr", chunks=16, levels=3, block_bytes=1)  # one chunk row a block
    Image.from_zarr(zarr.open_group(str(tmp_path / "img.zarr"), mode="r"))  # the OME-Zarr 0.4 schema
    node = list(Reader(parse_url(str(tmp_path / "img.zarr")))())[0]
    assert [a.shape for a in node.data] == [(33, 40, 70), (17, 20, 35), (9, 10, 18)]
    assert node.metadata["axes"] == [{"name": a, "type": "space", "unit": "millimeter"} for a in "zyx"]
    for i, level in enumerate(node.data):
        ours = load_volume(tmp_path / "img.zarr" / str(i))
        np.testing.assert_array_equal(ours[0].numpy(), np.asarray(level).transpose(2, 1, 0))
        scale, translation = (t[t["type"]] for t in node.metadata["coordinateTransformations"][i])
        np.testing.assert_allclose(np.diag(ours.affine.numpy())[:3], scale[::-1])
        np.testing.assert_allclose(ours.affine.numpy()[:3, 3], translation[::-1])
        # a voxel of level i is the mean of the 2^i-cube of level 0 voxels whose centre it sits at
        np.testing.assert_allclose(ours.affine.numpy() @ [0, 0, 0, 1], affine @ ([(2 ** i - 1) / 2] * 3 + [1]))
        if i:  # each level the rounded 2x2x2 mean of the one before (the cells inside the volume)
            before = np.asarray(node.data[i - 1], dtype=np.float64)
            even = before[tuple(slice(0, n // 2 * 2) for n in before.shape)]
            expected = np.rint(downscale_local_mean(even, (2, 2, 2)))
            got = np.asarray(level)[tuple(slice(0, n) for n in expected.shape)]
            np.testing.assert_array_equal(got, expected)


def test_label_pyramids_keep_label_values(rng):
    labels = rng.integers(0, 4, (1, 9, 6, 5)).astype(np.uint8) * 2
    np.testing.assert_array_equal(_downsample(labels, labels=True), labels[:, ::2, ::2, ::2])
    assert set(np.unique(_downsample(labels, labels=True))) <= {0, 2, 4, 6}
    assert pyramid_shapes((1, 1000, 600, 1)) == [(1, 1000, 600, 1), (1, 500, 300, 1), (1, 250, 150, 1)]


def test_writers_never_load_a_lazy_volume(tmp_path, rng, monkeypatch):
    data = _volume(rng, (9, 10, 11), np.uint16)
    _save(data, np.eye(4), tmp_path / "in.zarr")
    source = load_volume(tmp_path / "in.zarr", lazy=True)
    monkeypatch.setattr(LazyVolume, "load", lambda *a, **k: pytest.fail("a writer loaded the whole volume"))
    for name in ("out.zarr", "out.h5", "out.tif"):
        save_volume(source, tmp_path / name)
        monkeypatch.undo()
        np.testing.assert_array_equal(load_volume(tmp_path / name).numpy(), data)
        monkeypatch.setattr(LazyVolume, "load", lambda *a, **k: pytest.fail("a writer loaded the whole volume"))


def test_convert_between_containers_keeps_geometry(tmp_path, rng):
    data = _volume(rng, (12, 7, 5), np.int16)[0]
    nib.save(nib.Nifti1Image(data, OBLIQUE), tmp_path / "in.nii.gz")
    chain = ["in.nii.gz", "a.zarr", "b.h5", "c.nrrd", "d.zarr", "e.nii.gz"]
    for src, dst in zip(chain, chain[1:]):
        assert main(["convert", str(tmp_path / src), str(tmp_path / dst)]) == 0
    out = nib.load(tmp_path / "e.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(out.dataobj), data)
    np.testing.assert_allclose(out.affine, OBLIQUE, atol=1e-6)


def _one_line(excinfo, name):
    message = str(excinfo.value)
    assert "\n" not in message and str(name) in message, message


def test_bad_containers_are_refused_in_one_line(tmp_path, rng):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.zarr"
    evil.mkdir()
    (evil / ".zarray").write_text(json.dumps({
        "zarr_format": 2, "shape": [2, 2, 2], "chunks": [2, 2, 2], "dtype": "|O", "compressor": None,
        "fill_value": None, "order": "C", "filters": [{"id": "pickle"}]}))
    import pickle

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (evil / "0.0.0").write_bytes(pickle.dumps(np.array([Evil()] * 8, dtype=object)))
    with pytest.raises(SlabError, match="never unpickles") as excinfo:
        load_volume(evil)
    _one_line(excinfo, evil)
    assert not marker.exists()

    group = zarr.open_group(str(tmp_path / "two.zarr"), mode="w")
    group.create_array("a", shape=(2, 2, 2), dtype="u1")
    group.create_array("b", shape=(2, 2, 2), dtype="u1")
    with pytest.raises(SlabError, match="2 arrays .a, b.") as excinfo:
        load_volume(tmp_path / "two.zarr")
    _one_line(excinfo, tmp_path / "two.zarr")
    assert load_volume(tmp_path / "two.zarr" / "b").shape == (1, 2, 2, 2)

    _save(_volume(rng, (4, 4, 4), np.uint8), np.eye(4), tmp_path / "broken.zarr")
    chunk = next(p for p in (tmp_path / "broken.zarr" / "0").rglob("*") if p.is_file() and not p.name.startswith("."))
    chunk.write_bytes(b"not blosc")
    with pytest.raises(SlabError, match="a chunk cannot be read") as excinfo:
        load_volume(tmp_path / "broken.zarr")
    _one_line(excinfo, tmp_path / "broken.zarr")

    attrs_file = tmp_path / "broken.zarr" / ".zattrs"
    attrs = json.loads(attrs_file.read_text())
    attrs["multiscales"][0]["axes"][0]["unit"] = "furlong"
    attrs_file.write_text(json.dumps(attrs))
    with pytest.raises(SlabError, match="unknown length unit 'furlong'") as excinfo:
        load_volume(tmp_path / "broken.zarr")
    attrs["multiscales"][0]["axes"][0]["unit"] = "micrometer"
    attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"] = [1, -1, 1]
    attrs_file.write_text(json.dumps(attrs))
    with pytest.raises(SlabError, match="expected positive voxel sizes"):
        load_volume(tmp_path / "broken.zarr")

    time = zarr.open_group(str(tmp_path / "time.zarr"), mode="w")
    time.create_array("0", shape=(3, 2, 2, 2), dtype="u1")
    time.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": "t", "type": "time"}] + [
        {"name": a, "type": "space"} for a in "zyx"], "datasets": [{"path": "0"}]}]
    with pytest.raises(SlabError, match="a time series of 3 points"):
        load_volume(tmp_path / "time.zarr")

    with h5py.File(tmp_path / "many.h5", "w") as handle:
        handle["x"] = np.zeros((2, 2, 2))
        handle["y"] = np.zeros((2, 2, 2))
        handle["s"] = np.array([b"text"] * 8).reshape(2, 2, 2)
    with pytest.raises(SlabError, match="holds 3 3D/4D datasets") as excinfo:
        load_volume(tmp_path / "many.h5")
    _one_line(excinfo, tmp_path / "many.h5")
    with pytest.raises(SlabError, match="no dataset 'z'"):
        load_volume(tmp_path / "many.h5" / "z")
    with pytest.raises(SlabError, match="expected numbers"):
        load_volume(tmp_path / "many.h5" / "s")
    (tmp_path / "junk.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(SlabError, match="not a readable HDF5 file") as excinfo:
        load_volume(tmp_path / "junk.h5")
    _one_line(excinfo, tmp_path / "junk.h5")

    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((4, 5, 3), np.uint8), photometric="rgb")
    with pytest.raises(SlabError, match="RGB"):
        load_volume(tmp_path / "rgb.tif")
    (tmp_path / "jp").mkdir()
    (tmp_path / "jp" / "0.jp2").write_bytes(b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"\0" * 20)
    with pytest.raises(SlabError, match="not a readable JPEG 2000 image") as excinfo:
        load_volume(tmp_path / "jp")
    _one_line(excinfo, tmp_path / "jp" / "0.jp2")
    (tmp_path / "pages").mkdir()
    tifffile.imwrite(tmp_path / "pages" / "0.tif", np.zeros((5, 4, 4), np.uint8), photometric="minisblack")
    tifffile.imwrite(tmp_path / "pages" / "1.tif", np.zeros((5, 4, 4), np.uint8), photometric="minisblack")
    with pytest.raises(SlabError, match="a multi-page TIFF in a slice directory; give the file itself") as excinfo:
        load_volume(tmp_path / "pages")
    _one_line(excinfo, tmp_path / "pages" / "0.tif")
    (tmp_path / "notes.zarr").mkdir()
    (tmp_path / "notes.zarr" / "thesis.txt").write_text("years of work")
    with pytest.raises(SlabError, match="exists and is not a zarr store; not replacing it"):
        output_format(tmp_path / "notes.zarr")
    with pytest.raises(SlabError, match="JPEG 2000 holds 8- and 16-bit"):
        save_volume(np.zeros((1, 2, 2, 2), np.float32), tmp_path / "st", slice_format="jp2")
    with pytest.raises(SlabError, match="no such zarr store"):
        load_volume(tmp_path / "missing.zarr")


def test_predict_zarr_to_zarr_and_a_folder_of_containers(tmp_path, rng, capsys):
    config = {"name": "unet", "spatial_dims": 2, "in_channels": 3, "out_channels": 1, "channels": [4, 8],
              "strides": [2]}
    torch.manual_seed(0)
    net = build_network(**config)
    (tmp_path / "net.json").write_text(json.dumps(config))
    save_weights(net, tmp_path / "net.pt")
    data = rng.normal(100, 20, (12, 10, 7)).astype(np.float32)
    data[3:8, 2:7, 2:6] += 60
    affine = OBLIQUE.copy()
    _save(data[None], affine, tmp_path / "scan.zarr")
    base = ["--network", str(tmp_path / "net.json"), "--weights", str(tmp_path / "net.pt"), "--device", "cpu"]
    probs = predict_2p5d(net, PercentileNormalize()(torch.from_numpy(data)[None]), divisor=2)[0].numpy()
    threshold = float(np.median(probs))
    assert main(["predict", "-i", str(tmp_path / "scan.zarr"), "-o", str(tmp_path / "mask.zarr"),
                 "--threshold", str(threshold), "--memory-budget", "1", *base]) == 0
    mask = load_volume(tmp_path / "mask.zarr")
    np.testing.assert_allclose(mask.affine.numpy(), affine, atol=1e-12)
    expected = probs > threshold
    assert 0 < expected.sum() < expected.size
    np.testing.assert_array_equal(mask[0].numpy(), expected)
    attrs = json.loads((tmp_path / "mask.zarr" / ".zattrs").read_text())
    assert attrs["multiscales"][0]["type"] == "nearest"  # a mask's pyramid keeps label values

    folder = tmp_path / "cases"
    folder.mkdir()
    _save(data[None], affine, folder / "a.zarr")
    _save(data[None], affine, folder / "b.h5")
    _save(data[None], np.diag([1, 1, 1, 1.0]), folder / "c.tif")
    assert main(["predict", "-i", str(folder), "-o", str(tmp_path / "out"), "--threshold", str(threshold), *base]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.zarr", "b.h5", "c.tif"]
    for name in ("a.zarr", "b.h5", "c.tif"):
        np.testing.assert_array_equal(load_volume(tmp_path / "out" / name)[0].numpy(), expected)


OUT_OF_CORE = ["--memory-budget", "0.000002"]  # ~2 KiB: every block is one batch, sums on disk


def _tiny_model(tmp_path, out_channels=1, **changes):
    """A tiny UNet (2.5D unless ``changes`` say otherwise; inference keys such as ``roi_size`` go
    into its network config only) and the CLI flags that load it."""
    config = {"name": "unet", "spatial_dims": 2, "in_channels": 3, "out_channels": out_channels, "channels": [4, 8],
              "strides": [2], **changes}
    torch.manual_seed(0)
    net = build_network(**{k: v for k, v in config.items() if k != "roi_size"})
    (tmp_path / "net.json").write_text(json.dumps(config))
    save_weights(net, tmp_path / "net.pt")
    return net, ["--network", str(tmp_path / "net.json"), "--weights", str(tmp_path / "net.pt"), "--device", "cpu"]


def _scan(rng, shape=(13, 11, 9)):
    data = rng.normal(100, 20, shape).astype(np.float32)
    data[3:8, 2:7, 2:6] += 60
    return data


def test_out_of_core_predict_equals_in_memory(tmp_path, rng):
    from slab.transforms.post import postprocess

    net, base = _tiny_model(tmp_path, out_channels=2)
    data = _scan(rng)
    _save(data[None], OBLIQUE, tmp_path / "scan.zarr")
    probs = predict_2p5d(net, PercentileNormalize()(torch.from_numpy(data)[None]), divisor=2, tta="flips",
                         batch_size=2)
    low, high = (float(np.quantile(probs, q)) for q in (0.5, 0.8))
    expected = postprocess(probs.numpy().astype(np.float16), hysteresis=(low, high), min_size=3)
    assert 0 < expected.sum() < expected.size
    args = ["predict", "-i", str(tmp_path / "scan.zarr"), "--tta", "flips", "--batch-size", "2", "--hysteresis",
            str(low), str(high), "--min-size", "3", *OUT_OF_CORE, *base]
    assert main(args + ["-o", str(tmp_path / "mask.zarr"), "--per-channel", "--prob", str(tmp_path / "p.zarr")]) == 0
    mask = load_volume(tmp_path / "mask.zarr")
    np.testing.assert_array_equal(mask.numpy(), expected)
    np.testing.assert_allclose(mask.affine.numpy(), OBLIQUE, atol=1e-12)
    np.testing.assert_array_equal(load_volume(tmp_path / "p.zarr").numpy(), probs.numpy().astype(np.float16))
    assert main(args + ["-o", str(tmp_path / "labels.zarr")]) == 0  # one label map, values 1 and 2
    label = load_volume(tmp_path / "labels.zarr")[0].numpy()
    from slab.io.labelmap import to_label_map

    np.testing.assert_array_equal(label, to_label_map(expected, (1, 2), (0, 1))[0][0])
    assert sorted(p.name for p in tmp_path.iterdir() if "partial" in p.name) == []


KILLER = """
import os, signal, sys
from slab.pipeline.inference import store
from slab.pipeline.cli import main
put = store.PlaneStore.put
calls = []
def dying(self, *args):
    put(self, *args)
    calls.append(1)
    if len(calls) == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)
store.PlaneStore.put = dying
main(sys.argv[2:])
"""


def test_out_of_core_predict_resumes_after_a_kill(tmp_path, rng, monkeypatch):
    import subprocess
    import sys

    from slab.pipeline.inference import store

    net, base = _tiny_model(tmp_path)
    data = _scan(rng)
    _save(data[None], np.diag([0.5, 0.5, 1.5, 1.0]), tmp_path / "scan.zarr")
    args = ["predict", "-i", str(tmp_path / "scan.zarr"), "-o", str(tmp_path / "mask.zarr"), "--threshold", "0.5",
            "--batch-size", "4", "--quiet", *OUT_OF_CORE, *base]
    killed = subprocess.run([sys.executable, "-c", KILLER, "3", *args], capture_output=True, timeout=300)
    assert killed.returncode == -9
    work = tmp_path / "mask.zarr.partial" / "probabilities.zarr.partial"
    state = json.loads((work / "state.json").read_text())
    assert sum(len(v) for v in state["done"].values()) == 3 and not (tmp_path / "mask.zarr").exists()
    blocks = []
    monkeypatch.setattr(store.PlaneStore, "put", lambda self, *a, put=store.PlaneStore.put: (blocks.append((a[0], store.block_id(a[1]))),
                                                                                             put(self, *a)))
    assert main(args) == 0
    total = sum(-(-n // 4) for n in data.shape)  # blocks of one batch (4 slices) per plane
    assert len(blocks) == total - 3  # the three finished blocks were kept
    probs = predict_2p5d(net, PercentileNormalize()(torch.from_numpy(data)[None]), divisor=2, batch_size=4)
    np.testing.assert_array_equal(load_volume(tmp_path / "mask.zarr")[0].numpy(),
                                  probs[0].numpy().astype(np.float16) > 0.5)
    assert not (tmp_path / "mask.zarr.partial").exists()


def test_an_interrupted_out_of_core_run_says_what_it_kept(tmp_path, rng, monkeypatch, capsys):
    from slab.pipeline.inference import store

    _, base = _tiny_model(tmp_path)
    _save(_scan(rng)[None], np.eye(4), tmp_path / "scan.zarr")
    put = store.PlaneStore.put

    def interrupted(self, *args):
        put(self, *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(store.PlaneStore, "put", interrupted)
    args = ["predict", "-i", str(tmp_path / "scan.zarr"), "-o", str(tmp_path / "mask.zarr"), *OUT_OF_CORE, *base]
    assert main(args) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"finished blocks are kept in {tmp_path / 'mask.zarr.partial'}" in err, err
    assert not (tmp_path / "mask.zarr").exists()
    monkeypatch.undo()
    assert main(args) == 0 and not (tmp_path / "mask.zarr.partial").exists()
    assert not store.ACTIVE
    err = capsys.readouterr().err  # the resumed run says what it kept and what it had left
    assert "resuming an interrupted prediction: 1 of " in err and " blocks kept, " in err and " left" in err, err


@settings(max_examples=40, deadline=None)
@given(shape=st.tuples(st.integers(1, 12), st.integers(1, 12), st.integers(1, 12)), depth=st.integers(1, 4),
       connectivity=st.sampled_from([6, 18, 26]), min_size=st.integers(0, 6), seed=st.integers(0, 2 ** 16),
       hysteresis=st.booleans(), dtype=st.sampled_from([np.float16, np.float32]))
def test_blockwise_postprocess_equals_the_whole_volume(shape, depth, connectivity, min_size, seed, hysteresis, dtype):
    from scipy.ndimage import gaussian_filter

    from slab.transforms.blockwise import BlockwisePostprocess, MaskVolume
    from slab.transforms.post import postprocess

    rng = np.random.default_rng(seed)
    p = gaussian_filter(rng.random((2,) + shape), 1.0)
    p = ((p - p.min()) / (np.ptp(p) + 1e-9)).astype(dtype)
    options = {"min_size": min_size, "connectivity": connectivity}
    options.update({"hysteresis": [(0.4, 0.7), (0.3, 0.8)]} if hysteresis else {"threshold": [0.5, 0.45]})
    expected = postprocess(p, **options)
    post = BlockwisePostprocess(p, options, memory_budget=depth * shape[0] * shape[1] * 22)
    assert post.depth == min(depth, shape[2])
    np.testing.assert_array_equal(post.mask(0, shape[2]), expected)
    z0 = int(rng.integers(0, shape[2]))
    view = MaskVolume(post, np.eye(4), "p")
    np.testing.assert_array_equal(view[:, :, :, z0:], expected[..., z0:])
    np.testing.assert_array_equal(view[1, :, -1, z0], expected[1, :, -1, z0])


def test_blockwise_postprocess_refuses_whole_mask_steps():
    from slab.transforms.blockwise import BlockwisePostprocess

    for option in ({"keep_largest": 1}, {"fill_holes": "3d"}):
        with pytest.raises(SlabError, match="needs the whole mask in memory"):
            BlockwisePostprocess(np.zeros((1, 2, 2, 2), np.float32), option)


def test_predict_preview_in_memory_and_out_of_core(tmp_path, rng, capsys):
    from PIL import Image

    _, base = _tiny_model(tmp_path)
    data = _scan(rng)
    _save(data[None], np.diag([0.5, 0.5, 1.5, 1.0]), tmp_path / "scan.zarr")
    args = ["predict", "-i", str(tmp_path / "scan.zarr"), "--threshold", "0.5", "--quiet", *base]
    assert main(args + ["-o", str(tmp_path / "a.nii.gz"), "--preview", str(tmp_path / "a.png")]) == 0
    assert main(args + ["-o", str(tmp_path / "b.zarr"), "--preview", str(tmp_path / "b.png"), *OUT_OF_CORE]) == 0
    first, second = (np.asarray(Image.open(tmp_path / n).convert("RGB")) for n in ("a.png", "b.png"))
    assert first.shape == (900, 1200, 3)
    np.testing.assert_array_equal(first, second)  # the same mask drawn, whichever path made it
    capsys.readouterr()
    assert main(args + ["-o", str(tmp_path / "c.nii.gz"), "--preview", str(tmp_path / "c.jpg")]) == 2
    assert "--preview" in capsys.readouterr().err and not (tmp_path / "c.nii.gz").exists()


def test_run_key_notices_a_chunk_rewritten_in_place(tmp_path, rng):
    import os

    from slab.pipeline.inference.store import run_key

    _save(_volume(rng, (6, 5, 4), np.uint16), np.eye(4), tmp_path / "in.zarr")
    net = torch.nn.Conv2d(3, 1, 1)
    key = run_key(net, (1, 6, 5, 4), "uint16", str(tmp_path / "in.zarr"), {"tta": "none"})
    assert run_key(net, (1, 6, 5, 4), "uint16", str(tmp_path / "in.zarr"), {"tta": "none"}) == key
    chunk = next(p for p in (tmp_path / "in.zarr" / "0").rglob("*") if p.is_file() and not p.name.startswith("."))
    stat = chunk.stat()
    chunk.write_bytes(chunk.read_bytes())  # same bytes, a new modification time
    os.utime(chunk, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert run_key(net, (1, 6, 5, 4), "uint16", str(tmp_path / "in.zarr"), {"tta": "none"}) != key
    assert run_key(net, (1, 6, 5, 4), "uint16", str(tmp_path / "in.zarr"), {"tta": "flips"}) != key
    with torch.no_grad():
        net.weight.add_(1)
    assert run_key(net, (1, 6, 5, 4), "uint16", str(tmp_path / "in.zarr"), {"tta": "none"}) != key
