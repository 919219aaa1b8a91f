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
import tarfile
import time
from collections.abc import Iterator
from typing import IO

from plugin.archive import tarheader as th
from plugin.errors import InvalidArgument
from plugin.idtools import IDMappings

log = logging.getLogger("strata.archive")

_COPY_BUFSIZE = 1 << 20
_CAP_XATTR = "security.capability"
_VFS_CAP_REVISION_2, _VFS_CAP_REVISION_3, _XATTR_CAPS_SZ_2 = 2, 3, 20
_TYPES = {
    stat.S_IFREG: tarfile.REGTYPE, stat.S_IFDIR: tarfile.DIRTYPE, stat.S_IFLNK: tarfile.SYMTYPE,
    stat.S_IFCHR: tarfile.CHRTYPE, stat.S_IFBLK: tarfile.BLKTYPE, stat.S_IFIFO: tarfile.FIFOTYPE,
}


class SkipEntry(Exception):
    """This path cannot go into the tar; log it and carry on."""


class _CountingWriter:
    """tarfile's seekable-mode writer needs ``tell()``; a pipe has none."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self._pos = 0

    def write(self, data: bytes) -> int:
        self._raw.write(data)
        self._pos += len(data)
        return len(data)

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        self._raw.flush()


class _ExactReader:
    """Yields exactly ``size`` bytes: a file that shrank is padded with zeros, one
    that grew is cut, so the header written before the data stays true."""

    def __init__(self, fileobj: IO[bytes], size: int, name: str) -> None:
        self._file, self._left, self._name = fileobj, size, name

    def read(self, n: int = -1, /) -> bytes:
        want = self._left if n < 0 else min(n, self._left)
        data = self._file.read(want) if want else b""
        if len(data) < want:
            log.warning("%s shrank while being archived; padding with zeros", self._name)
            data += b"\0" * (want - len(data))
        self._left -= len(data)
        return data


class LayerWriter:
    def __init__(self, out: IO[bytes], idmap: IDMappings, whiteout_format: str = "aufs") -> None:
        if whiteout_format not in ("aufs", "overlay"):
            raise InvalidArgument(f"unknown whiteout format {whiteout_format!r}")
        self._tar = tarfile.open(  # noqa: SIM115 - closed by close()
            fileobj=_CountingWriter(out), mode="w", format=tarfile.PAX_FORMAT,  # type: ignore[call-overload]
            tarinfo=th.DockerTarInfo, encoding=th.ENCODING, errors=th.ERRORS,
            copybufsize=_COPY_BUFSIZE,
        )
        self._idmap = idmap
        self._overlay = whiteout_format == "overlay"
        self._seen_inodes: dict[tuple[int, int], str] = {}
        self._unames: dict[int, str] = {}
        self._gnames: dict[int, str] = {}

    def close(self) -> None:
        self._tar.close()

    def add_whiteout(self, name: str) -> None:
        """``name`` is the deleted path, relative; writes ``dir/.wh.base``."""
        head, base = os.path.split(name)
        info = th.DockerTarInfo(os.path.join(head, th.WHITEOUT_PREFIX + base))
        info.mode, info.mtime, info.type = 0, int(time.time()), tarfile.REGTYPE
        self._tar.addfile(info)

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
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            first = self._seen_inodes.setdefault((st.st_dev, st.st_ino), name)
            if first != name:
                info.type, info.linkname, info.size = tarfile.LNKTYPE, first, 0
                info.pax_headers = {}
        if is_whiteout:
            self._as_aufs_whiteout(info)
        opaque = self._overlay and stat.S_ISDIR(st.st_mode) and _is_opaque(path)
        self._write(info, path)
        if opaque:
            self._tar.addfile(self._opaque_marker(info))

    def _write(self, info: tarfile.TarInfo, path: str) -> None:
        if info.type != tarfile.REGTYPE or info.size == 0:
            self._tar.addfile(info)
        else:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "rb", buffering=0) as src:
                self._tar.addfile(info, _ExactReader(src, info.size, path))
        # addfile keeps every header it wrote; a big tree would pin them all.
        self._tar.members.clear()

    def _header(self, path: str, name: str, st: os.stat_result) -> tarfile.TarInfo:
        kind = stat.S_IFMT(st.st_mode)
        if kind not in _TYPES:
            raise SkipEntry("sockets are not archivable" if kind == stat.S_IFSOCK
                            else f"unsupported file type {kind:o}")
        info = th.DockerTarInfo(name.rstrip("/") + ("/" if kind == stat.S_IFDIR else ""))
        info.type = _TYPES[kind]
        info.mode = st.st_mode
        info.uid, info.gid = st.st_uid, st.st_gid
        info.mtime = st.st_mtime_ns // th.NS
        info.uname, info.gname = self._uname(st.st_uid), self._gname(st.st_gid)
        if kind == stat.S_IFREG:
            info.size = st.st_size
        elif kind == stat.S_IFLNK:
            info.linkname = os.readlink(path)
        elif kind in (stat.S_IFCHR, stat.S_IFBLK):
            info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        info.pax_headers = {th.SCHILY_XATTR + key: th.pax_value_str(value)
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
    def _as_aufs_whiteout(info: tarfile.TarInfo) -> None:
        head, base = os.path.split(info.name)
        info.name = os.path.join(head, th.WHITEOUT_PREFIX + base)
        info.type, info.mode, info.size = tarfile.REGTYPE, 0o600, 0
        info.devmajor = info.devminor = 0

    @staticmethod
    def _opaque_marker(dir_info: tarfile.TarInfo) -> tarfile.TarInfo:
        marker = th.DockerTarInfo(os.path.join(dir_info.name.rstrip("/"), th.WHITEOUT_OPAQUE))
        marker.type, marker.mode, marker.mtime = tarfile.REGTYPE, dir_info.mode & 0o777, 0
        marker.uid, marker.gid = dir_info.uid, dir_info.gid
        marker.uname, marker.gname = dir_info.uname, dir_info.gname
        return marker

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
