"""Every command over a generated corpus of bad inputs: exit status 2, one stderr line that starts
``slab: error:`` and names the file or argument, no traceback, and no file created, changed or
removed (temporaries in TMPDIR included).

The corpus covers each category of bad input a user brings: broken or lying volume headers
(NIfTI, MetaImage, NRRD, PNG, TIFF, JPEG 2000, DICOM series with gaps), zarr stores that pickle
or hold several arrays or a time series, HDF5 files that are junk or name no one dataset,
directories that are not volumes,
CSVs that are not UTF-8 or lack fields, RLE numbers past int64, JSON of the wrong types or nested
too deep, weights that are not weights, bundles that are not bundles, datalists of the wrong
types, out-of-range arguments, and outputs that would overwrite an input or collide.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import resource
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from slab.networks import build_network, save_weights
from slab.pipeline.cli import main

NET = {"name": "unet", "spatial_dims": 2, "in_channels": 3, "out_channels": 1, "channels": [4, 8], "strides": [2]}
AFFINE = np.diag([0.8, 0.8, 2.5, 1.0])


# ---------------------------------------------------------------------------------------------
# Good files, built once: every bad case breaks one thing


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    rng = np.random.default_rng(0)
    image = rng.normal(100, 20, (12, 10, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(image, AFFINE), root / "image.nii.gz")
    nib.save(nib.Nifti1Image((image > 110).astype(np.uint8), AFFINE), root / "label.nii.gz")
    nib.save(nib.Nifti1Image(rng.random((12, 10, 8)).astype(np.float32), AFFINE), root / "prob.nii.gz")
    torch.manual_seed(0)
    (root / "net.json").write_text(json.dumps(NET), encoding="utf-8")
    save_weights(build_network(**NET), root / "net.pt")
    item = {"image": str(root / "image.nii.gz"), "label": str(root / "label.nii.gz")}
    (root / "datalist.json").write_text(json.dumps({"training": [item], "validation": [item]}), encoding="utf-8")
    (root / "config.json").write_text(json.dumps({"epochs": 1, "batch_size": 2, "samples_per_epoch": 2,
                                                  "network": {"name": "unet", "channels": [4, 8], "strides": [2]},
                                                  "progress": False}), encoding="utf-8")
    bundle = root / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    (bundle / "configs" / "inference.json").write_text(json.dumps({"slab": {"network": NET}}), encoding="utf-8")
    (bundle / "configs" / "metadata.json").write_text("{}", encoding="utf-8")
    (bundle / "configs" / "evaluate.json").write_text("{}", encoding="utf-8")
    shutil.copy(root / "net.pt", bundle / "models" / "model.pt")
    return root


def _nifti_bytes(shape=(4, 4, 4), dtype=np.uint8) -> bytes:
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    return header.binaryblock + b"\0" * 4


# Bad volumes: name -> (writer(path) -> the path to give, a piece of the expected message)
def _truncated(d: Path) -> Path:
    path = d / "truncated.nii"
    path.write_bytes(_nifti_bytes((20, 20, 20)) + b"\1" * 100)
    return path


def _claims_huge(d: Path) -> Path:
    path = d / "huge.nii.gz"  # 55 bytes claiming 1.4 GB
    path.write_bytes(gzip.compress(_nifti_bytes((1400, 1000, 1000))))
    return path


def _garbage_header(d: Path) -> Path:
    path = d / "garbage.nii"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 600, dtype=np.uint8).tobytes())
    return path


def _zero_dim(d: Path) -> Path:
    raw = bytearray(_nifti_bytes((4, 4, 4)))
    struct.pack_into("<8h", raw, 40, 3, 4, 0, 4, 1, 1, 1, 1)  # dim[2] = 0
    path = d / "zero.nii"
    path.write_bytes(bytes(raw) + b"\0" * 64)
    return path


def _zero_pixdim(d: Path) -> Path:
    raw = bytearray(_nifti_bytes((4, 4, 4)))
    struct.pack_into("<8f", raw, 76, 1, float("nan"), 0, 0, 0, 0, 0, 0)  # pixdim NaN and 0
    struct.pack_into("<h", raw, 252, 1)  # qform from pixdim; sform code 1 with an all-zero sform
    struct.pack_into("<h", raw, 254, 1)
    path = d / "pixdim.nii"
    path.write_bytes(bytes(raw) + b"\0" * 64)
    return path


def _short(d: Path) -> Path:
    path = d / "short.nii"
    path.write_bytes(b"\x5c\x01\0\0junk")
    return path


def _text_as_nifti(d: Path) -> Path:
    path = d / "notes.nii.gz"
    path.write_text("scan notes, not an image\n", encoding="utf-8")
    return path


def _flat(d: Path) -> Path:
    path = d / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((5, 5), np.float32), np.eye(4)), path)
    return path


def _five_d(d: Path) -> Path:
    path = d / "fived.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3, 2, 2), np.float32), np.eye(4)), path)
    return path


def _mha_ndims(d: Path) -> Path:
    path = d / "ndims.mha"
    path.write_text("ObjectType = Image\nNDims = 2147483648\nDimSize = 10 10 10\nElementType = MET_UCHAR\n"
                    "ElementDataFile = LOCAL\n", encoding="ascii")
    return path


def _mha_claims(d: Path) -> Path:
    path = d / "claims.mha"
    path.write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 1000 1000 1000\nElementType = MET_FLOAT\n"
                     b"ElementDataFile = LOCAL\n" + b"\0" * 100)
    return path


def _mha_dims_mismatch(d: Path) -> Path:
    path = d / "dims.mha"
    path.write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 4 4\nElementType = MET_UCHAR\n"
                     b"ElementDataFile = LOCAL\n" + b"\0" * 16)
    return path


def _mhd_missing_raw(d: Path) -> Path:
    path = d / "lost.mhd"
    path.write_text("ObjectType = Image\nNDims = 3\nDimSize = 2 2 2\nElementType = MET_UCHAR\n"
                    "ElementDataFile = lost.raw\n", encoding="ascii")
    return path


def _nrrd_magic(d: Path) -> Path:
    path = d / "magic.nrrd"
    path.write_bytes(b"NOTNRRD\ntype: uint8\n\n\0\0")
    return path


def _nrrd_huge(d: Path) -> Path:
    path = d / "huge.nrrd"
    path.write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 4000 4000 4000\nencoding: gzip\n\n"
                     + zlib.compress(b"\0" * 64))
    return path


def _nrrd_type(d: Path) -> Path:
    path = d / "type.nrrd"
    path.write_bytes(b"NRRD0004\ntype: quaternion\ndimension: 3\nsizes: 2 2 2\nencoding: raw\n\n" + b"\0" * 8)
    return path


def _png_stack(d: Path, name: str, slices: list[bytes]) -> Path:
    folder = d / name
    folder.mkdir()
    for i, data in enumerate(slices):
        (folder / f"{i:04d}.png").write_bytes(data)
    return folder


def _good_png(width=6, height=5) -> bytes:
    import imagecodecs

    return imagecodecs.png_encode(np.zeros((height, width), np.uint8))


def _png_claims(d: Path) -> Path:
    good = bytearray(_good_png())
    struct.pack_into(">II", good, 16, 100000, 100000)  # IHDR says 100000 x 100000 (CRC left stale)
    return _png_stack(d, "pngclaims", [_good_png(), bytes(good)])


def _png_text(d: Path) -> Path:
    return _png_stack(d, "pngtext", [_good_png(), b"this is not a PNG"])


def _png_sizes(d: Path) -> Path:
    return _png_stack(d, "pngsizes", [_good_png(6, 5), _good_png(7, 5)])


def _tiff_claims(d: Path) -> Path:
    import tifffile

    folder = d / "tiffclaims"
    folder.mkdir()
    tifffile.imwrite(folder / "0000.tif", np.zeros((4, 4), np.uint16))
    raw = bytearray((folder / "0000.tif").read_bytes())
    # Patch ImageWidth (tag 256) to 3.7e9 in the first IFD.
    offset = struct.unpack_from("<I", raw, 4)[0]
    count = struct.unpack_from("<H", raw, offset)[0]
    for k in range(count):
        entry = offset + 2 + 12 * k
        tag, kind = struct.unpack_from("<HH", raw, entry)
        if tag == 256:
            struct.pack_into("<HHII", raw, entry, 256, 4, 1, 3_700_000_000)
    (folder / "0001.tif").write_bytes(bytes(raw))
    shutil.copy(folder / "0000.tif", folder / "0002.tif")
    return folder


def _empty_dir(d: Path) -> Path:
    (d / "empty").mkdir()
    return d / "empty"


def _subfolders(d: Path) -> Path:
    (d / "kidney" / "images").mkdir(parents=True)
    (d / "kidney" / "labels").mkdir()
    return d / "kidney"


def _dicom_gaps(d: Path) -> Path:
    from pydicom.data import get_testdata_file

    source = Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests" / "77654033" / "CT2"
    shutil.copytree(source, d / "CT2")
    return d / "CT2"


def _nan(d: Path) -> Path:
    data = np.random.default_rng(2).random((12, 10, 8)).astype(np.float32)
    data[1, 2, 3] = np.nan
    path = d / "nan.nii.gz"
    nib.save(nib.Nifti1Image(data, AFFINE), path)
    return path


def _zarr_pickle(d: Path) -> Path:
    store = d / "pickled.zarr"
    store.mkdir()
    (store / ".zarray").write_text(json.dumps({
        "zarr_format": 2, "shape": [4, 4, 4], "chunks": [4, 4, 4], "dtype": "|O", "compressor": None,
        "fill_value": None, "order": "C", "filters": [{"id": "pickle"}]}), encoding="utf-8")
    (store / "0.0.0").write_bytes(b"\x80\x04N.")
    return store


def _zarr_two_arrays(d: Path) -> Path:
    import zarr

    group = zarr.open_group(str(d / "two.zarr"), mode="w")
    for name in ("raw", "seg"):
        group.create_array(name, shape=(4, 4, 4), dtype="u1")
    return d / "two.zarr"


def _zarr_bad_chunk(d: Path) -> Path:
    import zarr

    array = zarr.create_array(str(d / "chunk.zarr"), shape=(4, 4, 4), chunks=(2, 2, 2), dtype="u2", zarr_format=2)
    array[...] = 7
    (d / "chunk.zarr" / "0.0.0").write_bytes(b"not a compressed chunk")
    return d / "chunk.zarr"


def _ome_time_series(d: Path) -> Path:
    import zarr

    group = zarr.open_group(str(d / "time.zarr"), mode="w", zarr_format=2)
    group.create_array("0", shape=(3, 4, 4, 4), dtype="u1")
    group.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": "t", "type": "time"}] + [
        {"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"], "datasets": [{"path": "0"}]}]
    return d / "time.zarr"


def _hdf5_many(d: Path) -> Path:
    import h5py

    with h5py.File(d / "many.h5", "w") as handle:
        handle["raw"] = np.zeros((4, 4, 4), np.uint8)
        handle["seg"] = np.zeros((4, 4, 4), np.uint8)
    return d / "many.h5"


def _hdf5_junk(d: Path) -> Path:
    (d / "junk.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(64))
    return d / "junk.h5"


def _tiff_rgb(d: Path) -> Path:
    import tifffile

    tifffile.imwrite(d / "rgb.tif", np.zeros((5, 4, 4, 3), np.uint8), photometric="rgb")
    return d / "rgb.tif"


def _jp2_header(d: Path) -> Path:
    import imagecodecs

    folder = d / "jp2"
    folder.mkdir()
    (folder / "0000.jp2").write_bytes(imagecodecs.jpeg2k_encode(np.zeros((5, 6), np.uint16), level=0))
    (folder / "0001.jp2").write_bytes(b"\x00\x00\x00\x0cjP  \r\n\x87\n" + bytes(30))
    return folder


def _zarr_v2(d: Path, name: str) -> Path:
    import zarr

    z = zarr.open_array(str(d / name), mode="w", shape=(8, 10, 12), chunks=(4, 10, 12), dtype="u2", zarr_format=2)
    z[:] = 3
    return d / name


def _zarr_chunk_folder(d: Path) -> Path:
    path = _zarr_v2(d, "folderchunk.zarr")
    os.remove(path / "0.0.0")
    os.mkdir(path / "0.0.0")  # zarr would read it as zeros
    return path


def _zarr_chunk_dev_zero(d: Path) -> Path:
    path = _zarr_v2(d, "devzero.zarr")
    os.remove(path / "0.0.0")
    os.symlink("/dev/zero", path / "0.0.0")
    return path


def _zarr_chunk_sparse(d: Path) -> Path:
    path = _zarr_v2(d, "sparse.zarr")
    with open(path / "0.0.0", "r+b") as f:
        f.truncate(2 << 30)  # 2 GiB, no disk used
    return path


def _n5_block_dev_zero(d: Path) -> Path:
    path = d / "devzero.n5"
    path.mkdir()
    (path / "attributes.json").write_text(json.dumps({"n5": "2.5.0", "dimensions": [12, 10, 8], "blockSize": [12, 10, 4],
                                                      "dataType": "uint16", "compression": {"type": "raw"}}))
    (path / "0" / "0").mkdir(parents=True)
    os.symlink("/dev/zero", path / "0" / "0" / "0")
    return path


def _ome_zarr_escape(d: Path) -> Path:
    from monai.data import MetaTensor

    from slab.io.volumes import save_volume

    save_volume(MetaTensor(torch.ones(1, 6, 5, 4), affine=torch.eye(4)), d / "other.zarr")
    shutil.copytree(d / "other.zarr", d / "escape.zarr")
    attrs = json.loads((d / "escape.zarr" / ".zattrs").read_text())
    attrs["multiscales"][0]["datasets"][0]["path"] = "../other.zarr/0"
    (d / "escape.zarr" / ".zattrs").write_text(json.dumps(attrs))
    return d / "escape.zarr"


def _tiff_pages_differ(d: Path) -> Path:
    import tifffile

    with tifffile.TiffWriter(d / "pages.tif") as tif:
        for z in range(4):
            tif.write(np.zeros((8, 9 + z % 2), np.uint8))
    return d / "pages.tif"


def _tiff_imagej_count(d: Path) -> Path:
    import tifffile

    tifffile.imwrite(d / "count.tif", np.zeros((6, 8, 9), np.uint8), imagej=True, metadata={"axes": "ZYX"})
    data = bytearray((d / "count.tif").read_bytes())
    at = data.find(b"images=6")
    data[at:at + 8] = b"images=3"  # the header claims half the pages
    (d / "count.tif").write_bytes(bytes(data))
    return d / "count.tif"


def _tiff_spacing_text(d: Path) -> Path:
    import tifffile

    tifffile.imwrite(d / "spacing.tif", np.zeros((6, 8, 9), np.uint8), imagej=True,
                     metadata={"axes": "ZYX", "spacing": "abc", "unit": "um"})
    return d / "spacing.tif"


def _tiff_negative_size(d: Path) -> Path:
    import tifffile

    tifffile.imwrite(d / "mirror.ome.tif", np.zeros((6, 8, 9), np.uint8), ome=True,
                     metadata={"axes": "ZYX", "PhysicalSizeX": -0.5})
    return d / "mirror.ome.tif"


def _ome_tiff_size_text(d: Path) -> Path:
    import tifffile

    tifffile.imwrite(d / "text.ome.tif", np.zeros((6, 8, 9), np.uint8), ome=True,
                     metadata={"axes": "ZYX", "PhysicalSizeY": "abc"})
    return d / "text.ome.tif"


def _hdf5_size_text(d: Path) -> Path:
    import h5py

    with h5py.File(d / "size.h5", "w") as f:
        f.create_dataset("volume", data=np.zeros((6, 8, 9), np.uint8)).attrs["element_size_um"] = "1 1 1"
    return d / "size.h5"


BAD_VOLUMES = {
    "zarr-chunk-a-folder": (_zarr_chunk_folder, "folderchunk.zarr"),
    "zarr-chunk-dev-zero": (_zarr_chunk_dev_zero, "devzero.zarr"),
    "zarr-chunk-sparse-2GiB": (_zarr_chunk_sparse, "sparse.zarr"),
    "n5-block-dev-zero": (_n5_block_dev_zero, "devzero.n5"),
    "ome-zarr-path-escapes": (_ome_zarr_escape, "escape.zarr"),
    "tiff-pages-differ": (_tiff_pages_differ, "pages.tif"),
    "tiff-imagej-count": (_tiff_imagej_count, "count.tif"),
    "tiff-imagej-spacing-text": (_tiff_spacing_text, "spacing.tif"),
    "tiff-ome-negative-size": (_tiff_negative_size, "mirror.ome.tif"),
    "tiff-ome-size-text": (_ome_tiff_size_text, "text.ome.tif"),
    "hdf5-size-text": (_hdf5_size_text, "size.h5"),
    "nifti-truncated": (_truncated, "truncated.nii"),
    "nifti-claims-1.4GB": (_claims_huge, "huge.nii.gz"),
    "nifti-garbage-header": (_garbage_header, "garbage.nii"),
    "nifti-zero-dim": (_zero_dim, "zero.nii"),
    "nifti-zero-pixdim": (_zero_pixdim, "pixdim.nii"),
    "nifti-short": (_short, "short.nii"),
    "text-as-nifti": (_text_as_nifti, "notes.nii.gz"),
    "nifti-2d": (_flat, "flat.nii.gz"),
    "nifti-5d": (_five_d, "fived.nii.gz"),
    "mha-ndims-2^31": (_mha_ndims, "ndims.mha"),
    "mha-claims-4GB": (_mha_claims, "claims.mha"),
    "mha-dimsize-count": (_mha_dims_mismatch, "dims.mha"),
    "mhd-missing-raw": (_mhd_missing_raw, "lost"),
    "nrrd-magic": (_nrrd_magic, "magic.nrrd"),
    "nrrd-claims-256GB": (_nrrd_huge, "huge.nrrd"),
    "nrrd-type": (_nrrd_type, "type.nrrd"),
    "png-claims-10G-pixels": (_png_claims, "pngclaims"),
    "png-text": (_png_text, "pngtext"),
    "png-sizes-differ": (_png_sizes, "pngsizes"),
    "tiff-width-3.7e9": (_tiff_claims, "tiffclaims"),
    "empty-dir": (_empty_dir, "empty"),
    "only-subfolders": (_subfolders, "kidney"),
    "dicom-gaps": (_dicom_gaps, "CT2"),
    "zarr-pickle-codec": (_zarr_pickle, "pickled.zarr"),
    "zarr-two-arrays": (_zarr_two_arrays, "two.zarr"),
    "zarr-bad-chunk": (_zarr_bad_chunk, "chunk.zarr"),
    "ome-zarr-time-series": (_ome_time_series, "time.zarr"),
    "hdf5-two-datasets": (_hdf5_many, "many.h5"),
    "hdf5-junk": (_hdf5_junk, "junk.h5"),
    "tiff-rgb-pages": (_tiff_rgb, "rgb.tif"),
    "jp2-header": (_jp2_header, "jp2"),
}
NAN = {"nifti-nan": (_nan, "nan.nii.gz")}


# ---------------------------------------------------------------------------------------------
# The corpus: (command line, a piece of the message) per case


def _volume_cases() -> dict:
    cases = {}
    for name, (make, shown) in {**BAD_VOLUMES, **NAN}.items():
        def convert(d, w, make=make):
            return ["convert", str(make(d)), str(d / "out.nii.gz")]

        def predict(d, w, make=make):
            return ["predict", "-i", str(make(d)), "-o", str(d / "out.nii.gz"), "--network", str(w / "net.json"),
                    "--weights", str(w / "net.pt"), "--device", "cpu"]

        def postprocess(d, w, make=make):
            return ["postprocess", str(make(d)), str(d / "out.nii.gz"), "--threshold", "0.5"]

        def evaluate(d, w, make=make):
            return ["evaluate", str(make(d)), str(w / "label.nii.gz"), "--json", str(d / "scores.json")]

        def evaluate_truth(d, w, make=make):
            return ["evaluate", str(w / "label.nii.gz"), str(make(d))]

        def render(d, w, make=make):
            return ["render", str(w / "label.nii.gz"), str(make(d)), "-o", str(d / "hits.png")]

        def view(d, w, make=make):
            return ["view", str(make(d)), "-o", str(d / "case.html")]

        def train(d, w, make=make):
            bad = make(d)
            datalist = d / "datalist.json"
            item = {"image": str(bad), "label": str(w / "label.nii.gz")}
            datalist.write_text(json.dumps({"training": [item]}), encoding="utf-8")
            return ["train", "--datalist", str(datalist), "--config", str(w / "config.json"), "--out", str(d / "run"),
                    "--device", "cpu"]

        commands = {"convert": convert, "predict": predict, "postprocess": postprocess, "evaluate": evaluate,
                    "evaluate-truth": evaluate_truth, "render": render, "view": view, "train": train}
        if name in NAN:
            commands = {"predict": predict, "train": train}
        for command, build in commands.items():
            cases[f"{command}:{name}"] = (build, shown)
    return cases


def _write(d: Path, name: str, text: str | bytes) -> Path:
    path = d / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def _predict_with(network: dict | str | bytes, weights: str | None = None):
    def build(d, w):
        config = _write(d, "net.json", network if isinstance(network, (str, bytes)) else json.dumps(network))
        return ["predict", "-i", str(w / "image.nii.gz"), "-o", str(d / "out.nii.gz"), "--network", str(config),
                "--weights", str(_write(d, "w.pt", weights)) if weights is not None else str(w / "net.pt"),
                "--device", "cpu"]
    return build


def _bundle_with(section) -> callable:
    def build(d, w):
        shutil.copytree(w / "bundle", d / "bundle")
        text = section if isinstance(section, str) else json.dumps({"slab": section})
        (d / "bundle" / "configs" / "inference.json").write_text(text, encoding="utf-8")
        return ["predict", "-i", str(w / "image.nii.gz"), "-o", str(d / "out.nii.gz"), "--bundle", str(d / "bundle"),
                "--device", "cpu"]
    return build


def _demo_with(section) -> callable:
    def build(d, w):
        _bundle_with(section)(d, w)  # the bundle, written under d
        data = d / "data"
        data.mkdir()
        shutil.copy(w / "image.nii.gz", data / "image.nii.gz")
        shutil.copy(w / "label.nii.gz", data / "label.nii.gz")
        return ["demo", "--bundle", str(d / "bundle"), "--data", str(data), "--out", str(d / "demo"), "--device",
                "cpu", "--views", "1"]
    return build


def _train_with(datalist=None, config=None) -> callable:
    def build(d, w):
        dl = _write(d, "datalist.json", datalist if isinstance(datalist, str) else json.dumps(datalist)) \
            if datalist is not None else w / "datalist.json"
        cfg = _write(d, "config.json", config if isinstance(config, str) else json.dumps(config)) \
            if config is not None else w / "config.json"
        return ["train", "--datalist", str(dl), "--config", str(cfg), "--out", str(d / "run"), "--device", "cpu"]
    return build


def _sennet_with(csv: bytes) -> callable:
    def build(d, w):
        images = d / "root" / "train" / "kidney_1" / "images"
        images.mkdir(parents=True)
        import tifffile

        for z in range(2):
            tifffile.imwrite(images / f"{z:04d}.tif", np.zeros((3, 4), np.uint16))
        (d / "root" / "train_rles.csv").write_bytes(csv)
        return ["dataset", "sennet", str(d / "root"), str(d / "out")]
    return build


def _uwmgi_with(csv: bytes) -> callable:
    def build(d, w):
        import imagecodecs

        scans = d / "root" / "train" / "case1" / "case1_day2" / "scans"
        scans.mkdir(parents=True)
        for z in (1, 2):
            (scans / f"slice_{z:04d}_4_3_1.50_1.50.png").write_bytes(imagecodecs.png_encode(np.zeros((3, 4),
                                                                                                    np.uint16)))
        (d / "root" / "train.csv").write_bytes(csv)
        return ["dataset", "uwmgi", str(d / "root"), str(d / "out")]
    return build


DEEP = "[" * 100_000 + "]" * 100_000
IMAGE_ARGS = ["--network", "{w}/net.json", "--weights", "{w}/net.pt", "--device", "cpu"]


def _argv(*args, **files):
    """A command line whose ``{w}``/``{d}`` fill in the world and case folders."""
    def build(d, w):
        return [a.format(w=w, d=d) for a in args]
    return build


def _stack_dir(d: Path) -> Path:
    import imagecodecs

    folder = d / "stack"
    folder.mkdir()
    for z in range(4):
        (folder / f"{z:04d}.png").write_bytes(imagecodecs.png_encode(np.full((10, 12), 100 * z, np.uint16)))
    return folder


def _alias_stack(d, w):
    stack = _stack_dir(d)
    return ["predict", "-i", str(stack), "-o", str(stack)] + [a.format(w=w) for a in IMAGE_ARGS]


def _inside_stack(d, w):
    stack = _stack_dir(d)
    return ["predict", "-i", str(stack), "-o", str(stack / "mask.nii.gz")] + [a.format(w=w) for a in IMAGE_ARGS]


def _convert_onto_stack(d, w):
    stack = _stack_dir(d)
    return ["convert", str(stack), str(stack)]


def _convert_hardlink(d, w):
    shutil.copy(w / "image.nii.gz", d / "a.nii.gz")
    os.link(d / "a.nii.gz", d / "b.nii.gz")
    return ["convert", str(d / "a.nii.gz"), str(d / "b.nii.gz")]


def _parent_is_file(d, w):
    _write(d, "afile", "x")
    return ["convert", str(w / "image.nii.gz"), str(d / "afile" / "out.nii.gz")]


def _dataset_into_root(d, w):
    args = _sennet_with(b"id,rle\n")(d, w)
    return args[:3] + [str(d / "root" / "out")]


CASES = {
    **_volume_cases(),
    # CSVs and RLE
    "dataset:csv-not-utf8": (_sennet_with("id,rle\nkidney_1_0000,1 2 é\n".encode("latin-1")), "train_rles.csv"),
    "dataset:csv-rle-2^63": (_sennet_with(b"id,rle\nkidney_1_0000,9223372036854775808 1\n"), "train_rles.csv"),
    "dataset:csv-rle-overflow": (_sennet_with(b"id,rle\nkidney_1_0000,9000000000000000000 9000000000000000000\n"),
                                 "train_rles.csv"),
    "dataset:csv-rle-past-image": (_sennet_with(b"id,rle\nkidney_1_0000,10 5\n"), "train_rles.csv"),
    "dataset:csv-missing-column": (_sennet_with(b"\xef\xbb\xbfid,mask\nkidney_1_0000,1 2\n"), "missing column"),
    "dataset:uwmgi-row-without-fields": (_uwmgi_with(b"id,class,segmentation\ncase1_day2_slice_0001\n"), "row 2"),
    "dataset:uwmgi-not-utf8": (_uwmgi_with(b"id,class,segmentation\ncase1_day2_slice_0001,stom\xe4ch,\n"),
                               "train.csv"),
    "dataset:uwmgi-rle-letters": (_uwmgi_with(b"id,class,segmentation\ncase1_day2_slice_0001,stomach,1 x\n"),
                                  "train.csv"),
    "dataset:missing-root": (_argv("dataset", "sennet", "{d}/nowhere", "{d}/out"), "nowhere"),
    "dataset:folds-0": (_argv("dataset", "sennet", "{d}", "{d}/out", "--folds", "0"), "--folds"),
    "dataset:out-inside-root": (_dataset_into_root, "lies inside"),
    # network configs and weights
    "predict:network-name-list": (_predict_with({**NET, "name": ["unet"]}), "network name"),
    "predict:network-negative-channels": (_predict_with({**NET, "out_channels": -1}), "out_channels"),
    "predict:network-zero-strides": (_predict_with({**NET, "strides": [0]}), "strides"),
    "predict:network-strides-too-many": (_predict_with({**NET, "strides": [2, 2, 2]}), "unet"),
    "predict:network-string-channels": (_predict_with({**NET, "channels": "4,8"}), "channels"),
    "predict:network-not-json": (_predict_with("{name: unet"), "net.json"),
    "predict:network-deep-json": (_predict_with(DEEP), "net.json"),
    "predict:network-a-list": (_predict_with("[1, 2]"), "net.json"),
    "predict:network-latin1": (_predict_with(b'{"name": "\xfcnet"}'), "net.json"),
    "predict:weights-text": (_predict_with(NET, "these are not weights\n"), "w.pt"),
    "predict:weights-empty": (_predict_with(NET, ""), "w.pt"),
    "predict:weights-zip-garbage": (_predict_with(NET, b"PK\x03\x04" + b"\0" * 60), "w.pt"),
    # bundles
    "predict:bundle-planes-4": (_bundle_with({"network": NET, "planes": 4}), "planes"),
    "predict:bundle-tta-list": (_bundle_with({"network": NET, "tta": ["flips"]}), "tta"),
    "predict:bundle-no-slab": (_bundle_with('{"network_def": {"_target_": "os.system", "command": "touch x"}}'),
                               "inference.json"),
    "predict:bundle-batch-size-string": (_bundle_with({"network": NET, "batch_size": "8"}), "batch_size"),
    "predict:bundle-postprocess-list": (_bundle_with({"network": NET, "postprocess": [0.5]}), "postprocess"),
    "predict:bundle-threshold-2": (_bundle_with({"network": NET, "postprocess": {"threshold": 2}}), "threshold"),
    "predict:bundle-missing": (_argv("predict", "-i", "{w}/image.nii.gz", "-o", "{d}/o.nii.gz", "--bundle",
                                     "{d}/nobundle"), "nobundle"),
    "demo:bundle-planes-4": (_demo_with({"network": NET, "planes": 4}), "planes"),
    "demo:bundle-expression": (_demo_with('{"slab": "$__import__(\'os\').system(\'touch pwned\')"}'),
                               "inference.json"),
    "demo:data-missing": (_argv("demo", "--data", "{d}/nodata", "--out", "{d}/demo"), "nodata"),
    # datalists and training configs
    "train:datalist-image-5": (_train_with({"training": [{"image": 5, "label": "x"}]}), "'image' is 5"),
    "train:datalist-fold-a": (_train_with({"training": [{"image": "a.nii", "fold": "a"}]}), "'fold' is 'a'"),
    "train:datalist-n-folds-null": (_train_with({"n_folds": None, "training": [{"image": "a.nii"}]}), "n_folds"),
    "train:datalist-missing-file": (_train_with({"training": [{"image": "nope.nii.gz", "label": "nope2.nii.gz"}]}),
                                    "nope.nii.gz"),
    "train:datalist-deep": (_train_with(DEEP), "datalist.json"),
    "train:datalist-not-object": (_train_with("[]"), "datalist.json"),
    "train:config-unknown-key": (_train_with(config={"epochz": 1}), "epochz"),
    "train:config-network-name-list": (_train_with(config={"network": {"name": ["unet"]}}), "network.name"),
    "train:config-epochs-string": (_train_with(config={"epochs": "3"}), "epochs"),
    "train:config-metric": (_train_with(config={"val": {"metric": "surface_dice"}}), "val.metric"),
    "train:config-negative-lr": (_train_with(config={"lr": -1}), "lr"),
    "train:config-deep": (_train_with(config=DEEP), "config.json"),
    "train:fold-negative": (_argv("train", "--datalist", "{w}/datalist.json", "--out", "{d}/run", "--fold", "-1"),
                            "--fold"),
    "train:no-out": (_argv("train", "--datalist", "{w}/datalist.json"), "--out"),
    # arguments
    "predict:memory-budget-nan": (_argv("predict", "-i", "{w}/image.nii.gz", "-o", "{d}/o.nii.gz", *IMAGE_ARGS,
                                        "--memory-budget", "nan"), "--memory-budget"),
    "predict:memory-budget-inf": (_argv("predict", "-i", "{w}/image.nii.gz", "-o", "{d}/o.nii.gz", *IMAGE_ARGS,
                                        "--memory-budget", "inf"), "--memory-budget"),
    "predict:memory-budget-negative": (_argv("predict", "-i", "{w}/image.nii.gz", "-o", "{d}/o.nii.gz", *IMAGE_ARGS,
                                             "--memory-budget", "-1"), "--memory-budget"),
    "predict:threshold-1.5": (_argv("predict", "-i", "{w}/image.nii.gz", "-o", "{d}/o.nii.gz", *IMAGE_ARGS,
                                    "--threshold", "1.5"), "--threshold"),
    "predict:hysteresis-negative": (_argv("predict", "-i", "{w}/image.nii.gz", "-o", "{d}/o.nii.gz", *IMAGE_ARGS,
                                          "--hysteresis", "-0.2", "0.6"), "--hysteresis"),
    "predict:hysteresis-reversed": (_argv("predict", "-i", "{w}/image.nii.gz", "-o", "{d}/o.nii.gz", *IMAGE_ARGS,
                                          "--hysteresis", "0.8", "0.2"), "--hysteresis"),
    "predict:batch-size-0": (_argv("predict", "-i", "{w}/image.nii.gz", "-o", "{d}/o.nii.gz", *IMAGE_ARGS,
                                   "--batch-size", "0"), "--batch-size"),
    "predict:axes-yz": (_argv("predict", "-i", "{w}/image.nii.gz", "-o", "{d}/o.nii.gz", *IMAGE_ARGS,
                              "--axes", "xy,yz"), "yz"),
    "predict:output-png": (_argv("predict", "-i", "{w}/image.nii.gz", "-o", "{d}/o.png", *IMAGE_ARGS), "o.png"),
    "predict:missing-input": (_argv("predict", "-i", "{d}/none.nii.gz", "-o", "{d}/o.nii.gz", *IMAGE_ARGS),
                              "none.nii.gz"),
    "predict:channels-mismatch": (_argv("predict", "-i", "{w}/image.nii.gz", "{w}/label.nii.gz", "-o",
                                        "{d}/o.nii.gz", *IMAGE_ARGS), "channel"),
    "evaluate:threshold-2": (_argv("evaluate", "{w}/prob.nii.gz", "{w}/label.nii.gz", "--threshold", "2"),
                             "--threshold"),
    "evaluate:sweep-1.5": (_argv("evaluate", "{w}/prob.nii.gz", "{w}/label.nii.gz", "--sweep", "0.5", "1.5"),
                           "--sweep"),
    "evaluate:tolerance-negative": (_argv("evaluate", "{w}/label.nii.gz", "{w}/label.nii.gz", "--tolerance", "-1"),
                                    "--tolerance"),
    "evaluate:truth-not-binary": (_argv("evaluate", "{w}/label.nii.gz", "{w}/image.nii.gz"), "image.nii.gz"),
    "postprocess:hysteresis-nan": (_argv("postprocess", "{w}/prob.nii.gz", "{d}/o.nii.gz", "--hysteresis", "nan",
                                         "0.5"), "--hysteresis"),
    "postprocess:probabilities-without-threshold": (_argv("postprocess", "{w}/prob.nii.gz", "{d}/o.nii.gz"),
                                                    "prob.nii.gz"),
    "render:views-0": (_argv("render", "{w}/label.nii.gz", "{w}/label.nii.gz", "-o", "{d}/h.png", "--views", "0"),
                       "--views"),
    "render:output-not-png": (_argv("render", "{w}/label.nii.gz", "{w}/label.nii.gz", "-o", "{d}/h.jpg"), "h.jpg"),
    "phantom:shape-huge": (_argv("phantom", "{d}/ph", "--shape", "100000", "100000", "100000", "--seed", "0"),
                           "shape"),
    "phantom:shape-zero": (_argv("phantom", "{d}/ph", "--shape", "0", "4", "4", "--seed", "0"), "--shape"),
    "phantom:spacing-nan": (_argv("phantom", "{d}/ph", "--shape", "8", "8", "8", "--seed", "0", "--spacing", "1",
                                  "nan", "1"), "--spacing"),
    "convert:spacing-zero": (_argv("convert", "{w}/image.nii.gz", "{d}/o.nii.gz", "--spacing", "1", "0", "1"),
                             "--spacing"),
    # outputs that would destroy or collide
    "convert:output-is-input": (_argv("convert", "{w}/image.nii.gz", "{w}/image.nii.gz"), "is the input"),
    "convert:output-hard-link": (_convert_hardlink, "is the input"),
    "convert:onto-stack": (_convert_onto_stack, "stack"),
    "convert:parent-is-file": (_parent_is_file, "afile"),
    "predict:output-is-stack-input": (_alias_stack, "is the input"),
    "predict:output-inside-stack": (_inside_stack, "lies inside"),
    "predict:prob-equals-output": (_argv("predict", "-i", "{w}/image.nii.gz", "-o", "{d}/o.nii.gz", "--prob",
                                         "{d}/o.nii.gz", *IMAGE_ARGS), "--prob"),
    "predict:output-onto-weights": (_argv("predict", "-i", "{w}/image.nii.gz", "-o", "{w}/net.pt", *IMAGE_ARGS),
                                    "net.pt"),
    "predict:rle-csv-is-input": (_argv("predict", "-i", "{w}/image.nii.gz", "-o", "{d}/o.nii.gz", "--rle-csv",
                                       "{w}/net.json", *IMAGE_ARGS), "--rle-csv"),
    "postprocess:output-is-input": (_argv("postprocess", "{w}/prob.nii.gz", "{w}/prob.nii.gz", "--threshold", "0.5"),
                                    "is the input"),
    "postprocess:output-is-roi": (_argv("postprocess", "{w}/prob.nii.gz", "{w}/label.nii.gz", "--threshold", "0.5",
                                        "--roi", "{w}/label.nii.gz"), "is the input"),
    "evaluate:json-is-truth": (_argv("evaluate", "{w}/label.nii.gz", "{w}/label.nii.gz", "--json",
                                     "{w}/label.nii.gz"), "--json"),
    "evaluate:json-equals-plot": (_argv("evaluate", "{w}/prob.nii.gz", "{w}/label.nii.gz", "--sweep", "--json",
                                        "{d}/a.png", "--plot", "{d}/a.png"), "--plot"),
    "render:output-is-image": (_argv("render", "{w}/label.nii.gz", "{w}/label.nii.gz", "-o", "{d}/h.png",
                                     "--sections", "{d}/h.png"), "--sections"),
    "train:out-overwrites-config": (_argv("train", "--datalist", "{w}/datalist.json", "--config", "{d}/config.json",
                                          "--out", "{d}"), "config.json"),
    "demo:out-is-data": (_argv("demo", "--out", "{d}", "--data", "{d}"), "--out"),
}


# Round two: silent wrong results, unbounded work and tracebacks found by a hostile user


def _nan_prob(d, w):
    prob = np.asarray(nib.load(w / "prob.nii.gz").dataobj).copy()
    prob[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(prob, AFFINE), d / "nan.nii.gz")
    return ["errors", str(d / "nan.nii.gz"), str(w / "label.nii.gz"), "-o", str(d / "c.csv")]


def _plan_datalist(d, w, label: str, extra: dict | None = None, image: str | None = None):
    item = {"image": image or str(w / "image.nii.gz"), "label": label}
    (d / "dl.json").write_text(json.dumps({"training": [item, dict(item, id="b")], **(extra or {})}), encoding="utf-8")
    return ["plan", str(d / "dl.json"), "-o", str(d / "plan"), "--device", "cpu"]


def _label_0_255(d, w):
    values = np.arange(12 * 10 * 8).reshape(12, 10, 8) % 256
    nib.save(nib.Nifti1Image(values.astype(np.uint8), AFFINE), d / "grey.nii.gz")
    return _plan_datalist(d, w, str(d / "grey.nii.gz"))


def _duplicate_ids(d, w):
    item = {"image": str(w / "image.nii.gz"), "label": str(w / "label.nii.gz"), "id": "x"}
    (d / "dl.json").write_text(json.dumps({"training": [item, item]}), encoding="utf-8")
    return ["plan", str(d / "dl.json"), "-o", str(d / "plan"), "--device", "cpu"]


def _plan_dir(d, edit) -> Path:
    plan = d / "plan"
    plan.mkdir()
    config = {"task": "segmentation_2p5d", "epochs": 1, "network": {"name": "unet", "channels": [4, 8],
                                                                    "strides": [2]}}
    plans = {"configurations": {"2d": {"config": config, "reasons": {}}}, "folds": [0, 1], "labels": ["a"],
             "tubular": [], "tolerance_mm": 1.0, "target_metric": "dice"}
    edit(plans)
    (plan / "plans.json").write_text(json.dumps(plans), encoding="utf-8")
    (plan / "fingerprint.json").write_text("{}", encoding="utf-8")
    item = {"image": str(d.parent / "image.nii.gz"), "label": str(d.parent / "label.nii.gz"), "fold": 0}
    (plan / "datalist.json").write_text(json.dumps({"training": [item, dict(item, fold=1)]}), encoding="utf-8")
    return plan


def _cv_plan(edit):
    def build(d, w):
        return ["cv", str(_plan_dir(d, edit)), "--device", "cpu"]
    return build


def _model_dir(postprocess):
    def build(d, w):
        model = d / "model"
        model.mkdir()
        shutil.copy(w / "net.pt", model / "m.pt")
        (model / "model.json").write_text(json.dumps({"members": [{"checkpoint": "m.pt"}], "postprocess": postprocess}),
                                          encoding="utf-8")
        return ["predict", "-i", str(w / "image.nii.gz"), "-o", str(d / "o.nii.gz"), "--model", str(model),
                "--device", "cpu"]
    return build


def _doctored(state):
    def build(d, w):
        torch.save(state, d / "doctored.pt")
        return ["predict", "-i", str(w / "image.nii.gz"), "-o", str(d / "o.nii.gz"), "--model", str(d / "doctored.pt"),
                "--device", "cpu"]
    return build


def _sennet_half_downloaded(d, w):
    argv = _sennet_with(b"id,rle\nkidney_1_0000,1 2\nkidney_1_0001,1 2\nkidney_1_0002,1 2\n")(d, w)
    slice_ = d / "root" / "train" / "kidney_1" / "images" / "0002.tif"
    slice_.write_bytes((d / "root" / "train" / "kidney_1" / "images" / "0000.tif").read_bytes()[:40])
    return argv


def _sennet_slice_size(d, w):
    import tifffile

    argv = _sennet_with(b"id,rle\nkidney_1_0000,1 2\n")(d, w)
    tifffile.imwrite(d / "root" / "train" / "kidney_1" / "images" / "0002.tif", np.zeros((5, 4), np.uint16))
    return argv


def _huge_zarr(d: Path) -> Path:
    """A zarr store whose metadata claims 100000^3 voxels and holds no chunk."""
    store = d / "claims.zarr"
    store.mkdir()
    (store / ".zarray").write_text(json.dumps({"zarr_format": 2, "shape": [100000, 100000, 100000],
                                               "chunks": [64, 64, 64], "dtype": "<u2", "compressor": None,
                                               "fill_value": 0, "order": "C", "filters": None}))
    return store


def _convert_huge(suffix: str):
    def build(d, w):
        return ["convert", str(_huge_zarr(d)), str(d / f"out{suffix}")]
    return build


def _bundle_scales(d, w):
    return ["predict", "-i", str(w / "image.nii.gz"), "-o", str(d / "o.nii.gz"), "--bundle", str(w / "bundle"),
            "--scales", "1000", "--device", "cpu"]


def _train_huge_network(d, w):
    (d / "huge.json").write_text(json.dumps({"network": {"name": "unet", "channels": [4096, 8192, 16384],
                                                         "strides": [2, 2]}, "epochs": 1}))
    return ["train", "--datalist", str(w / "datalist.json"), "--config", str(d / "huge.json"), "--out", str(d / "run"),
            "--device", "cpu"]


def _network_file(config):
    def build(d, w):
        (d / "n.json").write_text(json.dumps({**NET, **config}))
        return ["predict", "-i", str(w / "image.nii.gz"), "-o", str(d / "o.nii.gz"), "--network", str(d / "n.json"),
                "--weights", str(w / "net.pt"), "--device", "cpu"]
    return build


def _plan_folder(d, w):
    (d / "notadataset").mkdir()
    return ["plan", str(d / "notadataset"), "-o", str(d / "plan"), "--device", "cpu"]


ROUND_TWO = {
    "plan:folder-without-dataset-json": (_plan_folder, "notadataset"),
    "train:network-too-large": (_train_huge_network, "network"),
    "predict:network-strides-empty": (_network_file({"channels": [4], "strides": []}), "n.json"),
    "predict:network-too-large": (_network_file({"channels": [8192, 16384, 32768], "strides": [2, 2]}), "n.json"),
    "predict:bundle-scales-1000": (_bundle_scales, "--scales"),
    "convert:claims-100000^3-to-zarr": (_convert_huge(".zarr"), "out.zarr"),
    "convert:claims-100000^3-to-n5": (_convert_huge(".n5"), "out.n5"),
    "convert:claims-100000^3-to-h5": (_convert_huge(".h5"), "out.h5"),
    "predict:claims-100000^3-out-of-core": (lambda d, w: ["predict", "-i", str(_huge_zarr(d)), "-o",
                                                          str(d / "mask.zarr"), "--network", str(w / "net.json"),
                                                          "--weights", str(w / "net.pt"), "--device", "cpu"],
                                            "claims.zarr"),
    "dataset:sennet-half-downloaded": (_sennet_half_downloaded, "0002.tif"),
    "dataset:sennet-slice-of-another-size": (_sennet_slice_size, "0002.tif"),
    "predict:threads-10000": (_argv("predict", "-i", "{w}/image.nii.gz", "-o", "{d}/o.nii.gz", *IMAGE_ARGS,
                                    "--threads", "10000"), "--threads"),
    "train:threads-10000": (_argv("train", "--datalist", "{w}/datalist.json", "--config", "{w}/config.json", "--out",
                                  "{d}/run", "--threads", "10000"), "--threads"),
    "errors:truth-not-binary": (_argv("errors", "{w}/label.nii.gz", "{w}/image.nii.gz", "-o", "{d}/c.csv"),
                                "image.nii.gz"),
    "errors:nan-prediction": (_nan_prob, "nan.nii.gz"),
    "errors:sheet-jpg": (_argv("errors", "{w}/prob.nii.gz", "{w}/label.nii.gz", "-o", "{d}/c.csv", "--sheet",
                               "{d}/s.jpg"), "s.jpg"),
    "errors:no-cluster-to-draw": (_argv("errors", "{w}/label.nii.gz", "{w}/label.nii.gz", "-o", "{d}/c.csv",
                                        "--sheet", "{d}/s.png"), "--sheet"),
    "evaluate:plot-jpg": (_argv("evaluate", "{w}/prob.nii.gz", "{w}/label.nii.gz", "--sweep", "--plot",
                                "{d}/p.jpg"), "p.jpg"),
    "render:sections-jpg": (_argv("render", "{w}/label.nii.gz", "{w}/label.nii.gz", "-o", "{d}/h.png",
                                  "--sections", "{d}/s.jpeg"), "s.jpeg"),
    "plan:label-0-255": (_label_0_255, "distinct label values"),
    "plan:image-as-label": (lambda d, w: _plan_datalist(d, w, str(w / "image.nii.gz")), "the image itself"),
    "plan:duplicate-ids": (_duplicate_ids, "share the id"),
    "cv:folds-a-string": (_cv_plan(lambda p: p.update(folds="all")), "'folds'"),
    "cv:folds-mixed": (_cv_plan(lambda p: p.update(folds=[0, "1", 2])), "'folds'"),
    "cv:configuration-a-string": (_cv_plan(lambda p: p["configurations"].update({"2d": "fast"})), "configurations.2d"),
    "cv:config-bad-epochs": (_cv_plan(lambda p: p["configurations"]["2d"]["config"].update(epochs="many")),
                             "epochs"),
    "cv:labels-a-string": (_cv_plan(lambda p: p.update(labels="a")), "'labels'"),
    "predict:model-threshold-7": (_model_dir({"threshold": 7}), "model.json"),
    "predict:model-labels-threshold-negative": (_model_dir({"labels": [{"threshold": -1}]}), "model.json"),
    "predict:model-postprocess-unknown": (_model_dir({"dilate": 3}), "model.json"),
    "predict:model-argmax-with-threshold": (_model_dir({"argmax": True, "threshold": 0.5}), "model.json"),
    "predict:checkpoint-network-a-string": (_doctored({"model": {}, "config": {}, "inference": {"network": "x"}}),
                                            "doctored.pt"),
    "predict:checkpoint-spec-a-list": (_doctored({"model": {}, "config": {}, "inference": [1]}), "doctored.pt"),
    "predict:checkpoint-postprocess-a-string": (_doctored({"model": {}, "config": {}, "inference": {
        "network": NET, "postprocess": "fill"}}), "doctored.pt"),
    "predict:checkpoint-config-a-string": (_doctored({"model": {}, "config": "abc"}), "doctored.pt"),
    "predict:checkpoint-no-network": (_doctored({"model": {}, "config": {"task": "segmentation_2p5d"}}),
                                      "doctored.pt"),
}
CASES.update(ROUND_TWO)


def _fingerprint(path: Path) -> str:
    """sha1 of every byte of a file, its data read segment by segment: a sparse file's holes are
    zeros by definition, so their offsets stand for them (the corpus's 2 GiB sparse chunk costs
    nothing to read; a write into a hole changes the segments, so it is seen)."""
    digest, size = hashlib.sha1(), path.stat().st_size
    with open(path, "rb") as f:
        offset = 0
        while offset < size:
            try:
                start = os.lseek(f.fileno(), offset, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            end = os.lseek(f.fileno(), start, os.SEEK_HOLE)
            digest.update(f"data at {start}:".encode())
            f.seek(start)
            while start < end:
                block = f.read(min(end - start, 1 << 20))
                digest.update(block)
                start += len(block)
            offset = end
    digest.update(f"size {size}".encode())
    return digest.hexdigest()


def _snapshot(*roots: Path) -> dict:
    found = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file() and not path.is_symlink():
                found[str(path)] = _fingerprint(path)
            else:
                found[str(path)] = "dir" if path.is_dir() else "link"
    return found


def _temporaries() -> set[str]:
    mine = f"-{os.getpid()}-"
    return {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("slab-") and mine in p}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_touches_nothing(case, world, tmp_path, capfd):
    build, shown = CASES[case]
    argv = build(tmp_path, world)
    if case.startswith("train:out-overwrites-config"):
        shutil.copy(world / "config.json", tmp_path / "config.json")
    capfd.readouterr()
    before = _snapshot(tmp_path, world)
    temporaries = _temporaries()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB: the process's high-water mark
    code = main(argv)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak
    assert grown < (1 << 20), f"peak memory grew by {grown / 1024:.0f} MiB"  # bounded by what is read
    out, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("slab: error: "), err
    assert "Traceback" not in err and "out of memory" not in err, err
    assert shown in lines[0], (shown, lines[0])
    assert _snapshot(tmp_path, world) == before
    assert _temporaries() == temporaries
    assert not (Path.cwd() / "pwned").exists()


def test_the_corpus_covers_every_command_and_category():
    commands = {case.split(":")[0] for case in CASES}
    assert commands >= {"phantom", "convert", "dataset", "train", "predict", "postprocess", "evaluate", "render",
                        "view", "demo"}
    for reader in ("convert", "predict", "postprocess", "evaluate", "render", "view", "train"):
        assert sum(case.startswith(f"{reader}:") and case.split(":")[1] in BAD_VOLUMES
                   for case in CASES) == len(BAD_VOLUMES), reader


def test_the_fingerprint_sees_every_byte(tmp_path):
    """The snapshot's fingerprint of a sparse file (holes not read) changes with any byte written,
    in its data or in a hole, and equals sha1 over the bytes' segments for a plain file."""
    path = tmp_path / "sparse.bin"
    with open(path, "wb") as f:
        f.write(b"head")
        f.truncate(64 << 20)
    before = _fingerprint(path)
    assert _fingerprint(path) == before
    for offset, byte in ((1, b"E"), (32 << 20, b"\1"), ((64 << 20) - 1, b"\1")):
        with open(path, "r+b") as f:
            f.seek(offset)
            old = f.read(1)
            f.seek(offset)
            f.write(byte)
        assert _fingerprint(path) != before, offset
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(old)
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"abc" * 1000)
    assert _fingerprint(plain) == hashlib.sha1(b"data at 0:" + b"abc" * 1000 + b"size 3000").hexdigest()
