"""The snapshotter's records: containerd keys, kinds, parents, labels, times and
committed sizes, in sqlite (WAL) in the snapshotter root.

One row per snapshot.  ``id`` is the snapshot's layer id in the storage core
(its decimal string): containerd keys (``default/12/extract-… sha256:…``, with
slashes and spaces) never become paths.  A Commit renames the row's key and
keeps its id, as containerd's ``snapshots/storage`` keeps the bucket id, so a
child's ``parent`` (an id) survives its parent's commit.  Ids are handed
out in memory (``new_id``), above the stored counter, every row and every
layer present at start-up (``skip_past``), and the counter moves past each
id recorded: so a layer left by a crash never meets a new row with its id.

Every write is one transaction (``BEGIN IMMEDIATE``, so the checks and the
write see the same state) and raises containerd's errors where
``snapshots/storage/bolt.go`` does.  Writes block (disk, fsync): the server
calls them from worker threads; one connection is shared under a lock.
Rows store labels without empty values, as containerd's ``boltutil.WriteLabels``.

Reads (``get``, ``walk``, ``ids``, ``check_create``) are answered from
memory: a copy of every row, loaded at open and changed by each write once
its COMMIT has returned, under the same lock, so the copy follows the
database in commit order and a read never sees a write that could still
roll back.  This process is the root's only writer (serve.py), so the copy
is the database's state.  A read neither blocks nor waits on a lock: the
event loop may make it (Stat, Mounts).
"""

from __future__ import annotations

import enum
import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from plugin.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from plugin.snapshotter.limits import check_labels

SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS id_counter (next INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS snapshots (
    id      INTEGER PRIMARY KEY,
    key     TEXT NOT NULL UNIQUE,
    parent  INTEGER REFERENCES snapshots(id),
    kind    INTEGER NOT NULL,
    created INTEGER NOT NULL,
    updated INTEGER NOT NULL,
    size    INTEGER NOT NULL DEFAULT 0,
    inodes  INTEGER NOT NULL DEFAULT 0,
    labels  TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS snapshots_by_parent ON snapshots(parent);
"""

_SELECT = ("SELECT s.id, s.key, COALESCE(p.key, ''), s.kind, s.created, s.updated, s.size, "
           "s.inodes, s.labels FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent")


class Kind(enum.IntEnum):
    """containerd's kinds, numbered as on the wire (``snapshots.proto``)."""

    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3


@dataclass(frozen=True)
class Info:
    """containerd's ``snapshots.Info``; times in nanoseconds since the epoch (UTC)."""

    name: str
    parent: str
    kind: Kind
    created: int
    updated: int
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Record:
    id: int
    info: Info
    size: int = 0
    inodes: int = 0

    @property
    def layer(self) -> str:
        return str(self.id)


def _labels(labels: Mapping[str, str]) -> str:
    return json.dumps({k: v for k, v in labels.items() if v}, sort_keys=True)


def _record(row: tuple[int, str, str, int, int, int, int, int, str]) -> Record:
    rid, key, parent, kind, created, updated, size, inodes, labels = row
    return Record(rid, Info(key, parent, Kind(kind), created, updated, json.loads(labels)),
                  size, inodes)


class MetaStore:
    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        #: Every row by key (see the module doc); replaced entries, never mutated.
        self._rows: dict[str, Record] = {}
        self._id_lock = threading.Lock()
        self._next_id = 1
        # isolation_level=None: transactions are begun and ended here explicitly.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: every commit reaches the disk before the RPC answers, as bolt's
        # fsync per transaction does for containerd's own snapshotters.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        with self._transaction() as db:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            if db.execute("SELECT COUNT(*) FROM id_counter").fetchone()[0] == 0:
                db.execute("INSERT INTO id_counter VALUES (1)")
            self._next_id = int(db.execute("SELECT next FROM id_counter").fetchone()[0])
            for row in db.execute(_SELECT):
                record = _record(row)
                self._rows[record.info.name] = record
                self._next_id = max(self._next_id, record.id + 1)
        self._preallocate_wal()

    def _preallocate_wal(self) -> None:
        """Give the WAL its full size now, written, and rewind it.

        sqlite appends each commit's pages to the WAL; past
        ``wal_autocheckpoint`` pages it copies them into the database and the
        next commit writes from the WAL's start again, the file keeping its
        size.  Until the WAL has grown that far (the first few hundred commits
        after every start: closing deletes it), each commit's fdatasync extends
        the file, which on ext4 also commits the filesystem's journal, several
        times the cost of an fdatasync that overwrites.  One commit of a blob
        past the threshold, its drop and a RESTART checkpoint (about 4 MiB
        written once, at start-up) leave the WAL full size and rewound; the
        database keeps the blob's pages as free pages for later rows.  A crash
        in between leaves the table, which the next start drops."""
        page = int(self._db.execute("PRAGMA page_size").fetchone()[0])
        threshold = int(self._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0])
        with self._transaction() as db:
            db.execute("DROP TABLE IF EXISTS wal_fill")
            db.execute("CREATE TABLE wal_fill (b BLOB)")
            db.execute("INSERT INTO wal_fill VALUES (zeroblob(?))",
                       ((threshold + threshold // 10) * page,))
        with self._transaction() as db:
            db.execute("DROP TABLE wal_fill")
        self._db.execute("PRAGMA wal_checkpoint(RESTART)")

    @contextmanager
    def _transaction(self, changes: Mapping[str, Record | None] | None = None
                     ) -> Iterator[sqlite3.Connection]:
        """One transaction; once its COMMIT has returned, ``changes`` (key ->
        the row now, None if gone; filled in by the block) reach the copy in
        memory, still under the lock.  A failed COMMIT rolls back and changes
        nothing."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            for key, record in (changes or {}).items():
                if record is None:
                    self._rows.pop(key, None)
                else:
                    self._rows[key] = record

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- settings --------------------------------------------------------------
    def setting(self, name: str, default: str) -> str:
        """The stored value of ``name``, storing ``default`` first if there is none."""
        with self._transaction() as db:
            row = db.execute("SELECT value FROM settings WHERE name = ?", (name,)).fetchone()
            if row is None:
                db.execute("INSERT INTO settings VALUES (?, ?)", (name, default))
                return default
            return str(row[0])

    # ---- reads (from memory) ---------------------------------------------------
    def _get(self, db: sqlite3.Connection, key: str) -> Record | None:
        """``key``'s row as the transaction on ``db`` sees it (for a write's checks)."""
        row = db.execute(_SELECT + " WHERE s.key = ?", (key,)).fetchone()
        return None if row is None else _record(row)

    def get(self, key: str) -> Record:
        found = self._rows.get(key)
        if found is None:
            raise NotFound(f"snapshot {key}: not found")
        return found

    def walk(self) -> list[Record]:
        """Every row, by key (sqlite's BINARY order: a str's code points sort as
        its UTF-8 bytes)."""
        return sorted(self._rows.copy().values(), key=lambda r: r.info.name)

    def ids(self) -> set[int]:
        return {r.id for r in self._rows.copy().values()}

    # ---- Prepare / View --------------------------------------------------------
    @staticmethod
    def _refuse_create(key: str, parent: str, parent_found: Record | None,
                       key_taken: bool) -> int | None:
        """containerd's refusals of a create; the parent's id if there are none."""
        if not key:
            raise InvalidArgument("snapshot key must not be empty")
        parent_id = None
        if parent:
            if parent_found is None:
                raise NotFound(f"missing parent {parent!r} bucket: not found")
            if parent_found.info.kind != Kind.COMMITTED:
                raise InvalidArgument(f"parent {parent!r} is not committed snapshot")
            parent_id = parent_found.id
        if key_taken:
            raise AlreadyExists(f"snapshot {key}: already exists")
        return parent_id

    def check_create(self, key: str, parent: str) -> int | None:
        """Refuse now what ``insert`` would refuse (before a layer is built for
        nothing); the parent's id, None for no parent.  From memory."""
        return self._refuse_create(key, parent, self._rows.get(parent) if parent else None,
                                   key in self._rows)

    def new_id(self) -> int:
        """A fresh id for a layer: never handed out before, by this process or by
        any earlier one on this database, nor the id of a layer present at
        start-up (``skip_past``)."""
        with self._id_lock:
            rid = self._next_id
            self._next_id += 1
        return rid

    def skip_past(self, highest: int) -> None:
        """Hand out only ids above ``highest`` (the largest layer id present)."""
        with self._id_lock:
            self._next_id = max(self._next_id, highest + 1)

    def insert(self, rid: int, kind: Kind, key: str, parent: str,
               labels: Mapping[str, str]) -> Record:
        """Record the snapshot whose layer ``rid`` (from ``new_id``) now exists,
        in one transaction that also moves the stored counter past ``rid``; the
        checks run again in it (another call may have taken the key or removed
        the parent since ``check_create``)."""
        now = time.time_ns()
        changes: dict[str, Record | None] = {}
        with self._transaction(changes) as db:
            parent_id = self._refuse_create(key, parent,
                                            self._get(db, parent) if parent else None,
                                            self._get(db, key) is not None)
            db.execute("INSERT INTO snapshots (id, key, parent, kind, created, updated, labels) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (rid, key, parent_id, int(kind), now, now, _labels(labels)))
            db.execute("UPDATE id_counter SET next = MAX(next, ?)", (rid + 1,))
            found = self._get(db, key)
            assert found is not None
            changes[key] = found
        return found

    # ---- Commit / Remove / Update ----------------------------------------------
    def commit(self, key: str, name: str, usage: tuple[int, int],
               labels: Mapping[str, str]) -> Record:
        """Turn active ``key`` into committed ``name`` (same id), with the usage
        measured at Commit; created and updated become now, labels the new ones."""
        now = time.time_ns()
        changes: dict[str, Record | None] = {}
        with self._transaction(changes) as db:
            found = self._get(db, key)
            if found is None:
                raise NotFound(f"failed to get active snapshot {key!r}: not found")
            if not name:
                raise InvalidArgument("committed snapshot name must not be empty")
            if self._get(db, name) is not None:
                raise AlreadyExists(f"committed snapshot {name}: already exists")
            if found.info.kind != Kind.ACTIVE:
                raise FailedPrecondition(f"snapshot {key!r} is not active")
            db.execute("UPDATE snapshots SET key = ?, kind = ?, created = ?, updated = ?, "
                       "size = ?, inodes = ?, labels = ? WHERE id = ?",
                       (name, int(Kind.COMMITTED), now, now, usage[0], usage[1],
                        _labels(labels), found.id))
            committed = self._get(db, name)
            assert committed is not None
            changes.update({key: None, name: committed})
        return committed

    def remove(self, key: str) -> Record:
        """Delete the row of ``key`` (its layer is the caller's to delete next)."""
        changes: dict[str, Record | None] = {key: None}
        with self._transaction(changes) as db:
            found = self._get(db, key)
            if found is None:
                raise NotFound(f"snapshot {key}: not found")
            if db.execute("SELECT 1 FROM snapshots WHERE parent = ? LIMIT 1",
                          (found.id,)).fetchone():
                raise FailedPrecondition(f"cannot remove snapshot {key} with child")
            db.execute("DELETE FROM snapshots WHERE id = ?", (found.id,))
        return found

    def update(self, name: str, labels: Mapping[str, str], paths: Sequence[str]) -> Record:
        """containerd ``storage.UpdateInfo``: only labels change; ``labels``
        replaces them all, ``labels.<k>`` sets (or, empty, removes) one key, no
        path replaces them all; any other path is ``InvalidArgument``, and
        labels past ``limits`` (checked on the result) refused as there."""
        now = time.time_ns()
        changes: dict[str, Record | None] = {}
        with self._transaction(changes) as db:
            found = self._get(db, name)
            if found is None:
                raise NotFound(f"snapshot {name}: snapshot does not exist: not found")
            new = dict(found.info.labels)
            for path in paths:
                if path.startswith("labels."):
                    label = path.removeprefix("labels.")
                    new[label] = labels.get(label, "")
                elif path == "labels":
                    new = dict(labels)
                else:
                    raise InvalidArgument(f"cannot update {path!r} field on snapshot {name!r}")
            if not paths:
                new = dict(labels)
            check_labels(new)
            db.execute("UPDATE snapshots SET labels = ?, updated = ? WHERE id = ?",
                       (_labels(new), now, found.id))
            updated = self._get(db, name)
            assert updated is not None
            changes[name] = updated
        return updated
