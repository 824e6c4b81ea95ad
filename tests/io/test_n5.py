"""N5 datasets (slab.io.n5): read and written as tensorstore's N5 driver writes and reads
them (every compression it has that slab reads, odd shapes cut by the blocks, missing blocks),
with geometry, through load_volume / save_volume / slab convert, and damaged files refused in
one line."""
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from slab.pipeline.cli import main
from slab.core.errors import SlabError
from slab.io.volumes import load_volume, save_volume
from slab.io.lazy import LazyVolume

ts = pytest.importorskip("tensorstore")

AFFINE = np.array([[0.0, -0.8, 0.0, 4.0], [0.6, 0.0, 0.0, -2.0], [0.0, 0.0, 1.7, 9.0], [0.0, 0.0, 0.0, 1.0]])


def _ts_write(path, data_zyx, block, compression, attributes=None):
    """An N5 dataset written by tensorstore from a C-ordered (Z, Y, X) / (C, Z, Y, X) array."""
    dims = list(data_zyx.shape[::-1])
    spec = {"driver": "n5", "kvstore": {"driver": "file", "path": str(path)},
            "metadata": {"dimensions": dims, "blockSize": list(block), "dataType": str(data_zyx.dtype),
                         "compression": compression}, "create": True, "delete_existing": True}
    store = ts.open(spec).result()
    store[...] = data_zyx.transpose()  # tensorstore indexes N5 in its dimensions' order: x first
    if attributes:
        meta = json.loads((path / "attributes.json").read_text())
        (path / "attributes.json").write_text(json.dumps({**meta, **attributes}))


def _ts_read(path):
    store = ts.open({"driver": "n5", "kvstore": {"driver": "file", "path": str(path)}}).result()
    return np.asarray(store.read().result()).transpose()  # back to C order


@pytest.mark.parametrize("compression", [{"type": "raw"}, {"type": "gzip"}, {"type": "gzip", "useZlib": True},
                                         {"type": "bzip2"}, {"type": "xz"}, {"type": "blosc", "cname": "lz4",
                                                                               "clevel": 5, "shuffle": 1},
                                         {"type": "zstd"}])
@pytest.mark.parametrize("dtype", ["uint16", "float32"])
def test_reads_what_tensorstore_writes(tmp_path, compression, dtype):
    rng = np.random.default_rng(0)
    data = (rng.random((11, 17, 23)) * 3000).astype(dtype)  # (Z, Y, X): 23 x 17 x 11 voxels
    _ts_write(tmp_path / "scan.n5", data, (8, 5, 4), compression)
    volume = load_volume(tmp_path / "scan.n5", lazy=True)
    assert isinstance(volume, LazyVolume) and volume.shape == (1, 23, 17, 11) and volume.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(np.asarray(volume[0]), data.transpose())
    # parts: across block borders, strided, reversed, one voxel
    for index in [(0, slice(3, 19), slice(4, 6), slice(None)), (0, slice(None, None, 3), 2, slice(1, 10, 4)),
                  (0, slice(None, None, -1), slice(None), 5), (0, 22, 16, 10)]:
        np.testing.assert_array_equal(volume[index], data.transpose()[index[1:]])
    np.testing.assert_array_equal(load_volume(tmp_path / "scan.n5").numpy()[0], data.transpose())


