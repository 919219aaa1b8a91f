"""``StorageOpt size`` on btrfs, through the socket as dockerd sends it.

Runs on a btrfs made *without* quotas, so it also proves they are enabled on
first use, as Docker's btrfs driver does.  The write goes into the directory
Get returned, like a container's writes into its rootfs.
"""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncIterator, Iterator

import pytest

from plugin.backends import btrfs
from tests.backends import LoopBtrfs, loop_btrfs, run
from tests.support.client import PluginError
from tests.support.plugin import PluginUnderTest, serving_in_loop
from tests.support.workdir import new_workdir, remove_workdir

pytestmark = pytest.mark.asyncio


@pytest.fixture(scope="module")
def fs_without_quota() -> Iterator[LoopBtrfs]:
    with loop_btrfs(size="1G", quota=False) as fs:
        yield fs


@pytest.fixture
async def plugin(fs_without_quota: LoopBtrfs) -> AsyncIterator[PluginUnderTest]:
    sock_dir = new_workdir("sq")
    try:
        async with serving_in_loop("btrfs", fs_without_quota.new_dir(),
                                   str(sock_dir / "p.sock")) as put:
            yield put
    finally:
        remove_workdir(sock_dir)


def fill(path: str, mib: int) -> int:
    """Write up to ``mib`` MiB, fsyncing as it goes; returns the bytes written."""
    block, written = b"\xa5" * (1 << 20), 0
    with open(path, "wb") as f:
        for _ in range(mib):
            written += f.write(block)
            f.flush()
            os.fsync(f.fileno())
    return written


async def test_size_limit_is_enforced_on_the_get_dir(plugin: PluginUnderTest) -> None:
    c = plugin.client
    assert not btrfs.quotas_enabled(plugin.home), "the fixture fs must start without quotas"
    await c.create("image", "")
    image_root = await c.get("image")
    fill(os.path.join(image_root, "from-the-image"), 4)
    await c.put("image")

    await c.create("box", "image", rw=True, storage_opt={"size": "10M"})
    assert btrfs.quotas_enabled(plugin.home), "quotas are enabled on first use"
    rows = (await c.call("GraphDriver.Status", {}))["Status"]
    assert ["Quotas", "enabled"] in rows
    root = await c.get("box")
    # 4 MiB shared with the image count as referenced: 5 MiB more still fit
    assert fill(os.path.join(root, "fits"), 5) == 5 << 20
    with pytest.raises(OSError) as e:
        fill(os.path.join(root, "too-big"), 20)
    assert e.value.errno in (errno.EDQUOT, errno.ENOSPC)
    await c.put("box")

    # the image layer itself has no limit
    image_root = await c.get("image")
    assert fill(os.path.join(image_root, "unlimited"), 20) == 20 << 20
    await c.put("image")
    await c.remove("box")
    await c.remove("image")


async def test_limit_survives_quota_disable_and_plugin_restart(plugin: PluginUnderTest) -> None:
    c = plugin.client
    await c.create("box2", "", rw=True, storage_opt={"size": "8M"})
    # someone turns quotas off (Docker's own Cleanup does): every limit is gone
    run("btrfs", "quota", "disable", plugin.home)
    await plugin.restart()
    c = plugin.client
    root = await c.get("box2")  # first Get re-applies the recorded limit
    with pytest.raises(OSError) as e:
        fill(os.path.join(root, "too-big"), 16)
    assert e.value.errno in (errno.EDQUOT, errno.ENOSPC)
    await c.put("box2")
    await c.remove("box2")


async def test_bad_sizes_are_refused(plugin: PluginUnderTest) -> None:
    for size in ("lots", "0"):
        with pytest.raises(PluginError) as e:
            await plugin.client.create("bad", "", rw=True, storage_opt={"size": size})
        assert "size" in e.value.err and e.value.status == 400
    assert not await plugin.client.exists("bad")
