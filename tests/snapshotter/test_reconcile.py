"""Start-up checks the records against the layers on disk.

A record's commit (an fdatasync of sqlite's preallocated WAL) does not commit
the filesystem's journal, so a power cut can keep a record whose layer's
rename out of the core's staging dir was lost.  Here the server is stopped by
its pid and that state made by hand (the layer moved back into staging/, or
into trash/, which start-up empties, for a layer lost for good), then the
server restarted on the same root:

* a recorded layer still whole in staging/ is put back, and works;
* a record whose layer is gone stays (containerd's metadata names it), is
  listed and Stat'ed, but Mounts of it or of a snapshot on it, Prepare, View
  on it, Commit and Usage of it fail with FAILED_PRECONDITION naming the key
  and the missing path; Remove of it succeeds, and nothing else changes.
"""

from __future__ import annotations

import os
import secrets

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from plugin.snapshotter.proto import snapshots_pb2 as pb
from tests.snapshotter.harness import SnapshotterProcess
from tests.snapshotter.test_crash import MOTD, Scene, assert_consistent, gc, home_entries, rows

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")



def layer_of(server: SnapshotterProcess, key: str) -> str:
    return str(rows(server)[key][0])


def layer_path(server: SnapshotterProcess, layer: str) -> str:
    return os.path.join(server.root, server.backend, "layers", layer)


async def power_cut(s: Scene, moves: dict[str, str]) -> str:
    """Stop the server and move each key's layer into ``moves[key]`` (``staging``:
    its rename was lost; ``trash``: lost for good, start-up deletes it), then
    restart; returns what the restart logged."""
    layers = {key: layer_of(s.server, key) for key in moves}
    s.client.close()
    s.server.stop()
    for key, sub in moves.items():
        home = os.path.join(s.server.root, s.server.backend)
        os.rename(layer_path(s.server, layers[key]),
                  os.path.join(home, sub, f"{layers[key]}.{secrets.token_hex(6)}"))
    logged = len(s.server.log())
    await s.restart()
    return s.server.log()[logged:]


async def refusal(call: object) -> str:
    """The FAILED_PRECONDITION message ``call`` is refused with."""
    with pytest.raises(GRPCError) as refused:
        await call  # type: ignore[misc]
    assert refused.value.status == Status.FAILED_PRECONDITION, refused.value
    return refused.value.message or ""


async def test_a_layer_left_in_staging_is_put_back(scene: Scene) -> None:
    s = scene
    base, child, view = s.key("base"), s.key("child"), s.key("view")
    await s.client.prepare(child, base)
    await s.write(child, "mine", b"child data\n")
    await s.client.view(view, base)
    before, layers = rows(s.server), home_entries(s.server, "layers")

    log = await power_cut(s, {base: "staging", child: "staging"})

    assert rows(s.server) == before
    assert home_entries(s.server, "layers") == layers
    assert "promoted" in log and "broken" not in log
    mounts = await s.client.mounts(child)
    assert await s.read(mounts, "motd") == MOTD
    assert await s.read(mounts, "mine") == b"child data\n"
    assert await s.read(await s.client.mounts(view), "motd") == MOTD
    await s.client.commit(s.key("child-c"), child)
    assert await s.read(await s.client.view(s.key("check"), s.key("child-c")), "mine") == \
        b"child data\n"
    await assert_consistent(s)
    await gc(s)
    await assert_consistent(s)


async def test_an_active_snapshot_without_its_layer_is_refused_until_removed(
        scene: Scene) -> None:
    s = scene
    base, lost, sibling = s.key("base"), s.key("lost"), s.key("sibling")
    await s.client.prepare(lost, base, {"containerd.io/gc.root": "x"})
    await s.client.prepare(sibling, base)
    await s.write(sibling, "mine", b"sibling data\n")
    before, layers = rows(s.server), home_entries(s.server, "layers")
    path = layer_path(s.server, layer_of(s.server, lost))

    log = await power_cut(s, {lost: "trash"})

    assert rows(s.server) == before  # the record stays, as it was
    assert home_entries(s.server, "layers") == layers - {os.path.basename(path)}
    for message in (await refusal(s.client.mounts(lost)),
                    await refusal(s.client.mounts(lost)),  # and again: not cached
                    await refusal(s.client.commit(s.key("lost-c"), lost)),
                    await refusal(s.client.usage(lost))):
        assert repr(lost) in message and path in message, message
    assert log.count("is broken") == 1 and repr(lost) in log and path in log
    info = await s.client.stat(lost)
    assert info.kind == pb.ACTIVE and info.labels["containerd.io/gc.root"] == "x"
    assert lost in {i.name for i in await s.client.walk()}
    # Everything else works as before.
    assert await s.read(await s.client.mounts(sibling), "mine") == b"sibling data\n"
    assert rows(s.server) == before

    await s.client.remove(lost)
    assert {k: r for k, r in before.items() if k != lost} == rows(s.server)
    await s.client.prepare(lost, base)  # the key is free again, and works
    assert await s.read(await s.client.mounts(lost), "motd") == MOTD
    await assert_consistent(s)
    await gc(s)
    await assert_consistent(s)


async def test_a_committed_snapshot_without_its_layer_refuses_what_builds_on_it(
        scene: Scene) -> None:
    s = scene
    base, child, view = s.key("base"), s.key("child"), s.key("view")
    await s.client.prepare(child, base)
    await s.client.view(view, base)
    before, layers = rows(s.server), home_entries(s.server, "layers")
    path = layer_path(s.server, layer_of(s.server, base))

    log = await power_cut(s, {base: "trash"})

    assert rows(s.server) == before
    assert home_entries(s.server, "layers") == layers - {os.path.basename(path)}
    for message in (await refusal(s.client.prepare(s.key("new"), base)),
                    await refusal(s.client.view(s.key("new"), base)),
                    await refusal(s.client.mounts(child)),
                    await refusal(s.client.mounts(view))):
        assert repr(base) in message and path in message, message
    assert log.count("is broken") == 1 and repr(base) in log and path in log
    assert rows(s.server) == before  # the refused calls made nothing
    assert home_entries(s.server, "layers") == layers - {os.path.basename(path)}
    assert (await s.client.stat(base)).kind == pb.COMMITTED

    # containerd's GC (or ctr snapshots rm), leaf to root, clears it all.
    await gc(s)
    assert {k: r for k, r in before.items() if not k.startswith(s.ns + "/")} == \
        rows(s.server)
    await assert_consistent(s)
