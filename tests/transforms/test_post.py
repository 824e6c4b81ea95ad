"""slab.transforms.post against scikit-image / scipy on random volumes, and known answers."""
import inspect

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from monai.data import MetaTensor
from scipy import ndimage as ndi
from skimage.filters import apply_hysteresis_threshold
from skimage.morphology import remove_small_objects

from slab.transforms import post
from slab.core.errors import SlabError
from slab.transforms.post import (
    FillHoles,
    FillHolesd,
    HysteresisFill,
    HysteresisFilld,
    KeepLargestComponents,
    MaskToROI,
    MaskToROId,
    Postprocessd,
    RegionGrow,
    RegionGrowd,
    RemoveSmallComponents,
    Threshold,
    Thresholdd,
    organ_mask_from_image,
    postprocess,
)

SKIMAGE_CONNECTIVITY = {6: 1, 18: 2, 26: 3}


def smooth_map(rng, shape, sigma=1.0):
    """Probabilities in [0, 1] with blob-like structure (float32)."""
    p = ndi.gaussian_filter(rng.random(shape), sigma)
    return ((p - p.min()) / (p.max() - p.min())).astype(np.float32)


def skimage_remove_small(mask, min_size, connectivity):
    """remove_small_objects keeping components of >= min_size voxels, across versions."""
    if "max_size" in inspect.signature(remove_small_objects).parameters:  # scikit-image >= 0.26
        return remove_small_objects(mask, max_size=min_size - 1, connectivity=connectivity)
    return remove_small_objects(mask, min_size=min_size, connectivity=connectivity)


def scipy_hysteresis(p, low, high, connectivity):
    """skimage's algorithm with the labelling structure of any connectivity."""
    labels, n = ndi.label(p > low, ndi.generate_binary_structure(3, SKIMAGE_CONNECTIVITY[connectivity]))
    return (ndi.sum(p > high, labels, np.arange(n + 1)) > 0)[labels]


def scipy_keep_largest(mask, k, connectivity):
    labels, n = ndi.label(mask, ndi.generate_binary_structure(3, SKIMAGE_CONNECTIVITY[connectivity]))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = np.zeros(n + 1, bool)
    keep[np.argsort(-sizes[1:], kind="stable")[:k] + 1] = True
    return keep[labels]


# --- Threshold --------------------------------------------------------------------------------


def test_threshold_is_strict_and_exact():
    t = 0.3
    just_above = np.float32(t)  # float32(0.3) = 0.30000001..., above the real 0.3
    x = np.array([0.2, just_above, np.nextafter(just_above, np.float32(0)), 0.9], np.float32).reshape(1, 1, 1, 4)
    np.testing.assert_array_equal(Threshold(t)(x)[0, 0, 0], [0, 1, 0, 1])
    np.testing.assert_array_equal(Threshold(t)(x), (x.astype(np.float64) > t))
    np.testing.assert_array_equal(Threshold(2.5)(np.arange(5, dtype=np.uint16).reshape(1, 1, 1, 5))[0, 0, 0], [0, 0, 0, 1, 1])


def test_types_and_meta_are_kept(rng):
    affine = torch.diag(torch.tensor([0.5, 0.5, 2.0, 1.0], dtype=torch.float64))
    x = MetaTensor(torch.rand(2, 4, 5, 6), affine=affine, meta={"filename_or_obj": "p.nii.gz"})
    out = Threshold(0.5)(x)
    assert isinstance(out, MetaTensor) and out.dtype == torch.uint8
    torch.testing.assert_close(out.affine, affine)
    assert out.meta["filename_or_obj"] == "p.nii.gz"
    np.testing.assert_array_equal(out.numpy(), x.numpy() > 0.5)
    plain = RemoveSmallComponents(2)(torch.ones(3, 3, 3))
    assert type(plain) is torch.Tensor and plain.dtype == torch.uint8
    assert isinstance(FillHoles()(np.ones((3, 3, 3), bool)), np.ndarray)


def test_nan_is_refused():
    x = np.full((1, 3, 3, 3), 0.2, np.float32)
    x[0, 1, 1, 1] = np.nan
    for transform in (Threshold(0.5), HysteresisFill(0.2, 0.5)):
        with pytest.raises(SlabError, match="NaN"):
            transform(x)


