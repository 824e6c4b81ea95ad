"""Data parallelism on CPU with gloo: sharding helpers, sharded inference, DDP training via torchrun."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from slab.core.distributed import DistInfo, dist_env, map_sharded, rank_batch, shard_items
from slab.core.errors import SlabError

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("n, world", [(0, 1), (1, 2), (7, 2), (10, 3), (5, 8)])
def test_shards_partition_the_items(n, world):
    items = [f"volume{i}" for i in range(n)]
    shards = [shard_items(items, rank, world) for rank in range(world)]
    flat = [x for shard in shards for x in shard]
    assert sorted(flat) == sorted(items) and len(flat) == len(set(flat))
    assert all(abs(len(a) - len(b)) <= 1 for a in shards for b in shards)
    for shard in shards:  # relative order kept
        assert shard == sorted(shard, key=items.index)


def test_shard_and_batch_errors():
    with pytest.raises(SlabError, match="rank"):
        shard_items([1, 2], 2, 2)
    with pytest.raises(SlabError, match="world_size"):
        shard_items([1, 2], 0, 0)
    assert rank_batch(range(8, 12), 1, 2) == [10, 11]
    with pytest.raises(SlabError, match="multiple"):
        rank_batch(range(5), 0, 2)


def test_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert dist_env() == DistInfo(0, 1, 0) and dist_env().is_main and not dist_env().enabled
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SlabError, match="RANK"):
        dist_env()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _predict(volume):
    """A fixed tiny 2.5D UNet over two planes of one volume."""
    from slab.networks import build_network
    from slab.pipeline.inference import predict_2p5d

    torch.manual_seed(0)
    net = build_network("unet", 2, 3, 1, channels=(4, 8), strides=(2,))
    return np.asarray(predict_2p5d(net, torch.as_tensor(volume), planes=("xy", "zy"), device="cpu", divisor=2))


def _volumes():
    rng = np.random.default_rng(0)
    return [rng.random((1, 8 + i, 8, 6), dtype=np.float32) for i in range(5)]


CONFIG = {"epochs": 2, "batch_size": 4, "samples_per_epoch": 8, "planes": ["xy", "zy"],
          "network": {"name": "unet", "channels": [4, 8], "strides": [2]},
          "val": {"thresholds": [0.5], "tolerance_mm": 0.0}, "progress": False, "lr": 3e-3, "warmup_epochs": 0}


def _worker(work: Path) -> int:
    """One rank under torchrun: sharded inference, then ``slab train`` (DDP)."""
    from slab.pipeline.cli import main
    from slab.core.distributed import cleanup_distributed, init_distributed

    torch.set_num_threads(1)
    info = init_distributed("cpu")
    try:
        results = map_sharded(_predict, _volumes(), info)
        if info.is_main:
            np.savez(work / "sharded.npz", *results)
        return main(["train", "--datalist", str(work / "data" / "datalist.json"), "--config", str(work / "config.json"),
                     "--out", str(work / "ddp"), "--device", "cpu"])
    finally:
        cleanup_distributed()


def test_torchrun_two_processes_match_one(tmp_path):
    """2 gloo processes of batch 2 each train like 1 process of batch 4 (up to summation order);
    sharded inference over 5 volumes gives exactly the one-process outputs."""
    from slab.pipeline.training import load_checkpoint, train

    from test_train import write_datalist

    datalist = write_datalist(tmp_path / "data", n=3)
    (tmp_path / "config.json").write_text(json.dumps(CONFIG), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), __file__, str(tmp_path)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, encoding="utf-8", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count('"best_checkpoint"') == 1  # rank 0 alone reports

    sharded = np.load(tmp_path / "sharded.npz")
    single = [_predict(v) for v in _volumes()]
    assert len(sharded.files) == len(single)
    for i, expected in enumerate(single):
        np.testing.assert_array_equal(sharded[f"arr_{i}"], expected)

    reference = train(datalist, CONFIG, tmp_path / "single", device="cpu")
    ddp = load_checkpoint(tmp_path / "ddp" / "last.pt")
    ref = load_checkpoint(tmp_path / "single" / "last.pt")
    np.testing.assert_allclose([r["train_loss"] for r in ddp["history"]],
                               [r["train_loss"] for r in reference["history"]], rtol=1e-4)
    # Convolution biases right before an instance norm get no gradient but rounding noise, which
    # Adam scales up to full steps; they do not change the output, so compare the networks' outputs.
    from slab.networks import build_network

    nets = []
    for state in (ddp, ref):
        net = build_network(**state["network"]).eval()
        net.load_state_dict(state["model"])
        nets.append(net)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(nets[0](x), nets[1](x), rtol=1e-4, atol=1e-4)
    assert ddp["history"][-1]["val_dice"] == pytest.approx(reference["history"][-1]["val_dice"], abs=1e-3)
    # rank 0 alone wrote the run directory, the same files as one process
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == sorted(p.name for p in (tmp_path / "single").iterdir())


if __name__ == "__main__":
    sys.exit(_worker(Path(sys.argv[1])))


LOGGING_PUTS = """
import json, os, sys
from slab.pipeline.inference import store
from slab.pipeline.cli import main
put = store.PlaneStore.put
def logged(self, plane, corner, sums):
    put(self, plane, corner, sums)
    with open(os.path.join(sys.argv[1], f"blocks-{os.environ['RANK']}.txt"), "a") as f:
        f.write(f"{plane} {store.block_id(corner)}\\n")
