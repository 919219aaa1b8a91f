"""The export worker's job: a tree or a change list as a layer tar on its stdout.

GNU tar's cost per entry is its syscalls (lstat, llistxattr, open, read,
close); we make the same ones plus the Python around them, so on a layer of
small files one process cannot keep up with it (``tests/bench/bench_archive.py``
measures both).  Two can: this process (the *leader*)
starts alone and, once a layer proves big and made of small entries, forks a
*helper* that renders part of the entries into a pipe of its own, which the
leader splices into the output in order.

* The leader walks the tree and cuts the entries, in walk order, into chunks
  of ``CHUNK_ENTRIES``.  It writes the first ``FORK_MIN_ENTRIES`` alone, forks
  only when at least two more chunks follow (a small Diff never pays for a
  fork), and keeps going alone while the entries are big (``HELPER_MAX_BYTES``).
* With a helper, chunks alternate: the leader renders its own straight into
  the output, and splices the helper's from the helper's pipe (page references,
  no copy).  The helper gets its chunks ``HELPER_AHEAD`` ahead and never waits
  for the leader but on a full pipe, so a hiccup on either side costs little.
* The helper leaves to the leader what it cannot write alone: a multiply-linked
  entry (its second and later paths must name the first one in *stream* order,
  which only the leader sees) and a body big enough for ``sendfile`` (which the
  leader sends straight into the output).  So the output is byte-identical to
  one process's, and the leader's tally of bytes gives the final padding.

The two talk over a socketpair.  To the helper: ``c`` (a chunk of names), ``q``
(no more).  To the leader, in stream order: ``b`` (the next N bytes of the pipe
are the tar's), ``l`` (the leader writes this name itself), ``e`` (end of the
chunk), ``x`` (the helper failed: why).  The helper dies with the leader
(``PR_SET_PDEATHSIG``), and the leader kills it on any error, so no process
outlives the export.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import fcntl
import gc
import logging
import marshal
import os
import signal
import socket
import stat
import struct
import traceback
from collections.abc import Iterable, Iterator
from itertools import chain, islice
from operator import attrgetter
from typing import IO, Any

from plugin.archive.tar.writer import SENDFILE_MIN, LayerWriter, Output
from plugin.errors import StrataError
from plugin.idtools import IDMappings

log = logging.getLogger("strata.archive")

#: Entries per chunk: each chunk costs the leader a few messages and syscalls,
#: small next to rendering this many small files.
CHUNK_ENTRIES = 128
#: The leader writes this many entries alone before it considers a helper.
FORK_MIN_ENTRIES = CHUNK_ENTRIES
#: A helper is forked only while the last two chunks averaged less than this per
#: entry: past it the cost is in moving bytes, and the reader of the pipe (the
#: plugin, its client) needs the second core.  Through the plugin, a helper made
#: Diff of files of a few KiB faster and of tens of KiB slower (measure with
#: ``tests/bench/bench_archive.py`` and ``bench_protocol.py``).
HELPER_MAX_BYTES = 8 << 10
#: Chunks the helper is given beyond the one the leader splices next.
HELPER_AHEAD = 6
#: A chunk is cut short when its message would pass this size, or its share of
#: the socketpair's buffer: the chunks the helper has not read yet (``HELPER_AHEAD``
#: of them) must fit in it, or the leader could block sending while the helper
#: blocks on a pipe only the leader drains.
CHUNK_MESSAGE_BYTES = 24 << 10
#: The helper's pipe: how far it may run ahead of the leader.
HELPER_PIPE_BYTES = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_PR_SET_PDEATHSIG = 1
_LENGTH = struct.Struct("<I")
_entry_name = attrgetter("name")

#: Names relative to the root; a whiteout of a name is the name after this (no path
#: holds a NUL).
WHITEOUT = "\0"
Chunk = list[str]


def export_layer(spec: dict[str, Any], out: IO[bytes]) -> None:
    """Write the layer tar the ``export`` worker's spec asks for to ``out``."""
    _export(spec, Output(out), may_fork=True)


class _TooBig(Exception):
    """An in-memory export passed its bound."""