# --- Hysteresis -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_hysteresis_matches_skimage(seed):
    rng = np.random.default_rng(seed)
    p = smooth_map(rng, tuple(rng.integers(6, 18, 3)))
    low, high = sorted(rng.uniform(0.2, 0.8, 2))
    np.testing.assert_array_equal(HysteresisFill(low, high, connectivity=6)(p), apply_hysteresis_threshold(p, low, high))
    for connectivity in (18, 26):
        expected = scipy_hysteresis(p, low, high, connectivity)
        np.testing.assert_array_equal(HysteresisFill(low, high, connectivity)(p), expected)
        np.testing.assert_array_equal(HysteresisFill(low, high, connectivity)(np.asfortranarray(p)), expected)


def test_hysteresis_known_answer():
    # Two 1-voxel-wide lines; only the one holding a voxel above `high` survives. A diagonal
    # step joins the second segment to the first only under 26-connectivity.
    p = np.zeros((7, 7, 3), np.float32)
    p[1, 0:4, 1] = 0.6
    p[1, 2, 1] = 0.95
    p[2, 4:7, 2] = 0.6  # touches (1, 3, 1) by a corner
    p[5, :, 1] = 0.6  # no seed
    assert HysteresisFill(0.5, 0.9, 6)(p).sum() == 4
    assert HysteresisFill(0.5, 0.9, 26)(p).sum() == 7
    assert HysteresisFill(0.5, 0.5, 6)(p).sum() == 4 + 3 + 7  # low == high: a plain threshold


def exact_hysteresis(p, low, high, connectivity):
    """The reference with comparisons made as real numbers (float64 holds every tested value)."""
    v = p.astype(np.float64)
    labels, n = ndi.label(v > low, ndi.generate_binary_structure(3, SKIMAGE_CONNECTIVITY[connectivity]))
    return (ndi.sum(v > high, labels, np.arange(n + 1)) > 0)[labels]


def test_compiled_fill_is_built():
    # setup.py builds it; without it HysteresisFill falls back to cc3d (same output, slower) and
    # the README's speed table would not describe this install.
    assert post._compiled_fill is not None, "slab/transforms/_fill.c is not built: pip install -e . with a C compiler"


DTYPES = ("float32", "float64", "float16", ">f4", ">f8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "bool")


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=st.tuples(*[st.sampled_from([1, 2, 3, 5, 7, 12, 31])] * 3), dtype=st.sampled_from(DTYPES),
       connectivity=st.sampled_from([6, 18, 26]), layout=st.sampled_from(["C", "F", "strided"]),
       thresholds=st.tuples(st.floats(-0.5, 1.5), st.floats(-0.5, 1.5)), seed=st.integers(0, 2**16))
def test_seeded_fill_matches_labelling_over_shapes_dtypes_layouts(shape, dtype, connectivity, layout, thresholds, seed):
    rng = np.random.default_rng(seed)
    low, high = sorted(thresholds)
    p = smooth_map(rng, shape, sigma=rng.uniform(0, 1.5)) if min(shape) > 1 else rng.random(shape)
    if dtype == "bool":
        p = p > 0.5
    elif np.dtype(dtype).kind in "iu":
        p = np.round(p * 10).astype(dtype)
        low, high = low * 10, high * 10
    else:
        p = p.astype(dtype)
        p.flat[::5] = np.asarray(low, p.dtype)  # values at the rounded thresholds themselves
    if layout == "F":
        p = np.asfortranarray(p)
    elif layout == "strided":
        p = np.repeat(p, 2, axis=1)[:, ::2]
    expected = exact_hysteresis(p, low, high, connectivity)
    out = HysteresisFill(low, high, connectivity)(p)
    assert out.dtype == np.uint8 and out.shape == p.shape
    np.testing.assert_array_equal(out, expected)
    labelled = post.filter_components(post.greater_than(p, low), connectivity, lambda seeds: seeds > 0,
                                       count_in=post.greater_than(p, high))
    np.testing.assert_array_equal(labelled, expected)


