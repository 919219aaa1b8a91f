"""What changed between two directory trees (docker ``ChangesDirs``/``ChangesSize``).

Semantics are docs/protocol.md §6.6, read from ``pkg/archive/changes.go`` and
``changes_linux.go``:

* a path only in ``new`` is ADD, and so is everything below an added directory;
* a path only in ``old`` is DELETE, and only the topmost one of a removed subtree;
* a path in both is MODIFY when mode, uid, gid or rdev differ, or for non-dirs
  when size or mtime differ, or when ``security.capability`` differs.  mtimes
  match when the seconds match and either side has 0 ns, because tar-extracted
  files lose sub-second precision;
* a directory containing any change gets a MODIFY placed just before its
  children's entries, unless it is itself listed; ``/`` is never listed;
* entries with the same inode on the same device are skipped with their whole
  subtree, as docker's walker does;
* with ``link_partners`` (what a layer tar needs, not ``docker diff``), an
  unchanged non-directory that shares its inode with an added or changed one is
  MODIFY too.  ``ln /lower /new`` makes overlay2 copy ``/lower`` up, so its layer
  tar (the upper dir) carries both names as a hardlink pair, while its ``docker
  diff`` (docker 20.10's overlay2 Changes is ChangesDirs on the two mounts) shows
  ``A /new`` alone.  A naive Diff without the rule put ``/new`` alone in the tar,
  as a plain file, and the image lost the link.  A changed link *count* alone is
  not the rule: removing one of two lower names leaves the other in the lower on
  overlay2, not in its tar.

Docker iterates Go maps, so its order within a directory is random; ours is
deterministic: a directory's existing/added children in byte order, then its
deleted children in byte order.
"""

from __future__ import annotations

import enum
import logging
import os
import stat
from dataclasses import dataclass

from plugin.errors import NotFound, StrataError

log = logging.getLogger("strata.archive")

_CAP_XATTR = "security.capability"
_NS = 1_000_000_000
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class ChangeKind(enum.IntEnum):
    MODIFY = 0
    ADD = 1
    DELETE = 2


@dataclass(frozen=True)
class Change:
    path: str  # absolute inside the layer, "/etc/motd"
    kind: ChangeKind

    def __str__(self) -> str:
        return f"{'CAD'[self.kind]} {self.path}"


def changes(new_root: str, old_root: str | None, *, link_partners: bool = False
            ) -> list[Change]:
    """Docker's ``ChangesDirs(new_root, old_root)``; ``old_root=None`` compares to empty.
    ``link_partners``: also list the other names of a listed inode (module doc)."""
    for root in (new_root, old_root):
        if root is not None and not os.path.isdir(root):
            raise NotFound(f"changes: {root} is not a directory")
    out: list[Change] = []
    try:
        links = _Links(frozenset())
        _compare_roots(new_root, old_root, out, links)
        if link_partners and links.listed & links.quiet:
            # Whether an entry shares an inode with a later one is known only at the
            # end; a second walk lists them in place, parent directories included.
            out = []
            _compare_roots(new_root, old_root, out, _Links(frozenset(links.listed)))
    except RecursionError:
        raise StrataError(f"changes: directory tree under {new_root} is too deep") from None
    except OSError as exc:
        raise StrataError(f"changes between {new_root} and {old_root}: {exc}") from None
    return out


def changes_size(new_root: str, changes: list[Change]) -> int:
    """Docker's ``ChangesSize``: lstat sizes of ADD/MODIFY non-dirs, each hardlinked inode once."""
    size = 0
    seen_inodes: set[int] = set()
    for change in changes:
        if change.kind == ChangeKind.DELETE:
            continue
        path = os.path.join(new_root, change.path.lstrip("/"))
        try:
            st = os.lstat(path)
        except OSError as exc:
            log.error("can not stat %s: %s", path, exc.strerror or exc)
            continue
        if stat.S_ISDIR(st.st_mode):
            continue
        if st.st_nlink > 1:
            if st.st_ino in seen_inodes:
                continue
            seen_inodes.add(st.st_ino)
        size += st.st_size
    return size


def _entries(dir_fd: int | None) -> dict[str, os.DirEntry[str]]:
    """name -> entry of an open directory's entries; empty for None.  The entries'
    ``stat`` is an ``fstatat`` on the directory: the kernel looks up one name, not
    a path walked from the root."""
    if dir_fd is None:
        return {}
    with os.scandir(dir_fd) as it:
        return {entry.name: entry for entry in it}


def _open_dir(name: str, dir_fd: int | None = None) -> int:
    return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)


class _Links:
    """The multiply-linked non-directories of one walk, by (st_dev, st_ino)."""

    def __init__(self, promote: frozenset[tuple[int, int]]) -> None:
        self.promote = promote  # inodes whose every name is listed (second walk)
        self.listed: set[tuple[int, int]] = set()  # inodes of ADD/MODIFY entries
        self.quiet: set[tuple[int, int]] = set()  # inodes of unlisted entries

    def promoted(self, st: os.stat_result) -> bool:
        return st.st_nlink > 1 and (st.st_dev, st.st_ino) in self.promote

    def note(self, st: os.stat_result, listed: bool) -> None:
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            (self.listed if listed else self.quiet).add((st.st_dev, st.st_ino))


