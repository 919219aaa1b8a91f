"""The two-process export (``export.py``) against the one-process writer: same bytes.

Each export runs ``worker.main(["export"])`` in a fresh interpreter, as the
zygote's children do, with the chunking knobs turned down so that a tree of a
hundred-odd entries spans many chunks: hardlinks within a chunk, across chunks
and across processes, bodies the helper hands back to the leader, a helper
pipe of one page.  Whiteout mtimes come from ``time.time()``, pinned here.
"""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from plugin.archive import export_tree
from plugin.archive.proc import stream as archive_stream
from plugin.archive.proc.export import export_to_memory
from plugin.idtools import IDMappings
from tests.unit.test_archive_util import CAP_V2, read_all

REPO = Path(__file__).resolve().parents[2]
CAP_V3 = struct.pack("<IIIIII", 0x03000001, 1 << 10, 0, 0, 0, 1000)
SINGLE = {"FORK_MIN_ENTRIES": 10 ** 9}
# Odd chunk sizes, short and long look-ahead, a one-page helper pipe.
_ANY_SIZE = {"HELPER_MAX_BYTES": 1 << 40}
PARALLEL = [
    {"CHUNK_ENTRIES": 1, "FORK_MIN_ENTRIES": 2, "HELPER_AHEAD": 1, **_ANY_SIZE},
    {"CHUNK_ENTRIES": 3, "FORK_MIN_ENTRIES": 6, "HELPER_PIPE_BYTES": 4096, **_ANY_SIZE},
    {"CHUNK_ENTRIES": 8, "FORK_MIN_ENTRIES": 16, "HELPER_AHEAD": 5, **_ANY_SIZE},
    {"CHUNK_ENTRIES": 32, "FORK_MIN_ENTRIES": 32, **_ANY_SIZE},
]
RUNNER = """
import json, os, sys, time
import plugin.archive.proc.export as export
from plugin.archive.proc import worker
knobs = json.loads(sys.argv[1])
failing = knobs.pop("fail_in_helper", None)
for key, value in knobs.items():
    setattr(export, key, value)
export._cpus = lambda: 2
time.time = lambda: 1_600_000_000.75
forks = []
real_fork = os.fork
def counting_fork():
    pid = real_fork()
    if pid:
        forks.append(pid)
    return pid
os.fork = counting_fork
if failing:
    leader = os.getpid()
    real_render = export._ChunkWriter.render
    def render(self, chunk):
        if os.getpid() != leader:
            raise OSError(5, failing)
        return real_render(self, chunk)
    export._ChunkWriter.render = render
code = worker.main(["export"])
sys.stderr.write(f"FORKS {len(forks)}\\n")
sys.exit(code)
"""


def _run(spec: dict[str, Any], knobs: dict[str, Any]) -> tuple[bytes, str, int]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(knobs)],
                          input=json.dumps(spec).encode() + b"\n", capture_output=True,
                          env=env, timeout=120, check=False)
    return proc.stdout, proc.stderr.decode(), proc.returncode


def _export(spec: dict[str, Any], knobs: dict[str, Any], forks: int) -> bytes:
    out, err, rc = _run(spec, knobs)
    assert rc == 0, err
    assert f"FORKS {forks}\n" in err, err
    return out


