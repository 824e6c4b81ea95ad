"""Volume I/O against files written and read directly with nibabel, SimpleITK, PIL and tifffile."""
import locale
import tracemalloc

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import tifffile
import torch
from monai.data import MetaTensor
from PIL import Image

from slab.core.errors import SlabError
from slab.io.volumes import (
    LazyVolume,
    LoadVolume,
    LoadVolumed,
    SaveVolume,
    SaveVolumed,
    atomic_write,
    check_same_geometry,
    keep_locale,
    load_volume,
    natural_key,
    save_volume,
)

# A non-diagonal RAS affine (axes permuted and flipped) whose entries float32 holds exactly.
OBLIQUE = np.array([[0.0, 1.5, 0.0, -10.0], [-0.75, 0.0, 0.0, 20.5], [0.0, 0.0, 2.5, 3.25], [0.0, 0.0, 0.0, 1.0]])


def _volume(rng, dtype, shape=(1, 5, 6, 7)):
    if np.dtype(dtype).kind == "f":
        return rng.normal(size=shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)


def _write_slices(directory, images, names, fmt):
    directory.mkdir(parents=True, exist_ok=True)
    for image, name in zip(images, names):
        if fmt == "png":
            Image.fromarray(image).save(directory / f"{name}.png")
        else:
            tifffile.imwrite(directory / f"{name}.tif", image)


def _rotation_x(degrees):
    t = np.deg2rad(degrees)
    return np.array([[1.0, 0.0, 0.0], [0.0, np.cos(t), -np.sin(t)], [0.0, np.sin(t), np.cos(t)]])


def _one_line_error(excinfo, name):
    message = str(excinfo.value)
    assert "\n" not in message and str(name) in message
    return message


# ------------------------------------------------------------------------------ slice stacks


@pytest.mark.parametrize("fmt, dtype", [("png", np.uint8), ("png", np.uint16), ("tif", np.uint8), ("tif", np.uint16)])
def test_stack_written_by_pil_or_tifffile_loads_as_transposed_slices(tmp_path, rng, fmt, dtype):
    images = [_volume(rng, dtype, (6, 5)) for _ in range(4)]  # (rows, cols)
    _write_slices(tmp_path / "stack", images, [f"img_{z}" for z in range(4)], fmt)

    vol = load_volume(tmp_path / "stack")

    assert isinstance(vol, MetaTensor) and vol.shape == (1, 5, 6, 4)
    assert vol.numpy().dtype == dtype
    for z, image in enumerate(images):
        np.testing.assert_array_equal(vol[0, :, :, z].numpy(), image.T)
    np.testing.assert_array_equal(vol.affine.numpy(), np.eye(4))
    assert vol.meta["spacing"] == (1.0, 1.0, 1.0)


def test_stack_natural_sort_order(tmp_path, rng):
    names = ["slice_10", "slice_2", "slice_1", "slice_0"]
    images = {name: _volume(rng, np.uint8, (3, 4)) for name in names}
    _write_slices(tmp_path / "s", images.values(), images.keys(), "tif")

    vol = load_volume(tmp_path / "s").numpy()

    for z, name in enumerate(["slice_0", "slice_1", "slice_2", "slice_10"]):
        np.testing.assert_array_equal(vol[0, :, :, z], images[name].T)
    assert sorted(names, key=natural_key) == ["slice_0", "slice_1", "slice_2", "slice_10"]


@pytest.mark.parametrize(
    "fmt, dtype",
    [("png", np.uint8), ("png", np.uint16), ("tif", np.uint8), ("tif", np.uint16), ("tif", np.int16),
     ("tif", np.float32)],
)
def test_stack_round_trip_read_back_with_pil_and_tifffile(tmp_path, rng, fmt, dtype):
    vol = _volume(rng, dtype)
    save_volume(vol, tmp_path / "out", slice_format=fmt)

    files = sorted((tmp_path / "out").iterdir())
    assert [f.name for f in files] == [f"{z:04d}.{fmt}" for z in range(7)]
    for z, f in enumerate(files):
        image = np.asarray(Image.open(f)) if fmt == "png" else tifffile.imread(f)
        assert image.dtype == dtype
        np.testing.assert_array_equal(image, vol[0, :, :, z].T)
    back = load_volume(tmp_path / "out", spacing=(0.5, 0.25, 2.0))
    np.testing.assert_array_equal(back.numpy(), vol)
    np.testing.assert_array_equal(back.affine.numpy(), np.diag([0.5, 0.25, 2.0, 1.0]))
    assert back.meta["spacing"] == (0.5, 0.25, 2.0)


