"""Crash safety of the snapshotter: SIGKILL ``strata snapshotter`` at named
points of Prepare, Commit and Remove (``STRATA_FAULTS``, plugin/faults.py),
restart it on the same root, and check what containerd relies on:

* no half snapshot is visible: the key is either absent or whole (its layer
  there, mountable, its parent's files in it);
* ``List`` is complete and consistent: every listed parent is listed, every
  record's layer exists, and no layer is left that no record claims (start-up
  runs Cleanup), nor staging or trash debris;
* the call retried as containerd would retry it succeeds (or says
  ALREADY_EXISTS / NOT_FOUND because the call had in fact completed);
* containerd's GC ends clean: Remove leaf to root, then Cleanup, leaves no
  record, no layer and no debris.

One server per backend per module (the ring's ``server`` fixture); every test
works under its own key prefix and removes what it made, so the global checks
(records vs layers) hold across tests.  Snapshots are one small file each.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
from collections.abc import Sequence
from typing import Any

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError

from plugin.faults import POINTS
from plugin.snapshotter.proto import mount_pb2
from plugin.snapshotter.proto import snapshots_pb2 as pb
from plugin.state.ownership import SNAPSHOTTER_DB
from tests.snapshotter.harness import Client, SnapshotterProcess, mount_all, unmount_all

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")

MOTD = b"hello from the base\n"

#: (fault point, the call it interrupts, whether that call's effect is visible
#: after the restart: it had committed its record before the kill).
CASES = [
    ("create.staged", "prepare", False),        # the core's staging, mid-Prepare
    ("snap.prepare.built", "prepare", False),
    ("snap.prepare.recorded", "prepare", True),
    ("snap.prepare.built", "view", False),
    ("snap.commit.measured", "commit", False),
    ("snap.commit.recorded", "commit", True),
    ("snap.remove.unrecorded", "remove", True),
    ("remove.renamed", "remove", True),         # the core's trash, mid-Remove's delete
]


class Scene:
    """One test's snapshots, all under ``ns/``: a committed ``base`` holding
    ``motd``, and ``child`` on it (the snapshot the crashed call is about)."""

    def __init__(self, server: SnapshotterProcess, work: str) -> None:
        self.server = server
        self.ns = secrets.token_hex(4)
        self.work = work
        self.client = Client(server.socket_path)
        self.armed = False  # the running server has a fault point set

    def key(self, name: str) -> str:
        return f"{self.ns}/{name}"

    async def restart(self, faults: str = "") -> None:
        self.client.close()
        self.server.stop()
        self.server.extra_env = {"STRATA_FAULTS": faults} if faults else {}
        self.armed = bool(faults)
        try:
            self.server.start()
        finally:
            self.server.extra_env = {}
        self.client = Client(self.server.socket_path)

    async def write(self, key: str, name: str, data: bytes) -> None:
        target = os.path.join(self.work, f"w-{secrets.token_hex(3)}")
        os.mkdir(target)
        mount_all(await self.client.mounts(key), target)
        try:
            with open(os.path.join(target, name), "wb") as f:
                f.write(data)
        finally:
            unmount_all(target)

    async def read(self, mounts: Sequence[mount_pb2.Mount], name: str) -> bytes:
        target = os.path.join(self.work, f"r-{secrets.token_hex(3)}")
        os.mkdir(target)
        mount_all(mounts, target)
        try:
            with open(os.path.join(target, name), "rb") as f:
                return f.read()
        finally:
            unmount_all(target)

    async def base(self) -> None:
        await self.client.prepare(self.key("base-a"))
        await self.write(self.key("base-a"), "motd", MOTD)
        await self.client.commit(self.key("base"), self.key("base-a"))


# ---- what the root holds ----------------------------------------------------------


def rows(server: SnapshotterProcess) -> dict[str, tuple[Any, ...]]:
    """key -> its whole row (id, key, parent, kind, ...), read from the database
    beside the running server."""
    db = sqlite3.connect(f"file:{os.path.join(server.root, SNAPSHOTTER_DB)}?mode=ro", uri=True)
    try:
        return {row[1]: tuple(row) for row in db.execute("SELECT * FROM snapshots")}
    finally:
        db.close()


def records(server: SnapshotterProcess) -> dict[int, tuple[str, int]]:
    """id -> (key, kind)."""
    return {row[0]: (row[1], row[3]) for row in rows(server).values()}


def home_entries(server: SnapshotterProcess, sub: str) -> set[str]:
    return set(os.listdir(os.path.join(server.root, server.backend, sub)))


async def assert_consistent(s: Scene) -> list[pb.Info]:
    """List complete, every record's layer there, no unclaimed layer, no debris;
    returns this test's snapshots as listed."""
    listed = await s.client.walk()
    names = {info.name for info in listed}
    assert all(info.parent in names for info in listed if info.parent), \
        f"a listed parent is missing from List: {sorted(names)}"
    rows = records(s.server)
    assert {key for key, _ in rows.values()} == names
    layers = home_entries(s.server, "layers")
    assert layers == {str(i) for i in rows}, \
        f"records {sorted(rows)} vs layers {sorted(layers)}"
    assert home_entries(s.server, "staging") == set()
    assert home_entries(s.server, "trash") == set()
    return [info for info in listed if info.name.startswith(s.ns + "/")]


