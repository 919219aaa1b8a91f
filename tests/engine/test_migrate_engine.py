"""Engine ring: `strata migrate` of a real overlay2 data root to strata and back.

One dockerd on the in-tree overlay2 driver makes the data root (an imported
image with hardlinks, xattrs and devices, a legacy build with whiteouts and an
opaque dir, a 50-layer image, a commit, stopped containers with changes, a
container holding 2 GiB of fallocated files).  What a user sees is recorded
(image and container lists, ``docker diff``, each image's file manifest, each
``docker save``), the root is migrated, and a dockerd on strata's overlay
backend must show the same; then ``--back`` and the same on overlay2.

The kill loop runs on a copy of the root taken before the 2 GiB container: for
every step of the journal, ``strata migrate`` is SIGKILLed there (strata's
fault points), and a rerun must give the same bytes as an unbroken run, and
``--back`` the root as it was.  Once, mid-way, dockerd is started on each
driver and must refuse.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from plugin.faults import MIGRATE_POINTS
from tests.engine import harness
from tests.engine.harness import BASE_IMAGE, Dockerd, Plugin
from tests.engine.listing import tree_listing
from tests.engine.rootfs import Rootfs
from tests.support.plugin import plugin_env, unique_name
from tests.support.procs import HarnessError

pytestmark = pytest.mark.engine

BUILD = """\
FROM {image}
COPY hello.txt /opt/
RUN rm /etc/victim && rm -rf /opt/dir1 && mkdir /opt/dir1 && echo new > /opt/dir1/other \\
    && ln /opt/hello.txt /opt/hello.hard
