"""Clients that talk to a plugin the way dockerd 20.10 does.

Same headers as Go's ``pkg/plugins`` client (docs/protocol.md §2.1): empty Host,
``Accept: application/vnd.docker.plugins.v1.2+json``, no Content-Type, no
Accept-Encoding, compact JSON with a trailing newline, keep-alive, a chunked
body for ApplyDiff.  Two transports share those facts:

* ``DockerLikeClient``: aiohttp, asynchronous; what the test rings use.
* ``BlockingClient``: one blocking keep-alive socket with hand-written HTTP/1.1
  framing, and the ApplyDiff body in 32 KiB chunks (Go's ``io.Copy`` buffer);
  what the benchmarks use, so that the client's own cost stays small and even.
"""

from __future__ import annotations

import io
import json
import socket
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any, cast

import aiohttp

HEADERS = {
    "Host": "",
    "User-Agent": "Go-http-client/1.1",
    "Accept": "application/vnd.docker.plugins.v1.2+json",
}
#: What aiohttp would add by itself and dockerd never sends.
SKIP = ("Content-Type", "Accept-Encoding")
RAW_HEADERS = "".join(f"{k}: {v}\r\n" for k, v in HEADERS.items()).encode()
MiB = 1 << 20
#: Go's io.Copy buffer: the size of each chunk dockerd writes to the ApplyDiff body.
SEND_CHUNK = 32 << 10


class PluginError(Exception):
    """The plugin answered a call with an error status or an ``Err``."""

    def __init__(self, op: str, status: int, err: str) -> None:
        super().__init__(f"{op}: HTTP {status}: {err}")
        self.op, self.status, self.err = op, status, err


def encode(body: dict[str, Any] | None) -> bytes:
    """A request body as Go's json.Encoder writes it; no body at all for None."""
    return b"" if body is None else json.dumps(body, separators=(",", ":")).encode() + b"\n"


def layer_body(layer_id: str, parent: str = "") -> dict[str, Any]:
    """``{"ID": ...}`` with ``Parent`` only when there is one, as dockerd omits it."""
    return {"ID": layer_id, **({"Parent": parent} if parent else {})}


def create_request(layer_id: str, parent: str = "", rw: bool = False,
                   storage_opt: dict[str, str] | None = None) -> tuple[str, dict[str, Any]]:
    body = layer_body(layer_id, parent)
    if storage_opt:
        body["StorageOpt"] = storage_opt
    return ("GraphDriver.CreateReadWrite" if rw else "GraphDriver.Create"), body


def apply_diff_path(layer_id: str, parent: str) -> str:
    return f"GraphDriver.ApplyDiff?id={layer_id}&parent={parent}"


def checked_reply(op: str, status: int, data: bytes) -> dict[str, Any]:
    """The decoded reply of a successful call; ``PluginError`` otherwise (its ``err``
    empty when the reply carried none: a test can tell)."""
    reply: dict[str, Any] = json.loads(data)
    if status != 200 or reply.get("Err"):
        raise PluginError(op, status, reply.get("Err", ""))
    return reply


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
        status, data = await self.raw(name, encode(body))
        if not data:
            raise AssertionError(f"{name}: empty response body (dockerd fails with EOF)")
        return checked_reply(name, status, data)

    # ---- the GraphDriver calls, shaped as dockerd sends them -----------------
    async def create(self, layer_id: str, parent: str = "", rw: bool = False,
                     storage_opt: dict[str, str] | None = None) -> None:
        await self.call(*create_request(layer_id, parent, rw, storage_opt))

    async def get(self, layer_id: str) -> str:
        return str((await self.call("GraphDriver.Get", {"ID": layer_id}))["Dir"])

    async def put(self, layer_id: str) -> None:
        await self.call("GraphDriver.Put", {"ID": layer_id})

    async def remove(self, layer_id: str) -> None:
        await self.call("GraphDriver.Remove", {"ID": layer_id})

    async def exists(self, layer_id: str) -> bool:
        return bool((await self.call("GraphDriver.Exists", {"ID": layer_id}))["Exists"])

    async def changes(self, layer_id: str, parent: str) -> list[tuple[str, int]]:
        reply = await self.call("GraphDriver.Changes", layer_body(layer_id, parent))
        return [(c["Path"], c["Kind"]) for c in reply["Changes"]]

    async def diff_size(self, layer_id: str, parent: str) -> int:
        return int((await self.call("GraphDriver.DiffSize", layer_body(layer_id, parent)))["Size"])

    async def diff_chunks(self, layer_id: str, parent: str = "") -> AsyncIterator[bytes]:
        async with self.session.post("http://plugin/GraphDriver.Diff",
                                     data=encode(layer_body(layer_id, parent)),
                                     headers=HEADERS) as resp:
            if resp.status != 200:
                raise PluginError("GraphDriver.Diff", resp.status, (await resp.text()))
            async for chunk in resp.content.iter_chunked(1 << 16):
                yield chunk

    async def diff(self, layer_id: str, parent: str = "") -> bytes:
        return b"".join([c async for c in self.diff_chunks(layer_id, parent)])

    async def apply_diff(self, layer_id: str, parent: str,
                         tar: bytes | AsyncIterator[bytes]) -> int:
        async def chunked() -> AsyncIterator[bytes]:
            if isinstance(tar, bytes):
                for i in range(0, len(tar), 1 << 16):
                    yield tar[i:i + (1 << 16)]
            else:
                async for chunk in tar:
                    yield chunk

        url = f"http://plugin/{apply_diff_path(layer_id, parent)}"
        async with self.session.post(url, data=chunked(), headers=HEADERS) as resp:
            reply = json.loads(await resp.read())
            if resp.status != 200 or reply.get("Err"):
                raise PluginError("GraphDriver.ApplyDiff", resp.status, reply.get("Err", ""))
            return int(reply["Size"])