def test_seeded_fill_long_and_dense_fills(rng):
    # A serpentine 1-voxel path through a 64x64 plane (rows joined at alternating ends), seeded at
    # its far end: one fill of thousands of spans; then a dense 60 % random 64^3 field, whose
    # fills push more spans than the stack first holds, at every connectivity.
    path = np.zeros((3, 64, 64), np.float32)
    path[1, ::2] = 0.6
    path[1, 1::4, -1] = path[1, 3::4, 0] = 0.6
    path[1, -2, -1] = 0.95
    assert HysteresisFill(0.5, 0.9, 6)(path).sum() == 32 * 64 + 32  # 32 rows and 32 joints
    for connectivity in (6, 18, 26):
        np.testing.assert_array_equal(HysteresisFill(0.5, 0.9, connectivity)(path),
                                      exact_hysteresis(path, 0.5, 0.9, connectivity))
    noise = rng.random((64, 64, 64)).astype(np.float32)
    for connectivity in (6, 18, 26):
        np.testing.assert_array_equal(HysteresisFill(0.4, 0.999, connectivity)(noise),
                                      exact_hysteresis(noise, 0.4, 0.999, connectivity))


def _random_walk(rng, shape, steps, connectivity):
    """A path of ``steps`` moves between ``connectivity``-neighbours, turning back on every axis."""
    moves = [np.array(m) for m in np.ndindex(3, 3, 3) if m != (1, 1, 1)]
    moves = [m - 1 for m in moves if np.abs(m - 1).sum() <= {6: 1, 18: 2, 26: 3}[connectivity]]
    grid, at = np.zeros(shape, np.float32), np.array(shape) // 2
    for _ in range(steps):
        at = np.clip(at + moves[rng.integers(len(moves))], 0, np.array(shape) - 1)
        grid[tuple(at)] = 0.6
    grid[tuple(at)] = 0.95  # seeded at its end, somewhere in the middle of memory
    return grid


@pytest.mark.parametrize("connectivity", [6, 18, 26])
def test_seeded_fill_of_paths_that_turn_back_in_every_direction(rng, connectivity):
    """The fill's forward and backward passes cannot see a path that turns back twice; the
    scanline spread from what the backward pass fills must: a 3D comb (down z, across y, up z,
    ...) seeded in its middle, and random walks of each connectivity's moves, equal to labelling."""
    comb = np.zeros((20, 21, 9), np.float32)
    for i, y in enumerate(range(0, 21, 2)):
        comb[:, y, 4] = 0.6  # a tooth along z
        comb[0 if i % 2 else -1, y:y + 3, 4] = 0.6  # joined to the next tooth at alternating ends
    comb[10, 10, 4] = 0.95
    out = HysteresisFill(0.5, 0.9, connectivity)(comb)
    assert out.sum() == (comb > 0.5).sum()  # one path, all of it reached from its middle
    for steps in (50, 400, 3000):
        walk = _random_walk(rng, (17, 23, 19), steps, connectivity)
        walk = np.maximum(walk, (rng.random(walk.shape) > 0.9) * np.float32(0.6))  # with unseeded clutter
        np.testing.assert_array_equal(HysteresisFill(0.5, 0.9, connectivity)(walk),
                                      exact_hysteresis(walk, 0.5, 0.9, connectivity))


def test_hysteresis_without_the_compiled_fill(rng, monkeypatch):
    p = smooth_map(rng, (9, 14, 11))
    expected = HysteresisFill(0.4, 0.6, 26)(p)
    monkeypatch.setattr(post.functional, "_compiled_fill", None)  # where the choice is made
    np.testing.assert_array_equal(HysteresisFill(0.4, 0.6, 26)(p), expected)


def test_hysteresis_bad_parameters():
    with pytest.raises(SlabError, match="low 0.8 is above high 0.4"):
        HysteresisFill(0.8, 0.4)
    with pytest.raises(SlabError, match="connectivity"):
        HysteresisFill(0.2, 0.4, connectivity=8)


# --- Components -------------------------------------------------------------------------------


