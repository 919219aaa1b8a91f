"""containerd's ``snapshots.Snapshotter`` over strata's storage core.

Each snapshot is one core layer, named by its row's id (``metadata.Record``):
an active snapshot is a writable layer on its parent, a view a layer mounted
read-only, and Commit only changes the row (the layer's files *are* the
committed content, as containerd's overlay snapshotter keeps its upper dir).
Keys and labels are checked against containerd's own limits first
(``limits``).  The rules and errors are those of containerd 1.6's ``snapshots/storage``
(Prepare of an existing key is ``AlreadyExists``, of a missing parent
``NotFound``, of an uncommitted parent ``InvalidArgument``; Mounts of a
committed snapshot, Commit of a view and Remove of a parent are
``FailedPrecondition``).

Crash safety comes from the order of the two writes:

* Prepare/View: check the key and parent, take a fresh id (both from memory,
  ``metadata``), let the core build the layer (staged, renamed into place
  when complete), *then* insert the row.  A crash before the row leaves a
  layer no row claims.
* Remove: delete the row (an fsynced commit), *then* the layer, which is not
  forced to disk: a crash in between, or a power loss that brings the layer
  back, leaves the same.
* Start-up and Cleanup delete layers no row claims (never one a call in
  flight is building).

So a listed snapshot has its whole layer, but for one case a power cut can
make: the row's commit (an fdatasync of sqlite's preallocated WAL) does not
commit the filesystem's journal, where the layer's rename waits, so a row
can reach the disk and its layer stay in the core's staging dir.  Start-up
(serve.py) renames such a layer into place (``promote_staged``); a row whose
layer is gone all the same is *broken*: it stays (containerd's own metadata
names it by key, and only containerd's Remove should take it away), it is
listed, Stat and Update work, Remove succeeds, but Mounts of it or of any
snapshot on it, Prepare or View on it, and Commit or Usage of it fail with
``FailedPrecondition`` naming the key and the missing path (containerd's
overlayfs would hand out mounts of a missing dir).  Two answers come from
memory alone and may be given on the event loop: ``stat`` (the records'
copy in memory) and ``mounts_nowait`` (what Prepare, View or an earlier
Mounts answered for the same layer: a layer's mounts never change while its
row lives, and ids are never reused).  Every other method blocks (sqlite,
the core's filesystem work): the gRPC service runs them in worker threads.
This module knows keys but not gRPC.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence

from plugin.driver.base import CreateOpts, Driver, MountSpec
from plugin.errors import FailedPrecondition, StrataError
from plugin.faults import fault_point
from plugin.snapshotter.limits import check_key, check_labels
from plugin.snapshotter.listing import select
from plugin.snapshotter.metadata import Info, Kind, MetaStore, Record

log = logging.getLogger("strata.snapshotter")


class Snapshotter:
    def __init__(self, driver: Driver, meta: MetaStore,
                 missing: Mapping[str, str] | None = None) -> None:
        """``missing``: layer id -> its path, for layers start-up found absent
        (``promote_staged``); the rows that claim them are broken (module doc)."""
        self.driver = driver
        self.meta = meta
        self._building: set[str] = set()  # layers created whose row is not in yet
        self._building_lock = threading.Lock()
        #: layer id -> the mounts answered for it (see the module doc).
        self._specs: dict[str, list[MountSpec]] = {}
        # No new layer may take the id of one present now (a crash's leftover that
        # Cleanup could not delete would make its Prepare fail).
        self.meta.skip_past(max((int(i) for i in driver.layer_ids() if i.isdigit()),
                                default=0))
        #: layer id -> its missing path, for each broken row (dropped by its Remove).
        self._missing: dict[str, str] = dict(missing or {})
        for record in meta.walk() if self._missing else ():
            if record.layer in self._missing:
                log.warning("snapshot %r (%s, layer %s) is broken: %s is missing; Mounts, "
                            "and Prepare or View on it, fail until it is removed",
                            record.info.name, record.info.kind.name.lower(), record.layer,
                            self._missing[record.layer])

    # ---- Prepare / View / Mounts -------------------------------------------------
    def prepare(self, key: str, parent: str, labels: Mapping[str, str]) -> list[MountSpec]:
        return self._create(Kind.ACTIVE, key, parent, labels)

    def view(self, key: str, parent: str, labels: Mapping[str, str]) -> list[MountSpec]:
        return self._create(Kind.VIEW, key, parent, labels)

    def _create(self, kind: Kind, key: str, parent: str,
                labels: Mapping[str, str]) -> list[MountSpec]:
        check_key(key)
        check_key(parent, "parent")
        check_labels(labels)
        parent_id = self.meta.check_create(key, parent)
        if parent_id is not None:
            self._check_intact(self.meta.get(parent), "parent")
        rid = self.meta.new_id()
        layer = str(rid)
        with self._building_lock:
            self._building.add(layer)
        try:
            self.driver.create(layer, "" if parent_id is None else str(parent_id), CreateOpts())
            fault_point("snap.prepare.built")
            try:
                record = self.meta.insert(rid, kind, key, parent, labels)
            except BaseException:
                self._remove_layer(layer)
                raise
        finally:
            with self._building_lock:
                self._building.discard(layer)
        fault_point("snap.prepare.recorded")
        return self._mounts(record)

    def mounts(self, key: str) -> list[MountSpec]:
        check_key(key)
        return self._mounts(self.meta.get(key))

    def mounts_nowait(self, key: str) -> list[MountSpec] | None:
        """``mounts`` answered from memory, or None when only ``mounts`` can say
        (typed errors as ``mounts``)."""
        check_key(key)
        record = self.meta.get(key)
        self._check_mountable(record)
        return self._specs.get(record.layer)

    def _check_mountable(self, record: Record) -> None:
        if record.info.kind == Kind.COMMITTED:
            raise FailedPrecondition(
                f"failed to get active mount: requested snapshot {record.info.name} "
                "not active or view")
        self._check_intact(record)

    def _check_intact(self, record: Record, what: str = "snapshot") -> None:
        """Refuse a snapshot whose layer, or an ancestor's, start-up found
        missing (its mounts would name that layer).  From memory."""
        if not self._missing:
            return
        self._check_own_layer(record, what)
        ancestor = record
        while ancestor.info.parent:
            ancestor = self.meta.get(ancestor.info.parent)
            path = self._missing.get(ancestor.layer)
            if path is not None:
                raise FailedPrecondition(
                    f"{what} {record.info.name!r} is broken: its ancestor "
                    f"{ancestor.info.name!r} lost its layer {path} (in a crash, or deleted); "
                    "remove the snapshots from this one down to that "
                    "one and unpack or create them again")

    def _check_own_layer(self, record: Record, what: str = "snapshot") -> None:
        path = self._missing.get(record.layer)
        if path is not None:
            raise FailedPrecondition(
                f"{what} {record.info.name!r} is broken: its layer {path} is missing (lost "
                "in a crash, or deleted); remove it and unpack or create it again")

    def _mounts(self, record: Record) -> list[MountSpec]:
        self._check_mountable(record)
        if record.info.kind == Kind.VIEW and record.info.parent:
            # As containerd's overlayfs: a view is its parent's tree read-only (its own
            # layer stays empty and is not mounted), so a view of 128 layers mounts
            # 128 lowers, not 129.  The parent outlives the view (Remove refuses it).
            specs = self.driver.mounts(self.meta.get(record.info.parent).layer, read_only=True)
        else:
            specs = self.driver.mounts(record.layer, read_only=record.info.kind == Kind.VIEW)
        self._specs[record.layer] = specs
        return specs

    # ---- Commit / Remove ---------------------------------------------------------
    def commit(self, name: str, key: str, labels: Mapping[str, str]) -> Info:
        check_key(key)
        check_key(name, "name")
        check_labels(labels)
        record = self.meta.get(key)
        if record.info.kind == Kind.ACTIVE:
            self._check_own_layer(record)
        # Measured only for an active snapshot: the rest is refused below anyway.
        usage = self.driver.usage(record.layer) if record.info.kind == Kind.ACTIVE else (0, 0)
        fault_point("snap.commit.measured")
        committed = self.meta.commit(key, name, usage, labels).info
        self._specs.pop(record.layer, None)  # a committed snapshot has no mounts
        fault_point("snap.commit.recorded")
        return committed

    def remove(self, key: str) -> None:
        check_key(key)
        layer = self.meta.remove(key).layer
        self._specs.pop(layer, None)
        self._missing.pop(layer, None)
        fault_point("snap.remove.unrecorded")
        self._remove_layer(layer)

    def _remove_layer(self, layer: str) -> None:
        """Delete a layer no row claims any more; a failure is left to Cleanup
        (containerd's overlay snapshotter likewise only logs a failed RemoveAll).
        Not forced to disk (``durable=False``): no row claims the layer, durably,
        and start-up deletes every layer no row claims."""
        try:
            self.driver.remove(layer, durable=False)
        except StrataError as e:
            log.warning("layer %s: removal failed, left for Cleanup: %s", layer, e)

    # ---- Stat / Update / Usage / List ----------------------------------------------
    def stat(self, key: str) -> Info:
        """From memory (see the module doc)."""
        check_key(key)
        return self.meta.get(key).info

    def update(self, name: str, labels: Mapping[str, str], paths: Sequence[str]) -> Info:
        check_key(name, "name")
        return self.meta.update(name, labels, paths).info

    def usage(self, key: str) -> tuple[int, int]:
        """Measured now for an active snapshot, as stored at Commit otherwise (a
        view's is zero, as containerd's)."""
        check_key(key)
        record = self.meta.get(key)
        if record.info.kind == Kind.ACTIVE:
            self._check_own_layer(record)
            return self.driver.usage(record.layer)
        return record.size, record.inodes

    def walk(self, filters: Sequence[str]) -> list[Info]:
        return select([r.info for r in self.meta.walk()], filters)

    # ---- Cleanup -----------------------------------------------------------------
    def cleanup(self) -> list[str]:
        """Delete every layer no row claims (leaves of a crash); returns their ids.
        Children go before parents (the core refuses a parent with children)."""
        # Under the lock no Prepare starts or finishes building a layer, so every
        # layer present is either claimed by a row, being built, or an orphan.
        with self._building_lock:
            claimed = {str(i) for i in self.meta.ids()} | self._building
            orphans = [layer for layer in self.driver.layer_ids() if layer not in claimed]
        removed: list[str] = []
        while orphans:
            left = []
            for layer in orphans:
                try:
                    self.driver.remove(layer, durable=False)
                    removed.append(layer)
                except FailedPrecondition:
                    left.append(layer)
            if len(left) == len(orphans):
                log.warning("cleanup: layers %s still have children no row claims", left)
                break
            orphans = left
        if removed:
            log.info("cleanup: removed %d unclaimed layer(s): %s", len(removed), removed)
        return removed

    def close(self) -> None:
        self.driver.close()
        self.meta.close()
