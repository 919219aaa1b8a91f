"""Unit ring: ID validation, staged layers, reference counts, the persisted Init."""

from __future__ import annotations

import contextlib
import os

import pytest

from plugin.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from plugin.idtools import IDMap
from plugin.state import refcount
from plugin.state.config import InitRecord, load_init, save_init
from plugin.state.layers import LayerMeta, LayerStore, promote_staged, validate_id
from plugin.state.refcount import (
    RefCounter,
    internal_references,
    journal_path,
    read_counts,
)


@pytest.mark.parametrize("good", ["a" * 64, "a" * 64 + "-init", "kipvlst7kjta6hpv1j1wqnvyc",
                                  "Base", "v1.2_x-y"])
def test_valid_ids(good: str) -> None:
    assert validate_id(good) == good


@pytest.mark.parametrize("bad", ["", ".", "..", "../x", "a/b", "/abs", "a\x00b", "x..y",
                                 "-lead", "a" * 129, "sp ace", "new\nline", "é"])
def test_invalid_ids(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        validate_id(bad)


def test_staged_create_is_atomic(tmp_path: str) -> None:
    store = LayerStore(str(tmp_path))
    with pytest.raises(RuntimeError), store.staging("L1", LayerMeta()) as stage:
        open(os.path.join(stage, "half"), "w").close()
        assert not store.exists("L1")
        raise RuntimeError("crash while building")
    assert not store.exists("L1") and os.listdir(store.staging_dir) == []
    with store.staging("P", LayerMeta()):
        pass
    with store.staging("L1", LayerMeta(parent="P")) as stage:
        open(os.path.join(stage, "full"), "w").close()
    assert store.exists("L1") and store.read_meta("L1").parent == "P"
    with pytest.raises(AlreadyExists), store.staging("L1", LayerMeta()):
        pass
    assert os.path.exists(os.path.join(store.layer_dir("L1"), "full"))


def test_the_tree_refuses_orphans(tmp_path: str) -> None:
    """A layer is made only on a parent that exists and is not being removed;
    a parent is removed only once it has no children, also after a restart."""
    store = LayerStore(str(tmp_path))
    with pytest.raises(NotFound, match="parent layer P does not exist"), \
            store.staging("C", LayerMeta(parent="P")):
        pass
    assert os.listdir(store.staging_dir) == []
    with store.staging("P", LayerMeta()):
        pass
    with pytest.raises(RuntimeError), store.staging("C", LayerMeta(parent="P")):
        assert store.children("P") == ["C"]  # a child being staged already counts
        raise RuntimeError("crash while building")
    assert store.children("P") == []
    with store.staging("C", LayerMeta(parent="P")):
        pass
    with pytest.raises(FailedPrecondition, match="layer P has 1 child layer"), \
            store.removal("P"):
        pass
    assert store.exists("P")
    assert LayerStore(str(tmp_path)).children("P") == ["C"]  # rebuilt from meta.json
    assert store.remove("C") and store.children("P") == []
    with store.removal("P"):
        with pytest.raises(NotFound, match="being removed"), \
                store.staging("D", LayerMeta(parent="P")):
            pass
        assert store.remove("P")
    assert not store.exists("P")


def test_parent_of_follows_create_and_remove(tmp_path: str) -> None:
    """``parent_of`` answers from memory, and an id made again after its Remove
    gets its new parent, not the one remembered."""
    store = LayerStore(str(tmp_path))
    for layer_id, parent in (("P", ""), ("Q", ""), ("C", "P")):
        with store.staging(layer_id, LayerMeta(parent=parent)):
            pass
    assert [store.parent_of(i) for i in ("P", "C")] == ["", "P"]
    assert LayerStore(str(tmp_path)).parent_of("C") == "P"  # read from meta.json
    assert store.remove("C")
    with store.staging("C", LayerMeta(parent="Q")):
        pass
    assert store.parent_of("C") == "Q"
    assert store.remove("C")
    with store.staging("C", LayerMeta()):
        pass
    assert store.parent_of("C") == ""


def test_remove_and_reconcile(tmp_path: str) -> None:
    store = LayerStore(str(tmp_path))
    with store.staging("L1", LayerMeta()):
        pass
    assert store.remove("L1") and not store.exists("L1")
    assert not store.remove("L1")
    with pytest.raises(NotFound):
        store.require("L1")
    # debris as a crash would leave it: a half staged layer, a half deleted one,
    # and a layer whose ApplyDiff never finished
    os.makedirs(os.path.join(store.staging_dir, "L2.abc/root"))
    os.makedirs(os.path.join(store.trash_dir, "L3.def/root"))
    with store.staging("L4", LayerMeta(applying=True)):
        pass
    with store.staging("L5", LayerMeta()):
        pass
    removed = LayerStore(str(tmp_path)).reconcile()
    assert len(removed) == 2
    assert os.listdir(store.staging_dir) == [] and os.listdir(store.trash_dir) == []
    assert store.half_applied() == ["L4"]  # the backend removes those (its own Remove)


def test_refcounts_mount_once_clamp_and_persist(tmp_path: str) -> None:
    path = os.path.join(str(tmp_path), "refs.json")
    refs = RefCounter(path)
    events: list[str] = []
    assert refs.get("a", lambda: events.append("mount")) == 1
    assert refs.get("a", lambda: events.append("mount")) == 2
    assert events == ["mount"]
    assert RefCounter(path).count("a") == 2  # survives a restart
    assert refs.put("a", lambda: events.append("umount")) == 1
    assert refs.put("a", lambda: events.append("umount")) == 0
    assert refs.put("a", lambda: events.append("umount")) == 0  # unbalanced Put: clamped
    assert events == ["mount", "umount", "umount"]
    assert read_counts(path) == {}


def test_refcount_journal_replays_after_a_crash_and_ignores_a_cut_line(tmp_path: str) -> None:
    path = os.path.join(str(tmp_path), "refs.json")
    refs = RefCounter(path)
    for layer in ("a", "a", "b", "c"):
        refs.get(layer, lambda: None)
    refs.put("c", lambda: None)
    # The process dies here: no compaction ran, the snapshot is still empty.
    with open(path, "rb") as f:
        assert f.read() == b"{}"
    with open(journal_path(path), "ab") as f:
        f.write(b"b 7")  # an append cut short by the crash: no newline
    assert read_counts(path) == {"a": 2, "b": 1}
    again = RefCounter(path)  # folds the journal into the snapshot and empties it
    assert again.active() == {"a": 2, "b": 1}
    assert os.path.getsize(journal_path(path)) == 0
    assert read_counts(path) == {"a": 2, "b": 1}


def test_refcount_journal_is_compacted(tmp_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(refcount, "_COMPACT_AFTER", 10)
    path = os.path.join(str(tmp_path), "refs.json")
    refs = RefCounter(path)
    for _ in range(25):
        refs.get("a", lambda: None)
    with open(journal_path(path), "rb") as f:
        assert len(f.read().splitlines()) < 10
    assert read_counts(path) == {"a": 25} == RefCounter(path).active()


def _open_paths() -> set[str]:
    paths = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            paths.add(os.readlink(f"/proc/self/fd/{fd}"))
    return paths


def test_refcount_journal_is_let_go_by_close_and_reopened_by_the_next_count(tmp_path: str) -> None:
    path = os.path.join(str(tmp_path), "refs.json")
    refs = RefCounter(path)
    refs.get("a", lambda: None)
    assert journal_path(path) in _open_paths()  # kept open between counts
    refs.close()
    assert journal_path(path) not in _open_paths()  # a Home that is a mount can go
    refs.get("a", lambda: None)
    refs.put("b", lambda: None)
    assert read_counts(path) == {"a": 2}
    refs.close()
    refs.close()  # twice is harmless
    assert journal_path(path) not in _open_paths()


def test_refcount_counts_on_the_loop_only_without_mounting_or_waiting(tmp_path: str) -> None:
    path = os.path.join(str(tmp_path), "refs.json")
    refs = RefCounter(path)
    assert refs.try_get("a", activates=True) is None  # the first Get mounts: pool work
    refs.get("a", lambda: None)
    assert refs.try_get("a", activates=True) == 2
    assert refs.try_put("a", deactivates=True)  # one reference is left
    assert not refs.try_put("a", deactivates=True)  # the last one unmounts: pool work
    assert refs.count("a") == 1
    assert refs.try_get("b", activates=False) == 1 and refs.try_put("b", deactivates=False)
    with refs.lock("a"):  # a pool thread is mounting or unmounting it
        assert refs.try_get("a", activates=True) is None
        assert not refs.try_put("a", deactivates=False)
    assert read_counts(path) == {"a": 1} == RefCounter(path).active()


def test_refcount_reconcile_with_mounts(tmp_path: str) -> None:
    path = os.path.join(str(tmp_path), "refs.json")
    refs = RefCounter(path)
    for layer in ("unmounted", "kept", "kept", "deleted"):
        refs.get(layer, lambda: None)
    again = RefCounter(path)
    stale = again.reconcile(["kept", "stray", "deleted"], needs_mount=True,
                            existing=["kept", "stray", "unmounted"])
    assert again.active() == {"kept": 2}
    assert stale == ["stray"]  # mounted, but no Get of dockerd's holds it


def test_internal_references_are_never_persisted(tmp_path: str) -> None:
    path = os.path.join(str(tmp_path), "refs.json")
    refs = RefCounter(path)
    events: list[str] = []
    refs.get("c", lambda: events.append("mount"))  # dockerd's Get (docker commit)
    with internal_references():
        refs.get("c", lambda: events.append("mount"))  # strata's Diff holds it too
    assert RefCounter(path).active() == {"c": 1}
    refs.put("c", lambda: events.append("umount"))  # dockerd's Put: the Diff still reads
    assert events == ["mount"] and refs.count("c") == 1
    with internal_references():
        refs.put("c", lambda: events.append("umount"))
    assert events == ["mount", "umount"] and RefCounter(path).active() == {}


def test_init_record_round_trip(tmp_path: str) -> None:
    assert load_init(str(tmp_path)) is None
    record = InitRecord(home="/h", options=["a=b"], uid_maps=[(0, 1000, 10)], gid_maps=[],
                        backend="vfs")
    save_init(str(tmp_path), record)
    loaded = load_init(str(tmp_path))
    assert loaded == record
    assert loaded is not None and loaded.idmap.uids == (IDMap(0, 1000, 10),)


def _owner_mode(path: str) -> tuple[int, int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid, st.st_mode & 0o7777


def _unrename(store: LayerStore, layer_id: str, suffix: str = "0123456789ab") -> str:
    """Move a layer back into staging/, as a power cut that lost its rename leaves it."""
    stage = os.path.join(store.staging_dir, f"{layer_id}.{suffix}")
    os.rename(store.layer_dir(layer_id), stage)
    return stage


def test_promote_staged_puts_back_only_the_recorded_copy(tmp_path: str) -> None:
    """A recorded layer left in staging/ is renamed into place if its one staged
    copy is that layer (recorded parent, no unfinished ApplyDiff); otherwise it
    is reported missing and its copies are left to reconcile."""
    home = str(tmp_path)
    store = LayerStore(home)
    for layer_id, parent in (("1", ""), ("2", "1"), ("3", "1"), ("4", "1"), ("5", "1")):
        with store.staging(layer_id, LayerMeta(parent=parent)) as stage:
            open(os.path.join(stage, "payload"), "w").close()
    moved = _unrename(store, "1")
    _unrename(store, "2")
    _unrename(store, "3")
    os.makedirs(os.path.join(store.staging_dir, "3.second"))  # two copies: which one?
    _unrename(store, "4")
    os.makedirs(os.path.join(store.staging_dir, "17.half"))  # a Create no record claims
    wanted = {"1": "", "2": "9", "3": "1", "4": "1", "5": "1", "6": "1"}
    os.rename(store.layer_dir("5"), os.path.join(str(tmp_path), "elsewhere"))
    done = promote_staged(home, {k: v for k, v in wanted.items() if k != "4"})
    assert done.promoted == ["1"]
    assert sorted(done.missing) == ["2", "3", "5", "6"]
    assert done.missing["6"] == os.path.join(home, "layers", "6")
    assert done.highest_staged == 17
    assert not os.path.exists(moved)
    assert os.path.exists(os.path.join(store.layer_dir("1"), "payload"))
    assert sorted(os.listdir(store.staging_dir)) == ["17.half", "2.0123456789ab",
                                                     "3.0123456789ab", "3.second",
                                                     "4.0123456789ab"]
    assert LayerStore(home).ids() == ["1"]  # the promoted layer is a layer like any
    assert promote_staged(os.path.join(home, "none"), {"1": ""}).missing == {
        "1": os.path.join(home, "none", "layers", "1")}


def test_layer_dirs_get_the_remapped_roots_group(tmp_path: str) -> None:
    home = os.path.join(str(tmp_path), "home")
    store = LayerStore(home, group=100000)
    with store.staging("L1", LayerMeta()) as stage:
        assert _owner_mode(stage) == (0, 100000, 0o710)  # before the rename
    for d in (home, store.layers_dir, store.layer_dir("L1")):
        assert _owner_mode(d) == (0, 100000, 0o710), d
    for d in (store.staging_dir, store.trash_dir):
        assert _owner_mode(d) == (0, 0, 0o710), d


def test_an_older_home_is_fixed_up_without_touching_layer_contents(tmp_path: str) -> None:
    home = os.path.join(str(tmp_path), "home")
    store = LayerStore(home)  # as strata made Homes before ID-mapped groups
    with store.staging("L1", LayerMeta()) as stage:
        os.mkdir(os.path.join(stage, "root"), 0o755)
        os.chown(os.path.join(stage, "root"), 100000, 100000)
        inner = os.path.join(stage, "root", "f")
        open(inner, "w").close()
        os.chown(inner, 101000, 101000)
    os.chmod(store.layer_dir("L1"), 0o750)
    assert _owner_mode(store.layer_dir("L1")) == (0, 0, 0o750)
    os.symlink("/", os.path.join(store.layers_dir, "planted"))
    again = LayerStore(home, group=100000)
    for d in (home, again.layers_dir, again.layer_dir("L1")):
        assert _owner_mode(d) == (0, 100000, 0o710), d
    root = os.path.join(again.layer_dir("L1"), "root")
    assert _owner_mode(root)[:2] == (100000, 100000)
    assert _owner_mode(os.path.join(root, "f"))[:2] == (101000, 101000)
    assert _owner_mode("/")[:2] == (0, 0)  # a planted symlink is not followed
