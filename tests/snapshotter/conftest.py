"""Snapshotter ring: ``strata snapshotter`` on a real socket, one server per
backend per module, driven by a grpclib client as containerd drives it."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator

import pytest

from plugin.snapshotter import BACKENDS
from tests.backends import btrfs_fs  # noqa: F401 (fixture)
from tests.snapshotter.harness import Client, SnapshotterProcess
from tests.snapshotter.test_crash import Scene


def _root_for(request: pytest.FixtureRequest, backend: str, scratch: str) -> str:
    if backend == "btrfs":
        return os.path.join(request.getfixturevalue("btrfs_fs").new_dir("snap"), "root")
    return os.path.join(scratch, "root")


@pytest.fixture(scope="module", params=BACKENDS)
def server(request: pytest.FixtureRequest) -> Iterator[SnapshotterProcess]:
    backend: str = request.param
    # Unix socket paths must stay under 108 bytes: a short dir under /tmp.
    scratch = tempfile.mkdtemp(prefix="snap-", dir="/tmp")
    proc = SnapshotterProcess(backend, _root_for(request, backend, scratch),
                              os.path.join(scratch, "s.sock"))
    try:
        proc.start()
    except RuntimeError as e:
        proc.stop()
        shutil.rmtree(scratch, ignore_errors=True)
        if "NotSupported" in str(e) or "Prerequisites" in str(e) or "unavailable" in str(e):
            pytest.skip(f"backend {backend} unavailable here: {e}")
        raise
    try:
        yield proc
    finally:
        proc.stop()
        with open("/proc/self/mountinfo") as f:
            leaked = [line.split()[4] for line in f if line.split()[4].startswith(proc.root)]
        # The socket and log dir always; a btrfs root lives on the loop fs,
        # which goes away whole at the session's end.
        shutil.rmtree(scratch, ignore_errors=True)
        assert not leaked, f"mounts left under the root: {leaked}"


@pytest.fixture
async def client(server: SnapshotterProcess) -> AsyncIterator[Client]:
    c = Client(server.socket_path)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def work() -> Iterator[str]:
    """A scratch dir for mount points (what containerd's testsuite calls work)."""
    path = tempfile.mkdtemp(prefix="snapwork-", dir="/tmp")
    yield path
    with open("/proc/self/mountinfo") as f:
        mounted = [line.split()[4] for line in f if line.split()[4].startswith(path + "/")]
    for point in sorted(mounted, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def scene(server: SnapshotterProcess, work: str) -> AsyncIterator[Scene]:
    """A root holding a committed base (test_crash.py, test_reconcile.py); the server
    is left running and without fault points, whatever the test did."""
    s = Scene(server, work)
    try:
        await s.base()
        yield s
    finally:
        s.client.close()
        if s.armed:  # a failed test left its fault point set: the next test needs none
            server.stop()
        if server.process is None:  # or left it dead
            server.start()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter,
                            config: pytest.Config) -> None:
    from tests.snapshotter.hostile import TALLY_KEY, summary_lines

    counts = config.stash.get(TALLY_KEY, None)
    if counts:
        terminalreporter.section("strata snapshotter hostile-input summary")
        for line in summary_lines(counts):
            terminalreporter.write_line(line)
