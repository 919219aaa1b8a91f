"""Hostile ring: reuses the protocol ring's plugin (real app, real socket, every backend)
and adds the decoys, the snapshots and the end-of-run tally the README quotes."""

from __future__ import annotations

import os
import signal
import stat
from collections import Counter
from collections.abc import Iterator

import pytest

# The protocol ring's fixtures, shared: the plugin and what it needs.
from tests.backends import btrfs_fs, zfs_pool  # noqa: F401 (fixtures)
from tests.protocol.conftest import backend, blockbuster, plugin, short_dir  # noqa: F401
from tests.support.files import sha256_file, xattr_pairs
from tests.support.procs import ppid_map

TALLY_KEY = pytest.StashKey[Counter[str]]()

#: Lines of the summary, in print order: (counter key, label).
LAYER_ROWS = [
    ("layer.tried", "hostile layer cases tried"),
    ("layer.clean_err", "  clean Err (4xx, non-empty)"),
    ("layer.err_names_entry", "    of which the Err names the culprit entry"),
    ("layer.unclear_err", "  Err but not clean (5xx or empty text)"),
    ("layer.correct", "  correct layer"),
    ("layer.wrong", "  wrong answer (success that should fail, or bad layer content)"),
    ("layer.hang", "  hang or disk fill (extractor killed)"),
    ("layer.outside", "  WRITES OUTSIDE THE LAYER"),
    ("layer.parent_changed", "  EARLIER LAYER CHANGED"),
    ("layer.stray", "  stray state after Remove"),
]
REQUEST_ROWS = [
    ("req.sent", "bad/fuzzed requests sent"),
    ("req.clean_err", "  4xx with a JSON Err"),
    ("req.ok", "  200 with a well-formed reply"),
    ("req.bad", "  wrong answer (5xx, empty 200, non-JSON, Err-less error)"),
]


@pytest.fixture(autouse=True)
def extract_with_file_helper(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every hostile layer goes through the extractor's file helper from its first file
    (production forks it after 64 small files: a hostile tar can start with 64 benign
    ones).  The extractor alone is covered by tests/unit/test_archive_hostile.py, and
    tests/unit/test_archive_filehelper.py checks that both extract alike."""
    monkeypatch.setenv("STRATA_APPLY_HELPER_AFTER", "0")


@pytest.fixture(scope="session")
def tally(pytestconfig: pytest.Config) -> Counter[str]:
    return pytestconfig.stash.setdefault(TALLY_KEY, Counter())


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter,
                            config: pytest.Config) -> None:
    counts = config.stash.get(TALLY_KEY, None)
    if not counts:
        return
    terminalreporter.section("strata hostile-input summary")
    for rows in (LAYER_ROWS, REQUEST_ROWS):
        if counts.get(rows[0][0]):
            for key, label in rows:
                terminalreporter.write_line(f"{label:<68} {counts.get(key, 0):>6}")


# ---- snapshots ------------------------------------------------------------------

Snapshot = dict[bytes, tuple[object, ...]]


def snapshot(top: str, prune: str | None = None) -> Snapshot:
    """Every path under ``top`` (itself included) with what must not change:
    type and mode, owner, size, mtime, ctime, inode, link count, device,
    content hash, symlink target, xattrs.  Paths are bytes (names need not be UTF-8).
    The subtree ``prune`` (e.g. Home, which changes legitimately) is left out."""
    out: Snapshot = {}
    btop = os.fsencode(top)
    bprune = os.fsencode(prune) if prune else None
    if not os.path.lexists(btop):
        return out
    for dirpath, dirnames, filenames in os.walk(btop):
        if bprune is not None and bprune in (os.path.join(dirpath, n) for n in dirnames):
            dirnames.remove(os.path.basename(bprune))
        names = [b"."] if dirpath == btop else []
        for name in names + dirnames + filenames:
            path = dirpath if name == b"." else os.path.join(dirpath, name)
            out[os.path.relpath(path, btop)] = _entry_state(path)
    return out


def _entry_state(path: bytes) -> tuple[object, ...]:
    st = os.lstat(path)
    content: object = None
    if stat.S_ISREG(st.st_mode):
        content = sha256_file(path)
    elif stat.S_ISLNK(st.st_mode):
        content = os.readlink(path)
    return (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_ctime_ns,
            st.st_ino, st.st_nlink, st.st_rdev, content, xattr_pairs(path))


def snapshot_diff(before: Snapshot, after: Snapshot) -> list[str]:
    """Human-readable differences, at most a dozen."""
    problems = []
    for path in sorted(before.keys() | after.keys()):
        if path not in after:
            problems.append(f"removed {path!r}")
        elif path not in before:
            problems.append(f"appeared {path!r}")
        elif before[path] != after[path]:
            problems.append(f"changed {path!r}: {before[path]} -> {after[path]}")
    return problems[:12]


# ---- processes ------------------------------------------------------------------


def kill_extractors() -> list[int]:
    """SIGKILL the archive workers this test process spawned (a hung or runaway
    extraction); returns their pids.  Only our own descendants, by pid: workers
    started directly (``python -m plugin.archive.proc.worker apply``) or forked by the
    archive zygote (same command line, parent is the zygote); the zygote itself
    is left alone."""
    procs: dict[int, tuple[int, bytes]] = {}
    for pid, ppid in ppid_map().items():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                procs[pid] = (ppid, fh.read())
        except OSError:
            continue

    def mine(pid: int) -> bool:
        while pid > 1 and pid in procs:
            pid = procs[pid][0]
            if pid == os.getpid():
                return True
        return False

    killed = []
    for pid, (ppid, cmdline) in procs.items():
        parent_cmd = procs.get(ppid, (0, b""))[1]
        forked = b"plugin.archive" in parent_cmd
        worker = b"plugin.archive" in cmdline and (forked or b"zygote" not in cmdline)
        if worker and mine(pid):
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
    return killed


@pytest.fixture
def reap_extractors() -> Iterator[None]:
    yield
    kill_extractors()