"""
DEEP_LAYERS = 50
BIG_FILES, BIG_FILE_MIB = 4, 512  # 2 GiB in a container's layer
C1_SCRIPT = ("test -e /new || { echo hello > /new; rm /etc/motd; rm -rf /opt/dir1; "
             "mkdir -p /var/x; ln /new /var/x/hard; }; cat /new")


@dataclass
class Seen:
    """What dockerd shows of a data root."""

    images: list[str] = field(default_factory=list)
    containers: list[str] = field(default_factory=list)
    diffs: dict[str, list[str]] = field(default_factory=dict)
    manifests: dict[str, dict[str, tuple[object, ...]]] = field(default_factory=dict)
    saves: dict[str, dict[str, str]] = field(default_factory=dict)


IMAGES = (BASE_IMAGE, "strata-test/built:1", "strata-test/deep:1", "strata-test/committed:1")


def manifest(dockerd: Dockerd, image: str, where: Path) -> dict[str, tuple[object, ...]]:
    """Every file of the image as `docker export` streams it (times left out)."""
    cid = dockerd.docker("create", image, "/bin/true").stdout.strip()
    path = where / "export.tar"
    try:
        dockerd.docker("export", "-o", str(path), cid, timeout=300)
        files: dict[str, tuple[object, ...]] = {}
        with tarfile.open(path) as tf:
            for m in tf:
                data = tf.extractfile(m).read() if m.isreg() else b""  # type: ignore[union-attr]
                xattrs = sorted((k, v) for k, v in m.pax_headers.items() if "xattr" in k)
                files[m.name] = (m.type, m.mode, m.uid, m.gid, m.size, m.linkname,
                                 hashlib.sha256(data).hexdigest(), tuple(xattrs))
        return files
    finally:
        path.unlink(missing_ok=True)
        dockerd.docker("rm", cid)


def save_digests(dockerd: Dockerd, image: str, where: Path) -> dict[str, str]:
    """sha256 of every file `docker save` writes (each layer.tar among them)."""
    path = where / "save.tar"
    dockerd.docker("save", "-o", str(path), image, timeout=300)
    try:
        with tarfile.open(path) as tf:
            return {m.name: hashlib.sha256(tf.extractfile(m).read()).hexdigest()  # type: ignore[union-attr]
                    for m in tf if m.isreg()}
    finally:
        path.unlink()


def observe(dockerd: Dockerd, where: Path, *, contents: bool = True) -> Seen:
    seen = Seen()
    seen.images = sorted(dockerd.docker(
        "images", "--format", "{{.Repository}}:{{.Tag}} {{.ID}}").stdout.split("\n"))
    seen.containers = sorted(dockerd.docker(
        "ps", "-a", "--no-trunc", "--format", "{{.ID}} {{.Names}} {{.Image}} {{.Command}}"
    ).stdout.split("\n"))
    for line in filter(None, seen.containers):
        name = line.split()[1]
        seen.diffs[name] = sorted(dockerd.docker("diff", name).stdout.split("\n"))
    if contents:
        for image in IMAGES:
            seen.manifests[image] = manifest(dockerd, image, where)
            seen.saves[image] = save_digests(dockerd, image, where)
    return seen


def populate(dockerd: Dockerd, rootfs: Rootfs, where: Path) -> None:
    dockerd.docker("import", str(rootfs.tar), BASE_IMAGE)
    ctx = where / "ctx"
    ctx.mkdir()
    (ctx / "hello.txt").write_text("hello from build\n")
    (ctx / "Dockerfile").write_text(BUILD.format(image=BASE_IMAGE))
    env = {"DOCKER_BUILDKIT": "0"}
    dockerd.docker("build", "--network", "none", "-t", IMAGES[1], str(ctx), env=env)
    deep = where / "deep"
    deep.mkdir()
    lines = [f"FROM {BASE_IMAGE}"]
    for i in range(DEEP_LAYERS - 1):
        (deep / f"f{i}").write_text(f"layer {i}\n")
        lines.append(f"COPY f{i} /deep/f{i}")
    (deep / "Dockerfile").write_text("\n".join(lines) + "\n")
    dockerd.docker("build", "-t", IMAGES[2], str(deep), env=env, timeout=600)
    dockerd.docker("run", "--network", "none", "--name", "to-commit", BASE_IMAGE, "/bin/sh",
                   "-c", "rm /fid/hl_b; echo committed > /fid/new; mkdir /etc/sub")
    dockerd.docker("commit", "to-commit", IMAGES[3])
    dockerd.docker("run", "--network", "none", "--name", "c1", IMAGES[1], "/bin/sh", "-c",
                   C1_SCRIPT)
    dockerd.docker("create", "--network", "none", "--name", "c2", IMAGES[2],
                   "cat", "/deep/f48")


def migrate(root: Path, *args: str, faults: str = "") -> subprocess.CompletedProcess[str]:
    env = plugin_env()
    env.pop("STRATA_FAULTS", None)
    if faults:
        env["STRATA_FAULTS"] = faults
    return subprocess.run([sys.executable, "-m", "plugin", "migrate", "--data-root", str(root),
                           "--from", "overlay2", *args], capture_output=True, text=True,
                          env=env, timeout=600, check=False)


def root_state(root: Path) -> dict[bytes, dict[str, object]]:
    """The whole data root, as comparable data: a rewritten record compares by its JSON."""
    state = tree_listing(os.fsencode(root))
    for path, item in state.items():
        if path.endswith((b"/config.v2.json", b"/meta.json")):
            item.pop("mtime", None)
            item["sha256"] = json.dumps(json.loads((root / os.fsdecode(path[1:])).read_bytes()),
                                        sort_keys=True)
            item.pop("size", None)
    return state


#: What a daemon that starts on a data root and refuses it may still write there: the
#: databases of the containerd dockerd runs under it, and BuildKit's.
DAEMON_STATE = (b"/containerd/", b"/buildkit/")


def daemon_writes(before: dict[bytes, dict[str, object]],
                  after: dict[bytes, dict[str, object]]) -> set[bytes]:
    """The paths that changed between two states; each must be a daemon's own state."""
    changed = {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}
    strays = sorted(p for p in changed if not p.startswith(DAEMON_STATE))
    assert not strays, f"a refusing daemon changed the data root outside its own state: {strays}"
    return changed


