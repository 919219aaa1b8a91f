"""Write layer tars the way docker's ``tarAppender.addTarFile`` does (docs/protocol.md §6.3).

Runs in the export worker (``proc/export.py``: the worker writing to its stdout, and
the helper it may fork writing to a pipe of its own).  Entries are relative,
directories end in ``/``, mtimes are whole seconds, the mode field carries the
file type bits, owners are numeric and mapped host -> container.  Unlike docker
(which keeps only ``security.capability``), every xattr is exported except the
overlay driver's own ``trusted.overlay.*`` bookkeeping, so a layer round-trips.

An entry that cannot be read (vanished while a container runs, a socket) is
logged and skipped, as docker does; only a failure to write the stream aborts.
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import pwd
import stat
import tarfile
import time
from collections.abc import Callable
from typing import IO

from plugin.archive.tar import header as th
from plugin.archive.tar.ustar import Header as _Header
from plugin.archive.tar.ustar import encode_header, plain_block
from plugin.errors import InvalidArgument
from plugin.idtools import IDMappings

log = logging.getLogger("strata.archive")

BLOCKSIZE, RECORDSIZE = tarfile.BLOCKSIZE, tarfile.RECORDSIZE
_FLUSH_AT = 1 << 20
_READ_CHUNK = 1 << 20
# From this size on a body goes by sendfile (the pipe takes page-cache pages, no copy
# in our process); below it one read into the batch beats flush + sendfile.  Set
# low: a source tree's mid-sized files export faster by sendfile (bench_archive.py).
SENDFILE_MIN = 16 << 10
_CAP_XATTR = "security.capability"
_VFS_CAP_REVISION_2, _VFS_CAP_REVISION_3, _XATTR_CAPS_SZ_2 = 2, 3, 20
_S_IFMT = 0o170000
_S_ISDIR, _S_ISCHR, _S_ISREG = stat.S_ISDIR, stat.S_ISCHR, stat.S_ISREG
_O_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
# Directory descriptors kept open at once: more than a walk's usual depth.
_DIR_FDS_MAX = 64
# Shared by every entry without xattrs; never mutated (entries get a new dict).
_NO_PAX: dict[str, str] = {}
_PADDING = [b"\0" * n for n in range(BLOCKSIZE)]
_TYPES = {
    stat.S_IFREG: tarfile.REGTYPE, stat.S_IFDIR: tarfile.DIRTYPE, stat.S_IFLNK: tarfile.SYMTYPE,
    stat.S_IFCHR: tarfile.CHRTYPE, stat.S_IFBLK: tarfile.BLKTYPE, stat.S_IFIFO: tarfile.FIFOTYPE,
}


class SkipEntry(Exception):
    """This path cannot go into the tar; log it and carry on."""


class Output:
    """Batches small writes into one ``write`` per ~1 MiB; big bodies go by ``sendfile``.

    ``announce``, when set, is told the size of every write before it is made (a
    process whose pipe another one splices from says how much to take)."""

    def __init__(self, out: IO[bytes] | int) -> None:
        if isinstance(out, int):
            self._fd = out
        else:
            out.flush()
            self._fd = out.fileno()
        # The pieces not yet written: appending is cheaper than growing a bytearray.
        self._parts: list[bytes] = []
        self.held = 0  # their total size
        self.offset = 0
        self.flush_at = _FLUSH_AT
        self.sendfile_min = SENDFILE_MIN
        self.announce: Callable[[int], None] | None = None
        self._sendfile_ok = hasattr(os, "sendfile")

    def write(self, data: bytes) -> None:
        self._parts.append(data)
        self.held += len(data)
        self.offset += len(data)
        if self.held >= self.flush_at:
            self.flush()

    def flush(self) -> None:
        if not self._parts:
            return
        view = memoryview(b"".join(self._parts))
        self._parts.clear()
        self.held = 0
        if self.announce is not None:
            self.announce(len(view))
        done = 0
        while done < len(view):
            done += os.write(self._fd, view[done:])

    def splice_from(self, src_fd: int, size: int) -> None:
        """Move exactly ``size`` bytes from the pipe ``src_fd`` (page references, no copy)."""
        self.flush()
        left = size
        while left:
            moved = os.splice(src_fd, self._fd, left)
            if not moved:
                raise OSError(errno.EPIPE, "the pipe spliced from ended early")
            left -= moved
        self.offset += size

    def write_file(self, header: bytes, src_fd: int, size: int, path: str) -> None:
        """``header``, then exactly ``size`` bytes of ``src_fd`` and the padding: zeros
        pad a file that shrank, and a file that grew is cut, so the header stays true."""
        if size >= self.sendfile_min and self._sendfile_ok:
            self.write(header)
            self.flush()
            left = self._sendfile(src_fd, size)
        else:
            data = os.read(src_fd, min(size, _READ_CHUNK))
            if len(data) == size:  # the usual small file: one append for the entry
                padding = _PADDING[-size % BLOCKSIZE]
                self._parts += (header, data, padding)
                total = len(header) + size + len(padding)
                self.held += total
                self.offset += total
                if self.held >= self.flush_at:
                    self.flush()
                return
            self.write(header)
            self.write(data)
            left = size - len(data)
        while left:
            data = os.read(src_fd, min(left, _READ_CHUNK))
            if not data:
                log.warning("%s shrank while being archived; padding with zeros", path)
                data = b"\0" * left
            left -= len(data)
            self.write(data)
        self.write(_PADDING[-size % BLOCKSIZE])

    def _sendfile(self, src_fd: int, size: int) -> int:
        """Kernel copy file → pipe; returns what is left to copy by hand (0 normally)."""
        offset = 0
        while offset < size:
            try:
                sent = os.sendfile(self._fd, src_fd, offset, size - offset)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOSYS) or offset:
                    raise
                self._sendfile_ok = False
                break
            if sent == 0:
                break  # the file shrank: the caller pads
            offset += sent
        self.offset += offset
        if offset < size:
            os.lseek(src_fd, offset, os.SEEK_SET)
        return size - offset

    def close(self) -> None:
        # tarfile's end: two zero blocks, then zeros up to a whole 10 KiB record.
        self.write(b"\0" * (2 * BLOCKSIZE))
        self.write(b"\0" * (-self.offset % RECORDSIZE))
        self.flush()


class LayerWriter:
    """Entries in the order they are added; ``close`` ends the archive.

    The second and later paths of a multiply-linked inode become hardlink entries
    naming the first path written.  A subclass that sets ``_delegates`` may hand an
    entry to another writer instead, from ``_delegate`` (``proc/export.py``)."""

    def __init__(self, out: IO[bytes] | Output, idmap: IDMappings,
                 whiteout_format: str = "aufs") -> None:
        if whiteout_format not in ("aufs", "overlay"):
            raise InvalidArgument(f"unknown whiteout format {whiteout_format!r}")
        self._out = out if isinstance(out, Output) else Output(out)
        self._idmap = idmap
        self._overlay = whiteout_format == "overlay"
        self._seen_inodes: dict[tuple[int, int], str] = {}
        self._unames, self._gnames = _NAMES.current()
        # Open directories, so that an entry's syscalls look up one name, not a path
        # (the kernel walks a path component by component, for every syscall).
        self._dir_fds: dict[str, int | None] = {}
        # No ID mapping: plain entries take _plain_block (an entry without xattrs is
        # neither an overlay whiteout, a device, nor an opaque directory).
        self._simple = idmap.empty
        self._delegates = False

    def close(self) -> None:
        """End the archive."""
        self._out.close()
        self.close_dirs()

    def close_dirs(self) -> None:
        for fd in self._dir_fds.values():
            if fd is not None:
                os.close(fd)
        self._dir_fds.clear()

    def _locate(self, path: str) -> tuple[int | None, str]:
        """(directory fd, name in it) for ``path``, or (None, path) without one."""
        head, sep, base = path.rpartition("/")
        if not sep or not base:
            return None, path
        head = head or "/"
        try:
            fd = self._dir_fds[head]
        except KeyError:
            if len(self._dir_fds) >= _DIR_FDS_MAX:
                self.close_dirs()
            try:
                fd = os.open(head, _O_DIR)
            except OSError:
                fd = None
            self._dir_fds[head] = fd
        return (None, path) if fd is None else (fd, base)

    def add_whiteout(self, name: str) -> None:
        """``name`` is the deleted path, relative; writes ``dir/.wh.base``."""
        head, base = os.path.split(name)
        self._out.write(encode_header(_Header(os.path.join(head, th.WHITEOUT_PREFIX + base),
                                              tarfile.REGTYPE, mtime=int(time.time()))))

    def add_path(self, path: str, name: str) -> None:
        """Add one filesystem path under the relative tar ``name``; skips unreadable ones."""
        try:
            self._add_path(path, name)
        except (SkipEntry, OSError) as exc:
            _skip_or_raise(path, exc)

    def _add_path(self, path: str, name: str) -> None:
        dir_fd, base = self._locate(path)
        st = os.stat(base, dir_fd=dir_fd, follow_symlinks=False)
        if self._delegates and self._delegate(name, st):
            return
        mode = st.st_mode
        # A body to send is opened first: its xattrs are read through the descriptor,
        # and a file that vanished is skipped whole.
        fd = os.open(base, _O_READ, dir_fd=dir_fd) if _S_ISREG(mode) and st.st_size else -1
        try:
            xattr_names = None
            if self._simple:
                block = self._plain_block(name, st)
                if block is not None:
                    xattr_names = list_xattrs(path if fd < 0 else fd)
                    if not xattr_names:
                        if fd < 0:
                            self._out.write(block)
                        else:
                            self._out.write_file(block, fd, st.st_size, path)
                        return
            info = self._header(path, name, st, fd, dir_fd, base, xattr_names)
            is_whiteout = self._overlay and _S_ISCHR(mode) and st.st_rdev == 0
            if not self._idmap.empty and not is_whiteout and not os.path.basename(
                    name.rstrip("/")).startswith(th.WHITEOUT_PREFIX):
                info.uid, info.gid = self._container_ids(st)
            self._emit(path, name, st, info, fd)
        finally:
            if fd >= 0:
                os.close(fd)

    def _delegate(self, name: str, st: os.stat_result) -> bool:
        """Whether the entry was handed to another writer (only with ``_delegates``)."""
        return False

    def _plain_block(self, name: str, st: os.stat_result) -> bytes | None:
        """The header of the commonest entry, a directory or a file with one link, when
        a bare ustar block holds it; None for everything else (and then ``_header``)."""
        mode = st.st_mode
        kind = mode & _S_IFMT
        if kind == stat.S_IFREG and st.st_nlink == 1:
            typeflag, size, tar_name = tarfile.REGTYPE, st.st_size, name.rstrip("/")
        elif kind == stat.S_IFDIR:
            typeflag, size, tar_name = tarfile.DIRTYPE, 0, name.rstrip("/") + "/"
        else:
            return None
        uid, gid = st.st_uid, st.st_gid
        return plain_block(tar_name, typeflag, mode, uid, gid, size, st.st_mtime_ns // th.NS,
                           self._user(uid), self._group(gid))

    def _emit(self, path: str, name: str, st: os.stat_result, info: _Header, fd: int) -> None:
        """Write the entry: a hardlink when its inode already went out, a whiteout in
        aufs form, then the overlay opaque marker of a directory.  ``fd`` is the open
        file of a regular file with a body (-1 otherwise)."""
        mode = st.st_mode
        is_dir = _S_ISDIR(mode)
        if st.st_nlink > 1 and not is_dir:
            first = self._seen_inodes.setdefault((st.st_dev, st.st_ino), name)
            if first != name:
                # The xattr records stay, as docker's addTarFile leaves them on a link.
                info.type, info.linkname, info.size = tarfile.LNKTYPE, first, 0
        if self._overlay and _S_ISCHR(mode) and st.st_rdev == 0:
            self._as_aufs_whiteout(info)
        opaque = self._overlay and is_dir and _is_opaque(path)
        if info.type != tarfile.REGTYPE or info.size == 0:
            self._out.write(encode_header(info))
        else:
            self._out.write_file(encode_header(info), fd, info.size, path)
        if opaque:
            self._out.write(encode_header(self._opaque_marker(info)))

    def _user(self, uid: int) -> str:
        uname = self._unames.get(uid)
        if uname is None:
            uname = self._unames[uid] = _user_name(uid)
        return uname

    def _group(self, gid: int) -> str:
        gname = self._gnames.get(gid)
        if gname is None:
            gname = self._gnames[gid] = _group_name(gid)
        return gname

    def _header(self, path: str, name: str, st: os.stat_result, fd: int,
                dir_fd: int | None, base: str, xattr_names: list[str] | None) -> _Header:
        mode = st.st_mode
        kind = mode & _S_IFMT
        typeflag = _TYPES.get(kind)
        if typeflag is None:
            raise SkipEntry("sockets are not archivable" if kind == stat.S_IFSOCK
                            else f"unsupported file type {kind:o}")
        uid, gid = st.st_uid, st.st_gid
        info = _Header(name.rstrip("/") + ("/" if kind == stat.S_IFDIR else ""), typeflag,
                       mode, uid, gid, 0, st.st_mtime_ns // th.NS, "", self._user(uid),
                       self._group(gid), 0, 0, _NO_PAX)
        if kind == stat.S_IFREG:
            info.size = st.st_size
        elif kind == stat.S_IFLNK:
            info.linkname = os.readlink(base, dir_fd=dir_fd)
        elif kind == stat.S_IFCHR or kind == stat.S_IFBLK:
            info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        xattrs = read_xattrs(fd if fd >= 0 else path, xattr_names)
        if xattrs:
            info.pax = {th.SCHILY_XATTR + key: th.pax_value_str(value) for key, value in xattrs}
        return info

    def _container_ids(self, st: os.stat_result) -> tuple[int, int]:
        try:
            return self._idmap.to_container(st.st_uid, st.st_gid)
        except InvalidArgument as exc:
            raise SkipEntry(str(exc)) from None

    @staticmethod
    def _as_aufs_whiteout(info: _Header) -> None:
        head, base = os.path.split(info.name)
        info.name = os.path.join(head, th.WHITEOUT_PREFIX + base)
        info.type, info.mode, info.size = tarfile.REGTYPE, 0o600, 0
        info.devmajor = info.devminor = 0

    @staticmethod
    def _opaque_marker(dir_info: _Header) -> _Header:
        return _Header(os.path.join(dir_info.name.rstrip("/"), th.WHITEOUT_OPAQUE),
                       tarfile.REGTYPE, dir_info.mode & 0o777, dir_info.uid, dir_info.gid,
                       uname=dir_info.uname, gname=dir_info.gname)


def _skip_or_raise(path: str, exc: SkipEntry | OSError) -> None:
    """Log an entry that cannot be archived; re-raise what breaks the stream itself."""
    if isinstance(exc, SkipEntry):
        log.warning("can't add %s to tar: %s", path, exc)
    elif exc.errno == errno.EPIPE:
        raise exc
    elif exc.filename is None or exc.filename == path or exc.filename == _basename(path):
        log.warning("can't add %s to tar: %s", path, exc.strerror or exc)
    else:
        raise exc


class _NameCache:
    """uid -> user and gid -> group names, kept across archives (Go's archive/tar,
    which docker uses, keeps them for the life of the process); forgotten when
    /etc/passwd or /etc/group changes.  A lookup through NSS costs more than the
    rest of a small file's entry."""

    def __init__(self) -> None:
        self._key: tuple[tuple[int, int, int] | None, ...] = ()
        self._users: dict[int, str] = {}
        self._groups: dict[int, str] = {}

    def current(self) -> tuple[dict[int, str], dict[int, str]]:
        key = (_file_key("/etc/passwd"), _file_key("/etc/group"))
        if key != self._key:
            self._key, self._users, self._groups = key, {}, {}
        return self._users, self._groups


