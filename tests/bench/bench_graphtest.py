"""Issue 14: moby's graphtest benchmarks, strata through dockerd's plugin proxy vs in-tree overlay2.

    python tests/bench/bench_graphtest.py [--rounds 5] [--n 20] [--backend overlay]
                                          [--bench DiffBase,DiffSmallUpper,...]

One Go binary (``graphbench/main.go``, built here from Debian's
golang-github-docker-docker-dev sources) runs ``graphbench_unix.go``'s benchmarks
either on dockerd's in-tree overlay2 or on the strata plugin through the same
``graphdriver`` plugin proxy and ``pkg/plugins`` HTTP client dockerd uses.  Both
put their layers on the same ext4 loop filesystem.  Runs alternate (overlay2,
strata, strata, overlay2, ...) so both share the machine's drift; the table
gives each side's median ns/op, the ratio of the medians, every round's ratio,
and the load average before and after.  Nothing is asserted; exit status 0.

Building needs ``go`` and the Debian package's sources; without them the reason
is printed and nothing runs.  The package lacks three of graphtest's imports;
``graphbench/shim/`` holds stand-ins (no quota support, which overlay2 probes and
does without; ``plugin/v2``'s type, for a type switch that never matches a v1
plugin) and ``gotest.tools/v3`` is Debian's ``gotest.tools``, which is v3.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.benchlib import PluginServer, Workspace, log, print_table

HERE = Path(__file__).resolve().parent / "graphbench"
GOCODE = Path("/usr/share/gocode/src")
SHIMS = {"github.com/docker/docker/quota": "quota.go",
         "github.com/docker/docker/plugin/v2": "v2plugin.go"}
#: Issue 14's bar, strata / in-tree overlay2 (None: reported, no bar).
BAR = {"DiffBase": 3.0, "DiffSmallUpper": 1.3, "DiffApply100": 1.0, "Diff20Layers": 1.3,
       "Diff10KFileUpper": 0.6, "Diff10KFilesBottom": 0.6}
#: ``--floor``: floor_server.py's modes and what each one is.
FLOOR_MODULE = "tests.bench.floor_server"
FLOOR_MODES = {"loop": "no filesystem work, on the event loop",
               "pool": "no filesystem work, one hop to the worker pool (STYLE rule 8)"}
DEFAULT = "DiffBase,DiffSmallUpper,DiffApply100,Diff20Layers,Diff10KFileUpper,Diff10KFilesBottom"


def build(ws: Workspace) -> Path | None:
    """``graphbench`` in a GOPATH of Debian's sources plus the shims, or None (logged)."""
    if shutil.which("go") is None:
        log("no `go` on PATH (apt-get install golang-go): nothing to run")
        return None
    if not (GOCODE / "github.com/docker/docker/daemon/graphdriver/graphtest").is_dir():
        log(f"no moby sources under {GOCODE} (apt-get install golang-github-docker-docker-dev)")
        return None
    gopath = ws.base / "gopath"
    for package, name in SHIMS.items():
        (gopath / "src" / package).mkdir(parents=True)
        shutil.copy(HERE / "shim" / name, gopath / "src" / package / name)
    (gopath / "src/gotest.tools").mkdir(parents=True)
    (gopath / "src/gotest.tools/v3").symlink_to(GOCODE / "gotest.tools")
    out = ws.base / "graphbench"
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": f"{gopath}:{GOCODE.parent}",
           "GOCACHE": str(ws.base / "gocache"), "GOFLAGS": ""}
    res = subprocess.run(["go", "build", "-o", str(out), str(HERE / "main.go")], env=env,
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        log(f"go build of graphbench failed: {res.stderr.strip()}")
        return None
    return out


def run_once(binary: Path, ws: Workspace, driver: str, sock: str, names: str,
             n: int) -> dict[str, float]:
    """One pass of every benchmark on ``driver``: name -> ns/op."""
    tmp = ws.dir(f"tmp-{driver}")
    argv = [str(binary), "-driver", driver, "-bench", names, "-n", str(n)]
    if driver == "strata":
        argv += ["-sock", sock]
    os.sync()
    res = subprocess.run(argv, env={**os.environ, "TMPDIR": str(tmp)}, capture_output=True,
                         text=True, check=False, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"graphbench on {driver} failed: {res.stderr.strip()[-2000:]}")
    return {row["name"]: float(row["ns_per_op"]) for row in map(json.loads,
                                                                 res.stdout.splitlines())}


def report(names: list[str], runs: list[tuple[dict[str, float], dict[str, float]]],
           loads: list[str]) -> None:
    rows = []
    for name in names:
        theirs = [base[name] for base, _ in runs]
        ours = [mine[name] for _, mine in runs]
        ratio = statistics.median(ours) / statistics.median(theirs)
        bar = BAR.get(name)
        verdict = "-" if bar is None else ("meets" if ratio <= bar else "misses")
        rows.append([name, f"{statistics.median(ours) / 1e6:.2f}",
                     f"{statistics.median(theirs) / 1e6:.2f}", f"{ratio:.2f}x",
                     f"<= {bar}x {verdict}" if bar else "-",
                     " ".join(f"{o / t:.2f}" for o, t in zip(ours, theirs, strict=True))])
    print_table(f"moby graphtest through dockerd's plugin proxy, median of {len(runs)} rounds "
                "(ratio = strata / in-tree overlay2, < 1 is faster)",
                ["benchmark", "strata ms/op", "overlay2 ms/op", "ratio of medians",
                 "issue 14 bar", "every round's ratio"], rows)
    for name in names:
        print(f"{name} ms/op, every round (overlay2 / strata): " + ", ".join(
            f"{base[name] / 1e6:.2f}/{mine[name] / 1e6:.2f}" for base, mine in runs))
    print("load average (1 5 15 min): " + " | ".join(loads))


def report_floor(runs: list[tuple[dict[str, float], dict[str, float]]],
                 floor_runs: list[dict[str, float]]) -> None:
    """DiffBase against the floor servers, each ratio to overlay2's in the same round."""
    theirs = statistics.median(base["DiffBase"] for base, _ in runs)
    rows = []
    for mode, label in FLOOR_MODES.items():
        ms = [f[mode] for f in floor_runs]
        rows.append([label, f"{statistics.median(ms) / 1e6:.2f}",
                     f"{statistics.median(ms) / theirs:.2f}x",
                     " ".join(f"{f[mode] / base['DiffBase']:.2f}"
                              for f, (base, _) in zip(floor_runs, runs, strict=True))])
    ours = statistics.median(mine["DiffBase"] for _, mine in runs)
    rows.append(["strata (reads the layer, in the pool)", f"{ours / 1e6:.2f}",
                 f"{ours / theirs:.2f}x",
                 " ".join(f"{mine['DiffBase'] / base['DiffBase']:.2f}" for base, mine in runs)])
    print_table("DiffBase floor: a Diff that answers a tar made earlier (floor_server.py), "
                "ratio to in-tree overlay2 in the same rounds",
                ["server", "ms/op", "ratio of medians", "every round's ratio"], rows)


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n", type=int, default=20, help="iterations per benchmark and run")
    parser.add_argument("--backend", default="overlay", help="strata's backend")
    parser.add_argument("--bench", default=DEFAULT)
    parser.add_argument("--floor", action="store_true",
                        help="also DiffBase on floor_server.py (a Diff with no filesystem "
                             "work, with and without the worker-pool hop) in the same rounds")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (overlay mounts)", file=sys.stderr)
        return 0
    names = args.bench.split(",")
    started = time.monotonic()
    loads = [f"start {loadavg()}"]
    with Workspace("loop", size_gib=8) as ws:
        binary = build(ws)
        if binary is None:
            return 0
        server = PluginServer(ws, backend=args.backend)
        floors = {mode: PluginServer(ws, backend=args.backend, module=FLOOR_MODULE,
                                     env={"STRATA_FLOOR": mode})
                  for mode in (FLOOR_MODES if args.floor else ())}
        runs: list[tuple[dict[str, float], dict[str, float]]] = []
        floor_runs: list[dict[str, float]] = []
        try:
            for each in (server, *floors.values()):
                each.start().close()
            for r in range(args.rounds):
                order = ("overlay2", "strata") if r % 2 == 0 else ("strata", "overlay2")
                got = {d: run_once(binary, ws, d, server.socket_path, args.bench, args.n)
                       for d in order}
                runs.append((got["overlay2"], got["strata"]))
                floor_runs.append({
                    mode: run_once(binary, ws, "strata", floor.socket_path, "DiffBase",
                                   args.n)["DiffBase"] for mode, floor in floors.items()})
                log(f"round {r + 1}: " + ", ".join(
                    f"{k} {got['strata'][k] / got['overlay2'][k]:.2f}" for k in names))
        finally:
            for each in (server, *floors.values()):
                each.stop()
    loads.append(f"end {loadavg()}")
    report(names, runs, loads)
    if floors:
        report_floor(runs, floor_runs)
    print(f"\ntotal bench time {time.monotonic() - started:.0f}s; strata backend "
          f"{args.backend}, {args.n} iterations per benchmark and run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
