"""``strata check``: the host readiness report says what the kernel really offers."""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_check_reports_this_hosts_kernel_features(tmp_path: str) -> None:
    out = subprocess.run([sys.executable, "-m", "plugin", "check", "--home", str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO, check=True).stdout
    rows = {line[:40].strip(): line[40:].strip() for line in out.splitlines()}
    with open("/proc/filesystems") as f:
        kernel = f.read().split()
    assert rows["overlay"] == ("yes" if "overlay" in kernel else "no")
    assert rows["device-mapper"] == ("yes" if os.path.exists("/dev/mapper/control") else "no")
    assert rows["kernel"] == os.uname().release
    backing = [line for line in out.splitlines()
               if line.startswith(f"backing filesystem of {tmp_path} ")]
    assert len(backing) == 1 and backing[0].split()[-1] not in ("", str(tmp_path))
    assert "dockerd" in rows and "graphdriver plugins" in rows


def _check_rows(home: str) -> dict[str, str]:
    out = subprocess.run([sys.executable, "-m", "plugin", "check", "--home", home],
                         capture_output=True, text=True, cwd=REPO, check=True).stdout
    return {line[:40].strip(): line[40:].strip() for line in out.splitlines()}


def test_check_says_which_backends_can_run_user_namespaced_containers(tmp_path: str) -> None:
    rows = _check_rows(str(tmp_path))
    with open("/proc/sys/user/max_user_namespaces") as f:
        userns = int(f.read()) > 0
    with open("/proc/filesystems") as f:
        kernel = f.read().split()
    assert rows["user namespaces"].startswith("yes" if userns else "no")
    assert rows["userns on vfs"] == ("yes" if userns else "no: no user namespaces")
    assert rows["userns on overlay"].startswith("yes" if userns and "overlay" in kernel else "no")
    # zfs-fuse (no "zfs" filesystem type) cannot: it checks permissions with host uids
    assert rows["userns on zfs"].startswith("yes" if userns and "zfs" in kernel else "no")
    remap = rows["userns-remap (dockremap)"]
    if remap.startswith("uid "):
        # pytest's tmp_path sits under 0700 directories: the remapped root cannot pass
        assert "lacks o+x" in remap, remap
