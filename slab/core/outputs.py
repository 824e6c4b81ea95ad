"""Where outputs go: never onto an input, written atomically, nothing left behind on failure.

- :func:`check_outputs` refuses, before any work, an output that is an input, lies inside an
  input directory, would replace a directory holding an input, or collides with another output;
  and an output whose folder cannot be created or written.
- :func:`atomic_write` stages a file (or directory) beside its target and renames it into place;
  on failure, or when the process is interrupted (SIGINT, and SIGTERM once :func:`handle_signals`
  is installed), the staging folder is removed. An ``OSError`` while writing (disk full, read-only
  file system, a parent that is a file) becomes one :class:`SlabError` line naming the target.
- :func:`temp_dir` makes a private working folder in ``TMPDIR`` (``slab-<kind>-<pid>-*``), removed
  however the block ends; a folder (or staging folder) left by a killed process of the same user
  is swept by the next run that makes one in the same place.
- :func:`reserve` allocates a file's blocks up front (``posix_fallocate``), so a full disk is a
  clean error at the start rather than a bus error half-way through a memory-mapped write.

Numpy-free and torch-free, so that the CLI can import it at start-up.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from slab.core.errors import SlabError

_STALE = re.compile(r"^(?:slab-[a-z]+|\..+\.slab)-(?P<pid>\d+)-[^/]*$")


# ---------------------------------------------------------------------------------------------
# Refusing outputs that would touch an input


def _paths(value) -> list[Path]:
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in _paths(v)]
    return [Path(value)]


def _real(path: Path) -> Path:
    """The absolute path with every existing symbolic link resolved (also for a path that does
    not exist yet: its existing ancestors are resolved)."""
    return Path(os.path.realpath(os.path.abspath(os.path.expanduser(path))))


def _inside(path: Path, folder: Path) -> bool:
    return path != folder and folder in path.parents


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _check_parent(name: str, path: Path) -> None:
    """The first existing ancestor of ``path`` is a writable directory."""
    for ancestor in path.parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise SlabError(f"{name} {path}: {ancestor} is a file, not a directory")
            if not os.access(ancestor, os.W_OK | os.X_OK):
                raise SlabError(f"{name} {path}: cannot write in {ancestor} (read-only or no permission)")
            return


def check_outputs(inputs: Mapping[str, object], outputs: Mapping[str, object]) -> None:
    """Refuse outputs that would overwrite, delete or write into an input, before any work.

    Parameters
    ----------
    inputs, outputs : ``{argument name: path, list of paths or None}``
        Names appear in the messages (``"-i"``, ``"--prob"``, ``"SRC"``). An output is refused
        when it is an input (the same path, a link to it, or a hard link of it), when it lies
        inside an input directory (a slice stack, a DICOM series, a bundle), when an input lies
        inside it (a directory output is replaced whole), when two outputs are the same path or
        one lies inside the other, and when its folder is a file or not writable.

    Example
    -------
    >>> check_outputs({"SRC": "scan.nii.gz"}, {"DST": "scan.nii.gz"})  # doctest: +SKIP
    Traceback (most recent call last):
    SlabError: DST scan.nii.gz: is the input SRC; write the output elsewhere
    """
    ins = [(name, path, _real(path)) for name, value in inputs.items() for path in _paths(value)]
    outs = [(name, path, _real(path)) for name, value in outputs.items() for path in _paths(value)]
    for name, path, real in outs:
        for in_name, in_path, in_real in ins:
            if real == in_real or _same_file(real, in_real):
                raise SlabError(f"{name} {path}: is the input {in_name} {in_path}; write the output elsewhere")
            if _inside(real, in_real):
                raise SlabError(f"{name} {path}: lies inside the input {in_name} {in_path}; write the output "
                                "elsewhere")
            if _inside(in_real, real):
                raise SlabError(f"{name} {path}: would replace the input {in_name} {in_path}, which lies inside it")
        _check_parent(name, path)
    for i, (name, path, real) in enumerate(outs):
        for other, other_path, other_real in outs[i + 1:]:
            if real == other_real:
                raise SlabError(f"{other} {other_path}: the same path as {name}; give each output its own name")
            if _inside(real, other_real) or _inside(other_real, real):
                inner, outer = ((name, path), (other, other_path)) if _inside(real, other_real) else \
                    ((other, other_path), (name, path))
                raise SlabError(f"{inner[0]} {inner[1]}: lies inside the output {outer[0]} {outer[1]}, which is "
                                "written whole; give it another place")


# ---------------------------------------------------------------------------------------------
# Temporary and staging folders


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def sweep_stale(folder: Path) -> None:
    """Remove slab's temporary and staging folders in ``folder`` left by dead processes of this
    user (names carry the creating process id). Others' and live processes' folders stay."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    uid = os.getuid() if hasattr(os, "getuid") else None
    for entry in entries:
        match = _STALE.match(entry.name)
        if match is None or int(match["pid"]) == os.getpid() or _alive(int(match["pid"])):
            continue
        try:
            if uid is not None and entry.stat(follow_symlinks=False).st_uid != uid:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
        except OSError:
            continue


