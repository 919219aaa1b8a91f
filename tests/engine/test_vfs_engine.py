"""Engine ring: Debian's dockerd 20.10 running on strata, end to end.

Each test drives the docker CLI against a dockerd started with
``--storage-driver strata-t<random>`` and checks what a user would see:
file contents and metadata inside containers, ``docker diff``/``ps -s``,
commit, save/load against the in-tree overlay2 driver, a legacy build with
whiteouts and an opaque directory, removal, and restarts of either process.
The call sequences these exercise are listed in docs/protocol.md §7.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from tests.engine import harness, listing
from tests.engine.harness import BASE_IMAGE, INTREE_DRIVER
from tests.engine.rootfs import CAP_NET_BIND_SERVICE_V2, MOTD, USER_XATTR, Rootfs

pytestmark = pytest.mark.engine

RUN = ("run", "--rm", "--network", "none")

# Run both inside a container and chrooted into the source tree: same busybox,
# so the outputs must match byte for byte (inode numbers are only compared
# with each other, never printed).  A directory's link count and size are
# details of the filesystem (btrfs: nlink 1, size = sum of name lengths), not
# layer content, so they are printed for other entries only.
PROBE_SCRIPT = r"""
cat /etc/motd
cd /fid
for f in *; do
  if [ -d "$f" ] && [ ! -L "$f" ]; then stat -c '%n %a %u %g %F' "$f"
  else stat -c '%n %a %u %g %F %t:%T %h %s' "$f"; fi
