"""Helpers shared by the overlay unit tests (real mounts; no test functions here)."""

from __future__ import annotations

import os

import pytest

from plugin.backends.overlay import OverlayDriver
from plugin.driver import registry
from plugin.driver.probes import filesystems
from plugin.idtools import IDMappings


def skip_without_overlay() -> pytest.MarkDecorator:
    missing = os.geteuid() != 0 or "overlay" not in filesystems()
    return pytest.mark.skipif(missing, reason="needs root and a kernel with overlayfs")


def new_driver(home: str, options: list[str] | None = None,
               idmap: IDMappings | None = None) -> OverlayDriver:
    driver = registry.get_driver("overlay", home, options or [], idmap or IDMappings())
    assert isinstance(driver, OverlayDriver)
    return driver
