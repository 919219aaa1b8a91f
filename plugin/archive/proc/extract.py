"""Unpack one layer tar into a directory (docker's ``UnpackLayer``, docs/protocol.md §6.4).

This runs inside the worker child after it has chrooted into the layer root,
so ``root`` is normally ``"/"`` and the kernel confines every path lookup,
including lookups through symlinks the tar itself created.  Names are still
cleaned and hardlink targets checked lexically, as docker does, so a bug in
the chroot set-up cannot turn into a write outside the layer.  When ``root`` is
not ``"/"`` (no chroot), every parent directory is additionally resolved with
``realpath`` and must stay under ``root``.

Whiteouts (§6.2): in ``aufs`` format ``root`` holds the whole merged tree and a
``.wh.X`` entry deletes ``X``; ``.wh..wh..opq`` drops everything under the
directory that this tar did not itself unpack.  In ``overlay`` format ``root``
is an overlay upper dir: ``.wh.X`` becomes the kernel's whiteout (char device
0:0) and the opaque marker becomes ``trusted.overlay.opaque=y``.
"""

from __future__ import annotations

import base64
import errno
import logging
import os
import shutil
import stat
from dataclasses import dataclass
from typing import IO
from urllib.parse import unquote

from plugin.archive.proc.filehelper import FileHelper, HelperFailed
from plugin.archive.tar import header as th
from plugin.archive.tar import reader as tr
from plugin.archive.tar.reader import Entry, TarFormatError, TarReader
from plugin.errors import InvalidArgument, StrataError
from plugin.idtools import IDMappings

log = logging.getLogger("strata.archive")

_PLNK_STASH = ".wh..wh.strata-plnk"
_DEVICE_TYPES = {tr.CHRTYPE: stat.S_IFCHR, tr.BLKTYPE: stat.S_IFBLK, tr.FIFOTYPE: stat.S_IFIFO}
# O_EXCL|O_NOFOLLOW: a path we did not just clear is never written through.
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_IGNORED_XATTR_ERRNOS = (errno.ENOTSUP, errno.EPERM)
#: Regular files at most this large may go to the file helper (bodies cross a pipe).
_HELPER_MAX_BODY = 65536
#: Sync with the helper at least this often: bounds what is kept for a replay.
_SYNC_EVERY_FILES = 4096
#: Bodies handed over are kept for a replay until the next sync.  Every worker is
#: a new process, so each page of that memory is a fresh page faulted in (and
#: zeroed) on every apply (a bound of 8 MiB would be 2,048 pages of 4 KiB to fault
#: in each time).  A sync waits only for the helper's short backlog.
_SYNC_EVERY_BYTES = 1 << 20


class BadEntry(InvalidArgument):
    """The tar entry itself is unacceptable (escape, unknown type, dangling link)."""


@dataclass
class _DirTimes:
    path: str
    atime_ns: int
    mtime_ns: int


def clean_name(name: str) -> str:
    """Docker's ``filepath.Clean`` + breakout check: relative, no ``..``; root is ``.``."""
    if (name and name[0] not in "./" and name[-1] != "/" and "/." not in name
            and "//" not in name):
        return name  # already clean: the common case, without normpath's cost
    cleaned = (os.path.normpath(name) if name else ".").lstrip("/") or "."
    if cleaned == ".." or cleaned.startswith("../"):
        raise BadEntry(f"{name!r} is outside of the layer root")
    return cleaned


