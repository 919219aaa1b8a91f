"""A warm parent for archive workers: fork instead of starting a new interpreter.

Starting ``python -m plugin.archive.proc.worker`` (interpreter start, ``site``, the
imports) costs more than GNU tar needs for a whole small layer, and it is paid
by every ApplyDiff and Diff (it was nearly all of moby's DiffBase benchmark, a
row of ``tests/bench/bench_protocol.py``).  So, like ``multiprocessing``'s
forkserver, one helper process imports the workers once and forks a child per
job; forking that small process is far cheaper than a new interpreter.  The
plugin itself never forks: it is multi-threaded, and a fork there could
inherit a lock held by another thread.

Protocol, over a Unix socketpair (the *control* socket): the parent sends the
worker's argv as JSON with four descriptors (SCM_RIGHTS): the child's stdin,
stdout, stderr and a per-job *status* socket.  The zygote forks, the child
``dup2``s its stdio and runs ``worker.main`` (which the worker module hands to
``main`` here: this module never imports it); the zygote writes the child's pid
to the status socket, and its exit code when it ends (reaped via a pidfd).
``ForkedWorker`` gives the parent the ``subprocess.Popen`` surface the callers
use (``stdin``, ``stdout``, ``poll``, ``wait``, ``kill``).  When the zygote cannot
be started or dies, callers fall back to a fresh ``Popen`` per job.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from typing import IO

from plugin.archive.proc.wire import WORKER_MODULE
from plugin.memtune import tune_allocator

log = logging.getLogger("strata.archive")

_MAX_ARGS = 1 << 16


class ZygoteError(Exception):
    """The zygote is gone or did not answer; use a fresh process instead."""


class ForkedWorker:
    """The parent's handle on one forked worker (a ``Popen`` look-alike)."""

    def __init__(self, pid: int, status: socket.socket, stdin: IO[bytes] | None,
                 stdout: IO[bytes] | None) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.stdin: IO[bytes] | None = stdin
        self.stdout: IO[bytes] | None = stdout
        self._status = status
        self._pending = b""

    def _read_status(self, block: bool) -> int | None:
        if self.returncode is not None:
            return self.returncode
        while b"\n" not in self._pending:
            try:
                data = self._status.recv(64, 0 if block else socket.MSG_DONTWAIT)
            except BlockingIOError:
                return None
            if not data:  # the zygote died before reporting: the child's fate is unknown
                self._pending += b"-9\n"
                break
            self._pending += data
        self.returncode = int(self._pending.split(b"\n", 1)[0])
        self._status.close()
        return self.returncode

    def poll(self) -> int | None:
        return self._read_status(block=False)

    def wait(self, timeout: float | None = None) -> int:
        if timeout is not None and self.returncode is None:
            self._status.settimeout(timeout)
            try:
                return self._read_status(block=True) or 0
            except TimeoutError:
                raise subprocess.TimeoutExpired("archive worker", timeout) from None
            finally:
                if self.returncode is None:
                    self._status.settimeout(None)
        code = self._read_status(block=True)
        assert code is not None
        return code

    def kill(self) -> None:
        # The zygote reaps the child only after it exits and reports just after, so
        # once poll() says "running" the pid is still this child's.
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


