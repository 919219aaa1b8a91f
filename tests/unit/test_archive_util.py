"""Helpers shared by the archive tests (no tests here)."""

from __future__ import annotations

import io
import os
import stat
import struct
import tarfile
from dataclasses import dataclass
from pathlib import Path

from plugin.archive import TarStream

# VFS_CAP_REVISION_2 with the effective flag, permitted = CAP_NET_BIND_SERVICE (bit 10).
CAP_V2 = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)


def read_all(stream: TarStream) -> bytes:
    chunks = []
    try:
        while chunk := stream.read(65536):
            chunks.append(chunk)
    finally:
        stream.close()
    return b"".join(chunks)


@dataclass(frozen=True)
class Entry:
    name: str
    type: bytes = tarfile.REGTYPE
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = 1_600_000_000
    linkname: str = ""
    pax: tuple[tuple[str, str], ...] = ()
    devmajor: int = 0
    devminor: int = 0


def make_tar(entries: list[Entry], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8",
                      errors="surrogateescape") as tar:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.type, info.mode, info.uid, info.gid = e.type, e.mode, e.uid, e.gid
            info.mtime, info.linkname = e.mtime, e.linkname
            info.devmajor, info.devminor = e.devmajor, e.devminor
            info.pax_headers = dict(e.pax)
            if e.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
                info.size = len(e.data)
                tar.addfile(info, io.BytesIO(e.data))
            else:
                tar.addfile(info)
    return buf.getvalue()


def tar_members(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:", encoding="utf-8",
                      errors="surrogateescape") as tar:
        return tar.getmembers()


def xattrs(path: str) -> dict[str, bytes]:
    return {n: os.getxattr(path, n, follow_symlinks=False)
            for n in sorted(os.listxattr(path, follow_symlinks=False))}


def snapshot(root: Path, with_root: bool = False) -> dict[str, tuple[object, ...]]:
    """Everything a layer must preserve, per relative path, plus hardlink groups."""
    out: dict[str, tuple[object, ...]] = {}
    inodes: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                payload: object = Path(path).read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                payload = os.readlink(path)
            else:
                payload = None
            out[rel] = (st.st_mode, st.st_uid, st.st_gid, st.st_rdev,
                        st.st_size if not stat.S_ISDIR(st.st_mode) else None,
                        st.st_mtime_ns // 10**9, payload, xattrs(path))
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                inodes.setdefault(st.st_ino, []).append(rel)
    groups = sorted(sorted(g) for g in inodes.values())
    out["<hardlink groups>"] = tuple(tuple(g) for g in groups)
    if with_root:
        st = os.lstat(root)
        out["."] = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns // 10**9, xattrs(str(root)))
    return out


def tree_files(root: Path) -> set[str]:
    """Every path under root, relative."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            found.add(os.path.relpath(os.path.join(dirpath, name), root))
    return found
