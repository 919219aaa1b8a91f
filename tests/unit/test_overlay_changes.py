"""Native overlay Changes/DiffSize/Diff against the naive tree walk, on real mounts.

The naive result (ChangesDirs over the two merged mounts) is the reference: the
native walk of the upper dir must give the same entries in the same order.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from collections.abc import Callable, Iterator

import pytest

from plugin.backends.overlay import OverlayDriver
from plugin.driver.base import CreateOpts
from tests.support.files import layer_tar
from tests.support.mounts import assert_no_mounts_under
from tests.unit.overlay_util import new_driver, skip_without_overlay

pytestmark = skip_without_overlay()


@pytest.fixture
def driver(tmp_path: str) -> Iterator[OverlayDriver]:
    home = os.path.join(str(tmp_path), "home")
    drv = new_driver(home)
    try:
        yield drv
    finally:
        drv.cleanup()
        assert_no_mounts_under(home)


def write(path: str, data: bytes = b"x", mode: int = 0o644) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def layer(drv: OverlayDriver, layer_id: str, parent: str, change: Callable[[str], None]) -> None:
    drv.create(layer_id, parent, CreateOpts())
    root = drv.get(layer_id, "")
    try:
        change(root)
    finally:
        drv.put(layer_id)


def base_tree(root: str) -> None:
    for i in range(6):
        write(os.path.join(root, f"etc/file{i}"), f"file {i}".encode())
    write(os.path.join(root, "etc/motd"), b"hello")
    os.link(os.path.join(root, "etc/motd"), os.path.join(root, "etc/motd.hl"))
    write(os.path.join(root, "opt/dir1/a"), b"a")
    write(os.path.join(root, "opt/dir1/sub/b"), b"b")
    write(os.path.join(root, "opt/keep"), b"keep")
    write(os.path.join(root, "var/lib/x/y"), b"y")
    write(os.path.join(root, "chmodded"), b"same")
    write(os.path.join(root, "was-file"), b"f")
    write(os.path.join(root, "was-dir/inner"), b"i")
    os.symlink("etc/motd", os.path.join(root, "link"))
    os.mkdir(os.path.join(root, "empty"))


def middle_tree(root: str) -> None:
    os.unlink(os.path.join(root, "etc/file0"))  # a whiteout in a lower
    write(os.path.join(root, "etc/file1"), b"middle")
    write(os.path.join(root, "mid/only"), b"m")
    import shutil
    shutil.rmtree(os.path.join(root, "var/lib"))
    os.mkdir(os.path.join(root, "var/lib"))  # opaque in a lower
    write(os.path.join(root, "var/lib/fresh"), b"fresh")


def top_changes(root: str) -> None:
    import shutil
    write(os.path.join(root, "etc/newfile"), b"new")
    os.unlink(os.path.join(root, "etc/file2"))
    write(os.path.join(root, "etc/motd"), b"changed")
    os.link(os.path.join(root, "etc/file3"), os.path.join(root, "etc/file3.hl"))
    shutil.rmtree(os.path.join(root, "opt/dir1"))
    os.mkdir(os.path.join(root, "opt/dir1"))
    write(os.path.join(root, "opt/dir1/new"), b"n")
    os.makedirs(os.path.join(root, "new/deep/er"))
    write(os.path.join(root, "new/deep/er/f"), b"f")
    os.chmod(os.path.join(root, "chmodded"), 0o600)  # copy-up ...
    os.chmod(os.path.join(root, "chmodded"), 0o644)  # ... and back: no change
    os.unlink(os.path.join(root, "was-file"))
    os.mkdir(os.path.join(root, "was-file"))
    write(os.path.join(root, "was-file/child"), b"c")
    shutil.rmtree(os.path.join(root, "was-dir"))
    write(os.path.join(root, "was-dir"), b"now a file")
    os.unlink(os.path.join(root, "mid/only"))
    write(os.path.join(root, "var/lib/fresh"), b"fresher")
    os.chown(os.path.join(root, "empty"), 1, 1)
    os.rename(os.path.join(root, "etc/file4"), os.path.join(root, "etc/file4.moved"))
    write(os.path.join(root, "tmp-created-then-removed/x"), b"x")
    os.unlink(os.path.join(root, "tmp-created-then-removed/x"))
    os.lchown(os.path.join(root, "link"), 5, 5)


def build_chain(drv: OverlayDriver) -> None:
    layer(drv, "base", "", base_tree)
    layer(drv, "middle", "base", middle_tree)
    layer(drv, "top", "middle", top_changes)


def test_native_changes_match_changes_dirs_on_merged_trees(driver: OverlayDriver) -> None:
    build_chain(driver)
    native = driver.changes("top", "middle")
    naive = driver.naive.changes("top", "middle")
    assert [str(c) for c in native] == [str(c) for c in naive]
    shown = {str(c) for c in native}
    assert {"D /etc/file2", "A /etc/newfile", "C /etc/motd", "D /opt/dir1/a", "D /mid/only",
            "A /new/deep/er/f", "C /was-file", "A /was-file/child", "C /empty"} <= shown
    assert "C /chmodded" not in shown  # a copy-up alone is no change


def test_native_changes_of_middle_and_base_layers(driver: OverlayDriver) -> None:
    build_chain(driver)
    for layer_id, parent in (("middle", "base"), ("base", "")):
        native = [str(c) for c in driver.changes(layer_id, parent)]
        naive = [str(c) for c in driver.naive.changes(layer_id, parent)]
        assert native == naive, layer_id


def test_opaque_and_whiteout_in_an_applied_layer(driver: OverlayDriver) -> None:
    """A layer written by ApplyDiff (no kernel involved): opaque marker, whiteouts
    for paths that do and do not exist below."""
    layer(driver, "base", "", base_tree)
    tar = layer_tar({"opt/": None, "opt/dir1/": None, "opt/dir1/.wh..wh..opq": b"",
                     "opt/dir1/a": b"", "etc/": None, "etc/.wh.file5": b"",
                     "etc/.wh.nothere": b""})
    driver.create("applied", "base", CreateOpts())
    size = driver.apply_diff("applied", "base", io.BytesIO(tar))
    assert size == 0
    diff = os.path.join(driver.store.layer_dir("applied"), "diff")
    assert stat.S_ISCHR(os.lstat(os.path.join(diff, "etc/file5")).st_mode)
    assert os.getxattr(os.path.join(diff, "opt/dir1"), "trusted.overlay.opaque") == b"y"
    native = [str(c) for c in driver.changes("applied", "base")]
    naive = [str(c) for c in driver.naive.changes("applied", "base")]
    assert native == naive
    assert "D /opt/dir1/sub" in native and "D /etc/file5" in native
    assert "D /etc/nothere" not in native


def test_diff_size_native_and_cached(driver: OverlayDriver) -> None:
    build_chain(driver)
    # the upper dir's non-directory bytes, each inode once (moby directory.Size)
    expected = sum(len(b) for b in (b"new", b"changed", b"n", b"f", b"same", b"c",
                                    b"now a file", b"fresher", b"file 4", b"file 3"))
    expected += len("etc/motd")  # the chowned symlink was copied up
    assert driver.diff_size("top", "middle") == expected
    tar = driver.diff("top", "middle")
    try:
        data = tar.read()
    finally:
        tar.close()
    driver.create("copy", "middle", CreateOpts())
    size = driver.apply_diff("copy", "middle", io.BytesIO(data))
    meta = driver.store.read_meta("copy")
    assert meta.extra["diff_size"] == str(driver.diff_size("copy", "middle"))
    assert size > 0
    native = [str(c) for c in driver.changes("copy", "middle")]
    assert native == [str(c) for c in driver.changes("top", "middle")]
    root = driver.get("copy", "")
    try:
        assert not os.path.exists(os.path.join(root, "etc/file2"))
        assert os.listdir(os.path.join(root, "opt/dir1")) == ["new"]
    finally:
        driver.put("copy")
    assert "diff_size" not in driver.store.read_meta("copy").extra  # a Get may write


def test_native_diff_tar_has_aufs_whiteouts_and_opaque_marker(driver: OverlayDriver) -> None:
    build_chain(driver)
    tar = driver.diff("top", "middle")
    try:
        with tarfile.open(fileobj=io.BytesIO(tar.read())) as tf:
            members = {m.name: m for m in tf.getmembers()}
    finally:
        tar.close()
    assert "etc/.wh.file2" in members and members["etc/.wh.file2"].isreg()
    assert "opt/dir1/.wh..wh..opq" in members
    assert not any(m.ischr() and m.devmajor == 0 for m in members.values())
    # Parent other than the layer's own: the naive path, a full tree for ""
    full = driver.diff("top", "")
    try:
        with tarfile.open(fileobj=io.BytesIO(full.read())) as tf:
            names = tf.getnames()
    finally:
        full.close()
    assert "opt/keep" in names and not any(".wh." in n for n in names)
