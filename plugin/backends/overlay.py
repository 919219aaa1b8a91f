"""overlay: overlayfs layers laid out like Docker's overlay2, up to 500 deep.

Layout (``Home/layers/<id>/`` is the LayerStore's staged, atomically renamed dir)::

    Home/l/<LINK>  -> ../layers/<id>/diff     short name of a layer's diff dir
    Home/layers/<id>/diff/     the layer's own files: the overlay upper dir
    Home/layers/<id>/link      LINK: 26 random base32 characters
    Home/layers/<id>/lower     "l/<parent LINK>:l/<grandparent LINK>:…" (top first)
    Home/layers/<id>/work/     overlay workdir          (only with a parent)
    Home/layers/<id>/merged/   where Get mounts it      (only with a parent)

Owners and modes are overlay2's: ``diff/`` 0755, ``work/`` and ``merged/`` 0700,
all the remapped root's under ``dockerd --userns-remap`` (root's otherwise); the
layer dir 0710 root:<remapped root's group> (the LayerStore's); ``l/`` 0700
root's: lowers are resolved by the mounter (the plugin), never by a container.

Why short links: mount(2) copies one page of option data (4096 bytes).  An
absolute lower path here is ~100 bytes (``/var/lib/docker/strata/layers/<64
hex>/diff``), so ``lowerdir=`` holds ~37 of them.  Relative to Home after a
chdir, ``l/<26 chars>:`` is 29 bytes; the rest of the string is at most
``lowerdir=`` (9) + ``,upperdir=layers/<id>/diff`` (150) + ``,workdir=layers/<id>/work``
(149) + ``,index=off,userxattr`` (20) = 328 bytes for the longest (128-char) id, so
(4095 - 328) // 29 = 129 lowers always fit (Docker stops at 128).  The new
mount API passes each lower in its own ``fsconfig("lowerdir+")`` call, so no
page limit applies and the kernel's own limit (OVL_MAX_STACK = 500) is the
depth: that is what this backend uses where the kernel has it (Linux >= 6.8).

A layer with no parent has nothing to merge: Get returns its ``diff/`` itself
(as overlay2 does), the same path every time; it is never mounted.

Mounts use ``index=off``: with the inode index on, a lower shared by two
mounts makes the second mount fail with EBUSY (moby#37904), and nothing here
needs NFS export or hardlink copy-up consistency across layers.

The upper dir *is* the layer's diff, so Diff, ApplyDiff, Changes and DiffSize
work on ``diff/`` directly, converting whiteouts between the kernel's form
(char 0:0, ``trusted.overlay.opaque=y``) and the tar form (``.wh.``).  When the
asked parent is not the layer's own, or the kernel writes redirects/metacopy
(an upper dir is then not a full diff), the naive tree walk over two mounts is
used instead; Status says which.  Model: moby ``overlay2/overlay.go``.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import secrets
import stat
from collections.abc import Iterator
from typing import BinaryIO

import msgspec

from plugin.archive import ApplyOptions, Change, TarStream, apply_layer, export_tree
from plugin.backends.common import RefCountedStore
from plugin.backends.overlay_changes import overlay_changes
from plugin.driver import mountapi
from plugin.driver.base import CreateOpts, Driver, MountSpec
from plugin.driver.naive import NaiveDiffDriver
from plugin.driver.probes import (
    OverlaySupport,
    filesystems,
    mounts_under,
    overlay_backing_problem,
    probe_overlay,
    size_limit_refusal,
)
from plugin.driver.registry import register, split_options
from plugin.errors import IncompatibleFS, InvalidArgument, NotSupported, Prerequisites
from plugin.idtools import IDMappings
from plugin.state.files import write_staged
from plugin.state.layers import MAX_ID_LEN, LayerMeta

#: What the kernel (and strata's archive) mark an opaque upper dir with.
OPAQUE_XATTR = "trusted.overlay.opaque"

log = logging.getLogger("strata.backend.overlay")

LINK_DIR = "l"
LINK_LEN = 26  # moby's idLength: 26 base32 chars = 130 random bits
#: The kernel's OVL_MAX_STACK: lowers one overlay mount may stack.
KERNEL_MAX_LOWERS = 500
# See the module doc: the fixed part of a mount(2) option string, and one lower.
_FIXED_OPTION_BYTES = len("lowerdir=") + 2 * len(",upperdir=layers/" + "x" * MAX_ID_LEN + "/diff") \
    + len(",index=off,userxattr")
_BYTES_PER_LOWER = len(f"{LINK_DIR}/") + LINK_LEN + len(":")
LEGACY_MAX_LOWERS = (mountapi.MOUNT_DATA_MAX - _FIXED_OPTION_BYTES) // _BYTES_PER_LOWER
DIFF_SIZE_KEY = "diff_size"


def read_small_file(path: str) -> str:
    """A layer's ``link`` or ``lower`` file, stripped; "" when it is missing."""
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except FileNotFoundError:
        return ""


