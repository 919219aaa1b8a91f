"""The HTTP side: one handler per graphdriver endpoint.

Handlers decode the msgspec request, run the driver call in the worker pool
(never on the event loop: filesystem work blocks) and encode the reply.
Errors are typed exceptions (:mod:`plugin.errors`) turned into
``{"Err": ...}`` with a status code by one function, ``handle``; handlers do not catch
and format.  Diff streams its tar as the response; ApplyDiff consumes the
chunked request body as a stream.  Both may run at once on two connections
(``docker commit`` pipes one into the other), so nothing here serialises
requests.

The handlers run under aiohttp's low-level ``web.Server`` with a dict from
path to handler, not under a ``web.Application``: its router, middleware
chain and request cloning are a large share of a small call's round trip (the
README's RPC table has a bare ``web.Application`` as its baseline), and the
plugin has sixteen fixed paths, all POST.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
from aiohttp import web

from plugin.driver.base import CreateOpts, Driver
from plugin.driver.manager import DriverManager
from plugin.errors import DeadlineExceeded, InvalidArgument, StrataError
from plugin.fspool import FsPool
from plugin.idtools import IDMap
from plugin.printable import printable
from plugin.server import protocol as p
from plugin.server.bridge import BodyReader, fd_ready
from plugin.state.layers import validate_id

if TYPE_CHECKING:  # prometheus_client is imported only when metrics are on
    from plugin.server.metrics import CallMetrics

log = logging.getLogger("strata.server")


@dataclass(frozen=True)
class Context:
    """What every handler may use: the driver, the worker pool, the call deadline."""
    manager: DriverManager
    executor: FsPool
    #: Seconds a backend call may take before the caller gets an Err (0 = none).
    deadline: float
    #: The per-call counters, None when metrics are off.
    metrics: CallMetrics | None = None


#: The request's Context.
CONTEXT = web.RequestKey("context", Context)
#: The layer id (or Home) a request is about, for the one log line per call.
LAYER_ID = web.RequestKey("layer_id", str)
#: Set when the call handed filesystem work to the pool (see ``handle``'s log level).
POOLED = web.RequestKey("pooled", bool)

#: Diff/ApplyDiff move data in chunks of this size between threads and socket.
CHUNK = 1 << 20
#: The largest JSON body read whole (aiohttp's ``client_max_size`` default, which
#: ``request.read`` enforces).
MAX_BODY = 1 << 20

Req = TypeVar("Req", bound=msgspec.Struct)
Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def encode(body: msgspec.Struct, status: int = 200) -> web.Response:
    return web.Response(body=p.encode_reply(body), status=status,
                        content_type="application/json")


def fail(text: str, status: int) -> web.Response:
    """An ``{"Err": text}`` reply.  dockerd shows it as ``<Name>: <text>`` (every Err
    here has a non-200 status, docs/protocol.md §2.2), so the text does not repeat the call;
    it may name a hostile path, shown escaped (plugin/printable.py)."""
    return encode(p.ErrResponse(Err=printable(text)), status)


def op_name(request: web.BaseRequest) -> str:
    return request.path.lstrip("/")


async def handle(request: web.BaseRequest, handler: Handler | None,
                 metrics: CallMetrics | None = None) -> web.StreamResponse:
    """Run ``handler`` and map every failure once: typed errors keep their status,
    the rest are 500; no handler is a 404 (a known path asked with another
    method than POST, a 405).

    One log line per call: a warning when it failed, info when it did filesystem
    work (went to the pool), debug when it was answered from memory on the loop
    (Exists of a known layer, a Get/Put that only counts, Capabilities).  Those
    are most of dockerd's calls (every ``docker ps -s`` and container start asks
    them) and formatting and writing a line is a real share of such a call; an info log
    still shows every call that changed or read the disk."""
    started = time.monotonic()
    outcome = "ok"
    try:
        if handler is None:
            raise web.HTTPNotFound()
        if request.method != "POST":
            raise web.HTTPMethodNotAllowed(request.method, ["POST"])
        return await handler(request)
    except StrataError as e:
        outcome = f"{type(e).__name__}: {e}"
        return fail(str(e), e.http_status)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        outcome = f"bad request: {e}"
        return fail(f"malformed request body: {e}", 400)
    except web.HTTPException as e:
        outcome = f"http {e.status}"
        return fail(http_error_text(request, e), e.status)
    except Exception as e:
        outcome = f"internal error: {e!r}"
        log.exception("%s %s failed", op_name(request), request.get(LAYER_ID, "-"))
        subject = request.get(LAYER_ID)
        about = f" ({subject})" if subject else ""
        return fail(f"internal error{about}: {type(e).__name__}: {e}", 500)
    finally:
        if metrics is not None:
            metrics.observe(request.path, time.monotonic() - started, outcome != "ok")
        if outcome != "ok":
            level = logging.WARNING
        else:
            level = logging.INFO if request[POOLED] else logging.DEBUG
        if log.isEnabledFor(level):
            log.log(level, "%s %s %.1fms %s", op_name(request), request.get(LAYER_ID, "-"),
                    (time.monotonic() - started) * 1000, outcome)


def http_error_text(request: web.BaseRequest, e: web.HTTPException) -> str:
    """The Err of a refused request (dockerd puts the call's name before it)."""
    if e.status == 404:
        return f"{e.reason}: strata has no such call"
    if e.status == 405:
        return f"{e.reason}: {request.method} (only POST)"
    return e.text or e.reason


async def run(request: web.BaseRequest, fn: Callable[..., Any], *args: Any,
              deadline: bool = True) -> Any:
    """Run blocking driver work in the worker pool, within the call deadline.

    dockerd gives legacy plugins no timeout at all (docs/protocol.md §2.3): a stuck
    mount would hang the daemon.  Past the deadline the caller gets an Err;
    the worker thread cannot be cancelled and finishes (or stays stuck) on its
    own, holding the per-layer lock, so later calls on that layer time out too.
    """
    context = request[CONTEXT]
    request[POOLED] = True
    limit = context.deadline if deadline else 0

    def expired() -> StrataError:
        subject = request.get(LAYER_ID)
        return DeadlineExceeded(
            f"{subject + ': ' if subject else ''}the backend did not answer "
            f"within {limit:g}s (still running; see the plugin log)")

    return await context.executor.start(fn, *args, timeout=limit, expired=expired)


async def read_body(request: web.BaseRequest) -> bytes:
    """The whole request body (a call's JSON; ApplyDiff streams its own)."""
    content = request.content
    if not content.is_eof():
        return await request.read()
    # All of it is buffered already (a small call's body arrives with its headers):
    # take it in one go; ``request.read`` loops on ``readany`` and joins the pieces.
    # Same limit as ``request.read``.
    body = content.read_nowait()
    if len(body) > MAX_BODY:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY, actual_size=len(body))
    return body


