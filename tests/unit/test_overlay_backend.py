"""The overlay backend on real mounts: probes and refusals, Get/Put/Remove,
restart, ID maps, layout."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from collections.abc import Iterator

import pytest

from plugin.backends.overlay import LINK_LEN, OverlayDriver
from plugin.driver import mountapi, registry
from plugin.driver.base import CreateOpts
from plugin.driver.probes import dirent_types, fs_name, supports_d_type
from plugin.errors import IncompatibleFS, InvalidArgument, NotSupported, Prerequisites
from plugin.idtools import IDMap, IDMappings
from tests.support.mounts import assert_no_mounts_under
from tests.support.workdir import new_workdir, remove_workdir
from tests.unit.overlay_util import new_driver, skip_without_overlay

pytestmark = skip_without_overlay()


def read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


@pytest.fixture
def home(tmp_path: str) -> Iterator[str]:
    path = os.path.join(str(tmp_path), "home")
    yield path
    assert_no_mounts_under(str(tmp_path))


@pytest.fixture
def driver(home: str) -> Iterator[OverlayDriver]:
    drv = new_driver(home)
    try:
        yield drv
    finally:
        drv.cleanup()


def test_dirent_types_come_from_getdents(tmp_path: str) -> None:
    os.mkdir(os.path.join(str(tmp_path), "d"))
    open(os.path.join(str(tmp_path), "f"), "w").close()
    os.symlink("f", os.path.join(str(tmp_path), "s"))
    types = dirent_types(str(tmp_path))
    assert (types["d"], types["f"], types["s"]) == (4, 8, 10)  # DT_DIR, DT_REG, DT_LNK
    assert supports_d_type(str(tmp_path))


def test_overlay_on_overlay_is_refused_and_auto_falls_back(tmp_path: str) -> None:
    base = str(tmp_path)
    for d in ("lower", "upper", "work", "merged"):
        os.mkdir(os.path.join(base, d))
    merged = os.path.join(base, "merged")
    mountapi.fs_mount("overlay", "overlay", merged, [
        ("lowerdir+", os.path.join(base, "lower")), ("upperdir", os.path.join(base, "upper")),
        ("workdir", os.path.join(base, "work"))])
    try:
        home = os.path.join(merged, "home")
        with pytest.raises(IncompatibleFS, match="overlayfs cannot use"):
            registry.get_driver("overlay", home, [], IDMappings())
        chosen = registry.new(home, [], IDMappings())
        try:
            assert chosen.name != "overlay"
        finally:
            chosen.cleanup()
    finally:
        mountapi.unmount(merged)


def test_auto_picks_overlay_on_a_plain_filesystem(home: str) -> None:
    if os.path.exists("/dev/zfs") or fs_name(os.path.dirname(home)) in ("btrfs", "zfs"):
        pytest.skip("a native-fs backend would win here")
    chosen = registry.new(home, [], IDMappings())
    try:
        assert chosen.name == "overlay"
    finally:
        chosen.cleanup()


def test_size_is_refused_clearly(home: str, driver: OverlayDriver) -> None:
    with pytest.raises(NotSupported, match="project quotas"):
        registry.get_driver("overlay", home + "2", ["overlay.size=10G"], IDMappings())
    with pytest.raises(NotSupported, match="project quotas"):
        driver.create("sized", "", CreateOpts(storage_opt={"size": "1G"}))
    with pytest.raises(InvalidArgument):
        driver.create("odd", "", CreateOpts(storage_opt={"inodes": "5"}))
    assert not driver.exists("sized") and not driver.exists("odd")
    with pytest.raises(InvalidArgument, match="unknown storage option"):
        registry.get_driver("overlay", home + "3", ["overlay.bogus=1"], IDMappings())


def test_layout_links_and_status(driver: OverlayDriver, home: str) -> None:
    driver.create("base", "", CreateOpts())
    driver.create("child", "base", CreateOpts())
    base_dir, child_dir = driver.store.layer_dir("base"), driver.store.layer_dir("child")
    link = read_text(os.path.join(base_dir, "link"))
    assert len(link) == LINK_LEN and os.readlink(os.path.join(home, "l", link)) == \
        "../layers/base/diff"
    assert read_text(os.path.join(child_dir, "lower")) == f"l/{link}"
    assert not os.path.exists(os.path.join(base_dir, "lower"))
    assert driver.get("base", "") == os.path.join(base_dir, "diff")  # never mounted
    driver.put("base")
    meta = driver.metadata("child")
    assert meta["LowerDir"] == os.path.join(base_dir, "diff")
    rows = dict(driver.status())
    assert rows["Backend"] == "overlay" and rows["Supports d_type"] == "true"
    assert rows["Native Overlay Diff"] == "true" and rows["Layers"] == "2"


def test_remove_of_a_busy_mounted_layer_succeeds(driver: OverlayDriver, home: str) -> None:
    driver.create("base", "", CreateOpts())
    driver.create("busy", "base", CreateOpts())
    root = driver.get("busy", "")
    link = read_text(os.path.join(driver.store.layer_dir("busy"), "link"))
    with open(os.path.join(root, "held-open"), "w") as held:  # keeps the mount busy
        held.write("x")
        driver.remove("busy")
        assert not driver.exists("busy")
        assert not os.path.lexists(os.path.join(home, "l", link))
    assert_no_mounts_under(home)
    assert driver.refs.count("busy") == 0
    driver.remove("busy")  # unknown id: success


def test_nested_gets_and_a_restart_keep_the_mount_counted(driver: OverlayDriver,
                                                          home: str) -> None:
    driver.create("base", "", CreateOpts())
    driver.create("c", "base", CreateOpts())
    root = driver.get("c", "")
    assert driver.get("c", "") == root and driver.refs.count("c") == 2
    driver.put("c")
    assert os.path.ismount(root)
    restarted = new_driver(home)  # a plugin restart: counts rebuilt from mountinfo
    assert restarted.refs.count("c") == 1
    restarted.put("c")
    assert not os.path.ismount(root)
    restarted.put("c")  # an extra Put is harmless


def test_restart_repairs_links(driver: OverlayDriver, home: str) -> None:
    driver.create("base", "", CreateOpts())
    link = read_text(os.path.join(driver.store.layer_dir("base"), "link"))
    os.unlink(os.path.join(home, "l", link))
    os.symlink("../layers/gone/diff", os.path.join(home, "l", "STALE"))
    new_driver(home)
    assert os.path.islink(os.path.join(home, "l", link))
    assert not os.path.lexists(os.path.join(home, "l", "STALE"))


@pytest.fixture
def open_home() -> Iterator[str]:
    """A Home under a 0711 directory: one a remapped root can reach (dockerd checks
    its data root the same way)."""
    workdir = new_workdir("su")
    workdir.chmod(0o711)
    try:
        yield str(workdir / "home")
    finally:
        assert_no_mounts_under(str(workdir))
        remove_workdir(workdir)


REMAP = IDMappings(uids=(IDMap(0, 100000, 65536),), gids=(IDMap(0, 100000, 65536),))


def test_id_maps_refuse_a_home_the_remapped_root_cannot_reach(home: str) -> None:
    # pytest's tmp_path sits under 0700 directories
    with pytest.raises(Prerequisites, match="o\\+x"):
        new_driver(home, idmap=REMAP)


def test_id_maps_own_layers_and_map_tars(open_home: str) -> None:
    home, idmap = open_home, REMAP
    driver = new_driver(home, idmap=idmap)
    try:
        driver.create("base", "", CreateOpts())
        for d in (home, os.path.join(home, "layers"), driver.store.layer_dir("base")):
            st = os.lstat(d)
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 100000, 0o710), d
        st = os.lstat(os.path.join(home, "l"))
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o700)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            info = tarfile.TarInfo("owned")
            info.uid = info.gid = 1000
            tf.addfile(info, io.BytesIO(b""))
        driver.apply_diff("base", "", io.BytesIO(buf.getvalue()))
        diff = driver.diff_dir(driver.store.layer_dir("base"))
        st = os.lstat(diff)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (100000, 100000, 0o755)
        assert os.lstat(os.path.join(diff, "owned")).st_uid == 101000
        driver.create("child", "base", CreateOpts())
        work = os.path.join(driver.store.layer_dir("child"), "work")
        assert os.lstat(work).st_uid == 100000
        root = driver.get("child", "")
        assert os.lstat(os.path.join(work, "work")).st_uid == 100000
        assert os.lstat(os.path.join(root, "owned")).st_uid == 101000
        driver.put("child")
        tar = driver.diff("base", "")
        try:
            with tarfile.open(fileobj=io.BytesIO(tar.read())) as tf:
                assert tf.getmember("owned").uid == 1000
        finally:
            tar.close()
    finally:
        driver.cleanup()


def test_native_diff_can_be_switched_off(home: str) -> None:
    driver = new_driver(home, ["overlay.native_diff=false"])
    try:
        assert dict(driver.status())["Native Overlay Diff"].startswith("false")
        driver.create("base", "", CreateOpts())
        root = driver.get("base", "")
        with open(os.path.join(root, "f"), "w") as f:
            f.write("x")
        driver.put("base")
        driver.create("child", "base", CreateOpts())
        root = driver.get("child", "")
        os.unlink(os.path.join(root, "f"))
        driver.put("child")
        assert [str(c) for c in driver.changes("child", "base")] == ["D /f"]
        assert_no_mounts_under(home)
    finally:
        driver.cleanup()


def _tar_of(members: dict[str, bytes], deleted: tuple[str, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name in deleted:
            head, _, tail = name.rpartition("/")
            tar.addfile(tarfile.TarInfo(f"{head + '/' if head else ''}.wh.{tail}"))
    return buf.getvalue()


def _names(data: bytes) -> dict[str, bytes | None]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: (f.read() if (f := tar.extractfile(m)) else None) for m in tar}


def _two_layers(driver: OverlayDriver) -> None:
    driver.create("base", "", CreateOpts())
    driver.apply_diff("base", "", io.BytesIO(_tar_of({"a": b"A", "gone": b"G"})))
    driver.create("child", "base", CreateOpts())
    driver.apply_diff("child", "base", io.BytesIO(_tar_of({"b": b"B"}, deleted=("gone",))))


def test_a_read_view_is_read_only_and_leaves_no_mount(driver: OverlayDriver,
                                                      home: str) -> None:
    """What a naive Diff of a small layer reads instead of Get: the merged tree of
    the layer, mounted nowhere, read-only; none while dockerd has the layer mounted."""
    _two_layers(driver)
    with driver.read_view("child") as view:
        assert view is not None
        assert sorted(os.listdir(view)) == ["a", "b"]
        with pytest.raises(OSError) as err:
            open(os.path.join(view, "new"), "w").close()
        assert err.value.errno == 30  # EROFS
        assert_no_mounts_under(home)  # attached nowhere: no mount table shows it
    root = driver.get("child", "")
    with driver.read_view("child") as view:
        assert view is None  # mounted: Get's mount is the way to read it
    driver.put("child")
    assert not os.path.ismount(root)


def test_a_naive_diff_through_the_view_equals_the_full_tree(driver: OverlayDriver,
                                                           home: str) -> None:
    _two_layers(driver)
    with driver.diff("child", "") as stream:
        through_view = _names(stream.read())
    assert through_view == {"a": b"A", "b": b"B"}
    driver.get("child", "")  # the same Diff while mounted goes through Get
    try:
        with driver.diff("child", "") as stream:
            assert _names(stream.read()) == through_view
    finally:
        driver.put("child")
    assert_no_mounts_under(home)


def test_a_naive_apply_through_a_write_view_leaves_a_mountable_layer(
        driver: OverlayDriver, home: str) -> None:
    """A naive ApplyDiff (parent "" onto a layer with lowers) writes through a
    volatile detached mount; the marker a volatile mount leaves must not stop the
    next Get, nor one a crash left behind."""
    _two_layers(driver)
    driver.create("target", "base", CreateOpts())
    size = driver.apply_diff("target", "", io.BytesIO(_tar_of({"c": b"C"}, deleted=("a",))))
    assert size == 1
    layer_dir = driver.store.layer_dir("target")
    incompat = os.path.join(layer_dir, "work", "work", "incompat")
    assert not os.path.exists(incompat)
    assert_no_mounts_under(home)
    assert driver.refs.count("target") == 0
    # What a crash inside the view leaves: the next Get must still mount.
    os.makedirs(os.path.join(incompat, "volatile"))
    open(os.path.join(incompat, "volatile", "dirty"), "w").close()
    root = driver.get("target", "")
    try:
        assert sorted(os.listdir(root)) == ["c", "gone"]
        assert not driver.store.read_meta("target").applying
    finally:
        driver.put("target")
    assert_no_mounts_under(home)


def test_a_write_view_is_not_used_while_the_layer_is_mounted(driver: OverlayDriver,
                                                            home: str) -> None:
    _two_layers(driver)
    root = driver.get("child", "")
    try:
        with driver.write_view("child") as view:
            assert view is None
        driver.apply_diff("child", "", io.BytesIO(_tar_of({"d": b"D"})))
        assert sorted(os.listdir(root)) == ["a", "b", "d"]
        assert os.path.ismount(root) and driver.refs.count("child") == 1
    finally:
        driver.put("child")
    assert_no_mounts_under(home)
