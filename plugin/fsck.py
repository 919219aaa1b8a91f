"""``strata fsck``: find (and with ``--repair`` remove) what a Home should not hold.

* **orphaned layers**: in ``Home/layers`` but referenced by no image layer or
  container of the dockerd that owns Home.  dockerd passes Home =
  ``<data-root>/<driver name>`` and keeps its layer database in
  ``<data-root>/image/<driver name>/layerdb``: ``sha256/*/cache-id`` names image
  layers, ``mounts/*/{mount-id,init-id}`` container layers.  A layer younger
  than ``--min-age`` is never called an orphan: dockerd records a layer only
  after its ApplyDiff finished, so a new one may be mid-registration.
* **incomplete debris**: staging and trash leftovers, layers whose ApplyDiff
  never finished (what start-up reconcile removes).
* **leaked mounts**: mounts under Home of layers with no Get outstanding.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from dataclasses import dataclass, field

from plugin.driver.probes import mounts_under
from plugin.printable import printable
from plugin.state.config import load_init
from plugin.state.layers import LayerStore
from plugin.state.refcount import read_counts


@dataclass
class Findings:
    orphans: list[str] = field(default_factory=list)
    debris: list[str] = field(default_factory=list)
    leaked_mounts: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.orphans or self.debris or self.leaked_mounts)


def referenced_layers(home: str) -> set[str] | None:
    """Layer ids dockerd knows for this Home, or None without a layer database."""
    data_root, name = os.path.split(home.rstrip("/"))
    layerdb = os.path.join(data_root, "image", name, "layerdb")
    if not os.path.isdir(layerdb):
        return None
    known: set[str] = set()
    for kind, files in (("sha256", ("cache-id",)), ("mounts", ("mount-id", "init-id"))):
        base = os.path.join(layerdb, kind)
        for entry in os.listdir(base) if os.path.isdir(base) else []:
            for fname in files:
                try:
                    with open(os.path.join(base, entry, fname), encoding="ascii") as f:
                        known.add(f.read().strip())
                except FileNotFoundError:
                    continue
    return known


def _refcounts(home: str) -> dict[str, int]:
    return read_counts(os.path.join(home, "refs.json"))


def examine(home: str, min_age: float) -> Findings:
    found = Findings()
    store = LayerStore(home)
    for parent in (store.staging_dir, store.trash_dir):
        found.debris += [os.path.join(parent, n) for n in sorted(os.listdir(parent))]
    known = referenced_layers(home)
    if known is None:
        found.notes.append(f"no layer database next to {home}: orphans cannot be told")
    now = time.time()
    for layer_id in store.ids():
        path = store.layer_dir(layer_id)
        if store.read_meta(layer_id).applying:
            found.debris.append(path)
        elif (known is not None and layer_id not in known
              and now - os.lstat(path).st_mtime >= min_age):
            found.orphans.append(layer_id)
    counts = _refcounts(home)
    for mountpoint in mounts_under(store.layers_dir):
        rel = os.path.relpath(mountpoint, store.layers_dir).split(os.sep)[0]
        if counts.get(rel, 0) == 0:
            found.leaked_mounts.append(mountpoint)
    return found


def repair(home: str, found: Findings) -> None:
    for mountpoint in found.leaked_mounts:
        subprocess.run(["umount", "-l", mountpoint], check=False)
    store = LayerStore(home)
    store.reconcile()
    for layer_id in [*store.half_applied(), *found.orphans]:
        store.remove(layer_id)


def resolve_home(args: argparse.Namespace) -> str:
    if args.home:
        return str(args.home)
    record = load_init(args.state_dir or os.path.join("/var/lib/strata", args.name))
    if record is None:
        raise SystemExit("strata fsck: no --home and no recorded Init; pass --home")
    return record.home


def fsck(args: argparse.Namespace) -> int:
    home = resolve_home(args)
    found = examine(home, args.min_age)
    print(f"Home: {printable(home)}")
    for note in found.notes:
        print(f"note: {printable(note)}")
    for label, items in (("orphaned layer", found.orphans), ("incomplete debris", found.debris),
                         ("leaked mount", found.leaked_mounts)):
        for item in items:
            # debris is named by whatever bytes are in Home
            print(f"{label}: {printable(item)}")
    if found.clean:
        print("clean")
        return 0
    if args.repair:
        repair(home, found)
        print("repaired")
        return 0
    print("run with --repair to remove these (with dockerd stopped, or idle)")
    return 1