def without(state: dict[bytes, dict[str, object]], paths: set[bytes]) -> dict[bytes, object]:
    return {p: item for p, item in state.items() if p not in paths}


@dataclass
class Fixture:
    workdir: Path
    seen: Seen
    pristine: Path  # the root before the 2 GiB container: the kill loop's input
    big_bytes: int


@pytest.fixture(scope="module")
def made(dockerd_bin: str, rootfs: Rootfs) -> Iterator[Fixture]:
    with open("/proc/filesystems") as f:
        if "overlay" not in f.read().split():
            pytest.skip("kernel has no overlayfs: no overlay2 data root to migrate")
    workdir = harness.new_workdir()
    dockerd = Dockerd(driver="overlay2", workdir=workdir, dockerd_bin=dockerd_bin)
    try:
        dockerd.start()
        populate(dockerd, rootfs, workdir)
        dockerd.stop()
        pristine = workdir / "pristine"
        subprocess.run(["cp", "-a", str(dockerd.data_root), str(pristine)], check=True)
        dockerd.start()
        script = "; ".join(f"fallocate -l {BIG_FILE_MIB}m /big{i}" for i in range(BIG_FILES))
        dockerd.docker("run", "--network", "none", "--name", "big", BASE_IMAGE, "/bin/sh",
                       "-c", script)
        seen = observe(dockerd, workdir)
        dockerd.stop()
        du = subprocess.run(["du", "-s", "--block-size=1", str(dockerd.data_root)],
                            capture_output=True, text=True, check=True)
        assert int(du.stdout.split()[0]) >= BIG_FILES * BIG_FILE_MIB << 20, du.stdout
        yield Fixture(workdir, seen, pristine, BIG_FILES * BIG_FILE_MIB << 20)
    finally:
        dockerd.stop()
        harness.remove_workdir(workdir)


def start_strata(workdir: Path, dockerd_bin: str, name: str) -> tuple[Plugin, Dockerd]:
    plugin = Plugin(name=name, backend="overlay", state_dir=workdir / f"state-{name}",
                    log_path=workdir / f"plugin-{name}.log")
    plugin.start()
    dockerd = Dockerd(driver=name, workdir=workdir, dockerd_bin=dockerd_bin)
    dockerd.extra_logs.append(plugin.diagnostics)
    try:
        dockerd.start()
    except BaseException:
        plugin.close()
        raise
    return plugin, dockerd


def check_same(dockerd: Dockerd, before: Seen, where: Path) -> None:
    now = observe(dockerd, where)
    assert now.images == before.images
    assert now.containers == before.containers
    assert now.diffs == before.diffs
    assert any(line.startswith("D /etc/motd") for line in now.diffs["c1"])
    for image in IMAGES:
        assert now.manifests[image] == before.manifests[image], image
        assert now.saves[image] == before.saves[image], image
    assert len(now.manifests[IMAGES[2]]) > len(now.manifests[BASE_IMAGE])
    out = dockerd.docker("start", "-a", "c1").stdout
    assert out == "hello\n"
    assert dockerd.docker("start", "-a", "c2").stdout == "layer 48\n"
    assert now.diffs == observe(dockerd, where, contents=False).diffs


