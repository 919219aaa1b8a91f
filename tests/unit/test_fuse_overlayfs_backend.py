"""The fuse-overlayfs backend on real FUSE mounts: the process it runs (session,
descriptors, reaping), restarts, whiteouts, depth, and refusals."""

from __future__ import annotations

import io
import os
import shutil
import socket
import stat
import subprocess
import tarfile
from collections.abc import Iterator

import pytest

from plugin.backends import fuse_overlayfs
from plugin.backends.fuse_overlayfs import FSTYPE, PROCESSES, FuseOverlayDriver
from plugin.driver import registry
from plugin.driver.base import CreateOpts
from plugin.errors import NotSupported, Prerequisites
from plugin.idtools import IDMappings
from plugin.state.refcount import internal_references
from tests.support.files import layer_tar
from tests.support.mounts import mountinfo, mounts_under


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("fuse-overlayfs") is None or not os.path.exists("/dev/fuse"):
        return "needs fuse-overlayfs and /dev/fuse"
    return None


pytestmark = pytest.mark.skipif(_unavailable() is not None, reason=str(_unavailable()))


def fuse_mounts_under(path: str) -> list[str]:
    return mounts_under(os.path.realpath(path), fstype=FSTYPE, include_root=False)


def fuse_pids_under(path: str) -> list[int]:
    """Live fuse-overlayfs processes whose mountpoint (last argument) is under ``path``."""
    path = os.path.realpath(path)
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().rstrip(b"\0").split(b"\0")
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if os.path.basename(argv[0]) == b"fuse-overlayfs" and state != "Z" \
                and os.fsdecode(argv[-1]).startswith(path + "/"):
            found.append(int(pid))
    return found


def new_driver(home: str, options: list[str] | None = None) -> FuseOverlayDriver:
    driver = registry.get_driver("fuse-overlayfs", home, options or [], IDMappings())
    assert isinstance(driver, FuseOverlayDriver)
    return driver


@pytest.fixture
def home(tmp_path: str) -> Iterator[str]:
    path = os.path.join(str(tmp_path), "home")
    yield path
    left = fuse_mounts_under(str(tmp_path))
    for mountpoint in left:
        subprocess.run(["fusermount3", "-u", mountpoint], check=False)
    PROCESSES.reap()
    assert not left, f"FUSE mounts left under {tmp_path}: {left}"
    assert not fuse_pids_under(str(tmp_path))


@pytest.fixture
def driver(home: str) -> Iterator[FuseOverlayDriver]:
    drv = new_driver(home)
    try:
        yield drv
    finally:
        drv.cleanup()


def test_get_runs_fuse_overlayfs_in_its_own_session_and_put_reaps_it(
        driver: FuseOverlayDriver, home: str) -> None:
    driver.create("base", "", CreateOpts())
    driver.create("c", "base", CreateOpts())
    plugin_socket = socket.socket(socket.AF_UNIX)
    plugin_socket.set_inheritable(True)  # even an inheritable one must not leak
    try:
        root = driver.get("c", "")
        [entry] = [m for m in mountinfo() if m.mountpoint == root]
        assert entry.fstype == FSTYPE
        pid = PROCESSES.pids()[root]
        assert os.getsid(pid) == pid  # a plugin restart's signals do not reach it
        fds = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        assert not [f for f in fds if f.startswith("socket:")], fds
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        assert b"-f" in argv and b"lowerdir=l/" in argv[argv.index(b"-o") + 1]
    finally:
        plugin_socket.close()
    assert driver.get("c", "") == root
    driver.put("c")
    assert os.path.ismount(root)
    driver.put("c")
    assert not os.path.ismount(root)
    assert root not in PROCESSES.pids()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # exited and reaped: not even a zombie is left
    status = dict(driver.status())
    assert status["Backend"] == "fuse-overlayfs"
    assert "fuse-overlayfs" in status["Binary"] and status["Mounts"] == "0"


def test_base_layer_is_its_diff_dir_and_never_mounted(driver: FuseOverlayDriver) -> None:
    driver.create("base", "", CreateOpts())
    root = driver.get("base", "")
    assert root == driver.diff_dir(driver.store.layer_dir("base"))
    assert not os.path.ismount(root)
    driver.put("base")


def test_plugin_restart_keeps_the_mount_and_releases_it_at_zero(driver: FuseOverlayDriver,
                                                                  home: str) -> None:
    driver.create("base", "", CreateOpts())
    driver.create("c", "base", CreateOpts())
    root = driver.get("c", "")
    with open(os.path.join(root, "running"), "w") as f:
        f.write("x")
    # A restarted plugin process knows no pids: only mountinfo tells.
    orphan = PROCESSES.take(root)
    assert orphan is not None
    try:
        restarted = new_driver(home)
        assert restarted.mounted_ids() == ["c"]
        assert restarted.refs.count("c") == 1
        with open(os.path.join(root, "running")) as f:
            assert f.read() == "x"
        restarted.put("c")
        assert not os.path.ismount(root)
        assert orphan.wait(timeout=10) == 0
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()


