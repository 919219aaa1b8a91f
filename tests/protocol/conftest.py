"""Protocol ring: the real aiohttp app on a real Unix socket, per backend.

The server runs in the test's event loop so that the ``blockbuster`` fixture
sees every call made on that loop: any blocking filesystem call from strata's
code on the loop fails the test (aiohttp's own suite does the same).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator

import pytest
from aiohttp import web
from blockbuster import BlockBuster, blockbuster_ctx

from plugin.driver import registry
from plugin.driver.manager import DriverManager
from plugin.errors import IncompatibleFS, NotSupported, Prerequisites
from plugin.idtools import IDMappings
from plugin.server.app import PluginHandler, build_server
from tests.backends import btrfs_fs, home_for, zfs_pool  # noqa: F401 (fixtures)
from tests.protocol.client import DockerLikeClient

#: Every backend with a real driver, from the registry (a new one joins the ring).
BACKENDS = registry.implemented()


def backend_unavailable(name: str, home: str) -> str | None:
    """Why ``name`` cannot run on ``home`` here, or None if it can."""
    try:
        registry.get_driver(name, home, [], IDMappings()).cleanup()
    except (NotSupported, Prerequisites, IncompatibleFS) as e:
        return f"backend {name} unavailable on this host: {e}"
    return None


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: str) -> str:
    name: str = request.param
    # btrfs and zfs get a Home on their own filesystem (tests/backends.py)
    root = home_for(request, name, str(tmp_path))
    reason = backend_unavailable(name, os.path.join(root, "probe-home"))
    if reason:
        print(reason)
        pytest.skip(reason)
    return name


@pytest.fixture
def blockbuster() -> Iterator[BlockBuster]:
    with blockbuster_ctx("plugin") as bb:
        # Get/Put counted on the event loop append one line to the refcount journal.
        bb.functions["os.write"].can_block_in("plugin/state/refcount.py", "_append")
        yield bb


@pytest.fixture
def short_dir() -> Iterator[str]:
    # Unix socket paths must stay under 108 bytes; pytest's tmp_path can be longer.
    path = tempfile.mkdtemp(prefix="sp-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


class PluginUnderTest:
    def __init__(self, backend: str, root: str, socket_path: str) -> None:
        self.backend = backend
        self.home = os.path.join(root, "home")
        self.state_dir = os.path.join(root, "state")
        self.socket_path = socket_path
        self.runner: web.ServerRunner | None = None
        self.handler: PluginHandler | None = None
        self.manager: DriverManager | None = None
        self.deadline = 600.0
        self.client = DockerLikeClient(socket_path)

    async def start(self) -> None:
        manager = self.manager = DriverManager(self.state_dir, self.backend)
        await asyncio.get_running_loop().run_in_executor(None, manager.load_persisted)
        self.handler = PluginHandler(manager, deadline=self.deadline)
        self.runner = web.ServerRunner(build_server(self.handler))
        await self.runner.setup()
        await web.UnixSite(self.runner, self.socket_path).start()

    async def stop(self) -> None:
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
        await self.client.call("GraphDriver.Init", {"Home": self.home, "Opts": None,
                                                    "UIDMaps": None, "GIDMaps": None})


@pytest.fixture
async def plugin(backend: str, tmp_path: str, short_dir: str, blockbuster: BlockBuster,
                 request: pytest.FixtureRequest) -> AsyncIterator[PluginUnderTest]:
    root = home_for(request, backend, str(tmp_path))
    put = PluginUnderTest(backend, root, os.path.join(short_dir, "p.sock"))
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
