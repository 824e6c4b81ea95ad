"""Out-of-core 3D sliding-window inference (slab.pipeline.inference.window_blocks): block by block
along z into a zarr store, equal to MONAI's in-memory ``sliding_window_inference`` (through
``predict_3d``) over shapes smaller and larger than the window, overlaps, blending modes and flip
TTA; resumable after an interruption; from the CLI on a lazy zarr input, also under torchrun."""
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.data import MetaTensor

from slab.pipeline.cli import main
from slab.pipeline.inference.window import predict_3d
from slab.pipeline.inference.window_blocks import WindowGrid, block_tile, scan_interval
from slab.transforms.intensity import PercentileNormalize
from slab.io.volumes import load_volume, save_volume
from slab.transforms.post import postprocess


def _net(channels=2, labels=2, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv3d(channels, 3, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv3d(3, labels, 3, padding=1))


def _blocks(monkeypatch):
    """Record every block the store is given: (array, corner)."""
    from slab.pipeline.inference import store

    seen = []
    put = store.PlaneStore.put
    monkeypatch.setattr(store.PlaneStore, "put", lambda self, p, corner, sums: (seen.append((p, tuple(corner))),
                                                                                put(self, p, corner, sums)))
    return seen


def test_scan_interval_and_grid_are_monais():
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    for size, roi, overlap in [((9, 7, 23), (4, 8, 6), 0.5), ((5, 12, 3), (6, 4, 4), 0.25), ((8, 8, 8), (8, 8, 8), 0.9),
                               ((31, 2, 17), (5, 5, 5), 0.0)]:
        padded = tuple(max(n, r) for n, r in zip(size, roi))
        assert scan_interval(padded, roi, overlap) == _get_scan_interval(padded, roi, 3, (overlap,) * 3)
        grid = WindowGrid(size, roi, overlap)
        expected = [[s.start for s in w] for w in dense_patch_slices(padded, roi, scan_interval(padded, roi, overlap))]
        assert grid.starts.tolist() == expected
        # a flipped axis mirrors the windows and the padding
        flipped = WindowGrid(size, roi, overlap, (2,))
        assert sorted(flipped.starts[:, 2].tolist()) == sorted((padded[2] - grid.starts[:, 2] - roi[2]).tolist())
        assert grid.pad[2] + flipped.pad[2] == padded[2] - size[2]


@settings(max_examples=30, deadline=None)
@given(shape=st.tuples(st.integers(1, 13), st.integers(1, 11), st.integers(1, 29)),
       roi=st.tuples(st.sampled_from([2, 4, 6]), st.sampled_from([4, 5]), st.sampled_from([3, 4, 8])),
       overlap=st.sampled_from([0.0, 0.25, 0.5, 0.6]), mode=st.sampled_from(["gaussian", "constant"]),
       tta=st.sampled_from(["none", "flips"]), sw_batch_size=st.integers(1, 5), budget=st.integers(1, 40),
       seed=st.integers(0, 3))
def test_out_of_core_3d_equals_the_in_memory_sliding_window(shape, roi, overlap, mode, tta, sw_batch_size, budget,
                                                            seed):
    """Any shape (smaller than the window on some axes, odd, one slice), any block size: the
    probabilities equal MONAI's whole-volume sliding window to float rounding."""
    net = _net(seed=seed)
    x = torch.randn((2,) + shape, generator=torch.Generator().manual_seed(seed))
    options = dict(roi_size=roi, overlap=overlap, mode=mode, tta=tta, sw_batch_size=sw_batch_size, device="cpu")
    expected = predict_3d(net, x, **options).numpy()
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "p.zarr"
        got = predict_3d(net, x, out_path=out, out_dtype="float32", memory_budget=budget * 4000, **options)
        assert got.shape == expected.shape
        np.testing.assert_allclose(got.load().numpy(), expected, rtol=0, atol=2e-6)
        assert sorted(p.name for p in Path(folder).iterdir()) == ["p.zarr"]  # the work folder is gone


def test_blocks_cover_the_volume_and_resume_after_an_interruption(tmp_path, monkeypatch):
    from slab.pipeline.inference import store

    net = _net(channels=1, labels=1)
    x = torch.randn(1, 10, 9, 40, generator=torch.Generator().manual_seed(1))
    options = dict(roi_size=(8, 8, 8), overlap=0.5, tta="flips", sw_batch_size=2, device="cpu",
                   out_path=tmp_path / "p.zarr", memory_budget=30_000)
    tile = block_tile(30_000, (1, 10, 9, 40), (8, 8, 8), 1, 1, 4, 2)
    assert tile[:2] == (10, 9) and 8 <= tile[2] < 20  # whole slices, several blocks per flip
    step = tile[2]
    put, calls = store.PlaneStore.put, []

    def interrupted(self, *args):
        put(self, *args)
        calls.append(args)
        if len(calls) == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(store.PlaneStore, "put", interrupted)
    with pytest.raises(KeyboardInterrupt):
        predict_3d(net, x, **options)
    state = json.loads((tmp_path / "p.zarr.partial" / "state.json").read_text())
    assert sum(len(v) for v in state["done"].values()) == 5 and not (tmp_path / "p.zarr").exists()
    monkeypatch.undo()
    seen = _blocks(monkeypatch)
    got = predict_3d(net, x, **options)
    blocks = 8 * -(-40 // step)  # eight flips, each cut into blocks of `step` slices
    assert len(seen) == blocks - 5 and not set(seen) & {(a[0], tuple(a[1])) for a in calls}
    expected = predict_3d(net, x, roi_size=(8, 8, 8), overlap=0.5, tta="flips", sw_batch_size=2, device="cpu")
    np.testing.assert_array_equal(got.load().numpy(), expected.numpy().astype(np.float16))
    assert not (tmp_path / "p.zarr.partial").exists()


def test_blocks_cut_in_x_and_y_when_whole_slices_do_not_fit(tmp_path, monkeypatch):
    """A budget below the ROI's depth of whole slices gives boxes cut in x, y and z (never
    smaller than the ROI), which cover the volume once per flip, are resumable by corner, and
    give MONAI's whole-volume result."""
    import itertools

    from slab.pipeline.inference import store
    from slab.pipeline.inference.window_blocks import axis_forwards, block_bytes

    shape, roi = (1, 37, 29, 23), (8, 6, 8)
    whole = block_bytes((37, 29, 8), shape, roi, 1, 2, 4, 3)
    tile = block_tile(whole // 2, shape, roi, 1, 2, 4, 3)
    assert tile[0] < 37 and tile[1] < 29 and all(t >= r for t, r in zip(tile, roi))
    assert block_bytes(tile, shape, roi, 1, 2, 4, 3) <= whole // 2
    # the fewest windows of any block shape within the budget (every size of every axis tried)
    for budget in (whole, whole // 2, whole // 4):
        chosen = block_tile(budget, shape, roi, 1, 2, 4, 3)
        fewest = min(np.prod([axis_forwards(n, r, 0.5, t) for n, r, t in zip(shape[1:], roi, sizes)])
                     for sizes in itertools.product(*[range(r, n + 1) for n, r in zip(shape[1:], roi)])
                     if block_bytes(sizes, shape, roi, 1, 2, 4, 3) <= budget)
        assert np.prod([axis_forwards(n, r, 0.5, t) for n, r, t in zip(shape[1:], roi, chosen)]) == fewest
    # a budget below the smallest block takes the ROI-sized box; whole slices of one ROI are
    # taken when they cost no more than that (the ROI spans the slice)
    assert block_tile(1, shape, roi, 1, 2, 4, 3) == roi
    assert block_tile(1, (1, 8, 6, 40), roi, 1, 2, 4, 3) == (8, 6, 8)
    net = _net(channels=1, labels=2, seed=3)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    options = dict(roi_size=roi, overlap=0.5, mode="gaussian", tta="flips", sw_batch_size=3, device="cpu")
    expected = predict_3d(net, x, **options).numpy()
    put, calls = store.PlaneStore.put, []

    def interrupted(self, *args):
        put(self, *args)
        calls.append((args[0], tuple(args[1]), tuple(args[2].shape)))
        if len(calls) == 7:
            raise KeyboardInterrupt

    monkeypatch.setattr(store.PlaneStore, "put", interrupted)
    out = dict(out_path=tmp_path / "p.zarr", out_dtype="float32", memory_budget=whole // 2)
    with pytest.raises(KeyboardInterrupt):
        predict_3d(net, x, **options, **out)
    monkeypatch.setattr(store.PlaneStore, "put", lambda self, *a: (calls.append((a[0], tuple(a[1]),
                                                                                tuple(a[2].shape))), put(self, *a)))
    got = predict_3d(net, x, **options, **out).load().numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6)
    boxes = store.tile_boxes(shape[1:], tile)
    assert len(boxes) > 3 and sorted(calls) == sorted((p, tuple(a for a, _ in box), (2,) + tuple(b - a for a, b in box))
                                                      for p in range(8) for box in boxes)  # each block once
    covered = np.zeros(shape[1:], dtype=int)
    for box in boxes:
        covered[tuple(slice(a, b) for a, b in box)] += 1
    assert (covered == 1).all()


def _unet3d(tmp_path):
    from test_chunked import _tiny_model

    return _tiny_model(tmp_path, spatial_dims=3, in_channels=1, roi_size=[8, 8, 8])


def _scan(rng, shape=(14, 11, 19)):
    data = rng.normal(100, 20, shape).astype(np.float32)
    data[3:9, 2:8, 4:12] += 60
    return data


AFFINE = np.array([[0.0, -0.7, 0.0, 10.0], [0.5, 0.0, 0.0, -3.0], [0.0, 0.0, 2.5, 7.25], [0.0, 0.0, 0.0, 1.0]])


def test_slab_predict_3d_zarr_to_zarr_out_of_core(tmp_path, rng, monkeypatch):
    """``slab predict`` with a 3D network on a zarr input that does not fit the budget: block by
    block (several blocks), the mask equal to the in-memory probabilities rounded to float16 and
    post-processed, in the input's geometry."""
    net, base = _unet3d(tmp_path)
    data = _scan(rng)
    save_volume(MetaTensor(torch.from_numpy(data)[None], affine=torch.as_tensor(AFFINE)), tmp_path / "scan.zarr")
    probs = predict_3d(net, PercentileNormalize()(torch.from_numpy(data)[None]), roi_size=(8, 8, 8), device="cpu")
    low, high = (float(np.quantile(probs, q)) for q in (0.5, 0.8))
    expected = postprocess(probs.numpy().astype(np.float16), hysteresis=(low, high), min_size=3)
    assert 0 < expected.sum() < expected.size
    seen = _blocks(monkeypatch)
    assert main(["predict", "-i", str(tmp_path / "scan.zarr"), "-o", str(tmp_path / "mask.zarr"), "--hysteresis",
                 str(low), str(high), "--min-size", "3", "--memory-budget", "0.00002", "--prob",
                 str(tmp_path / "p.zarr"), "--quiet", *base]) == 0
    assert len(seen) > 2
    mask = load_volume(tmp_path / "mask.zarr")
    np.testing.assert_array_equal(mask.numpy(), expected)
    np.testing.assert_allclose(mask.affine.numpy(), AFFINE, atol=1e-12)
    np.testing.assert_allclose(load_volume(tmp_path / "p.zarr").numpy(), probs.numpy().astype(np.float16),
                               atol=2 ** -11)
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.slow  # the sharing is predict_blocks', run on 2 ranks for 2.5D in test_distributed (~15 s here)
def test_torchrun_shares_a_3d_volume_by_block(tmp_path, rng):
    from test_distributed import _torchrun

    _, base = _unet3d(tmp_path)
    save_volume(MetaTensor(torch.from_numpy(_scan(rng))[None], affine=torch.as_tensor(AFFINE)), tmp_path / "scan.zarr")
    one = ["predict", "-i", str(tmp_path / "scan.zarr"), "--memory-budget", "0.00002", "--threshold", "0.5",
           "--tta", "flips", "--quiet", *base]
    assert main(one + ["-o", str(tmp_path / "single.zarr"), "--prob", str(tmp_path / "single_p.zarr")]) == 0
    _torchrun(one + ["-o", str(tmp_path / "ranks.zarr"), "--prob", str(tmp_path / "ranks_p.zarr")], tmp_path)
    blocks = [set((tmp_path / f"blocks-{rank}.txt").read_text().split("\n")) - {""} for rank in (0, 1)]
    assert blocks[0] and blocks[1] and not blocks[0] & blocks[1]
    for a, b in (("single.zarr", "ranks.zarr"), ("single_p.zarr", "ranks_p.zarr")):
        np.testing.assert_array_equal(load_volume(tmp_path / b).numpy(), load_volume(tmp_path / a).numpy())
