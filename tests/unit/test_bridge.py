"""BodyReader: the blocking view of an aiohttp request body that ApplyDiff reads.

The body is fed to a real aiohttp StreamReader the way its HTTP parser feeds it
(pieces, with HTTP chunk boundaries marked); a worker thread reads it back.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from aiohttp import streams
from aiohttp.base_protocol import BaseProtocol

from plugin.server.bridge import BodyReader


def _pieces(total: int, size: int) -> list[bytes]:
    data = os.urandom(total)
    return [data[i:i + size] for i in range(0, total, size)]


async def _feed(reader: streams.StreamReader, pieces: list[bytes]) -> None:
    """As aiohttp's parser does for a chunked body: one HTTP chunk per piece."""
    for piece in pieces:
        reader.begin_http_chunk_receiving()
        reader.feed_data(piece)
        reader.end_http_chunk_receiving()
        await asyncio.sleep(0)
    reader.feed_eof()


def _new_reader(loop: asyncio.AbstractEventLoop) -> streams.StreamReader:
    protocol = BaseProtocol(loop)
    protocol.connection_made(asyncio.ReadTransport())  # a connection that is open
    # A limit above the body: flow control never pauses the (absent) socket.
    return streams.StreamReader(protocol, 64 << 20, loop=loop)


@pytest.mark.parametrize("piece", [1, 777, 32 << 10, 200 << 10])
async def test_read_returns_at_most_what_is_asked_and_every_byte_once(piece: int) -> None:
    loop = asyncio.get_running_loop()
    content = _new_reader(loop)
    pieces = _pieces(300 << 10 if piece > 1 else 5000, piece)
    body = BodyReader(content, loop)
    feeding = asyncio.ensure_future(_feed(content, pieces))

    def read_all() -> list[bytes]:
        out = []
        while data := body.read(50_000):
            assert len(data) <= 50_000
            out.append(data)
        return out

    got = await asyncio.to_thread(read_all)
    await feeding
    assert b"".join(got) == b"".join(pieces)
    assert all(len(d) == 50_000 for d in got[:-1]), "short reads only at the end"


def _drain_pipe(fd: int, delay: float = 0.0, stop_after: int | None = None) -> bytes:
    """Read the pipe to its end (or close it after ``stop_after`` bytes), slowly if asked."""
    got = bytearray()
    while data := os.read(fd, 64 << 10):
        got += data
        if stop_after is not None and len(got) >= stop_after:
            break
        time.sleep(delay)
    os.close(fd)
    return bytes(got)


@pytest.mark.parametrize("piece", [1000, 32 << 10, 300 << 10])
async def test_pump_writes_every_byte_in_order_through_a_full_pipe(piece: int) -> None:
    """A slow reader keeps the pipe full: the loop must wait for room, never drop
    or repeat a byte, and the body read before (``read``) is not sent again."""
    loop = asyncio.get_running_loop()
    content = _new_reader(loop)
    pieces = _pieces(3 << 20, piece)
    body = BodyReader(content, loop)
    feeding = asyncio.ensure_future(_feed(content, pieces))
    head = await asyncio.to_thread(body.read, 5000)
    rfd, wfd = os.pipe()
    reading = asyncio.ensure_future(asyncio.to_thread(_drain_pipe, rfd, 0.002))
    await asyncio.to_thread(body.pump, wfd)
    os.close(wfd)
    got = await reading
    await feeding
    assert head + got == b"".join(pieces)


async def test_pump_reads_the_whole_body_after_the_reader_goes_away() -> None:
    """The archive worker failing mid-stream closes the pipe: the sender must
    still see its body consumed, and pump returns normally."""
    loop = asyncio.get_running_loop()
    content = _new_reader(loop)
    body = BodyReader(content, loop)
    feeding = asyncio.ensure_future(_feed(content, _pieces(4 << 20, 32 << 10)))
    rfd, wfd = os.pipe()
    reading = asyncio.ensure_future(asyncio.to_thread(_drain_pipe, rfd, 0.0, 100 << 10))
    await asyncio.wait_for(asyncio.to_thread(body.pump, wfd), 30)
    os.close(wfd)
    assert len(await reading) >= 100 << 10
    await feeding
    assert content.at_eof()


async def test_a_request_without_a_body_ends_at_once() -> None:
    """aiohttp gives a bodiless request its empty reader, whose readchunk says
    "end of HTTP chunk" for ever: reading must end, not spin on the loop."""
    loop = asyncio.get_running_loop()
    body = BodyReader(streams.EMPTY_PAYLOAD, loop)
    assert await asyncio.wait_for(asyncio.to_thread(body.read, 4096), 10) == b""
    rfd, wfd = os.pipe()
    await asyncio.wait_for(asyncio.to_thread(body.pump, wfd), 10)
    os.close(wfd)
    assert _drain_pipe(rfd) == b""