def new_link_id() -> str:
    # One getrandom(2) for the 130 bits, not one per character (26 per Create).
    return base64.b32encode(secrets.token_bytes(17)).decode("ascii")[:LINK_LEN]


def directory_size(root: str) -> int:
    """moby ``directory.Size``: bytes of every non-directory, each inode once."""
    total, seen = 0, set()
    stack = [root]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
                elif st.st_size and st.st_ino not in seen:
                    seen.add(st.st_ino)
                    total += st.st_size
    return total


class OverlayDriver(RefCountedStore, Driver):
    name = "overlay"

    def __init__(self, home: str, idmap: IDMappings, support: OverlaySupport,
                 *, native_diff: bool = True) -> None:
        self.support = support
        self.native_reason = support.naive_reason or ("" if native_diff else
                                                      "disabled by overlay.native_diff=false")
        self.max_lowers = KERNEL_MAX_LOWERS if support.new_mount_api else LEGACY_MAX_LOWERS
        self.link_dir = os.path.join(home, LINK_DIR)
        os.makedirs(self.link_dir, mode=0o700, exist_ok=True)
        super().__init__(home, idmap, needs_mount=True)
        self.naive = NaiveDiffDriver(self, idmap)
        self._repair_links()

    # ---- paths ----------------------------------------------------------------
    @staticmethod
    def diff_dir(layer_dir: str) -> str:
        return os.path.join(layer_dir, "diff")

    @staticmethod
    def merged_dir(layer_dir: str) -> str:
        return os.path.join(layer_dir, "merged")

    _read = staticmethod(read_small_file)

    def lower_links(self, layer_dir: str) -> list[str]:
        """The ``l/<LINK>`` names of the lower chain, top first; [] for a base layer."""
        lower = self._read(os.path.join(layer_dir, "lower"))
        return lower.split(":") if lower else []

    def lower_dirs(self, layer_dir: str) -> list[str]:
        """Absolute diff dirs of the lower chain, top first (symlinks resolved)."""
        return [os.path.realpath(os.path.join(self.home, link))
                for link in self.lower_links(layer_dir)]

    def _native(self, layer_id: str, parent: str) -> str | None:
        """The layer dir if ``parent`` is the layer's own and native diff is on, else None."""
        layer_dir = self.store.require(layer_id)
        if self.native_reason or self.store.parent_of(layer_id) != parent:
            return None
        return layer_dir

    # ---- create / delete -----------------------------------------------------
    def create(self, layer_id: str, parent: str, opts: CreateOpts) -> None:
        _check_storage_opts(self.name, self.home, layer_id, opts)
        lower = ""
        if parent:
            parent_dir = self.store.require(parent, "parent layer")
            parent_links = self.lower_links(parent_dir)
            if len(parent_links) + 1 > self.max_lowers:
                raise NotSupported(
                    f"layer {layer_id}: parent {parent} already stacks {len(parent_links) + 1} "
                    f"layers; overlay mounts at most {self.max_lowers} lowers here "
                    f"({self._mount_api_label()})")
            lower = ":".join([f"{LINK_DIR}/{self._read(os.path.join(parent_dir, 'link'))}",
                              *parent_links])
        root_uid, root_gid = self.idmap.root_pair()
        with self.store.staging(layer_id, LayerMeta(parent=parent)) as stage:
            diff = self.diff_dir(stage)
            os.mkdir(diff, 0o755)
            os.chown(diff, root_uid, root_gid)
            os.chmod(diff, 0o755)  # whatever the umask
            link = new_link_id()
            # Points at the final path; it dangles until the rename below, and
            # start-up removes it if the rename never happens.
            os.symlink(os.path.join("..", "layers", layer_id, "diff"),
                       os.path.join(self.link_dir, link))
            write_staged(os.path.join(stage, "link"), link.encode(), 0o644)
            if parent:
                for sub in ("work", "merged"):
                    os.mkdir(os.path.join(stage, sub), 0o700)
                    os.chown(os.path.join(stage, sub), root_uid, root_gid)
                write_staged(os.path.join(stage, "lower"), lower.encode(), 0o644)
        log.debug("created %s (parent %s, depth %d)", layer_id, parent or "-",
                  lower.count(":") + 1 if lower else 0)

    def delete_layer(self, layer_id: str, doomed_dir: str) -> None:
        link = self._read(os.path.join(doomed_dir, "link"))
        if link:
            _unlink_quietly(os.path.join(self.link_dir, link))

    # ---- get / put / mounts ----------------------------------------------------
    def layer_path(self, layer_id: str, layer_dir: str) -> tuple[str, bool]:
        # A base layer has nothing to merge: its diff/ itself, never mounted.
        if not self.lower_links(layer_dir):
            return self.diff_dir(layer_dir), False
        return self.merged_dir(layer_dir), True

    def get(self, layer_id: str, mount_label: str) -> str:
        self._forget_cached_size(layer_id, self.store.require(layer_id))
        return super().get(layer_id, mount_label)

    def activate(self, layer_id: str, layer_dir: str) -> None:
        merged = self.merged_dir(layer_dir)
        if os.path.ismount(merged):
            return  # mounted before a plugin restart lost the count
        self._clear_volatile(layer_dir)  # a write view's, if a crash ended it
        self._mount(self._spec(layer_dir, read_only=False), merged)
        self._own_workdir(layer_dir)

    @contextlib.contextmanager
    def write_view(self, layer_id: str) -> Iterator[str | None]:
        """A layer with lowers as a read-write overlay attached nowhere, mounted
        ``volatile``: its unmount does not sync the whole upper filesystem (what a
        read-write overlay's unmount does otherwise, and most of what a small
        naive ApplyDiff costs).  The layer's lock is held until the block ends,
        so no Get mounts it meanwhile.  A ``volatile`` mount leaves
        ``work/work/incompat/volatile/dirty`` behind, which makes any later mount
        of the layer fail: it is removed when the view ends, and before every
        mount (a crash may leave it).  Skipping the sync loses no promise: no path
        of strata fsyncs applied files (the native ApplyDiff writes into the upper
        dir with no mount at all); the unmount's sync was overlayfs's side effect.
        None while the layer is mounted, for a base layer (Get mounts nothing)
        and on hosts without the new mount API."""
        layer_dir = self.store.require(layer_id)
        if not self.lower_links(layer_dir) or not self._detached_views():
            yield None
            return
        lock = self.refs.lock(layer_id)
        lock.acquire()
        held = True
        try:
            if self.refs.count(layer_id) > 0:
                lock.release()
                held = False
                yield None
                return
            self._clear_volatile(layer_dir)
            spec = self._spec(layer_dir, read_only=False)
            fd = mountapi.fs_mount_detached(
                spec.type, spec.source, [*mountapi.overlay_fsconfig(spec.options),
                                         ("volatile", None)],
                what=f"a write view of {layer_id}")
            try:
                self._own_workdir(layer_dir)
                # The path the archive worker (another process) opens it by.
                yield f"/proc/{os.getpid()}/fd/{fd}"
            finally:
                os.close(fd)
                self._clear_volatile(layer_dir)
        finally:
            if held:
                lock.release()

    def _detached_views(self) -> bool:
        return self.spec_type == "overlay" and self.support.new_mount_api

    @staticmethod
    def _clear_volatile(layer_dir: str) -> None:
        incompat = os.path.join(layer_dir, "work", "work", "incompat")
        volatile = os.path.join(incompat, "volatile")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(volatile, "dirty"))
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(volatile)
            os.rmdir(incompat)

    def _own_workdir(self, layer_dir: str) -> None:
        """Give ``work/work``, which the mount made root's, to the remapped root: an
        overlay mounted inside the container's user namespace (docker in docker) must
        move dirs through it.  moby's overlay2 does the same after each mount."""
        if self.idmap.empty:
            return
        workwork = os.path.join(layer_dir, "work", "work")
        if os.path.isdir(workwork) and not os.path.islink(workwork):
            os.chown(workwork, *self.idmap.root_pair(), follow_symlinks=False)

    def _mount(self, spec: MountSpec, target: str) -> None:
        mountapi.mount_spec(spec, target, new_api=self.support.new_mount_api)

    def deactivate(self, layer_id: str, layer_dir: str) -> None:
        self._unmount(layer_dir)

    @contextlib.contextmanager
    def read_view(self, layer_id: str) -> Iterator[str | None]:
        """A base layer's diff dir; a layer with lowers as a read-only overlay of
        diff + lowers made with the new mount API and attached nowhere (its fd is
        the only handle; closing it or a crash unmounts it).  Mounting and
        unmounting a read-write overlay costs far more: the mount sets up the
        work dir and the unmount syncs the upper filesystem.  None while the
        layer is mounted (Get's mount is then the way to read it: the kernel warns
        about a dir that is the upper of one overlay and a lower of another) and
        on hosts without the new API."""
        layer_dir = self.store.require(layer_id)
        if not self.lower_links(layer_dir):
            yield self.diff_dir(layer_dir)
            return
        if not self._detached_views() or self.refs.count(layer_id) > 0:
            yield None
            return
        spec = self._spec(layer_dir, read_only=True)
        fd = mountapi.fs_mount_detached(spec.type, spec.source,
                                        mountapi.overlay_fsconfig(spec.options),
                                        read_only=True, what=f"a read view of {layer_id}")
        try:
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)

    def content_dir(self, layer_id: str) -> str:
        return self.diff_dir(self.store.require(layer_id))

    def mounts(self, layer_id: str, *, read_only: bool = False) -> list[MountSpec]:
        return [self._spec(self.store.require(layer_id), read_only=read_only)]

    #: What the mount spec calls this filesystem (fuse-overlayfs overrides).
    spec_type = "overlay"

    def _flags(self) -> tuple[str, ...]:
        return ("index=off", "userxattr") if self.support.userxattr else ("index=off",)

    def _spec(self, layer_dir: str, *, read_only: bool) -> MountSpec:
        """The layer's tree as one mount.  Lowers are named by their short links,
        so a mounter that compacts paths by their common directory (strata's
        legacy mount(2) path, containerd's) gets 29-byte lowers."""
        diff = self.diff_dir(layer_dir)
        lowers = [os.path.join(self.home, link) for link in self.lower_links(layer_dir)]
        if read_only:
            lowers.insert(0, diff)
            if len(lowers) == 1:
                return MountSpec("bind", diff, ("ro", "rbind"))
            return MountSpec(self.spec_type, "overlay",
                             (*self._flags(), "lowerdir=" + ":".join(lowers)))
        if not lowers:
            return MountSpec("bind", diff, ("rw", "rbind"))
        return MountSpec(self.spec_type, "overlay", (
            *self._flags(), f"workdir={os.path.join(layer_dir, 'work')}", f"upperdir={diff}",
            "lowerdir=" + ":".join(lowers)))

    def _unmount(self, layer_dir: str) -> None:
        if os.path.isdir(os.path.join(layer_dir, "merged")):
            self._detach(self.merged_dir(layer_dir))

    def _detach(self, mountpoint: str) -> None:
        """Unmount ``mountpoint`` lazily, if mounted (fuse-overlayfs overrides)."""
        mountapi.unmount(mountpoint)

    def release_stale_mount(self, layer_id: str) -> None:
        self._unmount(self.store.layer_dir(layer_id))

    def mounted_ids(self) -> list[str]:
        prefix = os.path.join(self.store.layers_dir, "")
        return [path[len(prefix):].split("/")[0] for path in mounts_under(self.store.layers_dir)
                if path.endswith("/merged") and path.count("/") == prefix.count("/") + 1]

    # ---- the diff calls ------------------------------------------------------
    def diff(self, layer_id: str, parent: str) -> TarStream:
        layer_dir = self._native(layer_id, parent)
        if layer_dir is None:
            return self.naive.diff(layer_id, parent)
        return export_tree(self.diff_dir(layer_dir), self.idmap, whiteout_format="overlay")

    def changes(self, layer_id: str, parent: str) -> list[Change]:
        layer_dir = self._native(layer_id, parent)
        if layer_dir is None:
            return self.naive.changes(layer_id, parent)
        return overlay_changes(self.diff_dir(layer_dir), self.lower_dirs(layer_dir))

    def apply_diff(self, layer_id: str, parent: str, stream: BinaryIO) -> int:
        layer_dir = self._native(layer_id, parent)
        if layer_dir is None:
            return self.naive.apply_diff(layer_id, parent, stream)
        diff = self.diff_dir(layer_dir)
        # Straight into the upper dir, whiteouts in the kernel's form: no mount.
        # The size DiffSize answers is stored with the end of the applying mark.
        with self.applying(layer_id,
                           finish=lambda: {DIFF_SIZE_KEY: str(directory_size(diff))}):
            size = apply_layer(diff, stream,
                               ApplyOptions(idmap=self.idmap, whiteout_format="overlay"))
            self._opaque_root(layer_dir)
        self.forget_get(layer_id)  # the next Get must drop this cached size again
        return size

    def _opaque_root(self, layer_dir: str) -> None:
        """The kernel ignores the opaque xattr on the upper dir's root, so an
        opaque marker at the root of a layer tar (drop everything below) is
        written out as a whiteout for each top-level entry of the lower chain
        that this layer does not itself provide."""
        diff = self.diff_dir(layer_dir)
        try:
            if os.getxattr(diff, OPAQUE_XATTR) != b"y":
                return
        except OSError:
            return
        os.removexattr(diff, OPAQUE_XATTR)
        hidden = {name for lower in self.lower_dirs(layer_dir) for name in os.listdir(lower)}
        uid, gid = self.idmap.root_pair()
        for name in sorted(hidden - set(os.listdir(diff))):
            os.mknod(os.path.join(diff, name), stat.S_IFCHR, 0)
            os.chown(os.path.join(diff, name), uid, gid)

    def diff_size(self, layer_id: str, parent: str) -> int:
        layer_dir = self._native(layer_id, parent)
        if layer_dir is None:
            return self.naive.diff_size(layer_id, parent)
        # Cached at ApplyDiff (so `docker system df` is O(layers)); dropped at
        # the first Get, after which the layer may have been written to.
        cached = self.store.read_meta(layer_id).extra.get(DIFF_SIZE_KEY)
        return int(cached) if cached else directory_size(self.diff_dir(layer_dir))

    def _forget_cached_size(self, layer_id: str, layer_dir: str) -> None:
        meta = self.store.read_meta(layer_id)
        if DIFF_SIZE_KEY in meta.extra:
            extra = {k: v for k, v in meta.extra.items() if k != DIFF_SIZE_KEY}
            self.store.write_meta(layer_dir, msgspec.structs.replace(meta, extra=extra))

    # ---- status, metadata, cleanup ---------------------------------------------
    def _mount_api_label(self) -> str:
        if self.support.new_mount_api:
            return "fsopen/fsconfig lowerdir+"
        return "mount(2), relative lowerdirs"

    def status(self) -> list[tuple[str, str]]:
        return [
            ("Backend", "overlay"),
            ("Backing Filesystem", self.support.backing_fs),
            ("Supports d_type", str(self.support.d_type).lower()),
            ("Native Overlay Diff", "true" if not self.native_reason
             else f"false ({self.native_reason})"),
            ("Mount API", self._mount_api_label()),
            ("Max Depth", str(self.max_lowers)),
            ("userxattr", str(self.support.userxattr).lower()),
            ("Layers", str(len(self.store.ids()))),
        ]

    def metadata(self, layer_id: str) -> dict[str, str]:
        layer_dir = self.store.require(layer_id)
        found = {"UpperDir": self.diff_dir(layer_dir)}
        lowers = self.lower_dirs(layer_dir)
        if lowers:
            found.update(WorkDir=os.path.join(layer_dir, "work"),
                         MergedDir=self.merged_dir(layer_dir), LowerDir=":".join(lowers))
        return found

    def cleanup(self) -> None:
        for path in mounts_under(self.store.layers_dir):
            self._detach(path)
        for layer_id in self.refs.active():
            self.refs.forget(layer_id)
        self.close()

    def _repair_links(self) -> None:
        """After a crash: drop l/ links to nothing, restore missing ones."""
        wanted = {}
        for layer_id in self.store.ids():
            link = self._read(os.path.join(self.store.layer_dir(layer_id), "link"))
            if link:
                wanted[link] = os.path.join("..", "layers", layer_id, "diff")
        for name in os.listdir(self.link_dir):
            if name not in wanted:
                log.info("removing stale link l/%s", name)
                _unlink_quietly(os.path.join(self.link_dir, name))
        for link, target in wanted.items():
            path = os.path.join(self.link_dir, link)
            if not os.path.islink(path):
                log.info("restoring link l/%s -> %s", link, target)
                os.symlink(target, path)


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _check_storage_opts(name: str, home: str, layer_id: str, opts: CreateOpts) -> None:
    for key in opts.storage_opt:
        if key.lower() == "size":
            raise NotSupported(f"layer {layer_id}: {size_limit_refusal(name, home)}")
        raise InvalidArgument(f"layer {layer_id}: unknown storage option {key!r} for {name}")


