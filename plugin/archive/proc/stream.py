"""Parent side of the archive workers: spawn, feed, collect (see ``worker.py``).

Both directions run tar work in a child process: extraction because it must
``chroot`` into the layer (docker's ``chrootarchive``), export so that the
plugin's event-loop process never competes for the GIL with a tar writer.
Layers are streamed in fixed-size chunks; nothing holds a whole layer in memory.
These functions block: call them from a worker thread, never on the event loop.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import IO, Any, BinaryIO, Self, cast

from plugin.archive.changes import Change, ChangeKind
from plugin.archive.proc.export import CHUNK_ENTRIES, export_to_memory
from plugin.archive.proc.warm import WarmPool, WarmWorker
from plugin.archive.proc.wire import FATAL_PREFIX, WORKER_MODULE
from plugin.archive.proc.zygote import ForkedWorker, Zygote, ZygoteError
from plugin.errors import InvalidArgument, NotFound, StrataError
from plugin.idtools import IDMappings

log = logging.getLogger("strata.archive")

_CHUNK = 1 << 20
#: Small files an apply worker extracts alone before it forks its file helper: a
#: small layer is not worth the fork.
HELPER_AFTER = 64
_WHITEOUT_FORMATS = ("aufs", "overlay")
#: A layer of at most this many entries, and bytes of tar (``export_to_memory`` stops
#: before a body that would pass it), is exported by the calling thread into memory
#: instead of by a worker: a worker costs a fork, pipes and
#: process wake-ups, many times the export of a small layer (``bench_graphtest.py``).
#: Export only reads the tree, with the calls the worker makes (it is not chrooted
#: either), so nothing is given up in confinement; the bounds cap the memory held and
#: the GIL time taken from the event loop.  Twice ``CHUNK_ENTRIES``: a worker would not
#: fork its helper below that either.
MEMORY_EXPORT_MAX_ENTRIES = 2 * CHUNK_ENTRIES
MEMORY_EXPORT_MAX_BYTES = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
# The directory that holds the ``plugin`` package (this file is plugin/archive/proc/stream.py),
# so the child imports this very copy.
_PACKAGE_PARENT = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
_ERROR_KINDS: dict[str, type[StrataError]] = {
    "InvalidArgument": InvalidArgument, "StrataError": StrataError,
}


@dataclass(frozen=True)
class ApplyOptions:
    idmap: IDMappings = field(default_factory=IDMappings)
    whiteout_format: str = "aufs"


#: A worker: forked by the zygote, or (when that fails) a process of its own.
WorkerProcess = subprocess.Popen[bytes] | ForkedWorker


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
    return env


_ZYGOTE = Zygote(_worker_env())
_WARM = WarmPool(_ZYGOTE)


def _spawn(args: list[str], stderr: IO[bytes]) -> WorkerProcess:
    """A worker with stdin and stdout pipes; forked from the warm zygote when possible."""
    try:
        return _ZYGOTE.start(args, stderr, want_stdout=True)
    except ZygoteError as exc:
        log.warning("%s; starting the archive worker as a new process", exc)
    return subprocess.Popen(
        [sys.executable, "-m", WORKER_MODULE, *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, env=_worker_env(),
        close_fds=True,
    )


def _relay_log(stderr: IO[bytes]) -> list[str]:
    """Pass the child's log lines on to our logger; return them."""
    stderr.seek(0)
    lines = stderr.read().decode("utf-8", "replace").splitlines()
    for line in lines:
        if line and not line.startswith(FATAL_PREFIX):
            log.warning("archive worker: %s", line)
    return lines


class TarStream:
    """A layer tar read from a child process's stdout."""

    def __init__(self, proc: WorkerProcess, stderr: IO[bytes], what: str) -> None:
        self._proc = proc
        self._stderr = stderr
        self._what = what
        self._done = False
        self._started = time.monotonic()

    def readable(self) -> bool:
        return True

    def whole(self) -> bytes | None:
        """The whole tar when it was made in memory (nothing left to wait for or reap:
        ``close`` does not block); None: read it."""
        return None

    def pipe_fd(self) -> int | None:
        """The child's stdout, for a reader that waits on it itself (the server's event
        loop); None once the end was read.  Read it to its end, then call ``read``
        once more: it returns b"" or raises the child's failure."""
        out = self._proc.stdout
        return None if self._done or out is None else out.fileno()

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all with ``n < 0``); ``b""`` at the end. At the end a failed
        child raises StrataError with its message."""
        if self._done:
            return b""
        out = cast(io.BufferedReader, self._proc.stdout)
        data = out.read() if n < 0 else out.read1(n) if n else b""
        if n != 0 and (not data or n < 0):
            self._finish()
        return data

    def _finish(self) -> None:
        self._done = True
        rc = self._proc.wait()
        lines = _relay_log(self._stderr)
        self._close_pipes()
        elapsed = time.monotonic() - self._started
        if rc != 0:
            fatal = [ln[len(FATAL_PREFIX):] for ln in lines if ln.startswith(FATAL_PREFIX)]
            detail = fatal[-1] if fatal else (lines[-1] if lines else f"exit status {rc}")
            log.warning("%s failed after %.2fs: %s", self._what, elapsed, detail)
            raise StrataError(f"{self._what}: {detail}")
        log.info("%s done in %.2fs", self._what, elapsed)

    def _close_pipes(self) -> None:
        for pipe in (self._proc.stdout, self._proc.stdin):
            if pipe is not None:
                pipe.close()
        self._stderr.close()

    def close(self) -> None:
        """Stop the child if it is still writing, and reap it."""
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        if not self._done:
            self._done = True
            self._close_pipes()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MemoryTarStream(TarStream):
    """A layer tar made in memory by ``export_to_memory`` (a small layer)."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def whole(self) -> bytes | None:
        return self._data[self._pos:]

    def pipe_fd(self) -> int | None:
        return None

    def read(self, n: int = -1) -> bytes:
        end = len(self._data) if n < 0 else self._pos + n
        data = self._data[self._pos:end]
        self._pos += len(data)
        return data

    def close(self) -> None:
        self._pos = len(self._data)