class _MemoryOutput(Output):
    """An Output that keeps what is written (no descriptor, no ``sendfile``), up to
    ``limit`` bytes of file bodies and headers (``_TooBig`` before a body that
    would pass it is read)."""

    def __init__(self, limit: int) -> None:
        super().__init__(-1)
        self.sendfile_min = 1 << 62
        self.flush_at = 1 << 62  # everything stays in _parts
        self.limit = limit

    def write_file(self, header: bytes, src_fd: int, size: int, path: str) -> None:
        if self.offset + size > self.limit:
            raise _TooBig(path)
        super().write_file(header, src_fd, size, path)

    def flush(self) -> None:
        pass

    def data(self) -> bytes:
        return b"".join(self._parts)


def export_to_memory(spec: dict[str, Any], *, max_entries: int = 1 << 62,
                     max_bytes: int = 1 << 62) -> bytes | None:
    """The layer tar of ``spec`` (as for ``export_layer``), made by the calling thread and
    held in memory; None (nothing kept) for a tree of more than ``max_entries``
    entries, or when the tar would pass ``max_bytes`` (checked before each file's
    body is read).  Never forks (the caller may be a thread of the multi-threaded
    plugin)."""
    names = None
    if spec["changes"] is None:
        # Names only (no stat) decide the first bound before anything is read.
        names = next(walk_names(spec["root"], max_entries + 1), [])
        if len(names) > max_entries:
            return None
    out = _MemoryOutput(max_bytes)
    try:
        _export(spec, out, may_fork=False, names=names)
    except _TooBig:
        return None
    return out.data()


def _export(spec: dict[str, Any], out: Output, *, may_fork: bool,
            names: Chunk | None = None) -> None:
    """``names``: the whole tree's names in walk order, when the caller has them."""
    root: str = spec["root"]
    prefix = root if root.endswith("/") else root + "/"
    changes: list[list[Any]] | None = spec["changes"]
    chunks: Iterator[Chunk]
    if names is not None:
        chunks = iter([names] if names else [])
    elif changes is None:
        chunks = walk_names(root, CHUNK_ENTRIES)
    else:
        chunks = _chunked(_change_items(changes), CHUNK_ENTRIES)
    writer = _ChunkWriter(out, IDMappings.from_json(spec["idmap"]),
                          spec["whiteout_format"], prefix)
    recent: collections.deque[tuple[int, int]] = collections.deque(maxlen=2)
    entries = 0
    try:
        for chunk in chunks:
            recent.append((len(chunk), writer.render(chunk)))
            entries += len(chunk)
            if (may_fork and entries >= FORK_MIN_ENTRIES and _small_entries(recent)
                    and _cpus() >= 2):
                # Only worth a fork with at least two more chunks to share.
                ahead = list(islice(chunks, 2))
                if len(ahead) == 2:
                    _Leader(writer).run(chain(ahead, chunks))
                    break
                for chunk in ahead:
                    writer.render(chunk)
        writer.close()
    finally:
        writer.close_dirs()


def _bounded(chunks: Iterable[Chunk], limit: int) -> Iterator[Chunk]:
    """The same names, each chunk's message at most ``limit`` bytes (or one name)."""
    for chunk in chunks:
        if len(chunk) == 1 or len(marshal.dumps(("c", chunk))) <= limit:
            yield chunk
        else:
            half = len(chunk) // 2
            yield from _bounded((chunk[:half], chunk[half:]), limit)


def _small_entries(recent: Iterable[tuple[int, int]]) -> bool:
    entries = sum(n for n, _ in recent)
    return sum(size for _, size in recent) < HELPER_MAX_BYTES * entries


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except OSError:
        return os.cpu_count() or 1


def _change_items(changes: list[list[Any]]) -> Iterator[str]:
    for path, kind in changes:
        name = os.path.normpath(path).lstrip("/")
        if not name or name == "." or name.startswith("../"):
            log.warning("skipping change with invalid path %r", path)
        else:
            yield WHITEOUT + name if kind == 2 else name