@pytest.mark.parametrize("fmt", ["png", "tif"])
def test_stack_load_peaks_below_1_3x_the_volume(tmp_path, rng, fmt):
    # Decoding into one preallocated buffer; a list of slices then np.stack would peak at 2x.
    vol = _volume(rng, np.uint16, (1, 128, 128, 64))
    save_volume(vol, tmp_path / "s", slice_format=fmt)

    tracemalloc.start()
    try:
        loaded = load_volume(tmp_path / "s", workers=2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    np.testing.assert_array_equal(loaded.numpy(), vol)
    assert peak <= 1.3 * vol.nbytes


def test_existing_stack_directory_is_replaced_whole(tmp_path, rng):
    save_volume(_volume(rng, np.uint8, (1, 4, 4, 9)), tmp_path / "s")
    vol = _volume(rng, np.uint8, (1, 4, 4, 3))
    save_volume(vol, tmp_path / "s")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["0000.tif", "0001.tif", "0002.tif"]
    np.testing.assert_array_equal(load_volume(tmp_path / "s").numpy(), vol)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


# ------------------------------------------------------------------------------ NIfTI


def test_nifti_written_by_nibabel_loads_with_affine_and_dtype(tmp_path, rng):
    data = _volume(rng, np.int16, (5, 6, 7))
    nib.save(nib.Nifti1Image(data, OBLIQUE), tmp_path / "a.nii.gz")

    vol = load_volume(tmp_path / "a.nii.gz")

    assert vol.shape == (1, 5, 6, 7) and vol.dtype == torch.int16
    np.testing.assert_array_equal(vol[0].numpy(), data)
    np.testing.assert_array_equal(vol.affine.numpy(), OBLIQUE)
    assert vol.meta["spacing"] == (0.75, 1.5, 2.5)


def test_nifti_4d_loads_as_channels(tmp_path, rng):
    data = _volume(rng, np.float32, (4, 5, 6, 3))
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "m.nii")
    vol = load_volume(tmp_path / "m.nii")
    assert vol.shape == (3, 4, 5, 6)
    np.testing.assert_array_equal(vol.numpy(), np.moveaxis(data, -1, 0))


def test_scaled_nifti_loads_as_float32_values(tmp_path, rng):
    raw = _volume(rng, np.int16, (4, 5, 6))
    nib.save(nib.Nifti1Image(raw, np.eye(4), dtype=np.int16), tmp_path / "s.nii")
    with open(tmp_path / "s.nii", "r+b") as f:  # scl_slope, scl_inter: float32 at bytes 112, 116
        f.seek(112)
        f.write(np.array([2.0, -1.0], dtype="<f4").tobytes())
    assert (nib.load(tmp_path / "s.nii").dataobj.slope, nib.load(tmp_path / "s.nii").dataobj.inter) == (2.0, -1.0)
    for lazy in (False, True):
        vol = np.asarray(load_volume(tmp_path / "s.nii", lazy=lazy))
        assert vol.dtype == np.float32
        np.testing.assert_array_equal(vol[0], raw.astype(np.float32) * 2 - 1)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32])
@pytest.mark.parametrize("name", ["v.nii", "v.nii.gz"])
def test_nifti_round_trip_read_back_with_nibabel(tmp_path, rng, dtype, name):
    vol = MetaTensor(torch.as_tensor(_volume(rng, dtype)), affine=torch.as_tensor(OBLIQUE))
    save_volume(vol, tmp_path / name)

    image = nib.load(tmp_path / name)
    assert image.get_data_dtype() == dtype
    np.testing.assert_array_equal(np.asanyarray(image.dataobj), vol[0].numpy())
    np.testing.assert_array_equal(image.affine, OBLIQUE)
    np.testing.assert_allclose(image.get_qform(), OBLIQUE, atol=1e-6)  # a quaternion: exact to rounding
    assert int(image.header["sform_code"]) == 1 and int(image.header["qform_code"]) == 1
    back = load_volume(tmp_path / name)
    assert back.dtype == vol.dtype
    np.testing.assert_array_equal(back.numpy(), vol.numpy())
    np.testing.assert_array_equal(back.affine.numpy(), OBLIQUE)


