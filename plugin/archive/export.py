"""The export worker's job: a tree or a change list as a layer tar on its stdout.

GNU tar needs ~8 µs of syscalls per entry (lstat, llistxattr, open, read,
close) and we need the same plus ~4 µs of Python, so on a layer of small files
one process cannot keep up with it.  Two can: this process (the *leader*)
starts alone and, once a layer proves big and made of small entries, forks a
*helper*, and from then on the two take turns on the same pipe.

* The leader walks the tree and cuts the entries, in walk order, into chunks
  of ``CHUNK_ENTRIES``.  It writes the first ``FORK_MIN_ENTRIES`` alone, forks
  only when at least two more chunks follow (a small Diff never pays for a
  fork), and keeps going alone while the entries are big (``HELPER_MAX_BYTES``).
* With a helper, even chunks are the leader's and odd ones the helper's.
  Each process renders its chunk into memory (up to ``AHEAD_BYTES``) while the
  other one writes, then waits for its *turn*, writes, and passes the turn on.
  Bodies big enough for ``sendfile`` go out only while holding the turn.
* Hardlinks: the second and later paths of an inode must name the first path
  in *stream* order, which the renderer of a chunk cannot know before its turn.
  So a multiply-linked entry met before the turn is put aside and emitted once
  the turn arrives; the turn message carries the inodes the other process sent
  first since, so both know every inode that went out before them.
* The turn message also carries the stream offset, which the leader needs for
  the archive's final padding.  The output is byte-identical to one process's.

The two talk over a socketpair: ``c`` (a chunk of names), ``t``
(the turn: offset, new inodes), ``e`` (no more chunks), ``x`` (the helper
failed: why).  The helper dies with the leader (``PR_SET_PDEATHSIG``), and the
leader kills it on any error, so no process outlives the export.
"""

from __future__ import annotations

import collections
import ctypes
import gc
import logging
import marshal
import os
import signal
import socket
import struct
import traceback
from collections.abc import Iterable, Iterator
from itertools import chain, islice
from typing import IO, Any

from plugin.archive.ustar import Header
from plugin.archive.writer import LayerWriter, Output, walk_names
from plugin.errors import StrataError
from plugin.idtools import IDMappings

log = logging.getLogger("strata.archive")

#: Entries per chunk: a turn costs two context switches (~20-50 µs on the project
#: VM), a few percent of rendering 128 small files (~1.5 ms).
CHUNK_ENTRIES = 128
#: The leader writes this many entries alone before it considers a helper.
FORK_MIN_ENTRIES = CHUNK_ENTRIES
#: A helper is forked only while the last two chunks averaged less than this per
#: entry: past it the cost is in moving bytes, and the reader of the pipe (the
#: plugin, its client) needs the second core.  Diff through the plugin, helper vs
#: none: 5000 files of 2 KiB 55 vs 74 ms, of 8 KiB 92 vs 98 ms, of 24 KiB 114 vs
#: 74 ms; /usr/lib/python3.11 (36 KiB per entry) 70 vs 52 ms.
HELPER_MAX_BYTES = 8 << 10
#: What a process may render ahead of its turn; with the 1 MiB pipe this bounds
#: the export's memory to a few MiB.
AHEAD_BYTES = 4 << 20
#: While rendering ahead, bodies up to this size are read into memory rather
#: than sent by ``sendfile`` (which must wait for the turn).
AHEAD_SENDFILE_MIN = 256 << 10
_PR_SET_PDEATHSIG = 1
_LENGTH = struct.Struct("<I")

#: Names relative to the root; a whiteout of a name is the name after this (no path
#: holds a NUL).
WHITEOUT = "\0"
Chunk = list[str]