def test_writes_what_tensorstore_reads_with_geometry(tmp_path):
    """save_volume to .n5: gzip blocks tensorstore reads back equal; the oblique matrix comes back
    through slab, pixelResolution (mm) and offset carry the voxel size and origin for others."""
    rng = np.random.default_rng(1)
    data = rng.integers(0, 60000, (1, 70, 9, 66)).astype(np.uint16)  # blocks of 64 cut x and z
    save_volume(MetaTensor(torch.from_numpy(data), affine=torch.as_tensor(AFFINE)), tmp_path / "out.n5")
    np.testing.assert_array_equal(_ts_read(tmp_path / "out.n5"), data[0].transpose(2, 1, 0))
    attrs = json.loads((tmp_path / "out.n5" / "attributes.json").read_text())
    assert attrs["dimensions"] == [70, 9, 66] and attrs["compression"]["type"] == "gzip"
    np.testing.assert_allclose(attrs["pixelResolution"]["dimensions"], [0.6, 0.8, 1.7])
    back = load_volume(tmp_path / "out.n5")
    np.testing.assert_array_equal(back.numpy(), data)
    np.testing.assert_allclose(np.asarray(back.affine), AFFINE, atol=1e-12)
    # four channels, and a round trip NIfTI -> N5 -> NIfTI through slab convert
    four = rng.normal(size=(4, 13, 12, 5)).astype(np.float32)
    save_volume(MetaTensor(torch.from_numpy(four), affine=torch.as_tensor(AFFINE)), tmp_path / "four.nii.gz")
    assert main(["convert", str(tmp_path / "four.nii.gz"), str(tmp_path / "four.n5")]) == 0
    assert main(["convert", str(tmp_path / "four.n5"), str(tmp_path / "again.nii.gz")]) == 0
    again = load_volume(tmp_path / "again.nii.gz")
    np.testing.assert_array_equal(again.numpy(), four)
    np.testing.assert_allclose(np.asarray(again.affine), AFFINE, atol=1e-6)
    np.testing.assert_array_equal(_ts_read(tmp_path / "four.n5"), four.transpose(0, 3, 2, 1))


def test_datasets_inside_a_container_missing_blocks_and_resolution(tmp_path):
    data = np.arange(6 * 7 * 8, dtype=np.uint8).reshape(6, 7, 8)
    root = tmp_path / "bdv.n5"
    _ts_write(root / "setup0" / "timepoint0" / "s0", data, (4, 4, 4), {"type": "gzip"},
              {"pixelResolution": {"unit": "um", "dimensions": [50.0, 50.0, 100.0]}, "offset": [1000, 0, 500]})
    (root / "attributes.json").write_text(json.dumps({"n5": "4.0.0"}))
    volume = load_volume(root)  # the only dataset inside
    np.testing.assert_array_equal(volume.numpy()[0], data.transpose())
    np.testing.assert_allclose(np.asarray(volume.affine), np.diag([0.05, 0.05, 0.1, 1.0]) + np.array(
        [[0, 0, 0, 1.0], [0, 0, 0, 0], [0, 0, 0, 0.5], [0, 0, 0, 0]]))
    named = load_volume(root / "setup0" / "timepoint0" / "s0")
    np.testing.assert_array_equal(named.numpy(), volume.numpy())
    for block in (root / "setup0" / "timepoint0" / "s0").rglob("*"):
        if block.is_file() and block.name != "attributes.json" and block.parts[-3:] == ("1", "0", "1"):
            block.unlink()  # a missing block reads as zeros, as N5 defines
    expected = data.transpose().copy()
    expected[4:8, 0:4, 4:6] = 0
    np.testing.assert_array_equal(load_volume(root).numpy()[0], expected)
    _ts_write(root / "setup1" / "timepoint0" / "s0", data, (4, 4, 4), {"type": "raw"})
    with pytest.raises(SlabError, match="2 datasets .*setup0/timepoint0/s0, setup1/timepoint0/s0"):
        load_volume(root)
    save_volume(data.transpose()[None], root / "notes.nii.gz", affine=np.eye(4))  # a file kept in the folder
    np.testing.assert_array_equal(load_volume(root / "notes.nii.gz").numpy()[0], data.transpose())


def _raw_dataset(path, dims=(4, 3, 2), block=(4, 3, 2), dtype="uint8", compression="raw"):
    path.mkdir(parents=True)
    (path / "attributes.json").write_text(json.dumps({"dimensions": list(dims), "blockSize": list(block),
                                                      "dataType": dtype, "compression": {"type": compression}}))
    return path


