"""The gRPC face of the snapshotter: containerd's ``Snapshots`` service on grpclib.

Each RPC decodes its request, runs the matching :class:`Snapshotter` call in
the worker pool (it blocks on sqlite and the filesystem; the event loop never
does), and encodes the answer.  Typed errors become gRPC statuses here and
only here, as containerd's ``errdefs.ToGRPC`` maps them, so that
``errdefs.FromGRPC`` on the containerd side gives back the same error kind.
One log line per call: the op, the key, the time taken and the outcome.
Model: containerd ``contrib/snapshotservice/service.go``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TypeVar

from google.protobuf import empty_pb2, timestamp_pb2
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from plugin import errors
from plugin.driver.base import MountSpec
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
}


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


class SnapshotsService(SnapshotsBase):
    def __init__(self, snapshotter: Snapshotter, executor: Executor) -> None:
        self.snapshotter = snapshotter
        self.executor = executor

    async def _run(self, op: str, key: str, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` in the pool; a typed error becomes its gRPC status."""
        start = time.perf_counter()
        outcome = "ok"
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self.executor, functools.partial(fn, *args))
        except errors.StrataError as e:
            status = grpc_status(e)
            outcome = f"{status.name}: {e}"
            raise GRPCError(status, str(e)) from e
        except Exception as e:
            outcome = f"UNKNOWN: {e!r}"
            log.exception("%s %r failed", op, key)
            raise GRPCError(Status.UNKNOWN, f"{op} {key!r}: {e}") from e
        finally:
            log.info("%s %r %.1fms %s", op, key, (time.perf_counter() - start) * 1000, outcome)

    @staticmethod
    async def _request(stream: Stream[Request, Response]) -> Request:
        request = await stream.recv_message()
        assert request is not None  # grpclib answers an absent unary request itself
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
        info = await self._run("Stat", r.key, self.snapshotter.stat, r.key)
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
