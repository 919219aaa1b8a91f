"""Small durable-file helpers: write to a temp name, fsync, rename, fsync the dir."""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import os
import stat
import threading

_serial = itertools.count()
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
#: sync_file_range(2): start writeback of the dirty pages, wait for nothing.
_SYNC_FILE_RANGE_WRITE = 2


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes, mode: int = 0o600, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` so a crash leaves the old or the new file, never half.

    ``durable=False`` skips the fsyncs: the rename alone is atomic against a
    crash of the *process* (the page cache survives it), which is all that
    state dying with the machine anyway (mounts, reference counts) needs."""
    # Unique per call: several worker threads may replace the same file at once.
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}-{next(_serial)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if durable:
        fsync_dir(os.path.dirname(path) or ".")


def write_staged(path: str, data: bytes, mode: int = 0o600) -> None:
    """Create ``path`` (it must not exist) holding ``data``, and start writing it
    to disk; ``fsync_staged`` of its directory waits for that.

    For a file directly inside a staging directory (``LayerStore.staging``):
    nothing sees it before the whole directory is renamed into place, so it
    needs no temp name of its own, and the staging fsyncs it and the directory
    before that rename.  ``write_atomic`` here cost two more fsyncs and a
    rename per file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data)
        _start_writeback(fd)
    finally:
        os.close(fd)


def _start_writeback(fd: int) -> None:
    """A hint only (its failure, e.g. a filesystem without it, changes nothing:
    the fsync that follows is what makes the data durable)."""
    _libc.sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def fsync_staged(stage: str) -> None:
    """fsync every regular file directly in ``stage``, then ``stage`` itself.

    The same fsyncs as one per ``write_staged`` call, but issued once all the
    files are written and their writeback started: on a journalling
    filesystem the first fsync then commits one journal transaction holding
    every file's blocks, and the others find nothing left to commit, where
    fsyncing each file as it was written committed one transaction each (three
    for an overlay layer with a parent)."""
    with os.scandir(stage) as entries:
        files = [e.path for e in entries if e.is_file(follow_symlinks=False)]
    for path in files:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                os.fsync(fd)
        finally:
            os.close(fd)
    fsync_dir(stage)
