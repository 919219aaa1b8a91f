"""The snapshotter's hostile ring: anyone who can open the socket can send
anything, not only containerd.

Path-like, huge, empty and non-UTF-8 keys and names; parents that would make
cycles; commits onto existing names; labels of megabytes or by the ten
thousand; malformed List filters; garbage protobuf; broken HTTP/2; clients
that vanish mid-call; hundreds of concurrent Prepares of one key.  Each call
must end within ``hostile.BOUND`` with a well-formed gRPC status from the
case's list, nothing may be written or mounted outside the root, a Stat must
answer after each case, and the outcomes are tallied (the summary at the end
of the run; README "Reliability, in figures").  The limits are containerd's
(plugin/snapshotter/limits.py).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from collections.abc import AsyncIterator

import pytest
from grpclib.const import Status
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import ResponseReceived, TrailersReceived

from plugin.snapshotter.limits import MAX_KEY, MAX_LABEL, MAX_MESSAGE
from plugin.snapshotter.proto import snapshots_pb2 as pb
from tests.snapshotter.harness import Client, SnapshotterProcess
from tests.snapshotter.hostile import (
    METHODS,
    TALLY_KEY,
    Ring,
    grpc_frame,
    mountpoints,
    outside_root,
    proto_field,
    raw_call,
    raw_exchange,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the snapshotter needs root")

OK, NOT_FOUND, EXISTS = Status.OK, Status.NOT_FOUND, Status.ALREADY_EXISTS
INVALID, PRECONDITION = Status.INVALID_ARGUMENT, Status.FAILED_PRECONDITION
EXHAUSTED = Status.RESOURCE_EXHAUSTED
MiB = 1 << 20


@pytest.fixture(scope="session")
def tally(pytestconfig: pytest.Config) -> Counter[str]:
    return pytestconfig.stash.setdefault(TALLY_KEY, Counter())


@pytest.fixture
async def ring(server: SnapshotterProcess, tally: Counter[str]) -> AsyncIterator[Ring]:
    r = Ring(server, tally)
    before = mountpoints()
    try:
        yield r
        await r.alive()
        outside = outside_root(server, before, r.ns)
        tally["outside"] += len(outside)
        assert not outside, f"written or mounted outside the root: {outside}"
        assert server.process is not None and server.process.poll() is None, "server died"
    finally:
        await remove_all(r.client, r.ns)
        r.close()


async def remove_all(client: Client, ns: str) -> None:
    """Remove this test's snapshots leaf to root (what GC does)."""
    for _ in range(100):
        mine = await client.walk(f'name~="^{ns}/"')
        if not mine:
            return
        parents = {info.parent for info in mine}
        for info in mine:
            if info.name not in parents:
                await client.remove(info.name)


# ---- keys and names --------------------------------------------------------------------


def path_like(ns: str) -> list[str]:
    """Keys a path-joining server would turn into escapes; all carry ``ns``."""
    return [f"../{ns}", f"../../../../../../tmp/{ns}", f"/tmp/{ns}", f"/{ns}",
            f"a/../../{ns}", f"{ns}/..", f"{ns}/.", f"./{ns}", f"{ns}\x00/etc",
            f"{ns}\n../x", f"{ns} sha256:abc", f"{ns}/é/\u2215/", f"{ns}/" + "../" * 200]


async def test_path_like_keys_stay_opaque(ring: Ring) -> None:
    c = ring.client
    await ring.expect("Prepare base", c.prepare(ring.key("base-a")), {OK})
    await ring.expect("Commit base", c.commit(ring.key("base"), ring.key("base-a")), {OK})
    for key in path_like(ring.ns):
        await ring.expect(f"Prepare {key!r}", c.prepare(key, ring.key("base")), {OK})
        await ring.expect(f"Mounts {key!r}", c.mounts(key), {OK})
        for m in await c.mounts(key):
            assert ring.server.root in m.source or any(
                ring.server.root in o for o in m.options), m
        await ring.expect(f"Commit {key!r}", c.commit(f"{ring.ns}/c/{key}", key), {OK})
        assert (await c.stat(f"{ring.ns}/c/{key}")).name == f"{ring.ns}/c/{key}"
        await ring.expect(f"Remove {key!r}", c.remove(f"{ring.ns}/c/{key}"), {OK})


