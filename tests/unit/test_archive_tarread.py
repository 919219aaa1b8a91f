"""The fast tar reader agrees with ``tarfile`` on every header form it parses, and the
zygote forks workers (and is replaced when it dies)."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plugin.archive import ApplyOptions, apply_layer, export_tree
from plugin.archive.proc import stream as archive_stream
from plugin.archive.tar import reader as tarread
from plugin.archive.tar.reader import TarFormatError, TarReader
from plugin.idtools import IDMappings
from tests.unit.test_archive_util import Entry, make_tar, read_all


def _entries(data: bytes) -> list[tuple[object, ...]]:
    reader = TarReader(io.BytesIO(data))
    out: list[tuple[object, ...]] = []
    while (entry := reader.next()) is not None:
        body = reader.read_body(entry) if entry.isreg() and entry.sparse is None else b""
        out.append((entry.name, entry.type, entry.mode, entry.uid, entry.gid, entry.size,
                    int(entry.mtime), entry.linkname, entry.devmajor, entry.devminor,
                    dict(entry.pax_headers), body))
    return out


def _tarfile_entries(data: bytes) -> list[tuple[object, ...]]:
    out: list[tuple[object, ...]] = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|", encoding="utf-8",
                      errors="surrogateescape") as tar:
        for info in tar:
            body = b""
            if info.isreg() and not info.issparse():
                f = tar.extractfile(info)
                body = f.read() if f is not None else b""
            out.append((info.name, info.type, info.mode, info.uid, info.gid, info.size,
                        int(info.mtime), info.linkname, info.devmajor, info.devminor,
                        dict(info.pax_headers), body))
    return out


_ENTRIES = [
    Entry("dir/", type=tarfile.DIRTYPE, mode=0o755, uid=7, gid=8),
    Entry("dir/file", data=b"hello", mode=0o4755, uid=0o7777777 + 5, gid=3),
    Entry("x" * 150 + "/" + "y" * 120, data=b"long"),
    Entry("link", type=tarfile.SYMTYPE, linkname="z" * 130),
    Entry("hl", type=tarfile.LNKTYPE, linkname="dir/file"),
    Entry("dev", type=tarfile.CHRTYPE, devmajor=1, devminor=3),
    Entry(os.fsdecode(b"caf\xe9"), data=b"latin1",
          pax=(("SCHILY.xattr.user.v", os.fsdecode(b"\xff\x00")),)),
    Entry("t", data=b"x", mtime=-100, pax=(("mtime", "1600000000.5"),)),
]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_headers_parse_like_tarfile(fmt: int) -> None:
    entries = _ENTRIES if fmt != tarfile.USTAR_FORMAT else [
        e for e in _ENTRIES if len(e.name) < 100 and len(e.linkname) < 100 and not e.pax
        and e.uid < 0o7777777 and e.mtime >= 0]
    data = make_tar(entries, fmt)
    assert _entries(data) == _tarfile_entries(data)


def test_global_pax_header_applies_to_later_entries() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT,
                      pax_headers={"uid": "42", "comment": "g"}) as tar:
        tar.addfile(tarfile.TarInfo("a"))
        tar.addfile(tarfile.TarInfo("b"))
    assert _entries(buf.getvalue()) == _tarfile_entries(buf.getvalue())
    assert [e[3] for e in _entries(buf.getvalue())] == [42, 42]


@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_sparse_files_from_gnu_tar(tmp_path: Path, fmt: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "sparse", "wb") as f:
        f.write(b"head")
        f.seek(5 << 20)
        f.write(b"middle")
        f.truncate(9 << 20)
    archive = tmp_path / "s.tar"
    subprocess.run(["tar", "-c", "-S", f"--format={fmt}", "-f", str(archive), "-C", str(src),
                    "sparse"], check=True)
    dst = tmp_path / "dst"
    dst.mkdir()
    size = apply_layer(str(dst), io.BytesIO(archive.read_bytes()), ApplyOptions())
    assert size == 9 << 20
    assert (dst / "sparse").read_bytes() == (src / "sparse").read_bytes()


def test_short_body_is_an_error() -> None:
    data = make_tar([Entry("f", data=b"x" * 5000)])[:512 + 1000]
    reader = TarReader(io.BytesIO(data))
    entry = reader.next()
    assert entry is not None
    with pytest.raises(TarFormatError):
        reader.read_body(entry)


def test_big_body_is_spliced_from_a_pipe(tmp_path: Path) -> None:
    payload = os.urandom(3 << 20)
    data = make_tar([Entry("big", data=payload)])
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        with open(w, "wb") as out:
            out.write(data)
        os._exit(0)
    os.close(w)
    try:
        reader = TarReader(r)
        entry = reader.next()
        assert entry is not None
        fd = os.open(tmp_path / "big", os.O_WRONLY | os.O_CREAT, 0o600)
        reader.copy_body(fd, entry)
        os.close(fd)
        assert reader.next() is None
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    assert (tmp_path / "big").read_bytes() == payload


def test_zygote_replaced_after_it_dies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(archive_stream, "MEMORY_EXPORT_MAX_ENTRIES", 0)  # a worker's export
    root = tmp_path / "r"
    root.mkdir()
    (root / "f").write_bytes(b"data")
    assert b"data" in read_all(export_tree(str(root), IDMappings()))
    zygote = archive_stream._ZYGOTE._proc
    assert zygote is not None and zygote.poll() is None
    zygote.kill()
    zygote.wait()
    assert b"data" in read_all(export_tree(str(root), IDMappings()))
    assert archive_stream._ZYGOTE._proc is not zygote


@settings(max_examples=500, deadline=None)
@given(nonzero=st.integers(0, 512), seed=st.binary(min_size=512, max_size=512))
def test_header_byte_sum_is_exact(nonzero: int, seed: bytes) -> None:
    """The Adler-32 shortcut equals sum() on headers with few and many non-zero bytes."""
    block = bytes(b or 255 for b in seed[:nonzero]) + bytes(512 - nonzero)
    assert tarread._byte_sum(block) == sum(block)
    assert tarread._byte_sum(b"\xff" * 512) == 512 * 255


def test_checksum_off_by_the_adler_modulus_is_refused() -> None:
    block = bytearray(tarfile.TarInfo("x" * 99).tobuf(tarfile.USTAR_FORMAT)[:512])
    good = int(block[148:154], 8)
    block[148:156] = b"%06o\0 " % (good + 65521)
    assert not tarread._checksum_ok(bytes(block))
    block[148:156] = b"%06o\0 " % good
    assert tarread._checksum_ok(bytes(block))
