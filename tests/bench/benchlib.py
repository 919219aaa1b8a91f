"""Shared pieces of the strata benchmarks (``bench_*.py``; never collected by pytest).

* ``Workspace``: a unique ``/tmp/sb-<hex>/`` directory, optionally with an ext4
  loop filesystem or a tmpfs mounted on it (docs/host.md §6: the root fs is shared
  with other writers, so fs-bound numbers are taken on a loop fs); torn down by
  unmount, ``losetup -d`` of the device it attached, and ``rmtree``.
* ``PluginServer``: ``python -m plugin serve`` with a unique name and socket,
  stopped by pid.
* ``Client``: a blocking HTTP/1.1 client on the Unix socket that sends exactly
  dockerd's headers (docs/protocol.md §2.1) over one keep-alive connection, with a
  chunked ApplyDiff body in 32 KiB chunks (Go's ``io.Copy`` buffer size).
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
import socket
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

#: The tree whose plugin is measured; point STRATA_BENCH_REPO at another checkout (e.g.
#: ``git archive HEAD``) to take before/after numbers with the same benchmark code.
REPO_ROOT = Path(os.environ.get("STRATA_BENCH_REPO") or Path(__file__).resolve().parents[2])
MiB = 1 << 20
GiB = 1 << 30
#: Go's io.Copy buffer: the size of each chunk dockerd writes to the ApplyDiff body.
SEND_CHUNK = 32 << 10
HEADERS = (b"Host: \r\nUser-Agent: Go-http-client/1.1\r\n"
           b"Accept: application/vnd.docker.plugins.v1.2+json\r\n")


def new_layer_id() -> str:
    return secrets.token_hex(32)


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
                _run(["mount", "-t", "tmpfs", "-o", f"size={self.size_gib}g", "sbench", str(self.fs)])
                self._mounted = True
        except BaseException:
            self.close()
            raise
        return self

    def _mount_loop(self) -> None:
        with open(self._image, "wb") as f:
            f.truncate(self.size_gib * GiB)
        self._loop = _run(["losetup", "--find", "--show", "--direct-io=on", str(self._image)]).strip()
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
    """``python -m plugin serve --backend vfs`` on a socket inside ``ws``; Init'ed on start."""

    def __init__(self, ws: Workspace, backend: str = "vfs", log_level: str = "info") -> None:
        tag = secrets.token_hex(4)
        self.log_level = log_level
        self.name = f"sbench-{tag}"
        self.socket_path = str(ws.base / f"p-{tag}.sock")
        self.state_dir = ws.base / f"state-{tag}"
        self.home = str(ws.fs / f"home-{tag}")
        self.log_path = ws.base / f"plugin-{tag}.log"
        self.backend = backend
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> Client:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        argv = [sys.executable, "-m", "plugin", "serve", "--name", self.name,
                "--socket", self.socket_path, "--state-dir", str(self.state_dir),
                "--backend", self.backend, "--log-level", self.log_level]
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf,
                                         stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"plugin exited {self.proc.returncode}: {self.log_tail()}")
            if os.path.exists(self.socket_path):
                with contextlib.suppress(OSError):
                    client = Client(self.socket_path)
                    client.call("Plugin.Activate", None)
                    client.call("GraphDriver.Init", {"Home": self.home, "Opts": None,
                                                     "UIDMaps": None, "GIDMaps": None})
                    return client
            time.sleep(0.05)
        raise RuntimeError(f"plugin socket not ready: {self.log_tail()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # Archive workers still alive (an interrupted run) are our descendants: kill by pid.
        for pid in descendants(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc = None


# ---------------------------------------------------------------------------
# the dockerd-like client


class PluginError(RuntimeError):
    pass


class Client:
    """One keep-alive connection, dockerd's exact request shape."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(socket_path)
        self.rfile = self.sock.makefile("rb", buffering=MiB)
        # One read buffer for the connection's life: allocating 1 MiB per call cost ~11 us
        # of every small round trip, on the client's side of the measurement.
        self._view = memoryview(bytearray(MiB))

    def close(self) -> None:
        self.rfile.close()
        self.sock.close()

    # -- framing -------------------------------------------------------------
    def _read_head(self) -> tuple[int, dict[str, str]]:
        status_line = self.rfile.readline()
        if not status_line:
            raise PluginError("connection closed")
        status = int(status_line.split()[1])
        headers: dict[str, str] = {}
        while (line := self.rfile.readline()) not in (b"\r\n", b"\n", b""):
            key, _, value = line.decode("latin-1").partition(":")
            headers[key.strip().lower()] = value.strip()
        return status, headers

    def _read_body(self, headers: dict[str, str],
                   sink: Callable[[memoryview], None] | None = None) -> tuple[bytes, int]:
        """The whole body (``sink`` None) or its length after passing it to ``sink``."""
        kept = bytearray()
        total = 0
        view = self._view

        def take(n: int) -> None:
            nonlocal total
            while n:
                got = self.rfile.readinto(view[:min(n, len(view))])
                if not got:
                    raise PluginError("body cut short")
                if sink is None:
                    kept.extend(view[:got])
                else:
                    sink(view[:got])
                total += got
                n -= got

        if "content-length" in headers:
            take(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                take(size)
                self.rfile.readline()
        return bytes(kept), total

    def _request_head(self, path: str, extra: str) -> bytes:
        return f"POST /{path} HTTP/1.1\r\n".encode() + HEADERS + extra.encode() + b"\r\n"

    # -- calls -----------------------------------------------------------------
    def call(self, name: str, body: dict[str, Any] | None) -> dict[str, Any]:
        payload = b"" if body is None else json.dumps(body, separators=(",", ":")).encode() + b"\n"
        self.sock.sendall(self._request_head(name, f"Content-Length: {len(payload)}\r\n")
                          + payload)
        status, headers = self._read_head()
        data, _ = self._read_body(headers)
        reply: dict[str, Any] = json.loads(data) if data.strip() else {}
        if status != 200 or reply.get("Err"):
            raise PluginError(f"{name}: HTTP {status}: {reply.get('Err', data[:200])}")
        return reply

    def create(self, layer_id: str, parent: str = "", rw: bool = False) -> None:
        body: dict[str, Any] = {"ID": layer_id, **({"Parent": parent} if parent else {})}
        self.call("GraphDriver.CreateReadWrite" if rw else "GraphDriver.Create", body)

    def get(self, layer_id: str) -> str:
        return str(self.call("GraphDriver.Get", {"ID": layer_id})["Dir"])

    def put(self, layer_id: str) -> None:
        self.call("GraphDriver.Put", {"ID": layer_id})

    def remove(self, layer_id: str) -> None:
        self.call("GraphDriver.Remove", {"ID": layer_id})

    def changes(self, layer_id: str, parent: str) -> list[dict[str, Any]]:
        body = {"ID": layer_id, **({"Parent": parent} if parent else {})}
        return list(self.call("GraphDriver.Changes", body)["Changes"])

    def diff_size(self, layer_id: str, parent: str) -> int:
        body = {"ID": layer_id, **({"Parent": parent} if parent else {})}
        return int(self.call("GraphDriver.DiffSize", body)["Size"])

    def apply_diff(self, layer_id: str, parent: str, chunks: Iterable[bytes | memoryview]) -> int:
        head = self._request_head(f"GraphDriver.ApplyDiff?id={layer_id}&parent={parent}",
                                  "Transfer-Encoding: chunked\r\n")
        self.sock.sendall(head)
        for chunk in _rechunk(chunks, SEND_CHUNK):
            self.sock.sendmsg([b"%x\r\n" % len(chunk), chunk, b"\r\n"])
        self.sock.sendall(b"0\r\n\r\n")
        status, headers = self._read_head()
        data, _ = self._read_body(headers)
        reply = json.loads(data)
        if status != 200 or reply.get("Err"):
            raise PluginError(f"ApplyDiff: HTTP {status}: {reply.get('Err')}")
        return int(reply["Size"])

    def _start_diff(self, layer_id: str, parent: str) -> dict[str, str]:
        body = {"ID": layer_id, **({"Parent": parent} if parent else {})}
        payload = json.dumps(body, separators=(",", ":")).encode() + b"\n"
        self.sock.sendall(self._request_head("GraphDriver.Diff",
                                             f"Content-Length: {len(payload)}\r\n") + payload)
        status, headers = self._read_head()
        if status != 200:
            data, _ = self._read_body(headers)
            raise PluginError(f"Diff: HTTP {status}: {data[:200]!r}")
        return headers

    def diff(self, layer_id: str, parent: str = "") -> int:
        """Stream the Diff into nothing; return its byte count."""
        headers = self._start_diff(layer_id, parent)
        _, total = self._read_body(headers, sink=lambda _view: None)
        return total

    def diff_stream(self, layer_id: str, parent: str = "") -> Iterator[bytes]:
        """The Diff body as it arrives (to pipe it into an ApplyDiff on another Client)."""
        headers = self._start_diff(layer_id, parent)
        yield from self._body_chunks(headers)

    def _body_chunks(self, headers: dict[str, str]) -> Iterator[bytes]:
        def chunks_of(n: int) -> Iterator[bytes]:
            while n:
                data = self.rfile.read1(min(n, MiB))  # type: ignore[attr-defined]
                if not data:
                    raise PluginError("body cut short")
                n -= len(data)
                yield data

        if "content-length" in headers:
            yield from chunks_of(int(headers["content-length"]))
            return
        while True:
            size = int(self.rfile.readline().split(b";")[0], 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return
            yield from chunks_of(size)
            self.rfile.readline()


def _rechunk(chunks: Iterable[bytes | memoryview], size: int) -> Iterator[memoryview]:
    for chunk in chunks:
        view = memoryview(chunk)
        for i in range(0, len(view), size):
            yield view[i:i + size]


# ---------------------------------------------------------------------------
# RSS of a process tree


def _ppid_map() -> dict[int, int]:
    out: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                out[int(entry.name)] = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return out


def descendants(root: int) -> list[int]:
    ppid = _ppid_map()
    found: list[int] = []
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        kids = [pid for pid, pp in ppid.items() if pp == parent]
        found.extend(kids)
        frontier.extend(kids)
    return found


def status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(key.encode() + b":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


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
sys.path.insert(0, os.environ["BENCHLIB_DIR"])
from benchlib import descendants, status_kib
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
        env = dict(os.environ, BENCHLIB_DIR=str(Path(__file__).resolve().parent))
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
            tar.members.clear()
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
            tar.members.clear()
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
        for chunk in _rechunk(chunks, SEND_CHUNK):
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
