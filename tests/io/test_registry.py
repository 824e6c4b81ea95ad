"""The format registry (slab/io/registry.py): one class per format, one list, the only place a
path is resolved to its format for reading and for writing."""
import ast
import contextlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from slab.core.errors import SlabError, SlabWarning
from slab.io import registry
from slab.io.registry import FORMATS, NotLazyError, find, writer_for
from slab.io.volumes import CHUNKED_OUTPUTS, load_volume, output_format, save_volume, volume_info

AFFINE = np.array([[0.0, 1.5, 0.0, -10.0], [-0.75, 0.0, 0.0, 20.5], [0.0, 0.0, 2.5, 3.25], [0.0, 0.0, 0.0, 1.0]])
# a name per writable format (a slice stack drops the affine: its own case below)
TARGETS = {"zarr": "v.zarr", "n5": "v.n5", "hdf5": "v.h5", "tiff": "v.tif", "nifti": "v.nii.gz", "itk": "v.nrrd",
           "stack": "slices"}


def test_the_list_names_every_format_once():
    names = [f.name for f in FORMATS]
    assert names == ["zarr", "n5", "hdf5", "tiff", "nifti", "itk", "dicom", "stack"]
    assert CHUNKED_OUTPUTS == ("zarr", "n5", "hdf5", "tiff")
    assert {f.name for f in FORMATS if f.lazy} == {"zarr", "n5", "hdf5", "tiff", "nifti", "stack"}
    assert {f.name for f in FORMATS if f.directory} == {"zarr", "n5", "dicom", "stack"}


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_every_writable_format_round_trips_through_the_registry(tmp_path, rng, name):
    """save_volume → find → read (eager and lazy) and info: the same voxels, dtype and geometry
    (an odd, anisotropic 5×6×7 volume on an oblique grid)."""
    data = rng.integers(0, 1000, size=(1, 5, 6, 7), dtype=np.uint16)
    path = tmp_path / TARGETS[name]
    assert writer_for(path).name == output_format(path) == name
    with pytest.warns(SlabWarning, match="orientation") if name == "tiff" else contextlib.nullcontext():
        save_volume(data, path, affine=AFFINE)
    source = find(path)
    assert source.format.name == name
    # a slice stack keeps no geometry, a TIFF only the voxel size
    expected_affine = {"stack": np.eye(4), "tiff": np.diag([0.75, 1.5, 2.5, 1.0])}.get(name, AFFINE)
    eager = load_volume(path)
    np.testing.assert_array_equal(eager.numpy(), data)
    np.testing.assert_allclose(np.asarray(eager.affine), expected_affine, atol=1e-5)
    shape, dtype, affine = volume_info(path)
    assert shape == (1, 5, 6, 7) and np.allclose(affine, expected_affine, atol=1e-5)
    assert dtype == (np.float32 if name == "itk" else np.uint16)  # ITK's header says no dtype without a read
    if source.format.lazy:
        lazy = load_volume(path, lazy=True)
        np.testing.assert_array_equal(lazy[:, 1:4, ::2, -1], data[:, 1:4, ::2, -1])
        lazy.close()
    else:
        with pytest.raises(NotLazyError, match="load this one eagerly"):
            load_volume(path, lazy=True)


def test_a_dicom_series_is_found_by_listing_its_directory_once(tmp_path, rng, monkeypatch):
    """A directory is listed once: the format and the slice list come from one ``directory_kind``."""
    from test_io import _rotation_x, _write_dicom_series

    _write_dicom_series(tmp_path / "ct", rng.integers(0, 400, size=(4, 5, 6), dtype=np.int16), (0.7, 0.8, 1.5),
                        (1.0, -2.0, 3.0), _rotation_x(20))
    calls = []
    original = registry.directory_kind
    monkeypatch.setattr(registry, "directory_kind", lambda p: calls.append(p) or original(p))
    assert find(tmp_path / "ct").format.name == "dicom"
    slices = tmp_path / "slices"
    save_volume(rng.integers(0, 9, size=(1, 3, 4, 5), dtype=np.uint8), slices)
    source = find(slices)
    assert source.format.name == "stack" and [p.name for p in source.files] == [f"{i:04d}.tif" for i in range(5)]
    assert len(calls) == 2
    assert load_volume(tmp_path / "ct").shape == (1, 6, 5, 4)  # (z, y, x) written: (C, X, Y, Z) read


