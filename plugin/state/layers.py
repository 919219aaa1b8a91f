"""Where layers live under Home, and how they appear and disappear atomically.

Layout (Home is what GraphDriver.Init passed, ``<data-root>/<driver name>``)::

    Home/layers/<id>/          a complete layer: the backend's files + meta.json
    Home/staging/<id>.<rand>/  a layer being built; renamed into layers/ when done
    Home/trash/<id>.<rand>/    a layer being deleted; renamed out of layers/ first

Who may pass through: Home, ``layers/`` and each ``layers/<id>/`` are ``0710``,
owner root, group ``group`` (Init's remapped root gid under ``dockerd
--userns-remap``, else 0): a container's root, an unprivileged host uid there,
must reach its root filesystem below them (runc mounts it from inside the user
namespace), and nobody else may.  moby's overlay2 and vfs give their dirs the same
owner and mode.  A staged layer gets them in ``staging/`` (the rename keeps them);
``staging/`` and ``trash/`` stay root's alone: nothing but the plugin looks in them.

A crash at any point leaves each id either absent or complete; ``reconcile``
at start-up deletes whatever is left in staging/ and trash/.  Model:
containerd overlay ``createSnapshot`` (a ``new-*`` temp dir renamed in place).
A front-end whose own records can outlive a layer's rename (the containerd
snapshotter: see ``promote_staged``) first takes back what it recorded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import stat
import threading
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import msgspec

from plugin.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from plugin.faults import fault_point
from plugin.state.files import fsync_dir, fsync_staged, write_atomic, write_staged

log = logging.getLogger("strata.state")

# Docker's ids are 64 hex (+ "-init"), BuildKit's 25 [a-z0-9]; graphtest uses
# names like "Base".  Anything that could form a path component other than a
# plain name is refused before it touches the filesystem.
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
MAX_ID_LEN = 128
#: Home, layers/ and each layer's dir: the owner (root) may do anything, the group
#: (the remapped root's) may only pass through, others nothing (see the module doc).
LAYER_DIR_MODE = 0o710
#: The three directories of a Home (see the module doc).
LAYERS, STAGING, TRASH = "layers", "staging", "trash"


def validate_id(layer_id: str, what: str = "ID") -> str:
    if not isinstance(layer_id, str) or not layer_id:
        raise InvalidArgument(f"{what} is empty")
    if len(layer_id) > MAX_ID_LEN:
        raise InvalidArgument(f"{what} {layer_id[:40]!r}… is longer than {MAX_ID_LEN} characters")
    if not _ID_RE.fullmatch(layer_id) or ".." in layer_id:
        raise InvalidArgument(f"{what} {layer_id!r} is not a valid layer id "
                              "(letters, digits, '_', '.', '-' only; no '/', '..' or NUL)")
    return layer_id


class LayerMeta(msgspec.Struct):
    parent: str = ""
    #: Set while ApplyDiff writes into the layer: a crash leaves it behind and
    #: start-up removes the layer (dockerd never registered it).
    applying: bool = False
    extra: dict[str, str] = msgspec.field(default_factory=dict)


_DEFAULT_META = LayerMeta()


class LayerStore:
    """The layers of one Home: paths, metadata, staged create, staged remove."""

    def __init__(self, home: str, group: int = 0) -> None:
        self.home = home
        self.group = group
        self.layers_dir = os.path.join(home, LAYERS)
        self.staging_dir = os.path.join(home, STAGING)
        self.trash_dir = os.path.join(home, TRASH)
        for d, gid in ((home, group), (self.layers_dir, group),
                       (self.staging_dir, 0), (self.trash_dir, 0)):
            os.makedirs(d, mode=LAYER_DIR_MODE, exist_ok=True)
            own_dir(d, gid)
        # The ids in layers/, kept in step at the two renames that change it: lets
        # Exists be answered from memory.  A layer deleted by hand behind the
        # plugin's back stays "known" until the next start.
        self._known: set[str] = set(os.listdir(self.layers_dir))
        # A Home made before layer dirs got the remapped root's group (or under other
        # maps): one lstat per layer, and a chown of the dir itself, never its contents.
        fixed = sum(own_dir(self.layer_dir(i), group) for i in self._known if self._plain(i))
        if fixed:
            log.info("gave %d layer dir(s) under %s group %d, mode %o", fixed, self.layers_dir,
                     group, LAYER_DIR_MODE)
        # parent id -> ids of the layers made on it, complete or being staged:
        # Remove of a parent refuses while any is there, and a Create on a
        # parent being removed fails (both under ``_tree_lock``), so no layer
        # is ever left on a deleted parent.
        self._tree_lock = threading.Lock()
        self._children: defaultdict[str, set[str]] = defaultdict(set)
        self._removing: set[str] = set()
        # layer id -> its parent ("" for none), for the layers in ``_known`` whose
        # meta.json reads: a layer's parent never changes, overlay's Diff and Changes
        # ask it on every call, and Remove needs it for the tree.
        self._parents: dict[str, str] = {}
        for layer_id in self._known:
            try:
                parent = self._parents[layer_id] = self.read_meta(layer_id).parent
            except (OSError, msgspec.DecodeError, NotFound, InvalidArgument):
                continue  # damage under Home: fsck reports it; no known parent
            if parent:
                self._children[parent].add(layer_id)

    def _plain(self, name: str) -> bool:
        """A layer's real directory (not a symlink or junk planted in layers/)."""
        try:
            return _is_real_dir(self.layer_dir(name))
        except InvalidArgument:
            return False

    # ---- paths ---------------------------------------------------------------
    def layer_dir(self, layer_id: str) -> str:
        return os.path.join(self.layers_dir, validate_id(layer_id))

    def exists(self, layer_id: str) -> bool:
        return _is_real_dir(self.layer_dir(layer_id))

    def known(self, layer_id: str) -> bool:
        """In layers/ as far as this store has seen (no filesystem access)."""
        return layer_id in self._known

    def require(self, layer_id: str, what: str = "layer") -> str:
        """The layer's directory; never a symlink (one planted under Home could
        otherwise lead Get, ApplyDiff or Remove out of Home)."""
        path = self.layer_dir(layer_id)
        if not _is_real_dir(path):
            if os.path.islink(path):
                raise InvalidArgument(
                    f"{what} {layer_id}: {path} is a symlink, refusing to follow it")
            raise NotFound(f"{what} {layer_id} does not exist")
        return path

    def ids(self) -> list[str]:
        return sorted(os.listdir(self.layers_dir))

    # ---- metadata ------------------------------------------------------------
    def read_meta(self, layer_id: str) -> LayerMeta:
        path = os.path.join(self.require(layer_id), "meta.json")
        try:
            with open(path, "rb") as f:
                return msgspec.json.decode(f.read(), type=LayerMeta)
        except FileNotFoundError:
            return LayerMeta()

    def write_meta(self, layer_dir: str, meta: LayerMeta, *, durable: bool = True) -> None:
        write_atomic(os.path.join(layer_dir, "meta.json"), msgspec.json.encode(meta),
                     durable=durable)

    def parent_of(self, layer_id: str) -> str:
        """The layer's parent id ("" for none): from memory for a layer this store
        opened or made, from its meta.json otherwise (which may raise)."""
        parent = self._parents.get(layer_id)
        return self.read_meta(layer_id).parent if parent is None else parent

    # ---- the parent/child tree ----------------------------------------------
    def children(self, layer_id: str) -> list[str]:
        """Layers made on ``layer_id`` (complete, or being created now)."""
        with self._tree_lock:
            return sorted(self._children.get(layer_id, ()))

    def _adopt(self, layer_id: str, parent: str) -> None:
        with self._tree_lock:
            if parent in self._removing or parent not in self._known:
                raise NotFound(f"parent layer {parent} does not exist (or is being removed)")
            self._children[parent].add(layer_id)

    def _disown(self, layer_id: str, parent: str) -> None:
        with self._tree_lock:
            siblings = self._children.get(parent)
            if siblings is not None:
                siblings.discard(layer_id)
                if not siblings:
                    del self._children[parent]

    @contextmanager
    def removal(self, layer_id: str) -> Iterator[None]:
        """Hold ``layer_id`` for removal: refuse (``FailedPrecondition``) while it
        has children, and make a Create on it fail until the block ends."""
        with self._tree_lock:
            children = sorted(self._children.get(layer_id, ()))
            if children:
                shown = ", ".join(children[:3]) + (", …" if len(children) > 3 else "")
                raise FailedPrecondition(
                    f"layer {layer_id} has {len(children)} child layer(s) ({shown}): "
                    "remove them first")
            self._removing.add(layer_id)
        try:
            yield
        finally:
            with self._tree_lock:
                self._removing.discard(layer_id)

    # ---- staged create / remove ---------------------------------------------
    @contextmanager
    def staging(self, layer_id: str, meta: LayerMeta) -> Iterator[str]:
        """Yield a fresh staging dir; on success it becomes ``layers/<id>``.

        The backend writes its files in with ``write_staged`` (no temp name);
        every file directly in the dir, then the dir, is fsynced before the
        rename (``fsync_staged``), so whatever the rename makes visible is
        complete on disk.  Two fsyncs are left out on purpose:

        * ``meta.json`` is not written when ``meta`` is the default (a layer with no
          parent): ``read_meta`` reads a missing file as the default.
        * The rename itself is not fsynced.  A machine crash before the filesystem
          commits it leaves the complete layer in staging/, which ``reconcile``
          deletes: the layer is then absent, never half (dockerd's in-tree drivers make
          no Create durable at all).  The next fsync in this Home (ApplyDiff's
          ``applying`` mark is one) commits the journal that holds it."""
        final = self.layer_dir(layer_id)
        if os.path.lexists(final):
            raise AlreadyExists(f"layer {layer_id} already exists")
        if meta.parent:
            self._adopt(layer_id, meta.parent)
        stage = os.path.join(self.staging_dir, f"{layer_id}.{uuid.uuid4().hex[:12]}")
        try:
            os.mkdir(stage, LAYER_DIR_MODE)
            own_dir(stage, self.group)
            if meta != _DEFAULT_META:
                write_staged(os.path.join(stage, "meta.json"), msgspec.json.encode(meta))
            yield stage
            fsync_staged(stage)
            fault_point("create.staged")
            try:
                os.rename(stage, final)
            except OSError as e:
                if os.path.lexists(final):
                    raise AlreadyExists(f"layer {layer_id} already exists") from e
                raise
            self._parents[layer_id] = meta.parent
            self._known.add(layer_id)
            fault_point("create.renamed")
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            if meta.parent and not self.known(layer_id):
                self._disown(layer_id, meta.parent)
            raise

    def remove(self, layer_id: str,
               before_delete: Callable[[str], None] | None = None, *,
               durable: bool = True) -> bool:
        """Rename the layer out of sight, then delete it. False if it was not there.

        ``before_delete(doomed_dir)`` lets a backend release what a plain
        delete cannot (a btrfs subvolume, a zfs dataset) once the layer is out
        of sight.

        The rename is fsynced (``layers/``) before the delete starts, so a
        Remove that returned stays done after a power loss.  ``durable=False``
        leaves that fsync out, for a caller whose own record of the removal is
        already on disk and whose start-up deletes every layer no record claims
        (the snapshotter: its row goes first, in an fsynced sqlite commit).  A
        power loss may then bring the layer back into ``layers/`` (or leave it
        in ``trash/``, which ``reconcile`` empties), where that start-up deletes
        it: garbage, never a visible half layer.  Against a crash of the
        process alone the rename needs no fsync (the page cache survives)."""
        final = self.layer_dir(layer_id)
        doomed = os.path.join(self.trash_dir, f"{layer_id}.{uuid.uuid4().hex[:12]}")
        parent = self._parents.get(layer_id, "")
        try:
            os.rename(final, doomed)
        except FileNotFoundError:
            self._known.discard(layer_id)
            self._parents.pop(layer_id, None)
            return False
        self._known.discard(layer_id)
        self._parents.pop(layer_id, None)
        if parent:
            self._disown(layer_id, parent)
        if durable:
            fsync_dir(self.layers_dir)
        fault_point("remove.renamed")
        if before_delete is not None:
            before_delete(doomed)
        remove_tree(doomed)
        return True

    def reconcile(self) -> list[str]:
        """Delete staging and trash leftovers; return what went.

        Never raises: start-up must not fail over debris (what cannot be
        deleted is logged, and ``strata fsck`` lists it)."""
        removed = []
        for parent in (self.staging_dir, self.trash_dir):
            for name in os.listdir(parent):
                path = os.path.join(parent, name)
                try:
                    remove_tree(path)
                except OSError as e:
                    log.error("reconcile: cannot remove leftover %s: %s", path, e)
                    continue
                log.info("reconcile: removed leftover %s", path)
                removed.append(path)
        return removed

    def half_applied(self) -> list[str]:
        """Layers whose ApplyDiff never finished (a crash): the backend removes them."""
        return [i for i in self.ids() if self.read_meta(i).applying]