def export_layer(spec: dict[str, Any], out: IO[bytes]) -> None:
    """Write the layer tar the ``export`` worker's spec asks for to ``out``."""
    root: str = spec["root"]
    prefix = root if root.endswith("/") else root + "/"
    changes: list[list[Any]] | None = spec["changes"]
    chunks = (walk_names(root, CHUNK_ENTRIES) if changes is None
              else _chunked(_change_items(changes), CHUNK_ENTRIES))
    out.flush()
    writer = _TurnWriter(out.fileno(), IDMappings.from_json(spec["idmap"]),
                         spec["whiteout_format"], prefix)
    recent: collections.deque[tuple[int, int]] = collections.deque(maxlen=2)
    entries = 0
    try:
        for chunk in chunks:
            recent.append((len(chunk), writer.render(chunk, have_turn=True)))
            entries += len(chunk)
            if entries >= FORK_MIN_ENTRIES and _small_entries(recent) and _cpus() >= 2:
                # Only worth a fork with at least two more chunks to share.
                ahead = list(islice(chunks, 2))
                if len(ahead) == 2:
                    _Leader(writer).run(chain(ahead, chunks))
                    return
                for chunk in ahead:
                    writer.render(chunk, have_turn=True)
        writer.close()
    finally:
        writer.close_dirs()


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
    """Length-prefixed marshal messages over a stream socket; ``recv`` picks the next
    message of the kinds asked for and keeps the others, in order, for later."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._file = sock.makefile("rb")
        self._queued: collections.deque[tuple[Any, ...]] = collections.deque()

    def send(self, *message: Any) -> None:
        data = marshal.dumps(message)
        try:
            self._sock.sendall(_LENGTH.pack(len(data)) + data)
        except OSError:
            # The other end is gone: raise what it said before it went (if anything).
            self.recv("")
            raise

    def recv(self, kinds: str) -> tuple[Any, ...]:
        for message in self._queued:
            if message[0] in kinds:
                self._queued.remove(message)
                return message
        while True:
            message = self._read()
            if message[0] == "x":
                if message[1] == "pipe":
                    raise BrokenPipeError(message[2])
                raise _HelperFailed(message[2])
            if message[0] in kinds:
                return message
            self._queued.append(message)

    def _read(self) -> tuple[Any, ...]:
        head = self._file.read(_LENGTH.size)
        if len(head) < _LENGTH.size:
            raise _HelperFailed("export helper exited without a word")
        data = self._file.read(_LENGTH.unpack(head)[0])
        return tuple(marshal.loads(data))

    def close(self) -> None:
        self._file.close()
        self._sock.close()


class _TurnWriter(LayerWriter):
    """A LayerWriter that renders chunks ahead and writes them when its turn comes.
    Without a channel (no helper yet) it always has the turn."""

    def __init__(self, fd: int, idmap: IDMappings, fmt: str, prefix: str) -> None:
        self._turn_out = Output(fd)
        super().__init__(self._turn_out, idmap, fmt)
        self._prefix = prefix
        self._channel: _Channel | None = None
        self._flush_at = self._turn_out.flush_at
        self._sendfile_min = self._turn_out.sendfile_min
        #: Multiply-linked entries met before the turn, with where they go in the buffer.
        self._deferred: list[tuple[int, str, str, os.stat_result, Header]] = []
        #: Inodes that first went out since we last passed the turn.
        self._new_links: list[tuple[int, int, str]] = []
        #: Where the stream stood after the last chunk we wrote or heard of.
        self._stream_offset = 0

    def attach(self, channel: _Channel) -> None:
        """Start taking turns (just after the fork: both sides know the same inodes)."""
        self._channel = channel
        self._new_links = []

    def render(self, chunk: Chunk, have_turn: bool) -> int:
        """Write ``chunk``: into memory until the turn comes (unless we have it).
        Returns the bytes it took."""
        out = self._turn_out
        start = out.offset
        if not have_turn:
            out.gate, out.flush_at, out.sendfile_min = (self._take_turn, AHEAD_BYTES,
                                                        AHEAD_SENDFILE_MIN)
        _render(self, self._prefix, chunk)
        out.flush()
        written = out.offset - start
        self._stream_offset += written
        return written

    def pass_turn(self) -> None:
        assert self._channel is not None
        self._channel.send("t", self._stream_offset, self._new_links)
        self._new_links = []

    def wait_turn(self) -> None:
        """Take the turn without a chunk to write (the other process wrote the last)."""
        self._take_turn()

    def close(self) -> None:
        self._turn_out.offset = self._stream_offset
        super().close()

    def _take_turn(self) -> None:
        assert self._channel is not None
        _, offset, links = self._channel.recv("t")
        for dev, ino, name in links:
            self._seen_inodes.setdefault((dev, ino), name)
        self._stream_offset = offset
        out = self._turn_out
        out.gate, out.flush_at, out.sendfile_min = None, self._flush_at, self._sendfile_min
        if self._deferred:
            deferred, self._deferred = self._deferred, []
            held = out.take_held()
            start = 0
            for position, path, name, st, info in deferred:
                out.write(held[start:position])
                start = position
                self._emit_deferred(path, name, st, info)
            out.write(held[start:])

    def _defer(self, path: str, name: str, st: os.stat_result, info: Header) -> bool:
        if self._turn_out.gate is None:
            return False  # our turn: every earlier inode is known
        self._deferred.append((self._turn_out.held, path, name, st, info))
        return True

    def _first_path(self, inode: tuple[int, int], name: str) -> str:
        first = self._seen_inodes.get(inode)
        if first is None:
            self._seen_inodes[inode] = name
            if self._channel is not None:
                self._new_links.append((inode[0], inode[1], name))
            return name
        return first


class _Leader:
    """Forks the helper, then renders the even chunks and feeds it the odd ones."""

    def __init__(self, writer: _TurnWriter) -> None:
        self._writer = writer

    def run(self, chunks: Iterator[Chunk]) -> None:
        ours, theirs = socket.socketpair()
        leader = os.getpid()
        # Neither process's collector will touch (and so copy) the objects they share.
        gc.freeze()
        pid = os.fork()
        if pid == 0:
            ours.close()
            _helper_main(theirs, leader, self._writer)
        theirs.close()
        channel = _Channel(ours)
        try:
            self._writer.attach(channel)
            self._lead(channel, self._writer, chunks)
        except BaseException:
            _kill(pid)
            raise
        finally:
            channel.close()
        _, status = os.waitpid(pid, 0)
        if status != 0:
            raise StrataError(f"export helper ended with status {status:#x}")

    @staticmethod
    def _lead(channel: _Channel, writer: _TurnWriter, chunks: Iterator[Chunk]) -> None:
        mine: collections.deque[Chunk] = collections.deque()
        pulled = 0  # chunks taken from the walk; chunk k is ours when k is even
        walking = True
        rendered = 0  # so our next chunk is number 2 * rendered
        while True:
            # Before rendering chunk 2r, the helper gets 2r + 1 and 2r + 3: it
            # renders the next one while it waits for its turn to write this one.
            while walking and pulled < 2 * rendered + 4:
                chunk = next(chunks, None)
                if chunk is None:
                    walking = False
                    channel.send("e")
                    break
                if pulled % 2 == 0:
                    mine.append(chunk)
                else:
                    channel.send("c", chunk)
                pulled += 1
            if not mine:
                break
            writer.render(mine.popleft(), have_turn=rendered == 0)
            rendered += 1
            if pulled > 2 * rendered - 1:
                writer.pass_turn()  # to the helper, for chunk 2 * rendered - 1
        if pulled % 2 == 0:
            writer.wait_turn()  # the helper wrote the last chunk
        writer.close()


def _helper_main(sock: socket.socket, leader: int, writer: _TurnWriter) -> None:
    """The forked helper: render the chunks it is sent, in turn; never returns.
    ``writer`` is the leader's, as it was at the fork (its inodes, names, dirs)."""
    code = 1
    channel: _Channel | None = None
    try:
        _die_with_parent(leader)
        channel = _Channel(sock)
        writer.attach(channel)
        while (message := channel.recv("ce"))[0] == "c":
            writer.render(message[1], have_turn=False)
            writer.pass_turn()
        code = 0
    except BrokenPipeError as exc:
        _report(channel, "pipe", str(exc))
    except (StrataError, OSError, ValueError, KeyError) as exc:
        _report(channel, "error", str(exc))
    except BaseException as exc:  # noqa: BLE001 - the leader must hear of it
        os.write(2, traceback.format_exc().encode())
        _report(channel, "error", f"export helper: {exc!r}")
    finally:
        os._exit(code)


def _report(channel: _Channel | None, kind: str, message: str) -> None:
    if channel is not None:
        try:
            channel.send("x", kind, message)
        except (OSError, StrataError):
            pass  # the leader is gone too


def _die_with_parent(leader: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != leader:
        os._exit(1)  # the leader died before the signal was armed


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)
