"""What the host supports, found in one place (STYLE 4).

Each probe returns a plain typed value; backends decide with it and Status
shows it.  Model: moby ``overlay2/check.go``, containerd ``overlayutils``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import gzip
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass

from plugin.driver import mountapi

# statfs(2) f_type values (linux/magic.h) of the filesystems strata meets.
FS_MAGIC: dict[int, str] = {
    0xEF53: "extfs",
    0x58465342: "xfs",
    0x9123683E: "btrfs",
    0x794C7630: "overlayfs",
    0x01021994: "tmpfs",
    0x2FC12FC1: "zfs",
    0x65735546: "fuse",
    0xE0F5E1E2: "erofs",
    0x73717368: "squashfs",
    0x6969: "nfs",
    0x858458F6: "ramfs",
    0x61756673: "aufs",
}

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class _Statfs(ctypes.Structure):
    # struct statfs on 64-bit Linux: f_type is the first long; 120 bytes in all.
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 112)]


def fs_magic(path: str) -> int:
    buf = _Statfs()
    if _libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(buf.f_type) & 0xFFFFFFFF


def fs_name(path: str) -> str:
    """Name of the filesystem holding ``path`` (nearest existing ancestor)."""
    while not os.path.exists(path) and path != os.path.dirname(path):
        path = os.path.dirname(path)
    magic = fs_magic(path)
    return FS_MAGIC.get(magic, f"unknown (0x{magic:x})")


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    mountpoint: str
    fstype: str
    source: str
    options: str


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    if "\\" not in field:
        return field
    raw = os.fsencode(field)
    out = bytearray()
    i = 0
    while i < len(raw):
        if raw[i] == 0x5C and i + 3 < len(raw) + 1 and raw[i + 1 : i + 4].isdigit():
            out.append(int(raw[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return os.fsdecode(bytes(out))


def mountinfo(path: str = "/proc/self/mountinfo") -> list[MountEntry]:
    entries = []
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            fstype, source, *rest = right.split()
            entries.append(
                MountEntry(int(fields[0]), _unescape(fields[4]), fstype, _unescape(source),
                           rest[0] if rest else "")
            )
    return entries


def mounts_under(prefix: str) -> list[str]:
    """Mountpoints at or below ``prefix``, deepest first (the order to unmount)."""
    prefix = prefix.rstrip("/")
    found = {m.mountpoint for m in mountinfo()
             if m.mountpoint == prefix or m.mountpoint.startswith(prefix + "/")}
    return sorted(found, key=lambda p: p.count("/"), reverse=True)


def mount_of(path: str) -> MountEntry | None:
    """The mount ``path`` is on: the deepest mountpoint at or above it."""
    real = os.path.realpath(path)
    return max((m for m in mountinfo()
                if real == m.mountpoint or real.startswith(m.mountpoint.rstrip("/") + "/")),
               key=lambda m: len(m.mountpoint), default=None)


#: The kernel option each filesystem's project quotas need.
_PROJECT_QUOTA_CONFIG = {"xfs": "CONFIG_XFS_QUOTA", "ext4": "CONFIG_QFMT_V2"}
_PROJECT_QUOTA_OPTIONS = {"prjquota", "pquota", "pqnoenforce"}


def kernel_config(option: str) -> str | None:
    """``y``/``m``/``unset`` for a kernel config option, None when the kernel does
    not publish its config (no /proc/config.gz)."""
    try:
        with gzip.open("/proc/config.gz", "rt", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(option + "="):
                    return line.strip().partition("=")[2]
    except OSError:
        return None
    return "unset"


def project_quota_finding(path: str) -> str:
    """What this host offers ``path`` for per-layer size limits by project
    quota (overlay2's and vfs's way), in words for an error message."""
    fs = fs_name(path)
    if fs not in _PROJECT_QUOTA_CONFIG:
        return f"{path} is on {fs}, which has no project quotas"
    config = _PROJECT_QUOTA_CONFIG[fs]
    if kernel_config(config) == "unset":
        return f"{path} is on {fs} and this kernel is built without {config}"
    entry = mount_of(path)
    enabled = _PROJECT_QUOTA_OPTIONS & set(entry.options.split(",") if entry else ())
    if not enabled:
        return f"{path} is on {fs} mounted without prjquota"
    return (f"{path} is on {fs} mounted with {','.join(sorted(enabled))}, but strata "
            "sets project quotas on no backend")


def size_limit_refusal(backend: str, home: str) -> str:
    """The Err text for a ``size`` storage option on a backend without limits."""
    return (f"{backend} cannot limit a layer's size: that needs project quotas, and "
            f"{project_quota_finding(home)}; use the btrfs backend (qgroup limits) for "
            "per-layer sizes")


def filesystems() -> set[str]:
    """Filesystem types the running kernel knows (/proc/filesystems)."""
    with open("/proc/filesystems", encoding="ascii") as f:
        return {line.split()[-1] for line in f if line.strip()}


# ---- overlay: d_type, trusted xattrs, a test mount ------------------------------

_SYS_GETDENTS64 = {"x86_64": 217, "aarch64": 61, "riscv64": 61, "ppc64le": 202, "s390x": 220}
_DT_UNKNOWN, _DT_REG = 0, 8
_OVERLAY_MAGIC = 0x794C7630
#: Backing filesystems overlay cannot use as upper (moby overlay2 refuses the same).
_OVERLAY_INCOMPATIBLE = {_OVERLAY_MAGIC: "overlayfs", 0x61756673: "aufs", 0xF15F: "ecryptfs"}


class _Dirent64Header(ctypes.Structure):
    # struct linux_dirent64 without its trailing name
    _fields_ = [("d_ino", ctypes.c_uint64), ("d_off", ctypes.c_int64),
                ("d_reclen", ctypes.c_uint16), ("d_type", ctypes.c_uint8)]


def dirent_types(directory: str) -> dict[str, int]:
    """name -> d_type straight from getdents64(2).

    ``os.scandir`` hides a filesystem without d_type (it falls back to stat),
    so it cannot tell; this reads the kernel's own answer.
    """
    number = _SYS_GETDENTS64.get(os.uname().machine)
    if number is None:
        raise OSError(f"getdents64 syscall number unknown on {os.uname().machine}")
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    buf = ctypes.create_string_buffer(32768)
    found: dict[str, int] = {}
    try:
        while True:
            n = int(_libc.syscall(ctypes.c_long(number), ctypes.c_int(fd), buf,
                                  ctypes.c_uint(len(buf))))
            if n < 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err), directory)
            if n == 0:
                return found
            offset = 0
            while offset < n:
                head = _Dirent64Header.from_buffer(buf, offset)
                name_start = offset + _Dirent64Header.d_type.offset + 1  # d_name follows
                raw = buf.raw[name_start:offset + head.d_reclen].split(b"\0", 1)[0]
                found[os.fsdecode(raw)] = head.d_type
                offset += head.d_reclen
    finally:
        os.close(fd)


def supports_d_type(directory: str) -> bool:
    """Whether the filesystem of ``directory`` fills in d_type (xfs needs ftype=1)."""
    probe = os.path.join(directory, f".strata-dtype-{os.getpid()}")
    with open(probe, "wb"):
        pass
    try:
        return dirent_types(directory).get(os.path.basename(probe), _DT_UNKNOWN) == _DT_REG
    finally:
        os.unlink(probe)


def supports_trusted_xattrs(directory: str) -> bool:
    """Whether ``trusted.*`` xattrs can be set there (overlay whiteout/opaque metadata)."""
    probe = os.path.join(directory, f".strata-xattr-{os.getpid()}")
    os.mkdir(probe)
    try:
        os.setxattr(probe, "trusted.overlay.opaque", b"y")
        return os.getxattr(probe, "trusted.overlay.opaque") == b"y"
    except OSError:
        return False
    finally:
        os.rmdir(probe)


def in_user_namespace() -> bool:
    """True unless this process sees the initial user namespace's full id range."""
    try:
        with open("/proc/self/uid_map", encoding="ascii") as f:
            rows = [line.split() for line in f if line.strip()]
    except OSError:
        return False
    return rows != [["0", "0", "4294967295"]]


