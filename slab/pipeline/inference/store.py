"""Out-of-core inference into a zarr store, resumable after a kill: the block loop both engines
run (:func:`predict_blocks`; 2.5D planes, 3D sliding-window flips).

Each plane's sums over its views (2.5D) or each flip's probabilities (3D) go to their own float32
zarr array in a work folder beside the output (``<output>.partial/``, not ``TMPDIR``), one block
of slices at a time; a block is written whole and then recorded in ``state.json`` (replaced
atomically), so a block is either done or done again: re-running the same command after a kill
or a full disk skips the finished blocks. The state carries a key of everything that decides the
result (the input's shape, dtype and file, the slabs or windows, TTA, batch size, the
normalisation window and a hash of the network's weights); a different run discards the old
work. When every block is done, the arrays are added in the in-memory path's order and divided
by their number, chunk by chunk, into the output: an OME-Zarr image (level 0 and a pyramid) in
the input's geometry (2.5D: bit-identical to the in-memory result at float32, and that result
rounded at float16; 3D: equal to float rounding). The work folder is removed when the output is
in place.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from slab.core.errors import SlabError, SlabWarning
from slab.core.outputs import os_error

STATE = "state.json"
# Work folders of resumable runs in progress (what an interrupted command says it kept).
ACTIVE: set[Path] = set()
# Work arrays are chunked this many voxels along the axes a block does not cut.
WORK_CHUNK = 256


def work_dir(out_path) -> Path:
    """The work folder of an output: ``<output>.partial`` beside it."""
    out = Path(out_path)
    return out.with_name(out.name + ".partial")


def describe(fn) -> str:
    """A process-independent description of a block transform (its function and arguments)."""
    import functools

    if isinstance(fn, functools.partial):
        args = [np.asarray(a).tolist() if isinstance(a, (np.ndarray, torch.Tensor)) else a for a in fn.args]
        keywords = {k: np.asarray(v).tolist() if isinstance(v, (np.ndarray, torch.Tensor)) else v
                    for k, v in fn.keywords.items()}
        return json.dumps([describe(fn.func), args, keywords], sort_keys=True, default=repr)
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"


def _stamp(path) -> list:
    """A file's name, size and modification time; for a directory (a zarr store, a slice stack),
    a hash of every file's relative name, size and modification time inside it, so that a chunk
    rewritten in place is noticed."""
    try:
        stat = os.stat(path)
    except (OSError, TypeError):
        return [str(path)]
    if not os.path.isdir(path):
        return [str(path), stat.st_size, stat.st_mtime_ns]
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            try:
                info = os.stat(full)
            except OSError:
                continue
            digest.update(f"{os.path.relpath(full, path)}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    return [str(path), digest.hexdigest()]


def run_key(model: torch.nn.Module, shape, dtype, source, settings: dict) -> str:
    """A hash of everything that decides a result: the network's weights, the input (shape,
    dtype, and :func:`_stamp` of its file or of every file in its directory) and the inference
    settings."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    stamp = [_stamp(path) for path in (source if isinstance(source, (list, tuple)) else [source])]
    settings = {k: describe(v) if callable(v) else v for k, v in settings.items()}
    digest.update(json.dumps({"shape": list(shape), "dtype": str(dtype), "source": stamp, **settings},
                             sort_keys=True, default=repr).encode())
    return digest.hexdigest()


def finished(out_path, key: str) -> bool:
    """Whether ``out_path`` holds the finished result of the run ``key``."""
    from slab.io.zarr import read_notes

    return Path(out_path).is_dir() and read_notes(out_path).get("run_key") == key


