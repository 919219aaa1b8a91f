"""``Driver.usage``: a layer's own content measured as containerd's
``fs.DiskUsage`` does (allocated blocks, distinct inodes, root included)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from plugin.backends.common import disk_usage
from plugin.driver import registry
from plugin.driver.base import CreateOpts, Driver
from plugin.errors import NotFound
from plugin.idtools import IDMappings
from tests.support.mounts import assert_no_mounts_under


def write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        os.fsync(f.fileno())


def test_disk_usage_counts_blocks_and_each_inode_once(tmp_path: str) -> None:
    root = os.path.join(str(tmp_path), "tree")
    os.makedirs(os.path.join(root, "d"))
    write(os.path.join(root, "d", "f"), b"x" * 10000)
    os.link(os.path.join(root, "d", "f"), os.path.join(root, "hard"))
    os.symlink("d/f", os.path.join(root, "sym"))
    with open(os.path.join(root, "sparse"), "wb") as f:
        f.truncate(1 << 30)
    size, inodes = disk_usage(root)
    # root, d, f (twice linked), sym, sparse: five inodes.
    assert inodes == 5
    expected = sum(os.lstat(os.path.join(root, p)).st_blocks * 512
                   for p in ("", "d", "d/f", "sym", "sparse"))
    assert size == expected
    assert 10000 <= size < 1 << 20  # the hardlink once, the 1 GiB hole not at all


def test_disk_usage_of_a_missing_tree_is_not_found(tmp_path: str) -> None:
    with pytest.raises(NotFound):
        disk_usage(os.path.join(str(tmp_path), "nope"))


@pytest.fixture(params=["vfs", "overlay"])
def driver(request: pytest.FixtureRequest, tmp_path: str) -> Iterator[Driver]:
    home = os.path.join(str(tmp_path), "home")
    drv = registry.get_driver(request.param, home, [], IDMappings())
    try:
        yield drv
    finally:
        drv.cleanup()
        assert_no_mounts_under(str(tmp_path))


def test_usage_is_the_layers_own_content(driver: Driver) -> None:
    driver.create("base", "", CreateOpts())
    root = driver.get("base", "")
    write(os.path.join(root, "big"), b"b" * 200_000)
    driver.put("base")
    driver.create("child", "base", CreateOpts())
    root = driver.get("child", "")
    write(os.path.join(root, "small"), b"s" * 5000)
    driver.put("child")
    base_size, base_inodes = driver.usage("base")
    child_size, child_inodes = driver.usage("child")
    assert base_size >= 200_000 and base_inodes == 2
    if driver.name == "overlay":  # only the upper dir: the child's own file
        assert 5000 <= child_size < 200_000 and child_inodes == 2
    else:  # a whole copy of the tree, as containerd's native measures it
        assert child_size >= 205_000 and child_inodes == 3
    assert sorted(driver.layer_ids()) == ["base", "child"]
    with pytest.raises(NotFound):
        driver.usage("missing")
