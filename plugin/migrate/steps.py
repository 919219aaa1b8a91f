"""The migration's steps.  Each one looks at where things are and finishes what is
left, so running the whole sequence again after a kill at any point converges
to the same end state; the journal's ``target`` says which end (a rerun keeps
it, ``--back`` flips it).

Phases (the journal records the current one):

* ``parking``: each driver's live Home is swapped for a blocker file and parked
  in the work dir (the target's first, so a dockerd started now on the source
  driver still finds its Home whole until the moment it becomes a blocker);
* ``moving``: layers renamed into the target layout, short links re-pointed,
  ``image/<driver>`` renamed, containers' ``Driver`` rewritten, and the
  target's parked Home swapped back in for its blocker (the commit);
* ``committed``: the other driver's parked leftovers, its blocker and the
  work dir are removed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil

import msgspec

from plugin.faults import fault_point
from plugin.migrate.checks import container_records, read_record
from plugin.migrate.journal import (
    Journal,
    MigrationError,
    exchange,
    is_blocker,
    is_real_dir,
    journal_path,
    live_home,
    parked_home,
    unlink_blocker,
    work_dir,
    write_blocker,
    write_journal,
)
from plugin.migrate.layout import Layout, resolve_parents, scan
from plugin.state.files import fsync_dir, write_atomic
from plugin.state.layers import LayerMeta

log = logging.getLogger("strata.migrate")


def park(root: str, driver: str, layout: Layout) -> None:
    """Put a blocker at the driver's live Home and its directory in the work dir."""
    live, parked = live_home(root, driver), parked_home(root, driver)
    if is_blocker(live) and is_real_dir(parked):
        return
    if is_real_dir(live):
        if not os.path.lexists(parked):
            write_blocker(parked)
        if not is_blocker(parked):
            raise MigrationError(f"cannot park {live}: {parked} is in the way")
        exchange(live, parked)
    elif not os.path.lexists(live):
        if not os.path.lexists(parked):
            layout.make_skeleton(parked)
            fsync_dir(work_dir(root))
        write_blocker(live)
    else:
        raise MigrationError(f"{live} is neither a directory nor strata's blocker")
    log.info("parked %s at %s", live, parked)
    fault_point("migrate.parked")


def move_layers(root: str, sides: dict[str, Layout], target: str) -> int:
    """Rename every layer of the other parked Home into the target's; return how many."""
    other = next(d for d in sides if d != target)
    target_home, other_home = parked_home(root, target), parked_home(root, other)
    here, there = scan(target_home, sides[target]), scan(other_home, sides[other])
    if here.problems or there.problems:
        raise MigrationError("unexpected entries in the parked Homes: "
                             + "; ".join((here.problems + there.problems)[:5]))
    every = {**here.layers, **there.layers}
    problems = resolve_parents(every)
    if problems:
        raise MigrationError("; ".join(problems[:5]))
    into = sides[target]
    os.makedirs(into.layers_dir(target_home), mode=0o700, exist_ok=True)
    for layer_id in sorted(there.layers):
        src = sides[other].layer_dir(other_home, layer_id)
        dst = into.layer_dir(target_home, layer_id)
        _prepare(src, into, every[layer_id].parent)
        os.rename(src, dst)
        fsync_dir(os.path.dirname(src))
        fsync_dir(os.path.dirname(dst))
        fault_point("migrate.layer")
    for layer_id in every:
        _finish(into.layer_dir(target_home, layer_id), into)
    _relink(target_home, into, {i: every[i].link for i in every}, other_home)
    return len(there.layers)


def _prepare(layer_dir: str, into: Layout, parent: str) -> None:
    """What the target layout needs in a layer dir before it appears there."""
    if into.layers_sub:  # strata: meta.json with the parent; work/ and merged/ for a child
        write_atomic(os.path.join(layer_dir, "meta.json"),
                     msgspec.json.encode(LayerMeta(parent=parent)), 0o600)
        if parent:
            st = os.stat(os.path.join(layer_dir, "diff"))
            for sub in ("work", "merged"):
                path = os.path.join(layer_dir, sub)
                if not os.path.isdir(path):
                    os.mkdir(path, 0o700)
                    os.chown(path, st.st_uid, st.st_gid)


