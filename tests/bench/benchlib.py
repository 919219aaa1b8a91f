"""Shared pieces of the strata benchmarks (``bench_*.py``; never collected by pytest).

* ``Workspace``: a unique ``/tmp/sb-<hex>/`` directory, optionally with an ext4
  loop filesystem or a tmpfs mounted on it (docs/host.md §6: the root fs is shared
  with other writers, so fs-bound numbers are taken on a loop fs); torn down by
  unmount, ``losetup -d`` of the device it attached, and ``rmtree``.
* ``PluginServer``: ``python -m plugin serve`` with a unique name and socket,
  stopped by pid (``tests.support.plugin.Plugin``), Init'ed on a Home in the workspace.
* ``BlockingClient`` (from ``tests.support.client``): a blocking HTTP/1.1 client on
  the Unix socket that sends exactly dockerd's headers (docs/protocol.md §2.1) over one
  keep-alive connection, with a chunked ApplyDiff body in 32 KiB chunks (Go's
  ``io.Copy`` buffer size).
* ``RssSampler``: peak RSS of a process *and its descendants* (the archive
  workers), from ``/proc/PID/status``; this kernel has no
  ``/proc/PID/task/TID/children``, so descendants are found by scanning ``/proc``.
* layer generators that stream a tar without holding it in memory, and GNU tar
  baselines fed or drained the same way.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

#: This checkout: where ``tests.support`` (the plugin launcher, the clients) comes from.
TESTS_ROOT = Path(__file__).resolve().parents[2]
if str(TESTS_ROOT) not in sys.path:
    sys.path.insert(0, str(TESTS_ROOT))

from tests.support.client import (  # noqa: E402
    SEND_CHUNK,
    BlockingClient,
    PluginError,
    rechunk,
)
from tests.support.files import new_layer_id  # noqa: E402
from tests.support.plugin import Plugin, init_body  # noqa: E402
from tests.support.procs import descendants, status_kib  # noqa: E402

__all__ = ["BlockingClient", "PluginError", "descendants", "new_layer_id", "status_kib"]

#: The tree whose plugin is measured; point STRATA_BENCH_REPO at another checkout (e.g.
#: ``git archive HEAD``) to take before/after numbers with the same benchmark code.
REPO_ROOT = Path(os.environ.get("STRATA_BENCH_REPO") or TESTS_ROOT)
MiB = 1 << 20
GiB = 1 << 30


def log(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# workspace: temp dir, optionally a loop ext4 or a tmpfs mounted on it


class Workspace:
    """``/tmp/sb-<hex>/`` with ``fs/`` on the chosen filesystem ("loop", "tmpfs", "dir")."""

    def __init__(self, fs: str = "loop", size_gib: int = 8) -> None:
        self.base = Path("/tmp") / f"sb-{secrets.token_hex(4)}"
        self.fs_kind = fs
        self.size_gib = size_gib
        self.fs = self.base / "fs"
        self._mounted = False
        self._loop: str | None = None
        self._image = self.base / "ext4.img"

    def __enter__(self) -> Self:
        self.base.mkdir(mode=0o700)
        self.fs.mkdir()
        try:
            if self.fs_kind == "loop":
                self._mount_loop()
            elif self.fs_kind == "tmpfs":
                _run(["mount", "-t", "tmpfs", "-o", f"size={self.size_gib}g", "sbench",
                      str(self.fs)])
                self._mounted = True
        except BaseException:
            self.close()
            raise
        return self

    def _mount_loop(self) -> None:
        with open(self._image, "wb") as f:
            f.truncate(self.size_gib * GiB)
        self._loop = _run(["losetup", "--find", "--show", "--direct-io=on",
                           str(self._image)]).strip()
        _run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1", self._loop])
        _run(["mount", "-t", "ext4", self._loop, str(self.fs)])
        self._mounted = True

    def dir(self, name: str) -> Path:
        path = self.fs / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def drop_caches_and_sync(self) -> None:
        """Push dirty pages out so one scenario's writeback does not bill the next."""
        os.sync()

    def close(self) -> None:
        if self._mounted:
            res = subprocess.run(["umount", str(self.fs)], capture_output=True, check=False)
            if res.returncode != 0:
                subprocess.run(["umount", "-l", str(self.fs)], capture_output=True, check=False)
            self._mounted = False
        if self._loop:
            subprocess.run(["losetup", "-d", self._loop], capture_output=True, check=False)
            self._loop = None
        shutil.rmtree(self.base, ignore_errors=True)

    def __exit__(self, *exc: object) -> None:
        self.close()


def _run(argv: list[str]) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {res.stderr.strip()}")
    return res.stdout


# ---------------------------------------------------------------------------
# the plugin process


