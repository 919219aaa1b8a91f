"""What containerd's snapshotters answer beyond the testsuite: the error codes
where ``snapshots/storage`` gives them, usage, keys that are never paths, a
restart keeping state, and layers no record claims removed at start-up."""

from __future__ import annotations

import os
import secrets

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from plugin.driver import registry
from plugin.driver.base import CreateOpts
from plugin.idtools import IDMappings
from plugin.snapshotter.proto import snapshots_pb2 as pb
from tests.snapshotter.harness import Client, SnapshotterProcess, mount_all, unmount_all

pytestmark = pytest.mark.asyncio


async def status_of(call: object) -> Status:
    with pytest.raises(GRPCError) as refused:
        await call  # type: ignore[misc]
    return refused.value.status


@pytest.fixture
def ns() -> str:
    return secrets.token_hex(4)


async def test_error_codes_as_containerd_storage(client: Client, ns: str) -> None:
    await client.prepare(f"{ns}/a")
    assert await status_of(client.prepare(f"{ns}/b", f"{ns}/missing")) == Status.NOT_FOUND
    # bolt.go: a parent that is not committed is an invalid argument.
    assert await status_of(client.prepare(f"{ns}/b", f"{ns}/a")) == Status.INVALID_ARGUMENT
    assert await status_of(client.prepare("")) == Status.INVALID_ARGUMENT
    await client.commit(f"{ns}/c", f"{ns}/a")
    assert await status_of(client.mounts(f"{ns}/c")) == Status.FAILED_PRECONDITION
    assert await status_of(client.mounts(f"{ns}/a")) == Status.NOT_FOUND
    await client.view(f"{ns}/v", f"{ns}/c")
    assert await status_of(client.commit(f"{ns}/cv", f"{ns}/v")) == Status.FAILED_PRECONDITION
    await client.prepare(f"{ns}/d", f"{ns}/c")
    # A commit onto an existing name is refused and leaves both as they were.
    assert await status_of(client.commit(f"{ns}/c", f"{ns}/d")) == Status.ALREADY_EXISTS
    assert (await client.stat(f"{ns}/d")).kind == pb.ACTIVE
    assert await status_of(client.commit(f"{ns}/x", f"{ns}/nope")) == Status.NOT_FOUND
    assert await status_of(client.stat(f"{ns}/nope")) == Status.NOT_FOUND
    assert await status_of(client.usage(f"{ns}/nope")) == Status.NOT_FOUND
    info = pb.Info(name=f"{ns}/nope")
    assert await status_of(client.update(info, "labels")) == Status.NOT_FOUND
    assert (await client.stat(f"{ns}/v")).kind == pb.VIEW


async def test_usage_measured_when_active_stored_when_committed(
        client: Client, server: SnapshotterProcess, ns: str) -> None:
    target = f"/tmp/snapusage-{ns}"
    os.makedirs(target)
    try:
        mount_all(await client.prepare(f"{ns}/a"), target)
        size0, inodes0 = await client.usage(f"{ns}/a")
        with open(os.path.join(target, "blob"), "wb") as f:
            f.write(os.urandom(1 << 20))
            os.fsync(f.fileno())
        size1, inodes1 = await client.usage(f"{ns}/a")
        assert size1 >= size0 + (1 << 20) and inodes1 == inodes0 + 1
        unmount_all(target)
        await client.commit(f"{ns}/c", f"{ns}/a")
        assert await client.usage(f"{ns}/c") == (size1, inodes1)
        await client.view(f"{ns}/v", f"{ns}/c")
        assert await client.usage(f"{ns}/v") == (0, 0)  # as containerd's: none stored
    finally:
        unmount_all(target)
        os.rmdir(target)


async def test_keys_never_become_paths(client: Client, server: SnapshotterProcess,
                                       ns: str) -> None:
    hostile = f"default/{ns}/../../../etc extract-1 sha256:abc"
    await client.prepare(hostile, "", {"containerd.io/snapshot.ref": "x"})
    assert (await client.stat(hostile)).name == hostile
    layers = os.path.join(server.root, server.backend, "layers")
    assert all(name.isdigit() for name in os.listdir(layers))
    for parent, dirs, files in os.walk(server.root):
        assert not any(ns in name for name in dirs + files), parent
    await client.remove(hostile)




async def test_restart_keeps_state_and_start_up_removes_unclaimed_layers(
        server: SnapshotterProcess, ns: str) -> None:
    client = Client(server.socket_path)
    try:
        await client.prepare(f"{ns}/a", "", {"keep": "me"})
        await client.commit(f"{ns}/c", f"{ns}/a")
        await client.prepare(f"{ns}/b", f"{ns}/c")
        before = {i.name: i for i in await client.walk(f"name~=^{ns}/")}
    finally:
        client.close()
    server.stop()
    # What a crash between the core's create and the row's insert leaves: a
    # complete layer no record claims (built here by the core directly).
    home = os.path.join(server.root, server.backend)
    driver = registry.get_driver(server.backend, home, [], IDMappings())
    orphan = f"9{secrets.randbelow(10**9)}"
    driver.create(orphan, "", CreateOpts())
    driver.close()
    assert os.path.isdir(os.path.join(home, "layers", orphan))
    server.start()
    client = Client(server.socket_path)
    try:
        assert {i.name: i for i in await client.walk(f"name~=^{ns}/")} == before
        assert not os.path.exists(os.path.join(home, "layers", orphan))
        assert (await client.mounts(f"{ns}/b"))[0].type
        await client.remove(f"{ns}/b")
        await client.remove(f"{ns}/c")
        await client.cleanup()
    finally:
        client.close()
