"""A second process that creates small regular files for the extractor.

GNU tar's cost per small file is its six syscalls; the extractor makes the
same ones and adds its Python per entry, and one process cannot use the
machine's second core.  So the extractor (``extract.py``, "A") forks this
helper ("B") inside its chroot and hands it whole small files — path, owner,
mode, times, xattrs and body, packed in one record — over a pipe, while it
goes on parsing the stream and creating everything else itself.

B only ever *creates a regular file where nothing, or a non-directory, is*.
A keeps that safe by never touching a path B may still be working on: it
keeps the set of paths handed over since the last *sync*, and syncs (waits
for B to finish everything sent) before it creates, replaces or removes any
of them, before it creates a directory above one, before any removal, and at
the end.  A directory in B's way (its path must be cleared recursively) stops
B: it skips the rest until the sync, and A replays the skipped files itself,
in order.  Any other error stops B the same way and is reported for the
entry it happened on, so the caller sees the error a sequential extraction
would have raised.

Records A → B: ``_FILE`` header + path + xattrs + body, or a bare ``_SYNC`` /
``_END`` header.  B answers each sync with ``_REPLY`` + message: the index
(since the previous sync) of the file it stopped at or -1, the errno (0 = a
directory in the way) and the count of xattrs the filesystem refused.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import struct
from collections.abc import Iterator

# kind, uid, gid, mode, atime_ns, mtime_ns, len(path), len(xattrs), len(body)
_HEADER = struct.Struct("<BIIIqqIII")
_XATTR = struct.Struct("<HI")
_REPLY = struct.Struct("<iiII")  # index, errno, ignored xattrs, len(message)
_FILE, _SYNC, _END = 1, 2, 3
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_IGNORED_XATTR_ERRNOS = (errno.ENOTSUP, errno.EPERM)
_READ_SIZE = 1 << 16
#: A keeps at most this much unsent; beyond it A creates files itself (B is behind).
_PENDING_LIMIT = 16 << 10
#: ... and sends once this much is queued (one write per batch, not per file).
_SEND_AT = 4 << 10


class HelperFailed(Exception):
    """B stopped at file ``index`` (since the last sync) with ``error``; None when a
    directory was in the way (A replays from there)."""

    def __init__(self, index: int, error: OSError | None) -> None:
        super().__init__(index, error)
        self.index = index
        self.error = error


class FileHelper:
    """A's end: queue files, sync, stop.  Not thread-safe (one extractor)."""

    def __init__(self, close_in_child: tuple[int, ...] = ()) -> None:
        """``close_in_child``: A's descriptors B must not hold (the tar pipe: a writer
        must see EPIPE, not block, once A is gone)."""
        to_b_r, to_b_w = os.pipe2(os.O_CLOEXEC)
        to_a_r, to_a_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:  # B
            code = 1
            try:
                for fd in (to_b_w, to_a_r, *close_in_child):
                    os.close(fd)
                _serve(to_b_r, to_a_w)
                code = 0
            finally:
                os._exit(code)
        os.close(to_b_r)
        os.close(to_a_w)
        os.set_blocking(to_b_w, False)
        self.pid = pid
        self._out = to_b_w
        self._in = to_a_r
        self._pending = bytearray()
        self.ignored_xattrs = 0

    # -- queueing --------------------------------------------------------------
    def has_room(self) -> bool:
        if len(self._pending) < _PENDING_LIMIT:
            return True
        self._send_some()
        return len(self._pending) < _PENDING_LIMIT

    def add(self, path: bytes, uid: int, gid: int, mode: int, atime_ns: int, mtime_ns: int,
            xattrs: list[tuple[str, bytes]], body: bytes) -> None:
        packed = b"".join(_XATTR.pack(len(n), len(v)) + n + v
                          for n, v in ((os.fsencode(n), v) for n, v in xattrs)) if xattrs else b""
        pending = self._pending
        pending += _HEADER.pack(_FILE, uid, gid, mode, atime_ns, mtime_ns, len(path),
                                len(packed), len(body))
        pending += path
        if packed:
            pending += packed
        pending += body
        if len(pending) >= _SEND_AT:
            self._send_some()

    def _send_some(self) -> None:
        try:
            written = os.write(self._out, self._pending)
        except BlockingIOError:
            return
        del self._pending[:written]

    def _send_all(self) -> None:
        os.set_blocking(self._out, True)
        try:
            view = memoryview(self._pending)
            while view:
                view = view[os.write(self._out, view):]
            view.release()
            self._pending.clear()
        finally:
            os.set_blocking(self._out, False)

    # -- syncing -----------------------------------------------------------------
    def sync(self, last: bool = False) -> None:
        """Wait until B has handled everything queued; raise HelperFailed if it stopped."""
        self._pending += _HEADER.pack(_END if last else _SYNC, 0, 0, 0, 0, 0, 0, 0, 0)
        self._send_all()
        head = _read_exactly(self._in, _REPLY.size)
        index, code, ignored, length = _REPLY.unpack(head)
        message = _read_exactly(self._in, length).decode("utf-8", "replace")
        self.ignored_xattrs += ignored
        if last:
            self._reap()
        if index >= 0:
            raise HelperFailed(index, OSError(code, message) if code else None)

    def stop(self) -> None:
        """End B without waiting for its work (A is failing anyway)."""
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, 9)
            self._reap()

    def _reap(self) -> None:
        for fd in (self._out, self._in):
            with contextlib.suppress(OSError):
                os.close(fd)
        if self.pid:
            os.waitpid(self.pid, 0)
            self.pid = 0


