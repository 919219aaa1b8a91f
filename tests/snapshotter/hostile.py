"""Tools of the snapshotter's hostile ring (``test_hostile.py``): a client
that sends any bytes as a request, raw HTTP/2 on the socket, the tally, and
the watch on everything outside the root.

Every call goes through :meth:`Ring.expect`: it must end within
:data:`BOUND` seconds with a gRPC status (OK or an error code), the status
must be one the case allows, and each outcome is counted for the summary
printed at the end of the run (``conftest.pytest_terminal_summary``).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import struct
from collections import Counter
from collections.abc import Awaitable, Collection
from typing import Any

import pytest
from google.protobuf import empty_pb2
from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.encoding.base import CodecBase
from grpclib.exceptions import GRPCError

from plugin.snapshotter.proto import snapshots_pb2 as pb
from tests.snapshotter.harness import Client, SnapshotterProcess

#: Seconds a hostile call may take before it counts as a stall.
BOUND = 20.0
#: Seconds a Stat may take while the hostile calls run (one request never stalls others).
STAT_BOUND = 5.0

TALLY_KEY = pytest.StashKey[Counter[str]]()

SERVICE = "/containerd.services.snapshots.v1.Snapshots/"
#: Method -> (request type, reply type, server streaming).
METHODS: dict[str, tuple[type[Any], type[Any], bool]] = {
    "Prepare": (pb.PrepareSnapshotRequest, pb.PrepareSnapshotResponse, False),
    "View": (pb.ViewSnapshotRequest, pb.ViewSnapshotResponse, False),
    "Mounts": (pb.MountsRequest, pb.MountsResponse, False),
    "Commit": (pb.CommitSnapshotRequest, empty_pb2.Empty, False),
    "Remove": (pb.RemoveSnapshotRequest, empty_pb2.Empty, False),
    "Stat": (pb.StatSnapshotRequest, pb.StatSnapshotResponse, False),
    "Update": (pb.UpdateSnapshotRequest, pb.UpdateSnapshotResponse, False),
    "List": (pb.ListSnapshotsRequest, pb.ListSnapshotsResponse, True),
    "Usage": (pb.UsageRequest, pb.UsageResponse, False),
    "Cleanup": (pb.CleanupRequest, empty_pb2.Empty, False),
}


class RawCodec(CodecBase):
    """protobuf, except that ``bytes`` go out as they are (any request body)."""

    __content_subtype__ = "proto"

    def encode(self, message: Any, message_type: Any) -> bytes:
        return message if isinstance(message, bytes) else bytes(message.SerializeToString())

    def decode(self, data: bytes, message_type: Any) -> Any:
        return message_type.FromString(data)


async def raw_call(channel: Channel, method: str, body: bytes) -> list[Any]:
    """``method`` with ``body`` as the request message; the replies."""
    request_type, reply_type, streaming = METHODS[method]
    cardinality = Cardinality.UNARY_STREAM if streaming else Cardinality.UNARY_UNARY
    async with channel.request(SERVICE + method, cardinality, request_type,
                               reply_type) as stream:
        await stream.send_message(body, end=True)
        return [reply async for reply in stream]


def proto_field(number: int, value: bytes) -> bytes:
    """One length-delimited protobuf field (wire type 2), any bytes inside."""
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def grpc_frame(message: bytes, claimed: int | None = None) -> bytes:
    """gRPC's 5-byte prefix (uncompressed, length) and the message."""
    return struct.pack(">?I", False, len(message) if claimed is None else claimed) + message


# ---- the tally -----------------------------------------------------------------------

ROWS = [
    ("sent", "hostile snapshotter requests sent"),
    ("ok", "  answered OK (opaque keys and other legal input)"),
    ("refused", "  refused with a gRPC error status"),
    ("wrong", "  WRONG (unexpected status, dropped connection, stalled)"),
    ("raw", "raw-socket abuses (garbage, broken HTTP/2, vanishing clients)"),
    ("alive", "  server answered a Stat after each, within its bound"),
    ("concurrent", "concurrent Prepares of one key"),
    ("concurrent.ok", "  of which succeeded (must be one per round)"),
    ("outside", "WRITES OR MOUNTS OUTSIDE THE ROOT"),
]