def _spec(root: Path, changes: list[list[Any]] | None = None, fmt: str = "aufs",
          idmap: IDMappings | None = None) -> dict[str, Any]:
    return {"root": str(root), "idmap": (idmap or IDMappings()).to_json(),
            "whiteout_format": fmt, "changes": changes}


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _build_tree(root: Path) -> None:
    """~150 entries of every kind; names chosen so links fall in and across chunks."""
    for d in "abc":
        for i in range(30):
            _write(root / d / f"f{i:02d}", bytes([i]) * (i * 97))
    os.link(root / "a/f01", root / "a/f01.hl")  # the next entry: same chunk
    os.link(root / "a/f02", root / "c/f02.hl")  # far away: another chunk, maybe process
    hub = _write(root / "a/hub", b"linked from every directory")
    for d in "bc":
        os.link(hub, root / d / "hub.hl")
    # A hardlinked body big enough for sendfile.
    big = _write(root / "b/big", os.urandom(300 << 10))
    os.link(big, root / "c/big.hl")
    os.link(big, root / "a/zz-big.hl")
    _write(root / "b/mid", os.urandom(100 << 10))
    with open(root / "b/sparse", "wb") as f:
        f.truncate(4 << 20)
        f.seek(1 << 20)
        f.write(b"s")
    _write(root / "empty", b"")
    os.symlink("/etc/passwd", root / "abs-link")
    os.symlink("a/f03", root / "rel-link")
    os.symlink("t" * 150, root / "long-target")
    os.mkfifo(root / "fifo")
    os.mknod(root / "null", 0o20666, os.makedev(1, 3))
    os.mknod(root / "loop0", 0o60660, os.makedev(7, 0))
    os.mknod(root / "c/whiteout", 0o20000, 0)  # overlay's form of a deletion
    os.link(root / "c/whiteout", root / "c/whiteout.hl")
    _write(root / "caps2", b"x")
    os.setxattr(root / "caps2", "security.capability", CAP_V2)
    _write(root / "caps3", b"x")
    os.setxattr(root / "caps3", "security.capability", CAP_V3)
    os.setxattr(root / "a", "user.dir", b"on-dir")
    os.setxattr(root / "a/f03", "user.text", b"plain")
    os.setxattr(root / "a/f03", "user.binary", b"\xff\x00\x80")
    os.setxattr(root / "a/f01", "user.linked", b"xattr on a hardlinked file")
    os.setxattr(root / "b", "trusted.overlay.opaque", b"y")
    long_dir = root / ("d" * 120) / ("e" * 120)
    long_file = _write(long_dir / ("f" * 150), b"long")
    os.link(long_file, root / "c/long.hl")  # before it in the walk
    os.link(long_file, root / "z-long.hl")
    _write(root / os.fsdecode(b"caf\xe9-latin1"), b"latin-1 name")
    _write(root / os.fsdecode(b"dir-\xff") / "inside", b"in a non-UTF-8 directory")
    _write(root / "\u00fcn\u00efcode", b"utf-8 name")
    _write(root / ".wh.already", b"")
    owned = _write(root / "owned", b"o")
    os.chown(owned, 1000, 1001)
    huge_ids = _write(root / "huge-ids", b"h")
    os.chown(huge_ids, 3_000_000, 3_000_001)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), ns=(1_500_000_000_123_456_789,
                                                      1_500_000_000_987_654_321),
                     follow_symlinks=False)
    os.utime(owned, (1, 2 ** 34))  # past the ustar mtime field: a PAX record


CHANGES = [["/a", 0], ["/a/f01", 1], ["/a/f01.hl", 1], ["/a/gone", 2], ["/b", 0],
           ["/b/big", 1], ["/b/deleted-dir", 2], ["/c/big.hl", 1], ["/c/f02.hl", 1],
           ["/c/whiteout", 1], ["/c/whiteout.hl", 1], ["/vanished", 0], ["/../escape", 1],
           ["/fifo", 1], ["/null", 1], ["/" + "d" * 120, 1], ["/top-gone", 2],
           ["/caps3", 0], ["/owned", 0]]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("export") / "root"
    _build_tree(root)
    return root


