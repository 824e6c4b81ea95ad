"""slab.pipeline.evaluation.render: category maps, the 3D hit/miss picture, mesh export, cross sections, CLI."""
import numpy as np
import pytest
import pyvista as pv
from PIL import Image

from slab.pipeline.cli import main
from slab.pipeline.evaluation.metrics import evaluate
from slab.pipeline.evaluation.sections import cross_sections
from slab.pipeline.evaluation.render import category_map, display_factor, export_mesh, render_hits
from slab.core.errors import SlabError
from slab.io.volumes import load_volume, save_volume

N, R, SHIFT = 24, 6, 3
SIZE = (480, 400)  # small pictures keep the tests fast


def _sphere(centre, shape=(N, N, N), radius=R):
    grid = np.indices(shape)
    return (sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2).astype(np.uint8)


@pytest.fixture
def spheres():
    truth = _sphere((12, 12, 12))
    pred = _sphere((12 + SHIFT, 12, 12))
    return pred, truth


def _colour_pixels(img):
    """Pixels of the hit (yellow), false-positive (green) and miss (red) hues, shading aside."""
    r, g, b = (img[..., i].astype(int) for i in range(3))
    yellow = (r > 100) & (g > 0.6 * r) & (b < 0.4 * g)
    green = (g > 60) & (r < 0.5 * g) & (b < 0.5 * g)
    red = (r > 60) & (g < 0.3 * r) & (b < 0.3 * r)
    return {"hit": int(yellow.sum()), "false_positive": int(green.sum()), "miss": int(red.sum())}


def test_category_map_full_resolution(spheres):
    pred, truth = spheres
    labels, counts = category_map(pred, truth)
    p, t = pred.astype(bool), truth.astype(bool)
    expected = np.select([p & t, p & ~t, ~p & t], [1, 2, 3], 0)
    np.testing.assert_array_equal(labels, expected)
    assert counts == {"hit": int((p & t).sum()), "false_positive": int((p & ~t).sum()), "miss": int((~p & t).sum())}
    # Memory order and a channel axis change nothing.
    again, _ = category_map(np.asfortranarray(pred)[None], truth[None])
    np.testing.assert_array_equal(again, expected)


def test_category_map_blocks_keep_thin_structures_and_take_the_majority():
    pred = np.zeros((4, 4, 5), np.uint8)
    truth = np.zeros_like(pred)
    pred[0:2, 0:2, 0:2] = 1
    truth[0:2, 0:2, 0] = 1  # block (0, 0, 0): 4 hits, 4 false positives -> tie -> hit
    pred[2, 2, 2] = 1
    truth[2:4, 2, 2] = 1  # block (1, 1, 1): 1 hit, 1 miss -> tie -> hit
    truth[3, 3, 4] = 1  # block (1, 1, 2), a padded edge block: one missed voxel survives
    pred[0:2, 2:4, 2:4] = 1
    truth[0, 2, 2] = 1  # block (0, 1, 1): 1 hit, 7 false positives -> false positive
    labels, counts = category_map(pred, truth, factor=2)
    expected = np.zeros((2, 2, 3), np.uint8)
    expected[0, 0, 0] = expected[1, 1, 1] = 1
    expected[1, 1, 2] = 3
    expected[0, 1, 1] = 2
    np.testing.assert_array_equal(labels, expected)
    assert counts == {"hit": 6, "false_positive": 11, "miss": 2}


def test_category_map_reads_lazy_volumes(tmp_path, spheres):
    pred, truth = spheres
    save_volume(pred[None], tmp_path / "pred.nii")
    save_volume(truth[None], tmp_path / "truth")  # a slice stack
    lazy_pred, lazy_truth = load_volume(tmp_path / "pred.nii", lazy=True), load_volume(tmp_path / "truth", lazy=True)
    for factor in (1, 2):
        np.testing.assert_array_equal(
            category_map(lazy_pred, lazy_truth, factor)[0], category_map(pred, truth, factor)[0]
        )


def test_display_factor():
    assert display_factor((256, 256, 256), 256**3) == 1
    assert display_factor((512, 512, 512), 256**3) == 2
    assert display_factor((513, 512, 512), 256**3) == 3  # ceil(513 / 2) = 257 is one too many
    assert display_factor((2000, 100, 100), 10**6) == 3  # 667 * 34 * 34 < 10**6 < 1000 * 50 * 50


