"""What every backend shares: its LayerStore, its reference counts, its Home,
and the one Get/Put/Remove sequence.

:class:`RefCountedStore` is the template: ``get``, ``put`` and ``remove`` are
written once here, and a backend fills in hooks:

* ``layer_path(layer_id, layer_dir)``: what Get returns, and whether the
  first Get must activate it (mount);
* ``activate`` / ``deactivate``: mount on the first Get, unmount on the last
  Put and before Remove (run under the layer's lock, with the count);
* ``delete_layer(layer_id, doomed_dir)``: release what a plain delete cannot
  (a subvolume, a dataset, a short link) once the layer is renamed out of sight.

The sequence: Get takes the layer's lock, counts, activates on the first
reference, and remembers its answer so later Gets and Puts can be counted on
the event loop; Put counts down and deactivates at zero; Remove takes the lock,
refuses while children exist (``LayerStore.removal``), deactivates whatever
the count, renames the layer into the trash, runs ``delete_layer``, deletes
the rest, and drops the count.

User namespaces (``dockerd --userns-remap``): Init's ID maps say which host
uid/gid a container's root is.  Layer files are stored with host IDs (the
archive maps them in and out), each layer's root directory is owned by the
remapped root, and the directories above it by root with the remapped root's
group (``LayerStore``), so runc, inside the user namespace, can reach what Get
returned and no other unprivileged user can.  Init refuses a Home whose
ancestors that root cannot pass through, as dockerd refuses such a data root.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import msgspec

from plugin.driver.base import Counts, MountSpec
from plugin.driver.probes import blocked_ancestor
from plugin.errors import InvalidArgument, NotFound, Prerequisites
from plugin.faults import fault_point
from plugin.idtools import IDMappings
from plugin.state.layers import LayerStore
from plugin.state.refcount import RefCounter

log = logging.getLogger("strata.backend")


def disk_usage(root: str) -> tuple[int, int]:
    """containerd's ``fs.DiskUsage`` of one tree: (allocated bytes, inodes), every
    entry from ``root`` down counted once per (device, inode), symlinks not
    followed; allocated bytes are ``st_blocks`` x 512, so sparse files count
    what they hold on disk.  A missing ``root`` is ``NotFound``."""
    try:
        first = os.lstat(root)
    except FileNotFoundError as e:
        raise NotFound(f"{root} does not exist") from e
    seen = {(first.st_dev, first.st_ino)}
    size = first.st_blocks * 512
    stack = [root] if stat.S_ISDIR(first.st_mode) else []
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    size += st.st_blocks * 512
    return size, len(seen)


class RefCountedStore:
    """Mixin: a Home with staged layers and persisted Get/Put counts.

    ``needs_mount`` says whether Get mounts something; if so the counts are
    checked against /proc/self/mountinfo at start-up (``mounted_ids``).
    """

    def __init__(self, home: str, idmap: IDMappings, *, needs_mount: bool) -> None:
        self.home = home
        self.idmap = idmap
        root_uid, root_gid = idmap.root_pair()
        if not idmap.empty:
            blocked = blocked_ancestor(home, root_uid, root_gid)
            if blocked:
                raise Prerequisites(
                    f"{blocked} (above Home {home}) does not let the remapped root "
                    f"{root_uid}:{root_gid} pass: containers could not reach their root "
                    "filesystem; allow o+x (chmod o+x) on it")
        self.store = LayerStore(home, group=root_gid)
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
                self.remove(layer_id)
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

    # ---- the hooks -------------------------------------------------------------
    def layer_path(self, layer_id: str, layer_dir: str) -> tuple[str, bool]:
        """What Get returns for the layer, and whether its first Get activates it."""
        return self.layer_root(layer_id), False

    def activate(self, layer_id: str, layer_dir: str) -> None:
        """Mount the layer (first Get); backends that mount override."""

    def deactivate(self, layer_id: str, layer_dir: str) -> None:
        """Unmount the layer (last Put, Remove); backends that mount override."""

    def delete_layer(self, layer_id: str, doomed_dir: str) -> None:
        """Release what deleting ``doomed_dir`` file by file cannot."""

    def mounts(self, layer_id: str, *, read_only: bool = False) -> list[MountSpec]:
        """A bind of the layer's root directory (backends whose layers are
        plain directories: vfs, btrfs subvolumes)."""
        return [MountSpec("bind", self.layer_root(layer_id),
                          ("ro" if read_only else "rw", "rbind"))]

    def content_dir(self, layer_id: str) -> str:
        """The directory holding the layer's own content, for ``usage``: the
        layer root (a whole tree per layer); overlay overrides with its diff dir."""
        return self.layer_root(layer_id)

    def usage(self, layer_id: str) -> tuple[int, int]:
        return disk_usage(self.content_dir(layer_id))

    def layer_ids(self) -> list[str]:
        return self.store.ids()

    # ---- the sequence ----------------------------------------------------------
    def get(self, layer_id: str, mount_label: str) -> str:
        # mount_label is an SELinux context; this host's kernel has no SELinux,
        # and moby only adds context= when SELinux is enabled.
        layer_dir = self.store.require(layer_id)
        path, mounts = self.layer_path(layer_id, layer_dir)
        self.refs.get(layer_id, lambda: self.activate(layer_id, layer_dir) if mounts else None)
        return self.remember_get(layer_id, path, mounts)

    def put(self, layer_id: str) -> None:
        layer_dir = self.store.layer_dir(layer_id)
        self.refs.put(layer_id, lambda: self._deactivate_if_present(layer_id, layer_dir))

    def _deactivate_if_present(self, layer_id: str, layer_dir: str) -> None:
        if os.path.isdir(layer_dir):
            self.deactivate(layer_id, layer_dir)

    def remove(self, layer_id: str, *, durable: bool = True) -> None:
        with self.refs.lock(layer_id):
            self.forget_get(layer_id)
            layer_dir = self.store.layer_dir(layer_id)
            if not os.path.isdir(layer_dir):
                return
            with self.store.removal(layer_id):
                # Whatever the count: a container process may still hold files,
                # and a busy mount must never make Remove fail (detached lazily).
                self.deactivate(layer_id, layer_dir)
                self.store.remove(layer_id,
                                  before_delete=lambda doomed: self.delete_layer(layer_id, doomed),
                                  durable=durable)
        self.refs.forget(layer_id)

    def close(self) -> None:
        self.refs.close()

    def counts(self) -> Counts:
        return Counts(layers=len(self.store.ids()), mounts=len(self.mounted_ids()),
                     references=sum(self.refs.active().values()))

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
        layer's ``LayerMeta.extra``: they go out in the same write that clears
        the mark, not in one more.

        The mark is set durably (fsynced before the first byte is applied: a
        machine crash mid-apply leaves a layer start-up removes) and cleared by an
        atomic rename that is not fsynced.  A killed process loses nothing (the
        page cache survives it); a machine crash may undo the clear, and then
        start-up removes a layer whose files were never fsynced either (no driver
        of dockerd's fsyncs an applied layer).  dockerd records the layer only
        after ApplyDiff returns, and on the same filesystem the journal commits
        that record after the clear, so a clear undone is a layer dockerd never
        recorded.  Two fsyncs fewer per ApplyDiff."""
        layer_dir = self.store.require(layer_id)
        meta = self.store.read_meta(layer_id)
        self.store.write_meta(layer_dir, msgspec.structs.replace(meta, applying=True))
        yield
        extra = meta.extra if finish is None else {**meta.extra, **finish()}
        fault_point("apply.done")
        self.store.write_meta(layer_dir, msgspec.structs.replace(meta, applying=False,
                                                                 extra=extra), durable=False)
