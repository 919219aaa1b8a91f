"""Whiteouts and opaque directories, aufs (vfs) and overlay forms (docs/protocol.md §6.2)."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from plugin.archive import ApplyOptions, apply_layer, export_tree
from plugin.archive.tar.writer import LayerWriter
from plugin.idtools import IDMappings
from tests.unit.test_archive_util import Entry, make_tar, read_all, tar_members, tree_files

REG, DIR, LNK = tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.LNKTYPE
AUFS, OVERLAY = ApplyOptions(), ApplyOptions(whiteout_format="overlay")


@pytest.fixture()
def lower(tmp_path: Path) -> Path:
    """A root pre-populated with a parent layer's merged tree."""
    root = tmp_path / "root"
    for d in ("etc", "opt/app/sub", "var/cache"):
        (root / d).mkdir(parents=True)
    for f in ("etc/victim", "etc/keep", "opt/app/old", "opt/app/sub/deep", "var/cache/c",
              "etc/passwd"):
        (root / f).write_text(f)
    return root


def test_aufs_whiteout_deletes_file_and_dir(lower: Path) -> None:
    data = make_tar([Entry("etc/.wh.victim"), Entry(".wh.var"), Entry("etc/.wh.absent")])
    assert apply_layer(str(lower), io.BytesIO(data), AUFS) == 0
    files = tree_files(lower)
    assert "etc/victim" not in files and "var" not in files and "etc/keep" in files
    assert not any(".wh." in f for f in files)


def test_aufs_opaque_keeps_only_this_tars_entries(lower: Path) -> None:
    data = make_tar([
        Entry("opt/app/", type=DIR, mode=0o755),
        Entry("opt/app/new", data=b"n"),
        Entry("opt/app/sub/", type=DIR, mode=0o755),
        Entry("opt/app/sub/fresh", data=b"f"),
        Entry("opt/app/.wh..wh..opq"),
        Entry("opt/app/later", data=b"l"),
    ])
    apply_layer(str(lower), io.BytesIO(data), AUFS)
    under = {f for f in tree_files(lower) if f.startswith("opt/app/")}
    assert under == {"opt/app/new", "opt/app/sub", "opt/app/sub/fresh", "opt/app/later"}


def test_delete_then_recreate_in_one_tar(lower: Path) -> None:
    data = make_tar([Entry("etc/.wh.victim"), Entry("etc/victim", data=b"again")])
    apply_layer(str(lower), io.BytesIO(data), AUFS)
    assert (lower / "etc" / "victim").read_bytes() == b"again"


def test_other_aufs_metadata_is_skipped_and_plnk_links_resolve(lower: Path) -> None:
    data = make_tar([
        Entry(".wh..wh.aufs", data=b"meta"),
        Entry(".wh..wh.orph/", type=DIR),
        Entry(".wh..wh.plnk/", type=DIR),
        Entry(".wh..wh.plnk/1234.5", data=b"linked", mode=0o640),
        Entry("bin/a", type=LNK, linkname=".wh..wh.plnk/1234.5"),
    ])
    assert apply_layer(str(lower), io.BytesIO(data), AUFS) == 10
    assert not any(f.startswith(".wh.") for f in tree_files(lower))
    assert (lower / "bin" / "a").read_bytes() == b"linked"
    assert stat.S_IMODE(os.lstat(lower / "bin" / "a").st_mode) == 0o640


def test_replace_rules(lower: Path) -> None:
    data = make_tar([
        Entry("opt/app", data=b"file over dir"),          # non-dir replaces dir
        Entry("etc/keep/", type=DIR, mode=0o700),          # dir replaces file
        Entry("etc/", type=DIR, mode=0o711),               # dir over dir merges
        Entry("etc/passwd.hl", type=LNK, linkname="etc/passwd"),  # link to a lower file
    ])
    apply_layer(str(lower), io.BytesIO(data), AUFS)
    assert (lower / "opt" / "app").read_bytes() == b"file over dir"
    assert (lower / "etc" / "keep").is_dir()
    assert (lower / "etc" / "victim").exists()
    assert stat.S_IMODE(os.lstat(lower / "etc").st_mode) == 0o711
    assert os.lstat(lower / "etc" / "passwd.hl").st_ino == os.lstat(lower / "etc" / "passwd").st_ino


