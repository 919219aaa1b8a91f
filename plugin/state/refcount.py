"""Get/Put reference counts per layer, persisted so a plugin restart keeps them.

dockerd never re-sends Get for a container that is running when the plugin
restarts, yet will send its Put when the container stops: a restarted plugin
must know the layer is mounted.  The counts are written to ``refs.json`` on
every change, and on start-up checked against ``/proc/self/mountinfo``: a count
whose mount is gone is dropped, a mount under Home with no count starts at 1
(what moby's ``counter.go`` does on first sight of a mounted id).

dockerd's Gets and Puts are not balanced (protocol.md §9): the count clamps at
zero and a Put of an unmounted id succeeds.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable

import msgspec

from plugin.faults import fault_point
from plugin.state.files import write_atomic

log = logging.getLogger("strata.state")


class RefCounter:
    def __init__(self, path: str) -> None:
        self._path = path
        self._counts: dict[str, int] = {}
        self._file_lock = threading.Lock()
        self._locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        self._locks_guard = threading.Lock()
        if os.path.exists(path):
            with open(path, "rb") as f:
                self._counts = msgspec.json.decode(f.read(), type=dict[str, int])

    def lock(self, layer_id: str) -> threading.Lock:
        """The lock that serialises get/put/remove of one id."""
        with self._locks_guard:
            return self._locks[layer_id]

    def count(self, layer_id: str) -> int:
        return self._counts.get(layer_id, 0)

    def active(self) -> dict[str, int]:
        return dict(self._counts)

    def get(self, layer_id: str, activate: Callable[[], None]) -> int:
        """Count one Get; run ``activate`` (mount) on the first."""
        with self.lock(layer_id):
            current = self._counts.get(layer_id, 0)
            fault_point("get")
            if current == 0:
                activate()
            self._set(layer_id, current + 1)
            return current + 1

    def put(self, layer_id: str, deactivate: Callable[[], None]) -> int:
        """Count one Put; run ``deactivate`` (unmount) when the count reaches 0."""
        with self.lock(layer_id):
            current = self._counts.get(layer_id, 0)
            fault_point("put")
            if current <= 1:
                deactivate()
                self._set(layer_id, 0)
                return 0
            self._set(layer_id, current - 1)
            return current - 1

    def forget(self, layer_id: str) -> None:
        self._set(layer_id, 0)

    def reconcile(self, mounted: Iterable[str], needs_mount: bool) -> None:
        """Make the counts agree with what is really mounted.

        ``mounted`` are the ids whose mount exists now.  For backends that do
        not mount (vfs) the persisted counts are simply kept.
        """
        if not needs_mount:
            return
        live = set(mounted)
        for layer_id in list(self._counts):
            if layer_id not in live:
                log.info("refcount: %s was counted but is not mounted; dropping", layer_id)
                self._set(layer_id, 0)
        for layer_id in live - set(self._counts):
            log.info("refcount: %s is mounted with no count; starting at 1", layer_id)
            self._set(layer_id, 1)

    def _set(self, layer_id: str, value: int) -> None:
        with self._file_lock:
            if value > 0:
                self._counts[layer_id] = value
            else:
                self._counts.pop(layer_id, None)
            write_atomic(self._path, msgspec.json.encode(self._counts))