def can_traverse(st: os.stat_result, uid: int, gid: int) -> bool:
    """Whether ``uid``/``gid`` with no capabilities and no supplementary groups may
    search the directory ``st``: the owner's bit for its owner, else the group's
    for its group, else the others' (POSIX ACLs are not looked at)."""
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == gid:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def blocked_ancestor(path: str, uid: int, gid: int) -> str | None:
    """The first directory from ``/`` down to ``path``'s parent that ``uid``:``gid``
    cannot pass through (dockerd's own check of its data root for
    ``--userns-remap``), or None."""
    parts = os.path.realpath(path).split("/")[1:-1]
    current = "/"
    for part in ["", *parts]:
        current = os.path.join(current, part)
        try:
            st = os.stat(current)
        except FileNotFoundError:
            return None  # made later, by whoever makes it
        if not can_traverse(st, uid, gid):
            return current
    return None


@dataclass(frozen=True)
class OverlaySupport:
    """What the kernel's overlayfs does on one backing filesystem (shown in Status)."""

    backing_fs: str
    d_type: bool
    #: fsopen/fsconfig with ``lowerdir+`` works (500 lowers); else mount(2) only.
    new_mount_api: bool
    #: Empty when an upper dir is a complete diff; otherwise why it is not.
    naive_reason: str
    #: Mount with ``userxattr`` (unprivileged user namespace).
    userxattr: bool


