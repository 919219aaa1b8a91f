"""Warm apply workers (``proc/warm.py``): one worker, job after job, each confined.

The first job leaves the worker chrooted into its layer until it steps out by the
descriptor of the real root; the next job, in another layer, must land there and
nowhere else.  A failed job, a big one, or a killed worker is never used again.
"""

from __future__ import annotations

import io
import os
import signal
import tarfile
import threading
from pathlib import Path

import pytest

from plugin.archive import ApplyOptions, apply_layer
from plugin.archive.proc import stream as archive_stream
from plugin.archive.proc import worker as archive_worker
from plugin.errors import InvalidArgument, StrataError
from tests.unit.test_archive_util import Entry, make_tar


def _idle_pids() -> list[int]:
    return [w.proc.pid for w in archive_stream._WARM._idle]


def _apply(root: Path, data: bytes) -> int:
    root.mkdir(exist_ok=True)
    return apply_layer(str(root), io.BytesIO(data), ApplyOptions())


def test_one_worker_serves_job_after_job_each_in_its_own_layer(tmp_path: Path) -> None:
    escape = make_tar([Entry("link", tarfile.SYMTYPE, linkname="/"),
                       Entry("link/escaped", data=b"no")])
    _apply(tmp_path / "a", make_tar([Entry("f", data=b"first")]))
    pids = _idle_pids()
    assert pids, "no warm worker was kept"
    # The symlink points at the chroot's root, the layer: the file lands inside it.
    _apply(tmp_path / "b", escape)
    assert (tmp_path / "b" / "escaped").read_bytes() == b"no"
    assert not (tmp_path / "a" / "escaped").exists()
    assert not Path("/escaped").exists()
    _apply(tmp_path / "c", make_tar([Entry("g", data=b"third")]))
    assert (tmp_path / "c" / "g").read_bytes() == b"third"
    assert set(pids) & set(_idle_pids()), "the warm worker was not used again"


def test_a_failed_job_retires_its_worker(tmp_path: Path) -> None:
    _apply(tmp_path / "a", make_tar([Entry("f")]))
    before = set(_idle_pids())
    with pytest.raises(InvalidArgument):
        _apply(tmp_path / "b", make_tar([Entry("../up", data=b"x")]))
    assert not (tmp_path / "up").exists()
    assert len(before - set(_idle_pids())) == 1


def test_a_big_job_retires_its_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _apply(tmp_path / "a", make_tar([Entry("f")]))
    before = set(_idle_pids())
    size = archive_worker.WARM_MAX_BYTES + 1
    assert _apply(tmp_path / "b", make_tar([Entry("big", data=b"\0" * size)])) == size
    assert len(before - set(_idle_pids())) == 1


class _Stalling(io.RawIOBase):
    """A layer stream that hangs after its first block until ``go`` is set."""

    def __init__(self, data: bytes) -> None:
        self.data, self.sent, self.go = data, False, threading.Event()

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if not self.sent:
            self.sent = True
            return self.data[:512]
        self.go.wait(30)
        return b""


def test_a_killed_worker_fails_its_job_and_is_replaced(tmp_path: Path) -> None:
    _apply(tmp_path / "a", make_tar([Entry("f")]))
    (victim,) = _idle_pids()[-1:]
    stream = _Stalling(make_tar([Entry("f", data=b"x" * 4096)]))
    failure: list[BaseException | None] = []
    (tmp_path / "b").mkdir()
    thread = threading.Thread(target=lambda: failure.append(_try_apply(tmp_path / "b", stream)))
    thread.start()
    while victim in _idle_pids():
        thread.join(0.01)
    os.kill(victim, signal.SIGKILL)
    stream.go.set()
    thread.join(30)
    assert failure and isinstance(failure[0], StrataError)
    assert victim not in _idle_pids()
    _apply(tmp_path / "c", make_tar([Entry("g", data=b"after")]))
    assert (tmp_path / "c" / "g").read_bytes() == b"after"


def _try_apply(root: Path, stream: io.RawIOBase) -> BaseException | None:
    try:
        apply_layer(str(root), stream, ApplyOptions())  # type: ignore[arg-type]
    except BaseException as exc:
        return exc
    return None