def test_overlay_whiteouts_become_char_devices_and_opaque_xattr(tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    upper.mkdir()
    data = make_tar([
        Entry("etc/", type=DIR, mode=0o755),
        Entry("etc/.wh.victim", uid=0, gid=0),
        Entry("opt/", type=DIR, mode=0o755),
        Entry("opt/.wh..wh..opq"),
        Entry("opt/new", data=b"n"),
        Entry("hack", pax=(("SCHILY.xattr.trusted.overlay.redirect", "/x"),)),
    ])
    apply_layer(str(upper), io.BytesIO(data), OVERLAY)
    st = os.lstat(upper / "etc" / "victim")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert os.getxattr(upper / "opt", "trusted.overlay.opaque") == b"y"
    assert (upper / "opt" / "new").read_bytes() == b"n"
    assert not (upper / "opt" / ".wh..wh..opq").exists()
    assert "trusted.overlay.redirect" not in os.listxattr(upper / "hack")


def test_overlay_export_converts_back_to_aufs_form(tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    (upper / "etc").mkdir(parents=True)
    os.mknod(upper / "etc" / "victim", stat.S_IFCHR, 0)
    (upper / "opt").mkdir()
    os.chmod(upper / "opt", 0o750)
    os.setxattr(upper / "opt", "trusted.overlay.opaque", b"y")
    (upper / "opt" / "new").write_text("n")
    os.mknod(upper / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    members = tar_members(read_all(export_tree(str(upper), IDMappings(),
                                               whiteout_format="overlay")))
    by_name = {m.name: m for m in members}
    assert [m.name for m in members] == ["etc", "etc/.wh.victim", "null", "opt",
                                         "opt/.wh..wh..opq", "opt/new"]
    wh = by_name["etc/.wh.victim"]
    assert wh.isreg() and wh.size == 0 and wh.mode == 0o600
    assert by_name["opt/.wh..wh..opq"].mode == 0o750
    assert not any(k.startswith("SCHILY.xattr.trusted.overlay") for k in by_name["opt"].pax_headers)
    null = by_name["null"]
    assert null.ischr() and (null.devmajor, null.devminor) == (1, 3)
    # The same tree in aufs mode keeps the device as a device.
    plain = tar_members(read_all(export_tree(str(upper), IDMappings())))
    assert "etc/victim" in [m.name for m in plain]


def test_overlay_export_takes_the_plain_path_with_the_same_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain files and directories of an overlay upper dir take the writer's bare
    ustar block; whiteouts, opaque dirs, xattrs and links do not: byte for byte the
    tar the full per-entry path writes."""
    upper = tmp_path / "upper"
    (upper / "etc" / "deep").mkdir(parents=True)
    (upper / "etc" / "plain").write_bytes(b"p" * 700)
    (upper / "etc" / "deep" / "empty").write_bytes(b"")
    os.mknod(upper / "etc" / "victim", stat.S_IFCHR, 0)
    (upper / "opt").mkdir()
    os.setxattr(upper / "opt", "trusted.overlay.opaque", b"y")
    (upper / "opt" / "cap").write_bytes(b"c")
    os.setxattr(upper / "opt" / "cap", "user.note", b"kept")
    os.link(upper / "etc" / "plain", upper / "opt" / "link")
    os.symlink("plain", upper / "etc" / "sym")
    os.utime(upper / "etc", (1_600_000_000, 1_600_000_000))

    def export() -> bytes:
        return read_all(export_tree(str(upper), IDMappings(), whiteout_format="overlay"))

    fast = export()
    calls: list[str] = []
    real = LayerWriter._plain_block

    def counted(self: LayerWriter, name: str, st: os.stat_result) -> bytes | None:
        calls.append(name)
        return real(self, name, st)

    monkeypatch.setattr(LayerWriter, "_plain_block", counted)
    assert export() == fast and {"etc", "etc/plain", "etc/deep"} <= set(calls)
    monkeypatch.setattr(LayerWriter, "_plain_block", lambda self, name, st: None)
    assert export() == fast


def test_overlay_round_trip(tmp_path: Path) -> None:
    """apply(overlay) -> export(overlay) -> apply(overlay) gives the same upper dir."""
    data = make_tar([
        Entry("a/", type=DIR, mode=0o755), Entry("a/.wh..wh..opq"), Entry("a/f", data=b"x"),
        Entry(".wh.gone"),
    ])
    first, second = tmp_path / "one", tmp_path / "two"
    first.mkdir()
    second.mkdir()
    apply_layer(str(first), io.BytesIO(data), OVERLAY)
    again = read_all(export_tree(str(first), IDMappings(), whiteout_format="overlay"))
    apply_layer(str(second), io.BytesIO(again), OVERLAY)
    assert tree_files(first) == tree_files(second) == {"a", "a/f", "gone"}
    assert os.getxattr(second / "a", "trusted.overlay.opaque") == b"y"
    assert stat.S_ISCHR(os.lstat(second / "gone").st_mode)


def test_unknown_whiteout_format_is_invalid(tmp_path: Path) -> None:
    from plugin.errors import InvalidArgument

    stream = io.BytesIO(make_tar([Entry("f")]))
    with pytest.raises(InvalidArgument):
        apply_layer(str(tmp_path), stream, ApplyOptions(whiteout_format="btrfs"))
    assert stream.read() == b""
