"""Work directories unique to a run, and their removal with whatever was left in them.

A directory ``/tmp/<prefix>-<random8>/`` is short (unix socket paths must stay
under 108 bytes) and names nothing else on the host, so a process whose command
line contains it is ours: removal ends those by pid, lazily unmounts what is
mounted below, deepest first, then deletes the tree.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

from tests.support.mounts import unmount_all_under
from tests.support.procs import HarnessError, pids_naming, terminate_pid


def new_workdir(prefix: str = "se") -> Path:
    path = Path("/tmp") / f"{prefix}-{secrets.token_hex(4)}"
    path.mkdir(mode=0o700)
    return path


def keep_logs(root: Path) -> None:
    """Copy ``root/*.log`` to $STRATA_ENGINE_KEEP_LOGS/<root name>/ when that is set."""
    keep = os.environ.get("STRATA_ENGINE_KEEP_LOGS")
    if not keep:
        return
    dest = Path(keep) / root.name
    dest.mkdir(parents=True, exist_ok=True)
    for log in root.glob("*.log"):
        shutil.copy2(log, dest / log.name)


def remove_workdir(root: Path) -> None:
    """Kill leftovers naming ``root``, unmount under it, remove it."""
    keep_logs(root)
    for pid in pids_naming(root):
        terminate_pid(pid, timeout=10.0)
    unmount_all_under(root)
    shutil.rmtree(root, ignore_errors=True)
    if root.exists():
        raise HarnessError(f"could not remove {root}")
