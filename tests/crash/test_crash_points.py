"""Crash safety: SIGKILL the real plugin process at named points of Create,
ApplyDiff and Remove (``STRATA_FAULTS``), restart it, and check that no half
layer is visible, no completed layer is lost, the debris is gone and every
earlier layer is byte-identical.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from plugin.driver import registry
from tests.backends import home_for
from tests.support.client import DockerLikeClient, PluginError
from tests.support.files import layer_tar
from tests.support.mounts import assert_no_mounts_under
from tests.support.plugin import Plugin, init_body, unique_name
from tests.support.workdir import new_workdir, remove_workdir

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the plugin needs root (chroot, chown)")


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root with its mode, owner and content hash."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            digest = ""
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            found[os.path.relpath(path, root)] = f"{st.st_mode:o} {st.st_uid}:{st.st_gid} {digest}"
    return found


#: Every backend with a real driver, from the registry (a new one joins the ring).
BACKENDS = registry.implemented()


class Rig:
    def __init__(self, workdir: Path, backend: str, home: Path) -> None:
        self.workdir = workdir
        self.home = home
        self.plugin = Plugin(name=unique_name("strata-c"), backend=backend,
                             state_dir=workdir / "state", log_path=workdir / "plugin.log")
        self.client: DockerLikeClient | None = None

    async def start(self, faults: str = "") -> DockerLikeClient:
        if self.client is not None:
            await self.client.close()
        self.plugin.extra_env = {"STRATA_FAULTS": faults} if faults else {}
        self.plugin.start()
        self.client = DockerLikeClient(str(self.plugin.socket_path))
        return self.client

    def debris(self) -> list[str]:
        return sorted(os.listdir(self.home / "staging")) + sorted(os.listdir(self.home / "trash"))

    def layers(self) -> list[str]:
        return sorted(os.listdir(self.home / "layers"))


@pytest.fixture(params=BACKENDS)
async def rig(request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    backend: str = request.param
    workdir = new_workdir("sc")
    try:
        # btrfs and zfs need Home on their own filesystem (tests/backends.py)
        home = Path(home_for(request, backend, str(workdir))) / "home"
        r = Rig(workdir, backend, home)
        async for ready in _started(r):
            yield ready
    finally:
        remove_workdir(workdir)


async def _started(r: Rig) -> AsyncIterator[Rig]:
    client = await r.start()
    try:
        await client.call("GraphDriver.Init", init_body(r.home))
    except PluginError as e:
        await client.close()
        r.plugin.close()
        pytest.skip(f"backend {r.plugin.backend} cannot run here: {e.err}")
    await client.create("base")
    await client.apply_diff("base", "", layer_tar({"etc/motd": b"hello\n", "bin/x": b"\x7fELF"}))
    try:
        yield r
    finally:
        if r.client is not None:
            await r.client.call("GraphDriver.Cleanup", {})
            await r.client.close()
        r.plugin.close()


async def crash_during(r: Rig, point: str, call: str) -> None:
    r.plugin.stop()
    client = await r.start(f"{point}=kill")
    base_before = snapshot(r.home / "layers/base/root")
    with pytest.raises(Exception):  # noqa: B017 - the connection dies with the process
        if call == "create":
            await client.create("child", "base")
        elif call in ("apply", "apply-naive"):
            await client.create("child", "base")
            big = layer_tar({f"f{i}": os.urandom(64 << 10) for i in range(64)})
            # Parent "" on a child is a naive apply (overlay: through a write view).
            await client.apply_diff("child", "base" if call == "apply" else "", big)
        elif call == "remove":
            await client.remove("base")
    assert r.plugin.crashed(), f"the plugin did not die at {point}"
    await r.start()
    if call != "remove":
        assert snapshot(r.home / "layers/base/root") == base_before


CASES = [
    # point, call, the layers that must exist after the restart
    ("create.staged", "create", ["base"]),
    ("create.renamed", "create", ["base", "child"]),
    ("apply.midstream", "apply", ["base"]),
    ("apply.done", "apply", ["base"]),
    ("apply.midstream", "apply-naive", ["base"]),
    ("apply.done", "apply-naive", ["base"]),
    ("remove.renamed", "remove", []),
]


@pytest.mark.parametrize(("point", "call", "expected"), CASES)
async def test_kill_at_named_point(rig: Rig, point: str, call: str, expected: list[str]) -> None:
    await crash_during(rig, point, call)
    assert rig.layers() == expected
    assert rig.debris() == []
    assert_no_mounts_under(str(rig.home))  # nothing mounted survives the process
    client = rig.client
    assert client is not None
    for layer in ("base", "child"):
        assert await client.exists(layer) == (layer in expected)
    if "child" in expected:  # a Create that completed before the crash is whole
        root = Path(await client.get("child"))
        assert (root / "etc/motd").read_bytes() == b"hello\n"
        await client.put("child")
    # dockerd carries on: its Remove of the failed layer and a new Create both work
    await client.remove("child")
    await client.create("child", "base" if "base" in expected else "")
    assert await client.exists("child")


def test_cases_cover_every_mutating_fault_point() -> None:
    from plugin.faults import POINTS

    covered = {case[0] for case in CASES}
    # snap.* are the containerd snapshotter's, covered by tests/snapshotter/test_crash.py
    assert covered == {p for p in POINTS if p not in ("get", "put")
                       and not p.startswith("snap.")}