def test_render_hits_picture(tmp_path, spheres):
    pred, truth = spheres
    out = tmp_path / "hits.png"
    result = render_hits(pred, truth, out, spacing=(1, 1, 2), views=2, size=SIZE, title="phantom")
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape == (SIZE[1], SIZE[0], 3)
    scene = img[int(SIZE[1] * 0.15):]  # below the title and legend
    pixels = _colour_pixels(scene)
    assert all(n > 200 for n in pixels.values()), pixels
    reference = evaluate(pred, truth, spacing=(1, 1, 2), tolerances=())
    assert result["scores"]["dice"] == pytest.approx(reference["dice"])
    assert result["counts"]["hit"] == int((pred & truth).sum())
    assert result["notes"] == [] and result["factor"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hits.png"]  # nothing half-written left


def test_render_hits_downsamples_large_volumes(tmp_path, spheres):
    pred, truth = spheres
    result = render_hits(pred, truth, tmp_path / "hits.png", views=1, size=SIZE, max_voxels=12**3,
                         scores={"dice": 0.5})
    assert result["factor"] == 2
    assert any("1/2 resolution" in note for note in result["notes"])
    assert result["counts"]["miss"] == int((truth & ~pred).sum())  # counts stay full resolution


def test_render_hits_empty_masks(tmp_path, spheres, caplog):
    _, truth = spheres
    empty = np.zeros_like(truth)
    with caplog.at_level("INFO", logger="slab.pipeline.evaluation.render"):
        result = render_hits(empty, truth, tmp_path / "miss.png", views=1, size=SIZE)
    assert result["notes"] == ["prediction is empty: all of the truth is missed"]
    assert "prediction is empty" in caplog.text
    pixels = _colour_pixels(np.asarray(Image.open(tmp_path / "miss.png").convert("RGB"))[int(SIZE[1] * 0.15):])
    assert pixels["miss"] > 200 and pixels["hit"] == 0 and pixels["false_positive"] == 0
    result = render_hits(empty, empty, tmp_path / "none.png", views=1, size=SIZE, mesh=tmp_path / "none.vtk")
    assert result["notes"][0] == "prediction and truth are both empty: nothing to show"
    assert result["mesh"] is None and not (tmp_path / "none.vtk").exists()
    assert Image.open(tmp_path / "none.png").size == SIZE


def test_bad_input(tmp_path, spheres):
    pred, truth = spheres
    with pytest.raises(SlabError, match=r"prediction: spatial shape \(24, 24, 23\) does not match truth"):
        render_hits(pred[:, :, :-1], truth, tmp_path / "x.png")
    with pytest.raises(SlabError, match="prediction: 2 channels; choose one"):
        category_map(np.stack([pred, pred]), np.stack([truth, truth]))
    labels, _ = category_map(np.stack([pred, 0 * pred]), np.stack([truth, truth]), channel=1)
    assert set(np.unique(labels)) == {0, 3}
    with pytest.raises(SlabError, match="unsupported mesh format '.obj'"):
        export_mesh(pred, truth, tmp_path / "x.obj")
    with pytest.raises(SlabError, match="views"):
        render_hits(pred, truth, tmp_path / "x.png", views=0)
    assert list(tmp_path.iterdir()) == []


def test_export_mesh_categories(tmp_path, spheres):
    pred, truth = spheres
    vtk = export_mesh(pred, truth, tmp_path / "hits.vtk", spacing=(1, 1, 2))
    mesh = pv.read(tmp_path / "hits.vtk")
    codes, cells = np.unique(mesh.cell_data["category"], return_counts=True)
    assert codes.tolist() == [1, 2, 3]
    assert dict(zip(["hit", "false_positive", "miss"], cells.tolist())) == vtk["faces"]
    # World coordinates in LPS (x negated from RAS): the union of the spheres spans voxels x in
    # [6, 21], z in [6, 18]; the default affine is diag(spacing).
    xmin, xmax, _, _, zmin, zmax = mesh.bounds
    assert xmin == pytest.approx(-(12 + SHIFT + R), abs=1) and xmax == pytest.approx(-6, abs=1)
    assert zmin == pytest.approx(2 * 6, abs=2) and zmax == pytest.approx(2 * 18, abs=2)

    export_mesh(pred, truth, tmp_path / "hits.ply", spacing=(1, 1, 2))
    colours = np.asarray(pv.read(tmp_path / "hits.ply").cell_data["RGB"])
    by_colour = {name: int(np.all(colours == rgb, axis=1).sum())
                 for name, rgb in {"hit": (255, 215, 0), "false_positive": (30, 170, 30), "miss": (220, 20, 20)}.items()}
    assert by_colour == vtk["faces"]

    export_mesh(pred, truth, tmp_path / "hits.glb")
    def leaves(block):
        return [leaf for b in block for leaf in (leaves(b) if isinstance(b, pv.MultiBlock) else [b])]

    assert sorted(leaf.n_cells for leaf in leaves(pv.read(tmp_path / "hits.glb"))) == sorted(vtk["faces"].values())


def test_export_mesh_decimates_per_category(tmp_path, spheres):
    pred, truth = spheres
    full = export_mesh(pred, truth, tmp_path / "full.vtk")["faces"]
    small = export_mesh(pred, truth, tmp_path / "small.vtk", max_faces=sum(full.values()) // 4)["faces"]
    assert sum(small.values()) <= sum(full.values()) // 4 * 1.1
    assert all(small[name] > 0 for name in full)
    with pytest.raises(SlabError, match="both empty"):
        export_mesh(0 * pred, 0 * truth, tmp_path / "empty.vtk")


def test_cross_sections(tmp_path, spheres):
    pred, truth = spheres
    image = truth * 100.0 + np.indices(truth.shape)[0]
    out = tmp_path / "sections.png"
    result = cross_sections(image, pred, truth, out, spacing=(1, 1, 3), size=(600, 240))
    assert result["index"] == (12, 12, 12)  # the truth's centre of mass
    img = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert img.shape == (240, 600, 3)
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    assert ((r > 200) & (g < 80) & (b > 200)).sum() > 50  # magenta prediction outline
    assert ((r < 80) & (g > 200) & (b > 200)).sum() > 50  # cyan truth outline
    assert cross_sections(None, pred, 0 * truth, tmp_path / "s2.png", index=(1, 2, 3))["index"] == (1, 2, 3)
    with pytest.raises(SlabError, match="index"):
        cross_sections(None, pred, truth, tmp_path / "s3.png", index=(0, 0, 99))


def test_cli_render(tmp_path, spheres, capsys):
    pred, truth = spheres
    for name, array in {"pred": pred, "truth": truth, "image": truth * 50, "empty": 0 * pred}.items():
        save_volume(array[None], tmp_path / f"{name}.nii.gz")
    files = {k: str(tmp_path / f"{k}.nii.gz") for k in ("pred", "truth", "image", "empty")}
    out, mesh, sections = tmp_path / "o.png", tmp_path / "o.vtk", tmp_path / "s.png"
    code = main(["render", files["pred"], files["truth"], "-o", str(out), "--views", "2", "--size", "480", "400",
                 "--image", files["image"], "--mesh", str(mesh), "--sections", str(sections)])
    printed = capsys.readouterr().out
    assert code == 0
    assert Image.open(out).size == (480, 400) and mesh.exists() and sections.exists()
    assert "Dice" in printed and f"{int((pred & truth).sum())} hit" in printed

    assert main(["render", files["empty"], files["truth"], "-o", str(tmp_path / "e.png"), "--views", "1",
                 "--size", "480", "400"]) == 0
    assert "note: prediction is empty" in capsys.readouterr().out


def test_cli_render_bad_input(tmp_path, spheres, capsys):
    pred, truth = spheres
    save_volume(pred[None, :, :, :-1], tmp_path / "short.nii.gz")
    save_volume(truth[None], tmp_path / "truth.nii.gz")
    out = tmp_path / "o.png"
    assert main(["render", str(tmp_path / "short.nii.gz"), str(tmp_path / "truth.nii.gz"), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slab: error: ") and "short.nii.gz" in err and err.count("\n") == 1
    assert main(["render", str(tmp_path / "missing.nii.gz"), str(tmp_path / "truth.nii.gz"), "-o", str(out)]) == 2
    assert "missing.nii.gz" in capsys.readouterr().err
    assert main(["render", str(tmp_path / "truth.nii.gz"), str(tmp_path / "truth.nii.gz"), "-o", str(tmp_path / "o.jpg")]) == 2
    assert "expected a .png" in capsys.readouterr().err
    assert not out.exists()


def test_mesh_is_in_world_coordinates_over_the_image(tmp_path, spheres):
    """The mesh of an oblique volume sits where its voxels are in the world (LPS, as Slicer reads
    meshes): its centroid is the mask's world centroid."""
    _, truth = spheres
    angle = 0.7
    affine = np.eye(4)
    affine[:3, :3] = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0],
                               [0, 0, 1.0]]) @ np.diag([0.8, 0.8, 2.0])
    affine[:3, 3] = [-50.0, 20.0, 10.0]
    export_mesh(truth, truth, tmp_path / "hits.vtk", spacing=(0.8, 0.8, 2.0), affine=affine)
    mesh = pv.read(tmp_path / "hits.vtk")
    voxels = np.argwhere(truth).mean(axis=0)
    ras = affine[:3, :3] @ voxels + affine[:3, 3]
    np.testing.assert_allclose(np.asarray(mesh.points).mean(axis=0), ras * [-1, -1, 1], atol=0.6)


def test_a_one_slice_volume_renders(tmp_path, capsys):
    mask = np.zeros((20, 18, 1), np.uint8)
    mask[5:10, 4:12, 0] = 1
    save_volume(mask[None], tmp_path / "one.nii.gz")
    path = str(tmp_path / "one.nii.gz")
    assert main(["render", path, path, "-o", str(tmp_path / "hits.png"), "--views", "1", "--size", "480", "400",
                 "--sections", str(tmp_path / "s.png"), "--mesh", str(tmp_path / "m.vtk")]) == 0
    assert pv.read(tmp_path / "m.vtk").n_cells > 0 and (tmp_path / "s.png").is_file()


def test_axial_section_of_a_dicom_series_is_the_slice_a_dicom_viewer_shows():
    """A DICOM viewer shows each stored slice image as it is, row 0 at the top (anterior) and column
    0 on the left (the patient's right): the radiological convention the sections follow."""
    from pathlib import Path

    import pydicom
    from pydicom.data import get_testdata_file

    from slab.pipeline.evaluation.sections import orientation, section

    series = Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests" / "98892001" / "CT5N"
    volume = load_volume(series)
    codes = orientation(volume.affine)
    datasets = sorted((pydicom.dcmread(p) for p in series.iterdir()), key=lambda d: float(d.ImagePositionPatient[2]))
    z_axis = codes.index("S") if "S" in codes else codes.index("I")
    for k, ds in enumerate(datasets):
        z = k if codes[z_axis] == "S" else len(datasets) - 1 - k
        shown = section(volume.numpy()[0], codes, "axial", [z if a == z_axis else 0 for a in range(3)])
        stored = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(shown, stored)


def test_every_view_puts_the_patient_where_radiology_does():
    """A RAS volume with a marker on the patient's right, anterior, superior corner: right is on
    the picture's left (axial, coronal), anterior at the top (axial) and on the left (sagittal),
    superior at the top (coronal, sagittal)."""
    from slab.pipeline.evaluation.sections import orientation, section

    volume = np.zeros((5, 6, 7))
    volume[4, 5, 6] = 1  # highest x (right), y (anterior), z (superior) in RAS
    codes = orientation(np.eye(4))
    assert codes == ("R", "A", "S")
    corner = (4, 5, 6)
    axial, coronal, sagittal = (section(volume, codes, view, corner) for view in ("axial", "coronal", "sagittal"))
    assert np.argwhere(axial).tolist() == [[0, 0]]  # top (anterior), left (right)
    assert np.argwhere(coronal).tolist() == [[0, 0]]  # top (superior), left (right)
    assert np.argwhere(sagittal).tolist() == [[0, 0]]  # top (superior), left (anterior)
    flipped = np.diag([-1.0, -1.0, 1.0, 1.0])  # LPS-ordered voxels, as ITK reads DICOM before conversion
    assert orientation(flipped) == ("L", "P", "S")
    assert np.argwhere(section(volume, orientation(flipped), "axial", corner)).tolist() == [[5, 4]]


def test_prediction_preview_without_truth(tmp_path):
    """``render_prediction``: each label in its palette colour, counts and volumes in the legend."""
    from PIL import Image

    from slab.pipeline.evaluation.prediction_picture import label_display_map, render_prediction
    from slab.io.labelmap import PALETTE

    mask = np.zeros((2, 23, 19, 11), np.uint8)
    mask[0, 2:9, 3:10, 2:8] = 1
    mask[1, 12:20, 5:15, 1:9] = 1
    image = np.random.default_rng(0).normal(size=(23, 19, 11)).astype(np.float32)
    out = render_prediction(mask, tmp_path / "p.png", names=["kidney", "vessel"], spacing=(0.5, 0.5, 2.0),
                            image=image, size=(400, 300), views=2)
    assert out["counts"] == {"kidney": int(mask[0].sum()), "vessel": int(mask[1].sum())} and out["factor"] == 1
    picture = np.asarray(Image.open(tmp_path / "p.png").convert("RGB")).astype(int)
    assert picture.shape == (300, 400, 3)
    for colour in PALETTE[:2]:  # both labels are drawn (shaded, so near their colour)
        rgb = np.round(np.asarray(colour) * 255)
        assert (np.abs(picture - rgb).sum(axis=-1) < 60).sum() > 50
    labels, counts = label_display_map(mask, factor=2)
    assert counts == [int(mask[0].sum()), int(mask[1].sum())] and labels.shape == (12, 10, 6)
    assert set(np.unique(labels)) == {0, 1, 2}
    empty = render_prediction(np.zeros((1, 5, 5, 5), np.uint8), tmp_path / "e.png", size=(200, 200), views=1)
    assert empty["notes"] == ["the prediction is empty: nothing to show"]