# Errors of writing, as opposed to reading an input inside an atomic_write block.
_WRITE_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.ENOTDIR, errno.EISDIR,
                 errno.EEXIST, errno.EFBIG, errno.ENAMETOOLONG, errno.ENOENT}


def os_error(target: Path, err: OSError) -> SlabError:
    reason = os.strerror(err.errno) if err.errno else str(err)
    if err.errno == errno.ENOSPC:
        reason = "no space left on the device"
    return SlabError(f"{target}: cannot write ({reason})")


@contextmanager
def writing(target) -> Iterator[None]:
    """Turn a failed write inside the block (a full disk, a read-only folder, torch's writer
    giving up, which it reports as a RuntimeError) into one SlabError naming ``target``; other
    errors pass through."""
    try:
        yield
    except OSError as err:
        if err.errno not in _WRITE_ERRORS:
            raise
        raise os_error(Path(target), err) from None
    except RuntimeError as err:  # torch's writer wraps the OSError of its write
        cause = err.__cause__ or err.__context__
        while cause is not None and not (isinstance(cause, OSError) and cause.errno in _WRITE_ERRORS):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise os_error(Path(target), cause) from None


@contextmanager
def temp_dir(kind: str, where=None) -> Iterator[Path]:
    """A private folder ``slab-<kind>-<pid>-XXXX`` in ``where`` (default ``TMPDIR``), removed when
    the block ends, however it ends. Stale folders of dead slab processes are swept first."""
    folder = Path(where) if where is not None else Path(tempfile.gettempdir())
    sweep_stale(folder)
    try:
        path = Path(tempfile.mkdtemp(prefix=f"slab-{kind}-{os.getpid()}-", dir=folder))
    except OSError as err:
        raise os_error(folder, err) from None
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def atomic_write(path) -> Iterator[Path]:
    """Write ``path`` atomically: yield a temporary path, move it into place on success.

    The temporary path has the target's name inside a private directory beside the target, so
    suffix-driven writers (nibabel, SimpleITK) behave as for the real name. On success every
    file the caller wrote there (the target, and companions such as an ``.mhd``'s ``.raw``)
    is renamed beside the target, the target last; an existing directory target is replaced
    whole. On failure or interruption nothing is left behind, and an ``OSError`` (a full disk,
    a read-only file system) is a SlabError naming the target.

    Example
    -------
    >>> with atomic_write("out/table.csv") as tmp, open(tmp, "w", encoding="utf-8") as f:  # doctest: +SKIP
    ...     f.write("id,rle\\n")
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(target.parent)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.slab-{os.getpid()}-", suffix=".tmp",
                                        dir=target.parent))
    except OSError as err:
        raise os_error(target, err) from None
    try:
        yield staging / target.name
        for written in sorted(staging.iterdir(), key=lambda p: p.name == target.name):
            dest = target.parent / written.name
            if dest.exists() and dest.is_dir() != written.is_dir():
                expected = "a directory" if written.is_dir() else "a file"
                raise SlabError(f"{dest}: exists and is not {expected}; not replacing it")
            if dest.is_dir():
                dest.rename(staging / ".replaced")  # removed with the staging directory
            os.replace(written, dest)
    except OSError as err:
        if err.errno not in _WRITE_ERRORS:
            raise
        raise os_error(target, err) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def reserve(path, nbytes: int) -> None:
    """Allocate ``nbytes`` of disk for the file ``path`` now (it must exist), so that a full disk
    is a SlabError here, not a bus error when a memory map of it is written later."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as err:
        raise os_error(Path(path), err) from None
    try:
        if hasattr(os, "posix_fallocate") and nbytes > 0:
            os.posix_fallocate(fd, 0, int(nbytes))
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise os_error(Path(path), err) from None
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Signals


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM (or SIGHUP), so that cleanup runs as for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum, frame):  # noqa: ARG001 - the signal module's signature
    raise Terminated(signum)


def handle_signals(signals: Iterable[int] = (signal.SIGTERM,) + ((signal.SIGHUP,) if hasattr(signal, "SIGHUP")
                                                                  else ())) -> None:
    """Turn SIGTERM (and SIGHUP) into :class:`Terminated` in the main thread, so that every
    ``finally`` (staging folders, temporary folders) runs before the process exits."""
    if sys.platform == "win32":
        return
    for signum in signals:
        try:
            signal.signal(signum, _raise_terminated)
        except (ValueError, OSError):  # not the main thread, or not supported
            pass


__all__ = ["check_outputs", "atomic_write", "temp_dir", "sweep_stale", "reserve", "handle_signals", "Terminated"]