def _compare_roots(new_root: str, old_root: str | None, out: list[Change],
                   links: _Links) -> None:
    new_fd = _open_dir(new_root)
    try:
        old_fd = None if old_root is None else _open_dir(old_root)
        try:
            _compare_dirs(new_root, old_root, "", out, links, new_fd, old_fd)
        finally:
            if old_fd is not None:
                os.close(old_fd)
    finally:
        os.close(new_fd)


def _compare_dirs(new_dir: str, old_dir: str | None, rel: str, out: list[Change],
                  links: _Links, new_fd: int, old_fd: int | None) -> None:
    """Append the changes below ``rel`` (``""`` for the root); ``new_dir`` is a
    directory open as ``new_fd``, ``old_dir`` one open as ``old_fd`` (or None).
    Entries are stat'ed relative to their open directory; the paths are only for
    the xattr calls, which take no directory fd."""
    new_entries = _entries(new_fd)
    old_entries = _entries(old_fd)
    same_device = old_fd is not None and os.fstat(new_fd).st_dev == os.fstat(old_fd).st_dev
    for name in sorted(new_entries, key=os.fsencode):
        child_rel = f"{rel}/{name}"
        new_path = f"{new_dir}/{name}"  # not os.path.join: its checks, twice an entry, cost more
        entry = new_entries[name]
        new_st = entry.stat(follow_symlinks=False)
        old_entry = old_entries.get(name)
        if old_dir is None or old_entry is None:
            out.append(Change(child_rel, ChangeKind.ADD))
            links.note(new_st, listed=True)
            if stat.S_ISDIR(new_st.st_mode):
                _descend(name, new_fd, None, new_path, None, child_rel, out, links)
            continue
        if same_device and entry.inode() == old_entry.inode():
            continue
        old_path = f"{old_dir}/{name}"
        old_st = old_entry.stat(follow_symlinks=False)
        listed = (_stat_different(old_st, new_st) or links.promoted(new_st)
                  or _capability(old_path) != _capability(new_path))
        links.note(new_st, listed)
        if listed:
            out.append(Change(child_rel, ChangeKind.MODIFY))
        if stat.S_ISDIR(new_st.st_mode):
            start = len(out)
            old_dir_fd = old_fd if stat.S_ISDIR(old_st.st_mode) else None
            _descend(name, new_fd, old_dir_fd, new_path, old_path, child_rel, out, links)
            if len(out) > start and not listed:
                out.insert(start, Change(child_rel, ChangeKind.MODIFY))
    deleted = [name for name in old_entries if name not in new_entries]
    for name in sorted(deleted, key=os.fsencode):
        out.append(Change(f"{rel}/{name}", ChangeKind.DELETE))


def _descend(name: str, new_fd: int, old_fd: int | None, new_path: str, old_path: str | None,
             rel: str, out: list[Change], links: _Links) -> None:
    """Compare the subdirectory ``name`` of the open ``new_fd`` with the one of
    ``old_fd`` (None: with nothing)."""
    sub = _open_dir(name, new_fd)
    try:
        old_sub = None if old_fd is None else _open_dir(name, old_fd)
        try:
            _compare_dirs(new_path, old_path if old_sub is not None else None, rel, out, links,
                          sub, old_sub)
        finally:
            if old_sub is not None:
                os.close(old_sub)
    finally:
        os.close(sub)


def _stat_different(old: os.stat_result, new: os.stat_result) -> bool:
    if (old.st_mode, old.st_uid, old.st_gid, old.st_rdev) != (
            new.st_mode, new.st_uid, new.st_gid, new.st_rdev):
        return True
    if stat.S_ISDIR(old.st_mode):
        # Directory size and mtime are not a measure of change (moby#9874).
        return False
    return old.st_size != new.st_size or not _same_fs_time(old.st_mtime_ns, new.st_mtime_ns)


def _same_fs_time(a_ns: int, b_ns: int) -> bool:
    a_sec, a_frac = divmod(a_ns, _NS)
    b_sec, b_frac = divmod(b_ns, _NS)
    return a_sec == b_sec and (a_frac == b_frac or a_frac == 0 or b_frac == 0)


def _capability(path: str) -> bytes | None:
    """The ``security.capability`` xattr, None without one.  Listing first: most files
    have none, and a failed getxattr raises, which costs more than the listing
    (and this runs twice per entry of a comparison)."""
    try:
        if _CAP_XATTR not in os.listxattr(path, follow_symlinks=False):
            return None
        return os.getxattr(path, _CAP_XATTR, follow_symlinks=False)
    except OSError:
        return None
