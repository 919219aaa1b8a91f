"""The gRPC face of the snapshotter: containerd's ``Snapshots`` service on grpclib.

Each RPC decodes its request, runs the matching :class:`Snapshotter` call in
the worker pool (it blocks on sqlite and the filesystem; the event loop never
does), and encodes the answer.  Stat, and Mounts of a snapshot whose mounts
were answered before, are answered on the loop from memory instead
(``Snapshotter.stat``, ``mounts_nowait``; tests/snapshotter/test_event_loop.py
runs them under blockbuster): containerd Stats every layer of an image it
unpacks or runs, and the hop to a worker thread and back (two wake-ups) would
cost more than the rest of such a call.  Typed errors become gRPC statuses here and
only here, as containerd's ``errdefs.ToGRPC`` maps them, so that
``errdefs.FromGRPC`` on the containerd side gives back the same error kind.
One log line per call: the op, the key, the time taken and the outcome; at
info for a call that went to the pool or failed, at debug for one answered
from memory (as the graphdriver server logs).
Model: containerd ``contrib/snapshotservice/service.go``.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable
from typing import TypeVar, cast

from google.protobuf import empty_pb2, timestamp_pb2
from google.protobuf.message import DecodeError
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.protocol import Stream as H2Stream
from grpclib.server import Stream

from plugin import errors
from plugin.driver.base import MountSpec
from plugin.fspool import FsPool
from plugin.snapshotter.limits import MAX_MESSAGE
from plugin.snapshotter.metadata import Info
from plugin.snapshotter.proto import mount_pb2, snapshots_pb2
from plugin.snapshotter.proto.snapshots_grpc import SnapshotsBase
from plugin.snapshotter.snapshotter import Snapshotter

log = logging.getLogger("strata.snapshotter.grpc")

T = TypeVar("T")
Request = TypeVar("Request")
Response = TypeVar("Response")

#: containerd's snapshotservice sends List answers in blocks of this many.
LIST_BATCH = 100

#: Typed errors -> what containerd's errdefs.ToGRPC gives for the same kind.
#: Anything else is UNKNOWN, as a plain Go error is.
STATUS: dict[type[errors.StrataError], Status] = {
    errors.NotFound: Status.NOT_FOUND,
    errors.AlreadyExists: Status.ALREADY_EXISTS,
    errors.FailedPrecondition: Status.FAILED_PRECONDITION,
    errors.InvalidArgument: Status.INVALID_ARGUMENT,
    errors.NotSupported: Status.UNIMPLEMENTED,
    errors.DeadlineExceeded: Status.DEADLINE_EXCEEDED,
    errors.Busy: Status.UNAVAILABLE,
    errors.ResourceExhausted: Status.RESOURCE_EXHAUSTED,
}


#: Longest error text sent (as the grpc-message trailer) or logged: errors
#: quote keys, and a hostile request's 1 MiB key or Update path must not
#: become a header the client refuses or a log line the size of the request.
MAX_MESSAGE_TEXT = 4096


def brief(text: str, limit: int = MAX_MESSAGE_TEXT) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def grpc_status(error: errors.StrataError) -> Status:
    for kind in type(error).__mro__:
        if kind in STATUS:
            return STATUS[kind]
    return Status.UNKNOWN


def to_mounts(specs: list[MountSpec]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=s.type, source=s.source, options=list(s.options))
            for s in specs]


def _timestamp(ns: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def to_info(info: Info) -> snapshots_pb2.Info:
    return snapshots_pb2.Info(name=info.name, parent=info.parent, kind=info.kind.name,
                              created_at=_timestamp(info.created),
                              updated_at=_timestamp(info.updated), labels=info.labels)


async def receive_bounded(stream: Stream[Request, Response], limit: int) -> Request | None:
    """``Stream.recv_message`` with grpc-go's receive limit and answers.

    grpclib 0.4 reads a message of whatever length its 5-byte prefix claims
    into memory, and a body protobuf cannot decode becomes UNKNOWN "Internal
    Server Error".  Here the claimed length is refused past ``limit`` before
    any of the body is read (RESOURCE_EXHAUSTED, grpc-go's text), and a body
    that does not decode (bad wire format, strings that are not UTF-8, which
    proto3 forbids) is INVALID_ARGUMENT naming the cause (grpc-go says
    INTERNAL: the fault is the client's).  It reads grpclib's HTTP/2 stream
    and codec directly (``_stream``, ``_recv_type``: pyproject pins grpclib
    below 0.5; tests/snapshotter/test_hostile.py fails if they move), so
    grpclib's ``RecvMessage`` event is not sent (strata listens to none)."""
    raw = stream._stream
    prefix = await _recv_exactly(raw, 5)
    if not prefix:
        return None
    compressed, length = struct.unpack(">?I", prefix)
    if compressed:
        raise GRPCError(Status.UNIMPLEMENTED, "compressed requests are not accepted")
    if length > limit:
        raise GRPCError(Status.RESOURCE_EXHAUSTED,
                        f"grpc: received message larger than max ({length} vs. {limit})")
    body = await _recv_exactly(raw, length)
    try:
        return cast(Request, stream._recv_type.FromString(body))  # type: ignore[attr-defined]
    except DecodeError as e:
        raise GRPCError(Status.INVALID_ARGUMENT, f"cannot decode the request: {e}") from None


async def _recv_exactly(raw: H2Stream, size: int) -> bytes:
    """``size`` bytes, or b"" at the end of the stream; a stream that ends
    inside them is INVALID_ARGUMENT (grpclib's buffer asserts)."""
    try:
        return await raw.recv_data(size)
    except AssertionError:
        raise GRPCError(Status.INVALID_ARGUMENT, "truncated gRPC message") from None


def _logged(level: int, op: str, key: str, start: float, outcome: str) -> None:
    if log.isEnabledFor(level):
        log.log(level, "%s %s %.1fms %s", op, brief(repr(key)),
                (time.perf_counter() - start) * 1000, outcome)


def _failed(op: str, key: str, start: float, error: Exception) -> GRPCError:
    """The gRPC error a call's failure becomes (logged): a typed error its
    status, anything else UNKNOWN with its traceback in the log."""
    if isinstance(error, errors.StrataError):
        status = grpc_status(error)
        _logged(logging.INFO, op, key, start, f"{status.name}: {brief(str(error))}")
        return GRPCError(status, brief(str(error)))
    shown = brief(repr(key))
    log.error("%s %s failed", op, shown, exc_info=error)
    _logged(logging.INFO, op, key, start, f"UNKNOWN: {brief(repr(error))}")
    return GRPCError(Status.UNKNOWN, brief(f"{op} {shown}: {error}"))


class SnapshotsService(SnapshotsBase):
    def __init__(self, snapshotter: Snapshotter, executor: FsPool) -> None:
        self.snapshotter = snapshotter
        self.executor = executor

    async def _run(self, op: str, key: str, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` in the pool; a typed error becomes its gRPC status."""
        start = time.perf_counter()
        try:
            result: T = await self.executor.start(fn, *args)
        except Exception as e:
            raise _failed(op, key, start, e) from e
        _logged(logging.INFO, op, key, start, "ok")
        return result

    @staticmethod
    def _now(op: str, key: str, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` on the loop (it answers from memory, or None: then the
        caller goes to the pool and logs there); errors as in ``_run``."""
        start = time.perf_counter()
        try:
            result = fn(*args)
        except Exception as e:
            raise _failed(op, key, start, e) from e
        if result is not None:
            _logged(logging.DEBUG, op, key, start, "ok")
        return result

    @staticmethod
    async def _request(stream: Stream[Request, Response]) -> Request:
        request = await receive_bounded(stream, MAX_MESSAGE)
        if request is None:
            raise GRPCError(Status.INVALID_ARGUMENT, "the call carries no request message")
        return request

    async def Prepare(self, stream: Stream[snapshots_pb2.PrepareSnapshotRequest,
                                           snapshots_pb2.PrepareSnapshotResponse]) -> None:
        r = await self._request(stream)
        specs = await self._run("Prepare", r.key, self.snapshotter.prepare, r.key, r.parent,
                                dict(r.labels))
        await stream.send_message(snapshots_pb2.PrepareSnapshotResponse(mounts=to_mounts(specs)))

    async def View(self, stream: Stream[snapshots_pb2.ViewSnapshotRequest,
                                        snapshots_pb2.ViewSnapshotResponse]) -> None:
        r = await self._request(stream)
        specs = await self._run("View", r.key, self.snapshotter.view, r.key, r.parent,
                                dict(r.labels))
        await stream.send_message(snapshots_pb2.ViewSnapshotResponse(mounts=to_mounts(specs)))

    async def Mounts(self, stream: Stream[snapshots_pb2.MountsRequest,
                                          snapshots_pb2.MountsResponse]) -> None:
        r = await self._request(stream)
        specs = self._now("Mounts", r.key, self.snapshotter.mounts_nowait, r.key)
        if specs is None:
            specs = await self._run("Mounts", r.key, self.snapshotter.mounts, r.key)
        await stream.send_message(snapshots_pb2.MountsResponse(mounts=to_mounts(specs)))

    async def Commit(self, stream: Stream[snapshots_pb2.CommitSnapshotRequest,
                                          empty_pb2.Empty]) -> None:
        r = await self._request(stream)
        await self._run("Commit", r.key, self.snapshotter.commit, r.name, r.key, dict(r.labels))
        await stream.send_message(empty_pb2.Empty())

    async def Remove(self, stream: Stream[snapshots_pb2.RemoveSnapshotRequest,
                                          empty_pb2.Empty]) -> None:
        r = await self._request(stream)
        await self._run("Remove", r.key, self.snapshotter.remove, r.key)
        await stream.send_message(empty_pb2.Empty())

    async def Stat(self, stream: Stream[snapshots_pb2.StatSnapshotRequest,
                                        snapshots_pb2.StatSnapshotResponse]) -> None:
        r = await self._request(stream)
        info = self._now("Stat", r.key, self.snapshotter.stat, r.key)
        await stream.send_message(snapshots_pb2.StatSnapshotResponse(info=to_info(info)))

    async def Update(self, stream: Stream[snapshots_pb2.UpdateSnapshotRequest,
                                          snapshots_pb2.UpdateSnapshotResponse]) -> None:
        r = await self._request(stream)
        info = await self._run("Update", r.info.name, self.snapshotter.update, r.info.name,
                               dict(r.info.labels), list(r.update_mask.paths))
        await stream.send_message(snapshots_pb2.UpdateSnapshotResponse(info=to_info(info)))

    async def List(self, stream: Stream[snapshots_pb2.ListSnapshotsRequest,
                                        snapshots_pb2.ListSnapshotsResponse]) -> None:
        r = await self._request(stream)
        infos = await self._run("List", ",".join(r.filters), self.snapshotter.walk,
                                list(r.filters))
        for start in range(0, len(infos), LIST_BATCH):
            block = [to_info(i) for i in infos[start:start + LIST_BATCH]]
            await stream.send_message(snapshots_pb2.ListSnapshotsResponse(info=block))

    async def Usage(self, stream: Stream[snapshots_pb2.UsageRequest,
                                         snapshots_pb2.UsageResponse]) -> None:
        r = await self._request(stream)
        size, inodes = await self._run("Usage", r.key, self.snapshotter.usage, r.key)
        await stream.send_message(snapshots_pb2.UsageResponse(size=size, inodes=inodes))

    async def Cleanup(self, stream: Stream[snapshots_pb2.CleanupRequest,
                                           empty_pb2.Empty]) -> None:
        await self._request(stream)
        await self._run("Cleanup", "", self.snapshotter.cleanup)
        await stream.send_message(empty_pb2.Empty())
