"""A blocking file-like view of an aiohttp request body, for worker threads.

ApplyDiff's tar is read by a worker thread (the archive layer is synchronous)
while the event loop keeps receiving it: each ``read`` asks the loop for the
next chunk and waits.  Nothing is buffered beyond one chunk, so a 1 GiB layer
never sits in memory.  A chunk is gathered on the loop until it holds what was
asked for (1 MiB from the archive layer): the socket delivers 64-200 KiB at a
time, and each thread hop costs ~0.1 ms here — a 1 GiB layer in socket-sized
hops lost a second to them.
"""

from __future__ import annotations

import asyncio
import io

from aiohttp import StreamReader

from plugin.faults import fault_point

#: After this many bytes the "apply.midstream" fault point fires (crash tests).
_MIDSTREAM = 256 << 10


class BodyReader(io.RawIOBase):
    def __init__(self, content: StreamReader, loop: asyncio.AbstractEventLoop) -> None:
        self._content = content
        self._loop = loop
        self._seen = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        want = size if size and size > 0 else 1 << 20
        future = asyncio.run_coroutine_threadsafe(self._gather(want), self._loop)
        data = future.result()
        before, self._seen = self._seen, self._seen + len(data)
        if before < _MIDSTREAM <= self._seen:
            fault_point("apply.midstream")
        return data

    async def _gather(self, want: int) -> bytes:
        """Up to ``want`` bytes: less only at the end of the body."""
        first = await self._content.read(want)
        if len(first) >= want or not first:
            return first
        parts, got = [first], len(first)
        while got < want:
            chunk = await self._content.read(want - got)
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)
