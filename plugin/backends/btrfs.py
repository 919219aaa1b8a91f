"""btrfs: a subvolume per layer; a child layer is a snapshot of its parent's.

Layout: ``Home/layers/<id>/root`` *is* the layer's subvolume.  Create makes it
(empty subvolume, or snapshot of the parent's ``root``) inside the staging dir
and renames the staging dir into ``layers/``: a subvolume is only a directory
entry in its parent's tree, so renaming the directory that holds it inside one
subvolume (Home's) is an ordinary rename (tests/unit/test_btrfs_backend.py
proves it).  Nothing is mounted: Get returns the subvolume's path.

Why ioctls (``fcntl.ioctl``) rather than the ``btrfs`` CLI: a snapshot is one
syscall instead of a fork+exec of btrfs-progs per layer (docs/host.md §2;
for a small layer that fork+exec would be nearly the whole cost of the
snapshot), the answer is an errno we can map to a typed
error instead of text to parse, and the plugin needs no btrfs-progs at run
time.  The struct layouts (``btrfs_ioctl_vol_args[_v2]``, qgroup limit,
quota ctl, ino lookup) are from ``include/uapi/linux/btrfs.h`` and were
checked on this kernel.

Size limits (``StorageOpt size``, as Docker's btrfs driver): a qgroup limit on
the referenced bytes of the layer's subvolume, so writes beyond it fail with
EDQUOT.  Quotas are enabled on first use (or at Init when ``btrfs.min_space``
is set), like Docker.  Unlike Docker, Cleanup does not disable quotas: that
would drop every limit on a filesystem other tools may share; Get re-applies a
layer's recorded limit anyway, in case someone else turned quotas off.

Remove destroys nested subvolumes first (a container may have created
subvolumes inside its layer; SNAP_DESTROY refuses a subvolume that still holds
one), as moby ``btrfs/btrfs.go`` ``subvolDelete`` does.  Model: that file.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import struct
import uuid

from plugin.backends.common import RefCountedStore
from plugin.driver.base import CreateOpts, Driver, ProtoDriver
from plugin.driver.naive import NaiveDiffDriver
from plugin.driver.probes import fs_magic, fs_name
from plugin.driver.registry import register, split_options
from plugin.errors import IncompatibleFS, InvalidArgument, StrataError
from plugin.idtools import IDMappings
from plugin.state.layers import LayerMeta

log = logging.getLogger("strata.backend.btrfs")

BTRFS_SUPER_MAGIC = 0x9123683E
#: Inode number of every subvolume's root directory (BTRFS_FIRST_FREE_OBJECTID).
SUBVOL_ROOT_INO = 256

# ioctl request numbers: _IOW/_IOR/_IOWR(0x94, nr, size) from linux/btrfs.h.
IOC_SNAP_DESTROY = 0x5000940F      # _IOW(0x94, 15, btrfs_ioctl_vol_args)      4096 B
IOC_INO_LOOKUP = 0xD0009412        # _IOWR(0x94, 18, btrfs_ioctl_ino_lookup)   4096 B
IOC_SNAP_CREATE_V2 = 0x50009417    # _IOW(0x94, 23, btrfs_ioctl_vol_args_v2)   4096 B
IOC_SUBVOL_CREATE_V2 = 0x50009418  # _IOW(0x94, 24, btrfs_ioctl_vol_args_v2)   4096 B
IOC_QUOTA_CTL = 0xC0109428         # _IOWR(0x94, 40, btrfs_ioctl_quota_ctl)      16 B
IOC_QGROUP_CREATE = 0x4010942A     # _IOW(0x94, 42, btrfs_ioctl_qgroup_create)   16 B
IOC_QGROUP_LIMIT = 0x8030942B      # _IOR(0x94, 43, btrfs_ioctl_qgroup_limit)    48 B
IOC_FS_INFO = 0x8400941F           # _IOR(0x94, 31, btrfs_ioctl_fs_info_args)  1024 B

_VOL_ARGS_V2 = struct.Struct("=qQQ4Q4040s")  # fd, transid, flags, unused[4], name
_VOL_ARGS = struct.Struct("=q4088s")          # fd, name
_QUOTA_ENABLE = 1
_QGROUP_LIMIT_MAX_RFER = 1
_NAME_MAX = 255

_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgtp]?)i?b?$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Docker's ``units.RAMInBytes``: ``20M``, ``1.5g``, ``512kb``, ``1024`` (binary units)."""
    match = _SIZE_RE.match(text.strip())
    if not match:
        raise InvalidArgument(f"invalid size {text!r}: expected a number with an optional "
                              "unit (b, k, m, g, t, p), e.g. 20M")
    factor = 1024 ** " kmgtp".index(match.group(2).lower() or " ")
    return int(float(match.group(1)) * factor)


