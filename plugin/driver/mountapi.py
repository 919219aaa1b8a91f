"""Mount and unmount with syscalls (no mount(8)): the new mount API and mount(2).

The new API (Linux >= 5.2) builds a filesystem context option by option:
``fsopen`` -> ``fsconfig`` per option -> ``fsconfig(CMD_CREATE)`` -> ``fsmount``
-> ``move_mount`` onto the target.  Each option is its own call, so an overlay
with 500 lower layers is 500 ``fsconfig(SET_STRING, "lowerdir+", path)`` calls
(``lowerdir+`` exists from Linux 6.8) and the one-page limit of mount(2)'s data
string never applies.  Syscall numbers 429-432 are the same on every
architecture (they were allocated after the tables were unified).

mount(2) is the fallback.  Its data string is cut at one page, so long layer
chains need short *relative* paths resolved against the caller's cwd; cwd is
process-wide, so :func:`mount_from` forks a child that ``chdir``s and mounts
(the mount lands in the shared mount namespace) instead of changing the cwd of
a multi-threaded server.

:func:`mount_spec` mounts a :class:`~plugin.driver.base.MountSpec` (what a
backend's ``mounts`` describes, with absolute paths) by whichever of the two
the host has: one ``lowerdir+`` per lower with the new API, or, with mount(2),
every path made relative to the directory they share (containerd compacts
``lowerdir`` the same way).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Sequence

from plugin.driver.base import MountSpec
from plugin.errors import NotSupported

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long

SYS_MOVE_MOUNT, SYS_FSOPEN, SYS_FSCONFIG, SYS_FSMOUNT = 429, 430, 431, 432
FSOPEN_CLOEXEC = 0x1
FSCONFIG_SET_FLAG, FSCONFIG_SET_STRING, FSCONFIG_CMD_CREATE = 0, 1, 6
FSMOUNT_CLOEXEC = 0x1
MOUNT_ATTR_RDONLY = 0x1
MOVE_MOUNT_F_EMPTY_PATH = 0x4
AT_FDCWD = -100
MNT_DETACH = 0x2
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC = 0x1, 0x20, 0x1000, 0x4000
#: Overlay options whose values are paths (``lowerdir`` a ``:``-separated list).
_OVERLAY_PATH_KEYS = ("lowerdir", "upperdir", "workdir")
#: mount(2) copies at most one page of option data (PAGE_SIZE on x86_64 and arm64).
MOUNT_DATA_MAX = os.sysconf("SC_PAGE_SIZE") - 1

#: One option for :func:`fs_mount`: ``(key, value)``; ``value=None`` is a flag.
Option = tuple[str, str | None]


class MountError(OSError):
    """A mount syscall failed; ``detail`` holds the kernel's own message, if any."""

    def __init__(self, err: int, what: str, detail: str = "") -> None:
        message = f"{what}: {os.strerror(err)}" + (f" ({detail})" if detail else "")
        super().__init__(err, message)
        self.detail = detail


def _syscall(number: int, *args: object) -> int:
    ret = int(_libc.syscall(ctypes.c_long(number), *args))
    if ret < 0:
        return -ctypes.get_errno()
    return ret


def _kernel_messages(fs_fd: int) -> str:
    """The error/warning lines the kernel queued on an fs context (``e overlayfs: …``)."""
    lines = []
    while True:
        try:
            data = os.read(fs_fd, 1024)
        except OSError:
            break  # ENODATA: the queue is empty
        if not data:
            break
        lines.append(data.decode("utf-8", "replace").strip())
    return "; ".join(lines)


def fs_mount(fstype: str, source: str, target: str, options: Sequence[Option]) -> None:
    """Mount ``fstype`` on ``target`` through fsopen/fsconfig/fsmount/move_mount."""
    mnt_fd = fs_mount_detached(fstype, source, options, what=target)
    try:
        ret = _syscall(SYS_MOVE_MOUNT, ctypes.c_int(mnt_fd), b"", ctypes.c_int(AT_FDCWD),
                       os.fsencode(target), ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH))
        if ret < 0:
            raise MountError(-ret, f"move_mount onto {target}")
    finally:
        os.close(mnt_fd)


def fs_mount_detached(fstype: str, source: str, options: Sequence[Option], *,
                      read_only: bool = False, what: str = "a detached mount") -> int:
    """A new ``fstype`` mount attached nowhere: the returned fd is its only handle.

    ``/proc/self/fd/<fd>`` reaches its root.  Closing the fd unmounts it, and so
    does the death of the process: a crash leaves no mount behind, and no other
    process sees it in a mount table."""
    fs_fd = _syscall(SYS_FSOPEN, fstype.encode(), ctypes.c_uint(FSOPEN_CLOEXEC))
    if fs_fd < 0:
        raise MountError(-fs_fd, f"fsopen({fstype})")
    try:
        _fsconfig(fs_fd, "source", source)
        for key, value in options:
            _fsconfig(fs_fd, key, value)
        ret = _syscall(SYS_FSCONFIG, ctypes.c_int(fs_fd), ctypes.c_uint(FSCONFIG_CMD_CREATE),
                       None, None, ctypes.c_int(0))
        if ret < 0:
            raise MountError(-ret, f"creating the {fstype} mount for {what}",
                             _kernel_messages(fs_fd))
        mnt_fd = _syscall(SYS_FSMOUNT, ctypes.c_int(fs_fd), ctypes.c_uint(FSMOUNT_CLOEXEC),
                          ctypes.c_uint(MOUNT_ATTR_RDONLY if read_only else 0))
        if mnt_fd < 0:
            raise MountError(-mnt_fd, f"fsmount for {what}", _kernel_messages(fs_fd))
        return mnt_fd
    finally:
        os.close(fs_fd)


