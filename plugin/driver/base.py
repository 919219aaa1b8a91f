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
  Removing a layer that still has children fails with ``FailedPrecondition``
  on every backend, as containerd's snapshotters refuse it: dockerd always
  removes a chain top down, and a parent deleted under its children would
  leave them with lowers, snapshots or clones that point at nothing.
* ``mounts(id)`` says what to mount to see the layer's tree, without mounting
  it (a containerd snapshotter returns this; containerd mounts it), while
  ``get(id)`` mounts in-process and returns a path (the graphdriver way).  Both
  describe the same tree; backends that mount through the kernel build their
  Get mount from the same spec.
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
from plugin.errors import NotSupported
from plugin.idtools import IDMappings


@dataclass(frozen=True)
class CreateOpts:
    mount_label: str = ""
    storage_opt: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class MountSpec:
    """One mount, in mount(8)'s terms (containerd's ``mount.Mount``): ``type``
    (``overlay``, ``bind``, ``fuse3.fuse-overlayfs``), ``source`` and
    ``options`` in order (``ro``/``rw``, ``rbind``, ``lowerdir=a:b``,
    ``upperdir=…``).  Paths are absolute; nothing here is relative to a cwd."""

    type: str
    source: str
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Counts:
    """What the driver holds now, for metrics: layers under Home, mounts it
    holds, and dockerd's Gets not yet Put (summed over layers)."""

    layers: int
    mounts: int
    references: int


@dataclass(frozen=True)
class Capabilities:
    #: True only if ``diff`` replays the exact bytes that were applied: dockerd
    #: then verifies the digest on save/push instead of keeping tar-split data.
    reproduces_exact_diffs: bool = False


