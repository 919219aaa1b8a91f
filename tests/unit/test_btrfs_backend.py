"""The btrfs backend on a real btrfs (a loop-mounted image, tests/backends.py).

What the conformance suite cannot see from the socket: that layers really are
subvolumes and snapshots, that the staged rename works with a subvolume inside,
that nested subvolumes and crash leftovers are destroyed, and the options.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import pytest

from plugin.backends import btrfs
from plugin.driver import registry
from plugin.driver.base import CreateOpts, Driver
from plugin.errors import IncompatibleFS, InvalidArgument
from plugin.idtools import IDMappings
from tests.backends import LoopBtrfs, btrfs_fs  # noqa: F401 (fixture)


@pytest.fixture
def home(btrfs_fs: LoopBtrfs) -> str:  # noqa: F811
    return os.path.join(btrfs_fs.new_dir(), "home")


@pytest.fixture
def driver(home: str) -> Iterator[Driver]:
    drv = registry.get_driver("btrfs", home, [], IDMappings())
    yield drv
    drv.cleanup()


def subvolume_list(path: str) -> str:
    from tests.backends import run
    return run("btrfs", "subvolume", "list", "-o", path).stdout


def test_parse_size_like_docker() -> None:
    assert btrfs.parse_size("20M") == 20 << 20
    assert btrfs.parse_size("20mb") == 20 << 20
    assert btrfs.parse_size("1.5g") == 3 << 29
    assert btrfs.parse_size("512KiB") == 512 << 10
    assert btrfs.parse_size("1024") == 1024
    with pytest.raises(InvalidArgument):
        btrfs.parse_size("lots")


def test_home_not_on_btrfs_is_incompatible() -> None:
    # /tmp is ext4 here
    with tempfile.TemporaryDirectory() as tmp, pytest.raises(IncompatibleFS, match="not btrfs"):
        registry.get_driver("btrfs", os.path.join(tmp, "home"), [], IDMappings())


def test_unknown_option_is_refused(home: str) -> None:
    with pytest.raises(InvalidArgument, match=r"btrfs\.nosuch|nosuch"):
        registry.get_driver("btrfs", home, ["btrfs.nosuch=1"], IDMappings())
    # options addressed to other drivers are dockerd's unfiltered pass-through
    registry.get_driver("btrfs", home, ["overlay2.size=1G"], IDMappings()).cleanup()


def test_layers_are_subvolumes_and_snapshots(driver: Driver, home: str) -> None:
    driver.create("base", "", CreateOpts())
    root = driver.get("base", "")
    assert root == os.path.join(home, "layers", "base", "root")
    assert btrfs.is_subvolume(root)
    with open(os.path.join(root, "f"), "wb") as f:
        f.write(b"x" * 100_000)
    driver.put("base")
    driver.create("child", "base", CreateOpts())
    child = driver.get("child", "")
    assert btrfs.is_subvolume(child)
    assert btrfs.subvol_id(child) != btrfs.subvol_id(root)
    # a snapshot shares extents: the child sees the bytes without a copy
    with open(os.path.join(child, "f"), "rb") as f:
        assert f.read() == b"x" * 100_000
    driver.put("child")
    # nothing of the staged creation is left behind
    assert os.listdir(os.path.join(home, "staging")) == []
    driver.remove("child")
    driver.remove("base")
    assert driver.exists("base") is False
    assert "layers/" not in subvolume_list(home)


def test_rename_of_a_dir_holding_a_subvolume(btrfs_fs: LoopBtrfs) -> None:  # noqa: F811
    """The staged create relies on it: rename(stage, layers/<id>) with root/ a subvolume."""
    top = btrfs_fs.new_dir()
    os.mkdir(os.path.join(top, "stage"))
    btrfs.subvol_create(os.path.join(top, "stage"), "root")
    with open(os.path.join(top, "stage", "root", "data"), "w") as f:
        f.write("kept")
    os.rename(os.path.join(top, "stage"), os.path.join(top, "final"))
    moved = os.path.join(top, "final", "root")
    assert btrfs.is_subvolume(moved)
    with open(os.path.join(moved, "data")) as f:
        assert f.read() == "kept"
    btrfs.subvol_delete(os.path.join(top, "final"), "root")
    assert not os.path.exists(moved)


def test_remove_destroys_nested_subvolumes(driver: Driver, home: str) -> None:
    driver.create("c", "", CreateOpts())
    root = driver.get("c", "")
    # what `btrfs subvolume create` inside a container does, two levels deep,
    # one of them read-only as `btrfs subvolume snapshot -r` would make it
    os.makedirs(os.path.join(root, "var/lib"))
    btrfs.subvol_create(os.path.join(root, "var/lib"), "nested")
    btrfs.subvol_create(os.path.join(root, "var/lib/nested"), "deeper")
    with open(os.path.join(root, "var/lib/nested/deeper/file"), "w") as f:
        f.write("data")
    from tests.backends import run
    run("btrfs", "subvolume", "snapshot", "-r", os.path.join(root, "var/lib/nested/deeper"),
        os.path.join(root, "ro-snap"))
    driver.put("c")
    driver.remove("c")
    assert not driver.exists("c")
    assert os.listdir(os.path.join(home, "trash")) == []
    assert subvolume_list(os.path.dirname(home)).strip() == ""


def test_crash_leftovers_in_staging_and_trash_are_destroyed(home: str) -> None:
    registry.get_driver("btrfs", home, [], IDMappings()).cleanup()
    for leftover in ("staging/x.123", "trash/y.456"):
        path = os.path.join(home, leftover)
        os.mkdir(path)
        btrfs.subvol_create(path, "root")
        btrfs.subvol_create(os.path.join(path, "root"), "nested")
    registry.get_driver("btrfs", home, [], IDMappings()).cleanup()
    assert os.listdir(os.path.join(home, "staging")) == []
    assert os.listdir(os.path.join(home, "trash")) == []
    assert subvolume_list(os.path.dirname(home)).strip() == ""


def test_storage_opt_other_than_size_is_refused(driver: Driver) -> None:
    with pytest.raises(InvalidArgument, match="inodes"):
        driver.create("l", "", CreateOpts(storage_opt={"inodes": "5"}))
    assert not driver.exists("l")


def test_min_space_refuses_smaller_sizes(home: str) -> None:
    drv = registry.get_driver("btrfs", home, ["btrfs.min_space=10M"], IDMappings())
    with pytest.raises(InvalidArgument, match="min_space"):
        drv.create("small", "", CreateOpts(storage_opt={"size": "5M"}))
    assert not drv.exists("small")
    drv.create("big", "", CreateOpts(storage_opt={"size": "12M"}))
    assert ("Min Space", str(10 << 20)) in drv.status()
    drv.remove("big")
