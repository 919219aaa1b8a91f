"""The conformance suite, written once and run on every backend the host has.

It covers what moby's ``daemon/graphdriver/graphtest`` checks (empty, base and
snapshot layers, deep chains, diff-apply round trips, changes, sizes) through
the socket, the way dockerd drives a plugin.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import stat
import tarfile
from collections.abc import AsyncIterator

import pytest

from plugin.driver.probes import fs_name, project_quota_finding
from tests.support.client import PluginError
from tests.support.files import new_layer_id, read_file, write_file
from tests.support.mounts import mounts_under
from tests.support.plugin import PluginUnderTest

pytestmark = pytest.mark.asyncio


async def test_activate_and_capabilities_shapes(plugin: PluginUnderTest) -> None:
    status, body = await plugin.client.raw("Plugin.Activate", b"")
    assert (status, body) == (200, b'{"Implements":["GraphDriver"]}')
    status, body = await plugin.client.raw("GraphDriver.Capabilities", b"{}\n")
    assert (status, body) == (200, b'{"Capabilities":{"ReproducesExactDiffs":false}}')
    rows = (await plugin.client.call("GraphDriver.Status", {}))["Status"]
    assert rows and all(len(r) == 2 and all(isinstance(v, str) for v in r) for r in rows)
    assert ["Backend", plugin.backend] in rows


async def test_success_replies_are_never_empty(plugin: PluginUnderTest) -> None:
    layer = new_layer_id()
    for name, body in [("GraphDriver.Create", {"ID": layer}),
                       ("GraphDriver.Put", {"ID": layer}),
                       ("GraphDriver.Remove", {"ID": layer}),
                       ("GraphDriver.Cleanup", {})]:
        status, data = await plugin.client.raw(name, (str(body).replace("'", '"') + "\n").encode())
        assert status == 200 and data == b"{}", (name, status, data)


async def test_create_empty(plugin: PluginUnderTest) -> None:
    c = plugin.client
    await c.create("empty")
    assert await c.exists("empty")
    root = await c.get("empty")
    st = os.lstat(root)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o755
    assert (st.st_uid, st.st_gid) == (0, 0)
    assert os.listdir(root) == []
    assert await c.get("empty") == root, "Get must return the same path every time"
    await c.put("empty")
    await c.put("empty")
    await c.remove("empty")
    assert not await c.exists("empty")


def _held_under(home: str) -> tuple[list[str], list[str]]:
    """This process's open files and the mount points below ``home``."""
    prefix = os.path.realpath(home) + "/"
    files = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(prefix):
            files.append(target)
    return files, mounts_under(prefix, include_root=False)


async def test_cleanup_lets_go_of_home(plugin: PluginUnderTest) -> None:
    """dockerd sends Cleanup as it stops; then the Home may be unmounted: no layer
    mount and no open file of the plugin may be left below it."""
    c = plugin.client
    await c.create("base")
    await c.create("rw", parent="base", rw=True)
    await c.get("rw")
    await c.get("rw")
    await c.get("base")
    await c.put("base")
    files, _ = _held_under(plugin.home)
    assert files, "the refcount journal is expected to be open between counts"
    await c.call("GraphDriver.Cleanup", {})
    assert _held_under(plugin.home) == ([], [])
    # The driver still answers after Cleanup (dockerd may send Cleanup, then stop later).
    assert await c.exists("rw")
    await c.get("rw")
    await c.put("rw")


@pytest.mark.parametrize("body", [b"", b"\0" * 1024], ids=["no body", "end blocks only"])
async def test_apply_diff_of_an_empty_body_or_bare_end_blocks_is_an_empty_layer(
        plugin: PluginUnderTest, body: bytes) -> None:
    """Docker's Unpack of an empty reader (or of the two end blocks alone) applies
    nothing and succeeds.  A request with no body at all once looped for ever on
    the event loop (aiohttp's empty reader says "end of chunk" for ever)."""
    c = plugin.client
    await c.create("empty-apply")
    status, data = await asyncio.wait_for(c.raw(
        "GraphDriver.ApplyDiff?id=empty-apply&parent=", body), timeout=60)
    assert (status, json.loads(data)) == (200, {"Size": 0}), data
    root = await c.get("empty-apply")
    assert os.listdir(root) == []
    await c.put("empty-apply")