async def decode(request: web.BaseRequest, kind: type[Req]) -> Req:
    body = await read_body(request)
    if not body.strip():
        # dockerd's retry of a dropped call resends an empty body (docs/protocol.md §2.4).
        raise InvalidArgument("empty request body (a retry resends a consumed body empty)")
    value = msgspec.json.decode(body, type=kind)
    layer_id = getattr(value, "ID", None)
    if layer_id is not None:
        request[LAYER_ID] = layer_id
        validate_ids(layer_id, getattr(value, "Parent", ""))
    return value


def validate_ids(layer_id: str, parent: str) -> None:
    """Every ID from the wire is checked here, once, before any backend sees it."""
    validate_id(layer_id)
    if parent:
        validate_id(parent, "Parent")


def driver_of(request: web.BaseRequest) -> Driver:
    return manager_of(request).driver


def manager_of(request: web.BaseRequest) -> DriverManager:
    return request[CONTEXT].manager


# ---- handlers ----------------------------------------------------------------


async def activate(request: web.BaseRequest) -> web.Response:
    await read_body(request)
    return encode(p.ActivateResponse(Implements=["GraphDriver"]))


async def init(request: web.BaseRequest) -> web.Response:
    req = await decode(request, p.InitRequest)
    request[LAYER_ID] = req.Home

    def idmaps(rows: list[p.IDMapWire] | None) -> list[IDMap]:
        return [IDMap(r.container_id, r.host_id, r.size) for r in rows or []]

    await run(request, manager_of(request).init, req.Home, req.Opts or [],
              idmaps(req.UIDMaps), idmaps(req.GIDMaps))
    return encode(p.ErrResponse())