# ---- ioctls ------------------------------------------------------------------

def _open_dir(path: str) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _ioctl(path: str, request: int, buf: bytearray, what: str) -> bytearray:
    fd = _open_dir(path)
    try:
        fcntl.ioctl(fd, request, buf, True)
    except OSError as e:
        raise OSError(e.errno, f"{what}: {os.strerror(e.errno or 0)}", path) from None
    finally:
        os.close(fd)
    return buf


def _checked_name(name: str) -> bytes:
    raw = os.fsencode(name)
    if b"/" in raw or not 0 < len(raw) <= _NAME_MAX:
        raise InvalidArgument(f"subvolume name {name!r} is not a single path component")
    return raw


def subvol_create(parent_dir: str, name: str) -> None:
    buf = bytearray(_VOL_ARGS_V2.pack(0, 0, 0, 0, 0, 0, 0, _checked_name(name)))
    _ioctl(parent_dir, IOC_SUBVOL_CREATE_V2, buf, f"creating subvolume {name}")


def subvol_snapshot(source: str, parent_dir: str, name: str) -> None:
    src_fd = _open_dir(source)
    try:
        buf = bytearray(_VOL_ARGS_V2.pack(src_fd, 0, 0, 0, 0, 0, 0, _checked_name(name)))
        _ioctl(parent_dir, IOC_SNAP_CREATE_V2, buf, f"snapshotting {source} as {name}")
    finally:
        os.close(src_fd)


def is_subvolume(path: str) -> bool:
    st = os.lstat(path)
    return st.st_ino == SUBVOL_ROOT_INO and os.path.isdir(path) and not os.path.islink(path)


def subvol_id(path: str) -> int:
    """The subvolume (tree) id of ``path``'s subvolume, which is also its level-0 qgroup id."""
    buf = bytearray(struct.pack("=QQ4080s", 0, SUBVOL_ROOT_INO, b""))
    _ioctl(path, IOC_INO_LOOKUP, buf, "looking up the subvolume id")
    return int(struct.unpack_from("=Q", buf)[0])


def subvol_delete(parent_dir: str, name: str) -> None:
    """Destroy ``parent_dir/name`` and every subvolume nested inside it, deepest first."""
    path = os.path.join(parent_dir, name)
    for nested_parent, nested_name in _nested_subvolumes(path):
        subvol_delete(nested_parent, nested_name)
    buf = bytearray(_VOL_ARGS.pack(0, _checked_name(name)))
    _ioctl(parent_dir, IOC_SNAP_DESTROY, buf, f"destroying subvolume {name}")


def _nested_subvolumes(top: str) -> list[tuple[str, str]]:
    # Walk without entering nested subvolumes: subvol_delete recurses into
    # each one itself, so its own nested subvolumes are destroyed first.
    found, pending = [], [top]
    while pending:
        directory = pending.pop()
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            continue
        for entry in entries:
            if not entry.is_dir(follow_symlinks=False):
                continue
            if entry.stat(follow_symlinks=False).st_ino == SUBVOL_ROOT_INO:
                found.append((directory, entry.name))
            else:
                pending.append(entry.path)
    return found