def _chunked(items: Iterable[str], size: int) -> Iterator[Chunk]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def walk_names(root: str, batch: int) -> Iterator[list[str]]:
    """The relative names of everything under root in ``filepath.Walk`` order (depth
    first, each directory's names sorted by their bytes, root itself omitted), in
    lists of ``batch``: one loop, no generator per entry."""
    stack: list[tuple[Iterator[os.DirEntry[str]], str]] = [(_sorted_entries(root), "")]
    names: list[str] = []
    while stack:
        entries, prefix = stack[-1]
        for entry in entries:
            name = prefix + entry.name
            names.append(name)
            if entry.is_dir(follow_symlinks=False):
                stack.append((_sorted_entries(entry.path), name + "/"))
                break
            if len(names) == batch:
                break  # and resume this directory after the yield
        else:
            stack.pop()
        if len(names) == batch:
            yield names
            names = []
    if names:
        yield names


def _sorted_entries(directory: str) -> Iterator[os.DirEntry[str]]:
    try:
        with os.scandir(directory) as it:
            entries = list(it)
    except OSError as exc:
        log.warning("can't list %s: %s", directory, exc.strerror or exc)
        return iter(())
    # ASCII names sort the same as str and as bytes; others (undecodable bytes are
    # surrogates in str) need their bytes.
    if "".join([entry.name for entry in entries]).isascii():
        entries.sort(key=_entry_name)
    else:
        entries.sort(key=lambda entry: os.fsencode(entry.name))
    return iter(entries)


def _render(writer: LayerWriter, prefix: str, chunk: Chunk) -> None:
    add_path = writer.add_path
    for name in chunk:
        if name[0] == WHITEOUT:
            writer.add_whiteout(name[1:])
        else:
            add_path(prefix + name, name)


class _HelperFailed(StrataError):
    """The helper reported an error or vanished."""


class _Channel:
    """Length-prefixed marshal messages over a stream socket."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._file = sock.makefile("rb")

    def send(self, *message: Any) -> None:
        data = marshal.dumps(message)
        try:
            self._sock.sendall(_LENGTH.pack(len(data)) + data)
        except OSError:
            # The other end is gone: raise what it said before it went (if anything).
            while True:
                self.recv()

    def recv(self) -> tuple[Any, ...]:
        head = self._file.read(_LENGTH.size)
        if len(head) < _LENGTH.size:
            raise _HelperFailed("export helper exited without a word")
        message = tuple(marshal.loads(self._file.read(_LENGTH.unpack(head)[0])))
        if message[0] == "x":
            if message[1] == "pipe":
                raise BrokenPipeError(message[2])
            raise _HelperFailed(message[2])
        return message

    def close(self) -> None:
        self._file.close()
        self._sock.close()


class _ChunkWriter(LayerWriter):
    """A LayerWriter fed chunk by chunk; the helper's also hands entries back."""

    def __init__(self, out: Output, idmap: IDMappings, fmt: str, prefix: str) -> None:
        super().__init__(out, idmap, fmt)
        self.out = out
        self._prefix = prefix
        self._channel: _Channel | None = None

    def render(self, chunk: Chunk) -> int:
        """Write ``chunk``; returns the bytes it took."""
        start = self.out.offset
        _render(self, self._prefix, chunk)
        self.out.flush()
        return self.out.offset - start

    def become_helper(self, channel: _Channel, pipe: int) -> None:
        """In the forked helper: write to ``pipe``, announcing every write."""
        self._channel = channel
        self.out = self._out = Output(pipe)
        self.out.announce = self._announce
        self.out.sendfile_min = 1 << 62  # big bodies are delegated: never sendfile here
        self._delegates = True

    def add_delegated(self, name: str) -> None:
        """In the leader: write an entry the helper handed back."""
        self.add_path(self._prefix + name, name)

    def _announce(self, size: int) -> None:
        assert self._channel is not None
        self._channel.send("b", size)

    def _delegate(self, name: str, st: os.stat_result) -> bool:
        mode = st.st_mode
        if (st.st_nlink > 1 and not stat.S_ISDIR(mode)) or (
                stat.S_ISREG(mode) and st.st_size >= SENDFILE_MIN):
            assert self._channel is not None
            self.out.flush()
            self._channel.send("l", name)
            return True
        return False


