"""Malformed, mistyped, oversized and fuzzed requests on every endpoint.

The rule for every one of them: a JSON body with a non-empty ``Err`` and a 4xx
status for bad input (never an empty 200, never a 5xx, never a dropped
connection: dockerd would retry with an empty body, docs/protocol.md §2.4), nothing
created outside Home, and the server keeps serving afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from yarl import URL

from plugin.errors import InvalidArgument
from plugin.state.layers import validate_id
from tests.hostile import corpus
from tests.support.client import HEADERS
from tests.support.files import new_layer_id, read_file, write_file
from tests.support.plugin import PluginUnderTest

pytestmark = pytest.mark.asyncio

#: Endpoints whose body carries an ID, with the optional fields they take.
ID_ENDPOINTS: dict[str, tuple[str, ...]] = {
    "GraphDriver.Create": ("Parent", "MountLabel", "StorageOpt"),
    "GraphDriver.CreateReadWrite": ("Parent", "MountLabel", "StorageOpt"),
    "GraphDriver.Remove": (),
    "GraphDriver.Get": ("MountLabel",),
    "GraphDriver.Put": (),
    "GraphDriver.Exists": (),
    "GraphDriver.GetMetadata": (),
    "GraphDriver.Changes": ("Parent",),
    "GraphDriver.DiffSize": ("Parent",),
    "GraphDriver.Diff": ("Parent",),
}
#: Endpoints that take no input (Activate's body is empty by protocol, the rest send {}).
BODYLESS = ["Plugin.Activate", "GraphDriver.Capabilities", "GraphDriver.Status",
            "GraphDriver.Cleanup"]
JSON_ENDPOINTS = ["GraphDriver.Init", *ID_ENDPOINTS]
#: What a fuzzed request may be answered with (500 means strata broke on input).
ALLOWED_STATUS = {200, 400, 404, 405, 409, 413, 501}

BAD_IDS = ["", "/", ".", "..", "../x", "x/..", "a/b", "/abs", "a\x00b", "\x00", "x" * 129,
           "y" * 5000, " ", "a b", "-lead", ".hidden", "a\nb", "é", "..a", "a..b", "%2e%2e"]


def encode(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode() + b"\n"


def assert_clean_err(op: str, status: int, data: bytes) -> str:
    """4xx with a JSON object carrying a non-empty Err; returns the Err."""
    assert 400 <= status < 500, f"{op}: expected a 4xx, got {status} {data[:300]!r}"
    try:
        reply = json.loads(data)
    except ValueError:
        raise AssertionError(f"{op}: error reply is not JSON: {data[:300]!r}") from None
    assert isinstance(reply, dict), f"{op}: error reply is not an object: {reply!r}"
    err = reply.get("Err")
    assert isinstance(err, str) and err.strip(), f"{op}: no Err text in {reply!r}"
    return err


async def assert_alive(plugin: PluginUnderTest) -> None:
    layer = new_layer_id()
    await plugin.client.create(layer)
    assert await plugin.client.exists(layer)
    await plugin.client.remove(layer)


def beside_home(plugin: PluginUnderTest) -> set[str]:
    top = os.path.dirname(plugin.home)
    return {os.path.join(d, n) for d, dirs, files in os.walk(top)
            if not d.startswith(plugin.home) for n in dirs + files
            if not os.path.join(d, n).startswith(plugin.home + "/")}


def layer_names(plugin: PluginUnderTest) -> set[str]:
    layers = os.path.join(plugin.home, "layers")
    return set(os.listdir(layers)) if os.path.isdir(layers) else set()


def count(tally: Counter[str], status: int) -> None:
    tally["req.sent"] += 1
    tally["req.clean_err" if 400 <= status < 500 else "req.ok" if status == 200 else "req.bad"] += 1


# ---- malformed bodies --------------------------------------------------------------

MALFORMED = [b"{not json", b"[", b'"', b"\xff\xfe\x00", b"{}}", b'{"ID":"a"', b"nul\x00",
             b"{'ID': 'a'}", b'{"ID":"a",}', b"\x1f\x8b\x08\x00", b"[" * 100_000]


@pytest.mark.parametrize("op", JSON_ENDPOINTS)
async def test_malformed_json(plugin: PluginUnderTest, op: str, tally: Counter[str]) -> None:
    for body in MALFORMED:
        status, data = await plugin.client.raw(op, body)
        count(tally, status)
        assert_clean_err(f"{op} {body[:20]!r}", status, data)
    await assert_alive(plugin)


def wrong_types(op: str) -> list[Any]:
    bodies: list[Any] = [{"ID": 5}, {"ID": None}, {"ID": []}, {"ID": {}}, {"ID": True},
                         {"ID": 1.5}, {}, {"id": "lowercase-key-only"}, [], ["ID"], 5, "ID",
                         None, True]
    ok_id = "wrongtypes"
    field_values: dict[str, list[Any]] = {"Parent": [5, [], {}, True], "MountLabel": [5, ["x"], {}],
                    "StorageOpt": [[1], "size=1G", {"size": 5}, {"size": None}]}
    for name in ID_ENDPOINTS.get(op, ()):
        bodies += [{"ID": ok_id, name: v} for v in field_values[name]]
    return bodies


@pytest.mark.parametrize("op", list(ID_ENDPOINTS))
async def test_wrong_types(plugin: PluginUnderTest, op: str, tally: Counter[str]) -> None:
    for body in wrong_types(op):
        status, data = await plugin.client.raw(op, encode(body))
        count(tally, status)
        assert_clean_err(f"{op} {body!r}", status, data)
    assert "wrongtypes" not in layer_names(plugin)
    await assert_alive(plugin)


async def test_init_wrong_types_leave_the_driver_alone(plugin: PluginUnderTest,
                                                       tally: Counter[str]) -> None:
    home = plugin.home
    for body in [{"Home": 5}, {"Home": None}, {"Home": ["/x"]}, {}, [], "x",
                 {"Home": "relative/home"}, {"Home": ""},
                 {"Home": home, "Opts": 5}, {"Home": home, "Opts": [5]},
                 {"Home": home, "UIDMaps": [{"container_id": "0", "host_id": 0, "size": 1}]},
                 {"Home": home, "GIDMaps": {"a": 1}}]:
        status, data = await plugin.client.raw("GraphDriver.Init", encode(body))
        count(tally, status)
        assert_clean_err(f"Init {body!r}", status, data)
    assert not os.path.exists(os.path.join(os.getcwd(), "relative"))
    await assert_alive(plugin)


# ---- empty bodies (dockerd's retry) -----------------------------------------------


@pytest.mark.parametrize("op", JSON_ENDPOINTS + BODYLESS)
async def test_empty_body(plugin: PluginUnderTest, op: str, tally: Counter[str]) -> None:
    for body in (b"", b"\n", b"   "):
        status, data = await plugin.client.raw(op, body)
        count(tally, status)
        if op in BODYLESS:
            # Nothing to decode: the normal answer (never an empty 200).
            assert status == 200 and isinstance(json.loads(data), dict), (op, status, data)
            assert not json.loads(data).get("Err"), (op, data)
        else:
            assert_clean_err(f"{op} empty body {body!r}", status, data)
    await assert_alive(plugin)


async def test_apply_diff_empty_body(plugin: PluginUnderTest, tally: Counter[str]) -> None:
    layer = new_layer_id()
    await plugin.client.create(layer)
    status, data = await apply_raw(plugin, f"id={layer}&parent=", b"")
    count(tally, status)
    if status == 200:
        assert json.loads(data) == {"Size": 0}, data
    else:
        assert_clean_err("ApplyDiff empty body", status, data)
    await plugin.client.remove(layer)
    assert not await plugin.client.exists(layer)
    await assert_alive(plugin)


# ---- wrong paths and methods ---------------------------------------------------------


@pytest.mark.parametrize("path", ["GraphDriver.Nope", "Nope", "", "GraphDriver.create",
                                  "graphdriver.Create", "GraphDriver.Create/extra",
                                  "GraphDriver.", "Plugin.Deactivate", "VolumeDriver.Create"])
async def test_unknown_endpoint(plugin: PluginUnderTest, path: str, tally: Counter[str]) -> None:
    status, data = await plugin.client.raw(path, encode({"ID": "x"}))
    count(tally, status)
    assert status == 404, (path, status, data)
    assert_clean_err(path, status, data)
    await assert_alive(plugin)


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
@pytest.mark.parametrize("op", ["Plugin.Activate", "GraphDriver.Create", "GraphDriver.Get",
                                "GraphDriver.ApplyDiff", "GraphDriver.Diff"])
async def test_wrong_method(plugin: PluginUnderTest, op: str, method: str,
                            tally: Counter[str]) -> None:
    status, data = await plugin.client.raw(op, encode({"ID": "x"}), method=method)
    count(tally, status)
    assert status == 405, (op, method, status, data)
    assert_clean_err(f"{method} {op}", status, data)
    await assert_alive(plugin)


# ---- invalid IDs ---------------------------------------------------------------------------


@pytest.mark.parametrize("op", list(ID_ENDPOINTS))
async def test_invalid_ids(plugin: PluginUnderTest, op: str, tally: Counter[str]) -> None:
    before_layers, before_beside = layer_names(plugin), beside_home(plugin)
    wrong = []
    for bad in BAD_IDS:
        status, data = await plugin.client.raw(op, encode({"ID": bad}))
        count(tally, status)
        try:
            assert_clean_err(f"{op} ID={bad[:40]!r}", status, data)
        except AssertionError as e:
            wrong.append(str(e).splitlines()[0])
    assert not wrong, "\n".join(wrong)
    assert layer_names(plugin) == before_layers
    assert beside_home(plugin) == before_beside
    await assert_alive(plugin)


@pytest.mark.parametrize("op", [op for op, fields in ID_ENDPOINTS.items() if "Parent" in fields])
async def test_invalid_parents(plugin: PluginUnderTest, op: str, tally: Counter[str]) -> None:
    existing = new_layer_id()
    await plugin.client.create(existing)
    before_layers = layer_names(plugin)
    for bad in [b for b in BAD_IDS if b]:  # an empty Parent means "no parent"
        layer = new_layer_id() if op.startswith("GraphDriver.Create") else existing
        status, data = await plugin.client.raw(op, encode({"ID": layer, "Parent": bad}))
        count(tally, status)
        assert_clean_err(f"{op} Parent={bad[:40]!r}", status, data)
    assert layer_names(plugin) == before_layers
    await assert_alive(plugin)


async def apply_raw(plugin: PluginUnderTest, query: str, body: bytes) -> tuple[int, bytes]:
    """ApplyDiff with the query exactly as given (dockerd formats it without escaping)."""
    url = URL(f"http://plugin/GraphDriver.ApplyDiff?{query}", encoded=True)
    async with plugin.client.session.post(url, data=body, headers=HEADERS) as resp:
        return resp.status, await resp.read()


def query_value(value: str) -> str:
    return "".join(c if (c.isascii() and c.isalnum()) or c in "-_." else f"%{b:02X}"
                   for c in value for b in c.encode())


async def test_apply_diff_invalid_query(plugin: PluginUnderTest, tally: Counter[str]) -> None:
    layer = new_layer_id()
    await plugin.client.create(layer)
    before_layers, before_beside = layer_names(plugin), beside_home(plugin)
    body = corpus.tar(corpus.f("file"))
    queries = [f"id={query_value(b)}&parent=" for b in BAD_IDS]
    queries += [f"id={layer}&parent={query_value(b)}" for b in BAD_IDS if b]
    queries += ["", "parent=", f"ID={layer}", f"id=&id={layer}", "id=../../x", "id=a/b"]
    wrong = []
    for query in queries:
        status, data = await apply_raw(plugin, query, body)
        count(tally, status)
        try:
            assert_clean_err(f"ApplyDiff ?{query.replace(layer, '<layer>')[:80]}", status, data)
        except AssertionError as e:
            wrong.append(str(e).splitlines()[0])
    assert layer_names(plugin) == before_layers
    assert beside_home(plugin) == before_beside
    root = await plugin.client.get(layer)
    try:
        written = os.listdir(root)
    finally:
        await plugin.client.put(layer)
    await assert_alive(plugin)
    assert not wrong, "\n".join(wrong)
    assert written == [], "a refused ApplyDiff wrote into the layer"


async def test_apply_diff_to_missing_layer(plugin: PluginUnderTest, tally: Counter[str]) -> None:
    missing = new_layer_id()
    status, data = await apply_raw(plugin, f"id={missing}&parent=", corpus.tar(corpus.f("x")))
    count(tally, status)
    assert status == 404, (status, data)
    assert_clean_err("ApplyDiff to a missing layer", status, data)
    assert missing not in layer_names(plugin)


# ---- lifecycle edge cases -------------------------------------------------------------------


async def test_create_with_missing_parent(plugin: PluginUnderTest, tally: Counter[str]) -> None:
    for op in ("GraphDriver.Create", "GraphDriver.CreateReadWrite"):
        layer = new_layer_id()
        status, data = await plugin.client.raw(op, encode({"ID": layer, "Parent": new_layer_id()}))
        count(tally, status)
        assert status == 404, (op, status, data)
        assert_clean_err(op, status, data)
        assert not await plugin.client.exists(layer)
        assert layer not in layer_names(plugin)
    staging = os.path.join(plugin.home, "staging")
    assert not os.path.isdir(staging) or os.listdir(staging) == []


async def test_create_existing_id(plugin: PluginUnderTest, tally: Counter[str]) -> None:
    layer = new_layer_id()
    await plugin.client.create(layer, rw=True)
    root = await plugin.client.get(layer)
    precious = os.path.join(root, "precious")
    await asyncio.to_thread(write_file, precious, b"keep me", None)
    await plugin.client.put(layer)
    for op in ("GraphDriver.Create", "GraphDriver.CreateReadWrite"):
        status, data = await plugin.client.raw(op, encode({"ID": layer}))
        count(tally, status)
        assert status == 409, (op, status, data)
        assert_clean_err(op, status, data)
    root = await plugin.client.get(layer)
    try:
        assert await asyncio.to_thread(read_file, os.path.join(root, "precious")) == b"keep me"
    finally:
        await plugin.client.put(layer)


async def test_remove_missing_id_succeeds(plugin: PluginUnderTest, tally: Counter[str]) -> None:
    status, data = await plugin.client.raw("GraphDriver.Remove", encode({"ID": new_layer_id()}))
    count(tally, status)
    assert (status, json.loads(data)) == (200, {}), data


async def test_put_without_get_succeeds(plugin: PluginUnderTest, tally: Counter[str]) -> None:
    layer = new_layer_id()
    await plugin.client.create(layer)
    for _ in range(3):
        status, data = await plugin.client.raw("GraphDriver.Put", encode({"ID": layer}))
        count(tally, status)
        assert (status, json.loads(data)) == (200, {}), data
    assert await plugin.client.get(layer)
    await plugin.client.put(layer)
    await plugin.client.remove(layer)


# ---- oversized bodies ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["long_id", "padding", "garbage", "deep_nesting"])
async def test_oversized_json(plugin: PluginUnderTest, shape: str, tally: Counter[str]) -> None:
    ten_mb = 10 << 20
    body = {
        "long_id": encode({"ID": "a" * ten_mb}),
        "padding": b'{"ID":"x"' + b" " * ten_mb + b"}",
        "garbage": os.urandom(ten_mb),
        "deep_nesting": b'{"ID":' + b"[" * ten_mb,
    }[shape]
    try:
        status, data = await plugin.client.raw("GraphDriver.Create", body)
    except aiohttp.ClientError as e:
        # A connection dropped before the answer is what makes dockerd retry blindly.
        raise AssertionError(f"the server dropped the connection: {e!r}") from None
    count(tally, status)
    assert_clean_err(f"10 MB {shape}", status, data)
    await assert_alive(plugin)


# ---- fuzzing ---------------------------------------------------------------------------------

JSON_SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                           max_leaves=12)
ID_TEXT = st.text(max_size=40) | st.sampled_from(BAD_IDS) | st.from_regex(
    r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True)


def shaped(op: str) -> st.SearchStrategy[Any]:
    fields = {name: JSON_VALUES | ID_TEXT for name in ID_ENDPOINTS[op]}
    return st.fixed_dictionaries({"ID": ID_TEXT | JSON_VALUES}, optional=fields)


def bodies(op: str) -> st.SearchStrategy[bytes]:
    if op == "GraphDriver.Init":
        # Never a string Home: that is a real re-Init to a directory of the fuzzer's choice.
        values = JSON_VALUES.filter(
            lambda v: not (isinstance(v, dict) and isinstance(v.get("Home"), str)))
    else:
        values = shaped(op) | JSON_VALUES
    return values.map(encode) | st.binary(max_size=64)


def examples(strategy: st.SearchStrategy[Any], n: int = 150) -> list[Any]:
    """``n`` values drawn by hypothesis (deterministic, generate phase only).

    The requests go out from the test's own event loop, where the server runs,
    so hypothesis only generates here; a failing input is named in the assertion
    (no shrinking, but every case is one small request)."""
    drawn: list[Any] = []

    @settings(max_examples=n, deadline=None, derandomize=True, database=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(value: Any) -> None:
        drawn.append(value)

    collect()
    return drawn


def looks_valid(value: object) -> bool:
    try:
        validate_id(value)  # type: ignore[arg-type]
    except InvalidArgument:
        return False
    return True


async def check_reply(plugin: PluginUnderTest, op: str, status: int, data: bytes) -> None:
    assert status in ALLOWED_STATUS, f"{op}: status {status}: {data[:300]!r}"
    if op == "GraphDriver.Diff" and status == 200:
        return  # a tar stream
    assert data, f"{op}: empty body (dockerd fails with EOF)"
    reply = json.loads(data)
    assert isinstance(reply, dict), reply
    if status == 200:
        assert not reply.get("Err"), reply
    else:
        assert isinstance(reply.get("Err"), str) and reply["Err"].strip(), reply


@pytest.mark.parametrize("op", JSON_ENDPOINTS)
async def test_fuzz_bodies(plugin: PluginUnderTest, op: str, tally: Counter[str]) -> None:
    beside = beside_home(plugin)
    for body in examples(bodies(op)):
        status, data = await plugin.client.raw(op, body)
        count(tally, status)
        try:
            await check_reply(plugin, op, status, data)
            assert all(looks_valid(name) for name in layer_names(plugin)), layer_names(plugin)
        except (AssertionError, ValueError) as e:
            raise AssertionError(f"{op} body {body[:200]!r}: {e}") from None
    assert beside_home(plugin) == beside
    await assert_alive(plugin)


async def test_fuzz_ids(plugin: PluginUnderTest, tally: Counter[str]) -> None:
    """Arbitrary strings as the ID of every ID-taking endpoint and of ApplyDiff."""
    beside = beside_home(plugin)
    body = corpus.tar(corpus.f("f"))
    for layer in examples(ID_TEXT):
        calls = [(op, await plugin.client.raw(op, encode({"ID": layer}))) for op in ID_ENDPOINTS]
        calls.append(("GraphDriver.ApplyDiff",
                      await apply_raw(plugin, f"id={query_value(layer)}&parent=", body)))
        for op, (status, data) in calls:
            count(tally, status)
            try:
                await check_reply(plugin, op, status, data)
                if not looks_valid(layer):
                    assert 400 <= status < 500, "an invalid ID must get a 4xx"
            except (AssertionError, ValueError) as e:
                raise AssertionError(f"{op} ID {layer!r}: {status} {data[:200]!r}: {e}") from None
        if looks_valid(layer):
            await plugin.client.remove(layer)
    assert beside_home(plugin) == beside
    assert layer_names(plugin) == set()
    await assert_alive(plugin)


VALID_IDS = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", fullmatch=True).filter(
    lambda s: ".." not in s)


async def test_fuzz_valid_ids_get_success(plugin: PluginUnderTest, tally: Counter[str]) -> None:
    """Any ID the validator accepts works through the whole lifecycle."""
    c = plugin.client
    for layer in examples(VALID_IDS, 100):
        await c.create(layer)
        assert await c.exists(layer), layer
        root = await c.get(layer)
        assert os.path.realpath(root).startswith(os.path.realpath(plugin.home) + "/"), root
        await c.put(layer)
        await c.remove(layer)
        assert not await c.exists(layer), layer
        tally["req.sent"] += 6
        tally["req.ok"] += 6
    assert layer_names(plugin) == set()
