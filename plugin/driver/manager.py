"""The driver a plugin process serves, built at Init or from the persisted Init.

Front-end agnostic: the graphdriver HTTP server uses it today, a containerd
snapshotter front-end can use it tomorrow.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping

from plugin.driver import registry
from plugin.driver.base import Driver
from plugin.errors import InvalidArgument, NotInitialized, Prerequisites
from plugin.idtools import IDMap, IDMappings
from plugin.migrate.journal import unfinished
from plugin.state.config import InitRecord, load_init, save_init
from plugin.state.ownership import refuse_snapshotter_state

log = logging.getLogger("strata.driver")


class DriverManager:
    def __init__(self, state_dir: str, backend: str, extra_options: list[str] | None = None,
                 refused_backends: Mapping[str, str] | None = None) -> None:
        self.state_dir = state_dir
        self.backend = backend
        self.extra_options = list(extra_options or [])
        #: backend -> the reason Init refuses it here; ``auto`` passes over these
        self.refused_backends = dict(refused_backends or {})
        self._driver: Driver | None = None
        self._record: InitRecord | None = None
        self._lock = threading.Lock()

    @property
    def driver(self) -> Driver:
        driver = self._driver
        if driver is None:
            raise NotInitialized(
                "GraphDriver.Init has not been called and no earlier Init is recorded in "
                f"{self.state_dir}; restart dockerd so that it sends Init")
        return driver

    @property
    def record(self) -> InitRecord | None:
        return self._record

    def load_persisted(self) -> bool:
        """Serve the Home of the last Init, if there was one (plugin restart)."""
        record = load_init(self.state_dir)
        if record is None or not os.path.isdir(record.home):
            return False
        log.info("resuming the recorded Init: home %s, backend %s", record.home, record.backend)
        self._activate(record)
        return True

    def init(self, home: str, options: list[str], uid_maps: list[IDMap],
             gid_maps: list[IDMap]) -> None:
        if not os.path.isabs(home):
            raise InvalidArgument(f"Home {home!r} is not an absolute path")
        refuse_snapshotter_state(home)
        # dockerd's Home is <data-root>/<name>: refuse a root `strata migrate` is changing
        migrating = unfinished(os.path.dirname(home.rstrip("/")))
        if migrating:
            raise Prerequisites(migrating)
        record = InitRecord(
            home=home, options=[*self.extra_options, *options],
            uid_maps=[(m.container_id, m.host_id, m.size) for m in uid_maps],
            gid_maps=[(m.container_id, m.host_id, m.size) for m in gid_maps],
            backend=self.backend,
        )
        self._activate(record)
        save_init(self.state_dir, record)

    def close(self) -> None:
        """The server stops: let go of the driver's open files."""
        with self._lock:
            driver = self._driver
        if driver is not None:
            driver.close()

    def _activate(self, record: InitRecord) -> None:
        idmap: IDMappings = record.idmap
        with self._lock:
            if record.backend in self.refused_backends:
                raise Prerequisites(self.refused_backends[record.backend])
            if record.backend == "auto":
                driver = registry.new(record.home, record.options, idmap,
                                      exclude=self.refused_backends.keys())
            else:
                driver = registry.get_driver(record.backend, record.home, record.options, idmap)
            old, self._driver, self._record = self._driver, driver, record
        if old is not None:
            old.close()
