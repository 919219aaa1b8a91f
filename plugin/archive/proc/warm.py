"""Warm apply workers: a forked worker that serves ApplyDiff after ApplyDiff.

A worker forked per ApplyDiff makes a small layer pay for the fork, the child's
start, its exit and the zygote's report of it, several process wake-ups each,
which on a busy machine cost many times the extraction of a few files
(``tests/bench/bench_graphtest.py``).  So the plugin keeps up to ``MAX_IDLE``
workers between jobs (``worker.py apply-server``, forked by the zygote like any
worker) and hands each job to an idle one over a Unix socket: the tar's pipe
and a stderr file go by SCM_RIGHTS with the arguments, the reply comes back as
one JSON line.  A job is confined as before (the worker chroots into the layer
for it); what the worker does between jobs is in ``worker._serve_applies``.

A worker that died, failed a job, or moved a big layer is not used again (it
says ``retire`` or its socket ends): big layers keep their peak RSS and a
failure never leaks into the next job.  A killed worker ends its ApplyDiff with
an error, as a killed forked worker does, and the layer is then left to the
usual clean-up (the caller's applying mark).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
from typing import IO, Any

from plugin.archive.proc.zygote import ForkedWorker, Zygote, ZygoteError

log = logging.getLogger("strata.archive")

#: Idle warm workers kept: concurrent ApplyDiffs beyond it fork more, which leave
#: after their job.
MAX_IDLE = 2


class WarmWorker:
    """The plugin's end of one ``apply-server`` worker."""

    def __init__(self, control: socket.socket, proc: ForkedWorker) -> None:
        self._control = control
        self._reader = control.makefile("rb")
        self.proc = proc

    def send(self, args: dict[str, Any], tar_fd: int, stderr: IO[bytes]) -> None:
        socket.send_fds(self._control, [json.dumps(args).encode()],
                        [tar_fd, stderr.fileno()])

    def reply(self) -> bytes:
        """The job's JSON line; b"" when the worker ended without one."""
        try:
            return self._reader.readline()
        except OSError:
            return b""

    def close(self) -> None:
        """Let the worker go: it ends at the end of its socket; reap it."""
        self._reader.close()
        self._control.close()
        try:
            self.proc.wait(timeout=10)
        except Exception:  # stuck or unknown: it must not linger
            self.proc.kill()
            with contextlib.suppress(Exception):
                self.proc.wait(timeout=10)


class WarmPool:
    """Idle warm workers, taken by one job at a time."""

    def __init__(self, zygote: Zygote) -> None:
        self._zygote = zygote
        self._lock = threading.Lock()
        self._idle: list[WarmWorker] = []

    def take(self) -> WarmWorker | None:
        """An idle worker, or a new one; None when none can be started."""
        with self._lock:
            while self._idle:
                worker = self._idle.pop()
                if worker.proc.poll() is None:
                    return worker
                worker.close()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with open(os.devnull, "wb") as devnull:
                proc = self._zygote.start(["apply-server"], devnull, want_stdout=False,
                                          stdin=theirs)
        except ZygoteError as exc:
            log.warning("%s; applying in a worker of its own", exc)
            ours.close()
            return None
        finally:
            theirs.close()
        return WarmWorker(ours, proc)

    def idle_pids(self) -> list[int]:
        """The idle workers' pids (what is alive between jobs, and no job's)."""
        with self._lock:
            return [worker.proc.pid for worker in self._idle]

    def give_back(self, worker: WarmWorker, reusable: bool) -> None:
        with self._lock:
            if reusable and len(self._idle) < MAX_IDLE:
                self._idle.append(worker)
                return
        worker.close()