class Zygote:
    """The parent side: start the zygote lazily, hand it jobs."""

    def __init__(self, env: dict[str, str]) -> None:
        self._env = env
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._control: socket.socket | None = None
        self._owner = 0

    def _ensure(self) -> socket.socket:
        if self._control is not None and self._owner == os.getpid() and (
                self._proc is not None and self._proc.poll() is None):
            return self._control
        self._close()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", WORKER_MODULE, "zygote", str(theirs.fileno())],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=self._env,
                pass_fds=(theirs.fileno(),), close_fds=True)
        except OSError as exc:
            ours.close()
            raise ZygoteError(f"cannot start the archive zygote: {exc}") from None
        finally:
            theirs.close()
        self._control, self._owner = ours, os.getpid()
        return ours

    def _close(self) -> None:
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._proc is not None:
            if self._proc.poll() is None and self._owner == os.getpid():
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def start(self, argv: list[str], stderr: IO[bytes], want_stdout: bool,
              stdin: socket.socket | None = None) -> ForkedWorker:
        """Fork ``worker.main(argv)`` with a stdin pipe (or ``stdin``), a stdout pipe (or
        ``/dev/null`` when ``want_stdout`` is false) and ``stderr``."""
        in_r, in_w = os.pipe() if stdin is None else (os.dup(stdin.fileno()), -1)
        out_r, out_w = os.pipe() if want_stdout else (-1, os.open(os.devnull, os.O_WRONLY))
        status, child_status = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = [in_r, out_w, stderr.fileno(), child_status.fileno()]
        try:
            with self._lock:
                try:
                    socket.send_fds(self._ensure(), [json.dumps(argv).encode()], fds)
                except OSError as exc:
                    self._close()
                    raise ZygoteError(f"archive zygote unreachable: {exc}") from None
            line = b""
            while not line.endswith(b"\n"):
                data = status.recv(64)
                if not data:
                    raise ZygoteError("archive zygote did not fork the worker")
                line += data
        except BaseException:
            for fd in (in_w, out_r):
                if fd >= 0:
                    os.close(fd)
            status.close()
            raise
        finally:
            for fd in (in_r, out_w):
                os.close(fd)
            child_status.close()
        pid_text, _, rest = line.partition(b"\n")
        worker = ForkedWorker(int(pid_text), status,
                              open(in_w, "wb") if in_w >= 0 else None,  # noqa: SIM115
                              open(out_r, "rb") if out_r >= 0 else None)  # noqa: SIM115
        worker._pending = rest
        return worker


# ---- the zygote process --------------------------------------------------------


#: What a forked child runs: the worker's ``main``, handed in by the worker itself
#: (it starts the zygote), so this module never imports the worker.
Job = Callable[[list[str]], int]


def _run_child(job: Job, argv: list[str], fds: list[int]) -> None:
    """In the forked child: become the worker, never return."""
    code = 1
    try:
        for target, fd in enumerate(fds[:3]):
            os.dup2(fd, target)
        for fd in fds:
            os.close(fd)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        code = job(argv)
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        with contextlib.suppress(Exception):
            os.write(2, traceback.format_exc().encode())
    finally:
        os._exit(code)


def serve(control: socket.socket, job: Job) -> int:
    sel = selectors.DefaultSelector()
    sel.register(control, selectors.EVENT_READ, None)
    while True:
        for key, _ in sel.select():
            if key.data is None:
                msg, fds, _, _ = socket.recv_fds(control, _MAX_ARGS, 4)
                if not msg:
                    return 0  # the plugin is gone
                _fork_job(sel, control, job, json.loads(msg), fds)
            else:
                pid, status = key.data
                sel.unregister(key.fd)
                os.close(key.fd)
                _, wait_status = os.waitpid(pid, 0)
                with contextlib.suppress(OSError):
                    status.sendall(b"%d\n" % os.waitstatus_to_exitcode(wait_status))
                status.close()


def _fork_job(sel: selectors.BaseSelector, control: socket.socket, job: Job,
              argv: list[str], fds: list[int]) -> None:
    if len(fds) != 4:
        for fd in fds:
            os.close(fd)
        return
    pid = os.fork()
    if pid == 0:
        for key in list(sel.get_map().values()):  # other jobs' pidfds and status sockets
            if key.data is not None:
                os.close(key.fd)
                key.data[1].close()
        sel.close()
        control.close()
        _run_child(job, argv, fds)
    status = socket.socket(fileno=fds[3])
    for fd in fds[:3]:
        os.close(fd)
    with contextlib.suppress(OSError):
        status.sendall(b"%d\n" % pid)
    sel.register(os.pidfd_open(pid), selectors.EVENT_READ, (pid, status))


def main(control_fd: int, job: Job) -> int:
    """``python -m plugin.archive.proc.worker zygote FD``: fork ``job(argv)`` per request.

    The worker module that calls this has imported everything a job needs at its
    own load, so each fork starts warm; keep the collector off those objects: a
    collection in a child would copy their pages."""
    gc.freeze()
    tune_allocator()  # inherited by every fork

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the plugin's Ctrl-C is not ours
    return serve(socket.socket(fileno=control_fd), job)
