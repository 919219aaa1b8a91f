"""Run the plugin server until SIGTERM/SIGINT: sockets, spec file, readiness."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from plugin.driver.manager import DriverManager
from plugin.fspool import SHUTDOWN_DRAIN
from plugin.server.activation import listen_fds, notify
from plugin.server.app import ROUTES, PluginHandler, build_server

if TYPE_CHECKING:
    from plugin.server.metrics import CallMetrics

log = logging.getLogger("strata.server")


@dataclass(frozen=True)
class ServeConfig:
    name: str
    socket_path: str
    socket_mode: int
    socket_group: int | None
    backend: str
    state_dir: str
    spec_dir: str | None
    options: tuple[str, ...] = ()
    deadline: float = 600.0
    #: backend -> why it is refused at Init (a managed plugin refuses fuse-overlayfs)
    refused_backends: Mapping[str, str] = field(default_factory=dict)
    #: Serve Prometheus metrics on this unix socket / HOST:PORT (off when None).
    metrics_socket: str | None = None
    metrics_address: str | None = None


def bind_unix(path: str, mode: int, group: int | None) -> socket.socket:
    """Bind ``path`` with ``mode`` from the first instant (no window at 0755)."""
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    if os.path.lexists(path):
        if socket_answers(path):
            raise SystemExit(f"strata: {path} is already served by another process")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~mode)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    if group is not None:
        os.chown(path, -1, group)
    sock.listen(128)
    return sock


def socket_answers(path: str) -> bool:
    """Whether something accepts connections on the unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


def write_spec(spec_dir: str, name: str, socket_path: str) -> str:
    os.makedirs(spec_dir, mode=0o755, exist_ok=True)
    spec = os.path.join(spec_dir, f"{name}.spec")
    tmp = spec + f".tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(f"unix://{socket_path}\n")
    os.replace(tmp, spec)
    return spec


async def start_metrics(config: ServeConfig, handler: PluginHandler) -> web.AppRunner | None:
    """The metrics endpoint on its own socket(s), or None when none is configured."""
    context = handler.context
    if context.metrics is None:
        return None
    from plugin.server.metrics import MetricsEndpoint

    endpoint = MetricsEndpoint(context.metrics, context.manager, config.name, context.executor)
    runner = web.AppRunner(endpoint.application(), handle_signals=False, access_log=None)
    await runner.setup()
    try:
        if config.metrics_socket:
            sock = bind_unix(config.metrics_socket, config.socket_mode, config.socket_group)
            await web.SockSite(runner, sock).start()
            log.info("metrics on unix:%s", config.metrics_socket)
        if config.metrics_address:
            host, _, port = config.metrics_address.rpartition(":")
            await web.TCPSite(runner, host.strip("[]"), int(port)).start()
            log.info("metrics on http://%s/metrics", config.metrics_address)
    except OSError as e:
        await runner.cleanup()
        # EAFNOSUPPORT here is the unit's RestrictAddressFamilies (strata install
        # allows inet only when a metrics address is configured at install time).
        raise SystemExit(f"strata: cannot serve metrics on "
                         f"{config.metrics_socket or config.metrics_address}: {e}") from None
    return runner


def call_metrics(config: ServeConfig) -> CallMetrics | None:
    if not (config.metrics_socket or config.metrics_address):
        return None
    from plugin.server.metrics import CallMetrics

    return CallMetrics(ROUTES)


async def serve(config: ServeConfig) -> None:
    manager = DriverManager(config.state_dir, config.backend, list(config.options),
                            refused_backends=config.refused_backends)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, manager.load_persisted)
    handler = PluginHandler(manager, deadline=config.deadline, metrics=call_metrics(config))
    runner = web.ServerRunner(build_server(handler), handle_signals=False)
    await runner.setup()
    metrics_runner = await start_metrics(config, handler)
    inherited = listen_fds()
    owned_socket = None
    if inherited:
        for sock in inherited:
            await web.SockSite(runner, sock).start()
        log.info("serving on %d socket(s) passed by the service manager", len(inherited))
    else:
        sock = bind_unix(config.socket_path, config.socket_mode, config.socket_group)
        owned_socket = config.socket_path
        await web.SockSite(runner, sock).start()
        log.info("serving %s on %s (backend %s)", config.name, config.socket_path, config.backend)
    spec = write_spec(config.spec_dir, config.name, config.socket_path) if config.spec_dir else None
    # What start-up built (modules, the app, the driver) lives as long as the
    # process: keep the cyclic collector from walking it again on every full
    # collection, which calls' garbage triggers now and then.
    gc.collect()
    gc.freeze()
    notify("READY=1")
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        notify("STOPPING=1")
        log.info("shutting down")
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        await runner.cleanup()
        handler.close()
        await handler.drain(SHUTDOWN_DRAIN)
        manager.close()
        for path in (spec, owned_socket, config.metrics_socket):
            if path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