async def gc(s: Scene) -> None:
    """containerd's GC: Remove leaf to root, then Cleanup."""
    while mine := await s.client.walk(f"name~=^{s.ns}/"):
        parents = {info.parent for info in mine}
        for info in mine:
            if info.name not in parents:
                await s.client.remove(info.name)
    await s.client.cleanup()


async def status_of(call: object) -> Status:
    with pytest.raises(GRPCError) as refused:
        await call  # type: ignore[misc]
    return refused.value.status


# ---- the crashed calls --------------------------------------------------------------


async def before_crash(s: Scene, call: str) -> None:
    if call in ("commit", "remove"):
        await s.client.prepare(s.key("child"), s.key("base"))
        await s.write(s.key("child"), "mine", b"child data\n")


async def crashing_call(s: Scene, call: str) -> None:
    child, base = s.key("child"), s.key("base")
    if call == "prepare":
        await s.client.prepare(child, base)
    elif call == "view":
        await s.client.view(child, base)
    elif call == "commit":
        await s.client.commit(s.key("child-c"), child)
    else:
        await s.client.remove(child)


async def retry(s: Scene, call: str, completed: bool) -> None:
    """What containerd does next, and that the snapshot then works."""
    child, base, committed = s.key("child"), s.key("base"), s.key("child-c")
    if call in ("prepare", "view"):
        make = s.client.prepare if call == "prepare" else s.client.view
        if completed:
            assert await status_of(make(child, base)) == Status.ALREADY_EXISTS
        else:
            await make(child, base)
        assert await s.read(await s.client.mounts(child), "motd") == MOTD
        if call == "prepare":
            await s.write(child, "mine", b"after the crash\n")
            await s.client.commit(committed, child)
    elif call == "commit":
        if completed:
            assert await status_of(s.client.commit(committed, child)) == Status.NOT_FOUND
        else:
            await s.client.commit(committed, child)
        view = await s.client.view(s.key("check"), committed)
        assert await s.read(view, "mine") == b"child data\n"
        assert await s.read(view, "motd") == MOTD
    else:
        assert await status_of(s.client.remove(child)) == Status.NOT_FOUND
        await s.client.prepare(child, base)  # the same key again


def visible_after(call: str, completed: bool) -> dict[str, pb.Kind]:
    """This test's snapshots (suffix -> kind) right after the restart."""
    expected: dict[str, pb.Kind] = {"base": pb.COMMITTED}
    if call in ("prepare", "view") and completed:
        expected["child"] = pb.ACTIVE if call == "prepare" else pb.VIEW
    elif call == "commit":
        expected["child-c" if completed else "child"] = \
            pb.COMMITTED if completed else pb.ACTIVE
    return expected


@pytest.mark.parametrize(("point", "call", "completed"), CASES,
                         ids=[f"{p}-{c}" for p, c, _ in CASES])
async def test_kill_at_named_point(scene: Scene, point: str, call: str,
                                   completed: bool) -> None:
    s = scene
    await before_crash(s, call)
    await s.restart(f"{point}=kill")
    with pytest.raises(StreamTerminatedError):  # the connection dies with the process
        await crashing_call(s, call)
    assert s.server.crashed(), f"strata did not die at {point}: {s.server.log()[-1500:]}"
    await s.restart()

    mine = await assert_consistent(s)
    assert {info.name.removeprefix(s.ns + "/"): info.kind for info in mine} == \
        visible_after(call, completed)
    await retry(s, call, completed)
    await assert_consistent(s)
    await gc(s)
    assert await s.client.walk(f"name~=^{s.ns}/") == []
    await assert_consistent(s)
    assert not any(key.startswith(s.ns + "/") for key, _ in records(s.server).values())


def test_cases_cover_every_snapshotter_fault_point() -> None:
    assert {p for p in POINTS if p.startswith("snap.")} <= {case[0] for case in CASES}
