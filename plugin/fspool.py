"""The threads that do the front-ends' blocking filesystem work (STYLE.md rule 8).

A ``concurrent.futures.ThreadPoolExecutor`` reached through ``run_in_executor``
wraps each call in more than the work needs: a concurrent future chained to an
asyncio one, an idle semaphore (a Python ``Condition``), and Python run by the
worker *after* it has woken the loop (setting the concurrent future, releasing
the semaphore), which the woken loop thread may have to wait out for the GIL;
the graphdriver also armed and cancelled a deadline timer per call.  For a
small layer's Diff that hand-over is of the size of the work itself
(``tests/bench/profile_small.py`` has the rows, README "Small layers").

``FsPool.start`` hands a call to a worker through one ``SimpleQueue`` and gets
the outcome back with one ``call_soon_threadsafe``, after which the worker only
blocks on the queue again.  Deadlines share one loop timer, armed for the
earliest one: a call past its deadline fails with the caller's error while the
thread finishes (or stays stuck) on its own, as before.

Threads start on demand up to ``max_workers`` (Diff and ApplyDiff hold one for
as long as they stream).  They are daemon threads, so a call stuck on a hung
mount cannot keep the process from exiting; the server waits for running calls
at shutdown with ``join`` (bounded), so a filesystem change is not cut short
by an orderly stop.  (A cut one is safe all the same: every change is staged,
as for a kill -9.)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, cast

log = logging.getLogger("strata.fspool")

#: Seconds a stopping server waits for running calls (systemd's default stop
#: timeout is 90).
SHUTDOWN_DRAIN = 30.0

#: What a worker takes from the queue: the call, its arguments, and where the
#: outcome goes (an asyncio future and its loop, or a concurrent future and None).
_Job = tuple[Callable[..., Any], tuple[Any, ...],
             "asyncio.Future[Any] | concurrent.futures.Future[Any]",
             "asyncio.AbstractEventLoop | None"]


class FsPool(concurrent.futures.Executor):
    """Bounded worker threads; ``start`` for the event loop, ``submit`` for the rest."""

    def __init__(self, max_workers: int, name: str = "strata-fs") -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self._max = max_workers
        self._name = name
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._idle = 0  # workers waiting for a job none has been matched with
        self._backlog = 0  # jobs queued while every worker was busy
        self._closed = False
        # Futures with a deadline -> (loop time, the error it fails with); one timer
        # armed for the earliest (all calls share one limit, so that is the oldest).
        self._deadlines: dict[asyncio.Future[Any], tuple[float, Callable[[], BaseException]]] = {}
        self._timer: asyncio.TimerHandle | None = None

    # ---- on the event loop ---------------------------------------------------

    def start(self, fn: Callable[..., Any], *args: Any, timeout: float = 0,
              expired: Callable[[], BaseException] | None = None) -> asyncio.Future[Any]:
        """Run ``fn(*args)`` in a worker; the future is resolved on the running loop.
        With ``timeout`` > 0 it fails with ``expired()`` once that many seconds
        pass first (the worker is not interrupted)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._put((fn, args, future, loop))
        if timeout > 0:
            when = loop.time() + timeout
            self._deadlines[future] = (when, expired or asyncio.TimeoutError)
            if self._timer is None or when < self._timer.when():
                if self._timer is not None:
                    self._timer.cancel()
                self._timer = loop.call_at(when, self._expire)
        return future

    def _resolve(self, future: asyncio.Future[Any] | concurrent.futures.Future[Any],
                 ok: bool, value: Any) -> None:
        assert isinstance(future, asyncio.Future)
        if self._deadlines:
            self._deadlines.pop(future, None)
        if future.done():  # past its deadline, or the caller went away
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def _expire(self) -> None:
        self._timer = None
        if not self._deadlines:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        for future, (when, expired) in list(self._deadlines.items()):
            if when <= now:
                del self._deadlines[future]
                if not future.done():
                    future.set_exception(expired())
        if self._deadlines:
            self._timer = loop.call_at(min(w for w, _ in self._deadlines.values()),
                                       self._expire)

    # ---- anywhere --------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any,
               **kwargs: Any) -> concurrent.futures.Future[Any]:
        """The ``Executor`` way (``loop.run_in_executor`` works with it too)."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        call = (lambda: fn(*args, **kwargs)) if kwargs else fn
        self._put((call, () if kwargs else args, future, None))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new calls; with ``cancel_futures`` the queued ones are cancelled (from
        the loop's thread when any came from ``start``).  Running calls finish."""
        with self._lock:
            self._closed = True
        if cancel_futures:
            while True:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    job[2].cancel()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._queue.put(None)  # each worker passes it on to the next
        if wait:
            self.join()

    def join(self, timeout: float | None = None) -> list[str]:
        """After ``shutdown``: wait for the running calls, at most ``timeout``
        seconds in all; returns the names of the threads still running."""
        with self._lock:
            threads = list(self._threads)
        end = None if timeout is None else time.monotonic() + timeout
        for thread in threads:
            thread.join(None if end is None else max(0.0, end - time.monotonic()))
        stuck = [t.name for t in threads if t.is_alive()]
        if stuck:
            log.warning("%d call(s) still running after %gs at shutdown (%s); exiting "
                        "anyway", len(stuck), timeout, ", ".join(stuck))
        return stuck

    def _put(self, job: _Job) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the worker pool is shut down")
            # Each job is matched with one taker: an idle worker, a new one, or
            # (all busy, none may be added) the first worker to finish its call.
            if self._idle:
                self._idle -= 1
            elif len(self._threads) < self._max:
                thread = threading.Thread(target=self._work, daemon=True,
                                          name=f"{self._name}_{len(self._threads)}")
                self._threads.append(thread)
                thread.start()
            else:
                self._backlog += 1
        self._queue.put(job)

    def _finished_one(self) -> None:
        """A worker's call is over: it takes a waiting job, or it is idle."""
        with self._lock:
            if self._backlog:
                self._backlog -= 1
            else:
                self._idle += 1

    # ---- in a worker -----------------------------------------------------------

    def _work(self) -> None:
        get = self._queue.get
        while (job := get()) is not None:
            fn, args, future, loop = job
            del job
            if loop is None:
                _run_plain(fn, args, cast("concurrent.futures.Future[Any]", future))
            else:
                try:
                    value, ok = fn(*args), True
                except BaseException as exc:  # handed to the caller whole
                    value, ok = exc, False
                del fn, args
                self._finished_one()
                with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits
                    loop.call_soon_threadsafe(self._resolve, future, ok, value)
                del future, loop, value
                continue
            self._finished_one()
        self._queue.put(None)


def _run_plain(fn: Callable[..., Any], args: tuple[Any, ...],
               future: concurrent.futures.Future[Any]) -> None:
    if not future.set_running_or_notify_cancel():
        return  # cancelled while queued
    try:
        future.set_result(fn(*args))
    except BaseException as exc:
        future.set_exception(exc)
