"""fuse-overlayfs: overlay semantics from the ``fuse-overlayfs`` program, for hosts
whose kernel overlay cannot be used (no CONFIG_OVERLAY_FS, an unprivileged user
namespace, an overlayfs data root).

The layout, the l/ short links, Create, Remove, ApplyDiff and DiffSize are the
overlay backend's (this is a subclass of it); only the mount differs.  Get runs
``fuse-overlayfs -f -o lowerdir=l/A:l/B,upperdir=…,workdir=… merged`` with the
cwd at Home, so lowers are the 29-byte relative links: argv has no 4 KiB page
limit (one argument may be 128 KiB, MAX_ARG_STRLEN), but 500 lowers are
~15 KB rather than ~50 KB of absolute paths.

The process is the mount: it runs in the foreground (``-f``) so strata holds
its pid, in its own session (``start_new_session``: a plugin restart, or a
signal to the plugin's process group, must not take running containers'
root filesystems with it) and with no inherited descriptors (``close_fds``:
it must not keep the plugin's listening socket open).  Put runs
``fusermount3 -u`` and reaps the pid; when the mount is busy it is detached
lazily (as moby does) and the process, which exits when the last user goes,
is reaped later.  After a plugin restart the processes are no longer ours:
their mounts are found in mountinfo by type ``fuse.fuse-overlayfs`` and
released with fusermount3 when the count reaches 0 (init reaps the process).

fuse-overlayfs as root writes the kernel's whiteouts (char 0:0) and opaque
xattr, and reads both those and ``.wh.`` files in lowers, so ApplyDiff writes
straight into ``diff/`` as overlay does.  Diff and Changes walk the two
mounts instead (moby's fuse-overlayfs driver does the same): beside the opaque
xattr fuse-overlayfs leaves a ``.wh..opq`` char device and a ``.wh..wh..opq``
file in every opaque dir, and tags copied-up files with
``user.fuseoverlayfs.origin``, so a tar of the upper dir would carry
fuse-overlayfs's bookkeeping into the image.  Model: moby
``daemon/graphdriver/fuse-overlayfs/fuseoverlayfs.go``.

Directory mtimes after a copy-up: the kernel overlay copies a directory up with
its lower times and puts them back after copying a child into it, so appending
to ``/data/mod/file.txt`` leaves ``data/mod/`` with its lower mtime.
fuse-overlayfs 1.10 copies the directory's times too, but then creates the
child in it and never restores them, so the upper dir (and the merged view once
remounted) carries the copy-up time.  Before a container layer's Diff, a
directory whose only upper entries are copy-ups gets its lower mtime back (see
``restore_copy_up_times``).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import subprocess
import tempfile
import threading
import time

import msgspec

from plugin.archive import Change, TarStream
from plugin.backends.overlay import OverlayDriver
from plugin.driver import mountapi
from plugin.driver.base import CreateOpts, Driver, MountSpec
from plugin.driver.probes import (
    OverlaySupport,
    filesystems,
    fs_name,
    mountinfo,
    size_limit_refusal,
    supports_d_type,
    supports_trusted_xattrs,
)
from plugin.driver.registry import register, split_options
from plugin.errors import IncompatibleFS, InvalidArgument, NotSupported, Prerequisites, StrataError
from plugin.idtools import IDMappings
from plugin.state.refcount import internal_references

log = logging.getLogger("strata.backend.fuse-overlayfs")

BINARY = "fuse-overlayfs"
FSTYPE = "fuse.fuse-overlayfs"
#: The type a mount spec names: what containerd's fuse-overlayfs snapshotter returns.
FSTYPE_SPEC = "fuse3.fuse-overlayfs"
FUSE_DEVICE = "/dev/fuse"
#: The kernel overlay's OVL_MAX_STACK, kept for parity: 500 relative lowers are
#: 500 * 29 + 341 bytes of option, far below MAX_ARG_STRLEN (131072).
MAX_LOWERS = 500
#: How long a fuse-overlayfs start may take before strata gives up on it.
MOUNT_TIMEOUT = 30.0
#: How long Put waits for the process to exit after its mount is gone.
EXIT_TIMEOUT = 10.0
#: What fuse-overlayfs tags a copied-up file with: its path in the lower.
ORIGIN_XATTR = "user.fuseoverlayfs.origin"
OPAQUE_XATTR = "trusted.overlay.opaque"
#: Meta key of a layer made by CreateReadWrite: written only through the mount.
READ_WRITE_KEY = "read_write"
NAIVE_REASON = ("fuse-overlayfs keeps .wh..opq/.wh..wh..opq files beside opaque xattrs and "
                "user.fuseoverlayfs.* xattrs in upper dirs; Diff and Changes walk the mounts")


class _Processes:
    """The fuse-overlayfs processes this plugin process started, by mountpoint.

    Module-wide, not per driver: a re-Init builds a new driver in the same
    process, and the pids it inherits must still be reaped.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[str, subprocess.Popen[bytes]] = {}
        self._exiting: list[subprocess.Popen[bytes]] = []

    def add(self, mountpoint: str, proc: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self._running[mountpoint] = proc

    def take(self, mountpoint: str) -> subprocess.Popen[bytes] | None:
        with self._lock:
            return self._running.pop(mountpoint, None)

    def later(self, proc: subprocess.Popen[bytes]) -> None:
        """Reap ``proc`` once it exits (its mount was detached while busy)."""
        with self._lock:
            self._exiting.append(proc)

    def reap(self) -> None:
        with self._lock:
            self._exiting = [p for p in self._exiting if p.poll() is None]

    def pids(self) -> dict[str, int]:
        with self._lock:
            return {path: proc.pid for path, proc in self._running.items()}


PROCESSES = _Processes()


def fuse_mounted(mountpoint: str) -> bool:
    return any(m.mountpoint == mountpoint and m.fstype == FSTYPE for m in mountinfo())


def start_mount(binary: str, cwd: str, options: list[str],
                mountpoint: str) -> subprocess.Popen[bytes]:
    """Run fuse-overlayfs on ``mountpoint`` (``options`` relative to ``cwd``) and
    return once the mount is there."""
    option = ",".join(options)
    with tempfile.TemporaryFile(prefix="strata-fuse-overlayfs-") as err:
        proc = subprocess.Popen([binary, "-f", "-o", option, mountpoint], cwd=cwd,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=err, close_fds=True, start_new_session=True)
        deadline = time.monotonic() + MOUNT_TIMEOUT
        delay = 0.001
        while not fuse_mounted(mountpoint):
            code = proc.poll()
            if code is not None or time.monotonic() > deadline:
                if code is None:
                    proc.kill()
                    proc.wait()
                err.seek(0)
                message = err.read().decode(errors="replace").strip() or "<stderr empty>"
                what = f"exited {code}" if code is not None else \
                    f"did not mount within {MOUNT_TIMEOUT:.0f}s"
                raise StrataError(f"{binary} on {mountpoint} (from {cwd}) {what}: {message}")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
    return proc


def stop_mount(fusermount: str | None, mountpoint: str,
               proc: subprocess.Popen[bytes] | None) -> None:
    """Unmount a fuse-overlayfs mount and reap its process, if strata started it."""
    lazy = False
    if fuse_mounted(mountpoint):
        done = fusermount is not None and subprocess.run(
            [fusermount, "-u", mountpoint], stdin=subprocess.DEVNULL,
            capture_output=True, check=False, close_fds=True).returncode == 0
        if not done:
            # Busy (a container process still has a file open), or no
            # fusermount: detach it; the process exits with its last user.
            lazy = mountapi.unmount(mountpoint)
    if proc is None:
        return
    if lazy:
        PROCESSES.later(proc)
        return
    try:
        proc.wait(timeout=EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        log.warning("fuse-overlayfs pid %d for %s still runs %.0fs after its unmount; "
                    "reaping it later", proc.pid, mountpoint, EXIT_TIMEOUT)
        PROCESSES.later(proc)


def _is_opaque(path: str) -> bool:
    try:
        return os.getxattr(path, OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


def _copied_up(path: str, rel: str) -> bool:
    """Whether the upper file at ``path`` is fuse-overlayfs's copy of the lower ``rel``."""
    try:  # fuse-overlayfs stores the path with its C string's NUL
        origin = os.getxattr(path, ORIGIN_XATTR, follow_symlinks=False)
        return origin.rstrip(b"\0") == os.fsencode(rel)
    except OSError:
        return False


def _only_copy_ups(upper_dir: str, lower_dir: str, rel: str, below: list[str]) -> bool:
    """Whether every entry of ``upper_dir`` is a copy-up of the same lower name: a
    file tagged with its own path, or a directory the lower has (not made opaque).
    Appends those directories' paths to ``below``."""
    only = not _is_opaque(upper_dir)
    lower_names = set(os.listdir(lower_dir))
    with os.scandir(upper_dir) as entries:
        for entry in entries:
            child = f"{rel}/{entry.name}" if rel else entry.name
            if entry.name not in lower_names:
                only = False  # an added name, a whiteout, an opaque marker
            elif entry.is_dir(follow_symlinks=False):
                lower_mode = os.lstat(os.path.join(lower_dir, entry.name)).st_mode
                if stat.S_ISDIR(lower_mode) and not _is_opaque(entry.path):
                    below.append(child)
                else:
                    only = False  # a directory made in place of a lower entry
            elif not (entry.is_file(follow_symlinks=False) and _copied_up(entry.path, child)):
                only = False  # a replaced file, a symlink (no origin tag possible)
    return only


def restore_copy_up_times(upper: str, lower: str) -> int:
    """Give each directory of ``upper`` whose entries are all copy-ups the mtime it
    has in ``lower`` (the parent layer's merged view), as the kernel overlay keeps
    it; returns how many changed.  Names made and removed again within the layer,
    and a ``touch`` of the directory itself, leave no trace in the upper dir: such
    a directory gets its lower mtime back too (overlay2 would show the new one)."""
    restored = 0
    pending = [""]
    while pending:
        rel = pending.pop()
        upper_dir, lower_dir = os.path.join(upper, rel), os.path.join(lower, rel)
        try:
            lower_st = os.lstat(lower_dir)
        except FileNotFoundError:
            continue
        if not stat.S_ISDIR(lower_st.st_mode):
            continue
        if _only_copy_ups(upper_dir, lower_dir, rel, pending) and rel:
            upper_st = os.lstat(upper_dir)
            if upper_st.st_mtime_ns != lower_st.st_mtime_ns:
                os.utime(upper_dir, ns=(upper_st.st_atime_ns, lower_st.st_mtime_ns),
                         follow_symlinks=False)
                restored += 1
    return restored


class FuseOverlayDriver(OverlayDriver):
    name = "fuse-overlayfs"

    def __init__(self, home: str, idmap: IDMappings, support: OverlaySupport,
                 binary: str, version: str, fusermount: str | None) -> None:
        self.binary = binary
        self.version = version
        self.fusermount = fusermount
        super().__init__(home, idmap, support)
        self.max_lowers = MAX_LOWERS

    #: containerd mounts this type through its fuse3 helper (the snapshotter's spec).
    spec_type = FSTYPE_SPEC

    def _flags(self) -> tuple[str, ...]:
        return ()  # fuse-overlayfs has no index and needs no userxattr

    def _mount(self, spec: MountSpec, target: str) -> None:
        PROCESSES.reap()
        if fuse_mounted(target):
            try:
                os.stat(target)
                return  # mounted before a plugin restart lost the count
            except OSError as e:
                if e.errno != errno.ENOTCONN:
                    raise
            log.warning("fuse-overlayfs for %s died (ENOTCONN); mounting it again", target)
            stop_mount(self.fusermount, target, PROCESSES.take(target))
        cwd, options = mountapi.compact(spec.options)
        proc = start_mount(self.binary, cwd, options, target)
        PROCESSES.add(target, proc)
        log.debug("mounted %s (pid %d)", target, proc.pid)

    def _detach(self, mountpoint: str) -> None:
        stop_mount(self.fusermount, mountpoint, PROCESSES.take(mountpoint))
        if os.path.ismount(mountpoint):
            mountapi.unmount(mountpoint)  # not ours: whatever else is mounted there

    def mounted_ids(self) -> list[str]:
        prefix = os.path.join(self.store.layers_dir, "")
        found = []
        for entry in mountinfo():
            rest = entry.mountpoint[len(prefix):] if entry.mountpoint.startswith(prefix) else ""
            layer_id, _, sub = rest.partition("/")
            if entry.fstype == FSTYPE and layer_id and sub == "merged":
                found.append(layer_id)
        return found

    def create_read_write(self, layer_id: str, parent: str, opts: CreateOpts) -> None:
        self.create(layer_id, parent, opts)
        meta = self.store.read_meta(layer_id)
        self.store.write_meta(self.store.layer_dir(layer_id), msgspec.structs.replace(
            meta, extra={**meta.extra, READ_WRITE_KEY: "1"}))

    # Diff and Changes walk the mounts: see the module doc.
    def diff(self, layer_id: str, parent: str) -> TarStream:
        self._restore_copy_up_times(layer_id, parent)
        return self.naive.diff(layer_id, parent)

    def _restore_copy_up_times(self, layer_id: str, parent: str) -> None:
        """Only in a container's layer against its own parent: a layer ApplyDiff wrote
        holds directories with the tar's mtimes and no copy-ups."""
        meta = self.store.read_meta(layer_id)
        if not parent or meta.parent != parent or meta.extra.get(READ_WRITE_KEY) != "1":
            return
        upper = self.diff_dir(self.store.require(layer_id))
        with internal_references():
            lower = self.get(parent, "")
            try:
                restored = restore_copy_up_times(upper, lower)
            finally:
                self.put(parent)
        if restored:
            log.debug("%s: %d directories got their lower mtime back", layer_id, restored)

    def changes(self, layer_id: str, parent: str) -> list[Change]:
        return self.naive.changes(layer_id, parent)

    def _mount_api_label(self) -> str:
        return f"{BINARY} -o lowerdir=, relative l/ links"

    def status(self) -> list[tuple[str, str]]:
        return [
            ("Backend", "fuse-overlayfs"),
            ("Binary", f"{self.binary} ({self.version})"),
            ("Unmount", self.fusermount or "umount2 (no fusermount3 found)"),
            ("Backing Filesystem", self.support.backing_fs),
            ("Supports d_type", str(self.support.d_type).lower()),
            ("Native Overlay Diff", f"ApplyDiff and DiffSize only ({NAIVE_REASON})"),
            ("Max Depth", str(self.max_lowers)),
            ("Mounts", str(len(self.mounted_ids()))),
            ("Layers", str(len(self.store.ids()))),
        ]


def binary_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False,
                         stdin=subprocess.DEVNULL, timeout=30)
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("fuse-overlayfs"):
            return line.partition(":")[2].strip() or line.strip()
    return "version unknown"


def probe_mount(binary: str, fusermount: str | None, home: str) -> None:
    """Mount and unmount a throwaway fuse-overlayfs under ``home`` (relative
    lowers, as Get does), so Init, not the first Get, says it cannot work."""
    with tempfile.TemporaryDirectory(prefix=".strata-fuse-probe-", dir=home) as tmp:
        for d in ("l", "u", "w", "m"):
            os.mkdir(os.path.join(tmp, d))
        merged = os.path.join(tmp, "m")
        proc = start_mount(binary, tmp, ["lowerdir=l", "upperdir=u", "workdir=w"], merged)
        stop_mount(fusermount, merged, proc)


def _host_problem(home: str) -> None:
    if shutil.which(BINARY) is None:
        raise Prerequisites("fuse-overlayfs: the fuse-overlayfs program is not on PATH "
                            "(install the package fuse-overlayfs: "
                            "apt-get install fuse-overlayfs fuse3)")
    if not os.path.exists(FUSE_DEVICE) or "fuse" not in filesystems():
        raise Prerequisites(f"fuse-overlayfs: {FUSE_DEVICE} is missing or the kernel has no FUSE "
                            "(needs CONFIG_FUSE_FS; in a container, pass --device /dev/fuse); "
                            "the package fuse-overlayfs cannot work without it")
    if not os.access(FUSE_DEVICE, os.R_OK | os.W_OK):
        raise Prerequisites(f"fuse-overlayfs: {FUSE_DEVICE} is not readable and writable by "
                            f"uid {os.geteuid()}")
    if not supports_d_type(home):
        raise IncompatibleFS(f"fuse-overlayfs: the backing filesystem of {home} "
                             f"({fs_name(home)}) does not return d_type")
    if not supports_trusted_xattrs(home):
        raise IncompatibleFS(f"fuse-overlayfs: cannot set trusted.* xattrs under {home} "
                             f"({fs_name(home)}); ApplyDiff keeps opaque dirs in them")


def init(home: str, options: list[str], idmap: IDMappings) -> Driver:
    opts = split_options(options, BINARY)
    if "size" in opts:
        raise NotSupported(size_limit_refusal("fuse-overlayfs", home))
    unknown = [o for o in options if o.lower().startswith(BINARY + ".")]
    if unknown:
        raise InvalidArgument(f"fuse-overlayfs: unknown storage option(s) {', '.join(unknown)}")
    _host_problem(home)
    binary = shutil.which(BINARY)
    assert binary is not None  # checked by _host_problem
    fusermount = shutil.which("fusermount3") or shutil.which("fusermount")
    try:
        probe_mount(binary, fusermount, home)
    except (OSError, StrataError) as e:
        raise Prerequisites(f"fuse-overlayfs: a test mount under {home} failed: {e}") from e
    support = OverlaySupport(backing_fs=fs_name(home), d_type=True, new_mount_api=False,
                             naive_reason="", userxattr=False)
    return FuseOverlayDriver(home, idmap, support, binary, binary_version(binary), fusermount)


register("fuse-overlayfs", init)
