"""Protocol ring: the real aiohttp app on a real Unix socket, per backend.

The server runs in the test's event loop so that the ``blockbuster`` fixture
sees every call made on that loop: any blocking filesystem call from strata's
code on the loop fails the test (aiohttp's own suite does the same).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest
from blockbuster import BlockBuster, blockbuster_ctx

from plugin.driver import registry
from plugin.errors import IncompatibleFS, NotSupported, Prerequisites
from plugin.idtools import IDMappings
from tests.backends import btrfs_fs, home_for, zfs_pool  # noqa: F401 (fixtures)
from tests.support.plugin import PluginUnderTest, serving_in_loop
from tests.support.workdir import new_workdir, remove_workdir

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
    path = new_workdir("sp")
    try:
        yield str(path)
    finally:
        remove_workdir(path)


@pytest.fixture
async def plugin(backend: str, tmp_path: str, short_dir: str, blockbuster: BlockBuster,
                 request: pytest.FixtureRequest) -> AsyncIterator[PluginUnderTest]:
    root = home_for(request, backend, str(tmp_path))
    async with serving_in_loop(backend, root, os.path.join(short_dir, "p.sock")) as put:
        yield put
