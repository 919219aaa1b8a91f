"""vfs: a plain directory per layer; a child layer starts as a full copy.

No copy-on-write and nothing to mount, so it runs on any filesystem.  The copy
uses reflinks where the filesystem has them (xfs, btrfs: a big file then
costs no data copy) and a plain copy elsewhere.  It is done by GNU ``cp -a --reflink=auto``:
cp tries FICLONE, then copy_file_range, then read/write, keeps hardlinks,
sparse files, devices, owners, modes, times and every xattr (setting
``security.capability`` after chown, which would clear it), and it beat
``shutil.copytree`` on every filesystem tried, where a Python walk would
still have all that metadata to write (docs/host.md §6).  Model: moby ``vfs/driver.go``.
"""

from __future__ import annotations

import logging
import os
import subprocess

from plugin.backends.common import RefCountedStore
from plugin.driver.base import CreateOpts, Driver, ProtoDriver
from plugin.driver.naive import NaiveDiffDriver
from plugin.driver.probes import fs_name, size_limit_refusal
from plugin.driver.registry import register, split_options
from plugin.errors import InvalidArgument, NotSupported, StrataError
from plugin.idtools import IDMappings
from plugin.state.layers import LayerMeta

log = logging.getLogger("strata.backend.vfs")


def copy_tree(src: str, dst: str) -> None:
    """Copy ``src`` to the new path ``dst`` preserving everything (see module doc)."""
    result = subprocess.run(
        ["cp", "-a", "--reflink=auto", "--no-target-directory", "--", src, dst],
        capture_output=True, text=True, errors="replace", check=False,
    )
    if result.returncode != 0:
        raise StrataError(f"copying {src} to {dst} failed: {result.stderr.strip()}")


class VfsDriver(RefCountedStore, ProtoDriver):
    name = "vfs"

    def __init__(self, home: str, idmap: IDMappings) -> None:
        super().__init__(home, idmap, needs_mount=False)

    def create(self, layer_id: str, parent: str, opts: CreateOpts) -> None:
        for key in opts.storage_opt:
            if key.lower() != "size":
                raise InvalidArgument(f"layer {layer_id}: unknown storage option {key!r} for vfs")
            raise NotSupported(f"layer {layer_id}: {size_limit_refusal('vfs', self.home)}")
        parent_root = self.layer_root(parent, "parent layer") if parent else ""
        with self.store.staging(layer_id, LayerMeta(parent=parent)) as stage:
            root = self.root_of(stage)
            if parent_root:
                copy_tree(parent_root, root)
            else:
                os.mkdir(root, 0o755)
                os.chown(root, *self.idmap.root_pair())
                os.chmod(root, 0o755)
        log.debug("created %s (parent %s)", layer_id, parent or "-")

    def status(self) -> list[tuple[str, str]]:
        return [("Backend", "vfs"), ("Backing Filesystem", fs_name(self.home)),
                ("Layers", str(len(self.store.ids()))), ("Copy", "cp -a --reflink=auto")]

    def metadata(self, layer_id: str) -> dict[str, str]:
        return {"Dir": self.layer_root(layer_id)}

    def cleanup(self) -> None:
        self.close()


def init(home: str, options: list[str], idmap: IDMappings) -> Driver:
    if "size" in split_options(options, "vfs"):
        raise NotSupported(size_limit_refusal("vfs", home))
    unknown = [o for o in options
               if o.lower().startswith("vfs.") and not o.lower().startswith("vfs.size")]
    if unknown:
        raise InvalidArgument(f"vfs: unknown storage option(s) {', '.join(unknown)}")
    return NaiveDiffDriver(VfsDriver(home, idmap), idmap)


register("vfs", init)
