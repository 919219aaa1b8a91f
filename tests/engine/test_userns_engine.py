"""Engine ring, user-namespaced: ``dockerd --userns-remap=default`` on strata.

The same daemon flags run on every backend and on dockerd's in-tree overlay2 (the
reference): a container's root is an unprivileged host uid (dockremap's first
subordinate id), so runc must reach the root filesystem strata returns from inside
the user namespace, layer files hold host ids, and what leaves the store (Diff,
``docker save``) holds container ids again.  Flows: run, exec, diff, commit, legacy
build, save, load, rm, and a plugin kill -9 and restart under a running container;
their results are compared with overlay2's under the same flags.

Set-up: ``--userns-remap=default`` makes dockerd create the ``dockremap`` system user
and its /etc/subuid and /etc/subgid ranges when they are missing.  The fixture does
the same, with the same commands, once and under a lock (two daemons starting
together would race to create it) and leaves them in place afterwards, as dockerd
does: another run on this machine may be using them.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.backends import backend_data_root
from tests.engine import harness, listing
from tests.engine.harness import BASE_IMAGE, INTREE_DRIVER
from tests.engine.rootfs import MOTD, Rootfs

pytestmark = pytest.mark.engine

USERNS = ("--userns-remap=default",)
REMAP_USER = "dockremap"
#: dockerd's defaultRangeStart and defaultRangeLen (pkg/idtools/usergroupadd_linux.go).
RANGE_START, RANGE_LEN = 100000, 65536
LOCK = Path("/run/lock/strata-test-dockremap.lock")
RUN = ("run", "--rm", "--network", "none")

# In the container as its root; no mknod: a user namespace may not make devices.
MUTATE = r"""
set -e
rm /etc/victim
rm -rf /opt/dir1 && mkdir /opt/dir1 && echo fresh > /opt/dir1/new
rm /fid/sym
echo fresh > /fid/newfile && ln /fid/newfile /fid/newlink && chown 1000:1000 /fid/newfile
mkfifo /fid/newfifo && ln -s ../etc/passwd /fid/newsym
chmod 700 /fid/owned_dir
""".strip()

DOCKERFILE = """\
FROM {image}
COPY hello.txt /opt/
RUN rm /etc/victim && rm -rf /opt/dir1 && mkdir /opt/dir1 && echo new > /opt/dir1/new \\
    && chown -R 1000:1000 /opt/dir1 && echo built > /built.txt
"""
BUILT_PROBE = ("stat -c '%n %u %g %a' /opt/hello.txt /opt/dir1 /opt/dir1/new /built.txt; "
               "test -e /etc/victim || echo victim-gone; cat /opt/dir1/new /built.txt")
BUILT_EXPECTED = ("/opt/hello.txt 0 0 644\n/opt/dir1 1000 1000 755\n/opt/dir1/new 1000 1000 644\n"
                  "/built.txt 0 0 644\nvictim-gone\nnew\nbuilt\n")


# ---- the dockremap user, as dockerd makes it ------------------------------------

@dataclass(frozen=True)
class Remap:
    uid: int  # host uid of a container's root
    gid: int


def _ranges(path: str) -> list[tuple[str, int, int]]:
    try:
        with open(path, encoding="utf-8") as f:
            rows = [line.strip().split(":") for line in f if line.count(":") == 2]
    except FileNotFoundError:
        return []
    return [(name, int(start), int(length)) for name, start, length in rows]


def _free_start(path: str) -> int:
    """dockerd's findNextRangeStart: the first 65536 ids from 100000 on no range overlaps."""
    start = RANGE_START
    for _, first, length in sorted(_ranges(path), key=lambda r: r[1]):
        end = first + length
        if first <= start <= end or first <= start + RANGE_LEN <= end:
            start = end
    return start


def ensure_dockremap() -> Remap:
    """dockremap and its ranges, made as dockerd 20.10 makes them if missing."""
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if subprocess.run(["getent", "passwd", REMAP_USER], capture_output=True).returncode:
            subprocess.run(["adduser", "--system", "--shell", "/bin/false", "--no-create-home",
                            "--disabled-login", "--disabled-password", "--group", REMAP_USER],
                           check=True, capture_output=True)
        starts = []
        for path, flag in (("/etc/subuid", "-v"), ("/etc/subgid", "-w")):
            mine = [r for r in _ranges(path) if r[0] == REMAP_USER]
            if not mine:
                first = _free_start(path)
                subprocess.run(["usermod", flag, f"{first}-{first + RANGE_LEN - 1}", REMAP_USER],
                               check=True, capture_output=True)
                mine = [(REMAP_USER, first, RANGE_LEN)]
            starts.append(mine[0][1])
    return Remap(uid=starts[0], gid=starts[1])


