"""The ApplyDiff request body, seen from a worker thread.

ApplyDiff's tar is consumed by the archive layer, which is synchronous and runs
in a worker thread, while the event loop keeps receiving the body.  Nothing is
buffered beyond a batch, so a 1 GiB layer never sits in memory.

Two ways to take the body:

* ``pump(fd)``: the archive worker's stdin pipe.  The event loop itself writes
  the pieces aiohttp parsed (dockerd's 32 KiB HTTP chunks) into the pipe, made
  non-blocking, in batches of ``PUMP_BATCH`` with one ``writev``; a full pipe
  is waited for like a socket.  The thread only waits for the end.  This
  replaced a thread that asked the loop for each megabyte and wrote it: that
  hop cost CPU (wake-ups, GIL hand-overs, a futex per megabyte) on a machine
  where the archive worker is short of CPU.
* ``read(n)``: a blocking file-like read, for anything else (draining).
"""

from __future__ import annotations

import asyncio
import io
import os

from aiohttp import StreamReader

from plugin.faults import fault_point

#: After this many bytes the "apply.midstream" fault point fires (crash tests).
_MIDSTREAM = 256 << 10
_IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024
#: ``pump`` writes to the pipe once this much has arrived (and at the body's end).
PUMP_BATCH = 256 << 10


class BodyReader(io.RawIOBase):
    def __init__(self, content: StreamReader, loop: asyncio.AbstractEventLoop) -> None:
        self._content = content
        self._loop = loop
        self._seen = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (1 MiB when unbounded); fewer only at the end."""
        want = size if size and size > 0 else 1 << 20
        return asyncio.run_coroutine_threadsafe(self._gather(want), self._loop).result()

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def pump(self, fd: int) -> None:
        """Write the rest of the body into the pipe ``fd``; return at the body's end.
        When the pipe's reader goes away, the rest of the body is still read (and
        dropped), so the sender sees it consumed.  Blocks: call from a thread."""
        asyncio.run_coroutine_threadsafe(self._pump(fd), self._loop).result()

    # -- on the event loop -----------------------------------------------------

    def _count(self, n: int) -> None:
        before = self._seen
        self._seen += n
        if before < _MIDSTREAM <= self._seen:
            fault_point("apply.midstream")

    async def _gather(self, want: int) -> bytes:
        """Up to ``want`` bytes of the body; fewer only at its end."""
        parts: list[bytes] = []
        got = 0
        while got < want and (data := await self._content.read(want - got)):
            self._count(len(data))
            parts.append(data)
            got += len(data)
        return b"".join(parts)

    async def _pump(self, fd: int) -> None:
        os.set_blocking(fd, False)
        batch: list[bytes] = []
        queued = 0
        reader_there = True
        # readany: everything aiohttp holds (a few HTTP chunks, joined; its flow
        # control keeps that to ~128 KiB), b"" at the end.  One call per 32 KiB
        # HTTP chunk would be 32,768 rounds of Python on the loop per GiB.
        while data := await self._content.readany():
            self._count(len(data))
            if not reader_there:
                continue
            batch.append(data)
            queued += len(data)
            if queued >= PUMP_BATCH:
                reader_there = await self._write_all(fd, batch)
                batch, queued = [], 0
        if batch and reader_there:
            await self._write_all(fd, batch)

    async def _write_all(self, fd: int, parts: list[bytes]) -> bool:
        """Write ``parts`` to the non-blocking ``fd``; False once its reader is gone."""
        views = [memoryview(p) for p in parts]
        while views:
            try:
                written = os.writev(fd, views[:_IOV_MAX])
            except BlockingIOError:
                await fd_ready(fd, write=True)
                continue
            except BrokenPipeError:
                return False
            while views and written >= len(views[0]):
                written -= len(views[0])
                views.pop(0)
            if written:
                views[0] = views[0][written:]
        return True


async def fd_ready(fd: int, *, write: bool) -> None:
    """Wait on the running loop until the non-blocking ``fd`` can be written (or read)."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    (loop.add_writer if write else loop.add_reader)(fd, wake)
    try:
        await ready
    finally:
        (loop.remove_writer if write else loop.remove_reader)(fd)
