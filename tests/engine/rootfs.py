"""The busybox root file system every engine test imports.

Besides enough of busybox to run shell commands, ``/fid`` holds one of each
thing a layer store tends to lose: a hardlink pair, relative and absolute
symlinks, a fifo, a char device, setuid/setgid/sticky modes, files owned by
1000:1000, xattrs (``user.test`` and a raw v2 ``security.capability``), a
non-UTF-8 name and a 150-byte name. ``/etc/victim``, ``/etc/motd`` and
``/opt/dir1/file`` are what the diff and build tests delete or change.
"""

from __future__ import annotations

import os
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

BUSYBOX = Path("/bin/busybox")

# struct vfs_cap_data, revision 2 (include/uapi/linux/capability.h):
# magic_etc = VFS_CAP_REVISION_2 | VFS_CAP_FLAGS_EFFECTIVE, then
# {permitted, inheritable} for caps 0-31 and 32-63. CAP_NET_BIND_SERVICE = 10.
CAP_NET_BIND_SERVICE_V2 = struct.pack("<IIIII", 0x02000000 | 0x1, 1 << 10, 0, 0, 0)
USER_XATTR = ("user.test", b"strata-xattr-value")

NON_UTF8_NAME = b"bad-\xff\xfe-name"
LONG_NAME = "L" * 150
MOTD = "hello from motd\n"
PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = "root:x:0:\nnogroup:x:65534:\n"


def _write(path: Path, text: str | bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    path.chmod(mode)


def populate(root: Path) -> None:
    for name, mode in (
        ("bin", 0o755),
        ("etc", 0o755),
        ("tmp", 0o1777),
        ("root", 0o700),
        ("proc", 0o555),
        ("sys", 0o555),
        ("dev", 0o755),
        ("opt", 0o755),
        ("var", 0o755),
        ("fid", 0o755),
    ):
        (root / name).mkdir(mode=mode)
        (root / name).chmod(mode)  # mkdir's mode is filtered by the umask

    (root / "bin/busybox").write_bytes(BUSYBOX.read_bytes())
    (root / "bin/busybox").chmod(0o755)
    applets = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, check=True)
    for applet in applets.stdout.split():
        if applet != "busybox":
            (root / "bin" / applet).symlink_to("busybox")

    _write(root / "etc/passwd", PASSWD)
    _write(root / "etc/group", GROUP)
    _write(root / "etc/motd", MOTD)
    _write(root / "etc/victim", "delete me\n")
    _write(root / "opt/dir1/file", "lower file in dir1\n")
    _write(root / "opt/keep.txt", "kept\n")

    fid = root / "fid"
    _write(fid / "hl_a", "hardlinked content\n")
    os.link(fid / "hl_a", fid / "hl_b")
    (fid / "sym").symlink_to("hl_a")
    (fid / "abssym").symlink_to("/etc/passwd")
    os.mkfifo(fid / "fifo", 0o640)
    os.mknod(fid / "null", 0o666 | 0o020000, os.makedev(1, 3))
    _write(fid / "suid", "#!/bin/sh\necho suid\n", 0o755)
    (fid / "suid").chmod(0o4755)
    (fid / "sgid_dir").mkdir()
    (fid / "sgid_dir").chmod(0o2755)
    (fid / "sticky").mkdir()
    (fid / "sticky").chmod(0o1777)
    _write(fid / "owned", "owned by 1000\n", 0o640)
    os.chown(fid / "owned", 1000, 1000)
    (fid / "owned_dir").mkdir()
    (fid / "owned_dir").chmod(0o750)
    os.chown(fid / "owned_dir", 1000, 1000)
    _write(fid / "owned_dir/inner", "inner\n", 0o600)
    os.chown(fid / "owned_dir/inner", 1000, 1000)
    # chown clears security.capability, so the xattrs go on last
    _write(fid / "xattr", "file with xattrs\n", 0o755)
    os.setxattr(fid / "xattr", *USER_XATTR)
    os.setxattr(fid / "xattr", "security.capability", CAP_NET_BIND_SERVICE_V2)
    _write(fid / "empty", b"")
    _write(fid / "big.bin", os.urandom(1 << 20))
    _write(fid / os.fsdecode(NON_UTF8_NAME), "non-utf8 name\n")
    _write(fid / LONG_NAME, "long name\n")


@dataclass(frozen=True)
class Rootfs:
    tree: Path  # the populated directory: the oracle tests compare against
    tar: Path  # what `docker import` reads


def build_rootfs_tar(workdir: Path) -> Rootfs:
    """Populate ``workdir/rootfs`` and pack it with GNU tar (pax, xattrs, numeric owners)."""
    tree = workdir / "rootfs"
    tree.mkdir()
    tree.chmod(0o755)
    populate(tree)
    tar_path = workdir / "rootfs.tar"
    subprocess.run(
        [
            "tar",
            "--xattrs",
            "--xattrs-include=*",
            "--numeric-owner",
            "--format=pax",
            "-C",
            str(tree),
            "-cf",
            str(tar_path),
            ".",
        ],
        check=True,
    )
    return Rootfs(tree=tree, tar=tar_path)
