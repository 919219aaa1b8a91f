"""Metrics (``GET /metrics`` on its own socket) count what the graphdriver socket did.

The plugin app and its metrics endpoint run in the test's loop under the
``blockbuster`` guard, so a scrape that touched the disk on the loop (layers,
mounts) would fail here; every number is checked against the calls made.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from blockbuster import BlockBuster
from prometheus_client.parser import text_string_to_metric_families

from tests.backends import home_for
from tests.support.files import layer_tar
from tests.support.mounts import mounts_under
from tests.support.plugin import PluginUnderTest, serving_in_loop

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
REPO = Path(__file__).resolve().parents[2]


async def scrape(socket_path: str) -> Samples:
    connector = aiohttp.UnixConnector(path=socket_path)
    async with aiohttp.ClientSession(connector=connector) as session, \
            session.get("http://metrics/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def op(samples: Samples, name: str, operation: str) -> float:
    return samples[(name, frozenset({("op", operation)}))]


def gauge(samples: Samples, name: str) -> float:
    return samples[(name, frozenset())]


@pytest.fixture
async def measured(backend: str, tmp_path: str, short_dir: str, blockbuster: BlockBuster,
                   request: pytest.FixtureRequest) -> AsyncIterator[PluginUnderTest]:
    root = home_for(request, backend, str(tmp_path))
    async with serving_in_loop(backend, root, os.path.join(short_dir, "p.sock"),
                               metrics_socket=os.path.join(short_dir, "m.sock")) as put:
        yield put


async def test_scrape_counts_match_the_calls(measured: PluginUnderTest) -> None:
    assert measured.metrics_socket is not None
    client, home = measured.client, measured.home
    first = await scrape(measured.metrics_socket)
    assert op(first, "strata_calls_total", "GraphDriver.Init") == 1
    assert gauge(first, "strata_layers") == 0

    tar = layer_tar({"etc/motd": b"hello\n", "bin/tool": os.urandom(70_000)})
    await client.create("base")
    await client.apply_diff("base", "", tar)
    await client.create("child", "base")
    exported = await client.diff("base")
    for _ in range(3):
        await client.get("child")
    await client.put("child")
    with pytest.raises(Exception, match="does not exist"):
        await client.get("missing")
    status, _ = await client.raw("GraphDriver.Nonsense", b"{}")
    assert status == 404

    seen = await scrape(measured.metrics_socket)
    assert op(seen, "strata_calls_total", "GraphDriver.Create") == 2
    assert op(seen, "strata_calls_total", "GraphDriver.Get") == 4
    assert op(seen, "strata_call_errors_total", "GraphDriver.Get") == 1
    assert op(seen, "strata_call_errors_total", "GraphDriver.Create") == 0
    assert op(seen, "strata_calls_total", "other") == 1
    assert seen[("strata_layer_tar_bytes_total", frozenset({("direction", "in")}))] == len(tar)
    assert seen[("strata_layer_tar_bytes_total", frozenset({("direction", "out")}))] \
        == len(exported)
    assert gauge(seen, "strata_layers") == 2
    assert gauge(seen, "strata_references") == 2
    assert gauge(seen, "strata_mounts") == len(mounts_under(os.path.join(home, "")))
    for name in ("GraphDriver.Get", "GraphDriver.ApplyDiff", "GraphDriver.Diff"):
        count = op(seen, "strata_call_duration_seconds_count", name)
        assert count == op(seen, "strata_calls_total", name)
        inf = seen[("strata_call_duration_seconds_bucket",
                    frozenset({("op", name), ("le", "+Inf")}))]
        assert inf == count and op(seen, "strata_call_duration_seconds_sum", name) > 0
    info = [labels for (name, labels) in seen if name == "strata_info"]
    assert ("backend", measured.backend) in info[0]

    await client.put("child")
    await client.put("child")
    await client.remove("child")
    after = await scrape(measured.metrics_socket)
    assert gauge(after, "strata_references") == 0
    assert gauge(after, "strata_mounts") == 0
    assert gauge(after, "strata_layers") == 1
    # The scrapes themselves are not graphdriver calls.
    assert op(after, "strata_calls_total", "GraphDriver.Put") == 3


async def test_graphdriver_socket_stays_json_only(measured: PluginUnderTest) -> None:
    status, body = await measured.client.raw("metrics", b"", method="GET")
    assert status == 404 and body.startswith(b'{"Err":')


def test_metrics_off_imports_no_prometheus_client() -> None:
    code = ("import sys; from plugin.server import serve, app; from plugin import cli; "
            "print('prometheus_client' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, check=True).stdout
    assert out.strip() == "False"
