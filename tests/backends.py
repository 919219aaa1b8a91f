"""Real filesystems for the btrfs and zfs backends: set up, hand out, tear down.

The protocol and engine rings run every backend on a Home of *its* filesystem:
btrfs on a loop-mounted image file, zfs on a zfs-fuse dataset (the kernel has
no zfs; docs/host.md §2-3).  Session fixtures create one of each
per test run under a unique ``/tmp/strata-<kind>-<hex>/`` and remove every
mount, loop device, pool and daemon they made, by path, device and pid:

* btrfs: ``truncate`` a sparse image, ``losetup --find --show`` (never a fixed
  ``/dev/loopN``: loop numbers are shared with other processes), ``mkfs.btrfs``,
  mount, ``btrfs quota enable``.  Teardown: umount, ``losetup -d``, rm.
* zfs: a ``zfs-fuse`` daemon with its own pidfile (unless one already answers,
  which is then left alone), a pool with a unique name on a plain image file.
  Each test gets its own dataset (layer ids such as ``Base`` repeat between
  tests, and the backend names its datasets ``<fsname>/<id>``).  Teardown
  destroys the pool and stops the daemon by the pid it wrote.

A host that lacks a tool skips the tests that need it, with the reason.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.mounts import is_mounted, mounts_under
from tests.support.procs import run, terminate_pid, wait_for

__all__ = [
    "LoopBtrfs", "ZfsPool", "backend_data_root", "btrfs_fs", "btrfs_unavailable", "home_for",
    "loop_btrfs", "run", "zfs_fuse_pool", "zfs_pool", "zfs_retry_busy", "zfs_unavailable",
]

#: zfs-fuse answers a fresh unmount/mount/destroy with "busy" for ~2 s.
ZFS_BUSY_RETRY_SECONDS = 30.0


def _missing_tools(*tools: str) -> str | None:
    missing = [t for t in tools if shutil.which(t) is None]
    return f"missing {', '.join(missing)}" if missing else None


# ---- btrfs -------------------------------------------------------------------

@dataclass
class LoopBtrfs:
    workdir: Path
    image: Path
    device: str
    mountpoint: Path

    def new_dir(self, prefix: str = "t") -> str:
        path = self.mountpoint / f"{prefix}-{secrets.token_hex(6)}"
        path.mkdir()
        return str(path)


def btrfs_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "btrfs tests need root (losetup, mount)"
    missing = _missing_tools("mkfs.btrfs", "btrfs", "losetup")
    if missing:
        return f"btrfs tests: {missing} (apt-get install btrfs-progs util-linux)"
    with open("/proc/filesystems") as f:
        if "btrfs" not in f.read().split():
            return "btrfs tests: the kernel has no btrfs"
    return None


@contextmanager
def loop_btrfs(size: str = "2G", quota: bool = True) -> Iterator[LoopBtrfs]:
    """A fresh btrfs on a loop device over a sparse image; everything undone on exit."""
    reason = btrfs_unavailable()
    if reason:
        pytest.skip(reason)
    workdir = Path(f"/tmp/strata-btrfs-{secrets.token_hex(4)}")
    workdir.mkdir(mode=0o700)
    image, mountpoint = workdir / "btrfs.img", workdir / "mnt"
    device = ""
    try:
        run("truncate", "-s", size, str(image))
        device = run("losetup", "--find", "--show", str(image)).stdout.strip()
        run("mkfs.btrfs", "-q", "-f", device)
        mountpoint.mkdir()
        run("mount", "-t", "btrfs", device, str(mountpoint))
        if quota:
            run("btrfs", "quota", "enable", str(mountpoint))
        yield LoopBtrfs(workdir, image, device, mountpoint)
    finally:
        _teardown_btrfs(workdir, mountpoint, device)


def _teardown_btrfs(workdir: Path, mountpoint: Path, device: str) -> None:
    # Mounts a test left under the fs (none expected) go first, deepest first.
    for point in mounts_under(mountpoint, include_root=False):
        run("umount", "-l", point, check=False)
    for attempt in range(20):
        if not is_mounted(str(mountpoint)):
            break
        if run("umount", str(mountpoint), check=False).returncode == 0:
            break
        time.sleep(0.25 * (attempt + 1))
    else:
        run("umount", "-l", str(mountpoint), check=False)
    if device:
        run("losetup", "-d", device, check=False)
    shutil.rmtree(workdir, ignore_errors=True)


# ---- zfs (zfs-fuse) ----------------------------------------------------------

@dataclass
class ZfsPool:
    workdir: Path
    pool: str
    daemon_pid: int | None  # None: a daemon we did not start was already serving

    def new_dataset(self, prefix: str = "t") -> tuple[str, str]:
        """Create ``<pool>/<prefix><hex>`` mounted at a fresh dir; returns (name, mountpoint)."""
        name = f"{self.pool}/{prefix}{secrets.token_hex(5)}"
        mountpoint = self.workdir / "mnt" / name.split("/", 1)[1]
        mountpoint.mkdir(parents=True)
        run("zfs", "create", "-o", f"mountpoint={mountpoint}", name)
        wait_for(lambda: is_mounted(str(mountpoint)), f"{name} to be mounted at {mountpoint}")
        return name, str(mountpoint)

    def destroy_dataset(self, name: str) -> None:
        zfs_retry_busy("zfs", "destroy", "-R", "-f", name)


def zfs_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "zfs tests need root (zfs-fuse)"
    missing = _missing_tools("zfs-fuse", "zpool", "zfs")
    if missing:
        return f"zfs tests: {missing} (apt-get install zfs-fuse)"
    if not os.path.exists("/dev/fuse"):
        return "zfs tests: no /dev/fuse"
    return None


def zfs_retry_busy(*argv: str) -> None:
    """Run a zfs command, retrying while zfs-fuse's asynchronous unmount says busy."""
    deadline = time.monotonic() + ZFS_BUSY_RETRY_SECONDS
    delay = 0.1
    while True:
        result = run(*argv, check=False)
        if result.returncode == 0:
            return
        if "busy" not in result.stderr or time.monotonic() > deadline:
            raise RuntimeError(f"{' '.join(argv)}: {result.stderr.strip()}")
        time.sleep(delay)
        delay = min(delay * 2, 1.0)


