"""What the host supports, found in one place (STYLE 4).

Each probe returns a plain typed value; backends decide with it and Status
shows it.  Model: moby ``overlay2/check.go``, containerd ``overlayutils``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from dataclasses import dataclass

# statfs(2) f_type values (linux/magic.h) of the filesystems strata meets.
FS_MAGIC: dict[int, str] = {
    0xEF53: "extfs",
    0x58465342: "xfs",
    0x9123683E: "btrfs",
    0x794C7630: "overlayfs",
    0x01021994: "tmpfs",
    0x2FC12FC1: "zfs",
    0x65735546: "fuse",
    0xE0F5E1E2: "erofs",
    0x73717368: "squashfs",
    0x6969: "nfs",
    0x858458F6: "ramfs",
    0x61756673: "aufs",
}

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class _Statfs(ctypes.Structure):
    # struct statfs on 64-bit Linux: f_type is the first long; 120 bytes in all.
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 112)]


def fs_magic(path: str) -> int:
    buf = _Statfs()
    if _libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(buf.f_type) & 0xFFFFFFFF


def fs_name(path: str) -> str:
    """Name of the filesystem holding ``path`` (nearest existing ancestor)."""
    while not os.path.exists(path) and path != os.path.dirname(path):
        path = os.path.dirname(path)
    magic = fs_magic(path)
    return FS_MAGIC.get(magic, f"unknown (0x{magic:x})")


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    mountpoint: str
    fstype: str
    source: str
    options: str


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    if "\\" not in field:
        return field
    raw = os.fsencode(field)
    out = bytearray()
    i = 0
    while i < len(raw):
        if raw[i] == 0x5C and i + 3 < len(raw) + 1 and raw[i + 1 : i + 4].isdigit():
            out.append(int(raw[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return os.fsdecode(bytes(out))


def mountinfo(path: str = "/proc/self/mountinfo") -> list[MountEntry]:
    entries = []
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            fstype, source, *rest = right.split()
            entries.append(
                MountEntry(int(fields[0]), _unescape(fields[4]), fstype, _unescape(source),
                           rest[0] if rest else "")
            )
    return entries


def mounts_under(prefix: str) -> list[str]:
    """Mountpoints at or below ``prefix``, deepest first (the order to unmount)."""
    prefix = prefix.rstrip("/")
    found = {m.mountpoint for m in mountinfo()
             if m.mountpoint == prefix or m.mountpoint.startswith(prefix + "/")}
    return sorted(found, key=lambda p: p.count("/"), reverse=True)


def filesystems() -> set[str]:
    """Filesystem types the running kernel knows (/proc/filesystems)."""
    with open("/proc/filesystems", encoding="ascii") as f:
        return {line.split()[-1] for line in f if line.strip()}