def _fsconfig(fs_fd: int, key: str, value: str | None) -> None:
    if value is None:
        ret = _syscall(SYS_FSCONFIG, ctypes.c_int(fs_fd), ctypes.c_uint(FSCONFIG_SET_FLAG),
                       key.encode(), None, ctypes.c_int(0))
    else:
        ret = _syscall(SYS_FSCONFIG, ctypes.c_int(fs_fd), ctypes.c_uint(FSCONFIG_SET_STRING),
                       key.encode(), os.fsencode(value), ctypes.c_int(0))
    if ret < 0:
        shown = key if value is None else f"{key}={value}"
        raise MountError(-ret, f"fsconfig {shown}", _kernel_messages(fs_fd))


def fs_accepts(fstype: str, key: str, value: str | None) -> bool:
    """Whether the kernel's ``fstype`` knows the option ``key`` (nothing is mounted)."""
    fs_fd = _syscall(SYS_FSOPEN, fstype.encode(), ctypes.c_uint(FSOPEN_CLOEXEC))
    if fs_fd < 0:
        return False
    try:
        _fsconfig(fs_fd, key, value)
        return True
    except MountError:
        return False
    finally:
        os.close(fs_fd)


def mount_from(cwd: str, source: str, target: str, fstype: str, data: str) -> None:
    """mount(2) from a forked child whose cwd is ``cwd``, so ``data`` can hold paths
    relative to it; the server's own cwd never changes."""
    raw_target, raw_data = os.fsencode(target), data.encode()
    if len(raw_data) > MOUNT_DATA_MAX:
        raise MountError(errno.E2BIG, f"mount {target}: {len(raw_data)} bytes of options "
                         f"exceed the kernel's {MOUNT_DATA_MAX}-byte limit")
    raw_source, raw_fstype, raw_cwd = source.encode(), fstype.encode(), os.fsencode(cwd)
    pid = os.fork()
    if pid == 0:  # child: only async-signal-safe work, then _exit
        code = 255
        try:
            os.chdir(raw_cwd)
            ok = _libc.mount(raw_source, raw_target, raw_fstype, ctypes.c_ulong(0), raw_data) == 0
            code = 0 if ok else (ctypes.get_errno() or 255)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        err = code if 0 < code < 255 else errno.EIO
        raise MountError(err, f"mount {fstype} on {target} (from {cwd})")


def unmount(target: str, *, detach: bool = True) -> bool:
    """umount2; True if something was unmounted, False if ``target`` was not a mount."""
    if _libc.umount2(os.fsencode(target), ctypes.c_int(MNT_DETACH if detach else 0)) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):
        return False
    raise MountError(err, f"umount {target}")


def mount_spec(spec: MountSpec, target: str, *, new_api: bool) -> None:
    """Mount ``spec`` on ``target``: a bind, or an overlay by the new API
    (``new_api``) or by mount(2) with paths made relative (:func:`compact`)."""
    if spec.type == "bind":
        bind(spec.source, target, read_only="ro" in spec.options,
             recursive="rbind" in spec.options)
    elif spec.type == "overlay" and new_api:
        fs_mount("overlay", spec.source, target, overlay_fsconfig(spec.options))
    elif spec.type == "overlay":
        cwd, options = compact(spec.options)
        mount_from(cwd, spec.source, target, "overlay", ",".join(options))
    else:
        raise NotSupported(f"cannot mount a {spec.type} spec in-process")


def overlay_fsconfig(options: Sequence[str]) -> list[Option]:
    """mount(8)-style overlay options as fsconfig calls: one ``lowerdir+`` per lower."""
    found: list[Option] = []
    for option in options:
        key, sep, value = option.partition("=")
        if key == "lowerdir":
            found.extend(("lowerdir+", lower) for lower in value.split(":"))
        else:
            found.append((key, value if sep else None))
    return found


def compact(options: Sequence[str]) -> tuple[str, list[str]]:
    """The directory every path option shares, and the options with their paths
    made relative to it (for mount(2), whose option data is one page)."""
    paths = []
    for option in options:
        key, _, value = option.partition("=")
        if key in _OVERLAY_PATH_KEYS:
            paths.extend(value.split(":") if key == "lowerdir" else [value])
    if not paths:
        return "/", list(options)
    common = os.path.commonpath(paths)
    rewritten = []
    for option in options:
        key, _, value = option.partition("=")
        if key in _OVERLAY_PATH_KEYS:
            relative = [os.path.relpath(path, common) for path in value.split(":")]
            option = f"{key}={':'.join(relative)}"
        rewritten.append(option)
    return common, rewritten


def bind(source: str, target: str, *, read_only: bool, recursive: bool) -> None:
    """Bind ``source`` on ``target``; read-only takes a second, remounting call."""
    flags = MS_BIND | (MS_REC if recursive else 0)
    _mount2(source, target, flags, f"bind {source} on {target}")
    if read_only:
        _mount2("none", target, flags | MS_REMOUNT | MS_RDONLY,
                f"remounting {target} read-only")


def _mount2(source: str, target: str, flags: int, what: str) -> None:
    if _libc.mount(os.fsencode(source), os.fsencode(target), None, ctypes.c_ulong(flags),
                   None) != 0:
        raise MountError(ctypes.get_errno(), what)
