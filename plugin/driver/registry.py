"""Backends by name, and the choice of one for a Home.

Each backend module calls :func:`register` once at import (one line, like
moby's ``register/register_<name>.go``); :func:`get_driver` builds one by
name; :func:`new` picks the best one for the backing filesystem of Home in
priority order, as dockerd does when no ``--storage-driver`` is given.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Collection
from dataclasses import dataclass

from plugin.driver.base import Driver, DriverInit
from plugin.driver.probes import fs_name
from plugin.errors import IncompatibleFS, InvalidArgument, NotSupported, Prerequisites
from plugin.idtools import IDMappings

log = logging.getLogger("strata.driver")

#: Docker's driver names, in the order ``auto`` tries them.  A backing fs that
#: *is* a backend's native fs (btrfs, zfs) wins before this order applies.
PRIORITY = ["btrfs", "zfs", "overlay", "fuse-overlayfs", "vfs"]
#: Every name strata knows; a backend module missing here is reported, not hidden.
KNOWN = [*PRIORITY, "devicemapper", "aufs"]
_NATIVE_FS = {"btrfs": "btrfs", "zfs": "zfs"}


@dataclass(frozen=True)
class Registration:
    name: str
    init: DriverInit
    #: False for a known name whose Init only explains why it cannot run here.
    implemented: bool = True


_registry: dict[str, Registration] = {}


def register(name: str, init: DriverInit, *, implemented: bool = True) -> None:
    _registry[name] = Registration(name, init, implemented)


def implemented() -> list[str]:
    """Every backend with a real driver behind its name, in ``KNOWN`` order (what
    the test rings run on; a name whose module is missing is left out)."""
    found = []
    for name in KNOWN:
        try:
            if _load(name).implemented:
                found.append(name)
        except NotSupported:
            continue
    return found


def _load(name: str) -> Registration:
    if name not in KNOWN:
        raise InvalidArgument(f"unknown backend {name!r}; choose one of {', '.join(KNOWN)} or auto")
    if name not in _registry:
        module = "plugin.backends." + name.replace("-", "_")
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            raise NotSupported(f"backend {name} is not implemented in this strata version") from e
    return _registry[name]


def get_driver(name: str, home: str, options: list[str], idmap: IDMappings) -> Driver:
    """Build the backend ``name`` on ``home``; typed errors say why it cannot run."""
    os.makedirs(home, mode=0o710, exist_ok=True)
    driver = _load(name).init(home, options, idmap)
    driver.reconcile()
    log.info("backend %s initialised on %s (%s)", name, home, fs_name(home))
    return driver


def new(home: str, options: list[str], idmap: IDMappings,
        exclude: Collection[str] = ()) -> Driver:
    """``auto``: the backing fs's native backend first, then by priority, but none
    of ``exclude``."""
    os.makedirs(home, mode=0o710, exist_ok=True)
    backing = fs_name(home)
    native = [b for b, fs in _NATIVE_FS.items() if fs == backing]
    order = native + [b for b in PRIORITY if b not in native and b not in _NATIVE_FS]
    order = [b for b in order if b not in exclude]
    reasons = []
    for name in order:
        try:
            return get_driver(name, home, options, idmap)
        except (NotSupported, Prerequisites, IncompatibleFS) as e:
            reasons.append(f"{name}: {e}")
            log.info("auto: skipping %s: %s", name, e)
    raise Prerequisites("no backend can run on " + home + ": " + "; ".join(reasons))


def split_options(options: list[str], prefix: str) -> dict[str, str]:
    """``prefix.key=value`` options addressed to one backend, by key.

    dockerd passes every ``--storage-opt`` unfiltered (docs/protocol.md §1.1), so
    options for other drivers are ignored here; a malformed one is an error.
    """
    found = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep:
            raise InvalidArgument(f"storage option {option!r} is not key=value")
        key = key.strip().lower()
        if key.startswith(prefix + "."):
            found[key[len(prefix) + 1:]] = value.strip()
        elif "." not in key:
            found[key] = value.strip()
    return found