def quota_enable(path: str) -> None:
    # The kernel answers 0 when quotas are already on; the first enable starts
    # a rescan that runs in the background.
    _ioctl(path, IOC_QUOTA_CTL, bytearray(struct.pack("=QQ", _QUOTA_ENABLE, 0)),
           "enabling quotas")


def qgroup_limit(subvolume: str, max_referenced: int) -> None:
    """Limit the referenced bytes of ``subvolume`` (qgroupid 0 = the fd's own subvolume)."""
    buf = bytearray(struct.pack("=QQQQQQ", 0, _QGROUP_LIMIT_MAX_RFER, max_referenced, 0, 0, 0))
    _ioctl(subvolume, IOC_QGROUP_LIMIT, buf, f"limiting the qgroup to {max_referenced} bytes")


def qgroup_destroy(fs_path: str, qgroupid: int) -> None:
    buf = bytearray(struct.pack("=QQ", 0, qgroupid))  # create=0: destroy
    _ioctl(fs_path, IOC_QGROUP_CREATE, buf, f"destroying qgroup 0/{qgroupid}")


def quotas_enabled(path: str) -> bool:
    """Whether quotas are on for the filesystem of ``path``.

    sysfs lists ``qgroups/`` under ``/sys/fs/btrfs/<fsid>/`` exactly while
    they are; FS_INFO gives the fsid (st_dev is per subvolume, so no help).
    """
    buf = _ioctl(path, IOC_FS_INFO, bytearray(1024), "reading the filesystem info")
    fsid = str(uuid.UUID(bytes=bytes(buf[16:32])))
    return os.path.isdir(os.path.join("/sys/fs/btrfs", fsid, "qgroups"))


# ---- the driver --------------------------------------------------------------