@pytest.mark.parametrize("target, message", [
    ("one.png", "a slice stack is written to a directory"),
    ("v.xyz", "unsupported output format '.xyz'"),
])
def test_writer_for_refuses_in_one_line(tmp_path, target, message):
    with pytest.raises(SlabError, match=message):
        writer_for(tmp_path / target)


def test_writer_for_checks_the_target_it_would_replace(tmp_path):
    (tmp_path / "v.nii.gz").mkdir()
    (tmp_path / "v.zarr").write_text("x")
    (tmp_path / "other.zarr").mkdir()
    (tmp_path / "other.zarr" / "notes.txt").write_text("mine")
    for name, message in [("v.nii.gz", "is a directory"), ("v.zarr", "is a file"), ("other.zarr", "not a zarr store")]:
        with pytest.raises(SlabError, match=message):
            writer_for(tmp_path / name)
    assert (tmp_path / "other.zarr" / "notes.txt").read_text() == "mine"


def test_find_refuses_in_one_line(tmp_path, rng):
    nib.save(nib.Nifti1Image(np.zeros((2, 2), np.uint8), np.eye(4)), tmp_path / "flat.nii")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4), np.uint8)), str(tmp_path / "slice.png"))
    (tmp_path / "notes.txt").write_text("x")
    for name, message in [("missing.nii.gz", "no such file or directory"), ("missing.zarr", "no such zarr store"),
                          ("slice.png", "a single .png image"), ("notes.txt", "unsupported format '.txt'")]:
        with pytest.raises(SlabError, match=message) as excinfo:
            find(tmp_path / name)
        assert "\n" not in str(excinfo.value) and name in str(excinfo.value)


def test_formats_are_resolved_in_the_registry_only():
    """No other module of the library dispatches on a format's suffix list: a new format is one
    class in the registry (the families use their own suffixes inside themselves only)."""
    root = Path(registry.__file__).resolve().parents[1]
    lists = {"NIFTI_SUFFIXES", "ITK_SUFFIXES", "ZARR_SUFFIXES", "N5_SUFFIXES", "HDF5_SUFFIXES", "TIFF_SUFFIXES"}
    own = {"io/registry.py", "io/common.py", "io/nifti.py", "io/itk.py", "io/stacks.py", "io/zarr.py", "io/hdf5.py",
           "io/tiff.py", "io/n5.py", "io/arrays.py", "io/lazy.py"}
    offenders = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        if rel in own:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare) and any(isinstance(c, ast.Name) and c.id in lists
                                                      for c in node.comparators):
                offenders.append(f"{rel}:{node.lineno}")
    assert not offenders


@pytest.mark.parametrize("degrees, spacing", [(20, (0.7, 0.8, 1.5)), (-35, (1.0, 0.5, 3.0)), (0, (0.9, 0.9, 0.9))])
def test_a_dicom_series_is_described_from_its_headers(tmp_path, rng, monkeypatch, degrees, spacing):
    """volume_info of a DICOM series (oblique, anisotropic, files named against slice order) reads
    headers only, and says what the read gives: shape, stored dtype, affine."""
    import SimpleITK as sitk
    from test_io import _rotation_x, _write_dicom_series

    data = rng.integers(-1000, 2000, size=(5, 7, 6), dtype=np.int16)  # (z, y, x)
    _write_dicom_series(tmp_path / "ct", data, spacing, (10.0, -20.0, 5.5), _rotation_x(degrees))
    read = load_volume(tmp_path / "ct")

    def no_pixels(self):
        raise AssertionError("volume_info read the pixels")

    monkeypatch.setattr(sitk.ImageSeriesReader, "Execute", no_pixels)
    shape, dtype, affine = volume_info(tmp_path / "ct")
    assert shape == tuple(read.shape) == (1, 6, 7, 5)
    assert dtype == np.dtype(str(read.dtype).removeprefix("torch.")) == np.int16
    np.testing.assert_allclose(affine, np.asarray(read.affine), atol=1e-4)