async def make_base(c: PluginUnderTest, layer: str) -> None:
    await c.client.create(layer, rw=True)
    root = await c.client.get(layer)
    os.mkdir(os.path.join(root, "a subdir"))
    os.chmod(os.path.join(root, "a subdir"), 0o705 | stat.S_ISVTX)
    os.lchown(os.path.join(root, "a subdir"), 1, 2)
    write_file(os.path.join(root, "a file"), b"Some data", 0o222 | stat.S_ISUID)
    await c.client.put(layer)


def check_base(root: str) -> None:
    st = os.lstat(os.path.join(root, "a subdir"))
    assert stat.S_IMODE(st.st_mode) == 0o705 | stat.S_ISVTX and (st.st_uid, st.st_gid) == (1, 2)
    st = os.lstat(os.path.join(root, "a file"))
    assert stat.S_IMODE(st.st_mode) == 0o222 | stat.S_ISUID
    assert read_file(os.path.join(root, "a file")) == b"Some data"
    assert sorted(os.listdir(root)) == ["a file", "a subdir"]


async def test_create_base_and_snapshot(plugin: PluginUnderTest) -> None:
    await make_base(plugin, "Base")
    await plugin.client.create("Snap", "Base")
    check_base(await plugin.client.get("Snap"))
    await plugin.client.put("Snap")
    for layer in ("Snap", "Base"):
        await plugin.client.remove(layer)


async def test_deep_layer_read(plugin: PluginUnderTest) -> None:
    c, parent, chain = plugin.client, "", []
    for depth in range(24):
        layer = f"deep{depth}"
        await c.create(layer, parent)
        root = await c.get(layer)
        write_file(os.path.join(root, f"file{depth}"), f"layer {depth}".encode())
        await c.put(layer)
        chain.append(layer)
        parent = layer
    top = await c.get(parent)
    for depth in range(24):
        assert read_file(os.path.join(top, f"file{depth}")) == f"layer {depth}".encode()
    await c.put(parent)
    for layer in reversed(chain):
        await c.remove(layer)


def add_many_files(root: str, count: int, seed: int) -> None:
    for i in range(count):
        write_file(os.path.join(root, f"directory-{i % 10}", f"file-{i}"),
              (f"seed {seed} file {i} " * (seed + i % 7)).encode())


async def test_diff_apply_round_trip(plugin: PluginUnderTest) -> None:
    c = plugin.client
    base, upper, applied = new_layer_id(), new_layer_id(), new_layer_id()
    await c.create(base)
    root = await c.get(base)
    add_many_files(root, 50, 3)
    write_file(os.path.join(root, "file-remove.txt"), b"This file should get removed in upper!")
    os.makedirs(os.path.join(root, "var/lib"))
    await c.put(base)

    await c.create(upper, base)
    root = await c.get(upper)
    add_many_files(root, 50, 6)
    os.unlink(os.path.join(root, "file-remove.txt"))
    os.rmdir(os.path.join(root, "var/lib"))
    await c.put(upper)
    diff_size = await c.diff_size(upper, "")

    await c.create(applied, base)
    tar = await c.diff(upper, base)
    size = await c.apply_diff(applied, base, tar)
    assert size == diff_size
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        names = tf.getnames()
    assert "file-remove.txt" not in names and ".wh.file-remove.txt" in names
    assert "var/.wh.lib" in names

    root = await c.get(applied)
    upper_root = await c.get(upper)
    for i in range(50):
        rel = os.path.join(f"directory-{i % 10}", f"file-{i}")
        assert read_file(os.path.join(root, rel)) == read_file(os.path.join(upper_root, rel))
    assert not os.path.lexists(os.path.join(root, "file-remove.txt"))
    assert not os.path.lexists(os.path.join(root, "var/lib"))
    assert os.path.isdir(os.path.join(root, "var"))
    await c.put(applied)
    await c.put(upper)