def test_a_mount_with_no_count_is_released_at_start_up(driver: FuseOverlayDriver,
                                                       home: str) -> None:
    driver.create("base", "", CreateOpts())
    driver.create("c", "base", CreateOpts())
    with internal_references():  # strata's own Get, cut short by a "crash"
        root = driver.get("c", "")
    restarted = new_driver(home)
    assert not os.path.ismount(root)
    assert restarted.refs.count("c") == 0


def test_whiteouts_apply_natively_and_diff_carries_no_fuse_bookkeeping(
        driver: FuseOverlayDriver) -> None:
    driver.create("base", "", CreateOpts())
    driver.apply_diff("base", "", io.BytesIO(layer_tar({
        "keep": b"k", "gone": b"g", "opq/": None, "opq/old": b"o",
        "dir/": None, "dir/a": b"a"})))
    driver.create("mid", "base", CreateOpts())
    driver.apply_diff("mid", "base", io.BytesIO(layer_tar({
        ".wh.gone": b"", "opq/": None, "opq/.wh..wh..opq": b"", "opq/new": b"n"})))
    diff = driver.diff_dir(driver.store.layer_dir("mid"))
    assert stat.S_ISCHR(os.lstat(os.path.join(diff, "gone")).st_mode)  # the kernel's form
    driver.create("c", "mid", CreateOpts())
    root = driver.get("c", "")
    assert sorted(os.listdir(root)) == ["dir", "keep", "opq"]
    assert os.listdir(os.path.join(root, "opq")) == ["new"]
    # The container: delete, make a dir opaque (fuse-overlayfs adds its .wh. files).
    os.unlink(os.path.join(root, "keep"))
    shutil.rmtree(os.path.join(root, "dir"))
    os.mkdir(os.path.join(root, "dir"))
    with open(os.path.join(root, "dir", "b"), "w") as f:
        f.write("b")
    os.chmod(os.path.join(root, "opq", "new"), 0o600)  # a copy-up
    driver.put("c")
    assert sorted(str(c) for c in driver.changes("c", "mid")) == \
        ["A /dir/b", "C /dir", "C /opq", "C /opq/new", "D /dir/a", "D /keep"]
    tar = driver.diff("c", "mid")
    try:
        with tarfile.open(fileobj=io.BytesIO(tar.read())) as tf:
            members = tf.getmembers()
    finally:
        tar.close()
    assert sorted(m.name for m in members) == \
        sorted([".wh.keep", "dir", "dir/.wh.a", "dir/b", "opq", "opq/new"])
    assert not [m.name for m in members
                if any(k.startswith("SCHILY.xattr.user.fuseoverlayfs") for k in m.pax_headers)]
    assert not fuse_mounts_under(driver.home)


def test_deep_stack_mounts_with_relative_links(driver: FuseOverlayDriver) -> None:
    depth = fuse_overlayfs.MAX_LOWERS + 1  # a base and 500 lowers above it
    parent = ""
    for i in range(depth):
        driver.create(f"l{i}", parent, CreateOpts())
        with open(os.path.join(driver.diff_dir(driver.store.layer_dir(f"l{i}")), f"f{i}"),
                  "w") as f:
            f.write(str(i))
        parent = f"l{i}"
    root = driver.get(parent, "")
    try:
        assert len(os.listdir(root)) == depth
        with open(os.path.join(root, "f0")) as f:
            assert f.read() == "0"
    finally:
        driver.put(parent)


