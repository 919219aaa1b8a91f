"""A blocking file-like view of an aiohttp request body, for worker threads.

ApplyDiff's tar is read by a worker thread (the archive layer is synchronous)
while the event loop keeps receiving it: each ``read`` asks the loop for the
next chunk and waits.  Nothing is buffered beyond one chunk, so a 1 GiB layer
never sits in memory.
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
        future = asyncio.run_coroutine_threadsafe(self._content.read(want), self._loop)
        data = future.result()
        before, self._seen = self._seen, self._seen + len(data)
        if before < _MIDSTREAM <= self._seen:
            fault_point("apply.midstream")
        return data

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)
