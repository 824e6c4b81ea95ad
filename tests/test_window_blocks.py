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
from slab.pipeline.inference.window_blocks import WindowGrid, scan_interval, slices_per_block
from slab.transforms.intensity import PercentileNormalize
from slab.transforms.io import load_volume, save_volume
from slab.transforms.post import postprocess


def _net(channels=2, labels=2, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv3d(channels, 3, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv3d(3, labels, 3, padding=1))


def _blocks(monkeypatch):
    """Record every block the store is given: (array, start)."""
    from slab.pipeline.inference import store

    seen = []
    put = store.PlaneStore.put
    monkeypatch.setattr(store.PlaneStore, "put", lambda self, p, axis, start, sums: (seen.append((p, start)),
                                                                                     put(self, p, axis, start, sums)))
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
    step = slices_per_block(30_000, (1, 10, 9, 40), (8, 8, 8), 1, 1, 4, 2)
    assert 1 <= step < 20  # several blocks per flip
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
    assert len(seen) == blocks - 5 and not set(seen) & {(a[0], a[2]) for a in calls}
    expected = predict_3d(net, x, roi_size=(8, 8, 8), overlap=0.5, tta="flips", sw_batch_size=2, device="cpu")
    np.testing.assert_array_equal(got.load().numpy(), expected.numpy().astype(np.float16))
    assert not (tmp_path / "p.zarr.partial").exists()


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