store.PlaneStore.put = logged
sys.exit(main(sys.argv[2:]))
"""


def _torchrun(args, tmp_path, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    script = tmp_path / "logging_puts.py"
    script.write_text(LOGGING_PUTS)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), str(script), str(tmp_path), *args]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, encoding="utf-8", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_torchrun_predict_shares_one_volume_by_block_and_many_by_volume(tmp_path, rng):
    """``torchrun -m slab.pipeline.cli predict`` on 2 CPU processes (gloo): one zarr volume out of
    core, its blocks split between the ranks, gives the one-process probabilities and mask
    exactly; a directory of volumes split by volume gives the same files and one RLE CSV."""
    from slab.networks import build_network, save_weights
    from slab.pipeline.cli import main
    from slab.io.volumes import load_volume, save_volume

    config = {"name": "unet", "spatial_dims": 2, "in_channels": 3, "out_channels": 1, "channels": [4, 8],
              "strides": [2]}
    torch.manual_seed(0)
    save_weights(build_network(**config), tmp_path / "net.pt")
    (tmp_path / "net.json").write_text(json.dumps(config))
    data = rng.normal(100, 20, (1, 13, 11, 9)).astype(np.float32)
    data[0, 3:8, 2:7, 2:6] += 60
    save_volume(data, tmp_path / "scan.zarr", affine=np.diag([0.5, 0.5, 2.0, 1.0]))
    base = ["--network", str(tmp_path / "net.json"), "--weights", str(tmp_path / "net.pt"), "--device", "cpu",
            "--batch-size", "2", "--tta", "flips", "--hysteresis", "0.45", "0.55", "--quiet"]
    one = ["predict", "-i", str(tmp_path / "scan.zarr"), "--memory-budget", "0.000002", *base]
    assert main(one + ["-o", str(tmp_path / "single.zarr"), "--prob", str(tmp_path / "single_p.zarr")]) == 0
    done = _torchrun(one + ["-o", str(tmp_path / "ranks.zarr"), "--prob", str(tmp_path / "ranks_p.zarr")], tmp_path)
    assert done.stdout.count("wrote") == 1  # rank 0 writes
    blocks = [set((tmp_path / f"blocks-{rank}.txt").read_text().split("\n")) - {""} for rank in (0, 1)]
    assert blocks[0] and blocks[1] and not blocks[0] & blocks[1]  # each rank its own share of the blocks
    assert len(blocks[0] | blocks[1]) == sum(-(-n // 2) for n in data.shape[1:])  # every block, batches of 2
    for a, b in (("single.zarr", "ranks.zarr"), ("single_p.zarr", "ranks_p.zarr")):
        single, ranks = load_volume(tmp_path / a), load_volume(tmp_path / b)
        np.testing.assert_array_equal(ranks.numpy(), single.numpy())
        np.testing.assert_allclose(ranks.affine.numpy(), single.affine.numpy())
    assert 0 < load_volume(tmp_path / "single.zarr").numpy().sum() < data.size
    assert not list(tmp_path.glob("*.partial"))

    folder = tmp_path / "cases"
    folder.mkdir()
    for i in range(3):
        save_volume(np.roll(data, i, axis=1), folder / f"kidney_{i}.nii.gz")
    many = ["predict", "-i", str(folder), *base]
    assert main(many + ["-o", str(tmp_path / "out1"), "--rle-csv", str(tmp_path / "one.csv")]) == 0
    _torchrun(many + ["-o", str(tmp_path / "out2"), "--rle-csv", str(tmp_path / "two.csv")], tmp_path)
    assert (tmp_path / "two.csv").read_text() == (tmp_path / "one.csv").read_text()
    for i in range(3):
        name = f"kidney_{i}.nii.gz"
        np.testing.assert_array_equal(load_volume(tmp_path / "out2" / name).numpy(),
                                      load_volume(tmp_path / "out1" / name).numpy())