@pytest.fixture(scope="session")
def remap(dockerd_bin: str) -> Remap:
    return ensure_dockremap()


@pytest.fixture(scope="module")
def stack(dockerd_bin: str, backend: str, remap: Remap,
          request: pytest.FixtureRequest) -> Iterator[harness.Stack]:
    """One plugin and one ``dockerd --userns-remap=default`` on it (overrides conftest's)."""
    if backend == "zfs" and INTREE_DRIVER is None and zfs_is_fuse():
        pytest.skip("zfs-fuse cannot serve user-namespaced containers and Init refuses ID "
                    "maps on it (test_zfs_fuse_refuses_id_maps); kernel ZFS is not on this host")
    with backend_data_root(request, backend if INTREE_DRIVER is None else "") as on:
        engine = harness.start_stack(dockerd_bin, backend, intree_driver=INTREE_DRIVER,
                                     data_root_on=on, dockerd_args=USERNS)
        try:
            yield engine
        finally:
            engine.close()


@pytest.fixture(scope="module")
def reference(dockerd_bin: str, remap: Remap, rootfs: Rootfs) -> Iterator[harness.Dockerd]:
    """In-tree overlay2 under the same flags, with the same base image imported."""
    with open("/proc/filesystems") as f:
        if "overlay" not in f.read().split():
            pytest.skip("kernel has no overlayfs; cannot run the overlay2 reference daemon")
    daemon = harness.start_intree(dockerd_bin, "overlay2", dockerd_args=USERNS)
    try:
        daemon.docker("import", str(rootfs.tar), BASE_IMAGE)
        yield daemon
    finally:
        daemon.close()


# ---- helpers ------------------------------------------------------------------------

def zfs_is_fuse() -> bool:
    """Kernel ZFS registers the filesystem type ``zfs``; zfs-fuse does not."""
    with open("/proc/filesystems") as f:
        return "zfs" not in f.read().split()


def sh(engine: harness.Stack | harness.Dockerd, image: str, script: str) -> str:
    return engine.docker(*RUN, image, "/bin/sh", "-c", script).stdout


def running(engine: harness.Stack | harness.Dockerd, name: str, image: str) -> str:
    engine.docker("run", "-d", "--network", "none", "--name", name, image, "/bin/sleep", "300")
    return name


def daemon_of(engine: harness.Stack | harness.Dockerd) -> harness.Dockerd:
    return engine.dockerd if isinstance(engine, harness.Stack) else engine


def rootfs_of(stack: harness.Stack, container: str) -> Path:
    """What Get returned for the container's layer: Home/layers/<mount id>/{merged,root}."""
    daemon = stack.dockerd
    cid = daemon.docker("inspect", "-f", "{{.Id}}", container).stdout.strip()
    layerdb = daemon.home.parent / "image" / daemon.driver / "layerdb"
    mount_id = (layerdb / "mounts" / cid / "mount-id").read_text().strip()
    layer = daemon.home / "layers" / mount_id
    return next(p for p in (layer / "merged", layer / "root") if p.is_dir())


def as_user(uid: int, gid: int, *argv: str) -> subprocess.CompletedProcess[str]:
    """``argv`` as ``uid``:``gid`` with no supplementary groups and no capabilities:
    what runc has on host inodes once it is inside the container's user namespace."""
    return subprocess.run(argv, user=uid, group=gid, extra_groups=[], capture_output=True,
                          text=True, check=False)


Entry = tuple[str, int, int, str, str]


def saved_layers(archive: Path) -> list[list[Entry]]:
    """(name, uid, gid, mode, link) of every entry of every layer of a `docker save`."""
    with tarfile.open(archive) as tar:
        manifest = tar.extractfile("manifest.json")
        assert manifest is not None
        layers = []
        for name in json.load(manifest)[0]["Layers"]:
            member = tar.extractfile(name)
            assert member is not None
            with tarfile.open(fileobj=member) as layer:
                layers.append(sorted((m.name, m.uid, m.gid, oct(m.mode), m.linkname)
                                     for m in layer.getmembers()))
        return layers


def content_of(layer: list[Entry]) -> list[Entry]:
    """A saved layer's entries but its whiteouts: a naive diff (vfs, btrfs, zfs,
    fuse-overlayfs) whites out each entry of a removed-and-recreated dir, overlay's
    native one marks the dir opaque; both give the same image."""
    return [e for e in layer if not os.path.basename(e[0].rstrip("/")).startswith(".wh.")]


