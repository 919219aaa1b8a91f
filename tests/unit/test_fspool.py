"""The front-ends' worker threads (``plugin/fspool.py``): results, errors,
deadlines, the bound on threads, shutdown."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from plugin.fspool import FsPool


class Late(Exception):
    pass


async def test_result_and_error_come_back_on_the_loop() -> None:
    pool = FsPool(2)
    loop_thread = threading.get_ident()
    try:
        value, worker = await pool.start(lambda a, b: (a + b, threading.get_ident()), 2, 3)
        assert value == 5 and worker != loop_thread

        def boom() -> None:
            raise ValueError("from the worker")

        with pytest.raises(ValueError, match="from the worker"):
            await pool.start(boom)
    finally:
        pool.shutdown()


async def test_deadline_fails_the_call_while_the_thread_runs_on() -> None:
    pool = FsPool(2)
    release = threading.Event()
    finished = threading.Event()

    def stuck() -> str:
        release.wait(10)
        finished.set()
        return "too late"

    try:
        started = time.monotonic()
        with pytest.raises(Late):
            await pool.start(stuck, timeout=0.2, expired=lambda: Late("deadline"))
        assert 0.15 < time.monotonic() - started < 5
        assert not finished.is_set()  # the worker was not interrupted
        # A call without a deadline meanwhile gets its answer from another thread.
        assert await pool.start(lambda: "other") == "other"
        release.set()
        assert await asyncio.to_thread(finished.wait, 10)
        await asyncio.sleep(0.05)  # the late result reaches the loop and is dropped
        assert await pool.start(lambda: "after") == "after"
        assert pool._deadlines == {}
    finally:
        release.set()
        pool.shutdown()


async def test_each_deadline_holds_however_the_calls_interleave() -> None:
    pool = FsPool(4)
    gates = [threading.Event() for _ in range(3)]
    try:
        slow = pool.start(gates[0].wait, 10, timeout=0.3, expired=lambda: Late("first"))
        fast = pool.start(lambda: "quick", timeout=0.3, expired=lambda: Late("second"))
        later = pool.start(gates[1].wait, 10, timeout=0.6, expired=lambda: Late("third"))
        assert await fast == "quick"
        with pytest.raises(Late, match="first"):
            await slow
        assert not later.done()  # its own, later deadline
        with pytest.raises(Late, match="third"):
            await later
    finally:
        for gate in gates:
            gate.set()
        pool.shutdown()


async def test_threads_are_bounded_and_queued_calls_wait_their_turn() -> None:
    pool = FsPool(2)
    gate = threading.Event()
    running = []
    lock = threading.Lock()

    def hold(i: int) -> int:
        with lock:
            running.append(i)
        gate.wait(10)
        return i

    try:
        calls = [pool.start(hold, i) for i in range(5)]
        await asyncio.sleep(0.2)
        assert len(running) == 2 and len(pool._threads) == 2
        gate.set()
        assert await asyncio.gather(*calls) == [0, 1, 2, 3, 4]
        assert len(pool._threads) == 2
        # Idle threads are reused, not multiplied.
        for _ in range(20):
            await pool.start(lambda: None)
        assert len(pool._threads) == 2
    finally:
        gate.set()
        pool.shutdown()


async def test_executor_interface_for_run_in_executor() -> None:
    pool = FsPool(1)
    try:
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(pool, pow, 2, 10) == 1024
        assert pool.submit(sorted, [3, 1, 2], reverse=True).result(5) == [3, 2, 1]
    finally:
        pool.shutdown()


async def test_shutdown_cancels_queued_calls_and_join_reports_stuck_threads() -> None:
    pool = FsPool(1)
    gate = threading.Event()
    running = pool.start(gate.wait, 10)
    await asyncio.sleep(0.1)
    queued = pool.start(lambda: "never")
    pool.shutdown(wait=False, cancel_futures=True)
    assert queued.cancelled()
    with pytest.raises(RuntimeError, match="shut down"):
        pool.start(lambda: None)
    assert pool.join(timeout=0.2) == ["strata-fs_0"]
    gate.set()
    assert await running is True
    assert pool.join(timeout=5) == []


async def test_a_cancelled_submit_leaves_its_thread_counted_idle() -> None:
    pool = FsPool(2)
    gate = threading.Event()
    try:
        held = [pool.submit(gate.wait, 10) for _ in range(2)]  # both threads busy
        queued = pool.submit(lambda: "never")
        assert len(pool._threads) == 2
        assert queued.cancel()  # still queued: no thread is free to start it
        gate.set()
        assert [h.result(5) for h in held] == [True, True]
        await asyncio.sleep(0.1)
        assert pool._idle == 2
        for _ in range(5):
            assert await pool.start(lambda: 1) == 1
        assert len(pool._threads) == 2 and pool._idle == 2
    finally:
        gate.set()
        pool.shutdown()