class PlaneStore:
    """The per-plane float32 sums of one run in ``folder`` and the blocks already done: one
    array per plane (2.5D) or flip (3D), cut into blocks of ``tiles[p]`` voxels along the spatial
    axes (2.5D: whole slices, a number of them along the plane's axis; 3D: boxes). A block is
    known by its corner, ``"x,y,z"``.

    Under ``torchrun`` (``info`` of several ranks, the process group joined) the ranks share the
    folder: rank 0 prepares it, each rank records its own blocks in ``state-<rank>.json``, and the
    blocks done are the union of every state file of this run (so a resumed run may use another
    number of processes). Blocks write disjoint zarr chunks, so ranks never write the same file.
    """

    def __init__(self, folder: Path, key: str, shape, tiles, info=None):
        import zarr

        from slab.core.distributed import DistInfo, barrier

        self.info = info or DistInfo()
        self.folder, self.key, self.shape = Path(folder), key, tuple(int(s) for s in shape)
        self.state_name = STATE if not self.info.enabled else f"state-{self.info.rank}.json"
        states = self._read_states()
        if self.info.is_main:
            if any(state.get("key") != key for state in states):
                warnings.warn(SlabWarning(f"{self.folder}: partial results of a different run (network, input or "
                                          "settings changed); starting again"), stacklevel=4)
                shutil.rmtree(self.folder, ignore_errors=True)
                states = []
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise os_error(self.folder, err) from None
        barrier(self.info)
        states = [state for state in self._read_states() if state.get("key") == key]
        ACTIVE.add(self.folder)
        self.done = {str(p): set() for p in range(len(tiles))}
        for state in states:
            for p, starts in state["done"].items():
                self.done.setdefault(p, set()).update(starts)
        self.mine = {p: set() for p in self.done}
        self.arrays = []
        for p, tile in enumerate(tiles):
            # a block's own chunks: the tile along the axes it cuts, so that ranks never share one
            chunks = [self.shape[0]] + [t if t < n else min(WORK_CHUNK, n) for t, n in zip(tile, self.shape[1:])]
            path = self.folder / f"plane{p}.zarr"
            try:
                if self.info.is_main and not (path.exists() and self.done[str(p)]):
                    zarr.create_array(str(path), shape=self.shape, chunks=tuple(chunks), dtype="float32",
                                      fill_value=0.0, overwrite=True, zarr_format=2, compressors=None)
                barrier(self.info)
                array = zarr.open_array(str(path), mode="r+")
            except OSError as err:
                raise os_error(path, err) from None
            if tuple(array.shape) != self.shape:
                raise SlabError(f"{path}: partial results of shape {tuple(array.shape)}, expected {self.shape}; "
                                f"remove {self.folder}")
            self.arrays.append(array)
        self._write_state()

    def _read_states(self) -> list[dict]:
        """Every state file in the folder (one per rank of a sharded run)."""
        states = []
        for path in sorted(self.folder.glob("state*.json")) if self.folder.is_dir() else []:
            try:
                state = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(state, dict) and isinstance(state.get("done"), dict):
                states.append(state)
        return states

    def _write_state(self) -> None:
        tmp = self.folder / (self.state_name + ".tmp")
        done = {p: sorted(s) for p, s in (self.mine if self.info.enabled else self.done).items()}
        try:
            tmp.write_text(json.dumps({"key": self.key, "done": done}), encoding="utf-8")
            os.replace(tmp, self.folder / self.state_name)
        except OSError as err:
            raise os_error(self.folder / self.state_name, err) from None

    def all_done(self, blocks) -> bool:
        """Whether every ``(plane index, box)`` of ``blocks`` is recorded by some rank."""
        done = {}
        for state in self._read_states():
            if state.get("key") == self.key:
                for p, starts in state["done"].items():
                    done.setdefault(p, set()).update(starts)
        return all(block_id(c for c, _ in box) in done.get(str(p), ()) for p, box in blocks)

    def is_done(self, plane_index: int, corner) -> bool:
        return block_id(corner) in self.done[str(plane_index)]

    def put(self, plane_index: int, corner, sums: torch.Tensor) -> None:
        """Store the sums of the block at spatial ``corner`` (its size is theirs), then record it."""
        region = (slice(None),) + tuple(slice(c, c + n) for c, n in zip(corner, sums.shape[1:]))
        try:
            self.arrays[plane_index][region] = sums.numpy()
        except OSError as err:
            raise os_error(self.folder, err) from None
        self.done[str(plane_index)].add(block_id(corner))
        self.mine[str(plane_index)].add(block_id(corner))
        self._write_state()

    def finish(self, out_path, affine, count: int, out_dtype: str, block_bytes: int = 64 << 20) -> None:
        """Planes added in order and divided by ``count``, chunk by chunk, into ``out_path``
        (which records the run's key: :func:`finished`), ``block_bytes`` of output at a time (the
        float32 sums read for them take up to eight times that)."""
        from slab.io.zarr import write_zarr

        write_zarr(MeanVolume(self.arrays, count, np.dtype(out_dtype)), affine, out_path, notes={"run_key": self.key},
                   block_bytes=block_bytes)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        ACTIVE.discard(self.folder)


def block_id(corner) -> str:
    """How the state files name the block at spatial ``corner``: ``"x,y,z"``."""
    return ",".join(str(int(c)) for c in corner)


def tile_boxes(shape, tile) -> list[tuple[tuple[int, int], ...]]:
    """The blocks of ``tile`` voxels (x, y, z) covering a volume of spatial ``shape``, as
    ``((x0, x1), (y0, y1), (z0, z1))`` boxes, z slowest (x fastest)."""
    import itertools

    ranges = [[(a, min(n, a + t)) for a in range(0, n, t)] for n, t in zip(shape, tile)]
    return [(x, y, z) for z, y, x in itertools.product(ranges[2], ranges[1], ranges[0])]


