"""Concurrency: 1,000+ mixed calls from 32 concurrent clients on overlapping
layer chains, on every backend the host has.  Every answer must be right, the
reference counts exact at the end and no mount left behind."""

from __future__ import annotations

import asyncio
import io
import os
import random
import tarfile

import pytest

from plugin.state.refcount import read_counts
from tests.support.client import DockerLikeClient
from tests.support.files import layer_tar, read_file
from tests.support.mounts import mounts_under
from tests.support.plugin import PluginUnderTest

pytestmark = pytest.mark.asyncio

CLIENTS = 32
CALLS_PER_CLIENT = 34  # 32 x 34 = 1,088 calls, plus the set-up


class Counted:
    """A client that counts its calls."""

    def __init__(self, client: DockerLikeClient) -> None:
        self.client = client
        self.calls = 0

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        method = getattr(self.client, name)

        async def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
            self.calls += 1
            return await method(*args, **kwargs)

        return counted


async def worker(n: int, socket_path: str, shared: list[str]) -> int:
    rng = random.Random(n)
    c = Counted(DockerLikeClient(socket_path))
    mine: dict[str, str] = {}  # layer -> the file content it added
    try:
        while c.calls < CALLS_PER_CLIENT:
            op = rng.choice(["layer", "layer", "getput", "getput", "inspect"])
            if op == "layer" or not mine:
                parent = rng.choice(shared)
                layer = f"w{n}-{len(mine)}"
                payload = f"client {n} layer {len(mine)}".encode()
                await c.create(layer, parent)
                size = await c.apply_diff(layer, parent, layer_tar({f"w{n}/{layer}": payload}))
                assert size == len(payload)
                mine[layer] = parent
                root = await c.get(layer)
                assert read_file(os.path.join(root, f"w{n}", layer)) == payload
                assert read_file(os.path.join(root, "shared", "base")) == b"base"
                await c.put(layer)
            elif op == "getput":
                layer = rng.choice(shared)
                first = await c.get(layer)
                assert await c.get(layer) == first  # nested Get: same path
                assert os.path.exists(os.path.join(first, "shared", layer))
                await c.put(layer)
                await c.put(layer)
            else:
                layer = rng.choice(list(mine))
                changes = await c.changes(layer, mine[layer])
                assert (f"/w{n}/{layer}", 1) in changes
                tar = await c.diff(layer, mine[layer])
                with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
                    assert f"w{n}/{layer}" in tf.getnames()
                assert await c.diff_size(layer, mine[layer]) > 0
        for layer in reversed(list(mine)):
            await c.remove(layer)
            assert not await c.exists(layer)
        return c.calls
    finally:
        await c.client.close()


async def test_mixed_calls_from_32_clients(plugin: PluginUnderTest) -> None:
    c = plugin.client
    shared, parent = [], ""
    for i in range(4):  # a chain the clients branch from and mount concurrently
        layer = f"shared{i}"
        await c.create(layer, parent)
        files = {f"shared/{layer}": layer.encode()}
        if i == 0:
            files["shared/base"] = b"base"
        await c.apply_diff(layer, parent, layer_tar(dict(sorted(files.items()))))
        shared.append(layer)
        parent = layer
    counts = await asyncio.wait_for(
        asyncio.gather(*(worker(n, plugin.socket_path, shared) for n in range(CLIENTS))),
        timeout=600)
    assert sum(counts) >= 1000
    refs = await asyncio.to_thread(read_counts, os.path.join(plugin.home, "refs.json"))
    assert refs == {}, "every Get was matched by a Put: no count may remain"
    assert [m for m in mounts_under(plugin.home)] == []
    assert sorted(os.listdir(os.path.join(plugin.home, "layers"))) == shared
    print(f"concurrency: {sum(counts)} calls from {CLIENTS} clients, 0 leaked mounts")
