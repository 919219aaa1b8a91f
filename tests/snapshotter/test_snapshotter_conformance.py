"""containerd 1.6's ``snapshots/testsuite`` cases, through strata's gRPC socket,
on every backend that serves containerd (one server per backend per module).

Keys carry a per-test prefix with a slash (``<hex>/preparing``): the server
is shared by the module, and containerd's own keys have slashes and spaces.
"""

from __future__ import annotations

import errno
import os
import secrets
import time

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from plugin.snapshotter.proto import snapshots_pb2 as pb
from tests.snapshotter.fstest import (
    apply,
    check_snapshots,
    chown,
    create_dir,
    create_file,
    link,
    remove_all,
    rename,
    snapshot_tree,
)
from tests.snapshotter.harness import Client, SnapshotterProcess, mount_all, unmount_all

pytestmark = pytest.mark.asyncio

GC_ROOT = "containerd.io/gc.root"


@pytest.fixture
def ns() -> str:
    return secrets.token_hex(4)


def opt() -> dict[str, str]:
    return {GC_ROOT: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


async def status_of(call: object) -> Status:
    with pytest.raises(GRPCError) as refused:
        await call  # type: ignore[misc]
    return refused.value.status


async def prepare_mounted(client: Client, work: str, key: str, parent: str = "") -> str:
    target = os.path.join(work, key.replace("/", "_"))
    os.makedirs(target)
    mount_all(await client.prepare(key, parent, opt()), target)
    return target


def ns_time(ts: object) -> int:
    return ts.seconds * 1_000_000_000 + ts.nanos  # type: ignore[attr-defined, no-any-return]


# ---- testsuite.go ---------------------------------------------------------------

async def test_basic(client: Client, work: str, ns: str) -> None:
    initial = [create_file("/foo", b"foo\n", 0o777), create_dir("/a", 0o755),
               create_dir("/a/b", 0o755), create_dir("/a/b/c", 0o755)]
    diff = [create_file("/bar", b"bar\n", 0o777), create_file("/foo", b"bar\n", 0o777),
            remove_all("/a/b")]
    preparing = await prepare_mounted(client, work, f"{ns}/preparing")
    apply(preparing, initial)
    unmount_all(preparing)
    committed = f"{ns}/committed"
    await client.commit(committed, f"{ns}/preparing", opt())
    si = await client.stat(committed)
    assert (si.parent, si.kind) == ("", pb.COMMITTED)
    assert await status_of(client.stat(f"{ns}/preparing")) == Status.NOT_FOUND

    nxt = await prepare_mounted(client, work, f"{ns}/nextlayer", committed)
    expected = os.path.join(work, "expected")
    os.makedirs(expected)
    apply(expected, initial)
    assert snapshot_tree(nxt) == snapshot_tree(expected)
    apply(nxt, diff)
    unmount_all(nxt)
    ni = await client.stat(f"{ns}/nextlayer")
    assert (ni.parent, ni.kind) == (committed, pb.ACTIVE)
    next_committed = f"{ns}/committed-next"
    await client.commit(next_committed, f"{ns}/nextlayer", opt())
    si2 = await client.stat(next_committed)
    assert (si2.parent, si2.kind) == (committed, pb.COMMITTED)
    assert await status_of(client.stat(f"{ns}/nextlayer")) == Status.NOT_FOUND

    walked = {i.name: i for i in await client.walk()}
    assert walked[committed] == si and walked[next_committed] == si2

    view = os.path.join(work, "nextnext")
    os.makedirs(view)
    mount_all(await client.view(f"{ns}/nextnext", next_committed, opt()), view)
    apply(expected, diff)
    try:
        assert snapshot_tree(view) == snapshot_tree(expected)
    finally:
        unmount_all(view)
    await client.remove(f"{ns}/nextnext")
    assert await status_of(client.remove(committed)) == Status.FAILED_PRECONDITION
    await client.remove(next_committed)
    await client.remove(committed)


async def test_stat_active_and_committed(client: Client, work: str, ns: str) -> None:
    preparing = await prepare_mounted(client, work, f"{ns}/preparing")
    with open(os.path.join(preparing, "foo"), "wb") as f:
        f.write(b"foo\n")
    si = await client.stat(f"{ns}/preparing")
    assert (si.name, si.kind, si.parent) == (f"{ns}/preparing", pb.ACTIVE, "")
    # Committed while still mounted, as the testsuite does.
    await client.commit(f"{ns}/committed", f"{ns}/preparing", opt())
    unmount_all(preparing)
    si = await client.stat(f"{ns}/committed")
    assert (si.name, si.kind, si.parent) == (f"{ns}/committed", pb.COMMITTED, "")


async def test_transitivity(client: Client, work: str, ns: str) -> None:
    preparing = await prepare_mounted(client, work, f"{ns}/preparing")
    with open(os.path.join(preparing, "foo"), "wb") as f:
        f.write(b"foo\n")
    unmount_all(preparing)
    await client.commit(f"{ns}/snapA", f"{ns}/preparing", opt())
    nxt = await prepare_mounted(client, work, f"{ns}/next", f"{ns}/snapA")
    with open(os.path.join(nxt, "foo"), "wb") as f:
        f.write(b"foo bar\n")
    unmount_all(nxt)
    await client.commit(f"{ns}/snapB", f"{ns}/next", opt())
    si_b = await client.stat(f"{ns}/snapB")
    assert si_b.parent == f"{ns}/snapA"
    assert (await client.stat(si_b.parent)).parent == ""


async def test_prepare_and_view_of_a_taken_key_fail(client: Client, ns: str) -> None:
    await client.prepare(f"{ns}/preparing", "", opt())
    await client.commit(f"{ns}/snapA", f"{ns}/preparing", opt())
    await client.prepare(f"{ns}/newlayer", f"{ns}/snapA", opt())
    assert await status_of(client.view(f"{ns}/newlayer", f"{ns}/snapA")) == Status.ALREADY_EXISTS
    await client.prepare(f"{ns}/prepLayer", f"{ns}/snapA", opt())
    assert await status_of(client.prepare(f"{ns}/prepLayer", f"{ns}/snapA")) \
        == Status.ALREADY_EXISTS
    await client.view(f"{ns}/viewLayer", f"{ns}/snapA", opt())
    assert await status_of(client.view(f"{ns}/viewLayer", f"{ns}/snapA")) \
        == Status.ALREADY_EXISTS


async def base_snapshots(client: Client, ns: str) -> None:
    await client.prepare(f"{ns}c1-a", "", opt())
    await client.commit(f"{ns}c1", f"{ns}c1-a", opt())
    await client.prepare(f"{ns}c2-a", f"{ns}c1", opt())
    await client.commit(f"{ns}c2", f"{ns}c2-a", opt())
    await client.prepare(f"{ns}a1", f"{ns}c2", opt())
    await client.prepare(f"{ns}a2", "", opt())
    await client.view(f"{ns}v1", f"{ns}c2", opt())
    await client.view(f"{ns}v2", "", opt())


async def test_update(client: Client, ns: str) -> None:
    t1 = time.time_ns()
    await base_snapshots(client, ns)
    t2 = time.time_ns()
    cases = [("c1", pb.COMMITTED, ""), ("c2", pb.COMMITTED, "c1"), ("a1", pb.ACTIVE, "c2"),
             ("a2", pb.ACTIVE, ""), ("v1", pb.VIEW, "c2"), ("v2", pb.VIEW, "")]
    for name, kind, parent in cases:
        st = await client.stat(ns + name)
        created = ns_time(st.created_at)
        assert t1 <= created <= t2 and created == ns_time(st.updated_at), name
        assert (st.kind, st.parent, st.name) == (kind, ns + parent if parent else "", ns + name)
        root_time = opt()[GC_ROOT]
        expected = {"l1": "v1", "l2": "v2", "l3": "v3", GC_ROOT: root_time}
        st.parent = "doesnotexist"
        st.labels.clear()
        st.labels.update(expected)
        u1 = time.time_ns()
        st = await client.update(st)
        u2 = time.time_ns()
        assert ns_time(st.created_at) == created
        assert u1 <= ns_time(st.updated_at) <= u2
        assert (st.kind, st.parent) == (kind, ns + parent if parent else "")
        assert dict(st.labels) == expected
        st.labels.clear()
        st.labels.update({"l1": "updated", "l4": "v4"})
        st = await client.update(st, "labels.l1", "labels.l2")
        assert dict(st.labels) == {"l1": "updated", "l3": "v3", GC_ROOT: root_time}
        st.labels.clear()
        st.labels.update({"l4": "v4", GC_ROOT: root_time})
        st = await client.update(st, "labels")
        assert dict(st.labels) == {"l4": "v4", GC_ROOT: root_time}
        assert dict((await client.stat(ns + name)).labels) == dict(st.labels)
        st.parent = "doesnotexist"
        assert await status_of(client.update(st, "parent")) == Status.INVALID_ARGUMENT


async def test_remove_and_reuse_of_keys(client: Client, ns: str) -> None:
    await client.prepare(f"{ns}committed-a", "", opt())
    await client.commit(f"{ns}committed-1", f"{ns}committed-a", opt())
    await client.prepare(f"{ns}reuse-1", f"{ns}committed-1", opt())
    await client.remove(f"{ns}reuse-1")
    await client.view(f"{ns}reuse-1", f"{ns}committed-1", opt())
    await client.remove(f"{ns}reuse-1")
    await client.prepare(f"{ns}reuse-1", "", opt())
    await client.remove(f"{ns}committed-1")
    await client.commit(f"{ns}committed-1", f"{ns}reuse-1", opt())
    assert await status_of(client.remove(f"{ns}nothing")) == Status.NOT_FOUND


async def test_walk_filters(client: Client, ns: str) -> None:
    root = {GC_ROOT: f"check-walk-{ns}"}
    await client.prepare(ns + "a-np", "", root)
    await client.prepare(ns + "p-tmp", "", root)
    await client.commit(ns + "p", ns + "p-tmp", root)
    await client.prepare(ns + "a", ns + "p", root)
    await client.view(ns + "v", ns + "p", root)
    await client.prepare(ns + "p-wl-tmp", "", root)
    await client.commit(ns + "p-wl", ns + "p-wl-tmp", {"l": "1", **root})
    await client.prepare(ns + "a-wl", ns + "p-wl", {"l": "2", **root})
    await client.view(ns + "v-wl", ns + "p-wl", {"l": "3", **root})
    await client.prepare(ns + "a-np-wl", "", {"l": "2", **root})
    mine = f'labels."{GC_ROOT}"=={root[GC_ROOT]}'
    cases = [
        (["a-np", "p", "a", "v", "p-wl", "a-wl", "v-wl", "a-np-wl"], [mine]),
        (["a-np", "a", "a-wl", "a-np-wl"], [f"kind==active,{mine}"]),
        (["v", "v-wl"], [f"kind==view,{mine}"]),
        (["p", "p-wl"], [f"kind==committed,{mine}"]),
        (["p", "a-np-wl"], [f"name=={ns}p", f"name=={ns}a-np-wl"]),
        (["a-wl"], [f"name=={ns}a-wl,labels.l"]),
        (["a", "v"], [f"parent=={ns}p"]),
        (["a", "v", "a-wl", "v-wl"], [f'parent!="",{mine}']),
        (["p-wl", "a-wl", "v-wl", "a-np-wl"], [f"labels.l,{mine}"]),
        (["a-wl", "a-np-wl"], [f"labels.l==2,{mine}"]),
        (["a-wl", "a-np-wl"], [f'labels.l=="2",name~=/^{ns}a-/']),
    ]
    for expected, filters in cases:
        got = sorted(i.name for i in await client.walk(*filters))
        assert got == sorted(ns + n for n in expected), filters
    for bad in ["name==", "name=x", "==x", 'labels."unterminated==1', "name==a,"]:
        assert await status_of(client.walk(bad)) == Status.INVALID_ARGUMENT, bad


async def test_list_streams_in_batches_of_100(client: Client, ns: str) -> None:
    for n in range(130):
        await client.view(f"{ns}/many-{n}", "", {"batch": ns})
    batches = await client.list_batches(f"labels.batch=={ns}")
    assert [len(b) for b in batches] == [100, 30]


async def test_layer_file_update(client: Client, work: str, ns: str) -> None:
    l1 = [create_dir("/etc", 0o700), create_file("/etc/hosts", b"mydomain 10.0.0.1", 0o644),
          create_file("/etc/profile", b"PATH=/usr/bin", 0o644)]
    l2 = [create_file("/etc/hosts", b"mydomain 10.0.0.2", 0o644),
          create_file("/etc/profile", b"PATH=/usr/bin", 0o666), create_dir("/root", 0o700),
          create_file("/root/.bashrc", b"PATH=/usr/sbin:/usr/bin", 0o644)]
    await check_snapshots(client, work, ns, [l1, l2])


async def test_remove_directory_in_lower_layer(client: Client, work: str, ns: str) -> None:
    l1 = [create_dir("/lib", 0o700), create_file("/lib/hidden", b"", 0o644)]
    l2 = [remove_all("/lib"), create_dir("/lib", 0o700), create_file("/lib/not-hidden", b"", 0o644)]
    l3 = [create_file("/lib/newfile", b"", 0o644)]
    await check_snapshots(client, work, ns, [l1, l2, l3])


async def test_chown(client: Client, work: str, ns: str) -> None:
    l1 = [create_dir("/opt", 0o700), create_dir("/opt/a", 0o700), create_dir("/opt/a/b", 0o700),
          create_file("/opt/a/b/file.txt", b"hello", 0o644)]
    l2 = [chown("/opt", 1, 1), chown("/opt/a", 1, 1), chown("/opt/a/b", 1, 1),
          chown("/opt/a/b/file.txt", 1, 1)]
    await check_snapshots(client, work, ns, [l1, l2])


async def test_directory_permission_on_commit(client: Client, work: str, ns: str) -> None:
    l1 = [create_dir(f"/dir{n}", 0o700) for n in range(1, 6)] + [
        create_file("/dir4/f1", b"...", 0o644), create_file("/dir5/f1", b"...", 0o644),
        chown("/dir1", 1, 1), chown("/dir2", 1, 1), chown("/dir3", 1, 1), chown("/dir5", 1, 1),
        chown("/dir5/f1", 1, 1)]
    l2 = [chown("/dir2", 0, 0), remove_all("/dir3"), chown("/dir4", 1, 1),
          chown("/dir4/f1", 1, 1)]
    l3 = [create_dir("/dir3", 0o700), chown("/dir3", 1, 1), remove_all("/dir5"),
          create_dir("/dir5", 0o700), chown("/dir5", 1, 1)]
    await check_snapshots(client, work, ns, [l1, l2, l3])


async def test_deleted_files_in_child_snapshot(client: Client, work: str, ns: str) -> None:
    l1 = [create_file("/foo", b"foo\n", 0o777), create_file("/foobar", b"foobar\n", 0o777)]
    await check_snapshots(client, work, ns, [l1, [remove_all("/foobar")], []])


async def test_move_file_from_lower_layer(client: Client, work: str, ns: str) -> None:
    l1 = [create_dir("/dir1", 0o700), create_file("/dir1/f1", b"Hello", 0o644),
          create_dir("dir2", 0o700), create_file("dir2/f2", b"...", 0o644)]
    l2 = [create_dir("/dir3", 0o700), create_file("/dir3/f1", b"Hello", 0o644),
          remove_all("/dir1"), link("dir2/f2", "dir3/f2"), remove_all("dir2/f2")]
    await check_snapshots(client, work, ns, [l1, l2])


async def test_rename(client: Client, server: SnapshotterProcess, work: str, ns: str) -> None:
    l1 = [create_dir("/dir1", 0o700), create_dir("/somefiles", 0o700),
          create_file("/somefiles/f1", b"was here first!", 0o644),
          create_file("/somefiles/f2", b"nothing interesting", 0o644)]
    l2 = [rename("/dir1", "/dir2"), create_file("/somefiles/f1-overwrite", b"new content 1", 0o644),
          rename("/somefiles/f1-overwrite", "/somefiles/f1"),
          rename("/somefiles/f2", "/somefiles/f3")]
    try:
        await check_snapshots(client, work, ns, [l1, l2])
    except OSError as e:
        # containerd's own suite skips this case ("still fails on some kernels
        # with overlay"): renaming a lower dir needs redirect_dir.
        if e.errno == errno.EXDEV and server.backend in ("overlay", "fuse-overlayfs"):
            pytest.skip(f"{server.backend}: renaming a lower directory: {e}")
        raise


async def test_remove_intermediate_snapshot(client: Client, work: str, ns: str) -> None:
    base = await prepare_mounted(client, work, f"{ns}/base")
    await client.commit(f"{ns}/committed-base", f"{ns}/base", opt())
    await client.prepare(f"{ns}/intermediate", f"{ns}/committed-base", opt())
    await client.commit(f"{ns}/committed-inter", f"{ns}/intermediate", opt())
    await client.prepare(f"{ns}/toplayer", f"{ns}/committed-inter", opt())
    assert await status_of(client.remove(f"{ns}/committed-inter")) == Status.FAILED_PRECONDITION
    await client.remove(f"{ns}/toplayer")
    await client.remove(f"{ns}/committed-inter")
    unmount_all(base)
    await client.remove(f"{ns}/committed-base")


async def test_view_is_read_only(client: Client, work: str, ns: str) -> None:
    await client.prepare(f"{ns}/preparing", "", opt())
    await client.commit(f"{ns}/committed", f"{ns}/preparing", opt())
    target = os.path.join(work, "view-mount")
    os.makedirs(target)
    mount_all(await client.view(f"{ns}/view", f"{ns}/committed", opt()), target)
    try:
        with pytest.raises(OSError) as refused, \
                open(os.path.join(target, "testfile"), "wb") as f:
            f.write(b"testcontent")
        assert refused.value.errno == errno.EROFS
    finally:
        unmount_all(target)
    await client.remove(f"{ns}/view")
    await client.remove(f"{ns}/committed")


async def test_stat_in_walk(client: Client, ns: str) -> None:
    await base_snapshots(client, f"{ns}-siw-")
    listed = [i for i in await client.walk() if i.name.startswith(f"{ns}-siw-")]
    assert len(listed) == 6
    for info in listed:
        assert info == await client.stat(info.name)


async def test_root_permission(client: Client, work: str, ns: str) -> None:
    target = await prepare_mounted(client, work, f"{ns}/preparing")
    try:
        assert os.stat(target).st_mode & 0o777 == 0o755
    finally:
        unmount_all(target)


async def test_128_layers_mount(client: Client, work: str, ns: str) -> None:
    lowest = [create_file("/bottom", b"way at the bottom\n", 0o777),
              create_file("/overwriteme", b"FIRST!\n", 0o777), create_dir("/ADDHERE", 0o755),
              create_dir("/ONLYME", 0o755), create_file("/ONLYME/bottom", b"bye!\n", 0o777)]
    layers = [lowest] + [[
        create_file("/overwriteme", f"{i} WAS HERE!\n".encode(), 0o777),
        create_file(f"/ADDHERE/file-{i}", b"same\n", 0o755), remove_all("/ONLYME"),
        create_dir("/ONLYME", 0o755), create_file(f"/ONLYME/file-{i}", b"only me!\n", 0o777),
    ] for i in range(1, 128)]
    flat = os.path.join(work, "flat")
    os.makedirs(flat)
    parent = ""
    for i, steps in enumerate(layers):
        target = await prepare_mounted(client, work, f"{ns}/prepare-layer-{i}", parent)
        try:
            assert snapshot_tree(target) == snapshot_tree(flat), i
            apply(flat, steps)
            apply(target, steps)
            assert snapshot_tree(target) == snapshot_tree(flat), i
        finally:
            unmount_all(target)
        parent = f"{ns}/committed-{i}"
        await client.commit(parent, f"{ns}/prepare-layer-{i}", opt())
    view = os.path.join(work, "fullview")
    os.makedirs(view)
    specs = await client.view(f"{ns}/fullview", parent, opt())
    for spec in specs:
        # As containerd's overlayfs: the view mounts its 128 parents, not an own
        # empty layer on top of them.
        lowers = [o for o in spec.options if o.startswith("lowerdir=")]
        if lowers:
            assert len(lowers[0].split(":")) == len(layers)
    mount_all(specs, view)
    try:
        assert snapshot_tree(view) == snapshot_tree(flat)
    finally:
        unmount_all(view)
