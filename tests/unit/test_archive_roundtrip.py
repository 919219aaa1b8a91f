"""export_tree -> apply_layer fidelity, GNU tar input, Size, ID maps."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from plugin.archive import ApplyOptions, apply_layer, export_tree
from plugin.idtools import IDMap, IDMappings
from tests.unit.test_archive_util import (
    CAP_V2,
    Entry,
    make_tar,
    read_all,
    snapshot,
    tar_members,
)

T0 = 1_500_000_000


def _build_tree(root: Path) -> None:
    root.mkdir()
    (root / "etc").mkdir()
    (root / "etc" / "motd").write_text("hello\n")
    os.link(root / "etc" / "motd", root / "etc" / "motd.hl")
    os.link(root / "etc" / "motd", root / "motd.hl2")
    (root / "bin").mkdir()
    (root / "bin" / "ping").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    os.chmod(root / "bin" / "ping", 0o4755)
    os.setxattr(root / "bin" / "ping", "security.capability", CAP_V2)
    os.setxattr(root / "bin" / "ping", "user.text", b"plain")
    os.setxattr(root / "bin" / "ping", "user.binary", b"\xff\x00\x80\xfe")
    os.chown(root / "bin" / "ping", 1000, 1001)
    (root / "shared").mkdir(mode=0o2775)
    os.chmod(root / "shared", 0o2775)
    (root / "tmp").mkdir()
    os.chmod(root / "tmp", 0o1777)
    (root / "empty").write_bytes(b"")
    (root / "link").symlink_to("/etc/motd")
    (root / "rel").symlink_to("etc/motd")
    os.setxattr(root / "rel", "trusted.sym", b"on-link", follow_symlinks=False)
    os.mkfifo(root / "fifo")
    os.mknod(root / "null", 0o20666, os.makedev(1, 3))
    os.mknod(root / "loop0", 0o60660, os.makedev(7, 0))
    long_dir = root / ("d" * 120) / ("e" * 120)
    long_dir.mkdir(parents=True)
    (long_dir / ("f" * 150)).write_text("long")
    (root / os.fsdecode(b"caf\xe9-latin1")).write_text("not utf-8 name")
    os.setxattr(root / "etc", "user.dir", b"on-dir")
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (T0, T0 + 1), follow_symlinks=False)


def test_round_trip_is_identical(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    _build_tree(src)
    dst.mkdir()
    data = read_all(export_tree(str(src), IDMappings()))
    size = apply_layer(str(dst), io.BytesIO(data), ApplyOptions())
    assert snapshot(dst) == snapshot(src)
    assert size == sum(m.size for m in tar_members(data))


def test_round_trip_through_gnu_tar(tmp_path: Path) -> None:
    """Our export is readable by GNU tar, and GNU tar's output applies to the same tree."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    _build_tree(src)
    dst.mkdir()
    ours = tmp_path / "ours.tar"
    ours.write_bytes(read_all(export_tree(str(src), IDMappings())))
    listed = subprocess.run(["tar", "-tf", str(ours)], check=True, capture_output=True).stdout
    assert b"etc/motd.hl\n" in listed
    gnu = subprocess.run(
        ["tar", "--xattrs", "--xattrs-include=*", "--format=pax", "--numeric-owner",
         "-C", str(src), "-cf", "-", "."], check=True, capture_output=True).stdout
    size = apply_layer(str(dst), io.BytesIO(gnu), ApplyOptions())
    got, want = snapshot(dst, with_root=True), snapshot(src, with_root=True)
    assert got == want
    assert size == sum(m.size for m in tar_members(gnu))


def test_pax_nanosecond_mtimes_and_global_header(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT,
                      pax_headers={"comment": "global"}) as tar:
        info = tarfile.TarInfo("./f")
        info.size = 3
        info.pax_headers = {"mtime": "1600000000.123456789", "atime": "1700000000.5"}
        tar.addfile(info, io.BytesIO(b"abc"))
        d = tarfile.TarInfo("./d")
        d.type = tarfile.DIRTYPE
        d.pax_headers = {"mtime": "1600000001.000000042"}
        tar.addfile(d)
        inner = tarfile.TarInfo("./d/x")
        tar.addfile(inner)
    (tmp_path / "r").mkdir()
    assert apply_layer(str(tmp_path / "r"), io.BytesIO(buf.getvalue()), ApplyOptions()) == 3
    st = os.lstat(tmp_path / "r" / "f")
    assert st.st_mtime_ns == 1_600_000_000_123_456_789
    assert st.st_atime_ns == 1_700_000_000_500_000_000
    assert os.lstat(tmp_path / "r" / "d").st_mtime_ns == 1_600_000_001_000_000_042


