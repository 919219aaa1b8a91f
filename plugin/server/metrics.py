"""Prometheus metrics, off unless a metrics socket or address is configured.

Two kinds of numbers, kept apart by what they cost:

* per call (counts, errors, latency by operation; bytes through Diff and
  ApplyDiff): counted by :class:`CallMetrics` in plain attributes on the event
  loop, which is the only thread that touches them, so a call pays a dict
  lookup, a bisect and a few additions, no lock.  ``prometheus_client``'s own
  metric objects take a lock per bucket and per counter on every observation;
  here they are only built at scrape time, from a snapshot.
* state (layers, mounts held, Get references): asked from the driver when
  Prometheus scrapes (``ProtoDriver.counts``: it lists Home and reads
  mountinfo), in the worker pool, never maintained per call.

The graphdriver socket stays JSON-only: metrics are served by their own small
aiohttp application on their own socket (``GET /metrics``, Prometheus text
format), so nothing on the plugin's hot path changes when they are on, beyond
the counting.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector

from plugin.driver.base import Counts
from plugin.driver.manager import DriverManager
from plugin.errors import StrataError

log = logging.getLogger("strata.metrics")

#: Upper bounds (seconds) of the latency buckets: from a call answered from
#: memory (Exists, a counted Get) to a Diff of a large layer.
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
           0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
#: The ``op`` label of a request to a path the plugin does not serve.
OTHER = "other"


class OpStats:
    """One operation's counts; ``buckets[i]`` counts calls in (BUCKETS[i-1], BUCKETS[i]],
    the last one those above every bound."""

    __slots__ = ("buckets", "calls", "errors", "seconds")

    def __init__(self) -> None:
        self.calls = 0
        self.errors = 0
        self.seconds = 0.0
        self.buckets = [0] * (len(BUCKETS) + 1)

    def copy(self) -> OpStats:
        other = OpStats()
        other.calls, other.errors, other.seconds = self.calls, self.errors, self.seconds
        other.buckets = list(self.buckets)
        return other


class CallMetrics:
    """Per-call counters, updated on the event loop only (see the module docstring)."""

    def __init__(self, paths: Iterable[str]) -> None:
        self.ops = {path: OpStats() for path in paths}
        self.other = OpStats()
        #: Bytes of layer tar streamed out by Diff / received by ApplyDiff.
        self.diff_bytes = 0
        self.apply_bytes = 0

    def observe(self, path: str, seconds: float, failed: bool) -> None:
        stats = self.ops.get(path, self.other)
        stats.calls += 1
        stats.seconds += seconds
        stats.buckets[bisect_left(BUCKETS, seconds)] += 1
        if failed:
            stats.errors += 1

    def snapshot(self) -> CallMetrics:
        """A copy to render off the loop (call it on the loop)."""
        copy = CallMetrics(())
        copy.ops = {path: stats.copy() for path, stats in self.ops.items()}
        copy.other = self.other.copy()
        copy.diff_bytes, copy.apply_bytes = self.diff_bytes, self.apply_bytes
        return copy


def version() -> str:
    try:
        return importlib.metadata.version("strata")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class Scrape:
    """What one scrape renders: the call counters and the driver's state."""

    calls: CallMetrics
    name: str
    configured_backend: str
    backend: str  # the running driver's, "" before Init
    usage: Counts | None

    def collect(self) -> Iterator[Metric]:
        yield from self._calls()
        info = InfoMetricFamily("strata", "strata's version, plugin name and backends")
        info.add_metric([], {"version": version(), "name": self.name,
                             "configured_backend": self.configured_backend,
                             "backend": self.backend or "none (no Init yet)"})
        yield info
        transfer = CounterMetricFamily("strata_layer_tar_bytes",
                                       "bytes of layer tar streamed by Diff (out) and "
                                       "received by ApplyDiff (in)", labels=["direction"])
        transfer.add_metric(["out"], self.calls.diff_bytes)
        transfer.add_metric(["in"], self.calls.apply_bytes)
        yield transfer
        if self.usage is not None:
            for metric, text, value in (
                    ("strata_layers", "layers under Home", self.usage.layers),
                    ("strata_mounts", "layer mounts strata holds now", self.usage.mounts),
                    ("strata_references", "Gets dockerd has not Put yet", self.usage.references)):
                yield GaugeMetricFamily(metric, text, value=value)

    def _calls(self) -> Iterator[Metric]:
        calls = CounterMetricFamily("strata_calls", "graphdriver calls answered, by operation",
                                    labels=["op"])
        errors = CounterMetricFamily("strata_call_errors", "graphdriver calls answered with an "
                                     "Err (or aborted), by operation", labels=["op"])
        latency = HistogramMetricFamily("strata_call_duration_seconds", "time from request to "
                                        "reply (Diff: to the stream's end), by operation",
                                        labels=["op"])
        rows = [(path.lstrip("/"), stats) for path, stats in self.calls.ops.items()]
        rows.append((OTHER, self.calls.other))
        for op, stats in rows:
            calls.add_metric([op], stats.calls)
            errors.add_metric([op], stats.errors)
            cumulative, buckets = 0, []
            for bound, count in zip((*map(str, BUCKETS), "+Inf"), stats.buckets, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            latency.add_metric([op], buckets, stats.seconds)
        yield from (calls, errors, latency)


def render(scrape: Scrape) -> bytes:
    """The Prometheus text for ``scrape`` and this process (CPU, memory, fds)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(scrape)
    ProcessCollector(registry=registry)
    return generate_latest(registry)


def _usage(manager: DriverManager) -> tuple[str, Counts | None]:
    """The driver's name and state, or ("", None) before Init (blocking: the pool)."""
    try:
        driver = manager.driver
    except StrataError:
        return "", None
    return driver.name, driver.counts()


class MetricsEndpoint:
    """``GET /metrics``: snapshot the counters on the loop, render in the pool."""

    def __init__(self, calls: CallMetrics, manager: DriverManager, name: str,
                 executor: Executor) -> None:
        self.calls, self.manager, self.name, self.executor = calls, manager, name, executor

    async def metrics(self, request: web.Request) -> web.Response:
        snapshot = self.calls.snapshot()
        loop = asyncio.get_running_loop()

        def scrape() -> bytes:
            backend, usage = _usage(self.manager)
            return render(Scrape(snapshot, self.name, self.manager.backend, backend, usage))

        body = await loop.run_in_executor(self.executor, scrape)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    def application(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self.metrics)
        return app
