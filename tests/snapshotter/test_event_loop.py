"""The snapshotter's answers given on the event loop (Stat, Mounts from memory)
block nothing: here the service runs in the test's own loop under
``blockbuster``, which fails any blocking call strata's code makes on the loop
(sqlite, the filesystem, a sleep), as the graphdriver's protocol ring does.
The rest of the ring runs ``strata snapshotter`` as a process, out of its reach."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
from blockbuster import BlockingError, blockbuster_ctx
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Server

from plugin.fspool import FsPool
from plugin.snapshotter.proto import snapshots_pb2 as pb
from plugin.snapshotter.serve import SnapshotterConfig, open_snapshotter
from plugin.snapshotter.service import SnapshotsService
from plugin.snapshotter.snapshotter import Snapshotter
from tests.snapshotter.harness import Client

pytestmark = [pytest.mark.asyncio,
              pytest.mark.skipif(os.geteuid() != 0, reason="the backends need root")]


@dataclass
class InLoop:
    snapshotter: Snapshotter
    client: Client


@asynccontextmanager
async def serving(config: SnapshotterConfig) -> AsyncIterator[InLoop]:
    """``open_snapshotter`` (blocking start-up, as serve.py runs it in the pool)
    and the service on ``config``'s socket in this loop."""
    snapshotter = open_snapshotter(config)
    executor = FsPool(4, "snap")
    server = Server([SnapshotsService(snapshotter, executor)])
    await server.start(path=config.socket_path)
    client = Client(config.socket_path)
    try:
        yield InLoop(snapshotter, client)
    finally:
        client.close()
        server.close()
        await server.wait_closed()
        executor.shutdown()
        snapshotter.close()


def scratch_config(backend: str) -> SnapshotterConfig:
    # Unix socket paths must stay under 108 bytes: a short dir under /tmp.
    scratch = tempfile.mkdtemp(prefix="snaploop-", dir="/tmp")
    return SnapshotterConfig(socket_path=os.path.join(scratch, "s.sock"),
                             root=os.path.join(scratch, "root"), backend=backend)


@pytest.fixture(params=["overlay", "vfs"])
async def in_loop(request: pytest.FixtureRequest) -> AsyncIterator[InLoop]:
    config = scratch_config(request.param)
    try:
        async with serving(config) as running:
            yield running
    finally:
        shutil.rmtree(os.path.dirname(config.root), ignore_errors=True)


async def status_of(call: object) -> Status:
    with pytest.raises(GRPCError) as refused:
        await call  # type: ignore[misc]
    return refused.value.status


async def test_calls_answered_on_the_loop_block_nothing(in_loop: InLoop) -> None:
    client = in_loop.client
    with blockbuster_ctx("plugin"):
        prepared = await client.prepare("ns/a")  # in the pool; its mounts are kept
        assert await client.mounts("ns/a") == prepared  # from memory
        assert (await client.stat("ns/a")).kind == pb.ACTIVE
        await client.commit("ns/c", "ns/a")
        assert (await client.stat("ns/c")).kind == pb.COMMITTED
        assert await status_of(client.stat("ns/a")) == Status.NOT_FOUND
        assert await status_of(client.mounts("ns/c")) == Status.FAILED_PRECONDITION
        await client.view("ns/v", "ns/c")
        assert (await client.stat("ns/v")).parent == "ns/c"
        await client.remove("ns/v")
        assert await status_of(client.mounts("ns/v")) == Status.NOT_FOUND
        await client.remove("ns/c")
        assert await client.walk() == []


async def test_mounts_not_yet_answered_go_to_the_pool(in_loop: InLoop) -> None:
    """A snapshot whose mounts were never answered in this process (it was
    prepared before a restart) gets them from the pool, then from memory."""
    client = in_loop.client
    first = await client.prepare("ns/b")
    in_loop.snapshotter._specs.clear()  # as after a restart
    with blockbuster_ctx("plugin"):
        assert await client.mounts("ns/b") == first
        assert await client.mounts("ns/b") == first
    await client.remove("ns/b")


@pytest.mark.parametrize("backend", ["overlay", "vfs"])
async def test_a_broken_record_is_refused_on_the_loop(backend: str) -> None:
    """With a record whose layer start-up found missing (test_reconcile.py),
    its Mounts are refused from memory, and Stat and Mounts of the healthy
    snapshots are still answered there."""
    config = scratch_config(backend)
    try:
        async with serving(config) as before:
            await before.client.prepare("ns/base-a")
            await before.client.commit("ns/base", "ns/base-a")
            await before.client.prepare("ns/lost", "ns/base")
            await before.client.prepare("ns/ok", "ns/base")
            lost = before.snapshotter.meta.get("ns/lost").layer
        home = os.path.join(config.root, backend)
        os.rename(os.path.join(home, "layers", lost), os.path.join(home, "trash", lost))
        async with serving(config) as after:
            client = after.client
            first = await client.mounts("ns/ok")  # in the pool: nothing answered yet
            with blockbuster_ctx("plugin"):
                assert await client.mounts("ns/ok") == first
                assert (await client.stat("ns/ok")).kind == pb.ACTIVE
                assert (await client.stat("ns/lost")).kind == pb.ACTIVE
                assert await status_of(client.mounts("ns/lost")) == Status.FAILED_PRECONDITION
                assert await status_of(client.mounts("ns/lost")) == Status.FAILED_PRECONDITION
            await client.remove("ns/lost")
            assert await status_of(client.mounts("ns/lost")) == Status.NOT_FOUND
    finally:
        shutil.rmtree(os.path.dirname(config.root), ignore_errors=True)


async def test_the_loop_guard_sees_blocking_calls(in_loop: InLoop) -> None:
    """The guard must fail strata code that blocks the loop (here the records'
    sqlite), or the tests above prove nothing about the event loop."""
    with blockbuster_ctx("plugin"), pytest.raises(BlockingError):
        in_loop.snapshotter.meta.setting("backend", "")