def test_nifti_rotation_affine_round_trips_at_float32(tmp_path, rng):
    affine = np.eye(4)
    affine[:3, :3] = _rotation_x(30) * [0.8, 0.8, 2.0]
    affine[:3, 3] = [-100.0, 50.0, 12.0]
    save_volume(_volume(rng, np.uint8), tmp_path / "r.nii.gz", affine=affine)
    expected = affine.astype(np.float32).astype(np.float64)  # NIfTI stores the sform as float32
    np.testing.assert_array_equal(nib.load(tmp_path / "r.nii.gz").affine, expected)
    np.testing.assert_allclose(load_volume(tmp_path / "r.nii.gz").meta["spacing"], (0.8, 0.8, 2.0), rtol=1e-6)


# ------------------------------------------------------------------------------ NRRD / MHA / DICOM


@pytest.mark.parametrize("suffix", [".mha", ".nrrd", ".mhd"])
def test_itk_file_with_spacing_and_flip_loads_in_ras(tmp_path, rng, suffix):
    data_zyx = _volume(rng, np.int16, (7, 6, 5))
    image = sitk.GetImageFromArray(data_zyx)
    image.SetSpacing((0.5, 0.75, 2.0))
    image.SetOrigin((10.0, -20.0, 5.0))
    image.SetDirection((1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))  # y flipped in LPS
    sitk.WriteImage(image, str(tmp_path / f"a{suffix}"))

    vol = load_volume(tmp_path / f"a{suffix}")

    assert vol.shape == (1, 5, 6, 7) and vol.dtype == torch.int16
    np.testing.assert_array_equal(vol[0].numpy(), data_zyx.transpose(2, 1, 0))
    # LPS (x, y, z) is RAS (-x, -y, z): the x axis points to -R, the flipped y axis to +A.
    expected = np.array([[-0.5, 0, 0, -10.0], [0, 0.75, 0, 20.0], [0, 0, 2.0, 5.0], [0, 0, 0, 1]])
    np.testing.assert_array_equal(vol.affine.numpy(), expected)
    assert vol.meta["spacing"] == (0.5, 0.75, 2.0)


@pytest.mark.parametrize("suffix", [".mha", ".nrrd", ".mhd"])
@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_itk_round_trip_read_back_with_simpleitk(tmp_path, rng, suffix, dtype):
    vol = MetaTensor(torch.as_tensor(_volume(rng, dtype)), affine=torch.as_tensor(OBLIQUE))
    save_volume(vol, tmp_path / f"v{suffix}")

    image = sitk.ReadImage(str(tmp_path / f"v{suffix}"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), vol[0].numpy().transpose(2, 1, 0))
    assert sitk.GetArrayFromImage(image).dtype == dtype
    assert image.GetSpacing() == (0.75, 1.5, 2.5)
    assert image.GetOrigin() == (10.0, -20.5, 3.25)
    # Voxel (1, 0, 0) lies one x-step along OBLIQUE's first column, in LPS.
    step = np.subtract(image.TransformIndexToPhysicalPoint((1, 0, 0)), image.GetOrigin())
    np.testing.assert_allclose(step, [0, 0.75, 0])
    back = load_volume(tmp_path / f"v{suffix}")
    np.testing.assert_array_equal(back.numpy(), vol.numpy())
    np.testing.assert_array_equal(back.affine.numpy(), OBLIQUE)


def test_itk_multichannel_round_trip(tmp_path, rng):
    vol = _volume(rng, np.float32, (2, 4, 5, 3))
    save_volume(vol, tmp_path / "v.mha", affine=OBLIQUE)
    image = sitk.ReadImage(str(tmp_path / "v.mha"))
    assert image.GetNumberOfComponentsPerPixel() == 2
    np.testing.assert_array_equal(load_volume(tmp_path / "v.mha").numpy(), vol)