async def test_changes(plugin: PluginUnderTest) -> None:
    c = plugin.client
    base, upper = new_layer_id(), new_layer_id()
    await c.create(base)
    root = await c.get(base)
    add_many_files(root, 20, 3)
    write_file(os.path.join(root, "victim"), b"bye")
    await c.put(base)
    await c.create(upper, base)
    root = await c.get(upper)
    expected = set()
    for i in range(0, 20, 2):  # modify every other file
        rel = f"directory-{i % 10}/file-{i}"
        write_file(os.path.join(root, rel), b"changed!")
        expected |= {(f"/directory-{i % 10}", 0), ("/" + rel, 0)}
    write_file(os.path.join(root, "newdir/new"), b"new")
    expected |= {("/newdir", 1), ("/newdir/new", 1)}
    os.unlink(os.path.join(root, "victim"))
    expected.add(("/victim", 2))
    await c.put(upper)
    found = await c.changes(upper, base)
    assert set(found) == expected
    assert len(found) == len(expected)
    size = await c.diff_size(upper, base)
    assert size == 10 * len(b"changed!") + len(b"new")


async def test_commit_pattern_diff_streams_into_apply(plugin: PluginUnderTest) -> None:
    """docker commit: Diff streams on one connection into ApplyDiff on another.

    The payload is far larger than the socket buffers, so a server that
    serialised requests or blocked its loop would deadlock here."""
    c = plugin.client
    base, container, committed = new_layer_id(), new_layer_id(), new_layer_id()
    await c.create(base)
    await c.create(container, base, rw=True)
    root = await c.get(container)
    blob = os.urandom(1 << 20)
    for i in range(24):
        write_file(os.path.join(root, f"big/{i}"), blob[i:] + blob[:i])
    await c.put(container)
    await c.create(committed, base)
    size = await asyncio.wait_for(
        c.apply_diff(committed, base, c.diff_chunks(container, base)), timeout=120)
    assert size == 24 * len(blob)
    new_root = await c.get(committed)
    assert read_file(os.path.join(new_root, "big/5")) == blob[5:] + blob[:5]
    await c.put(committed)


def _export_workers() -> list[int]:
    """Archive workers now alive (children of the zygote, and theirs), but for
    the idle warm apply workers an earlier ApplyDiff left waiting for the next."""
    from plugin.archive.proc import stream

    proc = stream._ZYGOTE._proc
    if proc is None:
        return []
    idle = set(stream._WARM.idle_pids())
    parents, found = {proc.pid}, []
    changed = True
    while changed:
        changed = False
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) in found:
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) in parents and fields[0] not in ("Z", "X"):
                found.append(int(entry))
                parents.add(int(entry))
                changed = True
    return [pid for pid in found if pid not in idle]


async def test_diff_reader_going_away_ends_the_export(plugin: PluginUnderTest) -> None:
    """dockerd drops a Diff it no longer wants: the worker (and the helper a layer of
    many small files gets) must go, and the layer stay usable."""
    c = plugin.client
    layer = new_layer_id()
    await c.create(layer)
    root = await c.get(layer)
    for i in range(3000):
        write_file(os.path.join(root, f"d{i // 100}", f"f{i}"), b"x" * 3000)
    await c.put(layer)
    loop = asyncio.get_running_loop()
    async for _ in c.diff_chunks(layer):
        assert await loop.run_in_executor(None, _export_workers)
        break  # closes the connection with most of the tar unread
    for _ in range(500):
        if not await loop.run_in_executor(None, _export_workers):
            break
        await asyncio.sleep(0.02)
    assert await loop.run_in_executor(None, _export_workers) == []
    with tarfile.open(fileobj=io.BytesIO(await c.diff(layer))) as tf:
        assert len(tf.getnames()) == 3030


async def test_layer_survives_plugin_restart_without_init(plugin: PluginUnderTest) -> None:
    await make_base(plugin, "Base")
    root = await plugin.client.get("Base")
    await plugin.restart()  # no Activate, no Init: dockerd never resends them
    assert await plugin.client.exists("Base")
    assert await plugin.client.get("Base") == root
    check_base(root)
    await plugin.client.put("Base")
    await plugin.client.put("Base")


async def test_remove_of_unknown_and_put_without_get_succeed(plugin: PluginUnderTest) -> None:
    await plugin.client.remove(new_layer_id())
    await plugin.client.create("lonely")
    await plugin.client.put("lonely")
    await plugin.client.put("lonely")
    assert await plugin.client.exists("lonely")