def _export_spec(root: str, idmap: IDMappings, whiteout_format: str,
                 changes: list[Change] | None) -> dict[str, Any]:
    """An export job's arguments; ``InvalidArgument`` for an unknown whiteout format."""
    if whiteout_format not in _WHITEOUT_FORMATS:
        raise InvalidArgument(f"unknown whiteout format {whiteout_format!r}")
    return {"root": root, "idmap": idmap.to_json(), "whiteout_format": whiteout_format,
            "changes": None if changes is None else [[c.path, int(c.kind)] for c in changes]}


def _small_export(spec: dict[str, Any], changes: list[Change] | None) -> TarStream | None:
    """The tar made in memory, in this thread, if the export is within the bounds."""
    root = spec["root"]
    if changes is not None and len(changes) > MEMORY_EXPORT_MAX_ENTRIES:
        return None
    try:
        data = export_to_memory(spec, max_entries=MEMORY_EXPORT_MAX_ENTRIES,
                                max_bytes=MEMORY_EXPORT_MAX_BYTES)
    except (StrataError, OSError, ValueError, KeyError) as exc:
        raise StrataError(f"exporting {root}: {exc}") from None
    return None if data is None else MemoryTarStream(data)


def _start_export(root: str, idmap: IDMappings, whiteout_format: str,
                  changes: list[Change] | None) -> TarStream:
    spec = _export_spec(root, idmap, whiteout_format, changes)
    if not os.path.isdir(root):
        raise NotFound(f"export: {root} is not a directory")
    small = _small_export(spec, changes)
    if small is not None:
        return small
    stderr = tempfile.TemporaryFile()  # noqa: SIM115 - owned by the TarStream
    proc = _spawn(["export"], stderr)
    # With 64 KiB the server would move the tar in 64 KiB reads, one thread hop each.
    _widen_pipe(proc.stdout)
    assert proc.stdin is not None
    try:
        proc.stdin.write(json.dumps(spec).encode() + b"\n")
        proc.stdin.close()
    except BrokenPipeError:
        pass  # the child died at start; read() reports why
    return TarStream(proc, stderr, f"exporting {root}")


def export_tree(root: str, idmap: IDMappings, *, whiteout_format: str = "aufs") -> TarStream:
    """The full tree of ``root`` as a layer tar (a Diff with no parent)."""
    return _start_export(root, idmap, whiteout_format, None)


def export_tree_if_small(root: str, idmap: IDMappings, *,
                         whiteout_format: str = "aufs") -> TarStream | None:
    """``export_tree`` if the tree is small enough to be made in memory, else None
    (nothing started): for a caller whose view of the tree only lasts this call."""
    spec = _export_spec(root, idmap, whiteout_format, None)
    if not os.path.isdir(root):
        raise NotFound(f"export: {root} is not a directory")
    return _small_export(spec, None)


def export_changes(root: str, changes: list[Change], idmap: IDMappings, *,
                   whiteout_format: str = "aufs") -> TarStream:
    """Docker ``ExportChanges``: changed paths of ``root``, deletions as ``.wh.`` entries."""
    ordered = sorted(changes, key=lambda c: os.fsencode(c.path))
    return _start_export(root, idmap, whiteout_format, ordered)


def apply_layer(root: str, stream: BinaryIO, options: ApplyOptions = ApplyOptions()) -> int:
    """Extract the uncompressed layer tar from ``stream`` into ``root``; return the sum of
    its header sizes.  ``stream`` is read to EOF whatever happens."""
    started = time.monotonic()
    try:
        if options.whiteout_format not in _WHITEOUT_FORMATS:
            raise InvalidArgument(f"unknown whiteout format {options.whiteout_format!r}")
        if not os.path.isdir(root):
            raise NotFound(f"apply layer: {root} is not a directory")
        size = _run_apply(root, stream, options)
    except BaseException:
        _drain(stream)
        log.warning("apply layer to %s failed after %.2fs", root, time.monotonic() - started)
        raise
    log.info("applied layer to %s: size %d in %.2fs", root, size, time.monotonic() - started)
    return size


