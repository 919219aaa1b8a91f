"""Issue 14: where the milliseconds of a small Diff and a small ApplyDiff go, phase by phase.

    python tests/bench/profile_small.py [--n 200]

Each phase is timed alone, in this process, on graphtest's DiffBase tree (three
files) and its tar, median of ``--n`` runs; the last rows are the whole calls
through a plugin's socket with dockerd's request shape.  Reading down the
table: what a forked worker costs (the zygote's fork, pipes, the child's exit
and its report) against a warm worker and an export made in memory; what
reaching a child layer's tree costs a naive Diff or ApplyDiff on overlay
(Get's mount and Put's unmount against the detached views); what handing a call
from the event loop to a worker thread costs (STYLE rule 8).  Nothing
is asserted; the exit status is 0.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from plugin.archive import ApplyOptions, apply_layer, export_tree
from plugin.archive.proc import stream as archive_stream
from plugin.driver.base import CreateOpts
from plugin.driver.manager import DriverManager
from plugin.fspool import FsPool
from plugin.idtools import IDMappings
from tests.bench.bench_protocol import add_files
from tests.bench.benchlib import PluginServer, Workspace, new_layer_id, print_table


def median_ms(n: int, fn: Callable[[], object]) -> float:
    fn()
    times = []
    for _ in range(n):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def forked(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with the in-memory export and the warm workers turned off (a fork per call)."""
    def run() -> object:
        bound, pool = archive_stream.MEMORY_EXPORT_MAX_ENTRIES, archive_stream._WARM
        archive_stream.MEMORY_EXPORT_MAX_ENTRIES = 0
        archive_stream._WARM = _NoWarm()  # type: ignore[assignment]
        try:
            return fn()
        finally:
            archive_stream.MEMORY_EXPORT_MAX_ENTRIES, archive_stream._WARM = bound, pool
    return run


class _NoWarm:
    def take(self) -> None:
        return None


def _mount_rows(ws: Workspace, n: int) -> list[list[str]]:
    """What a naive Diff or ApplyDiff of a small child layer pays to reach its
    tree on overlay: Get's read-write mount and Put's unmount, against the
    detached views (``OverlayDriver.read_view`` / ``write_view``)."""
    if sys.platform != "linux" or os.geteuid() != 0:
        return []
    manager = DriverManager(str(ws.base / "profile-state"), "overlay")
    manager.init(str(ws.fs / "profile-home"), [], [], [])
    driver = manager.driver
    try:
        driver.create("pbase", "", CreateOpts())
        add_files(Path(driver.get("pbase", "")), 3)
        driver.put("pbase")
        driver.create("pchild", "pbase", CreateOpts())

        def get_put() -> None:
            os.listdir(driver.get("pchild", ""))
            driver.put("pchild")

        def view(kind: str) -> Callable[[], None]:
            def run() -> None:
                with getattr(driver, kind)("pchild") as path:
                    os.listdir(path)
            return run
        rows = [["overlay child: Get + Put (read-write mount; the unmount syncs the fs)",
                 f"{median_ms(n, get_put):.3f}"],
                ["overlay child: read view (detached read-only overlay)",
                 f"{median_ms(n, view('read_view')):.3f}"],
                ["overlay child: write view (detached read-write overlay, volatile)",
                 f"{median_ms(n, view('write_view')):.3f}"]]
    finally:
        driver.cleanup()
    return rows


