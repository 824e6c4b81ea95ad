"""Training that streams: the 2.5D sampler reading each slab from volumes on disk (zarr, HDF5,
NIfTI, slice stacks) gives the in-memory sampler's samples bit for bit, reads only what a sample
needs, and trains to the same losses."""
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.data import MetaTensor

from slab.pipeline.data.adapters import brats_label
from slab.pipeline.data.slabs import SlabDataset
from slab.core.errors import SlabError
from slab.io.volumes import save_volume
from slab.io.lazy import LazyVolume

AFFINE = np.array([[0.0, -0.8, 0.0, 4.0], [0.6, 0.0, 0.0, -2.0], [0.0, 0.0, 1.7, 9.0], [0.0, 0.0, 0.0, 1.0]])


def _case(folder, shape, seed, image_suffix=".zarr", label_suffix=".zarr", channels=1, values=False):
    """An odd-sized uint16 scan with bright boxes and its label (two channels, or BraTS values)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(200, 900, (channels,) + shape).astype(np.uint16)
    label = np.zeros((2,) + shape, np.uint8)
    for c in range(2):
        lo = rng.integers(0, np.maximum(1, np.asarray(shape) - 3))
        box = tuple(slice(int(a), int(a) + 3) for a in lo)
        label[(c,) + box] = 1
        image[(slice(None),) + box] += 1500 + 700 * c
    if values:  # one channel of BraTS values 0, 1, 2, 4
        label = (label[:1] * 2 + label[1:] * np.where(rng.random(shape) < 0.5, 1, 4)).astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"image": folder / f"image{image_suffix}", "label": folder / f"label{label_suffix}"}
    save_volume(MetaTensor(torch.from_numpy(image), affine=torch.as_tensor(AFFINE)), paths["image"])
    save_volume(MetaTensor(torch.from_numpy(label), affine=torch.as_tensor(AFFINE)), paths["label"])
    return {k: str(v) for k, v in paths.items()}


def _datalist(tmp_path, shape):
    """Three zarr cases, fold = index % 2; fold 0 validates."""
    items = [dict(_case(tmp_path / f"c{i}", shape, i), id=f"c{i}", case=f"c{i}", fold=i % 2) for i in range(3)]
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"n_folds": 2, "training": [x for x in items if x["fold"]],
                                    "validation": [x for x in items if not x["fold"]]}), encoding="utf-8")
    return datalist


def _same_samples(items, n=40, **options):
    memory = SlabDataset(items, samples_per_epoch=n, **options)
    streamed = SlabDataset(items, samples_per_epoch=n, stream=True, **options)
    assert all(isinstance(v, LazyVolume) for v in streamed.images + streamed.labels)
    for a, b in zip(streamed.slice_has_label, memory.slice_has_label):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert streamed.label_channels == memory.label_channels
    for epoch in (0, 3):
        for i in range(n):
            a, b = memory.sample(i, epoch), streamed.sample(i, epoch)
            assert a.keys() == b.keys()
            for key in a:
                if isinstance(a[key], torch.Tensor):
                    assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape
                    np.testing.assert_array_equal(a[key].numpy(), b[key].numpy(), err_msg=key)
                else:
                    assert a[key] == b[key], key
    return streamed


@settings(max_examples=25, deadline=None)
@given(shape=st.tuples(st.integers(1, 23), st.integers(1, 19), st.integers(1, 13)),
       patch=st.one_of(st.none(), st.tuples(st.integers(1, 24), st.integers(1, 24))),
       offsets=st.sampled_from([(0,), (-1, 0, 1), (-3, 0, 3), (0, 2, 4)]),
       planes=st.sampled_from([("xy",), ("zx",), ("xy", "zx", "zy")]), seed=st.integers(0, 50),
       positive=st.sampled_from([0.0, 0.6, 1.0]))
def test_streamed_samples_equal_the_in_memory_ones(shape, patch, offsets, planes, seed, positive):
    """Any shape (one slice, odd, smaller than the patch), strided slabs clamped at the edges,
    any planes (whole slices of one plane, or patches), percentile windows computed in blocks:
    the streamed samples are the in-memory ones."""
    if patch is None and len(planes) > 1:
        planes = planes[:1]  # whole slices of different planes differ in size
    with tempfile.TemporaryDirectory() as folder:
        items = [_case(Path(folder) / f"c{i}", shape, seed + i) for i in range(2)]
        _same_samples(items, n=12, offsets=offsets, planes=planes, patch_size=patch, positive_fraction=positive,
                      normalize={"lower": 1, "upper": 99}, seed=seed)


def test_streamed_label_transform_cache_dtype_and_other_formats(tmp_path):
    """BraTS values to channels run on the parts read; float16 storage rounds as in memory;
    uncompressed NIfTI and HDF5 read lazily, NRRD (no lazy reader) is loaded."""
    items = [_case(tmp_path / "a", (15, 12, 9), 0, ".h5", ".nii", channels=2, values=True),
             _case(tmp_path / "b", (15, 12, 9), 1, ".nii", ".h5", channels=2, values=True)]
    streamed = _same_samples(items, offsets=(-1, 0, 1), planes=("xy", "zy"), patch_size=(10, 10),
                             label_transform=lambda v: brats_label(np.asarray(v)[0], "label"),
                             normalize={"lower": 0.5, "upper": 99.5}, cache_dtype="float16")
    assert streamed.label_channels == [3, 3]
    nrrd = [_case(tmp_path / "n", (9, 8, 7), 2, ".nrrd", ".nrrd")]
    loaded = SlabDataset(nrrd, samples_per_epoch=4, stream=True, patch_size=(8, 8))
    assert not isinstance(loaded.images[0], LazyVolume) and loaded.sample(0, 0)["image"].shape == (3, 8, 8)


def test_a_streamed_sample_reads_only_its_slab(tmp_path, monkeypatch):
    """A 64x64 sample of a 96x80x40 zarr volume reads, of the label, the window and (to centre a
    positive draw) one row of the slice; of the image, the slab's slices at the window in one
    read; never a whole slice or the volume."""
    from slab.io import arrays as chunked

    items = [_case(tmp_path / "big", (96, 80, 40), 4)]
    ds = SlabDataset(items, samples_per_epoch=30, stream=True, patch_size=(64, 64), planes=("xy", "zx", "zy"))
    read = []
    original = chunked.ArrayVolume._read

    def counted(self, *index):
        out = original(self, *index)
        read.append((self.meta["filename_or_obj"], out.size))
        return out

    monkeypatch.setattr(chunked.ArrayVolume, "_read", counted)
    rows_read = 0
    for i in range(30):
        sample = ds.sample(i, 0)
        axis = "xy zx zy".split().index(sample["plane"])
        window = 64 * (64 if axis == 0 else 40)  # the patch within the slice (zx, zy slices are 40 deep)
        row = (80, 40, 40)[axis]  # a row of the slice: its second axis
        image = [n for name, n in read if name.endswith("image.zarr")]
        label = [n for name, n in read if name.endswith("label.zarr")]
        assert len(image) == 1 and image[0] in (2 * window, 3 * window)  # 3 slices, 2 where clamped at an edge
        assert sorted(label) in ([2 * window], sorted([2 * window, 2 * row]))  # both channels
        rows_read += len(label) == 2
        read.clear()
    assert rows_read > 5  # positive draws read a row to find their centre
    whole = SlabDataset(items, samples_per_epoch=30, patch_size=(64, 64), planes=("xy", "zx", "zy"))
    for i in range(30):  # and they are the in-memory samples
        np.testing.assert_array_equal(ds.sample(i, 0)["image"].numpy(), whole.sample(i, 0)["image"].numpy())


def test_streaming_refuses_what_it_cannot_read_in_parts(tmp_path):
    items = [_case(tmp_path / "a", (9, 8, 7), 0)]
    with pytest.raises(SlabError, match="voxel-wise label transform"):
        SlabDataset(items, samples_per_epoch=2, stream=True, label_transform=lambda v: np.asarray(v)[:, :4])
    float_items = [_case(tmp_path / "f", (9, 8, 7), 1)]
    bad = np.full((1, 9, 8, 7), np.nan, np.float32)
    save_volume(MetaTensor(torch.from_numpy(bad), affine=torch.as_tensor(AFFINE)), tmp_path / "f" / "nan.zarr")
    float_items[0]["image"] = str(tmp_path / "f" / "nan.zarr")
    with pytest.raises(SlabError, match="nan.zarr: NaN or Inf"):
        SlabDataset(float_items, samples_per_epoch=2, stream=True, normalize=None).sample(0, 0)


def test_training_that_streams_gives_the_same_run(tmp_path, monkeypatch):
    """``stream: true`` in the training config: the same losses and validation as in memory, the
    validation volumes predicted out of core (never loaded) into stores in the run folder."""
    from slab.pipeline.inference import store
    from slab.pipeline.training import train
    from test_train import TINY

    stores, predict_blocks = [], store.predict_blocks
    monkeypatch.setattr(store, "predict_blocks", lambda model, volume, out_path, *a, **k: (
        stores.append(Path(out_path)), predict_blocks(model, volume, out_path, *a, **k))[1])

    datalist = _datalist(tmp_path, (16, 15, 13))
    cfg = {**json.loads(json.dumps(TINY)), "patch_size": [16, 16], "epochs": 1}
    runs = [train(datalist, {**cfg, "stream": stream, "num_workers": workers}, tmp_path / f"run{stream}{workers}",
                  device="cpu") for stream, workers in ((False, 0), (True, 0), (True, 2))]
    assert "val_surface_dice_0" in runs[0]["history"][0]
    assert len(stores) >= 2 and all(p.parent.parent.name.startswith("runTrue") for p in stores)
    for run in runs[1:]:  # also read by DataLoader worker processes (zarr opened before the fork)
        for a, b in zip(runs[0]["history"], run["history"]):  # validation predicted out of core: the same scores
            # (the calibration error over the body needs the whole volume: a streamed validation has none)
            assert "val_ece" in a and "val_ece" not in b
            assert {k: v for k, v in a.items() if "_s" not in k and k != "val_ece"} == \
                {k: v for k, v in b.items() if "_s" not in k}
    assert not list(tmp_path.glob("runTrue*/.validation-*"))  # the validation stores are removed


def _volume_3d(tmp_path, shape=(7, 40, 5)):
    """A zarr scan and label, smaller than the 8^3 patch in x and z, longer than a cube in y."""
    rng = np.random.default_rng(7)
    image = rng.integers(100, 1000, (1,) + shape).astype(np.uint16)
    label = np.zeros((1,) + shape, np.uint8)
    fg = [(0, 0, 0), (3, 17, 2), (6, 33, 4), (2, 39, 1), (5, 31, 3)]  # cubes of 32 cut y at 32
    for voxel in fg:
        label[(0,) + voxel] = 1
    for name, data in (("image", image), ("label", label)):
        save_volume(MetaTensor(torch.from_numpy(data), affine=torch.as_tensor(AFFINE)), tmp_path / f"{name}.zarr")
    return str(tmp_path / "image.zarr"), str(tmp_path / "label.zarr"), image, label, fg


def test_streamed_3d_patches_draw_as_monai_crops(tmp_path):
    """Every foreground (background) voxel is an equally likely centre, as in MONAI's
    RandCropByPosNegLabeld over FgBgToIndicesd of the padded volume (padding is background), and
    the patch around a centre is MONAI's crop of the padded, normalised volume."""
    from monai.transforms import SpatialCrop, SpatialPad
    from monai.transforms.utils import correct_crop_centers

    from slab.pipeline.data.patches import StreamedVolume
    from slab.transforms.intensity import PercentileNormalize
    from slab.io.volumes import load_volume

    image_path, label_path, image, label, fg = _volume_3d(tmp_path)
    norm = PercentileNormalize(1, 99)
    volume = StreamedVolume(load_volume(image_path, lazy=True), load_volume(label_path, lazy=True), (8, 8, 8),
                            norm.block_transform(load_volume(image_path, lazy=True)), None, "scan")
    assert volume.padded == (8, 40, 8) and volume.before == (0, 0, 1) and volume.fg == 5
    pad = SpatialPad((8, 8, 8))
    padded_image = pad(norm(load_volume(image_path))).numpy()
    padded_label = pad(torch.from_numpy(label)).numpy()
    rng = np.random.default_rng(0)
    seen = {}
    for _ in range(1500):
        centre = volume.centre(True, rng)
        seen[centre] = seen.get(centre, 0) + 1
    assert sorted(seen) == sorted((x, y, z + 1) for x, y, z in fg)  # the label's voxels, shifted by the padding
    assert all(abs(n / 1500 - 0.2) < 0.06 for n in seen.values())
    background = [volume.centre(False, rng) for _ in range(3000)]
    assert all(padded_label[(0,) + c] == 0 for c in background)
    in_padding = np.mean([not 1 <= c[2] < 6 for c in background])
    assert abs(in_padding - 3 / 8) < 0.04  # 3 of the 8 padded z slices, of 8 * 40 * 8 - 5 background voxels
    for centre in list(seen) + background[:40]:
        patch = volume.crop(centre)
        crop = SpatialCrop(roi_center=correct_crop_centers(list(centre), (8, 8, 8), (8, 40, 8)), roi_size=(8, 8, 8))
        np.testing.assert_array_equal(patch["image"], crop(torch.from_numpy(padded_image)).numpy())
        np.testing.assert_array_equal(patch["label"], crop(torch.from_numpy(padded_label)).numpy())


def test_3d_training_that_streams(tmp_path):
    """``stream: true`` for 3D patches: positives as often as pos_neg asks, a finished run."""
    from slab.pipeline.training import train
    from test_train import TINY

    datalist = _datalist(tmp_path, (17, 15, 13))
    cfg = {**json.loads(json.dumps(TINY)), "task": "segmentation_3d", "patch_size": [8, 8, 8], "epochs": 1,
           "stream": True, "pos_neg": [3.0, 1.0]}
    cfg.pop("planes")
    result = train(datalist, cfg, tmp_path / "run", device="cpu")
    assert np.isfinite(result["history"][0]["train_loss"]) and "val_dice" in result["history"][0]
