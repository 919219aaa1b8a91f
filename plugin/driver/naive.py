"""The naive diff: Diff/Changes/ApplyDiff/DiffSize for any ProtoDriver.

It mounts the layer (and its parent) through the backend's own get/put and
walks the two trees, as moby's ``NaiveDiffDriver`` does.  Correct for every
backend; a backend with a cheaper native diff overrides it.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import BinaryIO

from plugin.archive import (
    ApplyOptions,
    Change,
    TarStream,
    apply_layer,
    changes,
    changes_size,
    export_changes,
    export_tree,
    export_tree_if_small,
)
from plugin.driver.base import (
    Capabilities,
    Counts,
    CreateOpts,
    Driver,
    MountSpec,
    ProtoDriver,
)
from plugin.idtools import IDMappings
from plugin.state.refcount import internal_references


class _ReleasingStream(TarStream):
    """Forwards a TarStream and puts the mounted layers back once it is closed."""

    def __init__(self, inner: TarStream, release: list[tuple[ProtoDriver, str]]) -> None:
        self._inner = inner
        self._release = release

    def read(self, n: int = -1) -> bytes:
        return self._inner.read(n)

    def pipe_fd(self) -> int | None:
        return self._inner.pipe_fd()

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            release, self._release = self._release, []
            with internal_references():
                _put_all(release)


def _put_all(held: list[tuple[ProtoDriver, str]]) -> None:
    for driver, layer_id in reversed(held):
        driver.put(layer_id)


class NaiveDiffDriver(Driver):
    """Wraps a ProtoDriver, delegating the proto calls and adding the diff ones."""

    def __init__(self, proto: ProtoDriver, idmap: IDMappings) -> None:
        self.proto = proto
        self.idmap = idmap
        self.name = proto.name

    # ---- the proto calls, delegated ----------------------------------------
    def create(self, layer_id: str, parent: str, opts: CreateOpts) -> None:
        self.proto.create(layer_id, parent, opts)

    def create_read_write(self, layer_id: str, parent: str, opts: CreateOpts) -> None:
        self.proto.create_read_write(layer_id, parent, opts)

    def remove(self, layer_id: str, *, durable: bool = True) -> None:
        self.proto.remove(layer_id, durable=durable)

    def get(self, layer_id: str, mount_label: str) -> str:
        return self.proto.get(layer_id, mount_label)

    def put(self, layer_id: str) -> None:
        self.proto.put(layer_id)

    def exists(self, layer_id: str) -> bool:
        return self.proto.exists(layer_id)

    def mounts(self, layer_id: str, *, read_only: bool = False) -> list[MountSpec]:
        return self.proto.mounts(layer_id, read_only=read_only)

    def usage(self, layer_id: str) -> tuple[int, int]:
        return self.proto.usage(layer_id)

    def layer_ids(self) -> list[str]:
        return self.proto.layer_ids()

    def exists_nowait(self, layer_id: str) -> bool | None:
        return self.proto.exists_nowait(layer_id)

    def get_nowait(self, layer_id: str, mount_label: str) -> str | None:
        return self.proto.get_nowait(layer_id, mount_label)

    def put_nowait(self, layer_id: str) -> bool:
        return self.proto.put_nowait(layer_id)

    def status(self) -> list[tuple[str, str]]:
        return [*self.proto.status(), ("Diff", "naive (tree walk)")]

    def metadata(self, layer_id: str) -> dict[str, str]:
        return self.proto.metadata(layer_id)

    def cleanup(self) -> None:
        self.proto.cleanup()

    def close(self) -> None:
        self.proto.close()

    def capabilities(self) -> Capabilities:
        return self.proto.capabilities()

    def counts(self) -> Counts | None:
        return self.proto.counts()

    def applying(self, layer_id: str) -> AbstractContextManager[None]:
        return self.proto.applying(layer_id)

    def read_view(self, layer_id: str) -> AbstractContextManager[str | None]:
        return self.proto.read_view(layer_id)

    def write_view(self, layer_id: str) -> AbstractContextManager[str | None]:
        return self.proto.write_view(layer_id)

    def reconcile(self) -> None:
        self.proto.reconcile()

    # ---- the diff calls ----------------------------------------------------
    # The diff calls mount layers for their own use: those references are
    # strata's, not dockerd's, and must not outlive the process (see
    # plugin.state.refcount.internal_references).

    def diff(self, layer_id: str, parent: str) -> TarStream:
        with internal_references():
            return self._diff(layer_id, parent)

    def _diff(self, layer_id: str, parent: str) -> TarStream:
        if not parent:
            # A small tree read through a view costs no Get's mount and unmount.
            with self.proto.read_view(layer_id) as view:
                small = None if view is None else export_tree_if_small(view, self.idmap)
            if small is not None:
                return small
        held: list[tuple[ProtoDriver, str]] = []
        try:
            root = self.proto.get(layer_id, "")
            held.append((self.proto, layer_id))
            if not parent:
                stream = export_tree(root, self.idmap)
            else:
                parent_root = self.proto.get(parent, "")
                held.append((self.proto, parent))
                # The tar needs every name of a linked inode (see plugin.archive.changes);
                # `docker diff`, as on overlay2, does not list them.
                found = changes(root, parent_root, link_partners=True)
                stream = export_changes(root, found, self.idmap)
        except BaseException:
            _put_all(held)
            raise
        if stream.whole() is None:
            return _ReleasingStream(stream, held)
        # Made in memory: the trees are read already, and the stream's close need not block.
        _put_all(held)
        return stream

    def changes(self, layer_id: str, parent: str) -> list[Change]:
        with internal_references():
            return self._changes(layer_id, parent)

    def _changes(self, layer_id: str, parent: str) -> list[Change]:
        root = self.proto.get(layer_id, "")
        try:
            if not parent:
                return changes(root, None)
            parent_root = self.proto.get(parent, "")
            try:
                return changes(root, parent_root)
            finally:
                self.proto.put(parent)
        finally:
            self.proto.put(layer_id)

    def apply_diff(self, layer_id: str, parent: str, stream: BinaryIO) -> int:
        with internal_references():
            return self._apply_diff(layer_id, parent, stream)

    def _apply_diff(self, layer_id: str, parent: str, stream: BinaryIO) -> int:
        with self.proto.write_view(layer_id) as view:
            if view is not None:
                with self.proto.applying(layer_id):
                    return apply_layer(view, stream, ApplyOptions(idmap=self.idmap))
        root = self.proto.get(layer_id, "")
        try:
            with self.proto.applying(layer_id):
                return apply_layer(root, stream, ApplyOptions(idmap=self.idmap))
        finally:
            self.proto.put(layer_id)

    def diff_size(self, layer_id: str, parent: str) -> int:
        with internal_references():
            return self._diff_size(layer_id, parent)

    def _diff_size(self, layer_id: str, parent: str) -> int:
        found = self._changes(layer_id, parent)
        root = self.proto.get(layer_id, "")
        try:
            return changes_size(root, found)
        finally:
            self.proto.put(layer_id)