def test_migrate_there_and_back(made: Fixture, dockerd_bin: str) -> None:
    root = made.workdir / "root"
    name = unique_name("strata-m")
    dry = migrate(root, "--to", name, "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert f"-> {name}" in dry.stdout and "refused" not in dry.stdout
    assert (root / "overlay2").is_dir() and not (root / name).exists()

    started = time.monotonic()
    there = migrate(root, "--to", name)
    took = time.monotonic() - started
    assert there.returncode == 0, there.stdout + there.stderr
    print(f"\nmigrated a data root with {made.big_bytes / 2**30:.1f} GiB in one container "
          f"layer to strata in {took:.2f}s (process included): {there.stdout.strip()}")
    assert not (root / "overlay2").exists() and not (root / "image/overlay2").exists()
    assert took < 60, "renames, not copies: a 2 GiB root must not take a minute"

    plugin, dockerd = start_strata(made.workdir, dockerd_bin, name)
    try:
        assert dockerd.docker("info", "--format", "{{.Driver}}").stdout.strip() == name
        check_same(dockerd, made.seen, made.workdir)
    finally:
        dockerd.stop()
        plugin.close()

    back = migrate(root, "--to", name, "--back")
    assert back.returncode == 0, back.stdout + back.stderr
    assert not (root / name).exists() and not (root / f"image/{name}").exists()
    dockerd = Dockerd(driver="overlay2", workdir=made.workdir, dockerd_bin=dockerd_bin)
    try:
        dockerd.start()
        check_same(dockerd, made.seen, made.workdir)
    finally:
        dockerd.stop()


def fresh_copy(pristine: Path, workdir: Path) -> Path:
    root = workdir / "root"
    subprocess.run(["cp", "-a", str(pristine), str(root)], check=True)
    return root


def refuses_to_start(dockerd: Dockerd) -> str:
    """Start dockerd on a half-migrated root; return its log if it exits on its own."""
    try:
        dockerd.start(timeout=60)
    except HarnessError as e:
        dockerd.proc = None
        return str(e)
    dockerd.stop()
    raise AssertionError(f"dockerd on {dockerd.driver} started on a half-migrated root")


def check_refused_mid_way(root: Path, workdir: Path, dockerd_bin: str, name: str) -> None:
    on_overlay2 = Dockerd(driver="overlay2", workdir=workdir, dockerd_bin=dockerd_bin)
    assert "error initializing graphdriver" in refuses_to_start(on_overlay2)
    plugin = Plugin(name=name, backend="overlay", state_dir=workdir / "state",
                    log_path=workdir / "plugin.log")
    plugin.start()
    try:
        on_strata = Dockerd(driver=name, workdir=workdir, dockerd_bin=dockerd_bin)
        assert "strata migrate" in refuses_to_start(on_strata)
    finally:
        plugin.close()
    # neither daemon made image metadata of its own (the rerun's end state is checked whole)
    assert sorted(p.name for p in (root / "image").iterdir()) == ["overlay2"]


def test_kill_at_every_step_then_rerun_or_back(made: Fixture, dockerd_bin: str) -> None:
    name = unique_name("strata-k")
    with_reference = harness.new_workdir()
    try:
        root = fresh_copy(made.pristine, with_reference)
        before = root_state(root)
        done = migrate(root, "--to", name)
        assert done.returncode == 0, done.stdout + done.stderr
        after = root_state(root)
    finally:
        harness.remove_workdir(with_reference)
    assert before != after
    for point in MIGRATE_POINTS:
        for finish in ((), ("--back",)):
            workdir = harness.new_workdir()
            try:
                root = fresh_copy(made.pristine, workdir)
                killed = migrate(root, "--to", name, faults=f"{point}=kill")
                assert killed.returncode == -9, (point, killed.stdout, killed.stderr)
                touched: set[bytes] = set()
                if point == "migrate.layer" and not finish:
                    mid_way = root_state(root)
                    check_refused_mid_way(root, workdir, dockerd_bin, name)
                    touched = daemon_writes(mid_way, root_state(root))
                rerun = migrate(root, "--to", name, *finish)
                assert rerun.returncode == 0, (point, finish, rerun.stdout, rerun.stderr)
                expected = before if finish else after
                assert without(root_state(root), touched) == without(expected, touched), \
                    (point, finish)
            finally:
                harness.remove_workdir(workdir)
