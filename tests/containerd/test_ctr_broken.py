"""A broken record (its layer lost in a power cut) as a real containerd 1.6 meets it.

``tests/snapshotter/test_reconcile.py`` makes the state through strata's gRPC socket;
here it is made under a private containerd (``tests/containerd/ctrd.py``) on overlay
(layers stacked as lowerdirs) and vfs (each layer a whole copy): both images imported
with ``--snapshotter strata``, strata's snapshotter stopped by its pid, the bottom layer
the two images share moved into the backend's trash/ (start-up deletes it: the layer is
lost for good, its record stays), strata started again while containerd keeps running.
Then:

* ``ctr run --rm`` of either image fails, and what ctr prints is strata's refusal
  (failed precondition, the key and the missing path), with nothing mounted and no
  record, layer or container left behind;
* ``ctr images rm --sync`` (containerd's GC, leaf to root through strata) leaves strata
  with no record and no layer, and a fresh import and run of the same image work: the
  broken state is recovered with containerd's own tools.

The tests run in file order on one module fixture (the last ones empty the store).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.containerd.ctrd import PrivateContainerd, containerd_unavailable
from tests.containerd.images import HELLO, ImageSet
from tests.support.mounts import mountinfo, mounts_under
from tests.support.procs import wait_for
from tests.support.workdir import new_workdir, remove_workdir

BACKENDS = ("overlay", "vfs")
SNAP = ("snapshots", "--snapshotter", "strata")
GC_TIMEOUT = 30.0


@dataclass
class Broken:
    ctrd: PrivateContainerd
    images: ImageSet
    key: str  # strata's key of the record whose layer is gone
    path: str  # that layer's path, as strata names it
    layers: list[str]  # the layer dirs left after the loss

    def home(self, *sub: str) -> str:
        return os.path.join(self.ctrd.strata_root, self.ctrd.backend, *sub)

    def run(self, ref: str, *argv: str, check: bool = True) -> tuple[int, bytes, bytes]:
        done = self.ctrd.ctr("run", "--rm", "--snapshotter", "strata", ref,
                             f"broken-{secrets.token_hex(3)}", *argv, check=check)
        return done.returncode, done.stdout, done.stderr


def lose_layer(ctrd: PrivateContainerd, key: str) -> str:
    """Stop strata by its pid, move ``key``'s layer into trash/ (a layer id is its
    record's id), start strata again; returns the layer's path."""
    layer = str(ctrd.rows()[key][0])
    home = os.path.join(ctrd.strata_root, ctrd.backend)
    path = os.path.join(home, "layers", layer)
    ctrd.stop_strata()
    os.rename(path, os.path.join(home, "trash",
                                 f"{layer}.{secrets.token_hex(6)}"))
    ctrd.start_strata()
    # containerd redials by itself (grpc backoff, at most 3 s apart)
    wait_for(lambda: ctrd.ctr(*SNAP, "ls", check=False).returncode == 0,
             "containerd to reach strata again", 30.0)
    return path


@pytest.fixture(scope="module", params=BACKENDS)
def broken(request: pytest.FixtureRequest, images: ImageSet) -> Iterator[Broken]:
    reason = containerd_unavailable()
    if reason:
        pytest.skip(reason)
    workdir = new_workdir("sc")
    root = str(workdir / "sroot")
    ctrd = PrivateContainerd(workdir, root, request.param)
    try:
        ctrd.start_or_skip()
        ctrd.ctr("images", "import", "--snapshotter", "strata", str(images.tar))
        key = ctrd.key_of(images.two.chain_ids[0])  # busybox's only layer, two's bottom
        path = lose_layer(ctrd, key)
        yield Broken(ctrd, images, key, path, ctrd.layer_dirs())
    finally:
        ctrd.close()
        leaked = mounts_under(root) + mounts_under(workdir)
        remove_workdir(workdir)
        assert not leaked, f"mounts left in the host namespace: {leaked}"


def _strata_mounts(b: Broken) -> list[str]:
    """Mounts in containerd's namespace that name strata's root or sit in the work dir
    (a container's rootfs, an unpack's temp mount)."""
    assert b.ctrd.ns is not None
    root, workdir = b.ctrd.strata_root, str(b.ctrd.workdir)
    return [f"{m.mountpoint} {m.fstype} {m.source} {m.super_options}"
            for m in mountinfo(f"/proc/{b.ctrd.ns.proc.pid}/mountinfo")
            if root in m.source or root in m.super_options
            or m.mountpoint.startswith(workdir + "/")]


def test_start_up_keeps_the_broken_record(broken: Broken) -> None:
    b = broken
    assert b.key in b.ctrd.rows() and not os.path.exists(b.path)
    log = (b.ctrd.workdir / "strata.log").read_text(errors="replace")
    assert log.count("is broken") == 1 and repr(b.key) in log and b.path in log, log[-3000:]
    assert os.listdir(b.home("trash")) == []  # lost for good
    listed = b.ctrd.ctr(*SNAP, "ls").stdout.decode()
    assert b.images.two.chain_ids[0] in listed, listed


@pytest.mark.parametrize("image", ["busybox", "two"])
def test_run_fails_with_strata_refusal_and_leaves_nothing(broken: Broken, image: str) -> None:
    """busybox's top is the broken record itself; two's top stands on it."""
    b = broken
    ref = getattr(b.images, image).ref
    rows, listed = b.ctrd.rows(), b.ctrd.ctr(*SNAP, "ls").stdout
    start = len(b.ctrd.calls())

    code, _, err = b.run(ref, "true", check=False)

    message = err.decode(errors="replace")
    assert code != 0, message
    assert "failed precondition" in message, message
    assert repr(b.key) in message and b.path in message, message
    assert not _strata_mounts(b), _strata_mounts(b)
    assert b.ctrd.rows() == rows
    assert b.ctrd.layer_dirs() == b.layers
    assert os.listdir(b.home("staging")) == []
    assert b.ctrd.ctr(*SNAP, "ls").stdout == listed
    assert b.ctrd.ctr("containers", "ls", "-q").stdout.split() == []
    # containerd 1.6 does not retry the refused Prepare
    prepares = [c for c in b.ctrd.calls()[start:] if c[0] == "Prepare"]
    assert len(prepares) == 1 and prepares[0][2].startswith("FAILED_PRECONDITION"), prepares


def test_images_rm_sync_clears_the_broken_records(broken: Broken) -> None:
    b = broken
    rows = b.ctrd.rows()
    start = len(b.ctrd.calls())
    refs = b.ctrd.ctr("images", "ls", "-q").stdout.decode().split()
    assert set(refs) == {b.images.busybox.ref, b.images.two.ref}, refs

    b.ctrd.ctr("images", "rm", "--sync", *refs)

    wait_for(lambda: not b.ctrd.rows(), "strata's records to empty", GC_TIMEOUT)
    removed = [key for op, key, outcome in b.ctrd.calls()[start:]
               if op == "Remove" and outcome == "ok"]
    assert sorted(removed) == sorted(rows), (removed, rows)
    assert b.ctrd.layer_dirs() == []
    # and no staged copy, trash or overlay's short link (l/) of any layer
    left = {sub: os.listdir(b.home(sub)) for sub in os.listdir(b.home())
            if os.path.isdir(b.home(sub))}
    assert set(left) >= {"layers", "staging", "trash"} and not any(left.values()), left
    assert not b.ctrd.ctr(*SNAP, "ls").stdout.decode().split()[3:]
    assert not _strata_mounts(b), _strata_mounts(b)


def test_import_and_run_work_again(broken: Broken) -> None:
    b = broken
    b.ctrd.ctr("images", "import", "--snapshotter", "strata", str(b.images.tar))
    _, out, _ = b.run(b.images.two.ref, "cat", "/hello.txt")
    assert out == HELLO
    _, out, _ = b.run(b.images.busybox.ref, "cat", "/etc/motd")
    assert out == b"hello from motd\n"
    # A running container's rootfs is what _strata_mounts finds (so its emptiness
    # above means something); deleted, it leaves nothing either.
    name = f"live-{secrets.token_hex(3)}"
    b.ctrd.ctr("run", "-d", "--snapshotter", "strata", b.images.two.ref, name, "sleep", "600")
    try:
        assert _strata_mounts(b)
    finally:
        b.ctrd.ctr("tasks", "rm", "-f", name)
        b.ctrd.ctr("containers", "rm", name)
    assert not _strata_mounts(b), _strata_mounts(b)
    assert b.ctrd.ctr("containers", "ls", "-q").stdout.split() == []