def overlay_backing_problem(home: str) -> str | None:
    """Why overlay cannot keep its upper dirs under ``home``, or None."""
    magic = fs_magic(home)
    if magic in _OVERLAY_INCOMPATIBLE:
        return (f"{home} is on {_OVERLAY_INCOMPATIBLE[magic]}, which overlayfs cannot use as an "
                "upper layer; put the data root on ext4, xfs (ftype=1) or btrfs")
    if not supports_d_type(home):
        return (f"the backing filesystem of {home} ({fs_name(home)}) does not return d_type; "
                "overlay needs it (reformat xfs with `mkfs.xfs -n ftype=1`)")
    if not supports_trusted_xattrs(home):
        return (f"cannot set trusted.* xattrs under {home} ({fs_name(home)}); overlay keeps "
                "whiteouts and opaque dirs in them (needs CAP_SYS_ADMIN in the initial "
                "user namespace; use fuse-overlayfs otherwise)")
    return None


def probe_overlay(home: str, *, allow_new_api: bool = True) -> OverlaySupport:
    """Mount a throwaway overlay under ``home`` the way the backend will, and see
    whether its upper dir is a complete diff (moby ``overlay2/check.go``).

    Raises OSError if the test mount itself fails; call
    :func:`overlay_backing_problem` first for the common, explainable causes.
    """
    new_api = allow_new_api and mountapi.fs_accepts("overlay", "lowerdir+", home)
    userxattr = in_user_namespace()
    with tempfile.TemporaryDirectory(prefix=".strata-overlay-probe-", dir=home) as tmp:
        lower, upper, work, merged = (os.path.join(tmp, d) for d in ("l", "u", "w", "m"))
        for d in (lower, upper, work, merged):
            os.mkdir(d)
        for d in ("renamed/sub", "recreated/sub"):
            os.makedirs(os.path.join(lower, d))
        with open(os.path.join(lower, "meta"), "wb") as f:
            f.write(b"x" * 4096)
        extra: list[tuple[str, str | None]] = [("index", "off")]
        if userxattr:
            extra.append(("userxattr", None))
        if new_api:
            mountapi.fs_mount("overlay", "overlay", merged, [
                ("lowerdir+", lower), ("upperdir", upper), ("workdir", work), *extra])
        else:
            data = ",".join(["lowerdir=l,upperdir=u,workdir=w",
                             *(k if v is None else f"{k}={v}" for k, v in extra)])
            mountapi.mount_from(tmp, "overlay", merged, "overlay", data)
        try:
            reason = _upper_is_incomplete_diff(merged, upper, "user" if userxattr else "trusted")
        finally:
            mountapi.unmount(merged)
    return OverlaySupport(backing_fs=fs_name(home), d_type=True, new_mount_api=new_api,
                          naive_reason=reason, userxattr=userxattr)