def test_damaged_n5_is_refused_in_one_line(tmp_path):
    header = struct.pack(">HH3I", 0, 3, 4, 3, 2)
    cases = {
        "mode": (struct.pack(">HH3I", 2, 3, 4, 3, 2) + bytes(24), "mode 2"),
        "size": (struct.pack(">HH3I", 0, 3, 9, 3, 2) + bytes(54), "block of size"),
        "short": (header + bytes(5), "of 5 bytes"),
        "truncated": (b"\x00", "truncated"),
        "bomb": (struct.pack(">HH3I", 0, 3, 4, 3, 2) + zlib.compress(bytes(10 ** 7)), "bytes; its header gives 24"),
    }
    for name, (block, message) in cases.items():
        folder = _raw_dataset(tmp_path / f"{name}.n5", compression="gzip" if name == "bomb" else "raw")
        (folder / "0" / "0").mkdir(parents=True)
        (folder / "0" / "0" / "0").write_bytes(block)
        with pytest.raises(SlabError, match=message) as err:
            load_volume(folder).numpy()
        assert "\n" not in str(err.value) and str(folder) in str(err.value)
    for attrs, message in (({"dimensions": [4, 0, 2], "blockSize": [4, 3, 2], "dataType": "uint8"}, "dimensions"),
                           ({"dimensions": [4, 3, 2], "blockSize": [4, 3, 2], "dataType": "object"}, "dataType"),
                           ({"dimensions": [4, 3, 2], "blockSize": [4, 3, 2], "dataType": "uint8",
                             "compression": {"type": "lz4"}}, "compression"),
                           ({"dimensions": [4, 3, 2], "blockSize": [4, 3, 2], "dataType": "uint8",
                             "pixelResolution": {"unit": "parsec", "dimensions": [1, 1, 1]}}, "unit")):
        folder = tmp_path / f"attrs{len(list(tmp_path.iterdir()))}.n5"
        folder.mkdir()
        (folder / "attributes.json").write_text(json.dumps(attrs))
        with pytest.raises(SlabError, match=message):
            load_volume(folder)
    with pytest.raises(SlabError, match="no such N5"):
        load_volume(tmp_path / "missing.n5")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    with pytest.raises(SlabError, match="not an N5 container"):
        save_volume(np.zeros((1, 2, 2, 2), np.uint8), (tmp_path / "notes").rename(tmp_path / "notes.n5"))
    assert (tmp_path / "notes.n5" / "a.txt").read_text() == "x"  # never touched


def test_slab_predict_reads_and_writes_n5_out_of_core(tmp_path):
    """``slab predict -i scan.n5 -o mask.n5`` with a small memory budget (block by block, never
    the whole volume) gives the mask of in-memory prediction to NIfTI, in the input's geometry."""
    from slab.pipeline.bundle import BUNDLES_DIR

    from slab.pipeline.data.phantom import make_phantom

    scan = make_phantom((40, 36, 30), seed=1).image.numpy()  # vessels, as the bundle was trained on
    save_volume(MetaTensor(torch.from_numpy(scan), affine=torch.as_tensor(AFFINE)), tmp_path / "scan.n5")
    bundle = ["--bundle", str(BUNDLES_DIR / "vessel_2p5d"), "--quiet"]
    assert main(["predict", "-i", str(tmp_path / "scan.n5"), "-o", str(tmp_path / "mask.n5"),
                 "--memory-budget", "0.001", *bundle]) == 0
    assert main(["predict", "-i", str(tmp_path / "scan.n5"), "-o", str(tmp_path / "mask.nii.gz"), *bundle]) == 0
    ooc, memory = load_volume(tmp_path / "mask.n5"), load_volume(tmp_path / "mask.nii.gz")
    assert ooc.numpy().any()
    np.testing.assert_array_equal(ooc.numpy(), memory.numpy())
    np.testing.assert_allclose(np.asarray(ooc.affine), AFFINE, atol=1e-9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.n5", "mask.nii.gz", "scan.n5"]