def _write_dicom_series(directory, data_zyx, spacing, origin, direction):
    """One file per slice, named in reverse order of slice position."""
    directory.mkdir()
    image = sitk.GetImageFromArray(data_zyx)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction.ravel().tolist())
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = direction
    orientation = "\\".join(f"{v:.10f}" for v in (d[0, 0], d[1, 0], d[2, 0], d[0, 1], d[1, 1], d[2, 1]))
    depth = data_zyx.shape[0]
    for k in range(depth):
        slice_k = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in [
            ("0008|0060", "CT"),
            ("0020|000d", "1.2.826.0.1.3680043.2.1125.1"),
            ("0020|000e", "1.2.826.0.1.3680043.2.1125.1.2"),
            ("0020|0052", "1.2.826.0.1.3680043.2.1125.1.3"),
            ("0008|0018", f"1.2.826.0.1.3680043.2.1125.1.2.{k + 1}"),
            ("0020|0037", orientation),
            ("0020|0032", "\\".join(f"{v:.10f}" for v in position)),
            ("0020|0013", str(k + 1)),
            ("0018|0050", str(spacing[2])),
        ]:
            slice_k.SetMetaData(tag, value)
        writer.SetFileName(str(directory / f"IM{depth - k:03d}.dcm"))
        with keep_locale():  # GDCM's writer switches the process to the "C" locale
            writer.Execute(slice_k)
    return image


def test_dicom_series_oblique_loads_ordered_by_position_in_ras(tmp_path, rng):
    data_zyx = _volume(rng, np.int16, (5, 6, 4)) // 4
    direction = _rotation_x(30)
    reference = _write_dicom_series(tmp_path / "dcm", data_zyx, (0.5, 0.75, 2.0), (10.0, -20.0, 5.0), direction)

    vol = load_volume(tmp_path / "dcm")

    assert vol.shape == (1, 4, 6, 5)
    np.testing.assert_array_equal(vol[0].numpy(), data_zyx.transpose(2, 1, 0))
    np.testing.assert_allclose(vol.meta["spacing"], (0.5, 0.75, 2.0), atol=1e-6)
    affine = vol.affine.numpy()
    for index in [(0, 0, 0), (3, 0, 0), (0, 5, 0), (1, 2, 4)]:
        lps = reference.TransformIndexToPhysicalPoint(index)
        ras = affine @ [*index, 1.0]
        np.testing.assert_allclose(ras[:3], [-lps[0], -lps[1], lps[2]], atol=1e-5)


def _process_locale():
    return locale.setlocale(locale.LC_ALL), locale.getpreferredencoding(False)


def test_dicom_series_load_keeps_process_locale(tmp_path, rng, monkeypatch):
    before = _process_locale()
    _write_dicom_series(tmp_path / "dcm", _volume(rng, np.int16, (3, 4, 5)), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0),
                        np.eye(3))
    assert _process_locale() == before
    load_volume(tmp_path / "dcm")
    assert _process_locale() == before

    # The reader switching the locale the way GDCM's writer does is undone too, also on failure.
    execute = sitk.ImageSeriesReader.Execute

    def switching(reader):
        locale.setlocale(locale.LC_ALL, "C")
        return execute(reader)

    monkeypatch.setattr(sitk.ImageSeriesReader, "Execute", switching)
    assert load_volume(tmp_path / "dcm").shape == (1, 5, 4, 3)
    assert _process_locale() == before

    def failing(reader):
        locale.setlocale(locale.LC_ALL, "C")
        raise RuntimeError("gdcm: unreadable")

    monkeypatch.setattr(sitk.ImageSeriesReader, "Execute", failing)
    with pytest.raises(SlabError, match="not a readable DICOM series"):
        load_volume(tmp_path / "dcm")
    assert _process_locale() == before


def test_keep_locale_restores_every_category():
    before = _process_locale()
    with pytest.raises(RuntimeError), keep_locale():
        locale.setlocale(locale.LC_ALL, "C")
        raise RuntimeError("GDCM failed")
    assert _process_locale() == before


# ------------------------------------------------------------------------------ lazy volumes


INDICES = [
    (0, slice(1, 4), slice(None, None, 2), -1),
    (Ellipsis, 3),
    (slice(None), 2, slice(None), slice(5, 1, -2)),
    (0, Ellipsis, None, slice(2, 4)),
    (Ellipsis,),
    (0, 4, 5, 6),
    (slice(None), slice(2, 2)),
]