class PluginServer:
    """``python -m plugin serve --backend vfs`` on a socket inside ``ws``; Init'ed on start.

    The process is ``tests.support.plugin.Plugin`` running the plugin of ``REPO_ROOT``."""

    def __init__(self, ws: Workspace, backend: str = "vfs", log_level: str = "info",
                 metrics: bool = False, module: str = "plugin",
                 env: dict[str, str] | None = None) -> None:
        tag = secrets.token_hex(4)
        self.home = str(ws.fs / f"home-{tag}")
        self.plugin = Plugin(name=f"sbench-{tag}", backend=backend,
                             state_dir=ws.base / f"state-{tag}",
                             log_path=ws.base / f"plugin-{tag}.log",
                             socket=ws.base / f"p-{tag}.sock", log_level=log_level,
                             repo_root=REPO_ROOT, module=module, extra_env=dict(env or {}))
        if metrics:  # counted per call, as with --metrics-socket in production
            self.plugin.extra_env["STRATA_METRICS_SOCKET"] = str(ws.base / f"m-{tag}.sock")

    @property
    def socket_path(self) -> str:
        return str(self.plugin.socket_path)

    @property
    def pid(self) -> int:
        return self.plugin.pid

    def start(self, timeout: float = 30.0) -> BlockingClient:
        self.plugin.start(timeout)
        client = BlockingClient(self.socket_path)
        client.call("Plugin.Activate", None)
        client.call("GraphDriver.Init", init_body(self.home))
        return client

    def stop(self) -> None:
        if self.plugin.proc is None:
            return
        pid = self.plugin.pid
        try:
            self.plugin.stop(timeout=10)
        finally:
            # Archive workers still alive (an interrupted run) are our descendants: kill by pid.
            for child in descendants(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)


# ---------------------------------------------------------------------------
# RSS of a process tree


@dataclass
class RssPeak:
    main_hwm_mib: float = 0.0      # VmHWM of the root process over the window
    child_mib: float = 0.0         # largest single descendant (sampled VmHWM)
    total_mib: float = 0.0         # largest sampled sum of VmRSS over the tree

    def __str__(self) -> str:
        return (f"plugin {self.main_hwm_mib:.0f} MiB, worker {self.child_mib:.0f} MiB, "
                f"tree {self.total_mib:.0f} MiB")


#: The sampling loop, run in a process of its own: in the benchmark's process it
#: took the GIL (a /proc walk is ~1.5 ms) from the client thread feeding the
#: plugin, so sampled runs of strata were slower than the unsampled baselines.
_SAMPLER = r"""
import json, os, select, sys
sys.path.insert(0, os.environ["STRATA_TESTS_ROOT"])
from tests.support.procs import descendants, status_kib
pid, interval = int(sys.argv[1]), float(sys.argv[2])
child = total = 0.0
def sample():
    global child, total
    size = status_kib(pid, "VmRSS")
    for kid in descendants(pid):
        size += status_kib(kid, "VmRSS")
        child = max(child, status_kib(kid, "VmHWM") / 1024)
    total = max(total, size / 1024)
print("ready", flush=True)
while True:
    done = select.select([sys.stdin], [], [], interval)[0]
    sample()
    if done:
        break
print(json.dumps({"child": child, "total": total}), flush=True)
"""


@dataclass
class RssSampler:
    """Sample ``pid`` and its descendants every ``interval`` seconds while active,
    from a separate process (see ``_SAMPLER``)."""

    pid: int
    interval: float = 0.02
    peak: RssPeak = field(default_factory=RssPeak)
    _proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> Self:
        # Writing 5 to clear_refs resets VmHWM, so the window's own peak is measured.
        with contextlib.suppress(OSError), open(f"/proc/{self.pid}/clear_refs", "w") as f:
            f.write("5")
        env = dict(os.environ, STRATA_TESTS_ROOT=str(TESTS_ROOT))
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _SAMPLER, str(self.pid), str(self.interval)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        assert self._proc.stdout is not None
        self._proc.stdout.readline()  # "ready": sampling has started
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            out, _ = self._proc.communicate("", timeout=60)  # stdin closed: last sample
            found = json.loads(out.strip().splitlines()[-1])
            self.peak.child_mib = found["child"]
            self.peak.total_mib = found["total"]
            self._proc = None
        self.peak.main_hwm_mib = status_kib(self.pid, "VmHWM") / 1024


# ---------------------------------------------------------------------------
# layer tars, generated as streams


def _header(name: str, *, size: int = 0, kind: bytes = tarfile.REGTYPE, mode: int = 0o644,
            mtime: int = 1_700_000_000, linkname: str = "") -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.mode, info.mtime, info.linkname = size, kind, mode, mtime, linkname
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _pad(size: int) -> bytes:
    return b"\0" * (-size % tarfile.BLOCKSIZE)


_PATTERN = os.urandom(MiB)


