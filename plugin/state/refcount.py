"""Get/Put reference counts per layer, persisted so a plugin restart keeps them.

dockerd never re-sends Get for a container that is running when the plugin
restarts, yet will send its Put when the container stops: a restarted plugin
must know the layer is mounted.  Every change appends one line ``<id> <count>``
to ``refs.json.log`` (one ``write`` on an O_APPEND descriptor: a rename per
Get is slow on ext4, which flushes a file renamed over another); opening
the counter folds that journal into the ``refs.json`` snapshot.  Lines carry
absolute counts, so replaying a journal twice is harmless and a crash between
writing the snapshot and emptying the journal loses nothing.  On start-up the
counts are checked against the layers and ``/proc/self/mountinfo``: a count
whose layer or mount is gone is dropped, and a mount with no count is
released (strata's own references are never persisted, see below).

dockerd's Gets and Puts are not balanced (docs/protocol.md §9): the count clamps at
zero and a Put of an unmounted id succeeds.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import msgspec

from plugin.faults import fault_point
from plugin.state.files import write_atomic

log = logging.getLogger("strata.state")


#: Set while strata itself holds a layer (a Diff, Changes or ApplyDiff in
#: progress).  Those references die with the process, so they are counted in
#: memory only: persisting them would leave a count, and a mount, that no Put
#: ever releases after a crash.
_INTERNAL: ContextVar[bool] = ContextVar("strata_internal_reference", default=False)


@contextmanager
def internal_references() -> Iterator[None]:
    """Count the Gets and Puts made inside this block as strata's own."""
    token = _INTERNAL.set(True)
    try:
        yield
    finally:
        _INTERNAL.reset(token)


#: The journal is folded into the snapshot once it holds this many lines.
_COMPACT_AFTER = 4096


def journal_path(path: str) -> str:
    return path + ".log"


def read_counts(path: str) -> dict[str, int]:
    """The persisted counts: the ``path`` snapshot with its journal replayed."""
    counts: dict[str, int] = {}
    try:
        with open(path, "rb") as f:
            counts = msgspec.json.decode(f.read(), type=dict[str, int])
    except FileNotFoundError:
        pass
    try:
        with open(journal_path(path), "rb") as f:
            journal = f.read()
    except FileNotFoundError:
        return counts
    # A line cut short by a crash mid-append has no newline yet: it never happened.
    for line in journal.split(b"\n")[:-1]:
        layer_id, _, value = line.decode("utf-8", "replace").rpartition(" ")
        if not layer_id or not value.isdigit():
            log.warning("refcount: ignoring a malformed journal line %r", line[:100])
            continue
        if int(value) > 0:
            counts[layer_id] = int(value)
        else:
            counts.pop(layer_id, None)
    return counts