def comparable(tree: dict[bytes, dict[str, object]], backend: str,
               mtimes: bool = True) -> dict[bytes, dict[str, object]]:
    """A container listing as compared across stores: zfs-fuse keeps no xattrs
    (docs/host.md §3), so they are left out there; the init layer's files carry
    the moment the container was made."""
    out = {}
    for path, item in tree.items():
        kept = dict(item)
        if backend == "zfs":
            kept.pop("xattrs", None)
        if not mtimes or path in (b"/.dockerenv", b"/etc/mtab"):
            kept.pop("mtime", None)
        out[path] = kept
    return out


def listing_of(engine: harness.Stack | harness.Dockerd, image: str,
               name: str) -> dict[bytes, dict[str, object]]:
    daemon = daemon_of(engine)
    running(daemon, name, image)
    try:
        return listing.container_listing(daemon, name)
    finally:
        daemon.docker("rm", "-f", name)


# ---- the flows ---------------------------------------------------------------------

def test_run_and_exec_see_container_ids_and_store_host_ids(
        stack: harness.Stack, base_image: str, remap: Remap) -> None:
    out = sh(stack, base_image, "id -u; id -g; stat -c '%u %g' / /etc/motd /fid/owned_dir; "
                                "touch /new && stat -c '%u %g' /new; cat /etc/motd")
    assert out == "0\n0\n0 0\n0 0\n1000 1000\n0 0\n" + MOTD
    running(stack, "live", base_image)
    try:
        out = stack.docker("exec", "live", "/bin/sh", "-c",
                           "echo hi > /tmp/x && chown 1000:1000 /tmp/x && cat /tmp/x; id -u").stdout
        assert out == "hi\n0\n"
        root = f"/proc/{listing.container_pid(stack.dockerd, 'live')}/root"
        for path, owner in (("/", remap.uid), ("/etc/motd", remap.uid),
                            ("/fid/owned_dir", remap.uid + 1000), ("/tmp/x", remap.uid + 1000)):
            st = os.lstat(root + path)
            assert (st.st_uid, st.st_gid) == (owner, owner - remap.uid + remap.gid), path
    finally:
        stack.docker("rm", "-f", "live")


def test_layer_dirs_let_only_the_remapped_root_through(
        stack: harness.Stack, base_image: str, remap: Remap) -> None:
    if stack.plugin is None:
        pytest.skip("checks strata's Home layout")
    home = stack.dockerd.home
    running(stack, "reach", base_image)
    try:
        rootfs = rootfs_of(stack, "reach")
        for d in (home, home / "layers", rootfs.parent):
            st = d.lstat()
            assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, remap.gid, 0o710), d
        motd = str(rootfs / "etc" / "motd")
        reached = as_user(remap.uid, remap.gid, "cat", motd)
        assert reached.returncode == 0 and reached.stdout == MOTD, reached.stderr
        for uid, gid in ((65534, 65534), (remap.uid + 1, remap.gid + 1)):
            denied = as_user(uid, gid, "cat", motd)
            assert denied.returncode != 0 and "Permission denied" in denied.stderr, (uid, denied)
    finally:
        stack.docker("rm", "-f", "reach")


def _mutate_and_commit(engine: harness.Stack | harness.Dockerd, tag: str) -> str:
    """``MUTATE`` in a container of the base image, committed as ``tag``; its `docker diff`."""
    running(engine, "mut", BASE_IMAGE)
    try:
        engine.docker("exec", "mut", "/bin/sh", "-c", MUTATE)
        changes = engine.docker("diff", "mut").stdout
        engine.docker("commit", "mut", tag)
    finally:
        engine.docker("rm", "-f", "mut")
    return "".join(sorted(changes.splitlines(keepends=True)))


def test_diff_commit_save_match_overlay2(stack: harness.Stack, base_image: str, backend: str,
                                         reference: harness.Dockerd, tmp_path: Path) -> None:
    on_strata = _mutate_and_commit(stack, "userns/derived-s:1")
    on_overlay2 = _mutate_and_commit(reference, "userns/derived-o:1")
    assert on_strata == on_overlay2
    assert "D /etc/victim\n" in on_strata and "A /fid/newfile\n" in on_strata

    stack.docker("save", "-o", str(tmp_path / "s.tar"), "userns/derived-s:1")
    reference.docker("save", "-o", str(tmp_path / "o.tar"), "userns/derived-o:1")
    saved, expected = saved_layers(tmp_path / "s.tar"), saved_layers(tmp_path / "o.tar")
    # the committed layer comes from strata's Diff: container owners, not host ones
    owners = {name: (uid, gid) for name, uid, gid, _, _ in saved[-1]}
    assert owners["fid/newfile"] == (1000, 1000) and owners["opt/dir1/new"] == (0, 0)
    assert all(e[1] < RANGE_LEN and e[2] < RANGE_LEN for layer in saved for e in layer)
    assert {"etc/.wh.victim", "fid/.wh.sym"} <= set(owners)
    assert [content_of(layer) for layer in saved] == [content_of(layer) for layer in expected]

    a = listing_of(stack, "userns/derived-s:1", "cmp-s")
    b = listing_of(reference, "userns/derived-o:1", "cmp-o")
    # two commits made at two moments: everything but the new files' mtimes must agree
    problems = listing.diff_listings(comparable(b, backend, mtimes=False),
                                     comparable(a, backend, mtimes=False))
    assert not problems, "overlay2 vs strata:\n" + "\n".join(problems)


