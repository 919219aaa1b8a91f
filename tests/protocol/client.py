"""An HTTP client that talks to a plugin the way dockerd 20.10 does.

Same headers as Go's ``pkg/plugins`` client (docs/protocol.md §2.1): empty Host,
``Accept: application/vnd.docker.plugins.v1.2+json``, no Content-Type, no
Accept-Encoding, compact JSON with a trailing newline, keep-alive, a chunked
body for ApplyDiff.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

HEADERS = {
    "Host": "",
    "User-Agent": "Go-http-client/1.1",
    "Accept": "application/vnd.docker.plugins.v1.2+json",
}
SKIP = ("Content-Type", "Accept-Encoding")


class PluginError(Exception):
    def __init__(self, op: str, status: int, err: str) -> None:
        super().__init__(f"{op}: HTTP {status}: {err}")
        self.op, self.status, self.err = op, status, err


class DockerLikeClient:
    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=socket_path, limit=4),
            skip_auto_headers=SKIP, auto_decompress=False)

    async def close(self) -> None:
        await self.session.close()

    async def raw(self, name: str, body: bytes, method: str = "POST") -> tuple[int, bytes]:
        async with self.session.request(method, f"http://plugin/{name}", data=body,
                                        headers=HEADERS) as resp:
            return resp.status, await resp.read()

    async def call(self, name: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        payload = b"" if body is None else json.dumps(body, separators=(",", ":")).encode() + b"\n"
        status, data = await self.raw(name, payload)
        if not data:
            raise AssertionError(f"{name}: empty response body (dockerd fails with EOF)")
        reply: dict[str, Any] = json.loads(data)
        if status != 200 or reply.get("Err"):
            raise PluginError(name, status, reply.get("Err", ""))
        return reply

    # ---- the GraphDriver calls, shaped as dockerd sends them -----------------
    async def create(self, layer_id: str, parent: str = "", rw: bool = False,
                     storage_opt: dict[str, str] | None = None) -> None:
        body: dict[str, Any] = {"ID": layer_id}
        if parent:
            body["Parent"] = parent
        if storage_opt:
            body["StorageOpt"] = storage_opt
        await self.call("GraphDriver.CreateReadWrite" if rw else "GraphDriver.Create", body)

    async def get(self, layer_id: str) -> str:
        return str((await self.call("GraphDriver.Get", {"ID": layer_id}))["Dir"])

    async def put(self, layer_id: str) -> None:
        await self.call("GraphDriver.Put", {"ID": layer_id})

    async def remove(self, layer_id: str) -> None:
        await self.call("GraphDriver.Remove", {"ID": layer_id})

    async def exists(self, layer_id: str) -> bool:
        return bool((await self.call("GraphDriver.Exists", {"ID": layer_id}))["Exists"])

    async def changes(self, layer_id: str, parent: str) -> list[tuple[str, int]]:
        body = {"ID": layer_id, **({"Parent": parent} if parent else {})}
        reply = await self.call("GraphDriver.Changes", body)
        return [(c["Path"], c["Kind"]) for c in reply["Changes"]]

    async def diff_size(self, layer_id: str, parent: str) -> int:
        body = {"ID": layer_id, **({"Parent": parent} if parent else {})}
        return int((await self.call("GraphDriver.DiffSize", body))["Size"])

    async def diff_chunks(self, layer_id: str, parent: str = "") -> AsyncIterator[bytes]:
        body = {"ID": layer_id, **({"Parent": parent} if parent else {})}
        payload = json.dumps(body).encode() + b"\n"
        async with self.session.post("http://plugin/GraphDriver.Diff", data=payload,
                                     headers=HEADERS) as resp:
            if resp.status != 200:
                raise PluginError("GraphDriver.Diff", resp.status, (await resp.text()))
            async for chunk in resp.content.iter_chunked(1 << 16):
                yield chunk

    async def diff(self, layer_id: str, parent: str = "") -> bytes:
        return b"".join([c async for c in self.diff_chunks(layer_id, parent)])

    async def apply_diff(self, layer_id: str, parent: str, tar: bytes | AsyncIterator[bytes]) -> int:
        async def chunked() -> AsyncIterator[bytes]:
            if isinstance(tar, bytes):
                for i in range(0, len(tar), 1 << 16):
                    yield tar[i:i + (1 << 16)]
            else:
                async for chunk in tar:
                    yield chunk

        url = f"http://plugin/GraphDriver.ApplyDiff?id={layer_id}&parent={parent}"
        async with self.session.post(url, data=chunked(), headers=HEADERS) as resp:
            reply = json.loads(await resp.read())
            if resp.status != 200 or reply.get("Err"):
                raise PluginError("GraphDriver.ApplyDiff", resp.status, reply.get("Err", ""))
            return int(reply["Size"])
