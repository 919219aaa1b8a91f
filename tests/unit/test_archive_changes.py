"""changes() / changes_size() against docker's ChangesDirs semantics (docs/protocol.md §6.6)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from plugin.archive import Change, ChangeKind, changes, changes_size, export_changes
from plugin.idtools import IDMappings
from tests.unit.test_archive_util import CAP_V2, read_all, tar_members

A, C, D = ChangeKind.ADD, ChangeKind.MODIFY, ChangeKind.DELETE


def _reference_trees(tmp_path: Path) -> tuple[Path, Path]:
    old = tmp_path / "old"
    (old / "etc").mkdir(parents=True)
    (old / "opt" / "dir1").mkdir(parents=True)
    (old / "opt" / "dir1" / "inner").write_text("gone\n")
    (old / "etc" / "motd").write_text("hello\n")
    os.link(old / "etc" / "motd", old / "etc" / "motd.hl")
    (old / "etc" / "victim").write_text("bye\n")
    (old / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")  # 30 bytes
    new = tmp_path / "new"
    # A vfs layer starts as a metadata-preserving copy of its parent.
    subprocess.run(["cp", "-a", str(old), str(new)], check=True)
    etc = new / "etc"
    (etc / "newfile").write_text("new\n")
    (etc / "victim").unlink()
    (etc / "motd").write_text("changed\n")
    os.link(etc / "passwd", etc / "passwd.hl")
    subprocess.run(["rm", "-rf", str(new / "opt" / "dir1")], check=True)
    (new / "opt" / "dir2").mkdir()
    (new / "var" / "lib" / "x").mkdir(parents=True)
    (new / "var" / "lib" / "x" / "f").write_text("y\n")
    return new, old


REFERENCE = [  # docker 20.10.24 output, in its (map-random) order
    (C, "/opt"), (A, "/opt/dir2"), (D, "/opt/dir1"), (C, "/etc"), (C, "/etc/motd"),
    (C, "/etc/motd.hl"), (A, "/etc/newfile"), (A, "/etc/passwd.hl"), (D, "/etc/victim"),
    (A, "/var"), (A, "/var/lib"), (A, "/var/lib/x"), (A, "/var/lib/x/f"),
]


def test_reference_example_matches_docker(tmp_path: Path) -> None:
    new, old = _reference_trees(tmp_path)
    got = changes(str(new), str(old))
    assert sorted((c.kind, c.path) for c in got) == sorted(REFERENCE)
    # Our order is deterministic: children by name, deletions after the rest.
    assert [(c.kind, c.path) for c in got] == [
        (C, "/etc"), (C, "/etc/motd"), (C, "/etc/motd.hl"), (A, "/etc/newfile"),
        (A, "/etc/passwd.hl"), (D, "/etc/victim"), (C, "/opt"), (A, "/opt/dir2"),
        (D, "/opt/dir1"), (A, "/var"), (A, "/var/lib"), (A, "/var/lib/x"), (A, "/var/lib/x/f"),
    ]
    assert changes_size(str(new), got) == 44  # 8 + 4 + 30 + 2, motd inode once


def test_reference_example_export_tar(tmp_path: Path) -> None:
    new, old = _reference_trees(tmp_path)
    data = read_all(export_changes(str(new), changes(str(new), str(old)), IDMappings()))
    members = tar_members(data)
    names = [m.name + ("/" if m.isdir() else "") for m in members]
    assert names == ["etc/", "etc/motd", "etc/motd.hl", "etc/newfile", "etc/passwd.hl",
                     "etc/.wh.victim", "opt/", "opt/.wh.dir1", "opt/dir2/", "var/",
                     "var/lib/", "var/lib/x/", "var/lib/x/f"]
    by_name = {m.name: m for m in members}
    assert by_name["etc/motd.hl"].islnk() and by_name["etc/motd.hl"].linkname == "etc/motd"
    assert by_name["etc/passwd.hl"].isreg() and by_name["etc/passwd.hl"].size == 30
    wh = by_name["etc/.wh.victim"]
    assert (wh.mode, wh.uid, wh.gid, wh.size, wh.type) == (0, 0, 0, 0, b"0")
    # Docker's mode field carries the type bits.
    assert data[100:108] == b"0040755\0"


def test_dir_modify_precedes_its_children(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    for root in (old, new):
        (root / "a" / "b").mkdir(parents=True)
    (new / "a" / "b" / "f").write_text("x")
    got = changes(str(new), str(old))
    assert got == [Change("/a", C), Change("/a/b", C), Change("/a/b/f", A)]


def test_changed_dir_is_listed_once(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    for root in (old, new):
        (root / "d").mkdir(parents=True)
    os.chmod(new / "d", 0o700)
    (new / "d" / "f").write_text("x")
    assert changes(str(new), str(old)) == [Change("/d", C), Change("/d/f", A)]


def test_no_old_root_means_everything_added(tmp_path: Path) -> None:
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "d" / "e" / "f").write_text("x")
    (tmp_path / "z").symlink_to("d")
    assert changes(str(tmp_path), None) == [
        Change("/d", A), Change("/d/e", A), Change("/d/e/f", A), Change("/z", A)]


def test_mtime_precision_rule_and_dir_mtime_ignored(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    for root in (old, new):
        (root / "d").mkdir(parents=True)
        for name in ("same_sec", "zero_ns", "diff_ns", "diff_sec"):
            (root / name).write_text("x")
    base = 1_600_000_000 * 10**9
    times = {"same_sec": (base + 5, base + 5), "zero_ns": (base + 7, base),
             "diff_ns": (base + 7, base + 9), "diff_sec": (base, base + 10**9)}
    for name, (o, n) in times.items():
        os.utime(old / name, ns=(o, o))
        os.utime(new / name, ns=(n, n))
    os.utime(new / "d", ns=(base, base + 5 * 10**9))
    got = changes(str(new), str(old))
    assert got == [Change("/diff_ns", C), Change("/diff_sec", C)]


def test_capability_difference_is_a_change(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    for root in (old, new):
        root.mkdir()
        (root / "ping").write_text("x")
        os.utime(root / "ping", (1, 1))
    os.setxattr(new / "ping", "security.capability", CAP_V2)
    assert changes(str(new), str(old)) == [Change("/ping", C)]


def test_type_changes(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    (old / "was_dir").mkdir(parents=True)
    (old / "was_dir" / "child").write_text("x")
    (old / "was_file").write_text("x")
    new.mkdir()
    (new / "was_dir").write_text("now a file")
    (new / "was_file").mkdir()
    (new / "was_file" / "child").write_text("x")
    assert changes(str(new), str(old)) == [
        Change("/was_dir", C), Change("/was_file", C), Change("/was_file/child", A)]


def test_same_inode_is_skipped(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    (old / "shared").write_text("x")
    os.link(old / "shared", new / "shared")
    os.chmod(new / "shared", 0o600)  # same inode: both sides see it
    assert changes(str(new), str(old)) == []


def _copied_tree(tmp_path: Path, build: Callable[[Path], None]) -> tuple[Path, Path]:
    """``old`` made by ``build``, and ``new`` its metadata-preserving copy (a vfs layer)."""
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    build(old)
    subprocess.run(["cp", "-a", str(old), str(new)], check=True)
    return new, old


def _lower_tree(root: Path) -> None:
    (root / "data" / "deep").mkdir(parents=True)
    (root / "data" / "lower").write_text("lower\n")
    (root / "z").mkdir()
    (root / "z" / "unrelated").write_text("u\n")
    (root / "z" / "pair_a").write_text("p\n")
    os.link(root / "z" / "pair_a", root / "z" / "pair_b")


def test_new_link_to_unchanged_file_lists_both_names(tmp_path: Path) -> None:
    new, old = _copied_tree(tmp_path, _lower_tree)
    os.link(new / "data" / "lower", new / "data" / "deep" / "new")
    os.setxattr(old / "data" / "lower", "security.capability", CAP_V2)
    os.setxattr(new / "data" / "lower", "security.capability", CAP_V2)
    # docker diff (ChangesDirs, also overlay2's in docker 20.10): the new name alone.
    assert changes(str(new), str(old)) == [
        Change("/data", C), Change("/data/deep", C), Change("/data/deep/new", A)]
    # The layer tar: both names, as overlay2's copy-up puts them in its upper dir.
    found = changes(str(new), str(old), link_partners=True)
    assert found == [Change("/data", C), Change("/data/deep", C), Change("/data/deep/new", A),
                     Change("/data/lower", C)]
    data = read_all(export_changes(str(new), found, IDMappings()))
    by_name = {m.name: m for m in tar_members(data)}
    assert by_name["data/deep/new"].isreg() and by_name["data/deep/new"].size == 6
    assert by_name["data/lower"].islnk() and by_name["data/lower"].linkname == "data/deep/new"
    # docker's addTarFile keeps the xattr records on a hardlink entry too
    cap = "SCHILY.xattr.security.capability"
    assert by_name["data/lower"].pax_headers[cap] == by_name["data/deep/new"].pax_headers[cap]


def test_link_between_unchanged_files_is_no_change(tmp_path: Path) -> None:
    """A link count that changed with no added or changed name is not a change: overlay2
    leaves the remaining lower name alone when the other one is removed."""
    new, old = _copied_tree(tmp_path, _lower_tree)
    os.unlink(new / "z" / "pair_b")
    assert changes(str(new), str(old), link_partners=True) == [
        Change("/z", C), Change("/z/pair_b", D)]


def test_changed_file_lists_its_unchanged_other_names(tmp_path: Path) -> None:
    new, old = _copied_tree(tmp_path, _lower_tree)
    os.chmod(new / "z" / "pair_b", 0o600)  # one inode: pair_a changed as well
    os.link(new / "data" / "lower", new / "z" / "third")
    assert changes(str(new), str(old), link_partners=True) == [
        Change("/data", C), Change("/data/lower", C), Change("/z", C), Change("/z/pair_a", C),
        Change("/z/pair_b", C), Change("/z/third", A)]


def test_changes_size_counts_hardlinked_inode_once(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x" * 100)
    os.link(tmp_path / "a", tmp_path / "b")
    (tmp_path / "c").write_bytes(b"y" * 7)
    (tmp_path / "d").mkdir()
    got = [Change("/a", A), Change("/b", A), Change("/c", C), Change("/d", A),
           Change("/gone", D), Change("/missing", A)]
    assert changes_size(str(tmp_path), got) == 107


def test_missing_root_is_an_error(tmp_path: Path) -> None:
    from plugin.errors import NotFound

    with pytest.raises(NotFound):
        changes(str(tmp_path / "nope"), None)
