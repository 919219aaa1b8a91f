"""The zfs backend on a real zfs-fuse pool (tests/backends.py).

What the conformance suite cannot see from the socket: datasets, clones and
their snapshots, the mountpoint-property mounts, crash leftovers, foreign
datasets, the options and the xattr report.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator

import pytest

from plugin.backends import zfs
from plugin.driver import registry
from plugin.driver.base import CreateOpts, Driver
from plugin.errors import AlreadyExists, InvalidArgument, Prerequisites
from plugin.idtools import IDMappings
from tests.backends import ZfsPool, run, zfs_pool  # noqa: F401 (fixture)
from tests.support.mounts import is_mounted


@pytest.fixture
def dataset(zfs_pool: ZfsPool) -> Iterator[tuple[str, str]]:  # noqa: F811
    name, mountpoint = zfs_pool.new_dataset()
    yield name, mountpoint
    zfs_pool.destroy_dataset(name)


@pytest.fixture
def home(dataset: tuple[str, str]) -> str:
    return os.path.join(dataset[1], "home")


@pytest.fixture
def driver(home: str) -> Iterator[Driver]:
    drv = registry.get_driver("zfs", home, [], IDMappings())
    yield drv
    drv.cleanup()


def datasets_under(name: str) -> dict[str, str]:
    out = run("zfs", "list", "-H", "-r", "-t", "all", "-o", "name,origin", name).stdout
    return dict(line.split("\t") for line in out.splitlines())


def test_home_not_on_zfs_needs_fsname(zfs_pool: ZfsPool) -> None:  # noqa: F811
    with tempfile.TemporaryDirectory() as tmp:  # ext4
        with pytest.raises(Prerequisites, match=r"zfs\.fsname"):
            registry.get_driver("zfs", os.path.join(tmp, "home"), [], IDMappings())
        with pytest.raises(Prerequisites, match="does not exist"):
            registry.get_driver("zfs", os.path.join(tmp, "home"),
                                [f"zfs.fsname={zfs_pool.pool}/nosuch"], IDMappings())
        with pytest.raises(InvalidArgument, match="unknown"):
            registry.get_driver("zfs", os.path.join(tmp, "home"), ["zfs.bogus=1"], IDMappings())


def test_explicit_fsname_with_home_elsewhere(dataset: tuple[str, str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:  # Home on ext4, layers in the dataset
        drv = registry.get_driver("zfs", os.path.join(tmp, "home"),
                                  [f"zfs.fsname={dataset[0]}"], IDMappings())
        drv.create("x", "", CreateOpts())
        root = drv.get("x", "")
        assert is_mounted(root)
        drv.put("x")
        drv.remove("x")
        assert f"{dataset[0]}/x" not in datasets_under(dataset[0])
        drv.cleanup()


def test_layers_are_datasets_and_clones(driver: Driver, dataset: tuple[str, str]) -> None:
    name = dataset[0]
    driver.create("base", "", CreateOpts())
    root = driver.get("base", "")
    assert is_mounted(root), "Get mounts the dataset at Home/layers/<id>/root"
    with open(os.path.join(root, "f"), "w") as f:
        f.write("from base")
    driver.put("base")
    assert not is_mounted(root), "the last Put unmounts it"
    driver.create("child", "base", CreateOpts())
    found = datasets_under(name)
    assert found[f"{name}/child"].startswith(f"{name}/base@"), found
    child = driver.get("child", "")
    with open(os.path.join(child, "f")) as f:
        assert f.read() == "from base"
    driver.put("child")
    # Get right after Put: zfs-fuse's asynchronous unmount answers busy; retried
    for _ in range(3):
        driver.get("child", "")
        driver.put("child")
    driver.remove("child")
    # the origin snapshot went with its clone (deferred destroy)
    assert list(datasets_under(f"{name}/base")) == [f"{name}/base"]
    driver.remove("base")
    assert list(datasets_under(name)) == [name]


def test_orphans_of_this_home_go_and_foreign_datasets_stay(home: str,
                                                           dataset: tuple[str, str]) -> None:
    name = dataset[0]
    registry.get_driver("zfs", home, [], IDMappings()).cleanup()
    run("zfs", "create", "-o", "mountpoint=none", "-o", f"strata:home={home}", f"{name}/orphan")
    run("zfs", "create", "-o", "mountpoint=none", f"{name}/foreign")
    drv = registry.get_driver("zfs", home, [], IDMappings())
    found = datasets_under(name)
    assert f"{name}/orphan" not in found and f"{name}/foreign" in found
    with pytest.raises(AlreadyExists, match="foreign"):
        drv.create("foreign", "", CreateOpts())
    assert not drv.exists("foreign")
    drv.cleanup()


def test_cleanup_unmounts_and_restart_recounts(home: str) -> None:
    drv = registry.get_driver("zfs", home, [], IDMappings())
    drv.create("m", "", CreateOpts())
    root = drv.get("m", "")
    # a new process (plugin restart) sees the mount and counts it once
    again = registry.get_driver("zfs", home, [], IDMappings())
    assert again.get("m", "") == root
    again.put("m")
    assert is_mounted(root)
    again.put("m")
    assert not is_mounted(root)
    again.get("m", "")
    again.cleanup()
    assert not is_mounted(root)


def test_size_is_a_quota(driver: Driver, dataset: tuple[str, str]) -> None:
    driver.create("q", "", CreateOpts(storage_opt={"size": "8M"}))
    quota = run("zfs", "get", "-H", "-p", "-o", "value", "quota", f"{dataset[0]}/q").stdout
    assert int(quota) == 8 << 20
    root = driver.get("q", "")
    with pytest.raises(OSError) as e, open(os.path.join(root, "big"), "wb") as f:
        for _ in range(32):
            f.write(b"\x5a" * (1 << 20))
            f.flush()
            os.fsync(f.fileno())
    assert e.value.errno in (errno.EDQUOT, errno.ENOSPC)
    driver.put("q")
    with pytest.raises(InvalidArgument, match="inodes"):
        driver.create("r", "", CreateOpts(storage_opt={"inodes": "3"}))


def test_status_reports_missing_xattrs(driver: Driver, dataset: tuple[str, str]) -> None:
    rows = dict(driver.status())
    assert rows["Parent Dataset"] == dataset[0]
    assert rows["Backend"] == "zfs"
    assert zfs.xattrs_supported(dataset[1]) is False, "zfs-fuse stores no xattrs"
    assert rows["Xattrs"].startswith("no xattrs")
