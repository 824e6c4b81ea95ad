"""Exact percentiles against np.percentile; percentile normalisation against its definition."""
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from monai.data import MetaTensor

from slab.core.errors import SlabError
from slab.transforms.intensity import PercentileNormalize, PercentileNormalized, scale_intensity
from slab.transforms.percentiles import volume_percentiles

Q = [0, 0.5, 1, 2.5, 25, 33.3, 50, 66.6, 75, 99, 99.5, 100]
INT_DTYPES = [np.uint8, np.int8, np.uint16, np.int16, np.int32, np.uint32, np.int64]


def _random(rng, dtype, shape):
    if np.dtype(dtype).kind == "f":
        return (rng.standard_normal(shape) * 1000).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -2**40), min(info.max, 2**40), size=shape, dtype=dtype, endpoint=True)


@pytest.mark.parametrize("dtype", INT_DTYPES + [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1,), (2, 3, 5), (1, 7, 9, 11), (4, 1, 1, 1)])
def test_equals_numpy_percentile(rng, dtype, shape):
    x = _random(rng, dtype, shape)
    np.testing.assert_array_equal(volume_percentiles(x, Q), np.percentile(x, Q))
    mask = rng.random(shape) > 0.4
    mask.flat[0] = True
    np.testing.assert_array_equal(volume_percentiles(x, Q, mask=mask), np.percentile(x[mask], Q))


@settings(max_examples=60, deadline=None)
@given(
    x=hnp.arrays(st.sampled_from([np.uint8, np.uint16, np.int16, np.float32]), hnp.array_shapes(min_dims=1, max_dims=4, max_side=9),
                 elements={"allow_nan": False, "allow_infinity": False}),
    q=st.lists(st.floats(0, 100), min_size=1, max_size=5),
)
def test_equals_numpy_percentile_property(x, q):
    np.testing.assert_array_equal(volume_percentiles(x, q), np.percentile(x, np.asarray(q, float)))


def test_scalar_q_torch_and_fortran_order(rng):
    x = _random(rng, np.uint16, (1, 6, 7, 8))
    assert volume_percentiles(torch.from_numpy(x.astype(np.int32)), 37.5) == np.percentile(x, [37.5])[0]
    f = np.asfortranarray(x)
    mask = np.asfortranarray(rng.random(x.shape) > 0.5)
    np.testing.assert_array_equal(volume_percentiles(f, Q, mask), np.percentile(x[mask], Q))


def test_bad_input():
    x = np.arange(10, dtype=np.float32)
    for q in ([-1], [101], [], "abc", [np.nan]):
        with pytest.raises(SlabError):
            volume_percentiles(x, q)
    for bad in (np.nan, np.inf):
        y = x.copy()
        y[3] = bad
        with pytest.raises(SlabError, match="NaN or Inf"):
            volume_percentiles(y, [50])
    y = x.copy()
    y[3] = np.nan
    assert volume_percentiles(y, 50, mask=np.arange(10) != 3) == np.percentile(np.delete(x, 3), 50)
    with pytest.raises(SlabError):
        volume_percentiles(x, 50, mask=np.zeros(10, bool))
    with pytest.raises(SlabError):
        volume_percentiles(np.zeros(0, np.uint16), 50)
    for kwargs in ({"lower": 50, "upper": 50}, {"lower": 60, "upper": 40}, {"lower": -1}, {"upper": 101}, {"lower": "a"}):
        with pytest.raises(SlabError):
            PercentileNormalize(**kwargs)