@pytest.mark.parametrize("index", INDICES)
@pytest.mark.parametrize("source", ["stack", "v.nii", "v.nii.gz", "four.nii"])
def test_lazy_indexing_equals_eager(tmp_path, rng, index, source):
    vol = _volume(rng, np.uint16, (2, 5, 6, 7) if source == "four.nii" else (1, 5, 6, 7))
    save_volume(vol, tmp_path / source, affine=np.diag([1.0, 1.0, 1.0, 1.0]))

    lazy = load_volume(tmp_path / source, lazy=True)

    assert isinstance(lazy, LazyVolume) and lazy.shape == vol.shape and lazy.dtype == vol.dtype
    out = lazy[index]
    assert type(out) is type(vol[index]) and out.dtype == vol.dtype
    np.testing.assert_array_equal(out, vol[index])
    np.testing.assert_array_equal(np.asarray(lazy), load_volume(tmp_path / source).numpy())


def test_lazy_stack_reads_only_the_slices_asked_for(tmp_path, rng, monkeypatch):
    save_volume(_volume(rng, np.uint8, (1, 4, 4, 12)), tmp_path / "s")
    lazy = load_volume(tmp_path / "s", lazy=True, spacing=(2.0, 2.0, 3.0))
    read = []
    import slab.io.lazy

    decode = slab.io.stacks.decode_slice
    monkeypatch.setattr(slab.io.stacks, "decode_slice", lambda path: read.append(path.name) or decode(path))

    lazy[0, :, :, 3:6]

    assert sorted(read) == ["0003.tif", "0004.tif", "0005.tif"]
    np.testing.assert_array_equal(lazy.affine, np.diag([2.0, 2.0, 3.0, 1.0]))
    assert lazy.meta["spacing"] == (2.0, 2.0, 3.0)


def test_lazy_rejects_advanced_indexing_and_out_of_range(tmp_path, rng):
    save_volume(_volume(rng, np.uint8), tmp_path / "s")
    lazy = load_volume(tmp_path / "s", lazy=True)
    with pytest.raises(TypeError):
        lazy[0, [1, 2]]
    with pytest.raises(IndexError):
        lazy[0, 0, 0, 7]


# ------------------------------------------------------------------------------ channels, geometry, transforms


def test_list_of_files_loads_as_channels(tmp_path, rng):
    a, b = _volume(rng, np.float32, (5, 6, 7)), _volume(rng, np.float32, (5, 6, 7))
    nib.save(nib.Nifti1Image(a, OBLIQUE), tmp_path / "t1.nii.gz")
    nib.save(nib.Nifti1Image(b, OBLIQUE), tmp_path / "t2.nii.gz")

    vol = load_volume([tmp_path / "t1.nii.gz", tmp_path / "t2.nii.gz"])

    assert vol.shape == (2, 5, 6, 7)
    np.testing.assert_array_equal(vol.numpy(), np.stack([a, b]))
    np.testing.assert_array_equal(vol.affine.numpy(), OBLIQUE)


def test_list_of_files_with_other_geometry_raises(tmp_path, rng):
    nib.save(nib.Nifti1Image(_volume(rng, np.uint8, (5, 6, 7)), OBLIQUE), tmp_path / "a.nii")
    nib.save(nib.Nifti1Image(_volume(rng, np.uint8, (5, 6, 7)), np.eye(4)), tmp_path / "b.nii")
    nib.save(nib.Nifti1Image(_volume(rng, np.uint8, (5, 6, 8)), OBLIQUE), tmp_path / "c.nii")
    with pytest.raises(SlabError, match="geometry") as excinfo:
        load_volume([tmp_path / "a.nii", tmp_path / "b.nii"])
    _one_line_error(excinfo, tmp_path / "b.nii")
    with pytest.raises(SlabError, match=r"\(5, 6, 8\)") as excinfo:
        load_volume([tmp_path / "a.nii", tmp_path / "c.nii"])
    _one_line_error(excinfo, tmp_path / "c.nii")


