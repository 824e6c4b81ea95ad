"""Phantoms: deterministic, aligned with their labels, written with their geometry."""
import numpy as np
import pytest

from slab.pipeline.cli import main
from slab.pipeline.data.phantom import make_phantom, write_phantom
from slab.core.errors import SlabError
from slab.io.volumes import load_volume


@pytest.mark.parametrize("kind", ["vessels", "organs", "tumour"])
def test_deterministic_per_seed(kind):
    a = make_phantom((24, 20, 16), seed=3, kind=kind)
    b = make_phantom((24, 20, 16), seed=3, kind=kind)
    c = make_phantom((24, 20, 16), seed=4, kind=kind)
    np.testing.assert_array_equal(a.image.numpy(), b.image.numpy())
    np.testing.assert_array_equal(a.label.numpy(), b.label.numpy())
    assert not np.array_equal(a.image.numpy(), c.image.numpy())


def test_vessels_bright_and_thin_ones_sparse():
    image, label, affine = make_phantom((40, 40, 40), seed=1)
    np.testing.assert_array_equal(affine, np.eye(4))
    assert image.dtype.is_floating_point is False and str(image.dtype) == "torch.uint16"
    assert image.shape == label.shape == (1, 40, 40, 40)
    img, lab = image.numpy().astype(float), label.numpy() > 0
    assert 0.002 < lab.mean() < 0.3
    assert img[lab].mean() > img[~lab].mean() + 5 * img[~lab].std() / 2
    sparse = make_phantom((40, 40, 40), seed=1, sparse=True).label.numpy() > 0
    assert sparse.sum() < lab.sum() and not np.any(sparse & ~lab)


def test_organs_and_tumour_layouts():
    image, label, _ = make_phantom((32, 32, 24), seed=2, kind="organs")
    assert image.shape == (1, 32, 32, 24) and label.shape == (3, 32, 32, 24)
    img = image.numpy()[0].astype(float)
    means = [img[label.numpy()[c] > 0].mean() for c in range(3)]
    assert all(label.numpy()[c].any() for c in range(3)) and means == sorted(means)
    image, label, _ = make_phantom((32, 32, 24), seed=2, kind="tumour")
    assert image.shape == (4, 32, 32, 24) and label.shape == (1, 32, 32, 24)
    assert set(np.unique(label.numpy())) == {0, 1, 2, 4}
    t1ce = image.numpy()[2].astype(float)
    lab = label.numpy()[0]
    assert t1ce[lab == 4].mean() > t1ce[lab == 2].mean()  # the enhancing rim enhances


def test_write_phantom_geometry(tmp_path):
    image_path, label_path = write_phantom(tmp_path / "ph", (16, 12, 10), 0, (0.5, 0.75, 2.0))
    assert (image_path, label_path) == (tmp_path / "ph/image.nii.gz", tmp_path / "ph/label.nii.gz")
    image, label = load_volume(image_path), load_volume(label_path)
    assert image.shape == label.shape == (1, 16, 12, 10)
    np.testing.assert_allclose(np.asarray(image.affine), np.diag([0.5, 0.75, 2.0, 1.0]))
    np.testing.assert_array_equal(image.numpy(), make_phantom((16, 12, 10), seed=0).image.numpy())


def test_cli(tmp_path, capsys):
    assert main(["phantom", str(tmp_path / "o"), "--shape", "12", "12", "10", "--seed", "1", "--kind", "organs"]) == 0
    assert load_volume(tmp_path / "o" / "label.nii.gz").shape == (3, 12, 12, 10)
    assert main(["phantom", str(tmp_path / "bad"), "--shape", "0", "12", "10", "--seed", "1"]) == 2
    assert "shape" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("kwargs", [
    {"shape": (8, 8)}, {"shape": (8, 8, 0)}, {"shape": (8, 8, 8.5)}, {"shape": (8, 8, 4)},
    {"kind": "bones"}, {"seed": -1}, {"spacing": (1, 0, 1)}, {"kind": "organs", "sparse": True},
])
def test_bad_arguments(kwargs):
    with pytest.raises(SlabError):
        make_phantom(**{"shape": (8, 8, 8), **kwargs})


def test_fractures_crack_the_chosen_organs_only():
    """A fracture darkens a plane through the organ (every axial slice of it), inside that organ
    only; the label and every other voxel are those of the phantom without it."""
    from scipy import ndimage

    plain = make_phantom((40, 36, 30), seed=4, kind="organs")
    cracked = make_phantom((40, 36, 30), seed=4, kind="organs", fractures=[2, 0])
    assert np.array_equal(plain.label.numpy(), cracked.label.numpy())
    changed = plain.image.numpy()[0] != cracked.image.numpy()[0]
    labels = plain.label.numpy().astype(bool)
    assert changed.any() and not (changed & ~(labels[0] | labels[2])).any()
    for organ in (0, 2):
        crack = changed & labels[organ]
        slices = np.flatnonzero(labels[organ].any(axis=(0, 1)))
        assert set(np.flatnonzero(crack.any(axis=(0, 1)))) >= set(slices[1:-1])  # seen in the organ's slices
        assert cracked.image.numpy()[0][crack].mean() < 0.6 * plain.image.numpy()[0][crack].mean()  # dark
        assert ndimage.label(crack, structure=np.ones((3, 3, 3)))[1] <= 2  # one plane (cut at most by the edge)
    again = make_phantom((40, 36, 30), seed=4, kind="organs", fractures=(0, 2))
    assert np.array_equal(again.image.numpy(), cracked.image.numpy())
    for bad, kind in (([3], "organs"), (["x"], "organs"), ([0], "vessels")):
        with pytest.raises(SlabError, match="fractures"):
            make_phantom((16, 16, 16), kind=kind, fractures=bad)