@pytest.mark.parametrize("knobs", PARALLEL, ids=lambda k: f"chunk{k['CHUNK_ENTRIES']}")
@pytest.mark.parametrize("fmt", ["aufs", "overlay"])
def test_tree_export_is_byte_identical(tree: Path, fmt: str, knobs: dict[str, Any]) -> None:
    single = _export(_spec(tree, fmt=fmt), SINGLE, forks=0)
    assert _export(_spec(tree, fmt=fmt), knobs, forks=1) == single
    with tarfile.open(fileobj=io.BytesIO(single)) as tar:
        members = {m.name: m for m in tar}
    assert members["a/f01.hl"].linkname == "a/f01"
    assert members["c/f02.hl"].linkname == "a/f02"
    assert members["b/hub.hl"].linkname == "a/hub" and members["c/hub.hl"].linkname == "a/hub"
    assert members["a/zz-big.hl"].size == 300 << 10 and members["b/big"].linkname == "a/zz-big.hl"
    long_name = "d" * 120 + "/" + "e" * 120 + "/" + "f" * 150
    assert members[long_name].linkname == "c/long.hl"
    assert members["z-long.hl"].linkname == "c/long.hl"


def test_change_export_with_whiteouts_is_byte_identical(tree: Path) -> None:
    for fmt in ("aufs", "overlay"):
        single = _export(_spec(tree, CHANGES, fmt), SINGLE, forks=0)
        assert ".wh.gone" in single.decode("latin-1")
        for knobs in [*PARALLEL[:2], {**PARALLEL[1], "CHUNK_ENTRIES": 2, "FORK_MIN_ENTRIES": 2}]:
            assert _export(_spec(tree, CHANGES, fmt), knobs, forks=1) == single, (fmt, knobs)


def test_long_names_and_a_small_helper_pipe(tmp_path: Path) -> None:
    """Chunks of 1 KiB paths outgrow the socket's buffer unless cut short, and with a
    one-page helper pipe both processes block on each other often."""
    deep = tmp_path / ("a" * 250) / ("b" * 250) / ("c" * 250)
    for i in range(1200):
        _write(deep / (f"{i:04d}" + "d" * 240), b"x" * (i % 3000))
    knobs = {"FORK_MIN_ENTRIES": 64, "HELPER_PIPE_BYTES": 4096, **_ANY_SIZE}
    assert _export(_spec(tmp_path), knobs, forks=1) == _export(_spec(tmp_path), SINGLE, forks=0)


def test_idmapped_export_is_byte_identical(tree: Path) -> None:
    from plugin.idtools import IDMap

    idmap = IDMappings(uids=(IDMap(0, 0, 1000), IDMap(5000, 1000, 10)),
                       gids=(IDMap(0, 0, 1000), IDMap(5000, 1001, 10)))
    single = _export(_spec(tree, idmap=idmap), SINGLE, forks=0)
    assert _export(_spec(tree, idmap=idmap), PARALLEL[2], forks=1) == single


def test_walk_names_batches_keep_walk_order(tree: Path) -> None:
    from plugin.archive.proc.export import walk_names

    def walk(rel: str) -> Iterator[str]:  # filepath.Walk: depth first, sorted by bytes
        for name in sorted(os.listdir(tree / rel), key=os.fsencode):
            child = f"{rel}/{name}" if rel else name
            yield child
            if (tree / child).is_dir() and not (tree / child).is_symlink():
                yield from walk(child)

    order = list(walk(""))
    for size in (1, 5, 128):
        batches = list(walk_names(str(tree), size))
        assert [name for batch in batches for name in batch] == order
        assert all(len(batch) == size for batch in batches[:-1]) and batches[-1]


def test_small_export_does_not_fork(tmp_path: Path) -> None:
    for i in range(20):
        _write(tmp_path / f"f{i}", b"x")
    _export(_spec(tmp_path), {}, forks=0)


def test_helper_only_for_many_small_entries(tmp_path: Path) -> None:
    for i in range(300):
        _write(tmp_path / "big" / f"f{i}", b"b" * (64 << 10))
    _export(_spec(tmp_path / "big"), {}, forks=0)
    for i in range(800):
        _write(tmp_path / "small" / f"f{i}", b"s" * 100)
    _export(_spec(tmp_path / "small"), {}, forks=1)


