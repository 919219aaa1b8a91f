"""Launch ``strata snapshotter`` and talk to it as containerd's proxy client does.

:class:`SnapshotterProcess` runs the real command in a child process (the CLI,
the socket, the start-up cleanup are part of what is tested) and stops it by
its pid.  :class:`Client` is a thin grpclib client with containerd's call
shapes; a gRPC status comes back as ``GRPCError``.  ``mount_all`` mounts the
returned specs as containerd does (mount(8), lowerdir compaction past a page).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

from grpclib.client import Channel

from plugin.driver.base import MountSpec
from plugin.driver.mountapi import unmount
from plugin.server.serve import socket_answers
from plugin.snapshotter.proto import mount_pb2, snapshots_grpc
from plugin.snapshotter.proto import snapshots_pb2 as pb
from tests.protocol.test_mount_specs import mount_by_mount8

START_TIMEOUT = 60.0


class SnapshotterProcess:
    def __init__(self, backend: str, root: str, socket_path: str) -> None:
        self.backend = backend
        self.root = root
        self.socket_path = socket_path
        self.log_path = os.path.join(os.path.dirname(socket_path), f"{backend}.log")
        self.process: subprocess.Popen[bytes] | None = None
        #: Added to the environment of the next start (e.g. ``STRATA_FAULTS``).
        self.extra_env: dict[str, str] = {}

    def start(self) -> None:
        """Start and wait until the socket answers; RuntimeError with the log if
        the command exits first (a backend this host cannot run says why)."""
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "plugin", "snapshotter", "--socket", self.socket_path,
                 "--root", self.root, "--backend", self.backend, "--log-level", "info"],
                stdout=log, stderr=log, env={**os.environ, **self.extra_env},
                cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"strata snapshotter exited {self.process.returncode}: "
                                   f"{self.log()[-2000:]}")
            if socket_answers(self.socket_path):
                return
            time.sleep(0.05)
        raise RuntimeError(f"strata snapshotter did not answer within {START_TIMEOUT}s")

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None

    def crashed(self, timeout: float = 10.0) -> bool:
        """Whether the process died of SIGKILL (a fault point's ``kill``) within
        ``timeout``; it is reaped either way if it died."""
        if self.process is None:
            return False
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        self.process = None
        return code == -signal.SIGKILL

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()


def specs(mounts: Sequence[mount_pb2.Mount]) -> list[MountSpec]:
    return [MountSpec(m.type, m.source, tuple(m.options)) for m in mounts]


def mount_all(mounts: Sequence[mount_pb2.Mount], target: str) -> None:
    for spec in specs(mounts):
        mount_by_mount8(spec, target)


def unmount_all(target: str) -> None:
    while unmount(target):
        pass


class Client:
    """containerd's proxy snapshotter calls, one per method."""

    def __init__(self, socket_path: str) -> None:
        self.channel = Channel(path=socket_path)
        self.stub = snapshots_grpc.SnapshotsStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    async def prepare(self, key: str, parent: str = "",
                      labels: Mapping[str, str] | None = None) -> list[mount_pb2.Mount]:
        reply = await self.stub.Prepare(pb.PrepareSnapshotRequest(
            snapshotter="strata", key=key, parent=parent, labels=labels or {}))
        return list(reply.mounts)

    async def view(self, key: str, parent: str = "",
                   labels: Mapping[str, str] | None = None) -> list[mount_pb2.Mount]:
        reply = await self.stub.View(pb.ViewSnapshotRequest(
            snapshotter="strata", key=key, parent=parent, labels=labels or {}))
        return list(reply.mounts)

    async def mounts(self, key: str) -> list[mount_pb2.Mount]:
        return list((await self.stub.Mounts(pb.MountsRequest(key=key))).mounts)

    async def commit(self, name: str, key: str,
                     labels: Mapping[str, str] | None = None) -> None:
        await self.stub.Commit(pb.CommitSnapshotRequest(name=name, key=key, labels=labels or {}))

    async def remove(self, key: str) -> None:
        await self.stub.Remove(pb.RemoveSnapshotRequest(key=key))

    async def stat(self, key: str) -> pb.Info:
        return (await self.stub.Stat(pb.StatSnapshotRequest(key=key))).info

    async def update(self, info: pb.Info, *paths: str) -> pb.Info:
        request = pb.UpdateSnapshotRequest(info=info)
        request.update_mask.paths.extend(paths)
        return (await self.stub.Update(request)).info

    async def usage(self, key: str) -> tuple[int, int]:
        reply = await self.stub.Usage(pb.UsageRequest(key=key))
        return reply.size, reply.inodes

    async def list_batches(self, *filters: str) -> list[list[pb.Info]]:
        async with self.stub.List.open() as stream:
            await stream.send_message(pb.ListSnapshotsRequest(filters=list(filters)), end=True)
            return [list(reply.info) async for reply in stream]

    async def walk(self, *filters: str) -> list[pb.Info]:
        return [info for batch in await self.list_batches(*filters) for info in batch]

    async def cleanup(self) -> None:
        await self.stub.Cleanup(pb.CleanupRequest())