def test_check_same_geometry(rng):
    a = MetaTensor(torch.zeros(1, 4, 5, 6), affine=torch.as_tensor(OBLIQUE))
    check_same_geometry(a, MetaTensor(torch.zeros(3, 4, 5, 6), affine=torch.as_tensor(OBLIQUE)))
    shifted = OBLIQUE.copy()
    shifted[0, 3] += 0.01
    with pytest.raises(SlabError, match="^label: geometry"):
        moved = MetaTensor(torch.zeros(1, 4, 5, 6), affine=torch.as_tensor(shifted))
        check_same_geometry(a, moved, names=["image", "label"])
    with pytest.raises(SlabError, match=r"^label: spatial shape \(4, 5, 7\) does not match image \(4, 5, 6\)"):
        check_same_geometry(a, MetaTensor(torch.zeros(1, 4, 5, 7)), names=["image", "label"])
    with pytest.raises(SlabError, match=r"^TRUTH: spatial shape \(4, 5, 7\) does not match PRED"):
        check_same_geometry(a, MetaTensor(torch.zeros(1, 4, 5, 7)))


def test_save_takes_affine_from_meta_and_casts_to_dtype(tmp_path, rng):
    probabilities = torch.as_tensor(rng.random((1, 4, 5, 6)) * 3)
    save_volume(probabilities, tmp_path / "m.nii.gz", meta={"affine": torch.as_tensor(OBLIQUE)}, dtype=np.uint8)
    image = nib.load(tmp_path / "m.nii.gz")
    assert image.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(image.dataobj), probabilities[0].numpy().astype(np.uint8))
    np.testing.assert_array_equal(image.affine, OBLIQUE)


def test_spacing_override_keeps_orientation_and_origin(tmp_path, rng):
    nib.save(nib.Nifti1Image(_volume(rng, np.uint8), OBLIQUE), tmp_path / "a.nii")
    vol = load_volume(tmp_path / "a.nii", spacing=(1.0, 3.0, 0.5))
    expected = np.array([[0.0, 3.0, 0.0, -10.0], [-1.0, 0.0, 0.0, 20.5], [0.0, 0.0, 0.5, 3.25], [0, 0, 0, 1]])
    np.testing.assert_array_equal(vol.affine.numpy(), expected)
    assert vol.meta["spacing"] == (1.0, 3.0, 0.5)
    with pytest.raises(SlabError, match="^spacing: expected three positive numbers"):
        load_volume(tmp_path / "a.nii", spacing=(1.0, 0.0, 1.0))


def test_dictionary_transforms_round_trip(tmp_path, rng):
    data = _volume(rng, np.uint16, (5, 6, 7))
    nib.save(nib.Nifti1Image(data, OBLIQUE), tmp_path / "case.nii.gz")
    loaded = LoadVolumed(keys=["image"])({"image": str(tmp_path / "case.nii.gz"), "id": 3})
    assert loaded["id"] == 3
    SaveVolumed(keys=["image"], output_dir=tmp_path / "out", suffix=".mha")(loaded)
    back = LoadVolume()(tmp_path / "out" / "case_image.mha")
    np.testing.assert_array_equal(back[0].numpy(), data)
    np.testing.assert_allclose(back.affine.numpy(), OBLIQUE)
    SaveVolume(tmp_path / "out", suffix="", postfix="_stack")(loaded["image"])
    np.testing.assert_array_equal(load_volume(tmp_path / "out" / "case_stack").numpy()[0], data)


def test_atomic_write_leaves_nothing_on_failure_and_replaces_on_success(tmp_path):
    target = tmp_path / "table.csv"
    target.write_text("old", encoding="utf-8")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            tmp.write_text("half", encoding="utf-8")
            raise RuntimeError("interrupted")
    assert target.read_text(encoding="utf-8") == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]
    with atomic_write(target) as tmp:
        assert tmp.name == "table.csv" and tmp.parent != tmp_path
        tmp.write_text("new", encoding="utf-8")
    assert target.read_text(encoding="utf-8") == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]


# ------------------------------------------------------------------------------ bad input


def _assert_nothing_new(path, before):
    assert sorted(p.name for p in path.iterdir()) == before


