"""What every backend shares: its LayerStore, its reference counts, its Home."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import msgspec

from plugin.errors import InvalidArgument
from plugin.faults import fault_point
from plugin.idtools import IDMappings
from plugin.state.layers import LayerStore
from plugin.state.refcount import RefCounter

log = logging.getLogger("strata.backend")


class RefCountedStore:
    """Mixin: a Home with staged layers and persisted Get/Put counts.

    ``needs_mount`` says whether Get mounts something; if so the counts are
    checked against /proc/self/mountinfo at start-up (``mounted_ids``).
    """

    def __init__(self, home: str, idmap: IDMappings, *, needs_mount: bool) -> None:
        self.home = home
        self.idmap = idmap
        self.store = LayerStore(home)
        self.refs = RefCounter(os.path.join(home, "refs.json"))
        # layer id -> (what Get returns, whether Get/Put mount and unmount it), set
        # by a Get that succeeded, dropped by Remove: lets later Gets and Puts be
        # counted on the event loop (see ProtoDriver.get_nowait).
        self._get_answers: dict[str, tuple[str, bool]] = {}
        self.store.reconcile()
        stale = self.refs.reconcile(self.mounted_ids(), needs_mount=needs_mount,
                                    existing=self.store.ids())
        for layer_id in stale:
            self.release_stale_mount(layer_id)

    def reconcile(self) -> None:
        """Remove layers a crash left half-applied, with the backend's own Remove
        (it knows their mounts, subvolumes or datasets)."""
        for layer_id in self.store.half_applied():
            try:
                self.remove(layer_id)  # type: ignore[attr-defined]
            except Exception:
                log.exception("reconcile: cannot remove half-applied layer %s", layer_id)
            else:
                log.info("reconcile: removed half-applied layer %s", layer_id)

    def mounted_ids(self) -> list[str]:
        """Ids whose mount exists now (mounting backends override)."""
        return []

    def release_stale_mount(self, layer_id: str) -> None:
        """Unmount a layer that is mounted with no Get outstanding (mounting
        backends override; see RefCounter.reconcile)."""

    @staticmethod
    def root_of(layer_dir: str) -> str:
        return os.path.join(layer_dir, "root")

    def layer_root(self, layer_id: str, what: str = "layer") -> str:
        """The existing layer's root dir, refusing symlinks at every step under Home."""
        root = self.root_of(self.store.require(layer_id, what))
        if os.path.islink(root) or not os.path.isdir(root):
            raise InvalidArgument(f"{what} {layer_id}: {root} is not a directory (a symlink "
                                  "or damage under Home); refusing to use it")
        return root

    def exists(self, layer_id: str) -> bool:
        return self.store.exists(layer_id)

    def close(self) -> None:
        self.refs.close()

    # ---- answers from memory (on the event loop) --------------------------------
    def exists_nowait(self, layer_id: str) -> bool | None:
        return True if self.store.known(layer_id) else None

    def get_nowait(self, layer_id: str, mount_label: str) -> str | None:
        answer = self._get_answers.get(layer_id)
        if answer is None:
            return None
        path, mounts = answer
        return path if self.refs.try_get(layer_id, activates=mounts) is not None else None

    def put_nowait(self, layer_id: str) -> bool:
        answer = self._get_answers.get(layer_id)
        return answer is not None and self.refs.try_put(layer_id, deactivates=answer[1])

    def remember_get(self, layer_id: str, path: str, mounts: bool) -> str:
        """Record what Get of ``layer_id`` answers (call it once Get has succeeded)."""
        self._get_answers[layer_id] = (path, mounts)
        return path

    def forget_get(self, layer_id: str) -> None:
        self._get_answers.pop(layer_id, None)

    @contextmanager
    def applying(self, layer_id: str, *,
                 finish: Callable[[], Mapping[str, str]] | None = None) -> Iterator[None]:
        """``finish``, run once the block has succeeded, returns entries for the
        layer's ``LayerMeta.extra``: they go out in the same durable write that
        clears the mark, not in one more (two fsyncs and a rename)."""
        layer_dir = self.store.require(layer_id)
        meta = self.store.read_meta(layer_id)
        self.store.write_meta(layer_dir, msgspec.structs.replace(meta, applying=True))
        yield
        extra = meta.extra if finish is None else {**meta.extra, **finish()}
        fault_point("apply.done")
        self.store.write_meta(layer_dir, msgspec.structs.replace(meta, applying=False,
                                                                 extra=extra))
