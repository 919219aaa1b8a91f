"""Processes by pid, a tool run, a condition waited for: the leaf of ``tests.support``.

Every process a test starts is ended by the pid it was given (SIGTERM, a
deadline, then SIGKILL), or found through ``/proc`` by a command line that
names a directory unique to this run; never by a process name.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


class HarnessError(AssertionError):
    """A harness step failed; the message carries the logs needed to see why."""


def run(*argv: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run a tool to completion; with ``check``, a failure raises with its stderr."""
    result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}: "
                           f"{result.stderr.strip() or result.stdout.strip()}")
    return result


def wait_for(condition: Callable[[], object], what: str, timeout: float = 15.0,
             interval: float = 0.1) -> None:
    """Poll ``condition`` until it is true; raise ``HarnessError`` naming ``what`` if not."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise HarnessError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"<{path} does not exist>"
    return "\n".join(text.splitlines()[-lines:])


# ---- /proc ----------------------------------------------------------------------


def _stat_fields(pid: int | str) -> list[bytes]:
    """The fields of /proc/PID/stat after the command name (which may hold spaces)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()


def pid_alive(pid: int) -> bool:
    try:
        # a zombie still answers kill(0); it is gone for our purposes
        return _stat_fields(pid)[0] != b"Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]


def ppid_map() -> dict[int, int]:
    """Every live pid with its parent's pid."""
    out: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            out[int(entry.name)] = int(_stat_fields(entry.name)[1])
        except (OSError, IndexError, ValueError):
            continue
    return out


def children_of(pid: int) -> list[int]:
    return [child for child, parent in ppid_map().items() if parent == pid]


def descendants(root: int) -> list[int]:
    """Children, grandchildren, ... of ``root`` (this kernel has no task/*/children)."""
    parents = ppid_map()
    found: list[int] = []
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        kids = [pid for pid, pp in parents.items() if pp == parent]
        found.extend(kids)
        frontier.extend(kids)
    return found


def pids_naming(path: Path) -> list[int]:
    """Processes whose command line contains ``path`` (a unique random dir)."""
    needle = os.fsencode(str(path))
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            line = (entry / "cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if needle in line:
            found.append(int(entry.name))
    return found


def status_kib(pid: int, key: str) -> int:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM), 0 once the process is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(key.encode() + b":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def spawn_logged(argv: list[str], log_path: Path, cwd: Path,
                 env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a daemon in its own session (a test's signals do not reach it), its
    output appended to ``log_path`` after a line naming the command."""
    with open(log_path, "ab") as log:
        log.write(f"\n===== harness: start {' '.join(argv)}\n".encode())
        log.flush()
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                start_new_session=True)


# ---- ending processes -------------------------------------------------------------


def wait_pid_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.1)
    return not pid_alive(pid)


def terminate_pid(pid: int, timeout: float = 20.0) -> None:
    """SIGTERM, wait, SIGKILL: the only way the harness ends a process it did not spawn."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if wait_pid_gone(pid, wait):
            return


def stop_child(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """SIGTERM a process we spawned, reap it; SIGKILL after ``timeout``.

    Returns False when it had to be killed (it ignored SIGTERM)."""
    if proc.poll() is not None:
        return True
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        return False
    return True