def big_file_layer(size: int = GiB, small: int = 16) -> Iterator[bytes | memoryview]:
    """``big/blob`` of ``size`` random-looking bytes plus ``small`` little files."""
    yield _header("big/", kind=tarfile.DIRTYPE, mode=0o755)
    yield _header("big/blob", size=size)
    view = memoryview(_PATTERN)
    left = size
    while left:
        n = min(left, len(view))
        yield view[:n]
        left -= n
    yield _pad(size)
    yield _header("etc/", kind=tarfile.DIRTYPE, mode=0o755)
    for i in range(small):
        data = b"small file %d\n" % i
        yield _header(f"etc/f{i}", size=len(data)) + data + _pad(len(data))
    yield b"\0" * 1024


def small_files_layer(count: int = 20_000, per_dir: int = 100,
                      size: int = 200) -> Iterator[bytes]:
    """``count`` files of ``size`` bytes, ``per_dir`` to a directory (graphtest's shape)."""
    data = _PATTERN[:size]
    body = data + _pad(size)
    batch: list[bytes] = []
    for i in range(count):
        if i % per_dir == 0:
            batch.append(_header(f"directory-{i}/", kind=tarfile.DIRTYPE, mode=0o755))
        batch.append(_header(f"directory-{i - i % per_dir}/file-{i}", size=size) + body)
        if len(batch) >= 256:
            yield b"".join(batch)
            batch.clear()
    batch.append(b"\0" * 1024)
    yield b"".join(batch)


def tree_layer(root: str) -> Iterator[bytes]:
    """A docker-style layer tar of an existing tree (ustar, PAX only where needed)."""
    yield from _stream_tar(root)


def _stream_tar(root: str) -> Iterator[bytes]:
    class _Sink(io.RawIOBase):
        def __init__(self) -> None:
            self.parts: list[bytes] = []

        def writable(self) -> bool:
            return True

        def write(self, b: Any) -> int:
            self.parts.append(bytes(b))
            return len(b)

    sink = _Sink()
    tar = tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT)  # noqa: SIM115
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames) + sorted(filenames):
            path = os.path.join(dirpath, name)
            arc = os.path.relpath(path, root)
            info = tar.gettarinfo(path, arc)
            if info.isreg():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
            tar.members.clear()  # type: ignore[attr-defined]  # tarfile keeps every member
            if sum(map(len, sink.parts)) >= MiB:
                yield b"".join(sink.parts)
                sink.parts.clear()
    tar.close()
    yield b"".join(sink.parts)


def write_tar_file(path: Path, chunks: Iterable[bytes | memoryview]) -> int:
    total = 0
    with open(path, "wb") as f:
        for chunk in chunks:
            total += f.write(chunk)
    return total


def file_chunks(path: Path, size: int = MiB) -> Iterator[bytes]:
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(size):
            yield chunk


def count_entries(chunks: Iterable[bytes | memoryview]) -> int:
    """Entries in a tar stream (for files/s)."""
    with tarfile.open(fileobj=_IterReader(chunks), mode="r|") as tar:
        n = 0
        for _ in tar:
            n += 1
            tar.members.clear()  # type: ignore[attr-defined]  # (not in typeshed)
        return n


class _IterReader(io.RawIOBase):
    def __init__(self, chunks: Iterable[bytes | memoryview]) -> None:
        self._it = iter(chunks)
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf:
            try:
                self._buf = bytes(next(self._it))
            except StopIteration:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


# ---------------------------------------------------------------------------
# GNU tar baselines


def gnu_tar_extract(chunks: Iterable[bytes | memoryview], dest: Path,
                    sample: bool = False) -> tuple[float, RssPeak]:
    """``tar -x`` of the stream into ``dest`` (as root: owners and modes kept)."""
    dest.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    proc = subprocess.Popen(["tar", "-x", "--xattrs", "--xattrs-include=*", "-f", "-",
                             "-C", str(dest)], stdin=subprocess.PIPE)
    assert proc.stdin is not None
    sampler = RssSampler(proc.pid) if sample else None
    with sampler if sampler is not None else contextlib.nullcontext():
        for chunk in rechunk(chunks, SEND_CHUNK):
            proc.stdin.write(chunk)
        proc.stdin.close()
        rc = proc.wait()
    elapsed = time.perf_counter() - started
    if rc != 0:
        raise RuntimeError(f"tar -x exited {rc}")
    return elapsed, sampler.peak if sampler is not None else RssPeak()


def gnu_tar_create(src: str) -> tuple[float, int]:
    """``tar -c`` of ``src`` into a pipe drained by us (``-f /dev/null`` would skip reading)."""
    started = time.perf_counter()
    proc = subprocess.Popen(["tar", "-c", "--xattrs", "--numeric-owner", "-f", "-",
                             "-C", src, "."], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    total = 0
    buf = bytearray(MiB)
    while n := proc.stdout.readinto(buf):  # type: ignore[attr-defined]
        total += n
    rc = proc.wait()
    if rc != 0:
        raise RuntimeError(f"tar -c exited {rc}")
    return time.perf_counter() - started, total


# ---------------------------------------------------------------------------
# output


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p50 = statistics.median(ordered)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return p50, p99


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n## {title}\n")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    sys.stdout.flush()
