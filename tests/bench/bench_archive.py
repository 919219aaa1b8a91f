"""The archive package alone (no socket): apply_layer / export_tree vs GNU tar.

    python tests/bench/bench_archive.py [--quick] [--fs loop|tmpfs|dir]

Isolates the tar path from the HTTP server, to tell the two costs apart when
``bench_protocol.py`` shows a gap; this is what the archive speed work was
measured with.  Ratios are throughput against GNU tar on the same data in the
same run; nothing is asserted.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from plugin.archive import apply_layer, export_tree
from plugin.idtools import IDMappings
from tests.bench.benchlib import (
    MiB,
    Workspace,
    big_file_layer,
    count_entries,
    file_chunks,
    gnu_tar_create,
    gnu_tar_extract,
    log,
    new_layer_id,
    print_table,
    small_files_layer,
    tree_layer,
    write_tar_file,
)

STDLIB = "/usr/lib/python3.11"


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def synced(fn: Callable[[], float]) -> float:
    os.sync()  # earlier runs' writeback must not be billed to this one
    return fn()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--fs", choices=["loop", "tmpfs", "dir"], default="loop")
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    big = (256 if args.quick else 1024) * MiB
    small = 5_000 if args.quick else 20_000
    sets: list[tuple[str, Callable[[], Iterator[bytes | memoryview]]]] = [
        (f"1 file of {big // MiB} MiB", lambda: big_file_layer(big, small=0)),
        (f"{small} small files", lambda: small_files_layer(small)),
        (f"tree {STDLIB}", lambda: tree_layer(STDLIB)),
    ]
    apply_rows, export_rows = [], []
    with Workspace(args.fs, size_gib=8) as ws:
        for i, (name, make) in enumerate(sets):
            tar_path = ws.dir("inputs") / f"{i}.tar"
            size = write_tar_file(tar_path, make())
            entries = count_entries(file_chunks(tar_path))
            mb = size / 1e6
            log(f"{name}: {mb:.0f} MB, {entries} entries")
            base = min(synced(lambda tar_path=tar_path: gnu_tar_extract(  # type: ignore[misc]
                file_chunks(tar_path), ws.fs / f"g-{new_layer_id()[:8]}")[0])
                for _ in range(args.reps))
            dests: list[Path] = []

            def apply_once(tar_path: Path = tar_path, dests: list[Path] = dests) -> float:
                dest = ws.dir(f"a-{new_layer_id()[:8]}")
                dests.append(dest)
                os.sync()
                with open(tar_path, "rb", buffering=0) as f:
                    return timed(lambda: apply_layer(str(dest), io.BufferedReader(f, MiB)))
            ours = min(apply_once() for _ in range(args.reps))
            apply_rows.append([name, f"{mb / ours:.0f}", f"{mb / base:.0f}", f"{base / ours:.2f}x"])
            os.sync()
            src = str(dests[-1])
            base_e = min(gnu_tar_create(src)[0] for _ in range(args.reps))

            def export_once(src: str = src) -> float:
                def drain() -> None:
                    with export_tree(src, IDMappings()) as stream:
                        while stream.read(MiB):
                            pass
                return timed(drain)
            ours_e = min(export_once() for _ in range(args.reps))
            export_rows.append([name, f"{mb / ours_e:.0f}", f"{mb / base_e:.0f}",
                                f"{base_e / ours_e:.2f}x"])
            tar_path.unlink()
    head = ["data", "strata MB/s", "GNU tar MB/s", "throughput ratio"]
    print_table(f"apply_layer vs tar -x ({args.fs})", head, apply_rows)
    print_table(f"export_tree vs tar -c into a pipe ({args.fs})", head, export_rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
