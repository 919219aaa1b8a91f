"""strata against dockerd's in-tree driver, end to end: overlay vs overlay2, vfs vs vfs.

    python tests/bench/bench_overlay_engine.py [--backend overlay|vfs] [--reps 5] [--rounds 1]
                                               [--load-mib 200]

Starts, in one run, a dockerd on strata (the overlay backend, or vfs, in a
plugin process) and a dockerd on the matching in-tree driver (overlay2, or
vfs) (tests/engine/harness.py: private data roots, everything torn down by
pid), imports the same images into both, and times what users feel:

* ``docker run --rm IMG /bin/true``   (create + init layer + mount + start + rm)
* ``docker commit`` of a container with 100 small files and 8 MiB written
* ``docker diff`` of a container over 12,000 image files with 50 changes
* ``docker load`` of a ~200 MB image, and ``docker save`` of it
* issue 14's small rows (``--small-only``: just these): ``docker commit`` of a
  container that wrote 3 small files, a 30-step legacy build of small steps
* a 20-step legacy build (``DOCKER_BUILDKIT=0 docker build --no-cache``): 18
  RUN steps writing a few files and 2 COPY steps, each a layer, FROM the
  imported base image (no registry)

Each row prints the median seconds on both, the ratio strata/in-tree (< 1
means strata is faster; with ``--rounds N`` the row runs N times, alternating
which engine goes first, and the medians of the rounds' medians are compared,
every round's ratio beside them) and the plugin's peak RSS (its process and its archive
workers, sampled every 0.1 s from another process) over one more, untimed
pass of that row's commands.  Below the table, the driver calls of the median
timed command are summed per operation beside its wall clock: on strata every call
(the plugin logs one line per call with its duration), on overlay2 the
ApplyDiffs (dockerd's debug log brackets them).  Timings on a shared VM are
noisy; nothing is asserted and the exit status is 0.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tarfile
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


from tests.bench.benchlib import RssSampler
from tests.engine import harness
from tests.engine.rootfs import build_rootfs_tar

Engine = harness.Stack | harness.Dockerd
RUN = ("run", "--rm", "--network", "none")
MANY_FILES = 12_000
BUILD_STEPS = 20
SMALL_BUILD_STEPS = 30
KEY_JSON = Path("/etc/docker/key.json")  # dockerd 20.10 creates it if missing


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


class CallTally:
    """The driver calls made during timed commands, summed per operation.

    On strata, from the plugin log's one line per call
    (``strata.server: GraphDriver.Create <id> 3.5ms ok``).  overlay2 runs inside
    dockerd and logs no call times; its ApplyDiff is the span from the driver's
    ``Applying tar in <dir>`` debug line to the layer store's ``Applied tar``."""

    PLUGIN_LINE = re.compile(r" strata\.server: GraphDriver\.(\w+) \S+ ([\d.]+)ms ok$")
    DOCKERD_LINE = re.compile(r'^time="([^"]+)" level=debug msg="(Applying|Applied) tar ')

    def __init__(self, log_path: Path, in_plugin: bool) -> None:
        self.log_path = log_path
        self.in_plugin = in_plugin
        #: per timed command: its wall clock (ms) and its calls' durations by op
        self.commands: list[tuple[float, defaultdict[str, list[float]]]] = []

    def offset(self) -> int:
        return self.log_path.stat().st_size

    def add(self, since: int, wall_seconds: float) -> None:
        with open(self.log_path, "rb") as f:
            f.seek(since)
            text = f.read().decode("utf-8", "replace")
        calls = self._plugin_calls(text) if self.in_plugin else self._overlay2_applies(text)
        by_op: defaultdict[str, list[float]] = defaultdict(list)
        for op, ms in calls:
            by_op[op].append(ms)
        self.commands.append((wall_seconds * 1000, by_op))

    def _plugin_calls(self, text: str) -> list[tuple[str, float]]:
        found = (self.PLUGIN_LINE.search(line) for line in text.splitlines())
        return [(m[1], float(m[2])) for m in found if m]

    def _overlay2_applies(self, text: str) -> list[tuple[str, float]]:
        calls, started = [], None
        for m in filter(None, (self.DOCKERD_LINE.match(line) for line in text.splitlines())):
            at = datetime.fromisoformat(m[1])
            if m[2] == "Applying":
                started = at
            elif started is not None:
                calls.append(("ApplyDiff", (at - started).total_seconds() * 1000))
                started = None
        return calls

    def summary(self) -> str:
        """The median command (by wall clock): its wall clock, the time in driver
        calls, and the calls by op.  (A mean would be one outlier's: the first
        unmount after a big write syncs the whole backing filesystem.)"""
        if not self.commands:
            return "not measured"
        wall, by_op = sorted(self.commands, key=lambda c: c[0])[(len(self.commands) - 1) // 2]
        ops = sorted(by_op, key=lambda op: -sum(by_op[op]))
        listed = ", ".join(f"{op} {len(by_op[op])}x {sum(by_op[op]):.1f}" for op in ops)
        in_calls = sum(sum(times) for times in by_op.values())
        return f"wall {wall:.0f} ms, in driver calls {in_calls:.0f} ms: {listed or 'none logged'}"


def median_seconds(reps: int, action: Callable[[], object],
                   before: Callable[[], object] | None = None,
                   tally: CallTally | None = None) -> float:
    times = []
    for _ in range(reps):
        if before is not None:
            before()
        since = tally.offset() if tally is not None else 0
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
        if tally is not None:
            tally.add(since, times[-1])
    if reps > 1:
        log("every run (s): " + " ".join(f"{t:.3f}" for t in times))
    return statistics.median(times)


def extended_rootfs(base_tar: Path, out: Path, extra: Callable[[tarfile.TarFile], None]) -> Path:
    """The engine tests' rootfs tar plus entries added by ``extra``."""
    with tarfile.open(base_tar) as src, tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as dst:
        for member in src:
            dst.addfile(member, src.extractfile(member) if member.isreg() else None)
        extra(dst)
    return out


def add_many_files(tf: tarfile.TarFile) -> None:
    import io
    for d in range(MANY_FILES // 100):
        info = tarfile.TarInfo(f"data/d{d}")
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        tf.addfile(info)
        for f in range(100):
            body = f"file {d}/{f}\n".encode()
            info = tarfile.TarInfo(f"data/d{d}/f{f}")
            info.size, info.mode = len(body), 0o644
            tf.addfile(info, io.BytesIO(body))


def add_big_files(total_mib: int) -> Callable[[tarfile.TarFile], None]:
    def add(tf: tarfile.TarFile) -> None:
        chunk = 8 << 20
        for n in range(max(1, total_mib // 8)):
            info = tarfile.TarInfo(f"big/blob{n}")
            info.size, info.mode = chunk, 0o644
            tf.addfile(info, _RandomReader(chunk))
    return add


class _RandomReader:
    def __init__(self, size: int) -> None:
        self.left = size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return os.urandom(n)


FIFTY_CHANGES = (
    "for i in $(seq 0 29); do echo changed >> /data/d$i/f1; done; "
    "for i in $(seq 0 9); do echo new > /data/d$i/added; done; "
    "for i in $(seq 30 39); do rm /data/d$i/f2; done"
)


def build_context(directory: Path, build_steps: int = BUILD_STEPS) -> Path:
    """A Dockerfile FROM bench/base:1 whose ``build_steps`` steps each make a
    layer: RUN steps writing a few small files, and two COPY steps."""
    directory.mkdir()
    (directory / "one.txt").write_text("copied one\n")
    (directory / "two").mkdir()
    for n in range(5):
        (directory / "two" / f"f{n}").write_text(f"copied two/{n}\n" * 20)
    copies = ["COPY one.txt /built/one.txt\n", "COPY two /built/two/\n"]
    steps = [f"RUN mkdir -p /built/s{n} && for i in 1 2 3; do echo step {n} file $i"
             f" > /built/s{n}/f$i; done\n" for n in range(build_steps - len(copies))]
    middle = len(steps) // 2
    steps[middle:middle] = copies[:1]
    steps.append(copies[1])
    (directory / "Dockerfile").write_text("FROM bench/base:1\n" + "".join(steps))
    return directory


Measure = Callable[[Engine, CallTally | None], float]


def bench_pair(engines: dict[str, Engine], intree: str, reps: int, load_tar: Path,
               context: Path, small: Path, small_only: bool,
               rounds: int = 1) -> tuple[list[list[str]], list[tuple[str, CallTally]]]:
    rows = []
    tallies: list[tuple[str, CallTally]] = []
    plan = {"reps": reps}  # what the measures below repeat; 1 in the RSS pass

    def row(name: str, measure: Measure) -> None:
        results: dict[str, list[float]] = {label: [] for label in engines}
        peak = "-"
        labels = list(engines)
        # Rounds alternate which engine goes first, so both share the machine's drift.
        passes = [label for r in range(rounds)
                  for label in (labels if r % 2 == 0 else labels[::-1])]
        for n, label in enumerate(passes):
            engine = engines[label]
            log(f"{name} on {label}")
            if isinstance(engine, harness.Stack) and engine.plugin is not None:
                tally = CallTally(engine.plugin.log_path, in_plugin=True)
            else:
                tally = CallTally(engine.dockerd.log_path if isinstance(engine, harness.Stack)
                                  else engine.log_path, in_plugin=False)
            # Neither engine pays for the other's (or the set-up's) dirty pages: an
            # overlay unmount syncs the backing filesystem, a Put can take 0.5 s.
            os.sync()
            results[label].append(measure(engine, tally))
            if n < len(labels):
                tallies.append((f"{name} on {label}", tally))
            plugin = engine.plugin if isinstance(engine, harness.Stack) else None
            if plugin is not None and plugin.proc is not None and peak == "-":
                # The peak RSS comes from one more, untimed pass: the sampler walks
                # /proc every 0.1 s, CPU that the timed commands must not share.
                plan["reps"] = 1
                os.sync()
                with RssSampler(plugin.proc.pid, interval=0.1) as sampler:
                    measure(engine, None)
                plan["reps"] = reps
                peak = f"{max(sampler.peak.total_mib, sampler.peak.main_hwm_mib):.0f}"
        ours, theirs = (statistics.median(results[k]) for k in ("strata", intree))
        ratio = ours / theirs if theirs else float("nan")
        each = " ".join(f"{a / b:.2f}" for a, b in zip(results["strata"], results[intree],
                                                       strict=True))
        rows.append([name, f"{ours:.3f}", f"{theirs:.3f}", f"{ratio:.2f}", peak, each])

    def commit_small(engine: Engine, tally: CallTally | None) -> float:
        """Issue 14: ``docker commit`` of a container that wrote three small files."""
        counter = iter(range(1000))
        state: dict[str, int] = {}

        def prepare() -> None:
            state["n"] = n = next(counter)
            engine.docker("run", "--network", "none", "--name", f"cs{n}", "bench/base:1",
                          "/bin/sh", "-c", "for i in 1 2 3; do echo $i > /f$i; done")

        result = median_seconds(plan["reps"], lambda: engine.docker(
            "commit", f"cs{state['n']}", f"bench/csmall:{state['n']}"), prepare, tally)
        for n in range(state["n"] + 1):
            engine.docker("rm", "-f", f"cs{n}", check=False)
            engine.docker("rmi", f"bench/csmall:{n}", check=False)
        return result

    def build_small(engine: Engine, tally: CallTally | None) -> float:
        """Issue 14: a legacy build of ``SMALL_BUILD_STEPS`` small steps."""
        def clear() -> None:
            engine.docker("rmi", "bench/bsmall:1", check=False)

        result = median_seconds(plan["reps"], lambda: engine.docker(
            "build", "--no-cache", "--network", "none", "-t", "bench/bsmall:1", str(small),
            env={"DOCKER_BUILDKIT": "0"}, timeout=900), clear, tally)
        clear()
        return result

    row("docker commit (3 small files)", commit_small)
    row(f"legacy build ({SMALL_BUILD_STEPS} small steps)", build_small)
    if small_only:
        return rows, tallies

    row("docker run --rm /bin/true", lambda e, tally: median_seconds(
        plan["reps"], lambda: e.docker(*RUN, "bench/base:1", "/bin/true"), tally=tally))

    def commit(engine: Engine, tally: CallTally | None) -> float:
        counter = iter(range(1000))

        def prepare() -> None:
            n = next(counter)
            engine.docker("run", "--network", "none", "--name", f"cm{n}", "bench/base:1",
                          "/bin/sh", "-c", "mkdir /w; for i in $(seq 100); do echo $i > /w/$i;"
                          " done; dd if=/dev/urandom of=/w/blob bs=1M count=8 2>/dev/null")
            state["n"] = n

        state: dict[str, int] = {}
        result = median_seconds(plan["reps"], lambda: engine.docker(
            "commit", f"cm{state['n']}", f"bench/commit:{state['n']}"), prepare, tally)
        for n in range(state["n"] + 1):
            engine.docker("rm", "-f", f"cm{n}", check=False)
            engine.docker("rmi", f"bench/commit:{n}", check=False)
        return result

    row("docker commit (100 files + 8 MiB)", commit)

    def diff(engine: Engine, tally: CallTally | None) -> float:
        engine.docker("run", "-d", "--network", "none", "--name", "difftarget",
                      "bench/many:1", "/bin/sleep", "600")
        try:
            engine.docker("exec", "difftarget", "/bin/sh", "-c", FIFTY_CHANGES)
            lines = engine.docker("diff", "difftarget").stdout.splitlines()
            assert len([ln for ln in lines if not ln.endswith("/data")
                        and ln.count("/") == 3]) == 50, lines
            return median_seconds(plan["reps"], lambda: engine.docker("diff", "difftarget"),
                                  tally=tally)
        finally:
            engine.docker("rm", "-f", "difftarget", check=False)

    row(f"docker diff ({MANY_FILES} files, 50 changes)", diff)

    def load(engine: Engine, tally: CallTally | None) -> float:
        return median_seconds(
            max(2, plan["reps"] // 2),
            lambda: engine.docker("load", "-i", str(load_tar), timeout=900),
            lambda: engine.docker("rmi", "bench/big:1", check=False), tally)

    size_mb = load_tar.stat().st_size / 1e6
    row(f"docker load ({size_mb:.0f} MB image)", load)

    def save(engine: Engine, tally: CallTally | None) -> float:
        out = load_tar.with_name("saved.tar")
        try:
            return median_seconds(
                max(2, plan["reps"] // 2),
                lambda: engine.docker("save", "-o", str(out), "bench/big:1", timeout=900),
                lambda: out.unlink(missing_ok=True), tally)
        finally:
            out.unlink(missing_ok=True)

    row(f"docker save ({size_mb:.0f} MB image)", save)

    def build(engine: Engine, tally: CallTally | None) -> float:
        def clear() -> None:
            engine.docker("rmi", "bench/build:1", check=False)

        result = median_seconds(plan["reps"], lambda: engine.docker(
            "build", "--no-cache", "--network", "none", "-t", "bench/build:1", str(context),
            env={"DOCKER_BUILDKIT": "0"}, timeout=900), clear, tally)
        layers = engine.docker("image", "inspect", "-f", "{{len .RootFS.Layers}}",
                               "bench/build:1").stdout
        assert int(layers) == BUILD_STEPS + 1, layers
        clear()
        return result

    row(f"legacy build ({BUILD_STEPS} steps)", build)
    return rows, tallies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["overlay", "vfs"], default="overlay",
                        help="strata's backend; the in-tree driver is overlay2 or vfs")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--load-mib", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds of every row, alternating which engine goes first")
    parser.add_argument("--small-only", action="store_true",
                        help="only issue 14's rows: a 3-file commit and a 30-step build")
    args = parser.parse_args()
    dockerd_bin = harness.find_dockerd()
    if os.geteuid() != 0 or dockerd_bin is None:
        print("needs root and dockerd", file=sys.stderr)
        return 0
    intree = "overlay2" if args.backend == "overlay" else "vfs"
    workdir = harness.new_workdir("sb")
    engines: dict[str, Engine] = {}
    key_json_existed = KEY_JSON.exists()
    try:
        rootfs = build_rootfs_tar(workdir)
        many = extended_rootfs(rootfs.tar, workdir / "many.tar", add_many_files)
        big = extended_rootfs(rootfs.tar, workdir / "big.tar", add_big_files(args.load_mib))
        engines["strata"] = harness.start_stack(dockerd_bin, args.backend)
        engines[intree] = harness.start_intree(dockerd_bin, intree)
        for engine in engines.values():
            engine.docker("import", str(rootfs.tar), "bench/base:1")
            engine.docker("import", str(many), "bench/many:1", timeout=600)
        reference = engines[intree]
        reference.docker("import", str(big), "bench/big:1", timeout=600)
        load_tar = workdir / "big-image.tar"
        reference.docker("save", "-o", str(load_tar), "bench/big:1", timeout=600)
        big.unlink()
        status = engines["strata"].docker("info", "--format", "{{json .DriverStatus}}").stdout
        rows, tallies = bench_pair(engines, intree, args.reps, load_tar,
                                   build_context(workdir / "build-context"),
                                   build_context(workdir / "small-build", SMALL_BUILD_STEPS),
                                   args.small_only, args.rounds)
    finally:
        for engine in engines.values():
            engine.close()
        if workdir.exists():
            harness.remove_workdir(workdir)
        if not key_json_existed:
            KEY_JSON.unlink(missing_ok=True)
    print(f"strata {args.backend} status: {status.strip()}")
    print("load average at the end (1 5 15 min): "
          + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(f"median of {args.reps} runs (load, save: {max(2, args.reps // 2)}) per round, "
          f"median of {args.rounds} round(s); ratio = strata / {intree}, < 1 means strata "
          "is faster")
    head = ["", "strata s", f"{intree} s", "ratio", "plugin peak RSS MiB", "every round's ratio"]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)))
    print(f"driver calls of the median timed command (op count x total ms; {intree}: ApplyDiff"
          " only):")
    for name, tally in tallies:
        print(f"  {name}: {tally.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