@pytest.mark.parametrize("bad", ["../escape", "a/b", "..", "x\x00y", "", "a" * 300, "/abs"])
async def test_invalid_ids_are_refused(plugin: PluginUnderTest, bad: str) -> None:
    for call in (plugin.client.create(bad), plugin.client.get(bad), plugin.client.remove(bad)):
        with pytest.raises(PluginError) as e:
            await call
        assert e.value.status == 400 and "ID" in e.value.err
    assert not os.path.exists(os.path.join(os.path.dirname(plugin.home), "escape"))


async def test_bad_requests_get_clear_errors(plugin: PluginUnderTest) -> None:
    c = plugin.client
    for payload in (b"", b"{not json", b'{"ID": 5}\n', b"[]"):
        status, data = await c.raw("GraphDriver.Create", payload)
        assert status == 400 and b'"Err":"' in data, (payload, status, data)
    status, data = await c.raw("GraphDriver.NoSuchCall", b"{}\n")
    assert status == 404 and b"Err" in data
    status, data = await c.raw("GraphDriver.Get", b"", method="GET")
    assert status == 405 and b"Err" in data
    with pytest.raises(PluginError) as e:
        await c.get("missing-layer")
    assert "missing-layer" in e.value.err and e.value.status == 404
    with pytest.raises(PluginError) as e:
        await c.create("child", "missing-parent")
    assert "missing-parent" in e.value.err
    assert not await c.exists("child")
    await c.create("twice")
    with pytest.raises(PluginError) as e:
        await c.create("twice")
    assert "twice" in e.value.err and await c.exists("twice")


async def test_one_log_line_per_call_at_the_level_of_what_it_did(
        plugin: PluginUnderTest, caplog: pytest.LogCaptureFixture) -> None:
    """Filesystem work is logged at info, answers from memory at debug, failures as
    warnings: one line per call, each with op, id, duration and outcome."""
    layer = new_layer_id()
    await plugin.client.create(layer)
    await plugin.client.get(layer)  # the first Get of a layer always goes to the pool
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="strata.server"):
        await plugin.client.create(new_layer_id())
        assert await plugin.client.exists(layer)
        await plugin.client.get(layer)
        await plugin.client.put(layer)
        with pytest.raises(PluginError):
            await plugin.client.remove("../escape")
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "strata.server"]
    ops = [(level, message.split()[0], message.endswith(" ok")) for level, message in lines]
    assert ops == [(logging.INFO, "GraphDriver.Create", True),
                   (logging.DEBUG, "GraphDriver.Exists", True),
                   (logging.DEBUG, "GraphDriver.Get", True),
                   (logging.DEBUG, "GraphDriver.Put", True),
                   (logging.WARNING, "GraphDriver.Remove", False)], lines
    assert all(f" {layer} " in message for _, message in lines[1:4]), lines
    await plugin.client.put(layer)


async def test_diff_of_missing_layer_is_not_200(plugin: PluginUnderTest) -> None:
    with pytest.raises(PluginError) as e:
        await plugin.client.diff("missing-layer")
    assert e.value.status == 404 and "missing-layer" in e.value.err


async def test_bad_tar_leaves_earlier_layers_intact(plugin: PluginUnderTest) -> None:
    await make_base(plugin, "Base")
    await plugin.client.create("broken", "Base")
    with pytest.raises(PluginError) as e:
        await plugin.client.apply_diff("broken", "Base", b"this is not a tar archive" * 100)
    assert e.value.err
    check_base(await plugin.client.get("Base"))
    await plugin.client.put("Base")


async def test_half_applied_layer_is_gone_after_restart(plugin: PluginUnderTest) -> None:
    """dockerd drops an ApplyDiff when its source fails mid-stream; if strata
    restarts before dockerd's Remove arrives, the half layer must not survive."""
    c = plugin.client
    await make_base(plugin, "Base")
    await c.create("half", "Base")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("big")
        info.size = 8 << 20
        tf.addfile(info, io.BytesIO(b"x" * info.size))
    tar = buf.getvalue()

    async def dies_midway() -> AsyncIterator[bytes]:
        yield tar[: 1 << 20]
        await asyncio.sleep(0.2)
        raise ConnectionResetError("source went away")

    with pytest.raises(Exception):  # noqa: B017 - any transport error is the point
        await c.apply_diff("half", "Base", dies_midway())
    await asyncio.sleep(0.5)
    await plugin.restart()
    assert not await plugin.client.exists("half")
    assert await plugin.client.exists("Base")
    check_base(await plugin.client.get("Base"))
    await plugin.client.put("Base")