def test_truncated_and_corrupt_nifti(tmp_path, rng):
    nib.save(nib.Nifti1Image(_volume(rng, np.uint16, (20, 20, 20)), np.eye(4)), tmp_path / "ok.nii.gz")
    nib.save(nib.Nifti1Image(_volume(rng, np.uint16, (20, 20, 20)), np.eye(4)), tmp_path / "ok.nii")
    gz, raw = (tmp_path / "ok.nii.gz").read_bytes(), (tmp_path / "ok.nii").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(gz[: len(gz) // 2])
    (tmp_path / "junk.nii.gz").write_bytes(b"not a nifti" * 50)
    (tmp_path / "cut.nii").write_bytes(raw[: len(raw) // 2])
    cases = [("cut.nii.gz", "truncated or corrupt"), ("junk.nii.gz", "not a readable NIfTI"), ("cut.nii", "truncated")]
    for name, pattern in cases:
        with pytest.raises(SlabError, match=pattern) as excinfo:
            load_volume(tmp_path / name)
        _one_line_error(excinfo, tmp_path / name)
    lazy = load_volume(tmp_path / "cut.nii.gz", lazy=True)  # a gzip stream ends only when read
    with pytest.raises(SlabError, match="truncated or corrupt"):
        lazy[0, :, :, 19]
    with pytest.raises(SlabError, match="truncated"):
        load_volume(tmp_path / "cut.nii", lazy=True)


def test_non_image_file_in_stack(tmp_path, rng):
    _write_slices(tmp_path / "s", [_volume(rng, np.uint8, (4, 4)) for _ in range(3)], ["0", "1", "2"], "png")
    (tmp_path / "s" / "1.png").write_text("this is not a PNG", encoding="utf-8")
    with pytest.raises(SlabError, match="not a readable .png image") as excinfo:
        load_volume(tmp_path / "s")
    _one_line_error(excinfo, tmp_path / "s" / "1.png")

    _write_slices(tmp_path / "t", [_volume(rng, np.uint8, (4, 4)) for _ in range(3)], ["0", "1", "2"], "tif")
    (tmp_path / "t" / "notes.txt").write_text("scan notes", encoding="utf-8")
    with pytest.raises(SlabError, match="not a .png/.tif/.jp2 slice") as excinfo:
        load_volume(tmp_path / "t")
    _one_line_error(excinfo, tmp_path / "t" / "notes.txt")


@pytest.mark.parametrize(
    "odd, expected",
    [
        (np.zeros((4, 5), np.uint8), "slice of 5x4 uint8, expected 4x4 uint8"),
        (np.zeros((4, 4), np.uint16), "4x4 uint16, expected 4x4 uint8"),
        (np.zeros((4, 4, 3), np.uint8), "expected a 2D single-channel slice"),
    ],
)
@pytest.mark.parametrize("fmt", ["png", "tif"])
def test_slice_of_other_size_dtype_or_channels_in_stack(tmp_path, rng, odd, expected, fmt):
    images = [_volume(rng, np.uint8, (4, 4)) for _ in range(3)] + [odd]
    _write_slices(tmp_path / "s", images, ["a1", "a2", "a3", "a10"], fmt)
    for lazy in (False, True):
        with pytest.raises(SlabError, match=expected) as excinfo:
            np.asarray(load_volume(tmp_path / "s", lazy=lazy))
        _one_line_error(excinfo, tmp_path / "s" / f"a10.{fmt}")


def test_empty_directory_and_mixed_formats(tmp_path, rng):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SlabError, match="empty directory") as excinfo:
        load_volume(tmp_path / "empty")
    _one_line_error(excinfo, tmp_path / "empty")
    _write_slices(tmp_path / "m", [_volume(rng, np.uint8, (4, 4))], ["0"], "png")
    _write_slices(tmp_path / "m", [_volume(rng, np.uint8, (4, 4))], ["1"], "tif")
    with pytest.raises(SlabError, match="mixes png and tif slices"):
        load_volume(tmp_path / "m")


def test_2d_file_where_volume_expected(tmp_path, rng):
    image = _volume(rng, np.uint8, (4, 5))
    nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / "flat.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(image), str(tmp_path / "flat.mha"))
    Image.fromarray(image).save(tmp_path / "flat.png")
    for name in ["flat.nii.gz", "flat.mha", "flat.png"]:
        with pytest.raises(SlabError, match="where a 3D volume is expected") as excinfo:
            load_volume(tmp_path / name)
        _one_line_error(excinfo, tmp_path / name)


def test_missing_file_and_unsupported_suffix(tmp_path, rng):
    with pytest.raises(SlabError, match="no such file or directory") as excinfo:
        load_volume(tmp_path / "absent.nii.gz")
    _one_line_error(excinfo, tmp_path / "absent.nii.gz")
    (tmp_path / "scan.xyz").write_bytes(b"\0" * 10)
    with pytest.raises(SlabError, match="unsupported format '.xyz'") as excinfo:
        load_volume(tmp_path / "scan.xyz")
    _one_line_error(excinfo, tmp_path / "scan.xyz")
    with pytest.raises(SlabError, match="unsupported output format '.xyz'"):
        save_volume(_volume(rng, np.uint8), tmp_path / "out.xyz")
    _assert_nothing_new(tmp_path, ["scan.xyz"])


def test_bad_outputs_write_nothing(tmp_path, rng):
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "report.pdf").write_text("mine", encoding="utf-8")
    cases = [
        (_volume(rng, np.float32), "stack", {"slice_format": "png"}, "PNG holds uint8 or uint16"),
        (_volume(rng, np.uint8, (2, 3, 3, 3)), "stack", {}, "holds one channel"),
        (_volume(rng, np.uint8), "keep", {}, "holds files other than slices"),
        (_volume(rng, np.uint8), "one.png", {}, "written to a directory"),
        (_volume(rng, np.uint8)[0], "v.nii.gz", {}, r"expected shape \(C, X, Y, Z\)"),
    ]
    for array, name, kwargs, pattern in cases:
        with pytest.raises(SlabError, match=pattern):
            save_volume(array, tmp_path / name, **kwargs)
    _assert_nothing_new(tmp_path, ["keep"])
    assert [p.name for p in (tmp_path / "keep").iterdir()] == ["report.pdf"]


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32])
@pytest.mark.parametrize("compression", [None, "lzw", "zlib", "packbits"])
@pytest.mark.parametrize("byteorder", ["<", ">"])
def test_tiff_slices_decode_as_tifffile_reads_them(tmp_path, dtype, compression, byteorder):
    """The fast path (a struct-read header, imagecodecs' libtiff decode) gives tifffile's array."""
    import tifffile

    from slab.io.stacks import _plain_tiff, decode_slice

    rng = np.random.default_rng(0)
    image = (rng.random((37, 53)) * 1000).astype(dtype)
    path = tmp_path / "s.tif"
    tifffile.imwrite(path, image, compression=compression, byteorder=byteorder)
    assert _plain_tiff(path, path.read_bytes()) is not None
    decoded = decode_slice(path)
    assert decoded.dtype == tifffile.imread(path).dtype and np.array_equal(decoded, tifffile.imread(path))


