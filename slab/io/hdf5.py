"""HDF5 datasets (``scan.h5``, its one 3D/4D dataset, or ``scan.h5/group/name``) through h5py,
read lazily and written block by block (dataset ``volume``, slab's geometry in an attribute)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from slab.core.errors import SlabError
from slab.io.arrays import (
    ArrayVolume,
    block_steps,
    copy_blocks,
    default_axes,
    diag_affine,
    restore_affine,
    stored_affine,
)
from slab.io.common import HDF5_SUFFIXES, one_line, spacing_of, suffix_of


def split_hdf5(path) -> tuple[Path, str | None] | None:
    """``(file, dataset)`` for ``file.h5`` or ``file.h5/group/dataset``; None for other paths."""
    path = Path(path)
    for i, part in enumerate(path.parts):
        if suffix_of(Path(part)) in HDF5_SUFFIXES:
            file = Path(*path.parts[: i + 1])
            inner = "/".join(path.parts[i + 1:])
            if file.is_file() or not inner:
                return file, inner or None
    return None


def open_hdf5(path, spacing=None) -> ArrayVolume:
    import h5py

    file, name = split_hdf5(path)
    source = str(path)
    if not file.is_file():
        raise SlabError(f"{file}: no such file")
    try:
        handle = h5py.File(file, "r")
    except Exception as err:  # noqa: BLE001 - h5py raises OSError and others on damaged files
        raise SlabError(f"{file}: not a readable HDF5 file ({one_line(err)})") from None
    try:
        if name is None:
            found = []
            handle.visititems(lambda key, node: found.append(key) if isinstance(node, h5py.Dataset)
                              and node.ndim in (3, 4) else None)
            if len(found) != 1:
                listed = ", ".join(found[:6]) or "none"
                raise SlabError(f"{file}: holds {len(found)} 3D/4D datasets ({listed}); name one, "
                                f"e.g. {file}/{found[0] if found else 'DATASET'}")
            name = found[0]
        node = handle.get(name)
        if not isinstance(node, h5py.Dataset):
            raise SlabError(f"{source}: no dataset {name!r} in {file}")
        if node.dtype.kind not in "biuf":
            raise SlabError(f"{source}: a dataset of {node.dtype}; expected numbers")
        axes = default_axes(node.ndim, source)
        attrs = dict(node.attrs)
        size = attrs.get("element_size_um")
        affine = np.eye(4)
        if size is not None:
            try:
                size = np.asarray(size, dtype=np.float64).ravel()
            except (TypeError, ValueError):
                raise SlabError(f"{source}: element_size_um {size!r:.60}; expected three positive sizes (z y x)") \
                    from None
            if size.shape != (3,) or not np.all(np.isfinite(size)) or np.any(size <= 0):
                raise SlabError(f"{source}: element_size_um {size.tolist()}; expected three positive sizes (z y x)")
            affine = diag_affine(size[::-1] * 1e-3, (0, 0, 0))
        own = attrs.get("slab_affine")
        if own is not None:
            own = stored_affine({"slab": {"affine": np.asarray(own).tolist()}}, source)
            affine = restore_affine(own, affine, origin=False) if size is not None else own
        return ArrayVolume(node, axes, affine, source, spacing, closer=handle.close)
    except BaseException:
        handle.close()
        raise


def write_hdf5(volume, affine: np.ndarray, path: Path, dataset: str = "volume", chunks: int = 64,
               block_bytes: int = 256 << 20) -> None:
    """One chunked, gzip-compressed HDF5 dataset ``(Z, Y, X)`` or ``(C, Z, Y, X)`` with Fiji's
    ``element_size_um`` (z y x) and slab's matrix (``slab_affine``), written block by block."""
    import h5py

    from slab.core.outputs import atomic_write

    affine = np.asarray(affine, dtype=np.float64)
    channels = volume.shape[0]
    shape = ((channels,) if channels > 1 else ()) + tuple(volume.shape[1:][::-1])
    spacing = np.asarray(spacing_of(affine))
    with atomic_write(path) as tmp:
        with h5py.File(tmp, "w") as handle:
            data = handle.create_dataset(dataset, shape=shape, dtype=volume.dtype, compression="gzip",
                                         compression_opts=1, shuffle=True,
                                         chunks=tuple(min(chunks, n) for n in shape) if channels == 1 else
                                         (1,) + tuple(min(chunks, n) for n in shape[1:]))
            data.attrs["element_size_um"] = (spacing[::-1] * 1e3).astype(np.float64)
            data.attrs["slab_affine"] = affine
            copy_blocks(volume, data, channels, *block_steps(volume, chunks, block_bytes), None)


__all__ = ["split_hdf5", "open_hdf5", "write_hdf5"]