def _finish(layer_dir: str, into: Layout) -> None:
    """Drop what only the other layout keeps: overlay2 has no meta.json, and removes
    ``merged/`` at each Put (making it again at Get), where strata keeps it."""
    if not into.layers_sub:
        meta = os.path.join(layer_dir, "meta.json")
        if os.path.exists(meta):
            os.unlink(meta)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.join(layer_dir, "merged"))  # only if empty (never mounted here)


def _relink(home: str, layout: Layout, links: dict[str, str], other_home: str) -> None:
    link_dir = os.path.join(home, "l")
    os.makedirs(link_dir, mode=0o700, exist_ok=True)
    for layer_id, link in links.items():
        path, target = os.path.join(link_dir, link), layout.link_target(layer_id)
        if os.path.islink(path) and os.readlink(path) == target:
            continue
        tmp = path + ".migrate-tmp"
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(target, tmp)
        os.replace(tmp, path)
    stale = os.path.join(other_home, "l")
    if os.path.isdir(stale):
        for name in os.listdir(stale):
            os.unlink(os.path.join(stale, name))
    fsync_dir(link_dir)
    fault_point("migrate.links")


def rename_images(root: str, source: str, target: str) -> None:
    images = os.path.join(root, "image")
    src, dst = os.path.join(images, source), os.path.join(images, target)
    if is_real_dir(src) and not os.path.lexists(dst):
        os.rename(src, dst)
        fsync_dir(images)
        log.info("renamed %s to %s", src, dst)
        fault_point("migrate.images")
    elif os.path.lexists(src):
        raise MigrationError(f"both {src} and {dst} exist: move one away by hand")


def rewrite_containers(root: str, source: str, target: str) -> int:
    """Point every container recorded on ``source`` at ``target``; return how many."""
    done = 0
    for cid, path in container_records(root).items():
        record = read_record(path)
        if record.get("Driver") != source:
            continue
        record["Driver"] = target
        data = json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode()
        write_atomic(path, data, os.stat(path).st_mode & 0o7777)
        log.info("container %s: Driver %s -> %s", cid[:12], source, target)
        done += 1
        fault_point("migrate.container")
    return done


def commit(root: str, journal: Journal) -> None:
    """Swap the target's parked Home in for its blocker: dockerd can use it from now."""
    live, parked = live_home(root, journal.target), parked_home(root, journal.target)
    if is_real_dir(live) and is_blocker(parked):
        return  # swapped before a crash; the journal did not record it yet
    if not (is_blocker(live) and is_real_dir(parked)):
        raise MigrationError(f"cannot commit: expected a blocker at {live} and a Home at "
                             f"{parked}")
    exchange(live, parked)


def clean_up(root: str, journal: Journal, sides: dict[str, Layout]) -> None:
    """Remove the other driver's emptied Home, both blockers, then the journal."""
    other = next(d for d in sides if d != journal.target)
    parked = parked_home(root, other)
    if is_real_dir(parked):
        left = scan(parked, sides[other])
        if left.layers:
            raise MigrationError(f"{parked} still holds {len(left.layers)} layer(s); "
                                 "not removing it")
        shutil.rmtree(parked)
    unlink_blocker(parked)
    unlink_blocker(live_home(root, other))
    unlink_blocker(parked_home(root, journal.target))
    os.unlink(journal_path(root))
    os.rmdir(work_dir(root))
    fsync_dir(root)


def converge(root: str, journal: Journal, sides: dict[str, Layout]) -> int:
    """Run the steps from the journal's phase to the end; return the layers moved."""
    moved = 0
    other = next(d for d in sides if d != journal.target)
    if journal.phase == "parking":
        park(root, journal.target, sides[journal.target])
        park(root, other, sides[other])
        journal.phase = "moving"
        write_journal(root, journal)
    if journal.phase == "moving":
        moved = move_layers(root, sides, journal.target)
        rename_images(root, other, journal.target)
        rewrite_containers(root, other, journal.target)
        commit(root, journal)
        journal.phase = "committed"
        write_journal(root, journal)
        fault_point("migrate.committed")
    clean_up(root, journal, sides)
    return moved