async def test_empty_keys_and_names(ring: Ring) -> None:
    c = ring.client
    await ring.expect("Prepare ''", c.prepare(""), {INVALID})
    await ring.expect("View ''", c.view(""), {INVALID})
    for what, call in [("Stat", c.stat("")), ("Mounts", c.mounts("")),
                       ("Remove", c.remove("")), ("Usage", c.usage("")),
                       ("Update", c.update(pb.Info(name=""), "labels"))]:
        await ring.expect(f"{what} ''", call, {NOT_FOUND, INVALID})
    await c.prepare(ring.key("a"))
    await ring.expect("Commit name ''", c.commit("", ring.key("a")), {INVALID})
    await ring.expect("Commit key ''", c.commit(ring.key("n"), ""), {NOT_FOUND, INVALID})
    assert (await c.stat(ring.key("a"))).kind == pb.ACTIVE


async def test_huge_keys_names_and_parents(ring: Ring) -> None:
    c = ring.client
    huge = ring.key("h" * MiB)
    await c.prepare(ring.key("a"))
    calls = [("Prepare", c.prepare(huge)), ("View", c.view(huge)),
             ("Prepare parent", c.prepare(ring.key("p"), huge)), ("Stat", c.stat(huge)),
             ("Mounts", c.mounts(huge)), ("Remove", c.remove(huge)), ("Usage", c.usage(huge)),
             ("Commit key", c.commit(ring.key("n"), huge)),
             ("Commit name", c.commit(huge, ring.key("a"))),
             ("Update", c.update(pb.Info(name=huge), "labels"))]
    for what, call in calls:
        await ring.expect(f"{what} 1 MiB", call, {INVALID})
    # The limit is containerd's own (bolt's MaxKeySize): a key at it works.
    longest = ring.key("k" * (MAX_KEY - len(ring.key(""))))
    await ring.expect("Prepare at MAX_KEY", c.prepare(longest), {OK})
    await ring.expect("Prepare MAX_KEY + 1", c.prepare(longest + "k"), {INVALID})
    await ring.expect("List with a MAX_KEY key", c.walk(f'name~="^{ring.ns}/"'), {OK})


