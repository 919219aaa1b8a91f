"""The file tree a container sees, as comparable data.

``container_listing`` reads a running container's root from the host through
``/proc/PID/root`` -- the same view whatever the storage driver -- so a tree
served by strata can be compared entry by entry with the in-tree overlay2 one
or with the directory the test image was built from.  ``saved_layer_entries``
does the same for one layer tar of a ``docker save`` archive.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import cast

from tests.engine.harness import Dockerd
from tests.support.files import sha256_file, xattr_pairs
from tests.support.mounts import mount_points
from tests.support.procs import HarnessError


def container_pid(dockerd: Dockerd, container: str) -> int:
    pid = int(dockerd.docker("inspect", "-f", "{{.State.Pid}}", container).stdout.strip())
    if pid <= 0:
        raise HarnessError(f"container {container} is not running (pid {pid})")
    return pid


def tree_listing(root: bytes, skip: Iterable[bytes] = ()) -> dict[bytes, dict[str, object]]:
    """Every entry under ``root`` with the attributes a layer store must keep.

    Keys are absolute paths inside the tree (bytes: names need not be UTF-8).
    Directory sizes and mtimes are file-system details, not layer content, so
    they are left out; regular files carry a content hash and whole-second mtime.
    Hardlinks are recorded as the first path (sorted) of their inode group.
    """
    skip_set = set(skip)
    raw: dict[bytes, os.stat_result] = {}
    stack = [b"/"]
    while stack:
        rel = stack.pop()
        with os.scandir(root + rel) as it:
            for entry in it:
                child = rel.rstrip(b"/") + b"/" + entry.name
                if child in skip_set:
                    continue
                st = entry.stat(follow_symlinks=False)
                raw[child] = st
                if stat.S_ISDIR(st.st_mode):
                    stack.append(child)
    groups: dict[tuple[int, int], bytes] = {}
    for path in sorted(raw):
        st = raw[path]
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            groups.setdefault((st.st_dev, st.st_ino), path)
    listing: dict[bytes, dict[str, object]] = {}
    for path, st in raw.items():
        full = root + path
        item: dict[str, object] = {
            "mode": oct(st.st_mode),
            "uid": st.st_uid,
            "gid": st.st_gid,
            "xattrs": xattr_pairs(full),
        }
        if stat.S_ISREG(st.st_mode):
            item.update(size=st.st_size, sha256=sha256_file(full), mtime=int(st.st_mtime))
        elif stat.S_ISLNK(st.st_mode):
            item["target"] = os.readlink(full)
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            item["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            item["hardlink_group"] = groups[(st.st_dev, st.st_ino)]
        listing[path] = item
    return listing


def container_listing(dockerd: Dockerd, container: str) -> dict[bytes, dict[str, object]]:
    """The running container's root file system, read from the host via /proc/PID/root.

    Mount points inside the container (proc, sys, dev, the /etc/hosts-style
    bind mounts) are not layer content and are skipped with their subtrees.
    """
    pid = container_pid(dockerd, container)
    skip = {os.fsencode(m) for m in mount_points(f"/proc/{pid}/mountinfo") if m != "/"}
    return tree_listing(os.fsencode(f"/proc/{pid}/root"), skip)


def xattrs_of(item: dict[str, object]) -> dict[str, bytes]:
    pairs = cast("tuple[tuple[str, bytes], ...]", item["xattrs"])
    return dict(pairs)


def diff_listings(
    a: dict[bytes, dict[str, object]], b: dict[bytes, dict[str, object]]
) -> list[str]:
    problems = []
    for path in sorted(set(a) | set(b)):
        if path not in a:
            problems.append(f"only in second: {path!r} {b[path]}")
        elif path not in b:
            problems.append(f"only in first: {path!r} {a[path]}")
        elif a[path] != b[path]:
            problems.append(f"differs: {path!r}\n    first:  {a[path]}\n    second: {b[path]}")
    return problems


def saved_layer_entries(archive: Path, index: int = -1) -> list[tuple[str, dict[str, object]]]:
    """The entries of one layer tar of a ``docker save`` archive (the top one by
    default), in stream order, each with what a layer store must reproduce: type,
    hardlink target, mode, owners, size, content hash, mtime and pax records
    (xattrs among them)."""
    with tarfile.open(archive) as saved:
        manifest_file = saved.extractfile("manifest.json")
        if manifest_file is None:
            raise HarnessError(f"{archive}: no manifest.json")
        layer_file = saved.extractfile(json.load(manifest_file)[0]["Layers"][index])
        if layer_file is None:
            raise HarnessError(f"{archive}: layer {index} is missing")
        entries: list[tuple[str, dict[str, object]]] = []
        with tarfile.open(fileobj=layer_file) as layer:
            for member in layer:
                body = layer.extractfile(member) if member.isreg() else None
                entries.append((member.name, {
                    "type": member.type, "linkname": member.linkname,
                    "mode": oct(member.mode), "uid": member.uid, "gid": member.gid,
                    "uname": member.uname, "gname": member.gname, "size": member.size,
                    "sha256": hashlib.sha256(body.read()).hexdigest() if body else None,
                    "mtime": int(member.mtime),
                    "dev": (member.devmajor, member.devminor) if member.ischr() else None,
                    "pax": dict(sorted(member.pax_headers.items())),
                }))
        return entries
