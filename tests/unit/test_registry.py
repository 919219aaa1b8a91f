"""Unit ring: the backend registry and what it refuses."""

from __future__ import annotations

import os

import pytest

from plugin.driver import registry
from plugin.errors import InvalidArgument, NotSupported, Prerequisites
from plugin.idtools import IDMappings


def test_vfs_by_name(tmp_path: str) -> None:
    driver = registry.get_driver("vfs", str(tmp_path), [], IDMappings())
    assert driver.name == "vfs"


def test_unknown_backend_names_the_choices(tmp_path: str) -> None:
    with pytest.raises(InvalidArgument, match="overlay"):
        registry.get_driver("nope", str(tmp_path), [], IDMappings())


@pytest.mark.skipif(os.path.exists("/dev/mapper/control"), reason="host has device-mapper")
def test_devicemapper_names_the_missing_kernel_feature(tmp_path: str) -> None:
    with pytest.raises(Prerequisites, match=r"device-mapper.*/dev/mapper/control"):
        registry.get_driver("devicemapper", str(tmp_path), [], IDMappings())


def test_aufs_names_the_missing_kernel_feature(tmp_path: str) -> None:
    with open("/proc/filesystems") as f:
        if "aufs" in f.read():
            pytest.skip("host kernel has aufs")
    with pytest.raises(Prerequisites, match=r"aufs.*/proc/filesystems"):
        registry.get_driver("aufs", str(tmp_path), [], IDMappings())


def test_auto_falls_back_by_priority(tmp_path: str) -> None:
    driver = registry.new(str(tmp_path), [], IDMappings())
    assert driver.name in registry.PRIORITY


def test_vfs_refuses_a_size_it_cannot_enforce(tmp_path: str) -> None:
    with pytest.raises(NotSupported, match="quota"):
        registry.get_driver("vfs", str(tmp_path), ["vfs.size=10G"], IDMappings())
    with pytest.raises(InvalidArgument, match=r"vfs\.bogus"):
        registry.get_driver("vfs", str(tmp_path), ["vfs.bogus=1"], IDMappings())
    # options addressed to other drivers are dockerd's to pass, not ours to refuse
    registry.get_driver("vfs", str(tmp_path), ["overlay2.override_kernel_check=1"], IDMappings())


def test_split_options() -> None:
    assert registry.split_options(["btrfs.min_space=1G", "size=5G", "zfs.fsname=p/d"],
                                  "btrfs") == {"min_space": "1G", "size": "5G"}
    with pytest.raises(InvalidArgument):
        registry.split_options(["novalue"], "vfs")


def test_the_rings_run_every_implemented_backend() -> None:
    """The conformance, engine and crash rings take their backends from here:
    every real driver, and neither refusal stub."""
    names = registry.implemented()
    assert set(names) == set(registry.PRIORITY)
    assert "aufs" not in names and "devicemapper" not in names