def _parse_bool(key: str, value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise InvalidArgument(f"overlay: storage option {key}={value!r} is not a boolean")


def init(home: str, options: list[str], idmap: IDMappings) -> Driver:
    opts = split_options(options, "overlay")
    if "size" in opts:
        raise NotSupported(size_limit_refusal("overlay", home))
    known = {"native_diff", "mount_api"}
    unknown = [o for o in options if o.lower().startswith("overlay.")
               and o.lower()[len("overlay."):].partition("=")[0] not in known]
    if unknown:
        raise InvalidArgument(f"overlay: unknown storage option(s) {', '.join(unknown)}")
    if "overlay" not in filesystems():
        raise Prerequisites("overlay: the kernel has no overlayfs (no 'overlay' in "
                            "/proc/filesystems; needs CONFIG_OVERLAY_FS)")
    problem = overlay_backing_problem(home)
    if problem:
        raise IncompatibleFS(f"overlay: {problem}")
    legacy = opts.get("mount_api", "auto").lower()
    if legacy not in ("auto", "legacy"):
        raise InvalidArgument("overlay: storage option mount_api must be auto or legacy")
    try:
        support = probe_overlay(home, allow_new_api=legacy == "auto")
    except OSError as e:
        raise IncompatibleFS(f"overlay: a test overlay mount under {home} failed: {e}") from e
    native = _parse_bool("native_diff", opts.get("native_diff", "true"))
    return OverlayDriver(home, idmap, support, native_diff=native)


register("overlay", init)
