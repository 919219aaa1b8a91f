"""zfs: a dataset per layer; a child layer is a clone of a snapshot of its parent.

Datasets are named ``<fsname>/<id>`` as Docker's zfs driver names them; the
parent dataset ``fsname`` comes from the ``zfs.fsname`` option or, by default,
is the dataset Home is on.  Create snapshots the parent (``<parent>@strata-<rand>``),
clones it and marks the snapshot for deferred destruction (``zfs destroy -d``),
so the snapshot goes away with its clone; Remove destroys the dataset.

Mounting differs from Docker's driver, which sets ``mountpoint=legacy`` and
calls mount(2) with type ``zfs``: with zfs-fuse (the only zfs this kernel can
have, docs/host.md §3) there is no ``zfs`` filesystem type, so
Get sets the dataset's ``mountpoint`` property to ``Home/layers/<id>/root``
(zfs-fuse mounts it through FUSE) and Put sets it back to ``none``.  This also
works with kernel zfs.  zfs-fuse unmounts asynchronously: a mount or destroy
straight after an unmount answers "dataset is busy", so those are retried with
a bounded backoff.  Every dataset carries the user property ``strata:home``:
start-up destroys datasets of *this* Home that no layer directory claims (a
crash between clone and rename), and never touches anyone else's.

``StorageOpt size`` sets the dataset's ``quota`` property, as Docker's driver
does; the clone's shared origin data is not charged to it.

zfs-fuse stores no extended attributes (ENOTSUP even with ``xattr=on``), so
file capabilities and ``user.*`` xattrs of images are dropped on it; Status
says so.  Nor can it serve user-namespaced containers (``dockerd
--userns-remap``): the daemon checks permissions itself, with the caller's host
uid, and knows nothing of user namespaces, so a container's root (an
unprivileged host uid) is an ordinary user there: its chown fails with EPERM (as
do the builds and commits that need one).  Init refuses ID maps on
zfs-fuse rather than give containers that half work; with kernel ZFS the
kernel checks permissions, user-namespace aware, and the maps are used.  The
``zfs`` CLI is used (no library), as the issue asks.  Model: moby
``daemon/graphdriver/zfs/zfs.go``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import subprocess
import threading
import time
import uuid

from plugin.backends.common import RefCountedStore
from plugin.driver.base import CreateOpts, Driver, MountSpec, ProtoDriver
from plugin.driver.naive import NaiveDiffDriver
from plugin.driver.probes import filesystems, fs_name, mountinfo
from plugin.driver.registry import register, split_options
from plugin.errors import (
    AlreadyExists,
    Busy,
    DeadlineExceeded,
    InvalidArgument,
    NotSupported,
    Prerequisites,
    StrataError,
)
from plugin.idtools import IDMappings
from plugin.state.layers import LayerMeta

log = logging.getLogger("strata.backend.zfs")

HOME_PROPERTY = "strata:home"
ZFS_FSTYPES = ("zfs", "fuse.zfs")
#: Kernel ZFS registers this filesystem type; zfs-fuse does not (docs/host.md §3).
KERNEL_ZFS_FSTYPE = "zfs"
ZFS_FUSE_USERNS = (
    "zfs: zfs-fuse cannot serve user-namespaced containers (dockerd --userns-remap): it "
    "checks permissions itself with the caller's host uid, so a container's remapped root "
    "is an unprivileged user there (its chown fails with EPERM); use kernel ZFS or another "
    "backend (vfs, overlay, btrfs, fuse-overlayfs)")
#: zfs-fuse answers "busy" for a while after an unmount (docs/host.md §3): retry
#: for up to this long, doubling the pause from 50 ms to 1 s.
BUSY_RETRY_SECONDS = 30.0
COMMAND_TIMEOUT = 120.0


class ZfsError(StrataError):
    def __init__(self, argv: list[str], stderr: str) -> None:
        super().__init__(f"{' '.join(argv)}: {stderr.strip()}")
        self.stderr = stderr


#: zfs-fuse deadlocks when mounts, unmounts and destroys of nested datasets
#: overlap (seen: its own ``umount -l`` of a layer hung in a FUSE getattr on
#: the parent dataset, with 32 clients calling at once), so this process runs
#: one zfs command at a time; each is short next to the layer work around it.
_ZFS_LOCK = threading.Lock()


def zfs(*args: str, retry_busy: bool = False) -> str:
    """Run ``zfs args``; with ``retry_busy``, retry while it answers busy."""
    argv = ["zfs", *args]
    deadline = time.monotonic() + BUSY_RETRY_SECONDS
    pause = 0.05
    while True:
        try:
            with _ZFS_LOCK:
                result = subprocess.run(argv, capture_output=True, text=True, errors="replace",
                                        check=False, timeout=COMMAND_TIMEOUT)
        except subprocess.TimeoutExpired as e:
            raise DeadlineExceeded(f"{' '.join(argv)} did not finish in {COMMAND_TIMEOUT}s") from e
        if result.returncode == 0:
            return result.stdout
        busy = "busy" in result.stderr
        if not (retry_busy and busy) or time.monotonic() > deadline:
            if busy:
                raise Busy(f"{' '.join(argv)}: {result.stderr.strip()}")
            raise ZfsError(argv, result.stderr)
        time.sleep(pause)
        pause = min(pause * 2, 1.0)


def dataset_exists(name: str) -> bool:
    try:
        zfs("list", "-H", "-o", "name", name)
    except ZfsError as e:
        if "does not exist" in e.stderr:
            return False
        raise
    return True


def _mounted_at(path: str) -> bool:
    real = os.path.realpath(path)  # mountinfo shows resolved paths
    return any(m.mountpoint == real for m in mountinfo())


def xattrs_supported(directory: str) -> bool:
    """Whether the filesystem of ``directory`` stores user xattrs (zfs-fuse: no)."""
    probe = os.path.join(directory, f".xattr-probe-{uuid.uuid4().hex[:8]}")
    with open(probe, "wb"):
        pass
    try:
        os.setxattr(probe, "user.strata-probe", b"1")
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return False
        raise
    finally:
        os.unlink(probe)
    return True


class ZfsDriver(RefCountedStore, ProtoDriver):
    name = "zfs"

    def __init__(self, home: str, idmap: IDMappings, fsname: str) -> None:
        self.fsname = fsname
        super().__init__(home, idmap, needs_mount=True)
        self.xattrs = xattrs_supported(self.store.staging_dir)
        self._destroy_orphans()

    def dataset(self, layer_id: str) -> str:
        return f"{self.fsname}/{layer_id}"

    def mounted_ids(self) -> list[str]:
        prefix = os.path.join(os.path.realpath(self.home), "layers") + "/"
        found = []
        for m in mountinfo():
            if m.fstype in ZFS_FSTYPES and m.mountpoint.startswith(prefix):
                layer_id, _, rest = m.mountpoint[len(prefix):].partition("/")
                if rest == "root":
                    found.append(layer_id)
        return found

    # ---- create ------------------------------------------------------------
    def create(self, layer_id: str, parent: str, opts: CreateOpts) -> None:
        quota = _quota_option(layer_id, opts)
        if parent:
            self.layer_root(parent, "parent layer")
        props = ["-o", "mountpoint=none", "-o", f"{HOME_PROPERTY}={self.home}"]
        if quota:
            props += ["-o", f"quota={quota}"]
        with self.store.staging(layer_id, LayerMeta(parent=parent)) as stage:
            # the (unmounted) mountpoint; Get mounts the dataset over it
            os.mkdir(self.root_of(stage), 0o755)
            self._claim_name(layer_id)
            try:
                if parent:
                    snapshot = f"{self.dataset(parent)}@strata-{uuid.uuid4().hex[:12]}"
                    zfs("snapshot", snapshot)
                    try:
                        zfs("clone", *props, snapshot, self.dataset(layer_id))
                    finally:
                        # deferred: destroyed when the clone is, or now if the clone failed
                        zfs("destroy", "-d", snapshot, retry_busy=True)
                else:
                    zfs("create", *props, self.dataset(layer_id))
            except BaseException:
                self._destroy_dataset(self.dataset(layer_id))
                raise
        log.debug("created %s (parent %s)", layer_id, parent or "-")

    def _claim_name(self, layer_id: str) -> None:
        """Make room for ``<fsname>/<id>``: a leftover of ours goes, anyone else's stays."""
        name = self.dataset(layer_id)
        if not dataset_exists(name):
            return
        owner = zfs("get", "-H", "-o", "value", HOME_PROPERTY, name).strip()
        if owner != self.home:
            raise AlreadyExists(f"layer {layer_id}: dataset {name} exists and is not a layer of "
                                f"{self.home} ({HOME_PROPERTY}={owner}); choose another zfs.fsname")
        log.info("layer %s: destroying leftover dataset %s", layer_id, name)
        self._destroy_dataset(name)

    # ---- get / put ---------------------------------------------------------
    def layer_path(self, layer_id: str, layer_dir: str) -> tuple[str, bool]:
        return self.layer_root(layer_id), True

    def mounts(self, layer_id: str, *, read_only: bool = False) -> list[MountSpec]:
        raise NotSupported(
            f"layer {layer_id}: zfs layers are mounted by setting the dataset's mountpoint "
            "(zfs-fuse has no 'zfs' filesystem type for a mount spec); only Get can mount them")

    def usage(self, layer_id: str) -> tuple[int, int]:
        raise NotSupported(f"layer {layer_id}: a zfs layer's files are only there while "
                           "its dataset is mounted (Get); usage cannot walk it unmounted")

    def activate(self, layer_id: str, layer_dir: str) -> None:
        self._mount(layer_id, self.root_of(layer_dir))

    def _mount(self, layer_id: str, root: str) -> None:
        if _mounted_at(root):
            return  # still mounted: e.g. the plugin died between mount and count
        dataset = self.dataset(layer_id)
        zfs("set", f"mountpoint={root}", dataset, retry_busy=True)
        # Setting the property mounts, unless zfs-fuse still thinks an
        # earlier, asynchronous unmount is pending: then ask again explicitly.
        deadline = time.monotonic() + BUSY_RETRY_SECONDS
        next_nudge = time.monotonic() + 0.5
        while not _mounted_at(root):
            now = time.monotonic()
            if now > deadline:
                raise DeadlineExceeded(f"layer {layer_id}: {dataset} did not appear mounted "
                                       f"at {root} within {BUSY_RETRY_SECONDS}s")
            if now > next_nudge:
                with contextlib.suppress(StrataError):  # "already mounted", "busy"
                    zfs("mount", dataset)
                next_nudge = now + 0.5
            time.sleep(0.02)
        if not self.idmap.empty and not self.store.read_meta(layer_id).parent:
            st = os.lstat(root)
            if (st.st_uid, st.st_gid) == (0, 0):
                os.chown(root, *self.idmap.root_pair())  # a new base layer's root, remapped

    def deactivate(self, layer_id: str, layer_dir: str) -> None:
        self._unmount(layer_id)

    def release_stale_mount(self, layer_id: str) -> None:
        self._unmount(layer_id)

    def _unmount(self, layer_id: str) -> None:
        if not self.store.exists(layer_id):
            return
        root = self.root_of(self.store.layer_dir(layer_id))
        zfs("set", "mountpoint=none", self.dataset(layer_id), retry_busy=True)
        # zfs-fuse unmounts asynchronously; wait so that a Remove or a Get
        # that follows does not race the kernel, but do not fail the Put.
        _wait(lambda: not _mounted_at(root), "", fail=False)

    # ---- delete ------------------------------------------------------------
    def delete_layer(self, layer_id: str, doomed_dir: str) -> None:
        self._destroy_dataset(self.dataset(layer_id))

    def _destroy_dataset(self, name: str) -> None:
        try:
            zfs("destroy", "-r", name, retry_busy=True)
        except ZfsError as e:
            if "does not exist" in e.stderr:
                return
            if "dependent clones" in e.stderr:
                raise Busy(f"dataset {name} has child layers (clones); remove them first") from e
            raise

    def _destroy_orphans(self) -> None:
        """Destroy datasets of this Home that no layer claims (crash leftovers)."""
        out = zfs("list", "-H", "-r", "-d", "1", "-t", "filesystem", "-o",
                  f"name,{HOME_PROPERTY}", self.fsname)
        for line in out.splitlines():
            name, _, owner = line.partition("\t")
            layer_id = name[len(self.fsname) + 1:]
            if owner == self.home and name != self.fsname and not self.store.exists(layer_id):
                log.info("reconcile: destroying orphan dataset %s", name)
                zfs("set", "mountpoint=none", name, retry_busy=True)
                self._destroy_dataset(name)

    # ---- the rest ----------------------------------------------------------
    def status(self) -> list[tuple[str, str]]:
        pool = self.fsname.split("/", 1)[0]
        health = "not available"
        try:
            health = subprocess.run(["zpool", "list", "-H", "-o", "health", pool],
                                    capture_output=True, text=True, check=False,
                                    timeout=COMMAND_TIMEOUT).stdout.strip() or health
            used, avail = zfs("get", "-H", "-p", "-o", "value", "used,available",
                              self.fsname).split()
        except (StrataError, subprocess.TimeoutExpired, ValueError):
            used = avail = "not available"
        xattrs = "yes" if self.xattrs else (
            "no xattrs: zfs-fuse stores none; file capabilities and user.* xattrs of images "
            "are dropped")
        return [("Backend", "zfs"), ("Backing Filesystem", fs_name(self.home)),
                ("Zpool", pool), ("Zpool Health", health), ("Parent Dataset", self.fsname),
                ("Space Used By Parent", used), ("Space Available", avail),
                ("Layers", str(len(self.store.ids()))), ("Xattrs", xattrs)]

    def metadata(self, layer_id: str) -> dict[str, str]:
        return {"Mountpoint": self.layer_root(layer_id),
                "Dataset": self.dataset(layer_id)}

    def cleanup(self) -> None:
        """dockerd shuts down: unmount every layer this Home has mounted."""
        for layer_id in sorted(set(self.mounted_ids()) | set(self.refs.active())):
            with self.refs.lock(layer_id):
                try:
                    self._unmount(layer_id)
                except StrataError as e:
                    log.warning("cleanup: layer %s: %s", layer_id, e)
            self.refs.forget(layer_id)
        self.close()


