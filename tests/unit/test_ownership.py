"""A graphdriver Home and a snapshotter root refuse each other."""

from __future__ import annotations

import os

import pytest

from plugin.driver import registry
from plugin.driver.manager import DriverManager
from plugin.errors import InvalidArgument
from plugin.idtools import IDMappings
from plugin.snapshotter.serve import SnapshotterConfig, open_snapshotter


def test_a_snapshotter_root_refuses_a_graphdriver_home(tmp_path: str) -> None:
    home = os.path.join(str(tmp_path), "docker", "strata")
    registry.get_driver("vfs", home, [], IDMappings()).cleanup()
    for root in (home, os.path.join(home, "inside")):
        with pytest.raises(InvalidArgument, match="graphdriver Home"):
            open_snapshotter(SnapshotterConfig("/nonexistent.sock", root, "vfs"))
    assert not os.path.exists(os.path.join(home, "snapshotter.db"))


def test_a_graphdriver_home_refuses_a_snapshotter_root(tmp_path: str) -> None:
    root = os.path.join(str(tmp_path), "snap")
    open_snapshotter(SnapshotterConfig("/nonexistent.sock", root, "vfs")).close()
    manager = DriverManager(os.path.join(str(tmp_path), "state"), "vfs")
    for home in (root, os.path.join(root, "vfs")):
        with pytest.raises(InvalidArgument, match="snapshotter root"):
            manager.init(home, [], [], [])


def test_a_root_keeps_its_backend(tmp_path: str) -> None:
    root = os.path.join(str(tmp_path), "snap")
    open_snapshotter(SnapshotterConfig("/nonexistent.sock", root, "vfs")).close()
    with pytest.raises(InvalidArgument, match="holds vfs layers"):
        open_snapshotter(SnapshotterConfig("/nonexistent.sock", root, "overlay"))
    with pytest.raises(InvalidArgument, match="cannot serve containerd"):
        open_snapshotter(SnapshotterConfig("/nonexistent.sock", root, "zfs"))
