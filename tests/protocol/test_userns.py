"""Protocol ring, user-namespaced: Init with ID maps as ``dockerd --userns-remap`` sends them.

Over the wire, per backend: ApplyDiff maps a tar's owners to host ids, the path Get
returns is reachable by the remapped root (a process with that uid and gid and no
capabilities: what runc is on host inodes from inside the container's user namespace)
and by no other user, and Diff maps owners back to container ids.  zfs-fuse refuses the
maps at Init (plugin/backends/zfs.py says why).
"""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from blockbuster import BlockBuster

from tests.backends import home_for
from tests.support.client import PluginError
from tests.support.plugin import PluginUnderTest
from tests.support.workdir import new_workdir, remove_workdir

REMAP_UID = REMAP_GID = 100000
MAPS = [{"container_id": 0, "host_id": REMAP_UID, "size": 65536}]  # idtools.IDMap


def _layer_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, owner, mode in (("etc", 0, 0o755), ("home", 1000, 0o750)):
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.uid, info.gid = tarfile.DIRTYPE, mode, owner, owner
            tf.addfile(info)
        for name, owner in (("etc/motd", 0), ("home/note", 1000)):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.uid, info.gid = 3, 0o640, owner, owner
            tf.addfile(info, io.BytesIO(b"hi\n"))
    return buf.getvalue()


def _open_up(root: str) -> None:
    """o+x on the test's own directories above ``root`` (a btrfs Home lives under
    a 0700 work dir), as dockerd requires of its data root."""
    path = Path(root)
    while path != Path("/tmp") and path != path.parent:
        path.chmod(path.stat().st_mode | 0o011)
        path = path.parent


def _zfs_is_fuse() -> bool:
    """Kernel ZFS registers the filesystem type ``zfs``; zfs-fuse does not."""
    with open("/proc/filesystems") as f:
        return "zfs" not in f.read().split()


def _as_user(uid: int, gid: int, path: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["cat", path], user=uid, group=gid, extra_groups=[],
                          capture_output=True, text=True, check=False)


@pytest.fixture
async def remapped(backend: str, request: pytest.FixtureRequest,
                   blockbuster: BlockBuster) -> AsyncIterator[PluginUnderTest]:
    """A plugin Init'ed with ID maps on a Home the remapped root can reach."""
    if backend == "zfs" and _zfs_is_fuse():
        pytest.skip("zfs-fuse refuses ID maps (test_zfs_fuse_refuses_id_maps)")
    workdir = new_workdir("sp")
    workdir.chmod(0o711)
    root = str(workdir) if backend not in ("btrfs", "zfs") else \
        home_for(request, backend, str(workdir))
    _open_up(root)
    put = PluginUnderTest(backend, root, str(workdir / "p.sock"))
    await put.start()
    try:
        await put.client.call("Plugin.Activate")
        await put.client.call("GraphDriver.Init", {"Home": put.home, "Opts": None,
                                                   "UIDMaps": MAPS, "GIDMaps": MAPS})
        yield put
        await put.client.call("GraphDriver.Cleanup", {})
    finally:
        await put.client.close()
        await put.stop()
        await asyncio.to_thread(remove_workdir, workdir)


async def test_id_maps_reach_only_the_remapped_root(backend: str,
                                                    remapped: PluginUnderTest) -> None:
    client = remapped.client
    await client.create("base")
    await client.apply_diff("base", "", _layer_tar())
    await client.create("child", "base", rw=True)
    path = await client.get("child")
    for name, owner in (("etc/motd", REMAP_UID), ("home/note", REMAP_UID + 1000)):
        st = os.lstat(os.path.join(path, name))
        assert (st.st_uid, st.st_gid) == (owner, owner), name
    reached = await asyncio.to_thread(_as_user, REMAP_UID, REMAP_GID,
                                      os.path.join(path, "etc/motd"))
    assert reached.returncode == 0 and reached.stdout == "hi\n", reached.stderr
    for uid in (65534, REMAP_UID + 1):
        denied = await asyncio.to_thread(_as_user, uid, uid, os.path.join(path, "etc/motd"))
        assert "Permission denied" in denied.stderr, (uid, denied)
    await client.put("child")
    with tarfile.open(fileobj=io.BytesIO(await client.diff("base"))) as tf:
        owners = {m.name.rstrip("/"): (m.uid, m.gid) for m in tf.getmembers()}
    assert owners["etc/motd"] == (0, 0) and owners["home/note"] == (1000, 1000), owners
    await client.remove("child")
    await client.remove("base")


@pytest.mark.parametrize("backend", ["zfs"], indirect=True)
async def test_zfs_fuse_refuses_id_maps(backend: str, request: pytest.FixtureRequest,
                                        blockbuster: BlockBuster) -> None:
    if not _zfs_is_fuse():
        pytest.skip("kernel ZFS: the maps are used")
    workdir = new_workdir("sp")
    put = PluginUnderTest(backend, home_for(request, backend, str(workdir)),
                          str(workdir / "p.sock"))
    await put.start()
    try:
        await put.client.call("Plugin.Activate")
        with pytest.raises(PluginError, match="zfs-fuse cannot serve user-namespaced"):
            await put.client.call("GraphDriver.Init", {"Home": put.home, "Opts": None,
                                                       "UIDMaps": MAPS, "GIDMaps": MAPS})
    finally:
        await put.client.close()
        await put.stop()
        await asyncio.to_thread(remove_workdir, workdir)