def predict_blocks(model, volume, out_path, store_shape, tiles, settings: dict, compute, count: int,
                   out_dtype: str, bar, budget: int, shard=None, units=None):
    """Out-of-core prediction of ``volume`` into the OME-Zarr ``out_path``, resumable, shared by
    the ranks of ``shard``: the loop both engines run.

    Array ``p`` of the work store is cut into blocks of ``tiles[p]`` voxels (x, y, z; a 2.5D
    plane's are whole slices, a 3D flip's boxes); ``compute(p, box)`` gives the float32 sums of
    the block ``box = ((x0, x1), (y0, y1), (z0, z1))`` (and moves ``bar``; a skipped block moves
    it ``units(p, box)``). Finished blocks (of this run: :func:`run_key` of the network, the input
    and ``settings``) are skipped; rank ``r`` of ``world_size`` computes every ``world_size``-th
    block; rank 0 adds the arrays in order, divides by ``count`` and writes ``out_path``. Every
    rank returns the result as a lazy volume.
    """
    from slab.core.distributed import barrier
    from slab.io.volumes import load_volume

    info = _sharding(shard)
    shape = tuple(int(s) for s in volume.shape)
    affine = getattr(volume, "affine", None)
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    source = getattr(volume, "meta", {}).get("filename_or_obj")
    tiles = [tuple(int(t) for t in tile) for tile in tiles]
    key = run_key(model, shape, volume.dtype, source, {**settings, "tiles": [list(t) for t in tiles],
                                                       "out_dtype": out_dtype, "store": list(store_shape)})
    if finished(out_path, key):  # the same run finished before (e.g. killed while post-processing)
        bar.update(bar.total - bar.n)
        return load_volume(out_path, lazy=True)
    check_work_space(out_path, store_shape, len(tiles))
    store = PlaneStore(work_dir(out_path), key, store_shape, tiles, info)
    blocks = [(p, box) for p, tile in enumerate(tiles) for box in tile_boxes(store_shape[1:], tile)]
    kept = sum(store.is_done(p, [a for a, _ in box]) for p, box in blocks)
    if kept and info.is_main:  # say what the interrupted run left, and what is still to do
        warnings.warn(SlabWarning(f"{work_dir(out_path)}: resuming an interrupted prediction: {kept} of {len(blocks)} "
                                  f"blocks kept, {len(blocks) - kept} left"), stacklevel=2)
    for index, (p, box) in enumerate(blocks):
        corner = [a for a, _ in box]
        if store.is_done(p, corner) or index % info.world_size != info.rank:  # done, or another rank's
            bar.update(units(p, box) if units else 0)
            continue
        store.put(p, corner, compute(p, box))
    barrier(info)
    if info.is_main:
        if not store.all_done(blocks):
            raise SlabError(f"{work_dir(out_path)}: a rank did not record all of its blocks")
        store.finish(out_path, affine, count, out_dtype, block_bytes=max(1 << 20, budget // 16))
        store.remove()
    barrier(info)
    return load_volume(out_path, lazy=True)


def check_work_space(out_path, store_shape, arrays: int, source=None) -> None:
    """Refuse before any block is predicted a run whose float32 work store (one array per plane
    or flip) passes the free space beside ``out_path``: an input whose header claims more voxels
    than any disk holds is one line, not days of predicting its missing chunks."""
    need = int(np.prod([int(n) for n in store_shape], dtype=object)) * 4 * arrays
    folder = Path(out_path).resolve().parent
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if need > free:
        of = f"{source} ({'x'.join(map(str, store_shape[1:]))})" if source else \
            f"a {'x'.join(map(str, store_shape[1:]))} volume"
        raise SlabError(f"{out_path}: out-of-core prediction of {of} needs "
                        f"{need / 2**30:,.1f} GiB of work space beside it; {free / 2**30:,.1f} GiB are free")


def _sharding(shard):
    """``shard`` (a :class:`~slab.core.distributed.DistInfo` of the ranks sharing this
    volume) when its process group is joined, else one process."""
    import torch.distributed as dist

    from slab.core.distributed import DistInfo

    if shard is not None and shard.enabled and dist.is_available() and dist.is_initialized():
        return shard
    return DistInfo()


def kept_message() -> str:
    """What an interrupted command kept: '' when no resumable run was in progress."""
    kept = [p for p in ACTIVE if p.is_dir()]
    if not kept:
        return ""
    return f"; finished blocks are kept in {min(kept, key=lambda p: len(str(p)))}, the same command resumes"


class MeanVolume:
    """A (L, X, Y, Z) view of the mean of ``arrays`` (a 2.5D run's plane sums, a 3D run's flips,
    an ensemble's members): added and divided as the in-memory path does, block by block."""

    ndim = 4

    def __init__(self, arrays, count: int, dtype: np.dtype):
        self.arrays, self.count, self.dtype = arrays, count, dtype
        self.shape = tuple(int(s) for s in arrays[0].shape)

    def __getitem__(self, index):
        total = torch.from_numpy(np.asarray(self.arrays[0][index], dtype=np.float32).copy())
        for array in self.arrays[1:]:
            total.add_(torch.from_numpy(np.asarray(array[index], dtype=np.float32)))
        if self.count > 1:
            total.div_(self.count)
        return total.numpy().astype(self.dtype, copy=False)


__all__ = ["ACTIVE", "MeanVolume", "PlaneStore", "check_work_space", "finished", "kept_message", "predict_blocks", "run_key", "work_dir", "STATE"]
