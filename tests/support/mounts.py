"""``/proc/*/mountinfo`` parsed once, and mounts a test left undone.

The tests read mountinfo themselves rather than through ``plugin.driver.probes``:
a check that nothing is left mounted must not share a parser with the code it
checks.  Format: proc(5); fields 5 (mount point) and the source after `` - `` have
space, tab, newline and backslash escaped as ``\\ooo`` octal.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.support.procs import HarnessError

SELF = "/proc/self/mountinfo"


@dataclass(frozen=True)
class Mount:
    mountpoint: str
    fstype: str
    source: str
    options: str  # the per-mount options (rw, nosuid, ...)
    super_options: str  # the filesystem's (overlay's lowerdir=..., ...)


def unescape(field_text: str) -> str:
    out, i = [], 0
    while i < len(field_text):
        if field_text[i] == "\\" and field_text[i + 1 : i + 4].isdigit():
            out.append(chr(int(field_text[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field_text[i])
            i += 1
    return "".join(out)


def mountinfo(path: str = SELF) -> list[Mount]:
    """Every mount in ``path`` (another process's view: ``/proc/PID/mountinfo``)."""
    found = []
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            fstype, source, *rest = right.split()
            found.append(Mount(unescape(fields[4]), fstype, unescape(source), fields[5],
                               rest[0] if rest else ""))
    return found


def mount_points(path: str = SELF) -> list[str]:
    return [m.mountpoint for m in mountinfo(path)]


def mount_at(point: str) -> Mount | None:
    """The top mount at ``point``, or None when nothing is mounted there."""
    found = [m for m in mountinfo() if m.mountpoint == point]
    return found[-1] if found else None


def is_mounted(point: str) -> bool:
    return mount_at(point) is not None


def mounts_under(root: str | Path, fstype: str | None = None,
                 include_root: bool = True) -> list[str]:
    """Mount points at (with ``include_root``) or below ``root``, deepest first,
    optionally only of ``fstype``; ``root`` is compared as given (resolve links first)."""
    prefix = str(root).rstrip("/")
    found = {m.mountpoint for m in mountinfo()
             if (m.mountpoint.startswith(prefix + "/")
                 or (include_root and m.mountpoint == prefix))
             and (fstype is None or m.fstype == fstype)}
    return sorted(found, key=lambda p: p.count("/"), reverse=True)


def assert_no_mounts_under(path: str) -> None:
    left = mounts_under(os.path.realpath(path))
    assert not left, f"mounts left under {path}: {left}"


def unmount_all_under(root: Path) -> None:
    """Lazily unmount everything at or below ``root``, deepest first."""
    for _ in range(5):  # a lazy unmount of a parent can reveal nothing new, but be sure
        found = mounts_under(root)
        if not found:
            return
        for point in found:
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)
    left = mounts_under(root)
    if left:
        raise HarnessError(f"could not unmount under {root}: {left}")