def test_tiff_fast_path_falls_back_and_refuses_bombs(tmp_path):
    import struct

    import tifffile

    from slab.core.errors import SlabError
    from slab.io.stacks import _plain_tiff, decode_slice

    rgb = tmp_path / "rgb.tif"
    tifffile.imwrite(rgb, np.zeros((4, 5, 3), np.uint8))
    assert _plain_tiff(rgb, rgb.read_bytes()) is None  # three samples: tifffile reads (and refuses) it
    with pytest.raises(SlabError, match="2D single-channel"):
        decode_slice(rgb)
    big = tmp_path / "big.tif"
    tifffile.imwrite(big, np.zeros((6, 7), np.uint16), bigtiff=True)
    assert _plain_tiff(big, big.read_bytes()) is None and decode_slice(big).shape == (6, 7)
    # a header claiming 60000 x 60000 uncompressed in a tiny file is refused before decoding
    bomb = tmp_path / "bomb.tif"
    tifffile.imwrite(bomb, np.zeros((8, 8), np.uint8))
    data = bytearray(bomb.read_bytes())
    offset = struct.unpack("<I", data[4:8])[0]
    count = struct.unpack("<H", data[offset:offset + 2])[0]
    for i in range(count):
        at = offset + 2 + 12 * i
        tag, kind = struct.unpack("<HH", data[at:at + 4])
        if tag in (256, 257):
            data[at + 8:at + 12] = struct.pack("<I", 60000) if kind == 4 else struct.pack("<HH", 60000, 0)
    bomb.write_bytes(bytes(data))
    with pytest.raises(SlabError, match="bomb.tif"):
        decode_slice(bomb)