@dataclass(frozen=True)
class Promotion:
    """What ``promote_staged`` did."""

    #: Ids renamed from staging/ into layers/.
    promoted: list[str] = field(default_factory=list)
    #: Id -> its ``layers/<id>`` path, for each id asked for that is absent and
    #: has no staged copy that can take its place.
    missing: dict[str, str] = field(default_factory=dict)
    #: The largest decimal id a staged copy is named by (0 if none).
    highest_staged: int = 0


def promote_staged(home: str, wanted: Mapping[str, str]) -> Promotion:
    """Put back into layers/ the staged layers whose rename a power cut lost,
    before ``LayerStore`` opens Home (its ``reconcile`` deletes staging/).

    ``wanted`` maps each layer id a caller's durable records claim to its
    parent's id ("" for none).  ``staging`` fsyncs a layer's files and its
    dir before renaming it but leaves the rename to the next journal commit,
    so a record committed after Create returned (the snapshotter's sqlite row,
    whose commit forces no journal commit of this filesystem) can reach the
    disk while its layer is still in staging/, complete.  Such a copy is
    renamed into place and the rename fsynced, if it is the id's only staged
    copy (ids are never reused while a staged copy names them: the caller
    skips past ``highest_staged``), a real directory, and its ``meta.json``
    names the recorded parent and no unfinished ApplyDiff; anything else is
    left for ``reconcile`` and the id reported ``missing``.  Never raises on
    what it finds (a failed rename is logged and the id reported missing)."""
    layers_dir, staging_dir = os.path.join(home, LAYERS), os.path.join(home, STAGING)
    present = set(_listdir(layers_dir))
    copies: defaultdict[str, list[str]] = defaultdict(list)
    highest = 0
    for name in _listdir(staging_dir):
        layer_id = name.rpartition(".")[0]
        copies[layer_id].append(name)
        if layer_id.isdigit():
            highest = max(highest, int(layer_id))
    done = Promotion(highest_staged=highest)
    for layer_id, parent in sorted(wanted.items()):
        if layer_id in present:
            continue
        final = os.path.join(layers_dir, validate_id(layer_id))
        stage = _promotable(staging_dir, layer_id, parent, copies.get(layer_id, []))
        if stage is None:
            done.missing[layer_id] = final
            continue
        try:
            os.rename(stage, final)
        except OSError as e:
            log.error("cannot promote staged layer %s to %s: %s", stage, final, e)
            done.missing[layer_id] = final
            continue
        log.warning("layer %s: its rename was lost (a power cut?): promoted %s to %s",
                    layer_id, stage, final)
        done.promoted.append(layer_id)
    if done.promoted:
        fsync_dir(layers_dir)
        fsync_dir(staging_dir)
    return done