def test_depth_limit_is_refused_clearly(driver: FuseOverlayDriver,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(driver, "max_lowers", 1)
    driver.create("a", "", CreateOpts())
    driver.create("b", "a", CreateOpts())
    with pytest.raises(NotSupported, match="at most 1 lowers"):
        driver.create("c", "b", CreateOpts())


def test_busy_put_detaches_and_the_process_is_reaped_later(driver: FuseOverlayDriver) -> None:
    driver.create("base", "", CreateOpts())
    driver.create("c", "base", CreateOpts())
    root = driver.get("c", "")
    pid = PROCESSES.pids()[root]
    held = open(os.path.join(root, "held"), "w")  # noqa: SIM115 - held across the Put
    try:
        driver.put("c")
        assert not os.path.ismount(root)
    finally:
        held.close()
    for _ in range(200):
        PROCESSES.reap()
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        subprocess.run(["sleep", "0.05"], check=True)
    else:
        pytest.fail(f"fuse-overlayfs pid {pid} still exists after its lazy unmount")


def test_remove_of_a_mounted_layer_stops_its_process(driver: FuseOverlayDriver) -> None:
    driver.create("base", "", CreateOpts())
    driver.create("c", "base", CreateOpts())
    root = driver.get("c", "")
    proc_pid = PROCESSES.pids()[root]
    driver.remove("c")
    assert not driver.exists("c")
    with pytest.raises(ProcessLookupError):
        os.kill(proc_pid, 0)


def test_init_refuses_without_the_binary_or_dev_fuse(tmp_path: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    home = os.path.join(str(tmp_path), "home")
    monkeypatch.setattr(fuse_overlayfs, "FUSE_DEVICE", os.path.join(str(tmp_path), "no-fuse"))
    with pytest.raises(Prerequisites, match="package fuse-overlayfs"):
        new_driver(home)
    monkeypatch.undo()
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(Prerequisites, match="package fuse-overlayfs"):
        new_driver(home)


def test_size_option_is_refused(tmp_path: str) -> None:
    with pytest.raises(NotSupported, match="size"):
        new_driver(os.path.join(str(tmp_path), "home"), ["size=1G"])


def test_a_crashed_fuse_overlayfs_is_mounted_again_by_the_next_get(
        driver: FuseOverlayDriver) -> None:
    driver.create("base", "", CreateOpts())
    driver.create("c", "base", CreateOpts())
    root = driver.get("c", "")
    with open(os.path.join(root, "kept"), "w") as f:
        f.write("k")
    proc = PROCESSES.take(root)
    assert proc is not None
    proc.kill()  # the mount stays, answering ENOTCONN
    proc.wait()
    driver.refs.forget("c")
    root = driver.get("c", "")
    with open(os.path.join(root, "kept")) as f:
        assert f.read() == "k"
    driver.put("c")
    assert not fuse_mounts_under(driver.home)


LOWER_MTIME = 1_500_000_000


def _lower_layer(driver: FuseOverlayDriver) -> None:
    driver.create("base", "", CreateOpts())
    driver.apply_diff("base", "", io.BytesIO(layer_tar({
        "data/": None, "data/lower": b"l", "data/mod/": None, "data/mod/file": b"f",
        "data/mod/sub/": None, "data/mod/sub/deep": b"d", "data/other/": None,
        "data/other/a": b"a"})))
    for dirpath, dirnames, filenames in os.walk(driver.diff_dir(driver.store.layer_dir("base"))):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (LOWER_MTIME, LOWER_MTIME))


def _diff_mtimes(driver: FuseOverlayDriver, layer: str, parent: str) -> dict[str, int]:
    tar = driver.diff(layer, parent)
    try:
        with tarfile.open(fileobj=io.BytesIO(tar.read())) as tf:
            return {m.name: int(m.mtime) for m in tf.getmembers()}
    finally:
        tar.close()


def test_a_directory_holding_only_copy_ups_keeps_its_lower_mtime(
        driver: FuseOverlayDriver) -> None:
    """fuse-overlayfs stamps a directory with the time it copied a child into it; the
    kernel overlay (and so overlay2's layer tar) keeps the lower mtime."""
    _lower_layer(driver)
    driver.create_read_write("c", "base", CreateOpts())
    root = driver.get("c", "")
    with open(os.path.join(root, "data/mod/sub/deep"), "a") as f:
        f.write("appended")  # copies up data/, data/mod/, data/mod/sub/
    with open(os.path.join(root, "data/other/new"), "w") as f:
        f.write("n")  # a new name: data/other/ is really changed
    driver.put("c")
    upper = driver.diff_dir(driver.store.layer_dir("c"))
    assert os.lstat(os.path.join(upper, "data/mod")).st_mtime > LOWER_MTIME  # the bug
    mtimes = _diff_mtimes(driver, "c", "base")
    assert (mtimes["data"], mtimes["data/mod"], mtimes["data/mod/sub"]) == (LOWER_MTIME,) * 3
    assert mtimes["data/other"] > LOWER_MTIME and mtimes["data/mod/sub/deep"] > LOWER_MTIME


def test_copy_up_times_are_left_alone_where_a_name_changed(driver: FuseOverlayDriver) -> None:
    _lower_layer(driver)
    driver.create_read_write("c", "base", CreateOpts())
    root = driver.get("c", "")
    os.link(os.path.join(root, "data/lower"), os.path.join(root, "data/new"))  # a new name
    os.unlink(os.path.join(root, "data/mod/file"))  # a whiteout
    with open(os.path.join(root, "data/mod/sub/deep.tmp"), "w") as f:
        f.write("replaced")  # a file renamed over a lower one carries no origin tag
    os.rename(os.path.join(root, "data/mod/sub/deep.tmp"), os.path.join(root, "data/mod/sub/deep"))
    driver.put("c")
    mtimes = _diff_mtimes(driver, "c", "base")
    assert min(mtimes["data"], mtimes["data/mod"], mtimes["data/mod/sub"]) > LOWER_MTIME
    assert mtimes["data/lower"] == LOWER_MTIME  # the linked-to name is in the tar


def test_a_layer_apply_diff_wrote_keeps_its_directory_mtimes(driver: FuseOverlayDriver) -> None:
    """Only container layers get lower mtimes back: an image layer's directories carry
    the mtimes its tar gave them."""
    _lower_layer(driver)
    driver.create("img", "base", CreateOpts())
    driver.apply_diff("img", "base", io.BytesIO(layer_tar({
        "data/": None, "data/mod/": None, "data/mod/sub/": None, "data/mod/sub/new": b"n"})))
    mtimes = _diff_mtimes(driver, "img", "base")
    assert mtimes["data"] == mtimes["data/mod"] == 0  # layer_tar's
    assert mtimes["data/mod/sub"] == 0 and mtimes["data/mod/sub/new"] == 0