async def capabilities(request: web.BaseRequest) -> web.Response:
    caps = driver_of(request).capabilities()
    return encode(p.CapabilitiesResponse(
        Capabilities=p.CapabilitiesBody(ReproducesExactDiffs=caps.reproduces_exact_diffs)))


async def status(request: web.BaseRequest) -> web.Response:
    rows = await run(request, driver_of(request).status)
    return encode(p.StatusResponse(Status=rows))


async def cleanup(request: web.BaseRequest) -> web.Response:
    await run(request, driver_of(request).cleanup)
    return encode(p.ErrResponse())


def _create(read_write: bool) -> Handler:
    async def handler(request: web.BaseRequest) -> web.Response:
        req = await decode(request, p.CreateRequest)
        driver = driver_of(request)
        opts = CreateOpts(mount_label=req.MountLabel, storage_opt=req.StorageOpt or {})
        fn = driver.create_read_write if read_write else driver.create
        await run(request, fn, req.ID, req.Parent, opts)
        return encode(p.ErrResponse())
    return handler


async def remove(request: web.BaseRequest) -> web.Response:
    req = await decode(request, p.IDRequest)
    await run(request, driver_of(request).remove, req.ID)
    return encode(p.ErrResponse())


# Get, Put and Exists are answered on the event loop when the driver can do so
# from memory (a count, a known path); otherwise in the pool.

async def get(request: web.BaseRequest) -> web.Response:
    req = await decode(request, p.GetRequest)
    driver = driver_of(request)
    path = driver.get_nowait(req.ID, req.MountLabel)
    if path is None:
        path = await run(request, driver.get, req.ID, req.MountLabel)
    return encode(p.GetResponse(Dir=path))


async def put(request: web.BaseRequest) -> web.Response:
    req = await decode(request, p.IDRequest)
    driver = driver_of(request)
    if not driver.put_nowait(req.ID):
        await run(request, driver.put, req.ID)
    return encode(p.ErrResponse())


async def exists(request: web.BaseRequest) -> web.Response:
    req = await decode(request, p.IDRequest)
    driver = driver_of(request)
    found = driver.exists_nowait(req.ID)
    if found is None:
        found = await run(request, driver.exists, req.ID)
    return encode(p.ExistsResponse(Exists=found))


async def metadata(request: web.BaseRequest) -> web.Response:
    req = await decode(request, p.IDRequest)
    data = await run(request, driver_of(request).metadata, req.ID)
    return encode(p.MetadataResponse(Metadata=data))


async def changes(request: web.BaseRequest) -> web.Response:
    req = await decode(request, p.ParentRequest)
    found = await run(request, driver_of(request).changes, req.ID, req.Parent)
    return encode(p.ChangesResponse(Changes=[p.ChangeWire(Path=c.path, Kind=int(c.kind))
                                             for c in found]))


async def diff_size(request: web.BaseRequest) -> web.Response:
    req = await decode(request, p.ParentRequest)
    size = await run(request, driver_of(request).diff_size, req.ID, req.Parent)
    return encode(p.SizeResponse(Size=size))


