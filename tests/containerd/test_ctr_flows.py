"""A real containerd 1.6 with strata as its proxy snapshotter, driven by ``ctr`` (issue 18).

One private containerd per backend (``tests/containerd/ctrd.py``: its own root, state and
sockets, a mount namespace with a tmpfs ``/run``), strata's snapshotter started beside it,
both images (``tests/containerd/images.py``) imported once.  The flows: unpack, ``ctr run
--rm`` writing and reading back, a 2-layer rootfs with a whiteout and an opaque dir, the
same file listing as containerd's own ``overlayfs`` snapshotter gives, every ``ctr
snapshots`` verb, strata and containerd restarts with state kept, and last ``ctr images
rm --sync``: containerd's GC removes leaf to root then calls Cleanup, and strata is left
with no record and no layer directory.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import secrets
import shutil
import signal
import sqlite3
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from plugin.snapshotter import BACKENDS
from tests.backends import btrfs_fs  # noqa: F401 (fixture)
from tests.containerd.ctrd import PrivateContainerd, containerd_unavailable
from tests.containerd.images import HELLO, OPAQUE_NEW, ImageSet
from tests.support.mounts import mounts_under
from tests.support.procs import wait_for
from tests.support.workdir import new_workdir, remove_workdir

#: The mount type containerd is handed per backend (plugin/backends/*.mounts).
SPEC_TYPE = {"overlay": "overlay", "vfs": "bind", "btrfs": "bind",
             "fuse-overlayfs": "fuse3.fuse-overlayfs"}
SNAP = ("snapshots", "--snapshotter", "strata")
GC_TIMEOUT = 30.0


@dataclass
class Ring:
    ctrd: PrivateContainerd
    images: ImageSet
    backend: str

    def run(self, name: str, *argv: str, image: str | None = None,
            snapshotter: str = "strata") -> bytes:
        ref = image or self.images.two.ref
        return self.ctrd.ctr("run", "--rm", "--snapshotter", snapshotter, ref,
                             f"{name}-{secrets.token_hex(3)}", *argv).stdout


def _backend_unavailable(backend: str) -> str | None:
    if backend == "fuse-overlayfs" and not shutil.which("mount.fuse3"):
        # containerd mounts fuse3.* specs only through this helper (mount/mount_linux.go).
        return "no mount.fuse3 helper: containerd cannot mount a fuse3.fuse-overlayfs spec"
    return None


@pytest.fixture(scope="module", params=BACKENDS)
def ring(request: pytest.FixtureRequest, images: ImageSet) -> Iterator[Ring]:
    backend: str = request.param
    reason = containerd_unavailable() or _backend_unavailable(backend)
    if reason:
        pytest.skip(reason)
    workdir = new_workdir("sc")
    root = (os.path.join(request.getfixturevalue("btrfs_fs").new_dir("ctr"), "root")
            if backend == "btrfs" else str(workdir / "sroot"))
    ctrd = PrivateContainerd(workdir, root, backend)
    try:
        ctrd.start_or_skip()
        ctrd.ctr("images", "import", "--snapshotter", "strata", str(images.tar))
        ctrd.ctr("images", "import", "--snapshotter", "overlayfs", str(images.tar))
        yield Ring(ctrd, images, backend)
    finally:
        ctrd.close()
        leaked = mounts_under(root) + mounts_under(workdir)
        remove_workdir(workdir)
        assert not leaked, f"mounts left in the host namespace: {leaked}"


# ---- unpack and run ---------------------------------------------------------------------

def test_import_unpacks_into_strata(ring: Ring) -> None:
    listed = ring.ctrd.ctr(*SNAP, "ls").stdout.decode()
    for chain_id in ring.images.two.chain_ids:
        assert chain_id in listed
    rows = ring.ctrd.rows()
    # containerd's metadata names every key <namespace>/<seq>/<name>
    assert {k.rsplit("/", 1)[1] for k in rows} >= set(ring.images.two.chain_ids)
    assert len(ring.ctrd.layer_dirs()) >= 2
    check = ring.ctrd.ctr("images", "check", snapshotter="strata").stdout.decode()
    for ref in (ring.images.busybox.ref, ring.images.two.ref):  # ... complete (n/n) ... true
        line = next(line for line in check.splitlines() if line.startswith(ref))
        assert "complete" in line and line.split()[-1] == "true", check


def test_run_writes_and_reads_back(ring: Ring) -> None:
    out = ring.run("rw", "sh", "-c",
                   "echo written-inside > /root/new && cat /root/new && cat /etc/motd "
                   "&& awk '$5 == \"/\"' /proc/self/mountinfo",
                   image=ring.images.busybox.ref).decode()
    written, motd, rootfs = out.splitlines()
    assert (written, motd) == ("written-inside", "hello from motd"), out
    # The container's rootfs is the spec strata returned, mounted by containerd's shim.
    fields = rootfs.split()
    fstype, root_in_fs = fields[fields.index("-") + 1], fields[3]
    if ring.backend == "overlay":
        assert fstype == "overlay" and f"upperdir={ring.ctrd.strata_root}/" in rootfs, rootfs
    elif ring.backend == "fuse-overlayfs":
        assert fstype == "fuse.fuse-overlayfs", rootfs
    else:  # a bind of the layer's directory (btrfs: of its subvolume)
        assert f"/{ring.backend}/layers/" in root_in_fs, rootfs


def test_two_layer_rootfs_applies_whiteout_and_opaque_dir(ring: Ring) -> None:
    out = ring.run("two", "sh", "-c", "cat /hello.txt; echo --; ls -A /etc; echo --; "
                   "ls -A /opt; echo --; cat /opt/new.txt").decode()
    hello, etc, opt, new = out.split("--\n")
    assert hello == HELLO.decode(), out
    assert "victim" not in etc.split() and {"motd", "passwd"} <= set(etc.split()), out
    assert opt.split() == ["new.txt"], out  # dir1/ and keep.txt of layer 1 are hidden
    assert new == OPAQUE_NEW.decode(), out


# A directory's size is its filesystem's business (btrfs counts name bytes): sizes and
# mtimes of non-directories only.
LISTING = ("find / -xdev -exec stat -c '%n %f %u:%g %N' {} + | sort; echo ==; "
           "find / -xdev ! -type d -exec stat -c '%n %s %Y' {} + | sort; echo ==; "
           "find / -xdev -type f -exec md5sum {} + | sort")


def test_listing_matches_containerd_overlayfs(ring: Ring) -> None:
    """The same image as containerd's own overlayfs snapshotter unpacks it, entry by entry
    (names, modes, owners, link targets; sizes, mtimes and contents of non-directories)."""
    for image in (ring.images.busybox.ref, ring.images.two.ref):
        ours = ring.run("ls", "sh", "-c", LISTING, image=image)
        theirs = ring.run("ls", "sh", "-c", LISTING, image=image, snapshotter="overlayfs")
        assert ours.count(b"\n") > 300, ours[:2000]
        if ours != theirs:
            a, b = set(ours.splitlines()), set(theirs.splitlines())
            pytest.fail(f"{image}: only strata {sorted(a - b)[:20]}, "
                        f"only overlayfs {sorted(b - a)[:20]}")


# ---- ctr snapshots ------------------------------------------------------------------------

def _mount_spec(ring: Ring, key: str, target: Path) -> None:
    """``ctr snapshots mounts`` prints a mount(8) command per spec: check the type, then
    mount it in the namespace as containerd's ``mount.Mount`` would (``fuse3.*`` through
    the ``mount.fuse3`` helper with ``-t``, the rest by mount(8))."""
    command = ring.ctrd.ctr(*SNAP, "mounts", str(target), key).stdout.decode().strip()
    _, _, fstype, source, printed_target, _, options = command.split(" ")
    assert (fstype, printed_target) == (SPEC_TYPE[ring.backend], str(target)), command
    target.mkdir()
    if fstype.startswith("fuse3."):
        argv = ["mount.fuse3", source, str(target), "-o", options, "-t", fstype[6:]]
    else:
        argv = ["mount", "-t", fstype, source, str(target), "-o", options]
    ring.ctrd.in_ns(*argv)


def _unmount(ring: Ring, target: Path) -> None:
    ring.ctrd.in_ns("umount", str(target))
    target.rmdir()


def test_ctr_snapshots_verbs(ring: Ring) -> None:
    tag = secrets.token_hex(4)
    active, name, view = f"{tag}/active one", f"{tag}/committed", f"{tag}/view one"
    base = ring.images.busybox.chain_ids[-1]
    layers_before = len(ring.ctrd.layer_dirs())
    scratch = ring.ctrd.workdir / "tmp"

    ring.ctrd.ctr(*SNAP, "prepare", active, base)
    target = scratch / f"m-{tag}"
    _mount_spec(ring, active, target)
    ring.ctrd.in_ns("sh", "-c", f"head -c 200000 /dev/urandom > '{target}/new.bin' "
                    f"&& rm '{target}/etc/motd'")
    _unmount(ring, target)

    size = int(ring.ctrd.ctr(*SNAP, "usage", "-b", active).stdout.decode().split()[-2])
    assert size >= 200000, size
    inherited = "containerd.io/snapshot/strata-test"
    ring.ctrd.ctr(*SNAP, "label", active, f"{inherited}=yes", "plain=kept-by-containerd")
    info = json.loads(ring.ctrd.ctr(*SNAP, "info", active).stdout)
    assert info["Kind"] == "Active" and info["Parent"] == base, info
    assert info["Labels"][inherited] == "yes" and info["Labels"]["plain"] == "kept-by-containerd"
    # containerd keeps plain labels itself and hands strata the inherited ones only
    row_labels = _labels(ring, ring.ctrd.key_of(active))
    assert row_labels.get(inherited) == "yes" and "plain" not in row_labels, row_labels

    diff = gzip.decompress(ring.ctrd.ctr(*SNAP, "diff", active).stdout)
    with tarfile.open(fileobj=io.BytesIO(diff)) as tf:
        names = {m.name.lstrip("./") for m in tf.getmembers()}
    assert {"new.bin", "etc/.wh.motd"} <= names, names

    ring.ctrd.ctr(*SNAP, "commit", name, active)
    info = json.loads(ring.ctrd.ctr(*SNAP, "info", name).stdout)
    assert info["Kind"] == "Committed", info
    assert not [k for k in ring.ctrd.rows() if k.endswith(active)]
    assert ring.ctrd.key_of(name)

    # containerd 1.6 gives an API View no GC root; a GC that drops it would leave a
    # stale child pinning its parent: the parent names it first (issue 18).
    ring.ctrd.ctr(*SNAP, "label", name, f"containerd.io/gc.ref.snapshot.strata/{view}={view}")
    ring.ctrd.ctr(*SNAP, "view", view, name)
    target = scratch / f"v-{tag}"
    _mount_spec(ring, view, target)
    try:  # read-only: a bind with "ro", or an overlay of lowers alone
        seen = ring.ctrd.in_ns("sh", "-c", f"cd '{target}' && wc -c < new.bin; "
                               "test -e etc/motd && echo motd; "
                               "touch x 2>/dev/null && echo writable", check=False).stdout
        assert seen.split() == ["200000"], seen
    finally:
        _unmount(ring, target)

    tree = ring.ctrd.ctr(*SNAP, "tree").stdout.decode()
    assert tree.index(base) < tree.index(name) < tree.index(view), tree

    ring.ctrd.ctr(*SNAP, "rm", view, name)
    ring.ctrd.sync_gc()
    wait_for(lambda: not any(k.split("/", 2)[2] in (name, view) for k in ring.ctrd.rows()),
             "containerd's GC to remove the view and the committed snapshot", GC_TIMEOUT)
    wait_for(lambda: len(ring.ctrd.layer_dirs()) == layers_before,
             "their layers to go", GC_TIMEOUT)


def _labels(ring: Ring, key: str) -> dict[str, str]:
    db = sqlite3.connect(f"file:{ring.ctrd.strata_root}/snapshotter.db?mode=ro", uri=True)
    try:
        (text,) = db.execute("SELECT labels FROM snapshots WHERE key = ?", (key,)).fetchone()
    finally:
        db.close()
    labels: dict[str, str] = json.loads(text)
    return labels


# ---- restarts -----------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["term", "kill"])
def test_strata_restart_keeps_state(ring: Ring, sig: signal.Signals) -> None:
    committed = {k for k in ring.ctrd.rows() if k.split("/", 2)[2].startswith("sha256:")}
    ring.ctrd.stop_strata(sig)
    down = ring.ctrd.ctr("run", "--rm", "--snapshotter", "strata", ring.images.two.ref,
                         f"down-{secrets.token_hex(3)}", "true", check=False)
    assert down.returncode != 0 and b"unavailable" in down.stderr, down.stderr
    ring.ctrd.start_strata()
    assert ring.ctrd.rows().keys() >= committed
    # containerd redials by itself (grpc backoff, at most 3 s apart)
    wait_for(lambda: ring.ctrd.ctr(*SNAP, "ls", check=False).returncode == 0,
             "containerd to reach strata again", 30.0)
    assert ring.run("after", "cat", "/hello.txt") == HELLO


def test_containerd_restart_keeps_state(ring: Ring) -> None:
    before = ring.ctrd.ctr(*SNAP, "ls").stdout
    ring.ctrd.stop_containerd()
    ring.ctrd.start_containerd()
    assert ring.ctrd.ctr(*SNAP, "ls").stdout == before
    assert ring.images.two.ref.encode() in ring.ctrd.ctr("images", "ls", "-q").stdout
    assert ring.run("after", "cat", "/hello.txt") == HELLO


# ---- GC: last, it empties the store -------------------------------------------------------

def test_images_rm_sync_gc_leaves_nothing(ring: Ring) -> None:
    ring.ctrd.sync_gc()
    assert all(k.split("/", 2)[2].startswith("sha256:") for k in ring.ctrd.rows())
    rows = ring.ctrd.rows()
    parent_key = {rid: key for key, (rid, _, _) in rows.items()}
    start = len(ring.ctrd.calls())
    refs = ring.ctrd.ctr("images", "ls", "-q").stdout.decode().split()
    assert set(refs) >= {ring.images.busybox.ref, ring.images.two.ref}, refs
    ring.ctrd.ctr("images", "rm", "--sync", *refs)
    wait_for(lambda: not ring.ctrd.rows(), "strata's records to empty", GC_TIMEOUT)

    calls = ring.ctrd.calls()[start:]
    removed = [key for op, key, outcome in calls if op == "Remove" and outcome == "ok"]
    assert sorted(removed) == sorted(rows), (removed, rows)
    for key, (_, parent, _) in rows.items():
        if parent is not None:  # leaf to root: a child goes before its parent
            assert removed.index(key) < removed.index(parent_key[parent]), removed
    last_remove = max(i for i, (op, _, _) in enumerate(calls) if op == "Remove")
    assert any(op == "Cleanup" for op, _, _ in calls[last_remove:]), calls
    assert not [c for c in calls if c[2] != "ok"], calls
    assert ring.ctrd.layer_dirs() == []
    assert not ring.ctrd.ctr(*SNAP, "ls").stdout.decode().split()[3:]
    # containerd's own overlayfs copy went the same way
    overlayfs = ring.ctrd.ctr("snapshots", "--snapshotter", "overlayfs", "ls").stdout.decode()
    assert not overlayfs.split()[3:], overlayfs
