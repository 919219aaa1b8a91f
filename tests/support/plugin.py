"""The strata plugin under test, launched one of two ways.

* ``Plugin``: ``python -m plugin serve`` as a process, on the socket dockerd
  finds (``/run/docker/plugins/NAME.sock``) or on one the caller names; ended by
  its pid (SIGTERM, then SIGKILL), or killed outright to stand for a crash.
* ``PluginUnderTest``: the real aiohttp app served in the test's own event loop on
  a Unix socket, so that the ``blockbuster`` fixture sees every call strata makes
  on that loop.  ``serving_in_loop`` starts it, sends what dockerd sends first
  (Activate, Init) and, at the end, Cleanup.

Names and paths are unique per run (the caller's random tag); nothing here is
found or stopped by name.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from plugin.driver.manager import DriverManager
from plugin.server.app import ROUTES, PluginHandler, build_server
from plugin.server.metrics import CallMetrics, MetricsEndpoint
from tests.support.client import DockerLikeClient
from tests.support.procs import HarnessError, spawn_logged, stop_child, tail

REPO_ROOT = Path(__file__).resolve().parents[2]
PLUGIN_SOCKET_DIR = Path("/run/docker/plugins")  # hard-coded in dockerd's legacy lookup


def unique_name(prefix: str) -> str:
    """``<prefix><6 hex>``: a plugin name (and socket, and log) no other run uses."""
    return f"{prefix}{secrets.token_hex(3)}"


def plugin_env(repo_root: Path = REPO_ROOT) -> dict[str, str]:
    """This environment with ``repo_root`` first on PYTHONPATH (for ``python -m plugin``)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo_root), env.get("PYTHONPATH")]))
    return env


def init_body(home: str | Path) -> dict[str, Any]:
    """GraphDriver.Init as dockerd sends it with no options and no ID maps."""
    return {"Home": str(home), "Opts": None, "UIDMaps": None, "GIDMaps": None}


@dataclass
class Plugin:
    """``python -m plugin serve`` as a process: /run/docker/plugins/NAME.sock by default."""

    name: str
    backend: str
    state_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    socket: Path | None = None  # None: where dockerd looks for NAME
    log_level: str = "debug"
    repo_root: Path = REPO_ROOT  # the tree whose plugin runs
    module: str = "plugin"  # ``python -m MODULE serve ...`` (a bench may wrap the server)

    @property
    def socket_path(self) -> Path:
        return self.socket or PLUGIN_SOCKET_DIR / f"{self.name}.sock"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the plugin is not running"
        return self.proc.pid

    def argv(self) -> list[str]:
        return [sys.executable, "-m", self.module, "serve", "--name", self.name,
                "--socket", str(self.socket_path), "--state-dir", str(self.state_dir),
                "--backend", self.backend, "--log-level", self.log_level]

    def start(self, timeout: float = 30.0) -> None:
        env = plugin_env(self.repo_root)
        env.update(self.extra_env)
        self.proc = spawn_logged(self.argv(), self.log_path, self.repo_root, env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HarnessError(f"plugin exited with {self.proc.returncode} during start-up\n"
                                   + self.diagnostics())
            if self._accepts_connections():
                return
            time.sleep(0.1)
        raise HarnessError(f"plugin socket {self.socket_path} not accepting within {timeout}s\n"
                           + self.diagnostics())

    def _accepts_connections(self) -> bool:
        # a stale socket file left by kill -9 exists but refuses connections
        try:
            if not stat.S_ISSOCK(self.socket_path.lstat().st_mode):
                return False
        except FileNotFoundError:
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(2.0)
            try:
                probe.connect(str(self.socket_path))
            except OSError:
                return False
        return True

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM by pid; returns the exit status (None if it was not running)."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        if not stop_child(proc, timeout):
            raise HarnessError(f"plugin ignored SIGTERM for {timeout}s\n" + self.diagnostics())
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL by pid: a crash, no chance to clean up."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        proc.kill()
        proc.wait(10)

    def crashed(self, timeout: float = 20.0) -> bool:
        """Wait for the process to end by itself; True if SIGKILL ended it (a fault point)."""
        proc = self.proc
        assert proc is not None, "the plugin is not running"
        proc.wait(timeout)
        self.proc = None
        return proc.returncode == -9

    def restart(self, hard: bool = False) -> None:
        self.kill() if hard else self.stop()
        self.start()

    def close(self) -> None:
        try:
            self.stop()
        finally:
            self.socket_path.unlink(missing_ok=True)

    def diagnostics(self) -> str:
        return f"--- plugin log ({self.log_path}), tail\n{tail(self.log_path, 80)}"


class PluginUnderTest:
    """The real app in this event loop, on ``socket_path``, with a client connected."""

    def __init__(self, backend: str, root: str, socket_path: str,
                 metrics_socket: str | None = None) -> None:
        self.backend = backend
        self.home = os.path.join(root, "home")
        self.state_dir = os.path.join(root, "state")
        self.socket_path = socket_path
        self.runner: web.ServerRunner | None = None
        self.handler: PluginHandler | None = None
        self.manager: DriverManager | None = None
        self.deadline = 600.0
        self.client = DockerLikeClient(socket_path)
        #: Serve ``GET /metrics`` here too (plugin.server.metrics), in this loop.
        self.metrics_socket = metrics_socket
        self.metrics_runner: web.AppRunner | None = None

    async def start(self) -> None:
        manager = self.manager = DriverManager(self.state_dir, self.backend)
        await asyncio.get_running_loop().run_in_executor(None, manager.load_persisted)
        metrics = CallMetrics(ROUTES) if self.metrics_socket else None
        self.handler = PluginHandler(manager, deadline=self.deadline, metrics=metrics)
        self.runner = web.ServerRunner(build_server(self.handler))
        await self.runner.setup()
        await web.UnixSite(self.runner, self.socket_path).start()
        if metrics is not None and self.metrics_socket:
            endpoint = MetricsEndpoint(metrics, manager, "strata-test",
                                       self.handler.context.executor)
            self.metrics_runner = web.AppRunner(endpoint.application())
            await self.metrics_runner.setup()
            await web.UnixSite(self.metrics_runner, self.metrics_socket).start()

    async def stop(self) -> None:
        if self.metrics_runner is not None:
            await self.metrics_runner.cleanup()
            self.metrics_runner = None
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        if self.handler is not None:
            self.handler.close()
            self.handler = None
        if self.manager is not None:
            self.manager.close()  # as the end of the plugin process would
            self.manager = None

    async def restart(self) -> None:
        await self.client.close()
        await self.stop()
        self.client = DockerLikeClient(self.socket_path)
        await self.start()

    async def init(self) -> None:
        await self.client.call("Plugin.Activate")
        await self.client.call("GraphDriver.Init", init_body(self.home))


@asynccontextmanager
async def serving_in_loop(backend: str, root: str, socket_path: str,
                          metrics_socket: str | None = None) -> AsyncIterator[PluginUnderTest]:
    """A started, Init'ed ``PluginUnderTest`` on Home ``root/home``; Cleanup and stop after."""
    put = PluginUnderTest(backend, root, socket_path, metrics_socket)
    await put.start()
    await put.init()
    try:
        yield put
    finally:
        try:
            await put.client.call("GraphDriver.Cleanup", {})
        finally:
            await put.client.close()
            await put.stop()