class BtrfsDriver(RefCountedStore, ProtoDriver):
    name = "btrfs"

    def __init__(self, home: str, idmap: IDMappings, min_space: int) -> None:
        self.min_space = min_space
        # Leftovers of a crash hold subvolumes: destroy them with the ioctl
        # before the generic reconcile deletes what remains file by file.
        for leftover_dir in ("staging", "trash"):
            _destroy_subvolumes_under(os.path.join(home, leftover_dir))
        super().__init__(home, idmap, needs_mount=False)
        if min_space:
            quota_enable(home)

    # ---- create ------------------------------------------------------------
    def create(self, layer_id: str, parent: str, opts: CreateOpts) -> None:
        size = self._size_option(layer_id, opts)
        parent_root = self.layer_root(parent, "parent layer") if parent else ""
        meta = LayerMeta(parent=parent, extra={"size": str(size)} if size else {})
        with self.store.staging(layer_id, meta) as stage:
            try:
                if parent_root:
                    subvol_snapshot(parent_root, stage, "root")
                else:
                    subvol_create(stage, "root")
                    root = self.root_of(stage)
                    os.chown(root, *self.idmap.root_pair())
                    os.chmod(root, 0o755)
                if size:
                    self._limit(self.root_of(stage), size)
            except BaseException:
                # The staging context deletes the directory; the subvolume in
                # it goes first, by ioctl (rmtree would empty it file by file).
                _destroy_subvolumes_under(stage)
                raise
        log.debug("created %s (parent %s, size %s)", layer_id, parent or "-", size or "-")

    def _size_option(self, layer_id: str, opts: CreateOpts) -> int:
        size = 0
        for key, value in opts.storage_opt.items():
            if key.lower() != "size":
                raise InvalidArgument(f"layer {layer_id}: btrfs: unknown storage option {key!r} "
                                      "(btrfs knows only size)")
            size = parse_size(value)
            if size <= 0:
                raise InvalidArgument(f"layer {layer_id}: btrfs: invalid storage size {value!r}")
            if self.min_space and size < self.min_space:
                raise InvalidArgument(f"layer {layer_id}: btrfs: storage size {value} is less than "
                                      f"btrfs.min_space ({self.min_space} bytes)")
        return size

    def _limit(self, subvolume: str, size: int) -> None:
        try:
            qgroup_limit(subvolume, size)
        except OSError as e:
            if e.errno != errno.ENOTCONN:  # ENOTCONN: quotas are off; enable on first use
                raise
            log.info("enabling btrfs quotas on %s for a size limit", self.home)
            quota_enable(self.home)
            qgroup_limit(subvolume, size)

    # ---- get / delete --------------------------------------------------------
    def _size_limit(self, layer_id: str) -> int:
        return int(self.store.read_meta(layer_id).extra.get("size", "0"))

    def layer_path(self, layer_id: str, layer_dir: str) -> tuple[str, bool]:
        # With a size limit the first Get re-applies it (someone may have
        # turned quotas off): that Get stays in the pool.
        return self.layer_root(layer_id), bool(self._size_limit(layer_id))

    def activate(self, layer_id: str, layer_dir: str) -> None:
        size = self._size_limit(layer_id)
        if size:
            self._limit(self.root_of(layer_dir), size)

    def delete_layer(self, layer_id: str, doomed_dir: str) -> None:
        self._destroy_layer_subvolume(doomed_dir)

    def _destroy_layer_subvolume(self, layer_dir: str) -> None:
        root = self.root_of(layer_dir)
        if not os.path.lexists(root) or not is_subvolume(root):
            return
        qgroupid = subvol_id(root)
        subvol_delete(layer_dir, "root")
        # The level-0 qgroup outlives its subvolume unless destroyed (Docker
        # destroys it too).  Kernels >= 6.8 refuse with EBUSY until the
        # cleaner has dropped the subvolume and then delete it themselves,
        # so a failure here is only logged.
        try:
            qgroup_destroy(self.home, qgroupid)
        except OSError as e:
            if e.errno not in (errno.ENOTCONN, errno.ENOENT, errno.EBUSY, errno.EINVAL):
                log.warning("layer dir %s: could not destroy qgroup 0/%d: %s",
                            layer_dir, qgroupid, e)

    # ---- the rest ----------------------------------------------------------
    def status(self) -> list[tuple[str, str]]:
        rows = [("Backend", "btrfs"), ("Backing Filesystem", fs_name(self.home)),
                ("Layers", str(len(self.store.ids()))),
                ("Quotas", "enabled" if quotas_enabled(self.home) else "disabled (enabled on "
                 "first --storage-opt size)")]
        if self.min_space:
            rows.append(("Min Space", str(self.min_space)))
        return rows

    def metadata(self, layer_id: str) -> dict[str, str]:
        return {"Dir": self.layer_root(layer_id)}

    def cleanup(self) -> None:
        self.close()


def _destroy_subvolumes_under(directory: str) -> None:
    """Destroy the subvolumes directly or deeply inside ``directory`` (crash leftovers)."""
    for parent_dir, name in _nested_subvolumes(directory) if os.path.isdir(directory) else []:
        try:
            subvol_delete(parent_dir, name)
        except OSError as e:
            log.warning("could not destroy leftover subvolume %s/%s: %s", parent_dir, name, e)


def init(home: str, options: list[str], idmap: IDMappings) -> Driver:
    try:
        magic = fs_magic(home)
    except OSError as e:
        raise StrataError(f"btrfs: cannot stat the filesystem of Home {home}: {e}") from e
    if magic != BTRFS_SUPER_MAGIC:
        raise IncompatibleFS(f"btrfs: Home {home} is on {fs_name(home)}, not btrfs; put the "
                             "data root on a btrfs filesystem to use this backend")
    min_space = 0
    for key, value in split_options(options, "btrfs").items():
        if key != "min_space":
            raise InvalidArgument(f"btrfs: unknown storage option {key} (btrfs knows min_space)")
        min_space = parse_size(value)
    return NaiveDiffDriver(BtrfsDriver(home, idmap, min_space), idmap)


register("btrfs", init)