def remove_all(path: str) -> None:
    """``os.RemoveAll``: a missing path is fine, a directory goes with its content."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


class LayerExtractor:
    """One pass over one layer stream; not reusable."""

    def __init__(self, root: str, idmap: IDMappings, whiteout_format: str = "aufs",
                 helper_after: int = -1) -> None:
        """``helper_after``: fork the file helper (``filehelper.py``) once this many small
        regular files have been seen (-1: never; only in a single-threaded process)."""
        if whiteout_format not in ("aufs", "overlay"):
            raise InvalidArgument(f"unknown whiteout format {whiteout_format!r}")
        self.root = os.path.abspath(root)
        self.idmap = idmap
        self.overlay = whiteout_format == "overlay"
        self.size = 0
        self._unpacked: set[str] = set()
        self._dirs: list[_DirTimes] = []
        self._plnk: dict[str, Entry] = {}
        self._host_root = idmap.root_pair() if not idmap.empty else (0, 0)
        self._ignored_xattrs = 0
        # Directories (absolute) known to exist as directories; cleared on any removal, so a
        # directory replaced by something else is looked at again.
        self._known_dirs: set[str] = {self.root}
        self._prefix = self.root.rstrip("/") + "/"
        self._helper: FileHelper | None = None
        self._helper_countdown = helper_after
        self._source_fd = -1
        # What the helper was handed since the last sync, in order: for a replay.
        self._handed: list[tuple[Entry, str, bytes]] = []
        self._handed_paths: set[str] = set()
        self._handed_bytes = 0

    # -- driving loop ----------------------------------------------------------

    def run(self, source: int | IO[bytes]) -> int:
        """Extract the tar read from ``source`` (a file descriptor, ideally a pipe, or a
        binary file object); return the sum of its header sizes."""
        if isinstance(source, int):
            self._source_fd = source
        try:
            self._run(TarReader(source))
        except BaseException:
            if self._helper is not None:
                self._helper.stop()
            raise
        finally:
            if self._plnk:
                shutil.rmtree(self._abs(_PLNK_STASH), ignore_errors=True)
        if self._helper is not None:
            self._ignored_xattrs += self._helper.ignored_xattrs
        if self._ignored_xattrs:
            log.warning("ignored %d xattrs the filesystem refused (ENOTSUP/EPERM)",
                        self._ignored_xattrs)
        return self.size

    def _run(self, tar: TarReader) -> None:
        try:
            self._entries(tar)
            if self._helper is not None:
                self._sync(last=True)
        except _Failed as failed:
            raise failed.error from None
        for times in self._dirs:
            self._set_times(times.path, times.atime_ns, times.mtime_ns, missing_ok=True)

    def _entries(self, tar: TarReader) -> None:
        while True:
            try:
                info = self._next(tar)
            except StrataError:
                self._settle()
                raise
            if info is None:
                return
            self.size += info.size
            try:
                self._entry(tar, info)
            except _Failed:
                raise
            except (StrataError, OSError, TarFormatError, ValueError, OverflowError) as exc:
                self._settle()
                raise _entry_error(info.name, exc) from None

    def _settle(self) -> None:
        """Before reporting a failure: a file handed to the helper comes earlier in the
        tar, so its error, if any, is the one a sequential extraction would report."""
        if self._handed:
            self._sync()

    def _next(self, tar: TarReader) -> Entry | None:
        try:
            return tar.next()
        except TarFormatError as exc:
            if tar.entries_read == 0:
                raise InvalidArgument(f"layer tar: {exc}") from None
            raise InvalidArgument(f"layer tar: bad header after {self.size} bytes of "
                                  f"content: {exc}") from None

    def _entry(self, tar: TarReader, info: Entry) -> None:
        rel = clean_name(info.name)
        base = os.path.basename(rel)
        if _is_aufs_metadata(rel) or _is_aufs_metadata(base):
            self._aufs_metadata(tar, info, rel)
            return
        if rel == ".":
            self._root_entry(info)
            return
        parent = self._ensure_parent(rel)
        if base.startswith(th.WHITEOUT_PREFIX):
            self._whiteout(info, parent, base)
            return
        self._create(tar, info, rel)

    # -- path helpers ----------------------------------------------------------

    def _abs(self, rel: str) -> str:
        if rel == ".":
            return self.root
        return self._prefix + rel

    def _confine(self, path: str) -> None:
        """Without a chroot, refuse a path whose resolved location leaves root."""
        if self.root == "/":
            return
        real = os.path.realpath(path)
        if real != self.root and not real.startswith(self.root + "/"):
            raise BadEntry(f"{path!r} resolves outside of the layer root")

    def _ensure_parent(self, rel: str) -> str:
        cut = rel.rfind("/")
        parent = self._prefix + rel[:cut] if cut > 0 else self.root
        if self.root != "/":
            self._confine(parent)
        if parent in self._known_dirs:
            return parent
        if self._handed_paths and self._handed_above(parent):
            self._sync()  # a file handed over may be in the way of this directory
        try:
            if stat.S_ISDIR(os.lstat(parent).st_mode):
                self._know_dir(parent)
        except FileNotFoundError:
            # Docker uses 0600 here; 0755 keeps the directory usable when the tar
            # never names it (a later header for it still sets its real mode).
            os.makedirs(parent, 0o755, exist_ok=True)
            self._know_dir(parent)
        return parent

    def _know_dir(self, path: str) -> None:
        """Record ``path`` and its parents as directories.  The parents matter to the
        file helper: a file is never handed over where a known directory is."""
        known = self._known_dirs
        while path not in known:
            known.add(path)
            path = path[:path.rfind("/")] or "/"

    def _remove(self, path: str) -> None:
        if self._handed_paths:
            self._sync()  # nothing is removed while the helper may write below it
        self._known_dirs.clear()
        self._known_dirs.add(self.root)
        remove_all(path)

    # -- whiteouts ---------------------------------------------------------------

    def _aufs_metadata(self, tar: TarReader, info: Entry, rel: str) -> None:
        """Keep regular files under /.wh..wh.plnk: later hardlinks may point at them."""
        if not (rel.startswith(th.WHITEOUT_LINK_DIR + "/") and info.isreg()):
            return
        stash = self._abs(_PLNK_STASH)
        os.makedirs(stash, 0o700, exist_ok=True)
        key = os.path.basename(rel)
        fd = os.open(os.path.join(stash, key), _CREATE_FLAGS & ~os.O_EXCL | os.O_TRUNC, 0o600)
        try:
            tar.copy_body(fd, info)
        finally:
            os.close(fd)
        self._plnk[key] = info

    def _whiteout(self, info: Entry, parent: str, base: str) -> None:
        if base == th.WHITEOUT_OPAQUE:
            if self.overlay:
                os.setxattr(parent, th.OVERLAY_OPAQUE_XATTR, b"y", follow_symlinks=False)
            else:
                self._drop_lower(parent)
            return
        victim = base[len(th.WHITEOUT_PREFIX):]
        if victim in ("", ".", ".."):
            raise BadEntry(f"whiteout {info.name!r} names no entry")
        target = os.path.join(parent, victim)
        self._remove(target)
        if self.overlay:
            os.mknod(target, stat.S_IFCHR, 0)
            uid, gid = self._host_ids(info)
            os.chown(target, uid, gid, follow_symlinks=False)
            self._unpacked.add(target)

    def _drop_lower(self, directory: str) -> None:
        """Remove every path under ``directory`` this tar did not unpack."""
        if self._handed_paths:
            self._sync()
        try:
            if not stat.S_ISDIR(os.lstat(directory).st_mode):
                return
        except FileNotFoundError:
            return
        pending = [directory]
        while pending:
            current = pending.pop()
            with os.scandir(current) as it:
                entries = list(it)
            for entry in entries:
                if entry.path not in self._unpacked:
                    self._remove(entry.path)
                elif entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)

    # -- entry creation ----------------------------------------------------------

    def _root_entry(self, info: Entry) -> None:
        if not info.isdir():
            raise BadEntry("the layer root entry must be a directory")
        self._apply_metadata(info, self.root)
        self._defer_dir_times(info, self.root)

    def _create(self, tar: TarReader, info: Entry, rel: str) -> None:
        path = self._abs(rel)
        if info.type in tr.REGULAR_TYPES and self._hand_over(tar, info, path):
            self._unpacked.add(path)
            return
        if path in self._handed_paths:
            self._sync()  # the helper may still be writing what this entry replaces
        if info.type in tr.REGULAR_TYPES:
            self._regular(tar, info, path)
        elif info.isdir():
            self._directory(info, path)
        else:
            self._clear(path)
            meta = info
            if info.islnk():
                meta = self._hardlink(info, path)
            elif info.issym():
                self._symlink(info, path)
            elif info.type in _DEVICE_TYPES:
                dev = 0 if info.isfifo() else os.makedev(info.devmajor, info.devminor)
                os.mknod(path, _DEVICE_TYPES[info.type] | 0o600, dev)
            else:
                raise BadEntry(f"unhandled tar header type {info.type!r}")
            # A hardlink to a symlink: chmod/utime would act on the symlink's target.
            if not (info.islnk() and stat.S_ISLNK(os.lstat(path).st_mode)):
                self._apply_metadata(meta, path)
        self._unpacked.add(path)

    def _clear(self, path: str) -> None:
        """Remove whatever is at ``path`` (the entry replaces it)."""
        try:
            existing = os.lstat(path)
        except FileNotFoundError:
            return
        self._remove(path) if stat.S_ISDIR(existing.st_mode) else os.unlink(path)

    def _directory(self, info: Entry, path: str) -> None:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(path).st_mode):  # dir over dir merges
                self._clear(path)
                os.mkdir(path, 0o700)
        self._known_dirs.add(path)
        self._apply_metadata(info, path)
        self._defer_dir_times(info, path)

    def _regular(self, tar: TarReader | None, info: Entry, path: str, body: bytes = b"") -> None:
        """Create, fill and finish a file through one descriptor: fchown, xattrs, fchmod
        and futimens on the fd spare a path lookup each (docker's order: chown clears
        set-id bits, so chmod comes after it).  The body comes from ``tar``, or from
        ``body`` when a file the helper did not create is replayed."""
        try:
            fd = os.open(path, _CREATE_FLAGS, 0o600)
        except FileExistsError:
            self._clear(path)
            fd = os.open(path, _CREATE_FLAGS, 0o600)
        try:
            if tar is not None:
                if info.data_size:
                    tar.copy_body(fd, info)
            else:
                view = memoryview(body)
                while view:
                    view = view[os.write(fd, view):]
            uid, gid = self._host_ids(info)
            os.fchown(fd, uid, gid)
            if info.pax_headers:
                self._set_xattrs(info, fd)
            os.fchmod(fd, info.mode & 0o7777)
            mtime = th.entry_mtime_ns(info)
            os.utime(fd, ns=(th.entry_atime_ns(info, mtime), mtime))
        finally:
            os.close(fd)

    # -- the file helper -----------------------------------------------------------

    def _hand_over(self, tar: TarReader, info: Entry, path: str) -> bool:
        """Give a small regular file to the helper process; False: create it here."""
        if info.sparse is not None or info.data_size > _HELPER_MAX_BODY:
            return False
        helper = self._helper
        if helper is None:
            if self._helper_countdown < 0:
                return False
            if self._helper_countdown > 0:
                self._helper_countdown -= 1
                return False
            self._helper_countdown = -1
            helper = self._helper = FileHelper(close_in_child=(
                (self._source_fd,) if self._source_fd >= 0 else ()))
        cut = path.rfind("/")
        if (path in self._known_dirs or (path[:cut] or "/") not in self._known_dirs
                or not helper.has_room()):
            # A directory to clear first, a parent that is not a directory (the error
            # is raised here, in order), or the helper is behind.
            return False
        if path in self._handed_paths:
            self._sync()  # the same name again: the later entry wins, in order
        body = tar.read_body(info) if info.data_size else b""
        uid, gid = self._host_ids(info)
        mtime = th.entry_mtime_ns(info)
        xattrs = [(n, v) for n, v in _entry_xattrs(info)
                  if not (self.overlay and n.startswith(th.OVERLAY_XATTR_PREFIX))
                  ] if info.pax_headers else []
        helper.add(os.fsencode(path), uid, gid, info.mode & 0o7777,
                   th.entry_atime_ns(info, mtime), mtime, xattrs, body)
        self._handed.append((info, path, body))
        self._handed_paths.add(path)
        self._handed_bytes += len(body)
        if len(self._handed) >= _SYNC_EVERY_FILES or self._handed_bytes >= _SYNC_EVERY_BYTES:
            self._sync()
        return True

    def _handed_above(self, directory: str) -> bool:
        """Was ``directory`` or one of its parents handed over as a file?"""
        while len(directory) > len(self.root):
            if directory in self._handed_paths:
                return True
            directory = directory[:directory.rfind("/")] or "/"
        return False

    def _sync(self, last: bool = False) -> None:
        """Wait for the helper; replay here what it did not create."""
        assert self._helper is not None
        handed = self._handed
        self._handed, self._handed_paths, self._handed_bytes = [], set(), 0
        try:
            self._helper.sync(last)
        except HelperFailed as failed:
            info, path, body = handed[failed.index]
            if failed.error is not None:
                raise _Failed(_os_error(info.name, failed.error)) from None
            for info, path, body in handed[failed.index:]:
                try:
                    self._regular(None, info, path, body)
                except (StrataError, OSError) as exc:
                    raise _Failed(_entry_error(info.name, exc)) from None

    def _hardlink(self, info: Entry, path: str) -> Entry:
        target_rel = clean_name(info.linkname)
        if target_rel.startswith(th.WHITEOUT_LINK_DIR + "/"):
            return self._plnk_copy(info, target_rel, path)
        if target_rel == ".":
            raise BadEntry(f"invalid hardlink target {info.linkname!r}")
        target = self._abs(target_rel)
        self._confine(os.path.dirname(target))
        if self._handed_paths and self._handed_above(target):
            self._sync()  # the link needs the file (or the error its parent causes)
        try:
            os.link(target, path, follow_symlinks=False)
        except FileNotFoundError:
            raise BadEntry(f"hardlink target {info.linkname!r} does not exist") from None
        except (IsADirectoryError, PermissionError) as exc:
            raise BadEntry(f"cannot hardlink to {info.linkname!r}: {exc.strerror}") from None
        return info

    def _plnk_copy(self, info: Entry, target_rel: str, path: str) -> Entry:
        """Legacy AUFS images link into /.wh..wh.plnk, which is never materialised."""
        key = os.path.basename(target_rel)
        source = self._plnk.get(key)
        if source is None:
            raise BadEntry(f"invalid aufs hardlink {info.linkname!r}")
        shutil.copyfile(os.path.join(self._abs(_PLNK_STASH), key), path, follow_symlinks=False)
        return source

    def _symlink(self, info: Entry, path: str) -> None:
        if self.root != "/" and not os.path.isabs(info.linkname):
            # Docker's lexical check; in the chroot every target is confined anyway.
            joined = os.path.normpath(os.path.join(os.path.dirname(path), info.linkname))
            if joined != self.root and not joined.startswith(self.root + "/"):
                raise BadEntry(f"invalid symlink {info.name!r} -> {info.linkname!r}")
        os.symlink(info.linkname, path)

    # -- metadata ------------------------------------------------------------------

    def _host_ids(self, info: Entry) -> tuple[int, int]:
        if self.idmap.empty:
            return info.uid, info.gid
        root_uid, root_gid = self._host_root
        # Docker's ToHost leaves an id alone when it already equals the remapped root.
        uid = info.uid if info.uid == root_uid else self.idmap.to_host(info.uid, 0)[0]
        gid = info.gid if info.gid == root_gid else self.idmap.to_host(0, info.gid)[1]
        return uid, gid

    def _apply_metadata(self, meta: Entry, path: str) -> None:
        """lchown, xattrs, chmod, times — in docker's order (chown clears setuid bits)."""
        uid, gid = self._host_ids(meta)
        os.chown(path, uid, gid, follow_symlinks=False)
        self._set_xattrs(meta, path)
        is_symlink = meta.issym()
        if not is_symlink:
            os.chmod(path, meta.mode & 0o7777)
        if not meta.isdir():
            mtime = th.entry_mtime_ns(meta)
            self._set_times(path, th.entry_atime_ns(meta, mtime), mtime)

    def _set_xattrs(self, info: Entry, path: str | int) -> None:
        for name, value in _entry_xattrs(info):
            if self.overlay and name.startswith(th.OVERLAY_XATTR_PREFIX):
                # Only the opaque marker may create overlay metadata in an upper dir.
                continue
            try:
                # A descriptor is the file itself; a path must not be followed.
                os.setxattr(path, name, value, follow_symlinks=isinstance(path, int))
            except OSError as exc:
                if exc.errno not in _IGNORED_XATTR_ERRNOS:
                    raise
                self._ignored_xattrs += 1

    def _defer_dir_times(self, info: Entry, path: str) -> None:
        mtime = th.entry_mtime_ns(info)
        self._dirs.append(_DirTimes(path, th.entry_atime_ns(info, mtime), mtime))

    @staticmethod
    def _set_times(path: str, atime_ns: int, mtime_ns: int, missing_ok: bool = False) -> None:
        try:
            os.utime(path, ns=(atime_ns, mtime_ns), follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            # A later entry of the tar replaced a directory (or a parent of it).
            if not missing_ok:
                raise


class _Failed(Exception):
    """Carries an error already attributed to its tar entry (by a sync with the helper)
    past the handler that would attribute it to the current entry."""

    def __init__(self, error: StrataError) -> None:
        super().__init__(error)
        self.error = error


def _entry_error(name: str, exc: BaseException) -> StrataError:
    if isinstance(exc, StrataError):
        return type(exc)(f"layer tar entry {name!r}: {exc}")
    if isinstance(exc, OSError):
        return _os_error(name, exc)
    return InvalidArgument(f"layer tar entry {name!r}: {exc}")  # format, owner or time


def _is_aufs_metadata(name: str) -> bool:
    return name.startswith(th.WHITEOUT_META_PREFIX) and name != th.WHITEOUT_OPAQUE


def _entry_xattrs(info: Entry) -> list[tuple[str, bytes]]:
    found: list[tuple[str, bytes]] = []
    for key, value in info.pax_headers.items():
        if key.startswith(th.SCHILY_XATTR):
            found.append((key[len(th.SCHILY_XATTR):], th.pax_value_bytes(value)))
        elif key.startswith(th.LIBARCHIVE_XATTR):
            # bsdtar: URL-encoded name, base64 value.
            name = unquote(key[len(th.LIBARCHIVE_XATTR):])
            found.append((name, base64.b64decode(value + "=" * (-len(value) % 4))))
    return found


def _os_error(name: str, exc: OSError) -> StrataError:
    """Map an OSError while creating an entry to the error dockerd should see."""
    text = f"layer tar entry {name!r}: {exc.strerror or exc}"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS):
        return StrataError(text)
    return InvalidArgument(text)