def _promotable(staging_dir: str, layer_id: str, parent: str, names: list[str]) -> str | None:
    """The one staged copy of ``layer_id`` that may become it (see ``promote_staged``)."""
    if not names:
        return None
    if len(names) > 1:
        log.warning("layer %s: %d staged copies (%s); promoting none", layer_id, len(names),
                    ", ".join(sorted(names)))
        return None
    stage = os.path.join(staging_dir, names[0])
    try:
        if not _is_real_dir(stage):
            raise InvalidArgument("not a directory")
        with open(os.path.join(stage, "meta.json"), "rb") as f:
            meta = msgspec.json.decode(f.read(), type=LayerMeta)
    except FileNotFoundError:
        meta = _DEFAULT_META
    except (OSError, msgspec.DecodeError, InvalidArgument) as e:
        log.warning("layer %s: staged copy %s is damaged (%s); not promoting it",
                    layer_id, stage, e)
        return None
    if meta.parent != parent or meta.applying:
        log.warning("layer %s: staged copy %s is not the recorded layer (parent %r, "
                    "recorded %r, applying %s); not promoting it",
                    layer_id, stage, meta.parent, parent, meta.applying)
        return None
    return stage


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def own_dir(path: str, group: int, mode: int = LAYER_DIR_MODE) -> bool:
    """Make ``path`` (a directory, not followed if a symlink) owned by root:``group``
    with ``mode``; True if that changed anything."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise InvalidArgument(f"{path} is not a directory (damage under Home?)")
    if (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, group, mode):
        return False
    os.chown(path, 0, group, follow_symlinks=False)
    os.chmod(path, mode)  # after chown, which clears set-id bits; and whatever the umask
    return True


def _is_real_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def remove_tree(path: str) -> None:
    # Root deletes through any mode bits; a vanished entry is not an error
    # (a concurrent reconcile may have taken it).  A symlink is unlinked, never
    # followed.
    if not _is_real_dir(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    shutil.rmtree(path, onerror=_ignore_vanished)


def _ignore_vanished(func: object, target: str, exc_info: object) -> None:
    if os.path.lexists(target):
        raise
