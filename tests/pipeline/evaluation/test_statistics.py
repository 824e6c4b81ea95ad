"""Per-label statistics of a prediction (slab predict --statistics) against scipy and nibabel."""
import numpy as np
import pytest
import torch
from nibabel.affines import apply_affine, voxel_sizes
from scipy import ndimage as ndi

import slab.pipeline.evaluation.statistics as statistics
from slab.pipeline.evaluation.statistics import label_statistics
from slab.core.errors import SlabError
from slab.io.volumes import load_volume, save_volume


def oblique_affine():
    """Anisotropic spacing (0.8, 0.8, 2.5) rotated about two axes, origin off zero."""
    a, b = 0.3, -0.2
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag([0.8, 0.8, 2.5])
    affine[:3, 3] = [-40.0, 12.5, 7.0]
    return affine


@pytest.fixture
def case(rng):
    shape = (23, 17, 11)
    mask = np.zeros((3, *shape), np.uint8)
    mask[0] = ndi.gaussian_filter(rng.random(shape), 1.2) > 0.52  # several blobs
    mask[1, 3:9, 4:6, 2:10] = 1
    mask[1, 15:17, 10:16, 0] = 1  # a second component in the first slice
    image = np.stack([rng.normal(40, 10, shape), rng.integers(0, 4000, shape)]).astype(np.float32)
    return mask, image, oblique_affine()


def test_statistics_match_scipy_and_nibabel(case):
    mask, image, affine = case
    result = label_statistics(mask, image, affine, ["blobs", "bars", "empty"])
    voxel = float(np.prod(voxel_sizes(affine)))
    assert result["voxel_volume_mm3"] == pytest.approx(voxel, rel=1e-12)
    for channel, name in zip(mask[:2], ("blobs", "bars")):
        entry = result["labels"][name]
        inside = channel.astype(bool)
        assert entry["voxels"] == inside.sum()
        assert entry["volume_mm3"] == pytest.approx(inside.sum() * voxel, rel=1e-12)
        assert entry["components"] == ndi.label(inside, ndi.generate_binary_structure(3, 3))[1]
        points = np.argwhere(inside)
        assert entry["bounding_box"] == [[int(points[:, a].min()), int(points[:, a].max())] for a in range(3)]
        np.testing.assert_allclose(entry["centroid_ras_mm"], apply_affine(affine, ndi.center_of_mass(inside)),
                                   rtol=0, atol=1e-9)
        for c, row in enumerate(entry["intensity"]):
            values = image[c][inside].astype(np.float64)
            expected = {"mean": values.mean(), "std": values.std(), "min": values.min(), "max": values.max(),
                        **{f"p{p}": np.percentile(values, p) for p in (5, 50, 95)}}
            assert row == pytest.approx(expected, rel=1e-12, abs=1e-9)
    assert result["labels"]["bars"]["components"] == 2
    assert result["labels"]["empty"] == {"voxels": 0, "volume_mm3": 0.0, "components": 0, "bounding_box": None,
                                         "centroid_ras_mm": None, "intensity": None}
    six = label_statistics(mask, None, affine, ["a", "b", "c"], connectivity=6)["labels"]["a"]
    assert six["components"] == ndi.label(mask[0])[1] and six["intensity"] is None


def test_lazy_stack_in_blocks_equals_in_memory(case, tmp_path, monkeypatch):
    mask, image, affine = case
    stack = tmp_path / "stack"
    save_volume(np.round(image[1:2]).astype(np.uint16), stack)
    lazy = load_volume(stack, lazy=True)
    memory = np.asarray(load_volume(stack), dtype=np.float32)
    monkeypatch.setattr(statistics, "_BLOCK_VOXELS", 23 * 17 * 3)  # blocks of three slices
    names = ["blobs", "bars", "empty"]
    assert label_statistics(torch.from_numpy(mask), lazy, affine, names) == label_statistics(mask, memory, affine, names)


def test_bad_arguments(case):
    mask, image, affine = case
    with pytest.raises(SlabError, match="2 names for 3 label channels"):
        label_statistics(mask, image, affine, ["a", "b"])
    with pytest.raises(SlabError, match="spatial shape"):
        label_statistics(mask, image[:, :-1], affine, ["a", "b", "c"])
    with pytest.raises(SlabError, match="connectivity"):
        label_statistics(mask, image, affine, ["a", "b", "c"], connectivity=8)
    nan = image.copy()
    nan[0][mask[1].astype(bool)] = np.nan
    with pytest.raises(SlabError, match="NaN"):
        label_statistics(mask, nan, affine, ["a", "b", "c"])