def _upper_is_incomplete_diff(merged: str, upper: str, xattr_ns: str) -> str:
    """Why the upper dir of this mount is not the layer's whole diff ('' if it is)."""
    try:
        os.rename(os.path.join(merged, "renamed"), os.path.join(merged, "renamed2"))
    except OSError as e:
        if e.errno != errno.EXDEV:  # EXDEV: redirect_dir is off, userspace copies
            raise
    else:
        if _has_xattr(os.path.join(upper, "renamed2"), f"{xattr_ns}.overlay.redirect"):
            return "redirect_dir is on: a renamed directory is a redirect, not a copy"
    os.chown(os.path.join(merged, "meta"), 1, 1)
    if _has_xattr(os.path.join(upper, "meta"), f"{xattr_ns}.overlay.metacopy"):
        return "metacopy is on: a copied-up file may hold metadata only"
    shutil.rmtree(os.path.join(merged, "recreated"))
    os.mkdir(os.path.join(merged, "recreated"))
    if not _has_xattr(os.path.join(upper, "recreated"), f"{xattr_ns}.overlay.opaque"):
        return "the kernel did not mark a recreated directory opaque"
    return ""


def _has_xattr(path: str, name: str) -> bool:
    try:
        os.getxattr(path, name, follow_symlinks=False)
        return True
    except OSError:
        return False


#: The user ``dockerd --userns-remap=default`` maps containers to (it creates it).
REMAP_USER = "dockremap"


def subordinate_start(user: str, path: str) -> int | None:
    """The first id of ``user``'s first range in /etc/subuid or /etc/subgid, or None."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                name, _, rest = line.strip().partition(":")
                if name == user and rest.count(":") == 1:
                    return int(rest.partition(":")[0])
    except (OSError, ValueError):
        return None
    return None


def userns_report(home: str) -> list[tuple[str, str]]:
    """Whether this host can run user-namespaced containers (``dockerd
    --userns-remap``) on strata, and on which backend; why not where not."""
    try:
        with open("/proc/sys/user/max_user_namespaces", encoding="ascii") as f:
            allowed = int(f.read()) > 0
    except (OSError, ValueError):
        allowed = False
    uid = subordinate_start(REMAP_USER, "/etc/subuid")
    gid = subordinate_start(REMAP_USER, "/etc/subgid")
    rows = [("user namespaces", "yes" if allowed else "no: user.max_user_namespaces is 0 "
             "or the kernel lacks CONFIG_USER_NS")]
    if uid is None or gid is None:
        rows.append((f"userns-remap ({REMAP_USER})", "no ranges yet: dockerd "
                     "--userns-remap=default adds the user and /etc/subuid, /etc/subgid"))
    else:
        blocked = blocked_ancestor(os.path.join(home, "x"), uid, gid)
        rows.append((f"userns-remap ({REMAP_USER})", f"uid {uid}, gid {gid}; " + (
            f"{blocked} lacks o+x: dockerd refuses such a data root" if blocked
            else f"{home} is reachable")))
    kernel = filesystems()
    fuse = os.path.exists("/dev/fuse") and shutil.which("fuse-overlayfs") is not None
    for backend, ok, why in (
        ("vfs", True, ""),
        ("overlay", "overlay" in kernel, "no overlayfs in the kernel"),
        ("btrfs", "btrfs" in kernel, "no btrfs in the kernel"),
        ("fuse-overlayfs", fuse, "no /dev/fuse or no fuse-overlayfs program"),
        ("zfs", "zfs" in kernel, "zfs-fuse (or no zfs): it checks permissions with the "
         "caller's host uid, so a remapped root cannot chown; needs kernel ZFS"),
    ):
        rows.append((f"userns on {backend}", "yes" if allowed and ok else
                     "no: " + (why or "no user namespaces")))
    return rows
