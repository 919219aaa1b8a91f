"""Engine ring: strata as a Docker managed (v2) plugin, end to end.

The image is built from the repository's Dockerfile on a private dockerd (base:
a cached debootstrap tree imported as ``debian:bookworm-slim``), turned into a
plugin by ``strata plugin-create``, enabled, and made that dockerd's storage
driver. Then: run, diff, commit; a dockerd restart; a kill -9 of the plugin; an
in-place ``docker plugin upgrade`` under a running container. Everything runs in
a private mount namespace with its own ``/run/docker/plugins`` (managed_env.py).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from plugin import managed
from tests.engine import harness
from tests.engine.harness import BASE_IMAGE, DOCKER_CLI, REPO_ROOT
from tests.engine.managed_env import MountNamespace, NsDockerd, Registry, debian_base
from tests.engine.rootfs import Rootfs

pytestmark = pytest.mark.engine
TOOLS = ("debootstrap", "docker-registry", "ctr", "unshare", "nsenter")


@dataclass
class World:
    dockerd: NsDockerd
    registry: Registry
    name: str
    timings: dict[str, float] = field(default_factory=dict)
    plugin_pids: set[int] = field(default_factory=set)

    def docker(self, *args: str, timeout: float = 180.0) -> str:
        return self.dockerd.docker(*args, timeout=timeout).stdout.strip()

    def step(self, what: str, started: float) -> None:
        self.timings[what] = time.monotonic() - started

    @property
    def plugin_id(self) -> str:
        return self.docker("plugin", "inspect", "-f", "{{.Id}}", self.name)

    def plugin_pid(self) -> int:
        pid = self.dockerd.plugin_pid(self.plugin_id)
        self.plugin_pids.add(pid)
        return pid

    def propagated_mount(self) -> Path:
        """The host's view of the plugin's /var/lib/docker."""
        return self.dockerd.data_root / "plugins" / self.plugin_id / "propagated-mount"


@pytest.fixture
def world(dockerd_bin: str) -> Iterator[World]:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"missing {', '.join(missing)} (see .ci/run)")
    workdir = harness.new_workdir("sm")
    namespace = MountNamespace.start()
    registry = Registry(workdir)
    # overlay2 until the plugin exists: builds on vfs copy the whole tree per step
    dockerd = NsDockerd(driver="overlay2", workdir=workdir, dockerd_bin=dockerd_bin,
                        namespace=namespace)
    world = World(dockerd, registry, f"strata-m{secrets.token_hex(3)}")
    try:
        registry.start()
        dockerd.start()
        yield world
    finally:
        print("\nmanaged plugin steps (s): "
              + ", ".join(f"{k} {v:.1f}" for k, v in world.timings.items()))
        try:
            dockerd.stop()  # sends Cleanup, stops the plugin task
            registry.stop()
            for pid in world.plugin_pids | set(harness.pids_naming(workdir)):
                harness.terminate_pid(pid, timeout=10.0)
        finally:
            namespace.close()
            harness.remove_workdir(workdir)


def test_managed_plugin_lifecycle(world: World, rootfs: Rootfs) -> None:
    upgrade_ref = build_and_create(world)
    switch_to_plugin(world)
    keep = run_diff_commit(world, rootfs)
    check_paths_and_logs(world, keep)

    started = time.monotonic()
    world.dockerd.restart()
    world.docker("start", keep)
    assert world.docker("exec", keep, "cat", "/marker") == "m"
    assert world.docker("run", "--rm", "--network", "none", "img2", "cat", "/marker") == "m"
    world.step("dockerd restart", started)

    kill_9_plugin(world, keep)
    upgrade_in_place(world, keep, upgrade_ref)


def build_and_create(world: World) -> str:
    """The v1 plugin, created and enabled; a v2 pushed to the registry for the upgrade."""
    started = time.monotonic()
    world.docker("import", str(debian_base()), "debian:bookworm-slim", timeout=600)
    world.step("base (debootstrap or cache) + import", started)
    started = time.monotonic()
    image = f"strata-test/plugin:{world.name}"
    world.dockerd.docker("build", "--network", "host", "-t", image, str(REPO_ROOT),
                         env={"DOCKER_BUILDKIT": "0"}, timeout=900)
    size = int(world.docker("image", "inspect", "-f", "{{.Size}}", image))
    print(f"\nplugin image {image}: {size / 1e6:.1f} MB")
    # v2 differs by one file: identical rootfs content cannot make a second plugin
    context = world.dockerd.workdir / "v2"
    context.mkdir()
    (context / "release").write_text("v2\n")
    (context / "Dockerfile").write_text(f"FROM {image}\nCOPY release /opt/strata/release\n")
    world.dockerd.docker("build", "-t", image + "-v2", str(context),
                         env={"DOCKER_BUILDKIT": "0"})
    world.step("image builds", started)
    plain_container_serves(world, image)

    started = time.monotonic()
    upgrade_ref = f"{world.registry.address}/{world.name}:v2"
    plugin_create(world, upgrade_ref, image + "-v2")
    world.docker("plugin", "push", upgrade_ref, timeout=600)
    world.docker("plugin", "rm", upgrade_ref)
    plugin_create(world, world.name, image)
    world.docker("plugin", "enable", world.name)
    world.step("plugin-create x2 + push + enable", started)
    return upgrade_ref


def plain_container_serves(world: World, image: str) -> None:
    """The Dockerfile's other use, as its header runs it: a container serving the socket."""
    started = time.monotonic()
    sockets, state = world.dockerd.workdir / "plain-sockets", world.dockerd.workdir / "plain"
    sockets.mkdir()
    # not --privileged: this machine's capability bounding set lacks CAP_SYS_RESOURCE,
    # and dockerd 20.10 asks runc for every capability then; serving needs none.
    cid = world.docker("run", "-d", "--cap-add", "SYS_ADMIN", "--network", "none",
                       "-v", f"{sockets}:/run/docker/plugins", "-v", f"{state}:/var/lib/strata",
                       image, "serve", "--backend", "auto")
    try:
        deadline = time.monotonic() + 30
        answer = b""
        while not answer and time.monotonic() < deadline:
            with socket.socket(socket.AF_UNIX) as client:
                try:
                    client.connect(str(sockets / "strata.sock"))
                except OSError:
                    time.sleep(0.2)
                    continue
                client.sendall(b"POST /Plugin.Activate HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
                answer = client.recv(4096)
        assert b"GraphDriver" in answer, world.docker("logs", cid)
    finally:
        world.docker("rm", "-f", cid)
    world.step("plain container serves", started)


def plugin_create(world: World, name: str, image: str) -> None:
    """``strata plugin-create`` as an operator runs it: dockerd named by DOCKER_HOST."""
    env = world.dockerd.cli_env({"DOCKER_HOST": world.dockerd.host,
                                 "PYTHONPATH": str(REPO_ROOT)})
    tmp = world.dockerd.workdir / "plugin-create"
    tmp.mkdir(exist_ok=True)
    result = subprocess.run(
        [sys.executable, "-m", "plugin", "plugin-create", name, "--image", image,
         "--docker", DOCKER_CLI, "--tmpdir", str(tmp)],
        env=env, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr + world.dockerd.diagnostics()
    assert list(tmp.iterdir()) == [], "plugin-create left its temp dir"


def switch_to_plugin(world: World) -> None:
    """dockerd's next start runs on the plugin: it starts enabled plugins first."""
    started = time.monotonic()
    world.dockerd.stop()
    world.dockerd.driver = world.name
    world.dockerd.start()
    status = dict(json.loads(world.docker("info", "-f", "{{json .DriverStatus}}")))
    assert status["Backend"] != "fuse-overlayfs"
    world.plugin_pid()
    world.step("switch dockerd to the plugin", started)


def run_diff_commit(world: World, rootfs: Rootfs) -> str:
    started = time.monotonic()
    # the busybox tree has a char device: the plugin's device cgroup must allow it
    world.docker("import", str(rootfs.tar), BASE_IMAGE)
    assert world.docker("run", "--rm", "--network", "none", BASE_IMAGE, "echo", "hi") == "hi"
    # sleep as pid 1 ignores SIGTERM: a short stop timeout keeps dockerd restarts quick
    keep = world.docker("run", "-d", "--stop-timeout", "1", "--network", "none", BASE_IMAGE,
                        "sleep", "100000")
    world.docker("exec", keep, "sh", "-c", "echo m > /marker")
    assert "A /marker" in world.docker("diff", keep).splitlines()
    world.docker("commit", keep, "img2")
    assert world.docker("run", "--rm", "--network", "none", "img2", "cat", "/marker") == "m"
    world.step("import, run, diff, commit", started)
    return keep


def check_paths_and_logs(world: World, keep: str) -> None:
    """GetMetadata paths are the plugin's own; the Init record is under the
    propagated mount; strata's lines are at info in dockerd's log, none at error."""
    data = json.loads(world.docker("inspect", "-f", "{{json .GraphDriver.Data}}", keep))
    home = f"{managed.PROPAGATED_MOUNT}/{world.name}"
    assert data["MergedDir"].startswith(home + "/"), data
    on_host = world.propagated_mount() / os.path.relpath(data["MergedDir"],
                                                         managed.PROPAGATED_MOUNT)
    assert on_host.parent.is_dir(), f"{data['MergedDir']} is not {on_host} on the host"
    record_path = Path(world.propagated_mount(), os.path.relpath(
        managed.MANAGED_STATE_DIR, managed.PROPAGATED_MOUNT), "init.json")
    assert json.loads(record_path.read_text())["home"] == home
    log = world.dockerd.log_path.read_text(errors="replace").splitlines()
    serving = [line for line in log if "serving strata on" in line]
    assert serving and all("level=info" in line for line in serving), serving
    strata_errors = [line for line in log if "level=error" in line and " strata" in line]
    assert strata_errors == []


def kill_9_plugin(world: World, keep: str) -> None:
    started = time.monotonic()
    before = world.plugin_pid()
    os.kill(before, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while (after := world.plugin_pid()) == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert after != before, "dockerd did not restart the killed plugin"
    assert world.docker("exec", keep, "cat", "/marker") == "m"
    assert "A /marker" in world.docker("diff", keep).splitlines()
    assert world.docker("run", "--rm", "--network", "none", "img2", "cat", "/marker") == "m"
    log = world.dockerd.log_path.read_text(errors="replace")
    assert "resuming the recorded Init" in log
    world.step("kill -9 of the plugin", started)


def upgrade_in_place(world: World, keep: str, upgrade_ref: str) -> None:
    """disable -f, upgrade, enable: same plugin ID (so the same layers), new rootfs,
    and the running container never notices."""
    started = time.monotonic()
    plugin_id = world.plugin_id
    world.docker("plugin", "disable", "-f", world.name)
    world.docker("plugin", "upgrade", "--grant-all-permissions", "--skip-remote-check",
                 world.name, upgrade_ref, timeout=600)
    world.docker("plugin", "enable", world.name)
    assert world.plugin_id == plugin_id
    rootfs = world.dockerd.data_root / "plugins" / plugin_id / "rootfs"
    assert (rootfs / "opt/strata/release").read_text() == "v2\n"
    world.plugin_pid()
    assert world.docker("exec", keep, "cat", "/marker") == "m"
    assert world.docker("run", "--rm", "--network", "none", "img2", "cat", "/marker") == "m"
    assert "A /marker" in world.docker("diff", keep).splitlines()
    world.step("upgrade in place", started)
