"""What must hold before a migration moves anything, and what it would move.

``preflight`` reads the data root and returns a :class:`Plan`: the layers,
image metadata and container records that would change, and every reason to
refuse (dockerd or anything else using the root, mounts under it, a container
recorded as running, a layer dir that fits neither layout, metadata naming a
layer that is not there, a Home on another filesystem, a target that already
holds data).  Nothing here writes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from plugin.driver.probes import mounts_under
from plugin.migrate.journal import WORK_DIR_NAME, is_real_dir, live_home
from plugin.migrate.layout import Layout, resolve_parents, scan


@dataclass
class Plan:
    source: str
    target: str
    layers: int = 0
    containers: list[str] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def processes_using(root: str) -> list[str]:
    """Other processes with a cwd or an open file under ``root`` (dockerd keeps its
    bolt databases there open for its whole life)."""
    prefix = os.path.realpath(root).rstrip("/") + "/"
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        paths = []
        try:
            paths.append(os.readlink(f"/proc/{pid}/cwd"))
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue  # gone, or a kernel thread
        for fd in fds:
            try:
                paths.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                continue
        hit = next((p for p in paths if (p + "/").startswith(prefix)), None)
        if hit is not None:
            try:
                with open(f"/proc/{pid}/comm", encoding="utf-8") as f:
                    comm = f.read().strip()
            except OSError:
                comm = "?"
            found.append(f"process {pid} ({comm}) uses {hit}")
    return found


def container_records(root: str) -> dict[str, str]:
    """container id -> path of its config.v2.json."""
    containers = os.path.join(root, "containers")
    if not os.path.isdir(containers):
        return {}
    found = {}
    for cid in sorted(os.listdir(containers)):
        path = os.path.join(containers, cid, "config.v2.json")
        if os.path.isfile(path):
            found[cid] = path
    return found


def read_record(path: str) -> dict[str, object]:
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    if not isinstance(record, dict):
        raise ValueError(f"{path} is not a JSON object")
    return record


def _check_containers(root: str, plan: Plan) -> None:
    for cid, path in container_records(root).items():
        try:
            record = read_record(path)
        except (OSError, ValueError) as e:
            plan.refusals.append(f"container {cid[:12]}: cannot read {path}: {e}")
            continue
        state = record.get("State")
        if isinstance(state, dict) and (state.get("Running") or state.get("Paused")):
            plan.refusals.append(f"container {cid[:12]} is recorded as running: start dockerd "
                                 "and stop it first")
        driver = record.get("Driver")
        if driver == plan.source:
            plan.containers.append(cid)
        elif driver != plan.target:
            plan.notes.append(f"container {cid[:12]} uses driver {driver!r}: left alone")


def _layer_references(root: str, driver: str) -> dict[str, str]:
    """Layer ids dockerd's layer store names -> where (cache-id, mount-id, init-id)."""
    layerdb = os.path.join(root, "image", driver, "layerdb")
    refs = {}
    for kind, files in (("sha256", ("cache-id",)), ("mounts", ("mount-id", "init-id"))):
        base = os.path.join(layerdb, kind)
        if not os.path.isdir(base):
            continue
        for entry in os.listdir(base):
            for name in files:
                path = os.path.join(base, entry, name)
                try:
                    with open(path, encoding="ascii") as f:
                        refs[f.read().strip()] = path
                except FileNotFoundError:
                    continue
    return refs


def _check_filesystem(root: str, plan: Plan) -> None:
    dev = os.stat(root).st_dev
    for path in (live_home(root, plan.source), live_home(root, plan.target),
                 os.path.join(root, "image", plan.source)):
        if os.path.exists(path) and os.stat(path).st_dev != dev:
            plan.refusals.append(f"{path} is on another filesystem than {root}: "
                                 "a migration renames, it never copies")


def _check_target(root: str, plan: Plan, target_layout: Layout) -> None:
    home = live_home(root, plan.target)
    if os.path.lexists(home) and not is_real_dir(home):
        plan.refusals.append(f"{home} exists and is not a directory")
    elif is_real_dir(home):
        held = scan(home, target_layout)
        if held.layers or held.problems:
            plan.refusals.append(f"{home} already holds {len(held.layers)} layer(s) or other "
                                 "data: move it away first")
    images = os.path.join(root, "image", plan.target)
    if os.path.lexists(images):
        plan.refusals.append(f"{images} already exists: move it away first "
                             "(dockerd made it when it last ran on that driver)")


def preflight(root: str, source: tuple[str, Layout], target: tuple[str, Layout]) -> Plan:
    plan = Plan(source=source[0], target=target[0])
    if not is_real_dir(root):
        plan.refusals.append(f"data root {root} is not a directory")
        return plan
    plan.refusals += processes_using(root)
    plan.refusals += [f"{m} is mounted (a layer or container in use)"
                      for m in mounts_under(os.path.realpath(root))
                      if m != os.path.realpath(root)]
    home = live_home(root, plan.source)
    if not is_real_dir(home):
        plan.refusals.append(f"{home} is not a directory: nothing to migrate from "
                             f"{plan.source}")
        return plan
    if not is_real_dir(os.path.join(root, "image", plan.source)):
        plan.refusals.append(f"{root}/image/{plan.source} is missing: unknown layout")
    found = scan(home, source[1])
    plan.refusals += found.problems + resolve_parents(found.layers)
    plan.layers = len(found.layers)
    for layer_id, where in sorted(_layer_references(root, plan.source).items()):
        if layer_id not in found.layers:
            plan.refusals.append(f"{where} names layer {layer_id}, which {home} lacks")
    _check_source_strata(home, source[1], plan)
    _check_target(root, plan, target[1])
    _check_filesystem(root, plan)
    _check_containers(root, plan)
    if os.path.lexists(os.path.join(root, WORK_DIR_NAME)):
        plan.refusals.append(f"{root}/{WORK_DIR_NAME} exists without a journal: inspect it")
    return plan


def _check_source_strata(home: str, layout: Layout, plan: Plan) -> None:
    """strata's own debris: a half-applied layer or staging leftovers are removed by
    strata at start-up, so a root still holding them is refused, not carried over."""
    if not layout.layers_sub:
        return
    for sub in ("staging", "trash"):
        path = os.path.join(home, sub)
        if os.path.isdir(path) and os.listdir(path):
            plan.refusals.append(f"{path} is not empty: start strata once (it clears it) "
                                 "or remove it")
    layers = layout.layers_dir(home)
    for layer_id in sorted(os.listdir(layers)) if os.path.isdir(layers) else []:
        meta = os.path.join(layers, layer_id, "meta.json")
        try:
            with open(meta, encoding="utf-8") as f:
                if json.load(f).get("applying"):
                    plan.refusals.append(f"layer {layer_id} is half-applied (a crash): "
                                         "start strata once, it removes it")
        except (OSError, ValueError):
            continue