def _daemon_answers() -> bool:
    return run("zpool", "list", "-H", check=False, timeout=30).returncode == 0


@contextmanager
def zfs_fuse_pool(size: str = "2G") -> Iterator[ZfsPool]:
    reason = zfs_unavailable()
    if reason:
        pytest.skip(reason)
    workdir = Path(f"/tmp/strata-zfs-{secrets.token_hex(4)}")
    workdir.mkdir(mode=0o700)
    pool = f"strata{secrets.token_hex(4)}"
    image, pidfile = workdir / "zfs.img", workdir / "zfs-fuse.pid"
    daemon_pid: int | None = None
    created = False
    try:
        if not _daemon_answers():
            os.makedirs("/var/run/zfs", exist_ok=True)
            # zfs-fuse forks into the background and writes its pid; a stale
            # pidfile would make it exit 0 without starting (ours is fresh).
            run("zfs-fuse", "--no-kstat-mount", "-p", str(pidfile))
            wait_for(pidfile.exists, "the zfs-fuse pidfile")
            daemon_pid = int(pidfile.read_text().strip())
            wait_for(_daemon_answers, "zfs-fuse to answer zpool list")
        run("truncate", "-s", size, str(image))
        run("zpool", "create", "-f", "-m", "none", pool, str(image))
        created = True
        yield ZfsPool(workdir, pool, daemon_pid)
    finally:
        try:
            if created:
                zfs_retry_busy("zpool", "destroy", "-f", pool)
        finally:
            # zfs-fuse is one daemon per host: another test session may have
            # found ours answering and imported its pool into it; leave it up
            # then, and let the last session out stop it (ours, or one this
            # helper started in a session that has ended: its dir is gone).
            others = run("zpool", "list", "-H", "-o", "name", check=False).stdout.split()
            if not others:
                for pid in {daemon_pid, *_orphaned_helper_daemons()} - {None}:
                    assert pid is not None
                    terminate_pid(pid, timeout=15.0)
            shutil.rmtree(workdir, ignore_errors=True)


def _orphaned_helper_daemons() -> list[int]:
    """zfs-fuse daemons started by this helper whose session's directory is gone."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if os.path.basename(argv[0]) != "zfs-fuse" or "-p" not in argv[:-1]:
            continue
        pidfile = Path(argv[argv.index("-p") + 1])
        if pidfile.parent.name.startswith("strata-zfs-") and not pidfile.parent.exists():
            found.append(int(entry.name))
    return found


# ---- fixtures ----------------------------------------------------------------

@pytest.fixture(scope="session")
def btrfs_fs() -> Iterator[LoopBtrfs]:
    with loop_btrfs() as fs:
        yield fs


@pytest.fixture(scope="session")
def zfs_pool() -> Iterator[ZfsPool]:
    with zfs_fuse_pool() as pool:
        yield pool


_ROOT_KEY = pytest.StashKey[str]()


def home_for(request: pytest.FixtureRequest, backend: str, default: str) -> str:
    """A directory for this test on the filesystem ``backend`` needs (``default`` otherwise).

    Memoised per test item, so the backend probe and the plugin share it; a zfs
    dataset made here is destroyed when the requesting fixture is torn down.
    """
    node = request.node
    if _ROOT_KEY in node.stash:
        return str(node.stash[_ROOT_KEY])
    root = default
    if backend == "btrfs":
        root = request.getfixturevalue("btrfs_fs").new_dir()
    elif backend == "zfs":
        pool: ZfsPool = request.getfixturevalue("zfs_pool")
        name, root = pool.new_dataset()
        request.addfinalizer(lambda: pool.destroy_dataset(name))
    node.stash[_ROOT_KEY] = root
    return root


@contextmanager
def backend_data_root(request: pytest.FixtureRequest, backend: str) -> Iterator[Path | None]:
    """A fresh directory for a dockerd data root on ``backend``'s filesystem, or None."""
    if backend == "btrfs":
        yield Path(request.getfixturevalue("btrfs_fs").new_dir("engine"))
    elif backend == "zfs":
        pool: ZfsPool = request.getfixturevalue("zfs_pool")
        name, mountpoint = pool.new_dataset("engine")
        try:
            yield Path(mountpoint)
        finally:
            pool.destroy_dataset(name)
    else:
        yield None