async def test_non_utf8_keys_and_names(ring: Ring) -> None:
    """proto3 strings must be UTF-8; the bytes go out raw (a Python protobuf
    will not build them) and the decode refusal is INVALID_ARGUMENT."""
    bad = [b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", ring.ns.encode() + b"/\xfe\xfe", b"a\x80b"]
    # Field numbers from snapshots.proto: (method, field) whose type is string.
    fields = [("Prepare", 2), ("Prepare", 3), ("View", 2), ("Mounts", 2), ("Commit", 2),
              ("Commit", 3), ("Remove", 2), ("Stat", 2), ("Usage", 2), ("List", 2)]
    for method, number in fields:
        for value in bad:
            body = proto_field(1, b"strata") + proto_field(number, value)
            await ring.expect(f"{method} field {number}={value!r}",
                              raw_call(ring.raw, method, body), {INVALID})
    # A label key that is not UTF-8 (map entry: field 4, key 1, value 2).
    entry = proto_field(1, b"\xff\xfe") + proto_field(2, b"v")
    body = proto_field(2, ring.key("l").encode()) + proto_field(4, entry)
    await ring.expect("Prepare label key \\xff", raw_call(ring.raw, "Prepare", body), {INVALID})
    await ring.expect("nothing made", ring.client.stat(ring.key("l")), {NOT_FOUND})


# ---- parents, cycles, commits onto existing names --------------------------------------------


async def test_parent_cycles_and_commits_onto_names(ring: Ring) -> None:
    c, k = ring.client, ring.key
    await ring.expect("Prepare onto itself", c.prepare(k("a"), k("a")), {NOT_FOUND})
    await c.prepare(k("a"))
    await ring.expect("Prepare on an active", c.prepare(k("b"), k("a")), {INVALID})
    await c.commit(k("p"), k("a"))
    await c.prepare(k("b"), k("p"))
    await c.view(k("v"), k("p"))
    await ring.expect("View on a view", c.view(k("w"), k("v")), {INVALID})
    await ring.expect("Commit onto its parent", c.commit(k("p"), k("b")), {EXISTS})
    await ring.expect("Commit onto its own key", c.commit(k("b"), k("b")), {EXISTS})
    await ring.expect("Commit onto a view", c.commit(k("v"), k("b")), {EXISTS})
    await ring.expect("Commit a view", c.commit(k("vv"), k("v")), {PRECONDITION})
    await ring.expect("Commit a committed", c.commit(k("pp"), k("p")), {PRECONDITION})
    await ring.expect("Remove the parent", c.remove(k("p")), {PRECONDITION})
    await c.commit(k("q"), k("b"))
    await ring.expect("Prepare existing key", c.prepare(k("q"), k("p")), {EXISTS})
    await ring.expect("Prepare parent is itself", c.prepare(k("q"), k("q")), {EXISTS})
    kinds = {i.name: (i.kind, i.parent) for i in await c.walk(f'name~="^{ring.ns}/"')}
    assert kinds == {k("p"): (pb.COMMITTED, ""), k("q"): (pb.COMMITTED, k("p")),
                     k("v"): (pb.VIEW, k("p"))}, kinds


# ---- labels ------------------------------------------------------------------------------


async def test_label_sizes(ring: Ring) -> None:
    c, k = ring.client, ring.key
    mega = {"big": "x" * MiB}
    edge = {"e": "x" * (MAX_LABEL - 1)}
    many = {f"containerd.io/snapshot/l{i}": "v" for i in range(10_000)}
    await ring.expect("Prepare 1 MiB label", c.prepare(k("a"), labels=mega), {INVALID})
    await ring.expect("Prepare 1 MiB label key", c.prepare(k("a"), labels={"x" * MiB: "v"}),
                      {INVALID})
    await ring.expect("Prepare 4097-byte label", c.prepare(k("a"), labels={"ee": edge["e"]}),
                      {INVALID})
    await ring.expect("Prepare 10,000 labels", c.prepare(k("a"), labels=many), {EXHAUSTED})
    await ring.expect("Prepare 4096-byte label", c.prepare(k("a"), labels=edge), {OK})
    await ring.expect("Commit 1 MiB label", c.commit(k("c"), k("a"), mega), {INVALID})
    await ring.expect("Commit 10,000 labels", c.commit(k("c"), k("a"), many), {EXHAUSTED})
    assert (await c.stat(k("a"))).kind == pb.ACTIVE  # refused commits changed nothing
    await c.commit(k("c"), k("a"))
    info = pb.Info(name=k("c"), labels=many)
    await ring.expect("Update 10,000 labels", c.update(info, "labels"), {EXHAUSTED})
    paths = [f"labels.{name}" for name in many]
    await ring.expect("Update 10,000 label paths", c.update(info, *paths), {EXHAUSTED})
    await ring.expect("Update 1 MiB label", c.update(pb.Info(name=k("c"), labels=mega),
                                                     "labels.big"), {INVALID})
    for path in ["name", "kind", "parent", "created_at", "", "labels.", "x" * MiB]:
        await ring.expect(f"Update path {path[:20]!r}", c.update(pb.Info(name=k("c")), path),
                          {INVALID, OK})
    assert dict((await c.stat(k("c"))).labels) == {}, "refused updates changed the labels"


# ---- List filters ------------------------------------------------------------------------

BAD_FILTERS = ["name==", '"unterminated', "labels.", "==x", "a\x00b", "name~=", "name=x",
               "name===x", "name!!x", ",", "name,,kind", 'labels."x', "name==x,", "(", "@",
               'name=="\\q"', "kind==active extra", "." * 1000, '"' * 3, "name~=/x", "|"]


async def test_malformed_list_filters(ring: Ring) -> None:
    c = ring.client
    await c.prepare(ring.key("a"))
    for text in BAD_FILTERS:
        await ring.expect(f"List {text[:30]!r}", c.walk(text), {INVALID, OK})
    await ring.expect("List 1 MiB filter", c.walk("name==" + "x" * MiB), {OK})
    await ring.expect("List 10,000 filters", c.walk(*["kind==view"] * 10_000), {OK})
    await ring.expect("List bad regex", c.walk("name~=(["), {OK})


async def test_costly_regex_filter_does_not_stall(ring: Ring) -> None:
    """Python's re backtracks (Go's regexp does not): a pattern that is
    exponential on a long key must not hold the server."""
    c = ring.client
    await c.prepare(ring.key("a" * 64 + "!"))
    listing = asyncio.ensure_future(ring.expect(
        "List ReDoS", c.walk(f'name~="^{ring.ns}/(a+)+$"'),
        {OK, INVALID, Status.DEADLINE_EXCEEDED}))
    await asyncio.sleep(0.5)
    start = time.monotonic()
    await ring.alive()
    assert time.monotonic() - start < 5
    await listing


# ---- garbage on the wire -------------------------------------------------------------------


async def test_garbage_protobuf(ring: Ring) -> None:
    rng = random.Random(18)
    bodies = [b"\xff" * 10, b"\x0a\xff\xff\xff\xff\x0f", b"\x08", b"\x12\x05ab", b"\x0b",
              b"\x12\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01", b"\x00", b"\x7a\x01"]
    bodies += [rng.randbytes(rng.randrange(1, 200)) for _ in range(24)]
    before = {info.name for info in await ring.client.walk()}
    for method in METHODS:
        if method == "Cleanup":
            continue  # an undecodable Cleanup still cleans up (nothing of ns's is orphaned)
        for body in bodies:
            await ring.expect(f"{method} garbage {body[:12]!r}",
                              raw_call(ring.raw, method, body),
                              {INVALID, NOT_FOUND, OK, EXISTS, PRECONDITION})
    # Bytes that happen to decode are a request like any other: what they made is whole.
    made = [i for i in await ring.client.walk() if i.name not in before]
    for info in sorted(made, key=lambda i: i.kind):  # views and actives before committed
        if info.kind != pb.COMMITTED:
            assert (await ring.client.mounts(info.name))[0].type
        await ring.client.remove(info.name)


async def test_oversized_messages(ring: Ring) -> None:
    big = proto_field(2, ring.key("x").encode()) + proto_field(3, b"p" * (MAX_MESSAGE + 1))
    await ring.expect("Prepare of 16 MiB + 1", raw_call(ring.raw, "Prepare", big), {EXHAUSTED})
    await ring.alive()
    # A prefix claiming 4 GiB, then the stream ends: refused before anything is read.
    ring.tally["raw"] += 1
    claimed = await raw_status(ring, "Stat", grpc_frame(b"\x12\x01x", claimed=0xFFFF_FFFF))
    assert claimed == str(EXHAUSTED.value)


def h2_request(method: str, payload: bytes, end: bool = True) -> tuple[H2Connection, bytes]:
    """A client preface, SETTINGS, HEADERS of a gRPC call and one DATA frame;
    with the client's connection state, to read the answer with."""
    conn = H2Connection(H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "POST"), (":scheme", "http"), (":authority", "x"),
                          (":path", f"/containerd.services.snapshots.v1.Snapshots/{method}"),
                          ("content-type", "application/grpc"), ("te", "trailers")])
    conn.send_data(1, payload, end_stream=end)
    return conn, bytes(conn.data_to_send())


