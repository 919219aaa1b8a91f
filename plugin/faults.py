"""Named fault-injection points, for crash and deadline tests of the real process.

Code calls ``fault_point("create.staged")`` at the moments a crash would hurt
most (after a layer is built but before it is renamed into place, after a
removal's rename but before the delete, midway through an ApplyDiff).  With
``STRATA_FAULTS`` unset (always, outside tests) a point is one dict lookup.

``STRATA_FAULTS="create.staged=kill,get=sleep:30,remove.renamed=error"``:

* ``kill``      SIGKILL this process on the spot (what a crash looks like);
* ``sleep:N``   block N seconds (a stuck mount or filesystem call);
* ``error``     raise a StrataError naming the point.
"""

from __future__ import annotations

import logging
import os
import signal
import time

from plugin.errors import StrataError

log = logging.getLogger("strata.faults")

POINTS = (
    "create.staged",      # layer fully built in staging/, not yet renamed into layers/
    "create.renamed",     # layer renamed into layers/, Create not yet answered
    "apply.midstream",    # ApplyDiff has started extracting, body not fully read
    "apply.done",         # extraction finished, applying mark not yet cleared
    "remove.renamed",     # layer renamed into trash/, not yet deleted
    "get",                # before a Get mounts
    "put",                # before a Put unmounts
    # containerd snapshotter (plugin/snapshotter/snapshotter.py):
    "snap.prepare.built",      # Prepare/View: layer in place, its record not yet inserted
    "snap.prepare.recorded",   # Prepare/View: record committed, mounts not yet answered
    "snap.commit.measured",    # Commit: usage measured, record not yet turned committed
    "snap.commit.recorded",    # Commit: record committed, not yet answered
    "snap.remove.unrecorded",  # Remove: record deleted, layer not yet deleted
)

#: ``strata migrate``'s steps (plugin/migrate): each fires once, after the step it names
#: is durable, so a kill there leaves the state a rerun (or --back) must finish.
MIGRATE_POINTS = (
    "migrate.journal",    # the journal is written, nothing moved yet
    "migrate.parked",     # one driver Home is parked (a blocker file in its place)
    "migrate.layer",      # one layer renamed into the target layout, the rest not
    "migrate.links",      # every short link points into the target layout
    "migrate.images",     # image/<from> renamed to image/<to>
    "migrate.container",  # one container's config.v2.json names the new driver
    "migrate.committed",  # the target Home is live; the other side not yet cleared
)


def _parse(spec: str) -> dict[str, str]:
    faults = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        point, _, action = item.partition("=")
        if point not in POINTS + MIGRATE_POINTS:
            raise ValueError(f"STRATA_FAULTS: unknown point {point!r}; "
                             f"known: {', '.join(POINTS + MIGRATE_POINTS)}")
        faults[point] = action or "kill"
    return faults


_FAULTS = _parse(os.environ.get("STRATA_FAULTS", ""))


def fault_point(point: str) -> None:
    action = _FAULTS.get(point)
    if action is None:
        return
    log.warning("fault injection: %s=%s", point, action)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action.startswith("sleep:"):
        time.sleep(float(action.split(":", 1)[1]))
    elif action == "error":
        raise StrataError(f"injected fault at {point}")