class ProtoDriver(ABC):
    """The base contract (moby ``ProtoDriver``).

    Every method may raise ``InvalidArgument`` for an id that is not a valid
    layer id (the server validates ids first; backends validate again before
    an id becomes a path), and a ``StrataError`` naming the layer and the path
    when the filesystem fails under it.
    """

    #: The backend name as Docker spells it (``vfs``, ``overlay``, …).
    name: str

    @abstractmethod
    def create(self, layer_id: str, parent: str, opts: CreateOpts) -> None:
        """Make layer ``layer_id`` whose tree starts as ``parent``'s (empty when
        ``parent`` is ""), writable, visible to ``exists`` only once complete.

        Raises ``AlreadyExists`` if the id is taken, ``NotFound`` if the parent
        is missing (or is being removed), ``NotSupported``/``InvalidArgument``
        for a storage option the backend cannot honour."""

    def create_read_write(self, layer_id: str, parent: str, opts: CreateOpts) -> None:
        """A container's layer (``<c>-init``, then ``<c>``): as ``create``."""
        self.create(layer_id, parent, opts)

    @abstractmethod
    def remove(self, layer_id: str, *, durable: bool = True) -> None:
        """Delete the layer, unmounting it first whatever its Get count (a
        container process may still hold files: the unmount is lazy).  An
        unknown id succeeds.  Raises ``FailedPrecondition`` while the layer has
        children, and leaves it untouched then.  A crash mid-way leaves the
        layer either whole or gone (never half), and start-up collects the rest.

        ``durable=False`` is for a caller that keeps its own durable record that
        the layer is gone, and deletes at start-up every layer no record claims
        (the snapshotter): the layer's leaving is then not forced to the disk
        before the call returns (``LayerStore.remove``)."""

    @abstractmethod
    def get(self, layer_id: str, mount_label: str) -> str:
        """Count one reference and return the absolute path of the layer's
        tree, mounting it on the first reference if the backend mounts; the
        same path every time for an id.  Raises ``NotFound`` for an unknown id."""

    @abstractmethod
    def put(self, layer_id: str) -> None:
        """Release one ``get``; unmount when none is left.  The count clamps at
        zero: a put of an unmounted or unknown id succeeds (dockerd's Gets and
        Puts are not balanced)."""

    @abstractmethod
    def exists(self, layer_id: str) -> bool:
        """Whether the layer is complete and present (never raises for a valid id)."""

    def mounts(self, layer_id: str, *, read_only: bool = False) -> list[MountSpec]:
        """What to mount, in order, to see the layer's tree at one target; with
        ``read_only`` a view that cannot write (an overlay without an upper
        dir, a read-only bind).  Mounts nothing.  Raises ``NotFound`` for an
        unknown id and ``NotSupported`` where the tree can only be mounted by
        the backend itself (zfs on zfs-fuse sets a dataset property)."""
        raise NotSupported(f"the {self.name} backend cannot describe its mounts; "
                           "only Get can mount its layers")

    def usage(self, layer_id: str) -> tuple[int, int]:
        """The disk space and inode count of the layer's *own* content, as
        containerd's snapshotters measure it (``fs.DiskUsage``): allocated blocks
        (``st_blocks`` x 512) and distinct inodes of every entry under the
        layer's own directory, its root included, each inode counted once.  For
        overlay that is the layer's upper (diff) dir; for vfs and btrfs, where a
        layer is a whole tree, the layer root (containerd's native does the same).
        Nothing is mounted.  Raises ``NotFound`` for an unknown id and
        ``NotSupported`` where the backend cannot walk its layers unmounted."""
        raise NotSupported(f"the {self.name} backend cannot measure a layer's usage")

    def layer_ids(self) -> list[str]:
        """Every complete layer present (no staged or doomed ones), in no order:
        what a front-end with its own records compares them with to find layers
        no record claims (a crash between creating a layer and recording it)."""
        raise NotSupported(f"the {self.name} backend cannot list its layers")

    # Answers from memory, for the server's event loop: no filesystem work, no
    # waiting on a lock.  ``None`` (or False) means "not possible now": the server
    # then makes the blocking call in its pool.  A thread hop (two wake-ups and a
    # GIL hand-over) costs more than the rest of an Exists or a Get.
    def exists_nowait(self, layer_id: str) -> bool | None:
        """``exists`` answered from memory, or None when only ``exists`` can say."""
        return None

    def get_nowait(self, layer_id: str, mount_label: str) -> str | None:
        """``get`` of a layer that needs no mount now, or None (then call ``get``)."""
        return None

    def put_nowait(self, layer_id: str) -> bool:
        """``put`` that needs no unmount; False when ``put`` must do it."""
        return False

    @abstractmethod
    def status(self) -> list[tuple[str, str]]:
        """Rows for ``docker info``: the backend, its probes, its layer count."""

    @abstractmethod
    def metadata(self, layer_id: str) -> dict[str, str]:
        """``docker inspect``'s GraphDriver.Data for the layer (its paths).
        Raises ``NotFound`` for an unknown id."""

    @abstractmethod
    def cleanup(self) -> None:
        """dockerd shuts down: unmount every layer, drop every count, ``close``."""

    def close(self) -> None:  # noqa: B027 - an optional hook: nothing open, nothing to do
        """Let go of files held open under Home (a backend's ``cleanup`` ends with
        it; a re-Init replacing this driver and the server's shutdown call it):
        an open file keeps a Home that is a mount busy.  Later calls still work;
        they reopen what they need."""

    def counts(self) -> Counts | None:
        """Counts for metrics, or None when the backend keeps none.  Reads Home
        and the mount table: blocking, called at scrape time from the pool."""
        return None

    def capabilities(self) -> Capabilities:
        """What dockerd may rely on (see :class:`Capabilities`)."""
        return Capabilities()

    def reconcile(self) -> None:  # noqa: B027 - an optional hook
        """Clear what a crash left behind; called once the driver is built."""

    def read_view(self, layer_id: str) -> AbstractContextManager[str | None]:
        """The layer's whole tree as a path valid inside the block, for strata's own
        short reads (a naive Diff made in memory), or None when the backend has
        nothing cheaper than Get/Put (the caller then uses those).  Nothing is
        written through it and no reference is counted: a view must not stay
        mounted after the block, nor be seen by anyone else.  ``NotFound`` for an
        unknown id."""
        return nullcontext(None)

    def write_view(self, layer_id: str) -> AbstractContextManager[str | None]:
        """Like ``read_view``, for strata's own writes (a naive ApplyDiff): the
        layer's whole tree writable inside the block, no Get counted, nothing
        left mounted after it; or None (the caller uses Get/Put).  Get of the
        layer waits until the block ends."""
        return nullcontext(None)

    def applying(self, layer_id: str) -> AbstractContextManager[None]:
        """Mark ``layer_id`` incomplete while a diff is applied to it, so that a
        crash mid-apply leaves a layer start-up removes rather than a half one."""
        return nullcontext()


class Driver(ProtoDriver):
    """The full contract (moby ``Driver``): a ProtoDriver plus the diff methods.

    ``parent`` is the layer the diff is taken against: dockerd passes the
    layer's own parent ("" for a base layer), or ``<c>-init`` for a container.
    Each raises ``NotFound`` for an unknown id or parent."""

    @abstractmethod
    def diff(self, layer_id: str, parent: str) -> TarStream:
        """A layer tar of what ``layer_id`` changed against ``parent``
        (whiteouts as ``.wh.`` entries, owners mapped back to the container's
        ids), streamed: the caller reads and then closes it."""

    @abstractmethod
    def changes(self, layer_id: str, parent: str) -> list[Change]:
        """The paths added, modified or deleted against ``parent`` (``docker diff``)."""

    @abstractmethod
    def apply_diff(self, layer_id: str, parent: str, stream: BinaryIO) -> int:
        """Extract a layer tar onto ``layer_id`` (confined to the layer whatever
        the tar holds) and return the sum of its entries' sizes.  A bad tar is
        ``InvalidArgument``; a crash mid-way leaves a layer start-up removes."""

    @abstractmethod
    def diff_size(self, layer_id: str, parent: str) -> int:
        """The byte size of ``changes`` (``docker ps -s``)."""


class DriverInit(Protocol):
    """What ``register`` takes: builds a driver for a Home, or raises a typed error."""

    def __call__(self, home: str, options: list[str], idmap: IDMappings) -> Driver: ...