def grpc_statuses(conn: H2Connection, reply: bytes) -> list[str]:
    """The grpc-status values among the headers and trailers in ``reply``."""
    found = []
    for event in conn.receive_data(reply):
        if isinstance(event, ResponseReceived | TrailersReceived):
            found += [v.decode() for k, v in event.headers if k == b"grpc-status"]
    return found


async def raw_status(ring: Ring, method: str, payload: bytes) -> str:
    conn, data = h2_request(method, payload)
    reply = await asyncio.to_thread(raw_exchange, ring.server.socket_path, data)
    statuses = grpc_statuses(conn, reply)
    assert len(statuses) == 1, (method, payload[:40], statuses, reply[:300])
    return statuses[0]


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
RAW_ABUSES = {
    "not http/2": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "garbage": bytes(range(256)) * 8,
    "preface then garbage": PREFACE + b"\xff" * 100,
    "preface, bad frame length": PREFACE + b"\xff\xff\xff\x04\x00\x00\x00\x00\x00",
    "bad hpack": PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
                 b"\x00\x00\x05\x01\x05\x00\x00\x00\x01\xff\xff\xff\xff\xff",
    "data on stream 0": PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
                        b"\x00\x00\x03\x00\x01\x00\x00\x00\x00abc",
    "empty": b"",
}


