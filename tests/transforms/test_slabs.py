"""Slab offsets, slabs against a naive clamped-index take, batches, padding round trips."""
import numpy as np
import pytest
import torch

from slab.core.errors import SlabError
from slab.io.volumes import load_volume, save_volume
from slab.transforms.slabs import (
    PLANE_AXIS,
    SliceStack,
    SliceStackd,
    extract_slab,
    iter_slab_batches,
    pad_to_divisor,
    slab_offsets,
    unpad,
)

OFFSETS = [(-1, 0, 1), (0, 2, 4), (-3, 0, 3), (0,), (-2, -1, 0, 1)]


def naive_slab(volume, index, plane, offsets):
    axis = PLANE_AXIS[plane]
    size = volume.shape[axis + 1]
    return np.stack([
        np.take(volume[c], min(max(index + o, 0), size - 1), axis=axis)
        for c in range(volume.shape[0]) for o in offsets
    ])


@pytest.fixture
def volume(rng):
    return rng.integers(0, 1000, size=(2, 5, 6, 7)).astype(np.uint16)


def test_offsets():
    assert slab_offsets(3, 1) == (-1, 0, 1)
    assert slab_offsets(3, 2) == (-2, 0, 2)
    assert slab_offsets(5, 3) == (-6, -3, 0, 3, 6)
    assert slab_offsets(3, 2, "forward") == (0, 2, 4)
    assert slab_offsets(1) == (0,)
    assert slab_offsets(4, 1) == (-2, -1, 0, 1)


@pytest.mark.parametrize("plane", list(PLANE_AXIS))
@pytest.mark.parametrize("offsets", OFFSETS)
def test_extract_slab_matches_naive_take(volume, plane, offsets):
    n = volume.shape[PLANE_AXIS[plane] + 1]
    for i in range(n):
        expected = naive_slab(volume, i, plane, offsets)
        got = extract_slab(volume, plane, i, offsets)
        assert got.dtype == volume.dtype
        np.testing.assert_array_equal(got, expected)
        tensor = extract_slab(torch.from_numpy(volume.astype(np.int32)), plane, i, offsets)
        assert isinstance(tensor, torch.Tensor)
        np.testing.assert_array_equal(tensor.numpy(), expected)
    batches = list(iter_slab_batches(volume, plane, offsets, batch_size=3))
    np.testing.assert_array_equal(np.concatenate([i for i, _ in batches]), np.arange(n))
    np.testing.assert_array_equal(np.concatenate([b for _, b in batches]),
                                  np.stack([naive_slab(volume, i, plane, offsets) for i in range(n)]))
    part = list(iter_slab_batches(torch.from_numpy(volume.astype(np.int32)), plane, offsets, 2, 1, n - 1))
    np.testing.assert_array_equal(np.concatenate([i for i, _ in part]), np.arange(1, n - 1))
    np.testing.assert_array_equal(torch.cat([b for _, b in part]).numpy(),
                                  np.stack([naive_slab(volume, i, plane, offsets) for i in range(1, n - 1)]))


def test_slab_shapes_and_channel_order(volume):
    assert extract_slab(volume, "xy", 0).shape == (6, 5, 6)
    assert extract_slab(volume, "zx", 0).shape == (6, 5, 7)
    assert extract_slab(volume, "zy", 0).shape == (6, 6, 7)
    slab = extract_slab(volume, "xy", 3, (-1, 0, 1))
    np.testing.assert_array_equal(slab[4], volume[1, :, :, 3])  # channel c*k + j = channel 1, offset 0
    np.testing.assert_array_equal(extract_slab(volume, 3, "xy", (-1, 0, 1)), slab)  # (index, plane) order too


def test_lazy_volume_reads_only_what_it_needs(tmp_path, volume):
    save_volume(volume[:1], tmp_path / "stack")
    lazy = load_volume(tmp_path / "stack", lazy=True)
    reads = []
    original = type(lazy)._read

    def counting(self, c, x, y, z):
        reads.append(z)
        return original(self, c, x, y, z)

    type(lazy)._read = counting
    try:
        for plane in PLANE_AXIS:
            n = volume.shape[PLANE_AXIS[plane] + 1]
            got = np.concatenate([b for _, b in iter_slab_batches(lazy, plane, (-2, 0, 2), batch_size=2)])
            np.testing.assert_array_equal(got, np.stack([naive_slab(volume[:1], i, plane, (-2, 0, 2)) for i in range(n)]))
        reads.clear()
        np.testing.assert_array_equal(extract_slab(lazy, "xy", 3, (-1, 0, 1)), naive_slab(volume[:1], 3, "xy", (-1, 0, 1)))
        assert reads == [slice(2, 5)]
        reads.clear()
        chosen = [6, 0]  # far apart: only the slices needed are read, one by one
        batches = list(iter_slab_batches(lazy, "xy", (0,), batch_size=3, indices=chosen))
        np.testing.assert_array_equal(batches[0][0], chosen)
        np.testing.assert_array_equal(batches[0][1], np.stack([naive_slab(volume[:1], i, "xy", (0,)) for i in chosen]))
        assert sorted(z.start for z in reads) == [0, 6]
    finally:
        type(lazy)._read = original


