"""read_body: a call's JSON body, taken at once when aiohttp already holds all of it.

The body goes into a real aiohttp StreamReader as its HTTP parser would put it
there; the request around it is aiohttp's own test request.
"""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import streams, web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.test_utils import make_mocked_request

from plugin.server.app import MAX_BODY, read_body


def _request(loop: asyncio.AbstractEventLoop, pieces: list[bytes],
             eof: bool) -> tuple[web.BaseRequest, streams.StreamReader]:
    protocol = BaseProtocol(loop)
    protocol.connection_made(asyncio.ReadTransport())
    reader = streams.StreamReader(protocol, 64 << 20, loop=loop)
    for piece in pieces:
        reader.feed_data(piece)
    if eof:
        reader.feed_eof()
    return make_mocked_request("POST", "/GraphDriver.Exists", payload=reader), reader


async def test_a_buffered_body_in_pieces_comes_back_whole() -> None:
    request, _ = _request(asyncio.get_running_loop(), [b'{"ID":', b'"abc"}', b"\n"], eof=True)
    assert await read_body(request) == b'{"ID":"abc"}\n'


async def test_a_body_still_arriving_is_waited_for() -> None:
    loop = asyncio.get_running_loop()
    request, reader = _request(loop, [b'{"ID":'], eof=False)
    reading = asyncio.ensure_future(read_body(request))
    await asyncio.sleep(0.01)
    assert not reading.done()
    reader.feed_data(b'"abc"}\n')
    reader.feed_eof()
    assert await asyncio.wait_for(reading, 5) == b'{"ID":"abc"}\n'


@pytest.mark.parametrize("eof", [True, False], ids=["buffered", "arriving"])
async def test_a_body_over_the_limit_is_413_either_way(eof: bool) -> None:
    loop = asyncio.get_running_loop()
    request, reader = _request(loop, [b"x" * (MAX_BODY + 1)], eof=eof)
    if not eof:
        loop.call_soon(reader.feed_eof)
    with pytest.raises(web.HTTPRequestEntityTooLarge):
        await read_body(request)


async def test_an_empty_body_is_empty() -> None:
    request, _ = _request(asyncio.get_running_loop(), [], eof=True)
    assert await read_body(request) == b""