def _read_exactly(fd: int, n: int) -> bytes:
    parts = []
    while n:
        chunk = os.read(fd, n)
        if not chunk:
            raise OSError(errno.EPIPE, "the file helper process ended unexpectedly")
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


# -- B ---------------------------------------------------------------------------

class _DirectoryInTheWay(Exception):
    pass


def _serve(rfd: int, wfd: int) -> None:
    buf = bytearray()
    index, stopped, ignored = 0, None, 0  # stopped: (index, errno, message)
    while True:
        chunk = os.read(rfd, _READ_SIZE)
        if not chunk:
            return  # A went away
        buf += chunk
        view = memoryview(buf)
        pos, end = 0, len(buf)
        try:
            while end - pos >= _HEADER.size:
                (kind, uid, gid, mode, atime, mtime,
                 plen, xlen, blen) = _HEADER.unpack_from(view, pos)
                start = pos + _HEADER.size
                stop = start + plen + xlen + blen
                if stop > end:
                    break
                if kind == _FILE:
                    if stopped is None:
                        try:
                            ignored += _create(bytes(view[start:start + plen]), uid, gid, mode,
                                               atime, mtime, view[start + plen:start + plen + xlen],
                                               view[start + plen + xlen:stop])
                        except _DirectoryInTheWay:
                            stopped = (index, 0, "")
                        except OSError as exc:
                            stopped = (index, exc.errno or errno.EIO, exc.strerror or str(exc))
                    index += 1
                else:
                    at, code, message = stopped if stopped is not None else (-1, 0, "")
                    text = message.encode()
                    os.write(wfd, _REPLY.pack(at, code, ignored, len(text)) + text)
                    index, stopped, ignored = 0, None, 0
                    if kind == _END:
                        return
                pos = stop
        finally:
            view.release()
        del buf[:pos]


def _create(path: bytes, uid: int, gid: int, mode: int, atime_ns: int, mtime_ns: int,
            xattrs: memoryview, body: memoryview) -> int:
    """The extractor's ``_regular`` for a body already in memory; returns the number of
    xattrs the filesystem refused."""
    try:
        fd = os.open(path, _CREATE_FLAGS, 0o600)
    except FileExistsError:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            raise _DirectoryInTheWay from None
        os.unlink(path)
        fd = os.open(path, _CREATE_FLAGS, 0o600)
    ignored = 0
    try:
        while body:
            body = body[os.write(fd, body):]
        os.fchown(fd, uid, gid)
        for name, value in _xattrs(xattrs):
            try:
                os.setxattr(fd, name, value)
            except OSError as exc:
                if exc.errno not in _IGNORED_XATTR_ERRNOS:
                    raise
                ignored += 1
        os.fchmod(fd, mode)
        os.utime(fd, ns=(atime_ns, mtime_ns))
    finally:
        os.close(fd)
    return ignored


def _xattrs(packed: memoryview) -> Iterator[tuple[bytes, bytes]]:
    pos = 0
    while pos < len(packed):
        nlen, vlen = _XATTR.unpack_from(packed, pos)
        pos += _XATTR.size
        yield bytes(packed[pos:pos + nlen]), bytes(packed[pos + nlen:pos + nlen + vlen])
        pos += nlen + vlen