@pytest.mark.parametrize("connectivity", [6, 18, 26])
def test_remove_small_matches_skimage(rng, connectivity):
    for _ in range(3):
        mask = rng.random(tuple(rng.integers(5, 16, 3))) > 0.65
        for min_size in (0, 1, 2, 3, 7):
            ours = RemoveSmallComponents(min_size, connectivity)(mask)
            np.testing.assert_array_equal(ours, skimage_remove_small(mask, min_size, SKIMAGE_CONNECTIVITY[connectivity]))
        np.testing.assert_array_equal(
            RemoveSmallComponents(3, connectivity)(np.asfortranarray(mask)),
            skimage_remove_small(mask, 3, SKIMAGE_CONNECTIVITY[connectivity]),
        )


def test_remove_small_bad_input(rng):
    with pytest.raises(SlabError, match="min_size: expected an integer >= 0, got -1"):
        RemoveSmallComponents(-1)
    with pytest.raises(SlabError, match="binary mask"):
        RemoveSmallComponents(3)(rng.random((4, 4, 4)))
    # 0/1 in any dtype is a mask
    diagonal = np.eye(3, dtype=np.float32)[None]  # one (1, 3, 3) volume, voxels touching by edges
    np.testing.assert_array_equal(RemoveSmallComponents(2, connectivity=6)(diagonal), np.zeros((1, 3, 3)))
    np.testing.assert_array_equal(RemoveSmallComponents(2, connectivity=18)(diagonal), diagonal)


@pytest.mark.parametrize("connectivity", [6, 18, 26])
def test_keep_largest_matches_scipy(rng, connectivity):
    for k in (1, 2, 5):
        mask = rng.random((9, 10, 11)) > 0.7  # many equal sizes: ties go to the first in C order
        np.testing.assert_array_equal(KeepLargestComponents(k, connectivity)(mask), scipy_keep_largest(mask, k, connectivity))


def test_keep_largest_known_answer():
    mask = np.zeros((10, 10, 10), np.uint8)
    mask[0:2, 0:2, 0:2] = 1  # 8 voxels
    mask[5:8, 5:8, 5:8] = 1  # 27 voxels
    mask[0, 9, 9] = 1
    out = KeepLargestComponents(1)(mask)
    assert out.sum() == 27 and out[6, 6, 6] == 1
    assert KeepLargestComponents(2)(mask).sum() == 35
    assert KeepLargestComponents(5)(mask).sum() == 36


# --- Holes ------------------------------------------------------------------------------------


def test_fill_holes_matches_scipy(rng):
    for _ in range(4):
        mask = rng.random(tuple(rng.integers(4, 14, 3))) > 0.4
        np.testing.assert_array_equal(FillHoles("3d")(mask), ndi.binary_fill_holes(mask))
        for axis in range(3):
            expected = np.stack([ndi.binary_fill_holes(np.take(mask, i, axis=axis)) for i in range(mask.shape[axis])], axis=axis)
            np.testing.assert_array_equal(FillHoles("slice", axis=axis)(mask), expected)


def test_fill_holes_tube_known_answer():
    tube = np.zeros((9, 9, 6), bool)
    tube[2:7, 2:7, :] = True
    tube[4, 4, :] = False  # a lumen open at both ends: not a 3D hole, a hole in every z slice
    np.testing.assert_array_equal(FillHoles("3d")(tube), tube)
    assert FillHoles("slice", axis=2)(tube).sum() == 25 * 6
    with pytest.raises(SlabError, match="fill_holes"):
        FillHoles("2d")


# --- ROI --------------------------------------------------------------------------------------


def test_mask_to_roi(rng):
    x = rng.random((2, 4, 5, 6)).astype(np.float32)
    roi = np.zeros((1, 4, 5, 6), np.uint8)
    roi[0, 1:3] = 1
    out = MaskToROI()(x, roi)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, np.where(roi.astype(bool), x, 0))
    d = MaskToROId("pred", roi_key="organ")({"pred": x, "organ": roi})
    np.testing.assert_array_equal(d["pred"], out)
    with pytest.raises(SlabError, match="shape"):
        MaskToROI()(x, roi[:, :3])
    with pytest.raises(SlabError, match="binary"):
        MaskToROI()(x, roi * 2)
    a = MetaTensor(torch.as_tensor(x), affine=torch.eye(4, dtype=torch.float64))
    b = MetaTensor(torch.as_tensor(roi), affine=torch.diag(torch.tensor([2.0, 1, 1, 1], dtype=torch.float64)))
    with pytest.raises(SlabError, match="geometry"):
        MaskToROI()(a, b)