done | sort
readlink sym abssym
[ "$(stat -c %i hl_a)" = "$(stat -c %i hl_b)" ] && echo hl_a-hl_b-same-inode
sha256sum big.bin xattr
cat owned_dir/inner
""".strip()

# Entries dockerd's init layer adds that are not mount points (docs/protocol.md §7,
# "docker run"): the rest (/etc/hosts, /dev/…) are mounted over and skipped.
INIT_LAYER_FILES = {b"/.dockerenv", b"/etc/mtab"}
MOUNTED_OVER = {b"/dev", b"/proc", b"/sys"}  # rootfs dirs the runtime mounts over

LAYER_CONTENT_NAMES = {"busybox", "big.bin", "motd", "victim"}  # files every test layer holds
LAYER_ID = re.compile(r"^[0-9a-f]{64}(-init)?$")


def comparable(tree: dict[bytes, dict[str, object]]) -> dict[bytes, dict[str, object]]:
    """The listing as compared across stores and containers.

    Files dockerd's init layer writes at container creation carry that
    moment's mtime, so theirs is dropped. And only in harness-validation mode
    on dockerd's own vfs: that driver copies a parent layer for every container
    with moby's ``copy.DirCopy``, which keeps ``security.capability`` but drops
    every other xattr -- a known in-tree loss, not something strata may copy
    (strata runs are compared in full).
    """
    out = {}
    for path, item in tree.items():
        item = dict(item)
        if path in INIT_LAYER_FILES:
            item.pop("mtime", None)
        if INTREE_DRIVER == "vfs":
            kept = {k: v for k, v in listing.xattrs_of(item).items() if not k.startswith("user.")}
            item["xattrs"] = tuple(sorted(kept.items()))
        out[path] = item
    return out


def sh(engine: harness.Stack | harness.Dockerd, image: str, script: str) -> str:
    return engine.docker(*RUN, image, "/bin/sh", "-c", script).stdout


def running(engine: harness.Stack | harness.Dockerd, name: str, image: str, *extra: str) -> str:
    engine.docker(
        "run", "-d", "--network", "none", "--name", name, *extra, image, "/bin/sleep", "300"
    )
    return name


def listing_of(dockerd: harness.Dockerd, image: str, name: str) -> dict[bytes, dict[str, object]]:
    running(dockerd, name, image)
    try:
        return listing.container_listing(dockerd, name)
    finally:
        dockerd.docker("rm", "-f", name)


def layer_ids_under(home: Path) -> list[str]:
    """Every layer-id-shaped name up to three levels under the driver Home.

    Generic on purpose: strata keeps layers in Home/layers/<id>, dockerd's own
    vfs in Home/dir/<id>; either way an id left behind is a leak. A matching
    directory is not descended into (its content is a layer's file tree).
    """
    found: list[str] = []

    def walk(directory: str, depth: int) -> None:
        with os.scandir(directory) as entries:
            for entry in entries:
                if LAYER_ID.match(entry.name):
                    found.append(entry.name)
                elif depth < 3 and entry.is_dir(follow_symlinks=False):
                    walk(entry.path, depth + 1)

    if home.is_dir():
        walk(str(home), 1)
    return sorted(found)


def graphdriver_name(engine: harness.Stack | harness.Dockerd, kind: str, ref: str) -> str:
    return engine.docker(kind, "inspect", "-f", "{{.GraphDriver.Name}}", ref).stdout.strip()


def assert_fidelity_items(tree: dict[bytes, dict[str, object]]) -> None:
    """The /fid entries carry what the rootfs builder put there (so equality is not vacuous)."""
    xattrs = listing.xattrs_of(tree[b"/fid/xattr"])
    assert xattrs.get(USER_XATTR[0]) == USER_XATTR[1], tree[b"/fid/xattr"]
    assert xattrs.get("security.capability") == CAP_NET_BIND_SERVICE_V2, tree[b"/fid/xattr"]
    assert tree[b"/fid/null"]["rdev"] == (1, 3)
    assert (
        tree[b"/fid/hl_a"]["hardlink_group"] == tree[b"/fid/hl_b"]["hardlink_group"] == b"/fid/hl_a"
    )
    assert tree[b"/fid/sym"]["target"] == b"hl_a"
    assert tree[b"/fid/abssym"]["target"] == b"/etc/passwd"
    assert tree[b"/fid/suid"]["mode"] == oct(0o104755)
    assert tree[b"/fid/sticky"]["mode"] == oct(0o41777)
    assert (tree[b"/fid/owned"]["uid"], tree[b"/fid/owned"]["gid"]) == (1000, 1000)
    assert b"/fid/bad-\xff\xfe-name" in tree
    assert b"/fid/" + b"L" * 150 in tree


# ---------------------------------------------------------------------------


def test_run_sees_the_imported_tree(stack: harness.Stack, base_image: str, rootfs: Rootfs) -> None:
    """import → run: file contents, modes, owners, devices, links, xattrs, odd names."""
    inside = sh(stack, base_image, PROBE_SCRIPT)
    oracle = subprocess.run(
        [
            shutil.which("chroot") or "/usr/sbin/chroot",
            str(rootfs.tree),
            "/bin/sh",
            "-c",
            PROBE_SCRIPT,
        ],
        capture_output=True,
        text=True,
        errors="surrogateescape",
        check=True,
        env={"PATH": "/bin"},
    ).stdout
    assert inside == oracle
    assert "hl_a-hl_b-same-inode" in inside and "character special file 1:3" in inside

    seen = listing_of(stack.dockerd, base_image, "probe-run")
    source = listing.tree_listing(os.fsencode(str(rootfs.tree)))
    assert_fidelity_items(source)
    assert set(seen) - set(source) == INIT_LAYER_FILES
    assert set(source) - set(seen) == MOUNTED_OVER
    common = set(source) & set(seen)
    problems = listing.diff_listings(
        comparable({k: source[k] for k in common}), comparable({k: seen[k] for k in common})
    )
    assert not problems, "source tree vs container:\n" + "\n".join(problems)


def test_diff_size_commit_and_driver_name(
    stack: harness.Stack, base_image: str, tmp_path: Path
) -> None:
    """docker diff / ps -s / export / commit / inspect on one changed container."""
    name = "diffc"
    stack.docker(
        "run",
        "--network",
        "none",
        "--name",
        name,
        base_image,
        "/bin/sh",
        "-c",
        "echo new>/etc/newfile; rm /etc/victim; echo changed>/etc/motd",
    )
    try:
        changes = stack.docker("diff", name).stdout.splitlines()
        assert sorted(changes) == ["A /etc/newfile", "C /etc", "C /etc/motd", "D /etc/victim"], (
            changes
        )

        # DiffSize = lstat sizes of added/modified files: "new\n" + "changed\n"
        size = stack.docker(
            "ps", "-a", "-s", "--filter", f"name=^{name}$", "--format", "{{.Size}}"
        ).stdout
        assert size.startswith("12B "), size

        exported = tmp_path / "export.tar"
        stack.docker("export", "-o", str(exported), name)
        with tarfile.open(exported) as tar:
            names = set(tar.getnames())
            assert "etc/newfile" in names and "etc/victim" not in names and "fid/null" in names
            motd = tar.extractfile("etc/motd")
            assert motd is not None and motd.read() == b"changed\n"
            # docker's exporter keeps only security.capability (docs/protocol.md §6.3)
            cap = tar.getmember("fid/xattr").pax_headers.get("SCHILY.xattr.security.capability")
            assert (
                cap is not None
                and cap.encode("utf-8", "surrogateescape") == CAP_NET_BIND_SERVICE_V2
            )

        committed = "strata-test/committed:1"
        stack.docker("commit", name, committed)
        out = sh(
            stack, committed, "cat /etc/newfile /etc/motd; test -e /etc/victim || echo victim-gone"
        )
        assert out == "new\nchanged\nvictim-gone\n"

        assert graphdriver_name(stack, "image", base_image) == stack.driver
        assert graphdriver_name(stack, "image", committed) == stack.driver
        assert graphdriver_name(stack, "container", name) == stack.driver
    finally:
        stack.docker("rm", "-f", name, check=False)


def _saved_layer_digests(archive: Path) -> list[str]:
    """sha256 of each layer tar in a `docker save` archive, bottom first."""
    with tarfile.open(archive) as tar:
        manifest_file = tar.extractfile("manifest.json")
        assert manifest_file is not None
        manifest = json.load(manifest_file)
        digests = []
        for layer in manifest[0]["Layers"]:
            member = tar.extractfile(layer)
            assert member is not None
            digests.append(hashlib.sha256(member.read()).hexdigest())
        return digests


def _last_layer_names(archive: Path) -> list[str]:
    with tarfile.open(archive) as tar:
        manifest_file = tar.extractfile("manifest.json")
        assert manifest_file is not None
        member = tar.extractfile(json.load(manifest_file)[0]["Layers"][-1])
        assert member is not None
        with tarfile.open(fileobj=member) as layer:
            return layer.getnames()


# Changes made on overlay2, committed there, then loaded into strata: the
# layer tar is produced by overlay2's exporter (whiteouts, opaque dir, new
# hardlinks, devices, ownership, a capability set from the host).
MUTATE_ON_OVERLAY2 = r"""
set -e
rm /etc/victim
rm -rf /opt/dir1 && mkdir /opt/dir1 && echo fresh > /opt/dir1/new
rm /fid/sym
echo fresh > /fid/newfile && ln /fid/newfile /fid/newlink && chown 1000:1000 /fid/newfile
mkfifo /fid/newfifo && mknod /fid/newnull c 1 3 && ln -s ../etc/passwd /fid/newsym
chmod 700 /fid/owned_dir
echo cap > /fid/newcap
""".strip()


def test_save_load_round_trip_with_overlay2(
    stack: harness.Stack, base_image: str, overlay2: harness.Dockerd, tmp_path: Path
) -> None:
    """strata → save → overlay2 load, overlay2 commit → save → strata load; trees and
    bytes equal."""
    to_overlay = tmp_path / "base.tar"
    stack.docker("save", "-o", str(to_overlay), base_image)
    overlay2.docker("load", "-i", str(to_overlay))

    on_strata = listing_of(stack.dockerd, base_image, "cmp-s1")
    on_overlay = listing_of(overlay2, base_image, "cmp-o1")
    assert_fidelity_items(on_overlay)
    problems = listing.diff_listings(comparable(on_overlay), comparable(on_strata))
    assert not problems, "overlay2 vs strata:\n" + "\n".join(problems)

    derived = "strata-test/derived:1"
    running(overlay2, "mut", base_image)
    try:
        overlay2.docker("exec", "mut", "/bin/sh", "-c", MUTATE_ON_OVERLAY2)
        pid = listing.container_pid(overlay2, "mut")
        os.setxattr(f"/proc/{pid}/root/fid/newcap", "security.capability", CAP_NET_BIND_SERVICE_V2)
        overlay2.docker("commit", "mut", derived)
    finally:
        overlay2.docker("rm", "-f", "mut")
    from_overlay = tmp_path / "derived-o.tar"
    overlay2.docker("save", "-o", str(from_overlay), derived)
    top_layer = _last_layer_names(from_overlay)
    assert "etc/.wh.victim" in top_layer and "fid/.wh.sym" in top_layer, top_layer
    if ["Native Overlay Diff", "true"] in json.loads(
        overlay2.docker("info", "--format", "{{json .DriverStatus}}").stdout
    ):
        assert "opt/dir1/.wh..wh..opq" in top_layer, top_layer

    stack.docker("load", "-i", str(from_overlay))
    image_id = "{{.Id}}"
    assert (
        stack.docker("image", "inspect", "-f", image_id, derived).stdout
        == overlay2.docker("image", "inspect", "-f", image_id, derived).stdout
    )

    on_strata = listing_of(stack.dockerd, derived, "cmp-s2")
    on_overlay = listing_of(overlay2, derived, "cmp-o2")
    problems = listing.diff_listings(comparable(on_overlay), comparable(on_strata))
    assert not problems, "overlay2 vs strata:\n" + "\n".join(problems)
    assert b"/etc/victim" not in on_strata and b"/fid/sym" not in on_strata
    assert b"/opt/dir1/file" not in on_strata and b"/opt/dir1/new" in on_strata
    assert on_strata[b"/fid/newlink"]["hardlink_group"] == b"/fid/newfile"
    assert on_strata[b"/fid/newnull"]["rdev"] == (1, 3)
    assert on_strata[b"/fid/owned_dir"]["mode"] == oct(0o40700)
    newcap = listing.xattrs_of(on_strata[b"/fid/newcap"])
    assert newcap.get("security.capability") == CAP_NET_BIND_SERVICE_V2

    # strata's save rebuilds each layer from the files it serves (tar-split):
    # the bytes must be exactly what overlay2 saved
    back = tmp_path / "derived-s.tar"
    stack.docker("save", "-o", str(back), derived)
    assert _saved_layer_digests(back) == _saved_layer_digests(from_overlay)


DOCKERFILE = """\
FROM {image}
COPY hello.txt /opt/
RUN rm /etc/victim && rm -rf /opt/dir1 && mkdir /opt/dir1 \\
    && echo new > /opt/dir1/other && echo built > /built.txt
"""


def test_legacy_build_whiteouts_and_opaque_dir(
    stack: harness.Stack, base_image: str, tmp_path: Path
) -> None:
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "hello.txt").write_text("hello from build\n")
    (context / "Dockerfile").write_text(DOCKERFILE.format(image=base_image))
    built = "strata-test/built:1"
    stack.docker(
        "build", "--network", "none", "-t", built, str(context), env={"DOCKER_BUILDKIT": "0"}
    )

    out = sh(
        stack,
        built,
        (
            "test -e /etc/victim || echo victim-gone; test -e /opt/dir1/file || echo file-gone; "
            "ls /opt/dir1; cat /opt/dir1/other /opt/hello.txt /built.txt /opt/keep.txt /etc/motd"
        ),
    )
    assert out == "victim-gone\nfile-gone\nother\nnew\nhello from build\nbuilt\nkept\n" + MOTD
    layers = stack.docker("image", "inspect", "-f", "{{len .RootFS.Layers}}", built).stdout.strip()
    assert layers == "3"  # base + COPY + RUN
    assert graphdriver_name(stack, "image", built) == stack.driver


def test_dockerd_restart_keeps_images_and_containers(stack: harness.Stack, base_image: str) -> None:
    """Stop and start dockerd on the same data root; the plugin keeps running."""
    script = (
        "if test -e /persist; then cat /persist; else echo persisted > /persist; echo first; fi"
    )
    stack.docker("run", "--network", "none", "--name", "keep", base_image, "/bin/sh", "-c", script)
    try:
        assert stack.docker("logs", "keep").stdout == "first\n"
        stack.dockerd.restart()
        assert (
            BASE_IMAGE
            in stack.docker("images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split()
        )
        assert stack.docker("start", "-a", "keep").stdout == "persisted\n"
        assert sh(stack, base_image, "cat /etc/motd") == MOTD
        assert graphdriver_name(stack, "container", "keep") == stack.driver
    finally:
        stack.docker("rm", "-f", "keep", check=False)


def test_plugin_crash_and_restart_under_a_running_container(
    plugin_stack: harness.Stack, base_image: str, tmp_path: Path
) -> None:
    """kill -9 the plugin while a container runs; a restarted plugin serves it without a
    new Init."""
    stack = plugin_stack
    assert stack.plugin is not None
    layers_before = layer_ids_under(stack.dockerd.home)
    running(stack, "live", base_image)
    try:
        stack.docker("exec", "live", "/bin/sh", "-c", "echo before > /tmp/before")
        # nested Get/Put on a mounted container (docs/protocol.md §7, "docker cp / export")
        stack.docker("cp", "live:/tmp/before", str(tmp_path / "copied"))
        assert (tmp_path / "copied").read_text() == "before\n"

        stack.plugin.kill()
        stack.plugin.start()
        assert (
            stack.docker("exec", "live", "cat", "/tmp/before", "/etc/motd").stdout
            == "before\n" + MOTD
        )
        stack.docker("exec", "live", "/bin/sh", "-c", "echo after > /tmp/after")
        changes = sorted(stack.docker("diff", "live").stdout.splitlines())
        assert changes == ["A /tmp/after", "A /tmp/before", "C /tmp"]
        stack.docker("stop", "-t", "1", "live")
        stack.docker("rm", "live")
        assert sh(stack, base_image, "cat /etc/motd") == MOTD
        assert layer_ids_under(stack.dockerd.home) == layers_before

        # a graceful restart under a running container: SIGTERM ends the process with 0
        running(stack, "live", base_image)
        stack.docker("exec", "live", "/bin/sh", "-c", "echo kept > /tmp/kept")
        assert stack.plugin.stop() == 0, stack.plugin.diagnostics()
        stack.plugin.start()
        assert stack.docker("exec", "live", "cat", "/tmp/kept").stdout == "kept\n"
        stack.docker("stop", "-t", "1", "live")
        assert stack.docker("start", "live").returncode == 0
        assert stack.docker("exec", "live", "cat", "/tmp/kept").stdout == "kept\n"
        stack.docker("rm", "-f", "live")
        assert sh(stack, base_image, "echo ok") == "ok\n"
        assert layer_ids_under(stack.dockerd.home) == layers_before
    finally:
        stack.docker("rm", "-f", "live", check=False)


def test_plugin_socket_is_private_and_log_is_clean(plugin_stack: harness.Stack) -> None:
    """Socket mode 0600 (DESIGN.md, security model); no traceback logged by anything above."""
    assert plugin_stack.plugin is not None
    mode = plugin_stack.plugin.socket_path.stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600, oct(mode)
    log = plugin_stack.plugin.log_path.read_text(errors="replace")
    assert "Traceback" not in log, harness.tail(plugin_stack.plugin.log_path, 200)


def test_rm_and_rmi_leave_no_layers(fresh_stack: harness.Stack, rootfs: Rootfs) -> None:
    """After removing every container and image, the driver Home holds no layer."""
    stack = fresh_stack
    stack.docker("import", str(rootfs.tar), BASE_IMAGE)
    stack.docker(
        "run", "--network", "none", "--name", "c1", BASE_IMAGE, "/bin/sh", "-c", "echo x > /x"
    )
    stack.docker("commit", "c1", "strata-test/c1:1")
    stack.docker("create", "--network", "none", "--name", "c2", "strata-test/c1:1", "/bin/true")
    ids = layer_ids_under(stack.dockerd.home)
    # base + commit + (rw, init) for each of two containers: the finder sees them
    assert len(ids) >= 6, (ids, sorted(os.listdir(stack.dockerd.home)))

    stack.docker("rm", "-f", "c1", "c2")
    stack.docker("rmi", "strata-test/c1:1", BASE_IMAGE)
    assert stack.docker("ps", "-aq").stdout == ""
    assert stack.docker("images", "-aq").stdout == ""
    deadline = time.monotonic() + 10  # removal is synchronous, but allow a slow rename-then-delete
    while layer_ids_under(stack.dockerd.home) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert layer_ids_under(stack.dockerd.home) == []
    layers_dir = stack.dockerd.home / "layers"
    if layers_dir.is_dir():
        assert sorted(os.listdir(layers_dir)) == []
    # whatever the layout (trash, staging, mounts), no file of a layer survives
    leftovers = [
        os.path.join(dirpath, name)
        for dirpath, _dirs, files in os.walk(stack.dockerd.home)
        for name in files
        if name in LAYER_CONTENT_NAMES
    ]
    assert leftovers == []
