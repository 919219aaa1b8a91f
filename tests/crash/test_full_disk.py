"""A full disk: ApplyDiff and Create on a small loop filesystem that fills up
answer a clean Err naming ENOSPC, leave no partial layer once dockerd's Remove
arrives, give the space back, and later calls work."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.client import DockerLikeClient, PluginError
from tests.support.files import layer_tar
from tests.support.plugin import Plugin, init_body, unique_name
from tests.support.procs import run
from tests.support.workdir import new_workdir, remove_workdir

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for loop devices")
BACKENDS = ["vfs", "overlay"]


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def tar_of(sizes: dict[str, int]) -> bytes:
    """A layer of files of these sizes, of random (incompressible) bytes."""
    return layer_tar({name: os.urandom(size) for name, size in sizes.items()})


def fill_up(path: str) -> None:
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (4 << 20))
        except OSError:
            pass


@pytest.fixture
async def small_disk() -> AsyncIterator[Path]:
    """A 64 MiB ext4 on a loop device (losetup --find: never a fixed /dev/loopN)."""
    work = new_workdir("sf")
    (work / "mnt").mkdir()
    image = work / "disk.img"
    run("truncate", "-s", "64M", str(image))
    device = run("losetup", "--find", "--show", str(image)).stdout.strip()
    try:
        run("mkfs.ext4", "-q", "-F", "-m", "0", device)
        run("mount", device, str(work / "mnt"))
        try:
            yield work
        finally:
            run("umount", str(work / "mnt"))
    finally:
        run("losetup", "-d", device)
        remove_workdir(work)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_enospc_is_clean_and_space_comes_back(small_disk: Path, backend: str) -> None:
    home = small_disk / "mnt" / "home"
    plugin = Plugin(name=unique_name("strata-f"), backend=backend,
                    state_dir=small_disk / "state", log_path=small_disk / "plugin.log")
    plugin.start()
    c = DockerLikeClient(str(plugin.socket_path))
    try:
        try:
            await c.call("GraphDriver.Init", init_body(home))
        except PluginError as refused:
            pytest.skip(f"backend {backend} cannot run on this ext4: {refused.err}")
        await c.create("base")
        await c.apply_diff("base", "", tar_of({"small": 1 << 20}))
        before = free_bytes(home)

        # ApplyDiff of more than the disk holds
        await c.create("huge", "base")
        with pytest.raises(PluginError) as e:
            await c.apply_diff("huge", "base", tar_of({f"f{i}": 8 << 20 for i in range(10)}))
        assert "No space left on device" in e.value.err or "ENOSPC" in e.value.err, e.value.err
        await c.remove("huge")  # what dockerd does after a failed ApplyDiff
        assert not await c.exists("huge")
        assert free_bytes(home) >= before - (1 << 20), "the partial layer's space must come back"

        # Create whose copy cannot fit (vfs copies the parent; overlay needs no copy)
        await c.create("fat", "base")
        root = await c.get("fat")
        fill_up(os.path.join(root, "fill"))
        await c.put("fat")
        if backend == "vfs":
            with pytest.raises(PluginError) as e:
                await c.create("copy-of-fat", "fat")
            assert "No space left on device" in e.value.err, e.value.err
            assert not await c.exists("copy-of-fat")
        await c.remove("fat")
        assert os.listdir(home / "staging") == [] and os.listdir(home / "trash") == []
        assert free_bytes(home) >= before - (1 << 20)

        # and the driver carries on
        await c.create("after", "base")
        assert await c.apply_diff("after", "base", tar_of({"ok": 1000})) == 1000
        assert sorted(os.listdir(home / "layers")) == ["after", "base"]
        await c.call("GraphDriver.Cleanup", {})
    finally:
        await c.close()
        plugin.close()