def _quota_option(layer_id: str, opts: CreateOpts) -> str:
    quota = ""
    for key, value in opts.storage_opt.items():
        if key.lower() != "size":
            raise InvalidArgument(f"layer {layer_id}: zfs: unknown storage option {key!r} "
                                  "(zfs knows only size)")
        quota = value.strip()
    return quota


def _wait(condition: object, what: str, timeout: float = 15.0, fail: bool = True) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            if fail:
                raise DeadlineExceeded(f"timed out after {timeout}s waiting for {what}")
            return
        time.sleep(0.02)


def dataset_of(path: str) -> str | None:
    """The zfs dataset mounted at ``path`` or nearest above it, as Docker finds it.

    mountinfo's source field is the dataset name for zfs and zfs-fuse mounts,
    and it also sees bind mounts of a dataset; ``zfs list`` mountpoints are
    the fallback.
    """
    path = os.path.realpath(path)
    nearest = max((m for m in mountinfo()
                   if path == m.mountpoint or path.startswith(m.mountpoint.rstrip("/") + "/")),
                  key=lambda m: len(m.mountpoint), default=None)
    if nearest is not None and nearest.fstype in ZFS_FSTYPES:
        return nearest.source
    for line in zfs("list", "-H", "-t", "filesystem", "-o", "name,mountpoint").splitlines():
        name, _, mountpoint = line.partition("\t")
        if mountpoint.startswith("/") and (path == mountpoint or path.startswith(mountpoint + "/")):
            return name
    return None


