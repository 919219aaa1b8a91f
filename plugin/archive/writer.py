"""Write layer tars the way docker's ``tarAppender.addTarFile`` does (protocol §6.3).

Runs in the export worker child, writing to its stdout.  Entries are relative,
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
import struct
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

from plugin.archive import tarheader as th
from plugin.errors import InvalidArgument
from plugin.idtools import IDMappings

log = logging.getLogger("strata.archive")

BLOCKSIZE, RECORDSIZE = tarfile.BLOCKSIZE, tarfile.RECORDSIZE
_FLUSH_AT = 1 << 20
_READ_CHUNK = 1 << 20
# Below this a body is read into the batch buffer: one read beats flush + sendfile.
_SENDFILE_MIN = 256 << 10
_CAP_XATTR = "security.capability"
_VFS_CAP_REVISION_2, _VFS_CAP_REVISION_3, _XATTR_CAPS_SZ_2 = 2, 3, 20
_TYPES = {
    stat.S_IFREG: tarfile.REGTYPE, stat.S_IFDIR: tarfile.DIRTYPE, stat.S_IFLNK: tarfile.SYMTYPE,
    stat.S_IFCHR: tarfile.CHRTYPE, stat.S_IFBLK: tarfile.BLKTYPE, stat.S_IFIFO: tarfile.FIFOTYPE,
}


class SkipEntry(Exception):
    """This path cannot go into the tar; log it and carry on."""


@dataclass(slots=True)
class _Header:
    name: str
    type: bytes
    mode: int = 0
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime: int = 0
    linkname: str = ""
    uname: str = ""
    gname: str = ""
    devmajor: int = 0
    devminor: int = 0
    pax: dict[str, str] = field(default_factory=dict)


def _field(text: str, length: int) -> bytes:
    return text.encode("ascii", "replace")[:length]


# name mode uid gid size mtime chksum type linkname magic uname gname devmajor devminor
# prefix: struct pads each "s" field with NULs (and cuts what is too long), as tarfile's stn.
_USTAR = struct.Struct("100s8s8s8s12s12s8sc100s8s32s32s8s8s155s12x")
_CHKSUM_BLANK = b"        "


def _ustar_block(h: _Header, name: str, linkname: str, uname: str, gname: str,
                 size: int, mode: int) -> bytes:
    """tarfile's ``_create_header(info, USTAR_FORMAT, "ascii", "replace")`` byte for byte,
    except that the mode keeps its file type bits (Go's archive/tar does; tarfile masks)."""
    is_device = h.type in (tarfile.CHRTYPE, tarfile.BLKTYPE)
    block = _USTAR.pack(
        _field(name, 100), b"%07o" % mode, b"%07o" % h.uid, b"%07o" % h.gid, b"%011o" % size,
        b"%011o" % h.mtime, _CHKSUM_BLANK, h.type, _field(linkname, 100), tarfile.POSIX_MAGIC,
        _field(uname, 32), _field(gname, 32),
        b"%07o" % h.devmajor if is_device else b"", b"%07o" % h.devminor if is_device else b"",
        b"")
    return b"%s%06o\0 %s" % (block[:148], sum(block), block[156:])


def _plain(h: _Header) -> bool:
    """True when the ustar block holds the entry as it is: no PAX header needed."""
    return (not h.pax and h.name.isascii() and len(h.name) <= 100 and h.linkname.isascii()
            and len(h.linkname) <= 100 and h.uname.isascii() and len(h.uname) <= 32
            and h.gname.isascii() and len(h.gname) <= 32 and 0 <= h.uid < _MAX_ID
            and 0 <= h.gid < _MAX_ID and 0 <= h.size < _MAX_NUM and 0 <= h.mtime < _MAX_NUM)


_MAX_ID, _MAX_NUM = 8 ** 7, 8 ** 11
_PAX_STRINGS = (("name", "path", 100), ("linkname", "linkpath", 100), ("uname", "uname", 32),
                ("gname", "gname", 32))


def encode_header(h: _Header) -> bytes:
    """``TarInfo.tobuf(PAX_FORMAT)`` of a DockerTarInfo: a PAX header only for what the
    ustar block cannot hold (non-ASCII or long strings, big numbers) and for xattrs."""
    mode = h.mode if h.mode > 0o7777 else h.mode & 0o7777
    if _plain(h):
        return _ustar_block(h, h.name, h.linkname, h.uname, h.gname, h.size, mode)
    pax = dict(h.pax)
    values = {"name": h.name, "linkname": h.linkname, "uname": h.uname, "gname": h.gname}
    for attr, keyword, length in _PAX_STRINGS:
        if keyword in pax:
            continue
        text = values[attr]
        if not text.isascii() or len(text) > length:
            pax[keyword] = text
    numbers = {"uid": h.uid, "gid": h.gid, "size": h.size, "mtime": h.mtime}
    for key, digits in (("uid", 8), ("gid", 8), ("size", 12), ("mtime", 12)):
        if not 0 <= numbers[key] < 8 ** (digits - 1):
            if key not in pax:
                pax[key] = str(numbers[key])
            numbers[key] = 0
    fixed = _Header(h.name, h.type, h.mode, numbers["uid"], numbers["gid"], numbers["size"],
                    numbers["mtime"], h.linkname, h.uname, h.gname, h.devmajor, h.devminor)
    block = _ustar_block(fixed, h.name, h.linkname, h.uname, h.gname, fixed.size, mode)
    return _pax_header(pax) + block if pax else block


def _pax_header(pax: dict[str, str]) -> bytes:
    """tarfile's ``_create_pax_generic_header`` (XHDTYPE, surrogateescape for binary)."""
    binary = False
    for value in pax.values():
        try:
            value.encode("utf-8", "strict")
        except UnicodeEncodeError:
            binary = True
            break
    records = [b"21 hdrcharset=BINARY\n"] if binary else []
    for keyword, value in pax.items():
        key = keyword.encode("utf-8")
        raw = value.encode(th.ENCODING, th.ERRORS) if binary else value.encode("utf-8")
        length = len(key) + len(raw) + 3
        n = p = 0
        while True:
            n = length + len(str(p))
            if n == p:
                break
            p = n
        records.append(str(p).encode("ascii") + b" " + key + b"=" + raw + b"\n")
    payload = b"".join(records)
    head = _Header("././@PaxHeader", tarfile.XHDTYPE, size=len(payload))
    return (_ustar_block(head, head.name, "", "", "", len(payload), 0) + payload
            + b"\0" * (-len(payload) % BLOCKSIZE))


class _Output:
    """Batches small writes into one ``write`` per ~1 MiB; big bodies go by ``sendfile``."""

    def __init__(self, out: IO[bytes]) -> None:
        out.flush()
        self._fd = out.fileno()
        self._buf = bytearray()
        self.offset = 0
        self._sendfile_ok = hasattr(os, "sendfile")

    def write(self, data: bytes) -> None:
        self._buf += data
        self.offset += len(data)
        if len(self._buf) >= _FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        view = memoryview(self._buf)
        done = 0
        while done < len(view):
            done += os.write(self._fd, view[done:])
        view.release()
        self._buf.clear()

    def copy_file(self, src_fd: int, size: int, path: str) -> None:
        """Exactly ``size`` bytes of ``src_fd``: zeros pad a file that shrank, and a file
        that grew is cut, so the header written before the data stays true."""
        left = size
        if size >= _SENDFILE_MIN and self._sendfile_ok:
            self.flush()
            left = self._sendfile(src_fd, size)
        while left:
            data = os.read(src_fd, min(left, _READ_CHUNK))
            if not data:
                log.warning("%s shrank while being archived; padding with zeros", path)
                data = b"\0" * left
            self._buf += data
            self.offset += len(data)
            left -= len(data)
            if len(self._buf) >= _FLUSH_AT:
                self.flush()
        self.write(b"\0" * (-size % BLOCKSIZE))

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
        os.lseek(src_fd, offset, os.SEEK_SET)
        return size - offset

    def close(self) -> None:
        # tarfile's end: two zero blocks, then zeros up to a whole 10 KiB record.
        self.write(b"\0" * (2 * BLOCKSIZE))
        self.write(b"\0" * (-self.offset % RECORDSIZE))
        self.flush()


class LayerWriter:
    def __init__(self, out: IO[bytes], idmap: IDMappings, whiteout_format: str = "aufs") -> None:
        if whiteout_format not in ("aufs", "overlay"):
            raise InvalidArgument(f"unknown whiteout format {whiteout_format!r}")
        self._out = _Output(out)
        self._idmap = idmap
        self._overlay = whiteout_format == "overlay"
        self._seen_inodes: dict[tuple[int, int], str] = {}
        self._unames: dict[int, str] = {}
        self._gnames: dict[int, str] = {}

    def close(self) -> None:
        self._out.close()

    def add_whiteout(self, name: str) -> None:
        """``name`` is the deleted path, relative; writes ``dir/.wh.base``."""
        head, base = os.path.split(name)
        self._out.write(encode_header(_Header(os.path.join(head, th.WHITEOUT_PREFIX + base),
                                              tarfile.REGTYPE, mtime=int(time.time()))))

    def add_path(self, path: str, name: str) -> None:
        """Add one filesystem path under the relative tar ``name``; skips unreadable ones."""
        try:
            self._add_path(path, name)
        except SkipEntry as exc:
            log.warning("can't add %s to tar: %s", path, exc)
        except OSError as exc:
            if exc.errno == errno.EPIPE:
                raise
            if exc.filename is None or exc.filename == path:
                log.warning("can't add %s to tar: %s", path, exc.strerror or exc)
            else:
                raise

    def _add_path(self, path: str, name: str) -> None:
        st = os.lstat(path)
        info = self._header(path, name, st)
        is_whiteout = self._is_overlay_whiteout(st)
        if not is_whiteout and not os.path.basename(name.rstrip("/")).startswith(
                th.WHITEOUT_PREFIX):
            info.uid, info.gid = self._container_ids(st)
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            first = self._seen_inodes.setdefault((st.st_dev, st.st_ino), name)
            if first != name:
                info.type, info.linkname, info.size = tarfile.LNKTYPE, first, 0
                info.pax = {}
        if is_whiteout:
            self._as_aufs_whiteout(info)
        opaque = self._overlay and stat.S_ISDIR(st.st_mode) and _is_opaque(path)
        self._write(info, path)
        if opaque:
            self._out.write(encode_header(self._opaque_marker(info)))

    def _write(self, info: _Header, path: str) -> None:
        if info.type != tarfile.REGTYPE or info.size == 0:
            self._out.write(encode_header(info))
            return
        # Open before writing the header: a file that vanished is skipped whole.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            self._out.write(encode_header(info))
            self._out.copy_file(fd, info.size, path)
        finally:
            os.close(fd)

    def _header(self, path: str, name: str, st: os.stat_result) -> _Header:
        mode = st.st_mode
        kind = stat.S_IFMT(mode)
        if kind not in _TYPES:
            raise SkipEntry("sockets are not archivable" if kind == stat.S_IFSOCK
                            else f"unsupported file type {kind:o}")
        info = _Header(name.rstrip("/") + ("/" if kind == stat.S_IFDIR else ""), _TYPES[kind],
                       mode, st.st_uid, st.st_gid, 0, st.st_mtime_ns // th.NS, "",
                       self._uname(st.st_uid), self._gname(st.st_gid))
        if kind == stat.S_IFREG:
            info.size = st.st_size
        elif kind == stat.S_IFLNK:
            info.linkname = os.readlink(path)
        elif kind in (stat.S_IFCHR, stat.S_IFBLK):
            info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        info.pax = {th.SCHILY_XATTR + key: th.pax_value_str(value)
                    for key, value in read_xattrs(path)}
        return info

    def _container_ids(self, st: os.stat_result) -> tuple[int, int]:
        if self._idmap.empty:
            return st.st_uid, st.st_gid
        try:
            return self._idmap.to_container(st.st_uid, st.st_gid)
        except InvalidArgument as exc:
            raise SkipEntry(str(exc)) from None

    def _is_overlay_whiteout(self, st: os.stat_result) -> bool:
        return self._overlay and stat.S_ISCHR(st.st_mode) and st.st_rdev == 0

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

    def _uname(self, uid: int) -> str:
        if uid not in self._unames:
            try:
                self._unames[uid] = pwd.getpwuid(uid).pw_name
            except (KeyError, OSError):
                self._unames[uid] = ""
        return self._unames[uid]

    def _gname(self, gid: int) -> str:
        if gid not in self._gnames:
            try:
                self._gnames[gid] = grp.getgrgid(gid).gr_name
            except (KeyError, OSError):
                self._gnames[gid] = ""
        return self._gnames[gid]


def read_xattrs(path: str) -> list[tuple[str, bytes]]:
    """Every xattr worth exporting, sorted by name; v3 file caps become v2 as in docker."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return []
        raise
    found: list[tuple[str, bytes]] = []
    for name in sorted(names):
        if name.startswith(th.OVERLAY_XATTR_PREFIX) or not _pax_safe_key(name):
            continue
        try:
            value = os.getxattr(path, name, follow_symlinks=False)
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


def walk_tree(root: str) -> Iterator[tuple[str, str]]:
    """(path, relative name) for everything under root in ``filepath.Walk`` order:
    depth first, each directory's names sorted by their bytes, root itself omitted."""
    stack: list[tuple[Iterator[os.DirEntry[str]], str]] = [(_sorted_entries(root), "")]
    while stack:
        entries, prefix = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            continue
        name = prefix + entry.name
        yield entry.path, name
        if entry.is_dir(follow_symlinks=False):
            stack.append((_sorted_entries(entry.path), name + "/"))


def _sorted_entries(directory: str) -> Iterator[os.DirEntry[str]]:
    try:
        with os.scandir(directory) as it:
            return iter(sorted(it, key=lambda e: os.fsencode(e.name)))
    except OSError as exc:
        log.warning("can't list %s: %s", directory, exc.strerror or exc)
        return iter(())