def _hop_rows(n: int, work: Callable[[], object], rounds: int = 6) -> list[list[str]]:
    """The event loop handing a call to a worker thread and taking its result back:
    ``run_in_executor`` on a ``ThreadPoolExecutor`` (what the server used) against
    ``FsPool.start`` (what it uses), for a call doing nothing and for ``work``;
    on uvloop when installed, as the server runs.  ``rounds`` interleaved passes of
    ``n`` calls: the median of the passes' medians, and their range (a single pass
    moves with where the scheduler put the two threads)."""
    async def measure() -> list[list[str]]:
        loop = asyncio.get_running_loop()
        pool, fspool = ThreadPoolExecutor(32), FsPool(32)

        def nothing() -> None:
            return None

        passes: dict[tuple[str, str], list[float]] = {}
        try:
            for _ in range(rounds):
                for what, fn in (("nothing", nothing), ("the in-memory 3-file Diff", work)):
                    for how in ("ThreadPoolExecutor + run_in_executor", "FsPool.start"):
                        times = []
                        for _ in range(n + 1):
                            started = time.perf_counter()
                            if how == "FsPool.start":
                                await fspool.start(fn, timeout=600)
                            else:
                                await loop.run_in_executor(pool, fn)
                            times.append(time.perf_counter() - started)
                        passes.setdefault((what, how), []).append(
                            statistics.median(times[1:]) * 1000)
        finally:
            pool.shutdown()
            fspool.shutdown()
        return [[f"loop -> worker -> loop, {what}: {how} (passes {min(ms):.3f}-{max(ms):.3f})",
                 f"{statistics.median(ms):.3f}"] for (what, how), ms in passes.items()]
    try:
        import uvloop  # type: ignore[import-not-found, unused-ignore]
        return uvloop.run(measure())  # type: ignore[no-any-return, unused-ignore]
    except ImportError:
        return asyncio.run(measure())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    args = parser.parse_args()
    rows: list[list[str]] = []
    with Workspace("loop", size_gib=2) as ws:
        tree = ws.dir("tree")
        add_files(tree, 3)
        idmap = IDMappings()

        def diff() -> bytes:
            with export_tree(str(tree), idmap) as stream:
                return stream.read()
        data = diff()

        def apply() -> int:
            return apply_layer(tempfile.mkdtemp(dir=ws.fs), io.BytesIO(data), ApplyOptions())

        def fork_only() -> None:
            with tempfile.TemporaryFile() as err:
                proc = archive_stream._ZYGOTE.start(["no-such-job"], err, want_stdout=False)
                proc.wait()
        phases = [
            ("zygote fork + exit + report of a worker doing nothing", fork_only),
            ("Diff of a 3-file tree, forked export worker", forked(diff)),
            ("Diff of a 3-file tree, in memory (this thread)", diff),
            ("ApplyDiff of that tar, forked apply worker", forked(apply)),
            ("ApplyDiff of that tar, warm apply worker", apply),
        ]
        for name, fn in phases:
            rows.append([name, f"{median_ms(args.n, fn):.3f}"])
        rows.extend(_hop_rows(args.n * 5, diff))
        rows.extend(_mount_rows(ws, args.n))
        server = PluginServer(ws, backend="overlay")
        try:
            client = server.start()
            layer = new_layer_id()
            client.create(layer, "")
            add_files(Path(client.get(layer)), 3)
            client.put(layer)
            exists = median_ms(args.n, lambda: client.call("GraphDriver.Exists", {"ID": layer}))
            rows.append(["plugin round trip, Exists (HTTP, no work)", f"{exists:.3f}"])
            rows.append(["plugin Diff of the 3-file layer, end to end",
                         f"{median_ms(args.n, lambda: client.diff(layer)):.3f}"])

            def apply_rpc() -> None:
                target = new_layer_id()
                client.create(target, "")
                client.apply_diff(target, "", iter([data]))
            rows.append(["plugin Create + ApplyDiff of that tar, end to end",
                         f"{median_ms(max(20, args.n // 5), apply_rpc):.3f}"])
            create = median_ms(max(20, args.n // 5), lambda: client.create(new_layer_id(), ""))
            rows.append(["plugin Create alone", f"{create:.3f}"])
            client.close()
        finally:
            server.stop()
    print_table(f"small Diff / ApplyDiff, phase by phase (median of {args.n}; "
                f"load {' '.join(f'{x:.2f}' for x in os.getloadavg())})",
                ["phase", "ms"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
