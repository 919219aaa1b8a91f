"""Small durable-file helpers: write to a temp name, fsync, rename, fsync the dir."""

from __future__ import annotations

import itertools
import os
import threading

_serial = itertools.count()


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
    """Create ``path`` (it must not exist) holding ``data``, and fsync it.

    For a file inside a staging directory (``LayerStore.staging``): nothing
    sees it before the whole directory is renamed into place, so it needs no
    temp name of its own, and the one fsync of the directory before that rename
    makes its entry durable.  ``write_atomic`` here cost two more fsyncs and a
    rename per file: 8 fsyncs per overlay Create, now 5."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