async def test_the_loop_guard_catches_blocking_calls(plugin: PluginUnderTest) -> None:
    """The blockbuster fixture must really fail strata code that blocks the loop,
    or every passing test above proves nothing about the event loop."""
    from blockbuster import BlockingError

    from plugin.driver.probes import fs_name

    with pytest.raises(BlockingError):
        fs_name(plugin.home)  # stat(2) of Home, on the loop


async def test_a_stuck_backend_call_becomes_an_err(plugin: PluginUnderTest,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A stuck mount must not hang dockerd (which waits forever on legacy plugins)."""
    from plugin import faults

    plugin.deadline = 0.5
    await plugin.restart()
    await plugin.client.create("stuck")
    monkeypatch.setitem(faults._FAULTS, "get", "sleep:3")
    started = asyncio.get_running_loop().time()
    with pytest.raises(PluginError) as e:
        await plugin.client.get("stuck")
    assert e.value.status == 504 and "stuck" in e.value.err and "0.5s" in e.value.err
    assert asyncio.get_running_loop().time() - started < 2.5
    assert await plugin.client.exists("stuck")  # the server keeps serving meanwhile
    monkeypatch.delitem(faults._FAULTS, "get")
    await asyncio.sleep(3)  # let the stuck worker finish before teardown


async def test_a_symlink_planted_under_home_is_never_followed(plugin: PluginUnderTest,
                                                              tmp_path: str) -> None:
    outside = os.path.join(str(tmp_path), "outside")
    os.makedirs(os.path.join(outside, "root"))
    write_file(os.path.join(outside, "root", "secret"), b"keep me")
    os.symlink(outside, os.path.join(plugin.home, "layers", "planted"))
    for call in (plugin.client.get("planted"), plugin.client.create("kid", "planted"),
                 plugin.client.apply_diff("planted", "", b"\0" * 1024)):
        with pytest.raises(PluginError) as e:
            await call
        assert "planted" in e.value.err
    assert not await plugin.client.exists("planted")
    await plugin.client.remove("planted")  # unlinks the symlink only
    assert read_file(os.path.join(outside, "root", "secret")) == b"keep me"


async def test_remove_of_a_layer_with_children_is_refused(plugin: PluginUnderTest) -> None:
    """One rule on every backend (the contract's, and containerd's): a parent is
    not removed under its children, and the refusal changes nothing."""
    c = plugin.client
    parent, child = new_layer_id(), new_layer_id()
    await c.create(parent)
    write_file(os.path.join(await c.get(parent), "kept"), b"parent data")
    await c.put(parent)
    await c.create(child, parent, rw=True)
    with pytest.raises(PluginError) as refused:
        await c.remove(parent)
    assert refused.value.status == 409
    assert f"layer {parent} has 1 child layer(s) ({child})" in refused.value.err
    assert await c.exists(parent)
    assert read_file(os.path.join(await c.get(child), "kept")) == b"parent data"
    await c.put(child)
    await c.remove(child)
    await c.remove(parent)
    assert not await c.exists(parent) and not await c.exists(child)
    with pytest.raises(PluginError) as missing:
        await c.create(child, parent)
    assert missing.value.status == 404


async def test_a_size_limit_is_refused_with_what_the_probe_found(plugin: PluginUnderTest) -> None:
    """Backends without per-layer limits refuse ``size`` naming Home's filesystem
    (what the probe found), not a fixed sentence; btrfs and zfs honour it."""
    if plugin.backend in ("btrfs", "zfs"):
        pytest.skip(f"{plugin.backend} sets size limits (tests/unit/test_{plugin.backend}*)")
    with pytest.raises(PluginError) as refused:
        await plugin.client.create(new_layer_id(), "", rw=True, storage_opt={"size": "1G"})
    assert refused.value.status == 501
    finding = await asyncio.to_thread(project_quota_finding, plugin.home)
    backing = await asyncio.to_thread(fs_name, plugin.home)
    assert backing in finding and finding in refused.value.err
    assert "use the btrfs backend" in refused.value.err