def _file_key(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


_NAMES = _NameCache()


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OSError):
        return ""


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except (KeyError, OSError):
        return ""


def _basename(path: str) -> str:
    return path.rpartition("/")[2]


def list_xattrs(path: str | int) -> list[str]:
    """The xattr names of ``path`` (not following a symlink) or of an open file."""
    try:
        return os.listxattr(path, follow_symlinks=not isinstance(path, str))
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return []
        raise


def read_xattrs(path: str | int, names: list[str] | None = None) -> list[tuple[str, bytes]]:
    """Every xattr worth exporting, sorted by name; v3 file caps become v2 as in docker.
    ``path`` may be an open file instead; ``names`` its xattr names if already listed."""
    if names is None:
        names = list_xattrs(path)
    if not names:
        return []
    found: list[tuple[str, bytes]] = []
    for name in sorted(names):
        if name.startswith(th.OVERLAY_XATTR_PREFIX) or not _pax_safe_key(name):
            continue
        try:
            value = os.getxattr(path, name, follow_symlinks=not isinstance(path, str))
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
                continue
            raise
        if name == _CAP_XATTR and len(value) > 3 and value[3] == _VFS_CAP_REVISION_3:
            # A v3 cap names the namespace root uid, meaningless outside this host.
            value = value[:3] + bytes([_VFS_CAP_REVISION_2]) + value[4:_XATTR_CAPS_SZ_2]
        found.append((name, value))
    return found


def _pax_safe_key(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        log.warning("skipping xattr with a non-UTF-8 name")
        return False
    return "=" not in name and "\n" not in name


def _is_opaque(path: str) -> bool:
    try:
        return os.getxattr(path, th.OVERLAY_OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False