class BlockingClient:
    """One keep-alive connection, dockerd's exact request shape, no event loop."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(socket_path)
        self.rfile = cast(io.BufferedReader, self.sock.makefile("rb", buffering=MiB))
        # One read buffer for the connection's life, not one per call: the small
        # round trips are what the benchmarks measure.
        self._view = memoryview(bytearray(MiB))

    def close(self) -> None:
        self.rfile.close()
        self.sock.close()

    # -- framing -------------------------------------------------------------
    def _read_head(self) -> tuple[int, dict[str, str]]:
        status_line = self.rfile.readline()
        if not status_line:
            raise ConnectionError("the plugin closed the connection")
        status = int(status_line.split()[1])
        headers: dict[str, str] = {}
        while (line := self.rfile.readline()) not in (b"\r\n", b"\n", b""):
            key, _, value = line.decode("latin-1").partition(":")
            headers[key.strip().lower()] = value.strip()
        return status, headers

    def _read_body(self, headers: dict[str, str],
                   sink: Callable[[memoryview], None] | None = None) -> tuple[bytes, int]:
        """The whole body (``sink`` None) or its length after passing it to ``sink``."""
        kept = bytearray()
        total = 0
        view = self._view

        def take(n: int) -> None:
            nonlocal total
            while n:
                got = self.rfile.readinto(view[:min(n, len(view))])
                if not got:
                    raise ConnectionError("the plugin cut a body short")
                if sink is None:
                    kept.extend(view[:got])
                else:
                    sink(view[:got])
                total += got
                n -= got

        if "content-length" in headers:
            take(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            while (size := self._chunk_size()) != 0:
                take(size)
                self.rfile.readline()
        return bytes(kept), total

    def _chunk_size(self) -> int:
        """The next chunk's size; after the last (0), the trailer is read too."""
        size = int(self.rfile.readline().split(b";")[0], 16)
        if size == 0:
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
        return size

    def _request_head(self, path: str, extra: str) -> bytes:
        return f"POST /{path} HTTP/1.1\r\n".encode() + RAW_HEADERS + extra.encode() + b"\r\n"

    # -- calls -----------------------------------------------------------------
    def call(self, name: str, body: dict[str, Any] | None) -> dict[str, Any]:
        payload = encode(body)
        self.sock.sendall(self._request_head(name, f"Content-Length: {len(payload)}\r\n")
                          + payload)
        status, headers = self._read_head()
        data, _ = self._read_body(headers)
        return checked_reply(name, status, data if data.strip() else b"{}")

    def create(self, layer_id: str, parent: str = "", rw: bool = False) -> None:
        self.call(*create_request(layer_id, parent, rw))

    def get(self, layer_id: str) -> str:
        return str(self.call("GraphDriver.Get", {"ID": layer_id})["Dir"])

    def put(self, layer_id: str) -> None:
        self.call("GraphDriver.Put", {"ID": layer_id})

    def remove(self, layer_id: str) -> None:
        self.call("GraphDriver.Remove", {"ID": layer_id})

    def changes(self, layer_id: str, parent: str) -> list[dict[str, Any]]:
        return list(self.call("GraphDriver.Changes", layer_body(layer_id, parent))["Changes"])

    def diff_size(self, layer_id: str, parent: str) -> int:
        return int(self.call("GraphDriver.DiffSize", layer_body(layer_id, parent))["Size"])

    def apply_diff(self, layer_id: str, parent: str, chunks: Iterable[bytes | memoryview]) -> int:
        self.sock.sendall(self._request_head(apply_diff_path(layer_id, parent),
                                             "Transfer-Encoding: chunked\r\n"))
        for chunk in rechunk(chunks, SEND_CHUNK):
            self.sock.sendmsg([b"%x\r\n" % len(chunk), chunk, b"\r\n"])
        self.sock.sendall(b"0\r\n\r\n")
        status, headers = self._read_head()
        data, _ = self._read_body(headers)
        return int(checked_reply("GraphDriver.ApplyDiff", status, data)["Size"])

    def _start_diff(self, layer_id: str, parent: str) -> dict[str, str]:
        payload = encode(layer_body(layer_id, parent))
        self.sock.sendall(self._request_head("GraphDriver.Diff",
                                             f"Content-Length: {len(payload)}\r\n") + payload)
        status, headers = self._read_head()
        if status != 200:
            data, _ = self._read_body(headers)
            raise PluginError("GraphDriver.Diff", status, repr(data[:200]))
        return headers

    def diff(self, layer_id: str, parent: str = "") -> int:
        """Stream the Diff into nothing; return its byte count."""
        headers = self._start_diff(layer_id, parent)
        _, total = self._read_body(headers, sink=lambda _view: None)
        return total

    def diff_stream(self, layer_id: str, parent: str = "") -> Iterator[bytes]:
        """The Diff body as it arrives (to pipe it into an ApplyDiff on another client)."""
        headers = self._start_diff(layer_id, parent)
        if "content-length" in headers:
            yield from self._raw_chunks(int(headers["content-length"]))
            return
        while (size := self._chunk_size()) != 0:
            yield from self._raw_chunks(size)
            self.rfile.readline()

    def _raw_chunks(self, n: int) -> Iterator[bytes]:
        while n:
            data = self.rfile.read1(min(n, MiB))
            if not data:
                raise ConnectionError("the plugin cut a body short")
            n -= len(data)
            yield data


def rechunk(chunks: Iterable[bytes | memoryview], size: int) -> Iterator[memoryview]:
    """The same bytes in pieces of at most ``size`` (no copy)."""
    for chunk in chunks:
        view = memoryview(chunk)
        for i in range(0, len(view), size):
            yield view[i:i + size]