def test_save_load_both_ways(stack: harness.Stack, base_image: str, backend: str,
                             reference: harness.Dockerd, tmp_path: Path) -> None:
    for image, source, target in (("userns/derived-o:1", reference, stack),
                                  ("userns/derived-s:1", stack, reference)):
        if source.docker("image", "inspect", image, check=False).returncode:
            _mutate_and_commit(source, image)
        archive = tmp_path / "x.tar"
        source.docker("save", "-o", str(archive), image)
        target.docker("load", "-i", str(archive))
        got = listing_of(target, image, "ld-t")
        want = listing_of(source, image, "ld-s")
        problems = listing.diff_listings(comparable(want, backend), comparable(got, backend))
        assert not problems, f"{image}:\n" + "\n".join(problems)
        assert sh(target, image, "stat -c '%u %g' /fid/newfile; cat /opt/dir1/new") == \
            "1000 1000\nfresh\n"
        archive.unlink()


def test_legacy_build_matches_overlay2(stack: harness.Stack, base_image: str,
                                       reference: harness.Dockerd, tmp_path: Path) -> None:
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "hello.txt").write_text("hello from build\n")
    (context / "hello.txt").chmod(0o644)
    (context / "Dockerfile").write_text(DOCKERFILE.format(image=base_image))
    layers = []
    for engine, tag in ((stack, "userns/built-s:1"), (reference, "userns/built-o:1")):
        engine.docker("build", "--network", "none", "-t", tag, str(context),
                      env={"DOCKER_BUILDKIT": "0"})
        assert sh(engine, tag, BUILT_PROBE) == BUILT_EXPECTED
        engine.docker("save", "-o", str(tmp_path / "b.tar"), tag)
        layers.append([content_of(layer) for layer in saved_layers(tmp_path / "b.tar")])
    assert layers[0] == layers[1]  # COPY and RUN layers: same entries, owners and modes


def test_plugin_kill_and_restart_under_a_running_container(
        stack: harness.Stack, base_image: str, remap: Remap) -> None:
    if stack.plugin is None:
        pytest.skip(f"in-tree driver {stack.driver!r} has no plugin process to restart")
    running(stack, "survivor", base_image)
    try:
        stack.docker("exec", "survivor", "/bin/sh", "-c", "echo before > /before")
        stack.plugin.restart(hard=True)
        out = stack.docker("exec", "survivor", "/bin/sh", "-c",
                           "cat /before; echo after > /after; id -u").stdout
        assert out == "before\n0\n"
        assert set(stack.docker("diff", "survivor").stdout.split("\n")) >= {"A /before",
                                                                           "A /after"}
        assert sh(stack, base_image, "stat -c '%u' /etc/motd; cat /etc/motd") == "0\n" + MOTD
        stack.docker("commit", "survivor", "userns/after-restart:1")
        assert sh(stack, "userns/after-restart:1", "cat /before /after") == "before\nafter\n"
    finally:
        stack.docker("rm", "-f", "survivor")
    stack.docker("rmi", "userns/after-restart:1")


def test_rm_and_rmi_leave_no_layers(stack: harness.Stack, base_image: str) -> None:
    if stack.plugin is None:
        pytest.skip("counts strata's layer dirs")
    layers = stack.dockerd.home / "layers"
    before = sorted(os.listdir(layers))
    running(stack, "gone", base_image)
    stack.docker("exec", "gone", "/bin/sh", "-c", "echo x > /x")
    stack.docker("commit", "gone", "userns/gone:1")
    stack.docker("rm", "-f", "gone")
    stack.docker("rmi", "userns/gone:1")
    assert sorted(os.listdir(layers)) == before


def test_zfs_fuse_refuses_id_maps(dockerd_bin: str, remap: Remap,
                                  request: pytest.FixtureRequest) -> None:
    """On zfs-fuse a remapped root is an ordinary user (chown EPERM): Init says so."""
    if not zfs_is_fuse():
        pytest.skip("kernel ZFS: the flows above run on it")
    with backend_data_root(request, "zfs") as on, pytest.raises(harness.HarnessError) as err:
        harness.start_stack(dockerd_bin, "zfs", data_root_on=on, dockerd_args=USERNS).close()
    assert "zfs-fuse cannot serve user-namespaced containers" in str(err.value)
