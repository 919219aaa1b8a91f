"""Issue 2's bar: peak RSS of a streamed 1 GiB ApplyDiff (target: < 150 MiB).

    python tests/bench/bench_apply_rss.py [--size-mib 1024] [--fs loop|tmpfs|dir]

Starts the real plugin (vfs backend, temp state and Home, unique name and
socket), sends Init and Create, then a chunked ApplyDiff of a generated layer
(one big file plus a few small ones) streamed the way dockerd sends it, never
held in memory.  While the call runs it samples the RSS of the plugin process
and of its archive worker children.  The baseline, measured in the same run, is
GNU ``tar -x`` of the same generated stream into a temp dir.  Prints PASS/FAIL
against the target; the exit status is 0 either way (a benchmark, not a test).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.benchlib import (
    MiB,
    PluginServer,
    RssSampler,
    Workspace,
    big_file_layer,
    gnu_tar_extract,
    log,
    new_layer_id,
    print_table,
)

TARGET_MIB = 150


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="size of the big file")
    parser.add_argument("--fs", choices=["loop", "tmpfs", "dir"], default="loop",
                        help="filesystem under the layers (default: an ext4 loop fs)")
    args = parser.parse_args()
    size = args.size_mib * MiB
    total_mb = (size + 16 * 1024) / 1e6

    with Workspace(args.fs, size_gib=max(4, 3 * args.size_mib // 1024 + 2)) as ws:
        log(f"workspace {ws.base} ({args.fs})")
        elapsed_tar, tar_peak = gnu_tar_extract(big_file_layer(size), ws.fs / "gnutar",
                                                sample=True)
        ws.drop_caches_and_sync()
        server = PluginServer(ws)
        try:
            client = server.start()
            layer = new_layer_id()
            client.create(layer)
            started = time.perf_counter()
            with RssSampler(server.pid) as sampler:
                applied = client.apply_diff(layer, "", big_file_layer(size))
            elapsed = time.perf_counter() - started
            client.close()
        finally:
            server.stop()

    peak = sampler.peak
    worst = max(peak.main_hwm_mib, peak.total_mib)
    rows = [
        ["strata ApplyDiff", f"{total_mb / elapsed:.0f}", f"{elapsed:.2f}",
         f"{peak.main_hwm_mib:.0f}", f"{peak.child_mib:.0f}", f"{peak.total_mib:.0f}"],
        ["GNU tar -x", f"{total_mb / elapsed_tar:.0f}", f"{elapsed_tar:.2f}", "-",
         f"{tar_peak.child_mib:.0f}" if tar_peak.child_mib else "-",
         f"{tar_peak.total_mib:.0f}"],
    ]
    print_table(f"ApplyDiff of a {args.size_mib} MiB layer ({args.fs}); applied Size={applied}",
                ["", "MB/s", "s", "plugin VmHWM MiB", "worker peak MiB", "tree peak MiB"], rows)
    print(f"\nthroughput ratio strata/GNU tar: {elapsed_tar / elapsed:.2f}x")
    verdict = "PASS" if worst < TARGET_MIB else "FAIL"
    print(f"peak RSS {worst:.0f} MiB (plugin + archive workers) vs target {TARGET_MIB} MiB: "
          f"{verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