def test_helper_failure_is_a_fatal_line(tree: Path) -> None:
    knobs = dict(PARALLEL[2], fail_in_helper="disk on fire")
    _, err, rc = _run(_spec(tree), knobs)
    assert rc == 1
    assert any(line.startswith("FATAL ") and "disk on fire" in line
               for line in err.splitlines()), err


def test_reader_going_away_ends_both_processes(tree: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, json.dumps(PARALLEL[2])],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(json.dumps(_spec(tree)).encode() + b"\n")
    proc.stdin.close()
    assert proc.stdout.read(512)
    helpers = _children(proc.pid)
    proc.stdout.close()
    assert proc.wait(timeout=30) == 1
    _assert_gone(helpers)


def test_closing_the_stream_kills_the_helper(tmp_path: Path) -> None:
    # Enough small files to fork a helper and fill the pipe we stop reading.
    for i in range(4000):
        _write(tmp_path / f"d{i // 100}" / f"f{i}", b"f" * 1500)
    stream = export_tree(str(tmp_path), IDMappings())
    try:
        assert stream.read(1024)
        worker = stream._proc.pid
        deadline = time.monotonic() + 10
        while not (helpers := _children(worker)) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert helpers, "the export did not fork a helper"
    finally:
        stream.close()
    _assert_gone(helpers)


def test_closing_a_finished_parallel_stream_returns_everything(tree: Path) -> None:
    data = read_all(export_tree(str(tree), IDMappings()))
    assert len(data) % tarfile.RECORDSIZE == 0


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _assert_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.01)
    survivors = [pid for pid in pids if _alive(pid)]
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert not survivors, f"export helpers outlived the export: {survivors}"


@pytest.mark.parametrize("fmt", ["aufs", "overlay"])
def test_a_small_layer_made_in_memory_is_byte_identical(
        tree: Path, fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A small layer is exported by the plugin's own thread (``export_to_memory``, no
    worker): the same bytes as the worker's, for a tree and for changes."""
    monkeypatch.setattr(time, "time", lambda: 1_600_000_000.75)
    monkeypatch.setattr(archive_stream, "MEMORY_EXPORT_MAX_BYTES", 1 << 30)
    monkeypatch.setattr(archive_stream, "MEMORY_EXPORT_MAX_ENTRIES", 1 << 20)
    stream = export_tree(str(tree), IDMappings(), whiteout_format=fmt)
    assert stream.whole() == _export(_spec(tree, fmt=fmt), SINGLE, forks=0)
    assert export_to_memory(_spec(tree, CHANGES, fmt)) == _export(_spec(tree, CHANGES, fmt),
                                                                  SINGLE, forks=0)


def test_memory_export_stops_at_its_bounds(tmp_path: Path) -> None:
    """Past either bound ``export_to_memory`` keeps nothing (the caller starts a
    worker); within them it gives the worker's bytes."""
    for name in ("a", "b", "c"):
        _write(tmp_path / "d" / name, b"x" * 1000)
    spec = _spec(tmp_path)  # d/, d/a, d/b, d/c
    whole = _export(spec, SINGLE, forks=0)
    with tarfile.open(fileobj=io.BytesIO(whole)) as tf:
        entries = len(tf.getnames())
    assert export_to_memory(spec, max_entries=entries) == whole
    assert export_to_memory(spec, max_entries=entries - 1) is None
    assert export_to_memory(spec, max_bytes=len(whole)) == whole
    assert export_to_memory(spec, max_bytes=2500) is None  # the second body passes it


def test_a_layer_past_the_bounds_goes_to_a_worker(
        tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(archive_stream, "MEMORY_EXPORT_MAX_BYTES", 1 << 10)
    monkeypatch.setattr(archive_stream, "MEMORY_EXPORT_MAX_ENTRIES", 1 << 20)
    with export_tree(str(tree), IDMappings()) as stream:
        assert stream.whole() is None and stream.pipe_fd() is not None
        assert len(read_all(stream)) % tarfile.RECORDSIZE == 0