class _Leader:
    """Forks the helper, then writes the chunks in order: its own, and the helper's
    from the helper's pipe."""

    def __init__(self, writer: _ChunkWriter) -> None:
        self._writer = writer

    def run(self, chunks: Iterator[Chunk]) -> None:
        ours, theirs = socket.socketpair()
        # SO_SNDBUF counts the kernel's overhead too (208 KiB hold 180 KiB of 4 KiB
        # messages): half of it is payload with room to spare.
        room = ours.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 2
        chunks = _bounded(chunks, min(CHUNK_MESSAGE_BYTES, room // HELPER_AHEAD))
        pipe_r, pipe_w = os.pipe()
        # A lower pipe-max-size: the helper runs less far ahead.
        with contextlib.suppress(OSError):
            fcntl.fcntl(pipe_w, _F_SETPIPE_SZ, HELPER_PIPE_BYTES)
        leader = os.getpid()
        # Neither process's collector will touch (and so copy) the objects they share.
        gc.freeze()
        pid = os.fork()
        if pid == 0:
            ours.close()
            os.close(pipe_r)
            _helper_main(theirs, pipe_w, leader, self._writer)
        theirs.close()
        os.close(pipe_w)
        channel = _Channel(ours)
        try:
            self._lead(channel, pipe_r, chunks)
        except BaseException:
            _kill(pid)
            raise
        finally:
            channel.close()
            os.close(pipe_r)
        _, status = os.waitpid(pid, 0)
        if status != 0:
            raise StrataError(f"export helper ended with status {status:#x}")

    def _lead(self, channel: _Channel, pipe: int, chunks: Iterator[Chunk]) -> None:
        writer = self._writer
        # Stream order of the chunks walked but not written: ours, or None for the
        # helper's.  Chunks alternate, ours first, so the helper starts at once.
        order: collections.deque[Chunk | None] = collections.deque()
        helpers_pending = 0
        ours_next = True
        walking = True
        while True:
            while walking and helpers_pending < HELPER_AHEAD:
                chunk = next(chunks, None)
                if chunk is None:
                    walking = False
                elif ours_next:
                    order.append(chunk)
                else:
                    channel.send("c", chunk)
                    order.append(None)
                    helpers_pending += 1
                ours_next = not ours_next
            if not order:
                break
            chunk = order.popleft()
            if chunk is not None:
                writer.render(chunk)
            else:
                self._copy_helper_chunk(channel, pipe)
                helpers_pending -= 1
        channel.send("q")

    def _copy_helper_chunk(self, channel: _Channel, pipe: int) -> None:
        writer = self._writer
        while (message := channel.recv())[0] != "e":
            if message[0] == "b":
                writer.out.splice_from(pipe, message[1])
            else:
                writer.add_delegated(message[1])


def _helper_main(sock: socket.socket, pipe: int, leader: int, writer: _ChunkWriter) -> None:
    """The forked helper: render the chunks it is sent into ``pipe``; never returns.
    ``writer`` is the leader's, as it was at the fork (its names, directories)."""
    code = 1
    channel: _Channel | None = None
    try:
        _die_with_parent(leader)
        channel = _Channel(sock)
        writer.become_helper(channel, pipe)
        while (message := channel.recv())[0] == "c":
            writer.render(message[1])
            channel.send("e")
        code = 0
    except BrokenPipeError as exc:
        _report(channel, "pipe", str(exc))
    except (StrataError, OSError, ValueError, KeyError) as exc:
        _report(channel, "error", str(exc))
    except BaseException as exc:
        os.write(2, traceback.format_exc().encode())
        _report(channel, "error", f"export helper: {exc!r}")
    finally:
        os._exit(code)


def _report(channel: _Channel | None, kind: str, message: str) -> None:
    if channel is not None:
        with contextlib.suppress(OSError, StrataError):  # the leader is gone too
            channel.send("x", kind, message)


def _die_with_parent(leader: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != leader:
        os._exit(1)  # the leader died before the signal was armed


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