def test_organ_mask_from_bright_ellipsoid(rng):
    shape = (48, 40, 32)
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"))
    radii = np.array([18, 14, 11]).reshape(3, 1, 1, 1)
    organ = (((grid - np.array([24, 20, 16]).reshape(3, 1, 1, 1)) / radii) ** 2).sum(0) <= 1
    image = np.where(organ, 120.0, 40.0) + rng.normal(0, 25, shape)
    image[organ & (rng.random(shape) < 0.02)] = 0  # dark specks inside: holes to fill
    image[2:5, 2:5, 2:5] = 200  # a small bright object outside: not the largest component
    image = MetaTensor(torch.as_tensor(image[None], dtype=torch.float32), affine=torch.diag(torch.tensor([2.0, 2, 3, 1])))
    for downsample, min_dice in ((1, 0.98), (2, 0.9)):  # nearest upsampling: coarse at the boundary
        mask = organ_mask_from_image(image, downsample=downsample, sigma=1.0)
        assert isinstance(mask, MetaTensor) and mask.shape == (1, *shape) and mask.dtype == torch.uint8
        torch.testing.assert_close(mask.affine, image.affine)
        mask = mask[0].numpy().astype(bool)
        assert 2 * (mask & organ).sum() / (mask.sum() + organ.sum()) > min_dice
        assert mask[ndi.binary_erosion(organ, iterations=2 * downsample)].all() and not mask[3, 3, 3]


# --- Region growing ---------------------------------------------------------------------------


def test_region_grow_fills_a_broken_tube(rng):
    shape = (40, 15, 15)
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"))
    tube = (grid[1] - 7) ** 2 + (grid[2] - 7) ** 2 <= 9
    image = np.where(tube, 100.0, 20.0) + rng.normal(0, 3, shape)
    seed = tube.copy()
    seed[15:25] = False  # the prediction missed the middle of the vessel
    grown = RegionGrow(tolerance=5.0, max_iterations=20, connectivity=6)(image[None], seed[None])
    np.testing.assert_array_equal(grown[0], tube)
    # too few iterations to close a 10-voxel gap from both sides
    partial = RegionGrow(tolerance=5.0, max_iterations=3, connectivity=6)(image[None], seed[None])
    assert seed.sum() < partial.sum() < tube.sum()


@pytest.mark.parametrize("connectivity", [6, 26])
def test_region_grow_iteration_bound(connectivity):
    image = np.zeros((20, 3, 3), np.float32)
    image[:, 1, 1] = 1.0  # a line of equal intensity
    seed = np.zeros(image.shape, np.uint8)
    seed[0, 1, 1] = 1
    for n in (1, 5, 12):
        grown = RegionGrow(tolerance=0.5, max_iterations=n, connectivity=connectivity, scale="intensity")(image, seed)
        expected = np.zeros(image.shape, np.uint8)
        expected[: n + 1, 1, 1] = 1
        np.testing.assert_array_equal(grown, expected)
    assert RegionGrow(0.5, None, connectivity, "intensity")(image, seed).sum() == 20


def test_region_grow_per_label_and_dict():
    image = np.zeros((1, 12, 3, 3), np.float32)
    image[0, :6, 1, 1], image[0, 6:, 1, 1] = 1.0, 5.0
    seeds = np.zeros((2, 12, 3, 3), np.uint8)
    seeds[0, 0, 1, 1] = seeds[1, 11, 1, 1] = 1
    out = RegionGrowd("pred", image_key="image", tolerance=0.5, max_iterations=None, scale="intensity")(
        {"image": image, "pred": seeds})["pred"]
    np.testing.assert_array_equal(out[0, :, 1, 1], [1] * 6 + [0] * 6)
    np.testing.assert_array_equal(out[1, :, 1, 1], [0] * 6 + [1] * 6)
    assert RegionGrow()(image, np.zeros_like(seeds)).sum() == 0
    with pytest.raises(SlabError, match="max_iterations"):
        RegionGrow(max_iterations=0)