async def diff(request: web.BaseRequest) -> web.StreamResponse:
    """Stream the layer tar.  Before the first byte an error is a non-200 reply
    (a 200 body would be read as tar); after it, only aborting the connection
    tells dockerd the stream is bad (docs/protocol.md §2.2)."""
    req = await decode(request, p.ParentRequest)
    stream = await run(request, driver_of(request).diff, req.ID, req.Parent)
    whole = stream.whole()
    if whole is not None:  # a small layer, made in memory: no pipe to follow
        stream.close()
        if (metrics := request[CONTEXT].metrics) is not None:
            metrics.diff_bytes += len(whole)
        return web.Response(body=whole, headers={"Content-Type": "application/x-tar"})
    # The export worker's pipe is read here, on the loop, as it fills (a thread
    # hop per megabyte cost more than the read); the end, where the worker's
    # exit status is taken, goes through the pool.
    fd = stream.pipe_fd()
    if fd is not None:
        os.set_blocking(fd, False)

    async def next_chunk() -> bytes:
        if fd is not None and (data := await _read_pipe(fd)):
            return data
        end: bytes = await run(request, stream.read, CHUNK)
        return end

    sent = 0
    try:
        chunk = await next_chunk()
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/x-tar"})
        await response.prepare(request)
        try:
            while chunk:
                # Read the next chunk while this one goes out, so the worker refills
                # the pipe instead of waiting on the socket.
                following = asyncio.ensure_future(next_chunk())
                try:
                    await response.write(chunk)
                    sent += len(chunk)
                finally:
                    chunk = await following
            await response.write_eof()
        except (StrataError, OSError) as e:
            # Also how a consumer that stops reading looks (dockerd drops the
            # Diff of a build step it refuses): not necessarily strata's fault.
            log.warning("Diff %s: stream ended early, aborting the connection: %s", req.ID, e)
            if request.transport is not None:
                request.transport.abort()
        return response
    finally:
        if (metrics := request[CONTEXT].metrics) is not None:
            metrics.diff_bytes += sent
        await run(request, stream.close)


async def _read_pipe(fd: int) -> bytes:
    """Up to CHUNK bytes of the non-blocking pipe ``fd`` once there are some; b"" at its end."""
    while True:
        try:
            return os.read(fd, CHUNK)
        except BlockingIOError:
            await fd_ready(fd, write=False)


async def apply_diff(request: web.BaseRequest) -> web.Response:
    layer_id = request.query.get("id", "")
    parent = request.query.get("parent", "")
    request[LAYER_ID] = layer_id
    try:
        validate_ids(layer_id, parent)
    except InvalidArgument:
        while await request.content.read(CHUNK):
            pass
        raise
    reader = BodyReader(request.content, asyncio.get_running_loop())
    try:
        # No deadline: the time is the sender's (a commit streams a Diff in).
        size = await run(request, driver_of(request).apply_diff, layer_id, parent, reader,
                         deadline=False)
    finally:
        # dockerd hashes every byte it sends; leave nothing unread (docs/protocol.md §6.1).
        while await request.content.read(CHUNK):
            pass
        if (metrics := request[CONTEXT].metrics) is not None:
            metrics.apply_bytes += request.content.total_bytes
    return encode(p.SizeResponse(Size=size))


ROUTES: dict[str, Handler] = {
    "/Plugin.Activate": activate,
    "/GraphDriver.Init": init,
    "/GraphDriver.Capabilities": capabilities,
    "/GraphDriver.Status": status,
    "/GraphDriver.Cleanup": cleanup,
    "/GraphDriver.Create": _create(read_write=False),
    "/GraphDriver.CreateReadWrite": _create(read_write=True),
    "/GraphDriver.Remove": remove,
    "/GraphDriver.Get": get,
    "/GraphDriver.Put": put,
    "/GraphDriver.Exists": exists,
    "/GraphDriver.GetMetadata": metadata,
    "/GraphDriver.Changes": changes,
    "/GraphDriver.DiffSize": diff_size,
    "/GraphDriver.Diff": diff,
    "/GraphDriver.ApplyDiff": apply_diff,
}


class PluginHandler:
    """The request handler for ``web.Server``; ``close`` ends its worker pool."""

    def __init__(self, manager: DriverManager, workers: int = 32,
                 deadline: float = 600.0, metrics: CallMetrics | None = None) -> None:
        # Diff and ApplyDiff each hold a worker for as long as they stream, so
        # the pool is sized for several concurrent commits, not for the 2 cores.
        pool = FsPool(workers, "strata-fs")
        self.context = Context(manager, pool, deadline, metrics)

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        request[CONTEXT] = self.context
        request[POOLED] = False  # (a missing key costs a KeyError in the lookup)
        return await handle(request, ROUTES.get(request.path), self.context.metrics)

    def close(self) -> None:
        self.context.executor.shutdown(wait=False, cancel_futures=True)

    async def drain(self, timeout: float) -> None:
        """After ``close``: let running filesystem calls finish, at most ``timeout`` s."""
        await asyncio.to_thread(self.context.executor.join, timeout)


def build_server(handler: PluginHandler) -> web.Server:
    return web.Server(handler, access_log=None)
