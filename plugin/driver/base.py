"""The driver contract: what every strata backend promises.

Lifecycle of a layer
--------------------
An *ID* is an opaque string chosen by the engine: 64 hex digits for image
layers and containers, ``<64hex>-init`` for a container's init layer, 25-char
BuildKit ids, or test names such as ``Base``.  strata validates it (no ``/``,
no ``..``, no NUL, bounded length) before it touches a path.

* ``create(id, parent)`` makes a new layer whose content starts as a copy of
  ``parent`` (empty when there is none).  The engine follows it with
  ``apply_diff`` (image layers) or writes into it (BuildKit snapshots), so a
  created layer is writable.  ``create_read_write`` does the same for container
  layers (``<c>-init`` on the image, then ``<c>`` on ``<c>-init``).  A layer is
  visible to ``exists`` only once it is complete (staged, then renamed).
* ``get(id)`` returns the absolute host path of the layer's merged view,
  mounting it if the backend mounts; it returns the *same path* every time for
  an id (dockerd compares it with the stored one).  ``put(id)`` releases one
  ``get``.  Gets and puts are reference-counted per id and are not balanced by
  the engine (nested gets from ``docker cp``, an extra put after a failed
  start): the count clamps at zero and a put of an unmounted id succeeds.
* ``apply_diff(id, parent, stream)`` extracts a layer tar onto ``id`` and
  returns the sum of the tar headers' sizes; ``diff(id, parent)`` streams the
  tar of what ``id`` changed against ``parent``; ``changes`` lists the changed
  paths; ``diff_size`` is the byte size of those changes.
* ``remove(id)`` deletes the layer; removing an unknown id succeeds (dockerd
  retries removals and garbage-collects orphans it may no longer know about).
* ``cleanup()`` runs when dockerd shuts down: unmount everything mounted.

Concurrency: calls on *different* ids may run at the same time (a commit
streams ``diff`` of the container while ``apply_diff`` fills the new layer);
``get``/``put``/``remove`` of the *same* id are serialised by the reference
counter in :mod:`plugin.state`.  Every method is synchronous and may block:
the server runs them in worker threads, never on the event loop.

A :class:`ProtoDriver` has no diff methods of its own; :func:`naive_diff`
(``plugin.driver.naive``) gives it the four by walking two mounted trees.  A
backend with a native diff (overlay: the upper dir *is* the diff) implements
:class:`Driver` directly.  Model: moby ``daemon/graphdriver/driver.go`` and
containerd ``core/snapshots/snapshotter.go``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

from plugin.archive import Change, TarStream
from plugin.idtools import IDMappings


@dataclass(frozen=True)
class CreateOpts:
    mount_label: str = ""
    storage_opt: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Capabilities:
    #: True only if ``diff`` replays the exact bytes that were applied: dockerd
    #: then verifies the digest on save/push instead of keeping tar-split data.
    reproduces_exact_diffs: bool = False


class ProtoDriver(ABC):
    """The base contract (moby ``ProtoDriver``)."""

    #: The backend name as Docker spells it (``vfs``, ``overlay``, …).
    name: str

    @abstractmethod
    def create(self, layer_id: str, parent: str, opts: CreateOpts) -> None: ...

    def create_read_write(self, layer_id: str, parent: str, opts: CreateOpts) -> None:
        self.create(layer_id, parent, opts)

    @abstractmethod
    def remove(self, layer_id: str) -> None: ...

    @abstractmethod
    def get(self, layer_id: str, mount_label: str) -> str: ...

    @abstractmethod
    def put(self, layer_id: str) -> None: ...

    @abstractmethod
    def exists(self, layer_id: str) -> bool: ...

    # Answers from memory, for the server's event loop: no filesystem work, no
    # waiting on a lock.  ``None`` (or False) means "not possible now": the server
    # then makes the blocking call in its pool.  A thread hop (two wake-ups and a
    # GIL hand-over) costs more than the rest of an Exists or a Get.
    def exists_nowait(self, layer_id: str) -> bool | None:
        return None

    def get_nowait(self, layer_id: str, mount_label: str) -> str | None:
        return None

    def put_nowait(self, layer_id: str) -> bool:
        return False

    @abstractmethod
    def status(self) -> list[tuple[str, str]]: ...

    @abstractmethod
    def metadata(self, layer_id: str) -> dict[str, str]: ...

    @abstractmethod
    def cleanup(self) -> None: ...

    def close(self) -> None:
        """Let go of files held open under Home (a backend's ``cleanup`` ends with
        it; a re-Init replacing this driver and the server's shutdown call it):
        an open file keeps a Home that is a mount busy.  Later calls still work;
        they reopen what they need."""

    def capabilities(self) -> Capabilities:
        return Capabilities()

    def reconcile(self) -> None:
        """Clear what a crash left behind; called once the driver is built."""

    def applying(self, layer_id: str) -> AbstractContextManager[None]:
        """Mark ``layer_id`` incomplete while a diff is applied to it, so that a
        crash mid-apply leaves a layer start-up removes rather than a half one."""
        return nullcontext()


class Driver(ProtoDriver):
    """The full contract (moby ``Driver``): a ProtoDriver plus the diff methods."""

    @abstractmethod
    def diff(self, layer_id: str, parent: str) -> TarStream: ...

    @abstractmethod
    def changes(self, layer_id: str, parent: str) -> list[Change]: ...

    @abstractmethod
    def apply_diff(self, layer_id: str, parent: str, stream: BinaryIO) -> int: ...

    @abstractmethod
    def diff_size(self, layer_id: str, parent: str) -> int: ...


class DriverInit(Protocol):
    """What ``register`` takes: builds a driver for a Home, or raises a typed error."""

    def __call__(self, home: str, options: list[str], idmap: IDMappings) -> Driver: ...