# --- Multi-label and the composition ----------------------------------------------------------


def test_multilabel_is_per_label(rng):
    p = np.stack([smooth_map(rng, (10, 11, 12)) for _ in range(3)])
    np.testing.assert_array_equal(HysteresisFill(0.4, 0.6, 26)(p), np.stack([HysteresisFill(0.4, 0.6, 26)(c) for c in p]))
    masks = p > 0.5
    np.testing.assert_array_equal(
        KeepLargestComponents(1, 6)(masks), np.stack([scipy_keep_largest(m, 1, 6) for m in masks]))
    d = Thresholdd("pred", threshold=0.5)({"pred": p})
    np.testing.assert_array_equal(d["pred"], masks)
    d = HysteresisFilld("pred", 0.4, 0.6, connectivity=6)({"pred": p})
    np.testing.assert_array_equal(d["pred"], np.stack([apply_hysteresis_threshold(c, 0.4, 0.6) for c in p]))
    np.testing.assert_array_equal(FillHolesd("m")({"m": masks})["m"], np.stack([ndi.binary_fill_holes(m) for m in masks]))


def test_postprocess_matches_the_chain_of_references(rng):
    p = np.stack([smooth_map(rng, (14, 13, 12)) for _ in range(2)])
    roi = np.zeros((1, 14, 13, 12), np.uint8)
    roi[0, 1:12, 2:12, 1:11] = 1
    out = postprocess(p, hysteresis=(0.45, 0.6), min_size=4, keep_largest=2, fill_holes="3d", roi=roi, connectivity=6)
    for c in range(2):
        expected = apply_hysteresis_threshold(p[c] * roi[0], 0.45, 0.6)
        expected = skimage_remove_small(expected, 4, 1)
        expected = ndi.binary_fill_holes(scipy_keep_largest(expected, 2, 6))
        np.testing.assert_array_equal(out[c], expected)
    d = Postprocessd("pred", roi_key="roi", threshold=0.5, min_size=3)({"pred": p, "roi": roi})
    np.testing.assert_array_equal(
        d["pred"], np.stack([skimage_remove_small(c * roi[0] > 0.5, 3, 3) for c in p]))


def test_per_channel_thresholds_match_a_numpy_reference(rng):
    p = np.stack([smooth_map(rng, (9, 10, 11)) for _ in range(3)])
    thresholds = [0.3, 0.5, 0.7]

    def reference(x, ts):  # compared in float64: exact for float32 values
        return np.stack([x[c].astype(np.float64) > t for c, t in enumerate(ts)]).astype(np.uint8)

    expected = reference(p, thresholds)
    assert len({int(e.sum()) for e in expected}) == 3  # the channels really differ
    np.testing.assert_array_equal(Threshold(thresholds)(p), expected)
    np.testing.assert_array_equal(Threshold(np.array(thresholds))(p), expected)
    np.testing.assert_array_equal(Threshold((0.5, 0.5, 0.5))(p), Threshold(0.5)(p))
    out = Threshold(thresholds)(MetaTensor(torch.from_numpy(p), affine=torch.eye(4)))
    assert isinstance(out, MetaTensor) and out.dtype == torch.uint8
    np.testing.assert_array_equal(out.numpy(), expected)
    np.testing.assert_array_equal(Thresholdd("pred", threshold=thresholds)({"pred": p})["pred"], expected)
    np.testing.assert_array_equal(Threshold([0.4])(p[0]), reference(p[:1], [0.4])[0])  # (X, Y, Z): one channel
    np.testing.assert_array_equal(
        postprocess(p, threshold=thresholds, min_size=5, connectivity=6),
        np.stack([skimage_remove_small(e.astype(bool), 5, 1) for e in expected]))
    for bad, labels in (([0.3, 0.5], 3), ([0.3, 0.5, 0.7, 0.9], 3)):
        with pytest.raises(SlabError, match=rf"^threshold: {len(bad)} values for {labels} label channels"):
            Threshold(bad)(p)
        with pytest.raises(SlabError, match="^threshold"):
            postprocess(p, threshold=bad)
    with pytest.raises(SlabError, match="^threshold: 2 values for 1 label channel;"):
        Threshold([0.3, 0.5])(p[0])
    for bad in ([], [0.5, float("nan")], [0.5, "a"]):
        with pytest.raises(SlabError, match="^threshold"):
            Threshold(bad)