def _helper_after() -> int:
    """When the apply worker brings in its file helper (``filehelper.py``): after this
    many small files; -1 never.  ``STRATA_APPLY_HELPER_AFTER`` overrides it (the
    test suites set 0 to run every extraction through the helper)."""
    value = os.environ.get("STRATA_APPLY_HELPER_AFTER", "")
    try:
        return int(value) if value else HELPER_AFTER
    except ValueError:
        log.warning("ignoring STRATA_APPLY_HELPER_AFTER=%r: not a number", value)
        return HELPER_AFTER


def _run_apply(root: str, stream: BinaryIO, options: ApplyOptions) -> int:
    spec = {"root": root, "idmap": options.idmap.to_json(),
            "whiteout_format": options.whiteout_format, "helper_after": _helper_after()}
    warm = _WARM.take()
    if warm is not None:
        return _run_warm_apply(warm, root, stream, spec)
    with tempfile.TemporaryFile() as stderr:
        proc = _spawn(["apply", json.dumps(spec)], stderr)
        _widen_pipe(proc.stdin)
        try:
            assert proc.stdin is not None
            _feed(proc.stdin, stream)
            assert proc.stdout is not None
            reply = proc.stdout.read()
            rc = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        lines = _relay_log(stderr)
    return _parse_apply_reply(root, reply, rc, lines)


def _run_warm_apply(warm: WarmWorker, root: str, stream: BinaryIO,
                    spec: dict[str, Any]) -> int:
    """``_run_apply`` by a warm worker (``warm.py``): the same job, the same reply."""
    reply = b""
    try:
        with tempfile.TemporaryFile() as stderr:
            tar_r, tar_w = os.pipe2(os.O_CLOEXEC)
            # A worker killed mid-job closes the tar's pipe: its missing reply, not
            # the broken pipe, is what the job's error then says.
            with contextlib.suppress(BrokenPipeError), open(tar_w, "wb") as pipe:
                try:
                    warm.send(spec, tar_r, stderr)
                finally:
                    os.close(tar_r)
                _widen_pipe(pipe)
                _feed(pipe, stream)
            reply = warm.reply()
            lines = _relay_log(stderr)
    finally:
        _WARM.give_back(warm, reusable=_stays(reply))
    return _parse_apply_reply(root, reply, warm.proc.poll() or 0, lines)


def _stays(reply: bytes) -> bool:
    """Did the warm worker say it takes another job?"""
    try:
        return bool(json.loads(reply).get("retire") is False)
    except (ValueError, AttributeError):
        return False


def _widen_pipe(pipe: IO[bytes] | None) -> None:
    """A 64 KiB pipe makes the copy ping-pong between processes; 1 MiB (the default
    /proc/sys/fs/pipe-max-size) lets each side move a whole chunk per wake-up."""
    if pipe is None:
        return
    # An unprivileged limit lower than 1 MiB: keep the default size.
    with contextlib.suppress(OSError):
        fcntl.fcntl(pipe.fileno(), _F_SETPIPE_SZ, _CHUNK)


def _feed(stdin: IO[bytes], stream: BinaryIO) -> None:
    """Copy ``stream`` into the child's stdin; after the child stops reading, keep
    draining ``stream`` so the sender always sees its body consumed.  A stream
    with ``pump`` (the server's request body) writes itself into the pipe from
    the event loop."""
    pump = getattr(stream, "pump", None)
    if pump is not None:
        pump(stdin.fileno())
    else:
        child_reading = True
        while chunk := stream.read(_CHUNK):
            if child_reading:
                try:
                    stdin.write(chunk)
                except BrokenPipeError:
                    child_reading = False
    with contextlib.suppress(BrokenPipeError):
        stdin.close()


def _drain(stream: BinaryIO) -> None:
    try:
        while stream.read(_CHUNK):
            pass
    except Exception as exc:
        log.debug("draining the layer stream stopped: %s", exc)


def _parse_apply_reply(root: str, reply: bytes, rc: int, lines: list[str]) -> int:
    try:
        result = json.loads(reply)
    except ValueError:
        detail = lines[-1] if lines else f"exit status {rc}"
        raise StrataError(f"apply layer to {root}: worker failed: {detail}") from None
    if "error" in result:
        raise _ERROR_KINDS.get(result.get("kind", ""), StrataError)(result["error"])
    return int(result["size"])


__all__ = ["ApplyOptions", "Change", "ChangeKind", "MemoryTarStream", "TarStream", "apply_layer",
           "export_changes", "export_tree"]
