"""Run the snapshotter until SIGTERM/SIGINT: root, core, records, socket.

Layout of a root::

    ROOT/snapshotter.db      the records (plugin.snapshotter.metadata), WAL beside it
    ROOT/<backend>/          the storage core's Home (layers named by record id)

The backend is recorded at the first start and a later start with another one
is refused (the records name layers of that backend).  Before the socket
opens, start-up puts back a recorded layer whose rename a power cut lost
(``promote_staged``, before the core deletes its staging dir), marks the
records whose layer is gone all the same as broken (``Snapshotter``), and
deletes layers no record claims (``Snapshotter.cleanup``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from contextlib import AsyncExitStack
from dataclasses import dataclass

from grpclib.server import Server

from plugin.driver import registry
from plugin.errors import InvalidArgument
from plugin.fspool import SHUTDOWN_DRAIN, FsPool
from plugin.idtools import IDMappings
from plugin.server.activation import notify
from plugin.server.serve import bind_unix
from plugin.snapshotter import BACKENDS
from plugin.snapshotter.metadata import MetaStore
from plugin.snapshotter.service import SnapshotsService
from plugin.snapshotter.snapshotter import Snapshotter
from plugin.state.layers import promote_staged
from plugin.state.ownership import SNAPSHOTTER_DB, refuse_graphdriver_state

log = logging.getLogger("strata.snapshotter")


@dataclass(frozen=True)
class SnapshotterConfig:
    socket_path: str
    root: str
    backend: str
    socket_mode: int = 0o600
    socket_group: int | None = None
    options: tuple[str, ...] = ()
    workers: int = 16


def open_snapshotter(config: SnapshotterConfig) -> Snapshotter:
    """Build the core and the records for ``config.root`` (blocking)."""
    if config.backend not in BACKENDS:
        raise InvalidArgument(f"backend {config.backend!r} cannot serve containerd; "
                              f"choose one of {', '.join(BACKENDS)}")
    refuse_graphdriver_state(config.root)
    os.makedirs(config.root, mode=0o700, exist_ok=True)
    meta = MetaStore(os.path.join(config.root, SNAPSHOTTER_DB))
    try:
        recorded = meta.setting("backend", config.backend)
        if recorded != config.backend:
            raise InvalidArgument(f"snapshotter root {config.root} holds {recorded} layers; "
                                  f"it cannot be served with backend {config.backend}")
        home = os.path.join(config.root, config.backend)
        promotion = promote_staged(home, recorded_layers(meta))
        # A staged copy's id stays unused while it may come back (its delete
        # below is not forced to disk), so no id ever has two staged copies.
        meta.skip_past(promotion.highest_staged)
        driver = registry.get_driver(config.backend, home, list(config.options), IDMappings())
    except BaseException:
        meta.close()
        raise
    snapshotter = Snapshotter(driver, meta, promotion.missing)
    snapshotter.cleanup()
    return snapshotter


def recorded_layers(meta: MetaStore) -> dict[str, str]:
    """Each recorded layer id -> its parent's layer id ("" for none), as the
    core recorded it at Create."""
    return {r.layer: meta.get(r.info.parent).layer if r.info.parent else ""
            for r in meta.walk()}


async def serve_snapshotter(config: SnapshotterConfig) -> None:
    loop = asyncio.get_running_loop()
    async with AsyncExitStack() as stack:
        executor = FsPool(config.workers, "snap")
        stack.callback(executor.shutdown, wait=False, cancel_futures=True)
        snapshotter = await executor.start(open_snapshotter, config)
        stack.callback(snapshotter.close)
        # At the end, before the records close: no new calls, then running ones may
        # finish (bounded).
        stack.push_async_callback(asyncio.to_thread, executor.join, SHUTDOWN_DRAIN)
        stack.callback(executor.shutdown, wait=False, cancel_futures=True)
        server = Server([SnapshotsService(snapshotter, executor)])
        sock = bind_unix(config.socket_path, config.socket_mode, config.socket_group)
        stack.callback(_unlink, config.socket_path)
        await server.start(sock=sock)
        stack.push_async_callback(_stop, server)
        log.info("serving containerd snapshots on %s (backend %s, root %s)",
                 config.socket_path, config.backend, config.root)
        notify("READY=1")
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        notify("STOPPING=1")
        log.info("shutting down")


async def _stop(server: Server) -> None:
    server.close()
    await server.wait_closed()


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