def test_per_channel_hysteresis_matches_skimage_per_channel(rng):
    p = np.stack([smooth_map(rng, (10, 9, 12)) for _ in range(3)])
    pairs = [(0.3, 0.6), (0.45, 0.7), (0.5, 0.9)]
    expected = np.stack([apply_hysteresis_threshold(p[c], *pairs[c]) for c in range(3)])
    assert len({int(e.sum()) for e in expected}) == 3
    np.testing.assert_array_equal(postprocess(p, hysteresis=pairs, connectivity=6), expected)
    np.testing.assert_array_equal(postprocess(p, hysteresis=np.array(pairs), connectivity=6), expected)
    lows, highs = zip(*pairs)
    np.testing.assert_array_equal(HysteresisFill(lows, highs, 6)(p), expected)
    np.testing.assert_array_equal(HysteresisFill(0.3, highs, 6)(p), np.stack(
        [apply_hysteresis_threshold(p[c], 0.3, highs[c]) for c in range(3)]))
    np.testing.assert_array_equal(postprocess(p, hysteresis=(0.4, 0.6), connectivity=6),
                                  np.stack([apply_hysteresis_threshold(c, 0.4, 0.6) for c in p]))
    with pytest.raises(SlabError, match="^hysteresis: 2 values for 3 label channels"):
        postprocess(p, hysteresis=pairs[:2])
    with pytest.raises(SlabError, match=r"^hysteresis: low 0.9 is above high 0.5 \(channel 1\)"):
        postprocess(p, hysteresis=[(0.3, 0.6), (0.9, 0.5)])
    for bad in ([(0.3, 0.6), (0.4,)], [0.3, 0.5, 0.7], 0.5, "ab"):
        with pytest.raises(SlabError, match="^hysteresis: expected"):
            postprocess(p, hysteresis=bad)
    with pytest.raises(SlabError, match="^hysteresis: 2 low and 3 high values"):
        HysteresisFill((0.1, 0.2), (0.5, 0.6, 0.7))


def test_postprocess_without_threshold_wants_a_mask(rng):
    mask = (rng.random((1, 6, 6, 6)) > 0.5).astype(np.float32)
    np.testing.assert_array_equal(postprocess(mask, threshold=None), mask)
    with pytest.raises(SlabError, match="binary"):
        postprocess(mask * 0.7, threshold=None)
    with pytest.raises(SlabError, match="keep_largest"):
        postprocess(mask, keep_largest=0)


@pytest.mark.parametrize("shape", [(1, 1, 7), (1, 7, 1), (7, 1, 1), (1, 1, 1), (1, 1, 3)])
@pytest.mark.parametrize("connectivity", [6, 18, 26])
def test_line_volumes_label_like_scipy(shape, connectivity):
    """cc3d fails on volumes with one axis longer than a voxel at 26-connectivity; every labelling
    path gives scipy's components there (along a line all connectivities agree)."""
    from scipy import ndimage as ndi

    from slab.pipeline.evaluation.statistics import label_statistics
    from slab.pipeline.evaluation.topology import topology_metrics

    mask = (np.arange(int(np.prod(shape))) % 2 == 0).reshape(shape)
    expected = ndi.label(mask)[1]
    kept = post.RemoveSmallComponents(min_size=1, connectivity=connectivity)(mask[None].astype(np.uint8))
    np.testing.assert_array_equal(np.asarray(kept)[0], mask)
    stats = label_statistics(mask[None].astype(np.uint8), mask[None].astype(np.float32), np.eye(4), ["a"])
    assert stats["labels"]["a"]["components"] == expected
    assert topology_metrics(mask, mask)["pred"]["b0"] == expected
