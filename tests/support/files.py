"""Small file and layer helpers: write and read a file, hash it, list its
xattrs, build a layer tar the way ``docker save`` and a registry hand one over."""

from __future__ import annotations

import hashlib
import io
import os
import secrets
import tarfile
from collections.abc import Iterable, Mapping
from pathlib import Path

PathLike = str | bytes | Path


def new_layer_id() -> str:
    """A layer id shaped like dockerd's: 64 random hex digits."""
    return secrets.token_hex(32)


def write_file(path: str | Path, data: bytes, mode: int | None = 0o644) -> None:
    """Write ``data`` to ``path``, making its parent directories; ``mode`` is set
    exactly (not left to the umask) unless None."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    if mode is not None:
        os.chmod(path, mode)


def read_file(path: str | Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def sha256_file(path: PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def xattr_pairs(path: PathLike) -> tuple[tuple[str, bytes], ...]:
    """The xattrs of ``path`` itself (a symlink's own), sorted; none where unsupported."""
    try:
        names = sorted(os.listxattr(path, follow_symlinks=False))
        return tuple((n, os.getxattr(path, n, follow_symlinks=False)) for n in names)
    except OSError:
        return ()


def _add_entries(tf: tarfile.TarFile, entries: Iterable[tuple[str, bytes | None]]) -> None:
    for name, data in entries:
        info = tarfile.TarInfo(name.rstrip("/"))
        if data is None or name.endswith("/"):
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tf.addfile(info)
        else:
            info.size, info.mode = len(data), 0o644
            tf.addfile(info, io.BytesIO(data))


def layer_tar(files: Mapping[str, bytes | None]) -> bytes:
    """A PAX layer tar of ``files`` in their order: ``name: data`` is a 0644 file,
    ``"name/": None`` a 0755 directory."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        _add_entries(tf, files.items())
    return buf.getvalue()


def write_layer_tar(path: Path, entries: Iterable[tuple[str, bytes | None]]) -> None:
    """``layer_tar`` written to ``path`` as the entries come (a large layer never
    sits in memory whole)."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        _add_entries(tf, entries)