def summary_lines(counts: Counter[str]) -> list[str]:
    lines = [f"{label:<68} {counts.get(key, 0):>6}" for key, label in ROWS]
    codes = sorted(k for k in counts if k.startswith("status."))
    lines += [f"{'    ' + k.removeprefix('status.'):<68} {counts[k]:>6}" for k in codes]
    return lines


# ---- the ring ------------------------------------------------------------------------


class Ring:
    """One test's view of the server: a typed client, a raw one, the tally."""

    def __init__(self, server: SnapshotterProcess, tally: Counter[str]) -> None:
        self.server = server
        self.tally = tally
        self.client = Client(server.socket_path)
        self.raw = Channel(path=server.socket_path, codec=RawCodec())
        self.ns = secrets.token_hex(4)

    def key(self, name: str) -> str:
        return f"{self.ns}/{name}"

    def close(self) -> None:
        self.client.close()
        self.raw.close()

    async def expect(self, what: str, call: Awaitable[Any],
                     allowed: Collection[Status]) -> Status:
        """Await ``call``: it must end in time with a status in ``allowed``."""
        self.tally["sent"] += 1
        try:
            await asyncio.wait_for(call, BOUND)
            status = Status.OK
        except GRPCError as e:
            status = e.status
            assert e.message, f"{what}: {status.name} without a message"
        except TimeoutError:
            self.tally["wrong"] += 1
            raise AssertionError(f"{what}: no answer within {BOUND}s") from None
        except (ConnectionError, OSError, asyncio.IncompleteReadError) as e:
            self.tally["wrong"] += 1
            raise AssertionError(f"{what}: connection dropped: {e!r}") from None
        self.tally["ok" if status == Status.OK else "refused"] += 1
        self.tally[f"status.{status.name}"] += 1
        if status not in allowed:
            self.tally["wrong"] += 1
            raise AssertionError(f"{what}: {status.name}, expected one of "
                                 f"{sorted(s.name for s in allowed)}")
        return status

    async def alive(self) -> None:
        """A Stat answers within :data:`STAT_BOUND` (NOT_FOUND is an answer)."""
        try:
            await asyncio.wait_for(self.client.stat(self.key("alive-probe")), STAT_BOUND)
        except GRPCError as e:
            assert e.status == Status.NOT_FOUND, e
        self.tally["alive"] += 1


def mountpoints() -> set[str]:
    """Every mount of this namespace as its mountinfo line."""
    with open("/proc/self/mountinfo") as f:
        return {line.split(maxsplit=1)[1] for line in f}


def outside_root(server: SnapshotterProcess, before: set[str], token: str) -> list[str]:
    """Mounts made outside the root since ``before`` that name the root or
    ``token`` (every hostile key carries it; the machine is shared, so other
    mounts come and go), and any file named with ``token`` in /tmp, / or
    beside the root."""
    root = os.path.realpath(server.root)
    found = [line for line in mountpoints() - before
             if not line.split()[3].startswith(root + "/") and (root in line or token in line)]
    for top in ("/", "/tmp", os.path.dirname(root), os.path.dirname(os.path.dirname(root))):
        found += [os.path.join(top, n) for n in os.listdir(top) if token in n]
    for dirpath, dirnames, filenames in os.walk(root):
        found += [os.path.join(dirpath, n) for n in dirnames + filenames if token in n]
    return found


def raw_exchange(path: str, data: bytes, linger: float = 2.0) -> bytes:
    """Write ``data`` on a fresh connection to the socket; what the server
    sends back until it closes or ``linger`` seconds pass."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(linger)
        s.connect(path)
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return b""
        got = bytearray()
        try:
            while chunk := s.recv(65536):
                got += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return bytes(got)