def test_size_is_sum_of_header_sizes(tmp_path: Path) -> None:
    data = make_tar([
        Entry("a", data=b"12345"), Entry("dir/", type=tarfile.DIRTYPE, mode=0o755),
        Entry("dir/b", data=b"x" * 1000), Entry("c", type=tarfile.LNKTYPE, linkname="a"),
        Entry(".wh.gone"), Entry("s", type=tarfile.SYMTYPE, linkname="a"),
    ])
    (tmp_path / "r").mkdir()
    assert apply_layer(str(tmp_path / "r"), io.BytesIO(data), ApplyOptions()) == 1005


def test_root_entry_metadata_and_dot_slash_names(tmp_path: Path) -> None:
    data = make_tar([
        Entry("./", type=tarfile.DIRTYPE, mode=0o750, uid=5, gid=6, mtime=T0,
              pax=(("SCHILY.xattr.user.root", "r"),)),
        Entry("./x/y", data=b"deep"),
    ])
    root = tmp_path / "r"
    root.mkdir()
    apply_layer(str(root), io.BytesIO(data), ApplyOptions())
    st = os.lstat(root)
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid, int(st.st_mtime)) == (0o750, 5, 6, T0)
    assert os.getxattr(root, "user.root") == b"r"
    assert (root / "x" / "y").read_bytes() == b"deep"


IDMAP = IDMappings(uids=(IDMap(0, 100000, 65536),), gids=(IDMap(0, 200000, 65536),))


def test_idmap_container_to_host_on_apply(tmp_path: Path) -> None:
    data = make_tar([Entry("f", uid=0, gid=0), Entry("g", uid=1000, gid=50),
                     Entry("d/", type=tarfile.DIRTYPE, uid=33, gid=33, mode=0o755)])
    root = tmp_path / "r"
    root.mkdir()
    apply_layer(str(root), io.BytesIO(data), ApplyOptions(idmap=IDMAP))
    owners = {n: (os.lstat(root / n).st_uid, os.lstat(root / n).st_gid) for n in "fgd"}
    assert owners == {"f": (100000, 200000), "g": (101000, 200050), "d": (100033, 200033)}


def test_idmap_unmapped_id_is_invalid(tmp_path: Path) -> None:
    from plugin.errors import InvalidArgument

    data = make_tar([Entry("f", uid=70000)])
    (tmp_path / "r").mkdir()
    with pytest.raises(InvalidArgument, match="70000"):
        apply_layer(str(tmp_path / "r"), io.BytesIO(data), ApplyOptions(idmap=IDMAP))


def test_idmap_host_to_container_on_export(tmp_path: Path) -> None:
    root = tmp_path / "r"
    root.mkdir()
    (root / "f").write_text("x")
    os.chown(root / "f", 101000, 200050)
    (root / "unmapped").write_text("x")
    os.chown(root / "unmapped", 5, 5)
    members = {m.name: m for m in tar_members(read_all(export_tree(str(root), IDMAP)))}
    assert (members["f"].uid, members["f"].gid) == (1000, 50)
    # Docker logs and skips a file whose owner has no container id.
    assert "unmapped" not in members


def test_export_does_not_follow_symlinks_and_truncates_mtime(tmp_path: Path) -> None:
    root = tmp_path / "r"
    root.mkdir()
    (root / "f").write_text("x")
    os.utime(root / "f", ns=(T0 * 10**9 + 999, T0 * 10**9 + 999))
    (root / "out").symlink_to("/etc")
    members = {m.name: m for m in tar_members(read_all(export_tree(str(root), IDMappings())))}
    assert set(members) == {"f", "out"}
    assert members["out"].issym() and members["out"].linkname == "/etc"
    assert members["f"].mtime == T0 and "mtime" not in members["f"].pax_headers


def test_export_of_missing_root_fails(tmp_path: Path) -> None:
    from plugin.errors import NotFound

    with pytest.raises(NotFound):
        export_tree(str(tmp_path / "nope"), IDMappings())


def test_export_stream_close_early_kills_child(tmp_path: Path) -> None:
    root = tmp_path / "r"
    root.mkdir()
    (root / "big").write_bytes(b"\0" * (8 << 20))
    stream = export_tree(str(root), IDMappings())
    assert len(stream.read(1024)) > 0
    stream.close()
    stream.close()  # idempotent


def test_tar_stream_reports_child_failure(tmp_path: Path) -> None:
    import subprocess
    import sys
    import tempfile

    from plugin.archive import TarStream
    from plugin.errors import StrataError

    script = ("import sys; sys.stdout.write('partial'); "
              "sys.stderr.write('INFO noise\\nFATAL boom at /x\\n'); sys.exit(3)")
    stderr = tempfile.TemporaryFile()  # noqa: SIM115 - owned by the TarStream
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=stderr)
    stream = TarStream(proc, stderr, "exporting /x")
    assert stream.read(100) == b"partial"
    with pytest.raises(StrataError, match="exporting /x: boom at /x"):
        stream.read(100)
    assert stream.read(100) == b""
    stream.close()
