"""``strata migrate --data-root DIR --from overlay2 --to NAME [--back] [--dry-run]``.

Exit status: 0 done (or nothing to do), 2 refused (the reasons are printed,
nothing was changed), 1 failed part-way (the journal stays; rerun or --back).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from plugin.errors import InvalidArgument, StrataError
from plugin.faults import fault_point
from plugin.migrate.checks import Plan, preflight, processes_using
from plugin.migrate.journal import Journal, new_journal, read_journal, write_journal
from plugin.migrate.layout import OVERLAY2, STRATA_OVERLAY, Layout
from plugin.migrate.steps import converge
from plugin.state.layers import validate_id

#: dockerd resolves these names to its own drivers before it looks for a plugin.
INTREE = {"aufs", "btrfs", "devicemapper", "fuse-overlayfs", "overlay", "overlay2", "vfs",
          "windowsfilter", "zfs"}


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cmd = sub.add_parser("migrate", help="move a data root's layers between overlay2 and "
                         "strata's overlay backend, in place (dockerd stopped)")
    cmd.add_argument("--data-root", required=True, help="dockerd's data root")
    cmd.add_argument("--from", dest="source", default="overlay2", choices=["overlay2"],
                     help="the in-tree driver the data root uses now")
    cmd.add_argument("--to", dest="name", required=True,
                     help="strata's driver name (dockerd's --storage-driver)")
    cmd.add_argument("--back", action="store_true",
                     help="the reverse: from strata NAME back to the in-tree driver")
    cmd.add_argument("--dry-run", action="store_true",
                     help="say what would move and what would be refused; change nothing")


def _sides(source: str, name: str) -> dict[str, Layout]:
    validate_id(name, "--to driver name")
    if name in INTREE:
        raise InvalidArgument(f"--to {name}: dockerd would pick its in-tree {name} driver "
                              "for that name, not strata")
    return {source: OVERLAY2, name: STRATA_OVERLAY}


def _print_plan(plan: Plan, root: str) -> None:
    print(f"{root}: {plan.layers} layer(s) {plan.source} -> {plan.target}, "
          f"image/{plan.source} -> image/{plan.target}, "
          f"{len(plan.containers)} container record(s) to rewrite")
    for note in plan.notes:
        print(f"  note: {note}")
    for refusal in plan.refusals:
        print(f"  refused: {refusal}")


def _resume(root: str, journal: Journal, want: str, sides: dict[str, Layout],
            dry_run: bool) -> int:
    print(f"{root}: unfinished migration towards {journal.target} (phase {journal.phase})")
    if dry_run:
        print(f"  would finish it towards {want}")
        return 0
    busy = processes_using(root)
    if busy:
        for line in busy:
            print(f"  refused: {line}")
        return 2
    journal.target = want
    write_journal(root, journal)
    started = time.monotonic()
    moved = converge(root, journal, sides)
    print(f"finished: {moved} layer(s) moved to {want} in {time.monotonic() - started:.2f}s")
    return 0


def migrate(args: argparse.Namespace) -> int:
    root = os.path.abspath(args.data_root)
    sides = _sides(args.source, args.name)
    src, dst = (args.name, args.source) if args.back else (args.source, args.name)
    journal = read_journal(root)
    if journal is not None:
        if (journal.source, journal.name) != (args.source, args.name):
            raise InvalidArgument(f"{root} has an unfinished migration between "
                                  f"{journal.source} and {journal.name}; name those")
        if journal.phase != "committed" or journal.target == dst:
            return _resume(root, journal, dst, sides, args.dry_run)
        # done but for the clean-up, towards the other side: finish it, then start afresh
        converge(root, journal, sides)
    plan = preflight(root, (src, sides[src]), (dst, sides[dst]))
    _print_plan(plan, root)
    if plan.refusals:
        return 2
    if args.dry_run:
        return 0
    journal = new_journal(args.source, args.name, dst)
    write_journal(root, journal)
    fault_point("migrate.journal")
    started = time.monotonic()
    moved = converge(root, journal, sides)
    print(f"migrated: {moved} layer(s), {len(plan.containers)} container(s) to {dst} "
          f"in {time.monotonic() - started:.2f}s")
    return 0


def main(args: argparse.Namespace) -> int:
    try:
        return migrate(args)
    except StrataError as e:
        print(f"strata migrate: {e}", file=sys.stderr)
        return 1