def test_slice_stack_transforms(volume):
    np.testing.assert_array_equal(SliceStack("zy", (0, 1))(volume, 4), naive_slab(volume, 4, "zy", (0, 1)))
    label = (volume[:1] > 500).astype(np.uint8)
    out = SliceStackd("image", offsets=(-1, 0, 1), label_keys="label")({"image": volume, "label": label, "slice": 2, "plane": "zx"})
    np.testing.assert_array_equal(out["image"], naive_slab(volume, 2, "zx", (-1, 0, 1)))
    np.testing.assert_array_equal(out["label"], label[:, :, 2, :])


@pytest.mark.parametrize("shape", [(1, 5, 7), (2, 3, 9, 11), (1, 1, 1), (1, 16, 32)])
@pytest.mark.parametrize("divisor", [1, 4, 16, (2, 8)])
@pytest.mark.parametrize("mode", ["constant", "edge"])
def test_pad_unpad_round_trip(rng, shape, divisor, mode):
    x = rng.random(shape).astype(np.float32)
    padded, pads = pad_to_divisor(x, divisor, mode=mode)
    divisors = (divisor, divisor) if isinstance(divisor, int) else divisor
    assert all(s % d == 0 and s - n < d for s, n, d in zip(padded.shape[-2:], x.shape[-2:], divisors))
    np.testing.assert_array_equal(unpad(padded, pads), x)
    tpadded, tpads = pad_to_divisor(torch.from_numpy(x), divisor, mode=mode)
    assert tpads == pads
    np.testing.assert_array_equal(tpadded.numpy(), padded)
    np.testing.assert_array_equal(unpad(tpadded, tpads).numpy(), x)


def test_pad_3d_and_reflect(rng):
    x = rng.random((1, 5, 6, 7)).astype(np.float32)
    padded, pads = pad_to_divisor(x, 4, spatial_dims=3, mode="reflect")
    assert padded.shape == (1, 8, 8, 8) and pads == ((1, 2), (1, 1), (0, 1))
    np.testing.assert_array_equal(unpad(padded, pads), x)


def test_bad_input(volume):
    cases = [
        lambda: extract_slab(volume, "xy", 0, []),
        lambda: extract_slab(volume, "xy", 0, (0, 1.5)),
        lambda: extract_slab(volume, "yx", 0),
        lambda: extract_slab(volume, "xy", 7),
        lambda: extract_slab(volume, "xy", -1),
        lambda: extract_slab(volume, "xy", 1.0),
        lambda: extract_slab(volume[0], "xy", 0),
        lambda: list(iter_slab_batches(volume, "xy", indices=[0, 7])),
        lambda: list(iter_slab_batches(volume, "xy", (0,), 2, 3, 9)),
        lambda: slab_offsets(3, 1.5),
        lambda: slab_offsets(3, 0),
        lambda: slab_offsets(0),
        lambda: slab_offsets(3, 1, "backward"),
        lambda: list(iter_slab_batches(volume, "xy", batch_size=0)),
        lambda: pad_to_divisor(np.zeros((1, 3, 3)), 0),
        lambda: pad_to_divisor(np.zeros((1, 3, 3)), 4, mode="wrap"),
    ]
    for case in cases:
        with pytest.raises(SlabError):
            case()


def test_preview_png(tmp_path, volume):
    from PIL import Image

    from slab.pipeline.evaluation.preview import preview_slabs

    out = preview_slabs(volume, tmp_path / "p.png", plane="zx", offsets=(-1, 0, 1), n=2, label=volume[:1] > 500)
    assert out == tmp_path / "p.png" and Image.open(out).size[0] > 100
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"]
    with pytest.raises(SlabError):
        preview_slabs(volume, tmp_path / "q.png", plane="ab")
    assert not (tmp_path / "q.png").exists()
