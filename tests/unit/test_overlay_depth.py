"""Deep chains on real overlay mounts: 500 lowers with the new mount API, the
page-limited depth with mount(2), and the refusal past each limit."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from plugin.backends.overlay import KERNEL_MAX_LOWERS, LEGACY_MAX_LOWERS, OverlayDriver
from plugin.driver.base import CreateOpts
from plugin.errors import NotSupported
from tests.support.mounts import assert_no_mounts_under, mount_at
from tests.unit.overlay_util import new_driver, skip_without_overlay

pytestmark = skip_without_overlay()


@pytest.fixture
def home(tmp_path: str) -> Iterator[str]:
    path = os.path.join(str(tmp_path), "home")
    yield path
    assert_no_mounts_under(path)


def build_chain(driver: OverlayDriver, depth: int) -> list[str]:
    """``depth`` layers, each holding its own file and its version of ``shared``.

    Files go straight into each layer's upper dir, which is what ApplyDiff does
    (one tar worker per layer would make this test slow, not stronger)."""
    chain, parent = [], ""
    for n in range(depth):
        layer_id = f"layer{n:03d}"
        driver.create(layer_id, parent, CreateOpts())
        diff = driver.diff_dir(driver.store.layer_dir(layer_id))
        with open(os.path.join(diff, f"f{n}"), "w") as f:
            f.write(str(n))
        with open(os.path.join(diff, "shared"), "w") as f:
            f.write(f"from {n}")
        chain.append(layer_id)
        parent = layer_id
    return chain


def test_a_500_layer_chain_mounts_and_reads(home: str) -> None:
    driver = new_driver(home)
    try:
        if not driver.support.new_mount_api:
            pytest.skip("kernel lacks fsconfig lowerdir+ (Linux >= 6.8)")
        assert driver.max_lowers == KERNEL_MAX_LOWERS == 500
        chain = build_chain(driver, KERNEL_MAX_LOWERS + 1)  # the top one sits on 500 lowers
        top = chain[-1]
        assert len(driver.lower_links(driver.store.layer_dir(top))) == 500
        root = driver.get(top, "")
        assert root == os.path.join(driver.store.layer_dir(top), "merged")
        assert os.path.ismount(root)
        for n in range(len(chain)):
            with open(os.path.join(root, f"f{n}")) as f:
                assert f.read() == str(n)
        with open(os.path.join(root, "shared")) as f:
            assert f.read() == f"from {len(chain) - 1}"
        with open(os.path.join(root, "written-on-top"), "w") as f:
            f.write("top")
        assert driver.get(top, "") == root
        driver.put(top)
        driver.put(top)
        assert not os.path.ismount(root)
        with pytest.raises(NotSupported, match="at most 500"):
            driver.create("one-too-many", top, CreateOpts())
        assert ("Max Depth", "500") in driver.status()
    finally:
        driver.cleanup()


def test_mount2_fallback_uses_relative_short_links(home: str) -> None:
    driver = new_driver(home, ["overlay.mount_api=legacy"])
    try:
        assert not driver.support.new_mount_api
        assert driver.max_lowers == LEGACY_MAX_LOWERS >= 128
        chain = build_chain(driver, LEGACY_MAX_LOWERS + 1)
        top = chain[-1]
        root = driver.get(top, "")
        try:
            with open(os.path.join(root, "f0")) as f:
                assert f.read() == "0"
            with open(os.path.join(root, "shared")) as f:
                assert f.read() == f"from {LEGACY_MAX_LOWERS}"
            mount = mount_at(root)
            assert mount is not None and "lowerdir=l/" in mount.super_options
            # relative to Home, resolved in the helper child
            assert os.getcwd() != home
        finally:
            driver.put(top)
        assert ("Mount API", "mount(2), relative lowerdirs") in driver.status()
        with pytest.raises(NotSupported, match=f"at most {LEGACY_MAX_LOWERS}"):
            driver.create("one-too-many", top, CreateOpts())
    finally:
        driver.cleanup()