def test_normalize_per_channel_with_soft_clip(rng):
    x = np.stack([_random(rng, np.uint16, (5, 6, 7)), _random(rng, np.uint16, (5, 6, 7)) // 7])
    out = PercentileNormalize(lower=2, upper=98, soft_clip_alpha=0.25)(x)
    assert out.dtype == np.float32 and out.shape == x.shape
    for c in range(2):
        lo, hi = np.percentile(x[c], [2, 98])
        v = np.maximum((x[c] - lo) / (hi - lo), 0)
        v = np.where(v > 1, (v - 1) * 0.25 + 1, v)
        np.testing.assert_allclose(out[c], v, rtol=1e-5, atol=1e-6)
    hard = PercentileNormalize(lower=2, upper=98)(torch.from_numpy(x.astype(np.int32)))
    assert isinstance(hard, torch.Tensor) and float(hard.min()) == 0 and float(hard.max()) == 1


def test_normalize_mask_and_meta(rng):
    x = _random(rng, np.int16, (1, 6, 6, 6))
    mask = np.zeros(x.shape, bool)
    mask[:, :3] = True
    image = MetaTensor(torch.from_numpy(x), affine=torch.diag(torch.tensor([2.0, 2, 3, 1])), meta={"spacing": (2, 2, 3)})
    out = PercentileNormalized("image", lower=10, upper=90, mask_key="mask")({"image": image, "mask": mask})["image"]
    lo, hi = np.percentile(x[mask], [10, 90])
    expected = np.clip((x - lo) / (hi - lo), 0, 1)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert isinstance(out, MetaTensor) and out.meta["spacing"] == (2, 2, 3)
    assert torch.equal(out.affine, image.affine)


def test_constant_channel_maps_to_zero():
    out = scale_intensity(np.full((1, 2, 2, 2), 7.0), [7.0], [7.0])
    assert np.all(out == 0)


def test_lazy_volume_streams_without_loading(rng, tmp_path, monkeypatch):
    from slab.io.volumes import load_volume, save_volume

    x = _random(rng, np.int16, (2, 6, 5, 9))
    save_volume(x, tmp_path / "v.nii")
    lazy = load_volume(tmp_path / "v.nii", lazy=True)
    monkeypatch.setattr(type(lazy), "load", lambda *a, **k: pytest.fail("loaded the whole lazy volume"))
    np.testing.assert_array_equal(volume_percentiles(lazy, Q), np.percentile(x, Q))
    low, high = PercentileNormalize(lower=3, upper=97).percentiles(lazy)
    np.testing.assert_array_equal(np.stack([low, high], 1), [np.percentile(x[c], [3, 97]) for c in range(2)])
    low, high = PercentileNormalize(lower=3, upper=97, channel_wise=False).percentiles(lazy)
    np.testing.assert_array_equal([low[0], high[0]], np.percentile(x, [3, 97]))


@settings(max_examples=30, deadline=None)
@given(dtype=st.sampled_from([np.float16, np.float32, np.float64, np.int32, np.uint32, np.int64]),
       shape=st.tuples(st.integers(1, 2), st.integers(1, 9), st.integers(1, 8), st.integers(1, 7)),
       q=st.lists(st.floats(0, 100), min_size=1, max_size=4), seed=st.integers(0, 2 ** 16),
       duplicates=st.booleans())
def test_lazy_floats_and_wide_integers_by_radix_selection(dtype, shape, q, seed, duplicates):
    """Floats (negative, zero, repeated values) and integers wider than 16 bits of a lazy zarr
    volume: the percentiles np.percentile gives, per channel and pooled, never loading it."""
    import tempfile
    from pathlib import Path

    from slab.io.volumes import load_volume, save_volume
    from slab.io.lazy import LazyVolume

    rng = np.random.default_rng(seed)
    scale = 1e4 if np.dtype(dtype).kind == "f" else 2 ** 20
    x = (rng.standard_normal(shape) * scale).astype(dtype) if np.dtype(dtype).kind != "u" else \
        rng.integers(0, 2 ** 31, shape).astype(dtype)
    if duplicates:
        x.reshape(-1)[: x.size // 2] = x.reshape(-1)[0]
    with tempfile.TemporaryDirectory() as folder:
        save_volume(x, Path(folder) / "v.zarr", affine=np.eye(4))
        lazy = load_volume(Path(folder) / "v.zarr", lazy=True)
        loaded = LazyVolume.load
        LazyVolume.load = lambda *a, **k: pytest.fail("loaded the whole lazy volume")
        try:
            np.testing.assert_array_equal(volume_percentiles(lazy, q), volume_percentiles(x, q))
            np.testing.assert_array_equal(volume_percentiles(lazy, q), np.percentile(x, q))
            low, high = PercentileNormalize(lower=1, upper=99).percentiles(lazy)
        finally:
            LazyVolume.load = loaded
    expected = PercentileNormalize(lower=1, upper=99).percentiles(x)
    np.testing.assert_array_equal(low, expected[0])
    np.testing.assert_array_equal(high, expected[1])


def test_lazy_float_with_nan_is_refused(tmp_path):
    from slab.io.volumes import load_volume, save_volume

    x = np.ones((1, 4, 4, 4), np.float32)
    x[0, 1, 2, 3] = np.nan
    save_volume(x, tmp_path / "v.zarr", affine=np.eye(4))
    with pytest.raises(SlabError, match="v.zarr.*NaN or Inf"):
        volume_percentiles(load_volume(tmp_path / "v.zarr", lazy=True), [1, 99])


def test_zscore_against_numpy_per_channel_and_lazily(tmp_path):
    from slab.transforms.intensity import ZScoreNormalize
    from slab.io.volumes import load_volume, save_volume

    rng = np.random.default_rng(3)
    v = np.stack([rng.normal(50, 7, (13, 11, 9)), rng.normal(-3, 0.5, (13, 11, 9))]).astype(np.float32)
    out = ZScoreNormalize()(v)
    expected = (v - v.mean(axis=(1, 2, 3), keepdims=True)) / v.std(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    clipped = ZScoreNormalize(clip=[-1, 1])(v)
    assert clipped.min() == -1 and clipped.max() == 1
    fixed = ZScoreNormalize(mean=[50, -3], std=[7, 0.5])(v)
    np.testing.assert_allclose(fixed, (v - np.array([50, -3]).reshape(2, 1, 1, 1)) / np.array([7, 0.5]).reshape(2, 1, 1, 1),
                               atol=1e-5)
    # a lazily read volume gives the statistics of the whole volume, read in blocks
    u = rng.integers(0, 4000, (1, 17, 13, 11)).astype(np.uint16)
    save_volume(u, tmp_path / "u.nii.gz", affine=np.eye(4))
    lazy = load_volume(tmp_path / "u.nii.gz", lazy=True)
    mean, std = ZScoreNormalize().statistics(lazy)
    assert mean[0] == pytest.approx(u.mean()) and std[0] == pytest.approx(u.std())
    assert ZScoreNormalize()(np.zeros((1, 3, 3, 3), np.float32)).max() == 0  # constant: no division by 0


def test_fixed_window_is_the_dataset_statistics():
    from slab.transforms.intensity import make_normalize

    v = np.arange(100, dtype=np.float32).reshape(1, 100, 1, 1)
    window = make_normalize({"low": [10], "high": [60]})
    np.testing.assert_allclose(window(v), np.clip((v - 10) / 50, 0, 1), atol=1e-6)
    assert window.spec() == {"scheme": "percentile", "low": [10.0], "high": [60.0], "soft_clip_alpha": None}
    assert make_normalize(window.spec()).percentiles(v)[0].tolist() == [10.0]
    assert make_normalize({"scheme": "zscore"}).spec() == {"scheme": "zscore", "clip": None}
    assert make_normalize(None) is None
    with pytest.raises(SlabError, match="channel"):
        make_normalize({"low": [1, 2], "high": [3, 4]})(np.zeros((3, 2, 2, 2), np.float32))


@pytest.mark.parametrize("spec, message", [
    ({"scheme": "minmax"}, "normalize scheme: expected one of percentile, zscore"),
    ({"scheme": "zscore", "lower": 1}, "unknown key 'normalize.lower'"),
    ({"low": [1]}, "low, high: give both"),
    ({"low": [1], "high": [2, 3]}, "1 and 2 values"),
    ({"scheme": "zscore", "mean": [0], "std": [0]}, "std: expected positive values"),
    ({"scheme": "zscore", "clip": [2, 1]}, "clip: expected"),
    ({"low": ["a"], "high": [1]}, "low: expected a finite number"),
])
def test_normalisation_settings_errors_are_one_line(spec, message):
    from slab.transforms.intensity import make_normalize

    with pytest.raises(SlabError, match=re.escape(message)):
        make_normalize(spec)