class RefCounter:
    def __init__(self, path: str) -> None:
        self._path = path
        self._counts: dict[str, int] = read_counts(path)  # dockerd's Gets: persisted
        self._internal: dict[str, int] = {}  # strata's own: in memory
        self._file_lock = threading.Lock()
        self._locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        self._locks_guard = threading.Lock()
        self._journal_lines = 0
        self._journal_fd: int | None = None
        self._compact()

    def _compact(self) -> None:
        """Write the snapshot, then start an empty journal (caller holds the file lock
        or is the constructor)."""
        write_atomic(self._path, msgspec.json.encode(self._counts), durable=False)
        os.close(os.open(journal_path(self._path),
                         os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600))
        self._journal_lines = 0

    def _append(self, line: bytes) -> None:
        """Append one line with one write(2): the only file I/O a count made on the
        event loop does (the protocol suite's blocking-call guard allows exactly
        this function).  The journal stays open between appends (an open and a
        close would be a large share of a Get); ``close`` lets go of
        it, since an open file under Home keeps a zfs dataset, or any Home that
        is a mount, busy."""
        fd = self._journal_fd
        if fd is None:
            fd = self._journal_fd = os.open(journal_path(self._path),
                                            os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        os.write(fd, line)
        self._journal_lines += 1

    def close(self) -> None:
        """Close the journal (Cleanup, or the driver is being replaced); the next
        count opens it again."""
        with self._file_lock:
            fd, self._journal_fd = self._journal_fd, None
            if fd is not None:
                os.close(fd)

    def __del__(self) -> None:
        fd = getattr(self, "_journal_fd", None)
        if fd is not None:
            os.close(fd)

    def lock(self, layer_id: str) -> threading.Lock:
        """The lock that serialises get/put/remove of one id."""
        with self._locks_guard:
            return self._locks[layer_id]

    def count(self, layer_id: str) -> int:
        return self._counts.get(layer_id, 0) + self._internal.get(layer_id, 0)

    def active(self) -> dict[str, int]:
        """dockerd's outstanding Gets, by id."""
        return dict(self._counts)

    def get(self, layer_id: str, activate: Callable[[], None]) -> int:
        """Count one Get; run ``activate`` (mount) on the first."""
        with self.lock(layer_id):
            fault_point("get")
            if self.count(layer_id) == 0:
                activate()
            if _INTERNAL.get():
                self._internal[layer_id] = self._internal.get(layer_id, 0) + 1
            else:
                self._set(layer_id, self._counts.get(layer_id, 0) + 1)
            return self.count(layer_id)

    def try_get(self, layer_id: str, activates: bool) -> int | None:
        """Count a Get that needs no activation, without waiting for the layer's
        lock (for the event loop); None when ``get`` must do it."""
        lock = self.lock(layer_id)
        if self._compaction_due() or not lock.acquire(blocking=False):
            return None
        try:
            if _INTERNAL.get() or (activates and self.count(layer_id) == 0):
                return None
            fault_point("get")
            self._set(layer_id, self._counts.get(layer_id, 0) + 1)
            return self.count(layer_id)
        finally:
            lock.release()

    def try_put(self, layer_id: str, deactivates: bool) -> bool:
        """Count a Put that needs no deactivation, without waiting (for the event
        loop); False when ``put`` must do it."""
        lock = self.lock(layer_id)
        if self._compaction_due() or not lock.acquire(blocking=False):
            return False
        try:
            current = self._counts.get(layer_id, 0)
            if _INTERNAL.get() or (deactivates and self.count(layer_id) - min(current, 1) == 0):
                return False
            fault_point("put")
            if current > 0:
                self._set(layer_id, current - 1)
            return True
        finally:
            lock.release()

    def _compaction_due(self) -> bool:
        """Compaction rewrites the snapshot: the pool's work, never the loop's."""
        return self._journal_lines >= _COMPACT_AFTER - 1

    def put(self, layer_id: str, deactivate: Callable[[], None]) -> int:
        """Count one Put; run ``deactivate`` (unmount) when no reference is left.

        A Put with nothing to release is clamped (dockerd sends unbalanced Puts)
        and still deactivates when strata holds no reference either, so a
        mount that survived a crash is released by dockerd's Put."""
        with self.lock(layer_id):
            fault_point("put")
            table = self._internal if _INTERNAL.get() else self._counts
            current = table.get(layer_id, 0)
            if table is self._internal:
                if current > 1:
                    self._internal[layer_id] = current - 1
                else:
                    self._internal.pop(layer_id, None)
            elif current > 0:
                self._set(layer_id, current - 1)
            remaining = self.count(layer_id)
            if remaining == 0:
                deactivate()
            return remaining

    def forget(self, layer_id: str) -> None:
        self._internal.pop(layer_id, None)
        self._set(layer_id, 0)

    def reconcile(self, mounted: Iterable[str], needs_mount: bool,
                  existing: Iterable[str]) -> list[str]:
        """Make the counts agree with the layers and mounts that really exist.

        Counts of layers that are gone are dropped.  For mounting backends a
        count whose mount is gone is dropped, and the ids mounted with no
        count are returned: a mount dockerd holds no Get for was strata's own
        (a Diff or ApplyDiff cut short by a crash), and the caller unmounts it.
        """
        layers = set(existing)
        for layer_id in [i for i in self._counts if i not in layers]:
            log.info("refcount: %s no longer exists; dropping its count", layer_id)
            self._set(layer_id, 0)
        if not needs_mount:
            return []
        live = set(mounted)
        for layer_id in [i for i in self._counts if i not in live]:
            log.info("refcount: %s was counted but is not mounted; dropping", layer_id)
            self._set(layer_id, 0)
        stale = sorted((live - set(self._counts)) & layers)
        for layer_id in stale:
            log.info("refcount: %s is mounted with no Get outstanding; releasing it", layer_id)
        return stale

    def _set(self, layer_id: str, value: int) -> None:
        with self._file_lock:
            if value > 0:
                self._counts[layer_id] = value
            elif layer_id not in self._counts:
                return
            else:
                self._counts.pop(layer_id, None)
            # Counts only matter while the machine is up (a reboot drops every
            # mount), so they are written for a plugin crash, not a power loss:
            # no fsync on the Get/Put path.
            if self._journal_lines >= _COMPACT_AFTER:
                self._compact()
            self._append(f"{layer_id} {max(value, 0)}\n".encode())