@pytest.mark.parametrize("abuse", list(RAW_ABUSES))
async def test_broken_http2(ring: Ring, abuse: str) -> None:
    ring.tally["raw"] += 1
    start = time.monotonic()
    await asyncio.to_thread(raw_exchange, ring.server.socket_path, RAW_ABUSES[abuse])
    assert time.monotonic() - start < 10
    await ring.alive()


async def test_truncated_and_unknown_calls(ring: Ring) -> None:
    for name, payload, method, expected in [
        ("prefix only", b"\x00\x00\x00", "Stat", INVALID),
        ("message cut short", grpc_frame(b"\x12\x01x", claimed=50), "Stat", INVALID),
        ("no message", b"", "Stat", INVALID),
        ("unknown method", grpc_frame(b""), "Nope", Status.UNIMPLEMENTED),
        ("compressed", b"\x01" + grpc_frame(b"")[1:], "Stat", Status.UNIMPLEMENTED),
    ]:
        ring.tally["raw"] += 1
        assert await raw_status(ring, method, payload) == str(expected.value), name
        await ring.alive()


async def test_clients_that_vanish_mid_call(ring: Ring) -> None:
    """Half a message then a closed socket; a Prepare whose client goes away;
    a List dropped after its first batch: no half snapshot, server serving."""
    ring.tally["raw"] += 1
    _, half = h2_request("Prepare", grpc_frame(proto_field(2, ring.key("half").encode()),
                                               claimed=4096), end=False)
    await asyncio.to_thread(raw_exchange, ring.server.socket_path, half, 0.2)
    await ring.alive()
    for i in range(20):
        client = Client(ring.server.socket_path)
        call = asyncio.ensure_future(client.prepare(ring.key(f"gone{i}")))
        await asyncio.sleep(0.001 * i)
        call.cancel()
        client.close()
        ring.tally["raw"] += 1
    for i in range(150):
        await ring.client.prepare(ring.key(f"many{i:03}"))
    client = Client(ring.server.socket_path)
    async with client.stub.List.open() as stream:
        await stream.send_message(pb.ListSnapshotsRequest(), end=True)
        await stream.recv_message()
    client.close()
    ring.tally["raw"] += 1
    await asyncio.sleep(1)  # the cancelled calls finish in the workers
    for info in await ring.client.walk(f'name~="^{ring.ns}/gone"'):
        assert info.kind == pb.ACTIVE
        assert (await ring.client.mounts(info.name))[0].type  # whole, not half
    await ring.alive()


# ---- concurrency -------------------------------------------------------------------------


async def test_hundreds_of_concurrent_prepares_of_one_key(ring: Ring) -> None:
    clients = [Client(ring.server.socket_path) for _ in range(8)]
    try:
        for round_ in range(2):
            key = ring.key(f"race{round_}")
            calls = [ring.expect(f"Prepare race {i}", clients[i % 8].prepare(key), {OK, EXISTS})
                     for i in range(200)]
            start = time.monotonic()
            racing = asyncio.gather(*calls)
            await asyncio.sleep(0.05)
            await ring.alive()  # a Stat is not stalled behind the race (STAT_BOUND)
            statuses = await racing
            ring.tally["concurrent"] += len(statuses)
            ring.tally["concurrent.ok"] += statuses.count(OK)
            assert statuses.count(OK) == 1, Counter(s.name for s in statuses)
            assert time.monotonic() - start < 60
        layers = os.listdir(os.path.join(ring.server.root, ring.server.backend, "layers"))
        ours = {i.name for i in await ring.client.walk(f'name~="^{ring.ns}/"')}
        assert ours == {ring.key("race0"), ring.key("race1")}
        assert len(layers) == len(await ring.client.walk()), "a loser's layer was left"
    finally:
        for c in clients:
            c.close()
