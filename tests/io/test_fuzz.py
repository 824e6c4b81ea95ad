"""Fuzzing (hypothesis, bounded): the RLE codec, both CSV readers, the volume loader on mutated
NIfTI / NRRD / MHA / PNG / TIFF bytes, network / bundle / training configs and datalists.

Only :class:`SlabError` may escape, and nothing may allocate past a bound: every example runs
under an address-space cap of 1 GiB above what the process already maps, and a refusal must come
from slab's own checks (a message about an allocation that failed means a header was trusted).
"""
from __future__ import annotations

import gzip
import json
import resource
import tempfile
from contextlib import contextmanager
from pathlib import Path

import imagecodecs
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slab.core.errors import SlabError

SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
ALLOCATION_WORDS = ("alloc", "memory", "bad_alloc")


def _mapped_bytes() -> int:
    for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


@contextmanager
def memory_cap(extra: int = 1 << 30):
    """Cap the address space at what is mapped now plus ``extra`` while the block runs."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _mapped_bytes() + extra
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def only_slab_errors(fn, *args, **kwargs):
    """``fn(*args)`` under the memory cap; a SlabError is fine unless it reports a failed allocation."""
    with memory_cap():
        try:
            fn(*args, **kwargs)
        except SlabError as err:
            message = str(err).lower()
            assert not any(word in message for word in ALLOCATION_WORDS) or "needs" in message, message
            assert "\n" not in str(err), str(err)


# ---------------------------------------------------------------------------------------------
# RLE and CSVs


rle_text = st.one_of(
    st.text(alphabet="0123456789 -+\t\n", max_size=60),
    st.lists(st.integers(-10, 2 ** 70), max_size=8).map(lambda xs: " ".join(map(str, xs))),
    st.text(max_size=30),
)


@settings(**SETTINGS, max_examples=300)
@given(rle=rle_text, rows=st.integers(1, 9), cols=st.integers(1, 9), order=st.sampled_from(["C", "F"]))
def test_rle_decode_takes_anything(rle, rows, cols, order):
    from slab.io.rle import rle_decode, rle_encode

    try:
        mask = rle_decode(rle, (rows, cols), order)
    except SlabError:
        return
    assert mask.shape == (rows, cols) and mask.dtype == np.uint8
    assert np.array_equal(rle_decode(rle_encode(mask, order), (rows, cols), order), mask)


@settings(**SETTINGS, max_examples=150)
@given(data=st.one_of(st.binary(max_size=300),
                      st.lists(st.lists(st.text(max_size=12), max_size=4), max_size=5).map(
                          lambda rows: "\n".join(",".join(r) for r in [["id", "rle"]] + rows).encode()),
                      st.lists(st.tuples(st.sampled_from(["kidney_1_0000", "kidney_1_0001", "k_x", ""]), rle_text),
                               max_size=4).map(
                          lambda rows: ("id,rle\n" + "".join(f"{i},{r}\n" for i, r in rows)).encode())))
def test_sennet_csv_reader_takes_anything(tmp_path, data):
    from slab.io.rle import read_sennet_rles, sennet_label

    path = Path(tempfile.mkdtemp(dir=tmp_path)) / "train_rles.csv"
    path.write_bytes(data)

    def read():
        for rles in read_sennet_rles(path).values():
            sennet_label(rles, (4, 3, 2))

    only_slab_errors(read)


@settings(**SETTINGS, max_examples=150)
@given(data=st.one_of(st.binary(max_size=300),
                      st.lists(st.tuples(st.sampled_from(["case1_day2_slice_0001", "case1_day2_slice_0009", "x"]),
                                         st.sampled_from(["stomach", "large_bowel", "liver", ""]), rle_text),
                               max_size=4).map(
                          lambda rows: ("id,class,segmentation\n" + "".join(
                              f"{i},{c},{r}\n" for i, c, r in rows)).encode())))
def test_uwmgi_csv_reader_takes_anything(tmp_path, data):
    from slab.io.rle import read_uwmgi_rles, uwmgi_label

    path = Path(tempfile.mkdtemp(dir=tmp_path)) / "train.csv"
    path.write_bytes(data)

    def read():
        for rles in read_uwmgi_rles(path).values():
            uwmgi_label(rles, (4, 3, 2))

    only_slab_errors(read)


# ---------------------------------------------------------------------------------------------
# Volume files with mutated bytes


def _nifti(path: Path) -> None:
    nib.save(nib.Nifti1Image(np.arange(120, dtype=np.int16).reshape(4, 5, 6), np.diag([0.5, 0.5, 2, 1])), path)


def _itk(path: Path) -> None:
    image = sitk.GetImageFromArray(np.arange(120, dtype=np.uint8).reshape(6, 5, 4))
    image.SetSpacing((0.5, 0.5, 2.0))
    sitk.WriteImage(image, str(path), path.suffix == ".nrrd")  # the NRRD compressed, the MHA raw


def _stack(path: Path, fmt: str) -> None:
    path.mkdir()
    for z in range(2):
        image = np.full((5, 4), 40 * z, np.uint16)
        if fmt == "png":
            (path / f"{z:04d}.png").write_bytes(imagecodecs.png_encode(image))
        else:
            tifffile.imwrite(path / f"{z:04d}.tif", image)


def _mutate(data: bytes, edits, header: int) -> bytes:
    out = bytearray(data)
    for kind, where, value in edits:
        if not out:
            break
        at = where % min(len(out), header)
        if kind == "set":
            out[at] = value % 256
        elif kind == "int32":
            out[at:at + 4] = (int(value) % 2 ** 32).to_bytes(4, "little")
        elif kind == "truncate":
            out = out[:at]
        elif kind == "insert":
            out[at:at] = bytes([value % 256]) * (1 + value % 7)
        elif kind == "digits":  # text headers: a number grows or turns negative
            out[at:at] = str(value).encode()
    return bytes(out)


edits = st.lists(st.tuples(st.sampled_from(["set", "int32", "truncate", "insert", "digits"]),
                           st.integers(0, 10 ** 6), st.integers(-(2 ** 31), 2 ** 32 - 1)), min_size=1, max_size=6)
FORMATS = {
    "nii": (lambda p: _nifti(p), "v.nii", 352),
    "nii.gz": (lambda p: _nifti(p), "v.nii.gz", 352),
    "mha": (lambda p: _itk(p), "v.mha", 400),
    "nrrd": (lambda p: _itk(p), "v.nrrd", 300),
    "png": (lambda p: _stack(p, "png"), "s", 60),
    "tif": (lambda p: _stack(p, "tif"), "s", 200),
}


@pytest.mark.parametrize("fmt", list(FORMATS))
@settings(**SETTINGS, max_examples=80)
@given(changes=edits)
def test_the_loader_takes_mutated_files(tmp_path, fmt, changes):
    from slab.io.volumes import load_volume

    make, name, header = FORMATS[fmt]
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    path = folder / name
    make(path)
    if fmt == "nii.gz":  # mutate the header inside the gzip stream, as a writer's bug would
        raw = gzip.decompress(path.read_bytes())
        path.write_bytes(gzip.compress(_mutate(raw, changes, header)))
    elif path.is_dir():
        victim = sorted(path.iterdir())[1]
        victim.write_bytes(_mutate(victim.read_bytes(), changes, header))
    else:
        path.write_bytes(_mutate(path.read_bytes(), changes, header))

    def load():
        volume = load_volume(path)
        assert volume.ndim == 4 and volume.numel() * volume.element_size() <= 1032 * 4096

    only_slab_errors(load)
    only_slab_errors(lambda: load_volume(path, lazy=True)[:, :1] if fmt in ("nii", "png", "tif") else None)


# ---------------------------------------------------------------------------------------------
# Configs and datalists


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 40), 2 ** 40), st.floats(allow_nan=True),
              st.text(max_size=8), st.sampled_from(["unet", "xy", "flips", "2.5d", "3d", "instance", "$@x", "@y"])),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
small_ints = st.lists(st.integers(-2, 40), min_size=0, max_size=5)


def network_configs():
    return st.fixed_dictionaries(
        {"name": st.sampled_from(["unet", "basic_unet", "segresnet", "swin_unetr", "flexible_unet", "nope", 3]),
         "spatial_dims": st.sampled_from([2, 3, 1, "2", None]),
         "in_channels": st.sampled_from([1, 3, 0, -1, 2.5, "3"]),
         "out_channels": st.sampled_from([1, 2, 0, None])},
        optional={"channels": st.one_of(small_ints, json_values), "strides": st.one_of(small_ints, json_values),
                  "features": small_ints, "feature_size": st.sampled_from([12, 0, 7, 24, 10 ** 9]),
                  "depths": small_ints, "init_filters": st.integers(-1, 16), "blocks_down": small_ints,
                  "backbone": st.sampled_from(["resnet10", "efficientnet-b0", "vgg", 5]),
                  "offsets": st.one_of(small_ints, json_values), "planes": json_values, "roi_size": small_ints,
                  "labels": json_values, "kernel_size": st.integers(-1, 7), "num_res_units": st.integers(-1, 3),
                  "bogus": json_values})


@settings(**SETTINGS, max_examples=150)
@given(config=network_configs())
def test_network_configs_take_anything(config):
    from slab.pipeline.inference import Predictor

    only_slab_errors(lambda: Predictor(config, normalize=None))


@settings(**SETTINGS, max_examples=120)
@given(section=st.fixed_dictionaries({"network": st.one_of(network_configs(), json_values)},
                                     optional={k: json_values for k in ("planes", "offsets", "tta", "normalize",
                                                                        "postprocess", "roi_size", "overlap",
                                                                        "batch_size", "mode", "labels")}))
def test_bundle_sections_take_anything(tmp_path, section):
    from slab.pipeline.inference import Predictor

    bundle = Path(tempfile.mkdtemp(dir=tmp_path))
    (bundle / "configs").mkdir()
    (bundle / "configs" / "inference.json").write_text(json.dumps({"slab": section}), encoding="utf-8")
    only_slab_errors(lambda: Predictor.from_bundle(bundle))


@settings(**SETTINGS, max_examples=200)
@given(config=st.dictionaries(st.sampled_from(["task", "network", "offsets", "planes", "normalize", "epochs",
                                               "batch_size", "samples_per_epoch", "patch_size", "lr", "augment",
                                               "val", "classification", "loss", "seed", "warmup_epochs"]),
                              json_values, max_size=6))
def test_training_configs_take_anything(config):
    from slab.pipeline.training import validate_config

    only_slab_errors(validate_config, config)


@settings(**SETTINGS, max_examples=200)
@given(datalist=st.one_of(json_values, st.fixed_dictionaries(
    {"training": st.lists(st.dictionaries(st.sampled_from(["image", "label", "fold", "case", "targets"]),
                                          json_values, max_size=5), max_size=3)},
    optional={"validation": json_values, "n_folds": json_values, "labels": json_values})),
    fold=st.sampled_from([None, 0, 1, -1, "a"]))
def test_datalists_take_anything(tmp_path, datalist, fold):
    from slab.pipeline.data.datalist import load_datalist

    path = Path(tempfile.mkdtemp(dir=tmp_path)) / "datalist.json"
    path.write_text(json.dumps(datalist), encoding="utf-8")
    only_slab_errors(load_datalist, path, fold=fold)


# ---------------------------------------------------------------------------------------------
# Chunked stores' metadata and chunks, plans, model files and checkpoints' specs

json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2 ** 40, 2 ** 40),
                                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8)),
                           lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                   st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                           max_leaves=8)


def _read_all(path):
    from slab.io.volumes import load_volume

    np.asarray(load_volume(path, lazy=True)[:, :4, :4, :4])


@settings(**SETTINGS, max_examples=60)
@given(key=st.sampled_from(["shape", "chunks", "dtype", "compressor", "fill_value", "order", "dimension_separator",
                            "filters", "zarr_format"]), value=json_values, chunk=st.binary(max_size=64))
def test_zarr_metadata_and_chunks_take_anything(tmp_path, key, value, chunk):
    store = Path(tempfile.mkdtemp(dir=tmp_path)) / "s.zarr"
    store.mkdir()
    meta = {"zarr_format": 2, "shape": [8, 6, 4], "chunks": [4, 6, 4], "dtype": "<u2", "compressor": None,
            "fill_value": 0, "order": "C", "filters": None}
    meta[key] = value
    (store / ".zarray").write_text(json.dumps(meta))
    (store / "0.0.0").write_bytes(chunk)
    only_slab_errors(_read_all, store)


@settings(**SETTINGS, max_examples=60)
@given(key=st.sampled_from(["dimensions", "blockSize", "dataType", "compression", "pixelResolution", "resolution",
                            "offset"]), value=json_values, block=st.binary(max_size=64))
def test_n5_attributes_and_blocks_take_anything(tmp_path, key, value, block):
    store = Path(tempfile.mkdtemp(dir=tmp_path)) / "s.n5"
    (store / "0" / "0").mkdir(parents=True)
    attrs = {"n5": "2.5.0", "dimensions": [4, 6, 8], "blockSize": [4, 6, 4], "dataType": "uint16",
             "compression": {"type": "raw"}}
    attrs[key] = value
    (store / "attributes.json").write_text(json.dumps(attrs))
    (store / "0" / "0" / "0").write_bytes(block)
    only_slab_errors(_read_all, store)


@settings(**SETTINGS, max_examples=40)
@given(value=json_values)
def test_hdf5_voxel_sizes_take_anything(tmp_path, value):
    import h5py

    path = Path(tempfile.mkdtemp(dir=tmp_path)) / "s.h5"
    with h5py.File(path, "w") as f:
        data = f.create_dataset("volume", data=np.zeros((4, 5, 6), np.uint8))
        try:
            data.attrs["element_size_um"] = value
        except (TypeError, ValueError):
            data.attrs["element_size_um"] = json.dumps(value)
    only_slab_errors(_read_all, path)


@settings(**SETTINGS, max_examples=100)
@given(key=st.sampled_from(["configurations", "folds", "labels", "tubular", "tolerance_mm"]), value=json_values)
def test_plans_take_anything(key, value):
    from slab.pipeline.planning.plandir import check_plans

    plans = {"configurations": {"2d": {"config": {"task": "segmentation_2p5d"}}}, "folds": [0, 1], "labels": ["a"],
             "tubular": [], "tolerance_mm": 1.0}
    plans[key] = value
    only_slab_errors(check_plans, plans, "plans.json")


@settings(**SETTINGS, max_examples=100)
@given(spec=st.one_of(json_values, st.dictionaries(st.sampled_from(["network", "normalize", "tta", "postprocess",
                                                                    "activation", "mode"]), json_values, max_size=4)),
       config=json_values)
def test_checkpoint_specs_take_anything(spec, config):
    from slab.pipeline.model.spec import spec_of_state
    from slab.pipeline.inference.predictor import Predictor

    def use():
        found = spec_of_state({"model": {}, "config": config, "inference": spec}, "doctored.pt")
        Predictor.from_spec(found, None, device="cpu")

    only_slab_errors(use)


@settings(**SETTINGS, max_examples=100)
@given(postprocess=st.one_of(json_values, st.dictionaries(st.sampled_from(["threshold", "hysteresis", "argmax",
                                                                           "labels", "min_size", "fill_holes"]),
                                                          json_values, max_size=3)))
def test_model_postprocessing_takes_anything(postprocess):
    from slab.pipeline.model.spec import check_probability_thresholds
    from slab.transforms.post import make_postprocess

    def use():
        if not isinstance(postprocess, dict):
            raise SlabError("postprocess: not an object")
        make_postprocess(postprocess)
        check_probability_thresholds(postprocess)

    only_slab_errors(use)


@pytest.fixture(scope="module")
def model_archive(tmp_path_factory) -> bytes:
    """A small valid ``slab export`` archive: model.json and one slim checkpoint."""
    import io
    import zipfile

    import torch

    from slab.networks import build_network

    net = {"name": "unet", "spatial_dims": 2, "in_channels": 3, "out_channels": 1, "channels": [4, 8], "strides": [2]}
    state = {"model": build_network(**net).state_dict(), "config": {}, "network": net,
             "inference": {"network": net, "postprocess": {"threshold": 0.5}}}
    buffer, member = io.BytesIO(), io.BytesIO()
    torch.save(state, member)
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("model.json", json.dumps({"members": [{"checkpoint": "members/00.pt"}], "postprocess": {}}))
        zf.writestr("members/00.pt", member.getvalue())
    return buffer.getvalue()


@settings(**SETTINGS, max_examples=60)
@given(changes=st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(0, 255)), min_size=1, max_size=6))
def test_install_takes_mutated_archives(tmp_path, model_archive, changes):
    from slab.pipeline.model.archive import install_model

    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    data = bytearray(model_archive)
    for offset, value in changes:
        data[offset % len(data)] = value
    (folder / "m.zip").write_bytes(bytes(data))
    only_slab_errors(install_model, folder / "m.zip", home=folder / "home")
