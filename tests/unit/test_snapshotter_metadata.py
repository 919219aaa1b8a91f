"""plugin.snapshotter.metadata: the records' copy in memory follows the
database (also across a reopen and a failed COMMIT), and layer ids are never
handed out twice."""

from __future__ import annotations

import os
import sqlite3

import pytest

from plugin.errors import AlreadyExists, FailedPrecondition, NotFound
from plugin.snapshotter.metadata import Kind, MetaStore, Record


def _create(store: MetaStore, key: str, parent: str = "", kind: Kind = Kind.ACTIVE) -> Record:
    store.check_create(key, parent)
    return store.insert(store.new_id(), kind, key, parent, {"a": "1"})


def _on_disk(path: str) -> list[Record]:
    fresh = MetaStore(path)
    try:
        return fresh.walk()
    finally:
        fresh.close()


def test_memory_follows_every_write_and_a_reopen(tmp_path: str) -> None:
    path = os.path.join(tmp_path, "db")
    store = MetaStore(path)
    _create(store, "ns/base-a")
    store.commit("ns/base-a", "ns/base", (4096, 2), {"c": "d"})
    child = _create(store, "ns/child", "ns/base")
    _create(store, "ns/view", "ns/base", Kind.VIEW)
    store.update("ns/base", {"x": "y"}, ["labels.x"])
    store.remove("ns/view")
    with pytest.raises(NotFound):
        store.get("ns/base-a")  # renamed by its Commit
    assert store.get("ns/child") == child
    assert store.get("ns/child").info.parent == "ns/base"
    assert store.get("ns/base").info.labels == {"c": "d", "x": "y"}
    assert [r.info.name for r in store.walk()] == ["ns/base", "ns/child"]
    assert store.walk() == _on_disk(path)
    assert store.ids() == {r.id for r in _on_disk(path)}
    store.close()


def test_refused_writes_change_nothing(tmp_path: str) -> None:
    store = MetaStore(os.path.join(tmp_path, "db"))
    _create(store, "ns/a")
    store.commit("ns/a", "ns/a-done", (0, 0), {})
    _create(store, "ns/b", "ns/a-done")
    before = store.walk()
    with pytest.raises(AlreadyExists):
        store.insert(store.new_id(), Kind.ACTIVE, "ns/b", "", {})
    with pytest.raises(FailedPrecondition):
        store.commit("ns/a-done", "ns/x", (0, 0), {})  # not active
    with pytest.raises(FailedPrecondition):
        store.remove("ns/a-done")  # it has a child
    assert store.walk() == before == _on_disk(store.path)
    store.close()


def test_a_failed_commit_rolls_back_and_leaves_memory_alone(tmp_path: str) -> None:
    """A COMMIT that fails (a deferred foreign key here; an I/O error in life)
    changes neither the database nor the copy, and the next write works."""
    store = MetaStore(os.path.join(tmp_path, "db"))
    ghost = _create(store, "ns/a")
    with pytest.raises(sqlite3.IntegrityError), \
            store._transaction({"ns/ghost": ghost}) as db:
        db.execute("PRAGMA defer_foreign_keys=ON")
        db.execute("INSERT INTO snapshots (id, key, parent, kind, created, updated) "
                   "VALUES (999, 'ns/ghost', 12345, 2, 0, 0)")
    with pytest.raises(NotFound):
        store.get("ns/ghost")
    _create(store, "ns/b")
    assert [r.info.name for r in store.walk()] == ["ns/a", "ns/b"]
    assert store.walk() == _on_disk(store.path)
    store.close()


def test_ids_are_never_handed_out_twice(tmp_path: str) -> None:
    path = os.path.join(tmp_path, "db")
    store = MetaStore(path)
    first = _create(store, "ns/a").id
    unrecorded = store.new_id()  # a layer built, then a crash before its row
    store.remove("ns/a")
    store.close()
    store = MetaStore(path)
    assert store.new_id() > first  # the counter moved past the removed row's id
    store.skip_past(unrecorded + 10)  # a leftover layer seen at start-up
    assert store.new_id() == unrecorded + 11
    store.close()