def init(home: str, options: list[str], idmap: IDMappings) -> Driver:
    if shutil.which("zfs") is None:
        raise Prerequisites("zfs: no zfs command on this host (install zfs-fuse, or "
                            "zfsutils-linux with a zfs kernel module)")
    fsname = ""
    for key, value in split_options(options, "zfs").items():
        if key != "fsname":
            raise InvalidArgument(f"zfs: unknown storage option {key} (zfs knows fsname)")
        fsname = value
    try:
        zfs("list", "-H", "-o", "name", "-d", "0")
    except ZfsError as e:
        raise Prerequisites(f"zfs: the zfs command does not answer ({e}); is the zfs "
                            "module loaded or the zfs-fuse daemon running?") from e
    if not fsname:
        fsname = dataset_of(home) or ""
        if not fsname:
            raise Prerequisites(f"zfs: Home {home} is not on a zfs dataset (it is on "
                                f"{fs_name(home)}); put the data root on one or set "
                                "--storage-opt zfs.fsname=<pool/dataset>")
    elif not dataset_exists(fsname):
        raise Prerequisites(f"zfs: dataset {fsname} (zfs.fsname) does not exist")
    if not idmap.empty and KERNEL_ZFS_FSTYPE not in filesystems():
        raise Prerequisites(ZFS_FUSE_USERNS)
    return NaiveDiffDriver(ZfsDriver(home, idmap, fsname), idmap)


register("zfs", init)
