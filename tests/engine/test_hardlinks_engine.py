"""Engine ring: a build step or a container that links to, or appends to, a file of a
lower layer makes the same layer tar on strata as on dockerd's in-tree overlay2.

``ln /data/lower_file /data/new`` on overlay2 copies the lower file up, so the
layer carries both names as a hardlink pair; ``echo >> /data/mod/file.txt``
copies ``data/mod/`` up with its lower mtime, and the kernel restores that mtime
after copying the file into it.  The lower layer is built once on strata and
loaded into overlay2 (same image id), the step runs on each, and the top layer
tars of ``docker save`` are compared entry by entry: names in order, types,
hardlink targets, modes, owners, sizes, contents, mtimes, pax records (xattrs).
"""

from __future__ import annotations

import io
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.engine import harness, listing
from tests.engine.rootfs import CAP_NET_BIND_SERVICE_V2

pytestmark = pytest.mark.engine

LOWER_IMAGE = "strata-test/hl-lower:1"
STEP = "ln /data/lower_file /data/new && echo appended >> /data/mod/file.txt"
#: Fixed mtimes of the lower layer's entries, so a copy-up that keeps or loses
#: one is seen: neither is near the time a test runs.
LOWER_MTIMES = {"data": 1_500_000_000, "data/lower_file": 1_500_000_100,
                "data/mod": 1_500_000_200, "data/mod/file.txt": 1_500_000_300}
#: Entries the step itself writes: their mtime is the moment the step ran.
STEP_WRITES = {"data", "data/mod/file.txt"}  # tarfile drops a directory's "/"
Entries = list[tuple[str, dict[str, object]]]


def _lower_tar(path: Path) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, mtime in LOWER_MTIMES.items():
            info = tarfile.TarInfo(name)
            info.mtime = mtime
            body = b""
            if name == "data/lower_file":
                body = b"lower\n"
                info.mode, info.uid, info.gid = 0o640, 1000, 1000
                # security.capability only: overlay2's exporter drops every other
                # xattr, which strata keeps by design (plugin/archive/writer.py).
                info.pax_headers = {"SCHILY.xattr.security.capability":
                                    CAP_NET_BIND_SERVICE_V2.decode("utf-8", "surrogateescape")}
            elif name == "data/mod/file.txt":
                body = b"first\n"
            else:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))


def _build(engine: harness.Stack | harness.Dockerd, context: Path, dockerfile: str,
           tag: str) -> None:
    context.mkdir(exist_ok=True)
    (context / "Dockerfile").write_text(dockerfile)
    engine.docker("build", "--network", "none", "-t", tag, str(context),
                  env={"DOCKER_BUILDKIT": "0"})


def _image_id(engine: harness.Stack | harness.Dockerd, ref: str) -> str:
    return engine.docker("image", "inspect", "-f", "{{.Id}}", ref).stdout.strip()


@pytest.fixture(scope="module")
def lower_image(stack: harness.Stack, base_image: str, overlay2: harness.Dockerd,
                tmp_path_factory: pytest.TempPathFactory) -> str:
    """The lower layer, built on strata and loaded into overlay2: the same image on both."""
    work = tmp_path_factory.mktemp("hl-lower")
    context = work / "ctx"
    context.mkdir()
    _lower_tar(context / "lower.tar")
    _build(stack, context, f"FROM {base_image}\nADD lower.tar /\n", LOWER_IMAGE)
    stack.docker("save", "-o", str(work / "lower.tar"), LOWER_IMAGE)
    overlay2.docker("load", "-i", str(work / "lower.tar"))
    assert _image_id(stack, LOWER_IMAGE) == _image_id(overlay2, LOWER_IMAGE)
    return LOWER_IMAGE


def _top_layer(engine: harness.Stack | harness.Dockerd, ref: str, archive: Path) -> Entries:
    engine.docker("save", "-o", str(archive), ref)
    return listing.saved_layer_entries(archive)


def _comparable(entries: Entries, window: tuple[float, float], xattrs: bool) -> Entries:
    """``entries`` with each mtime the step set replaced by whether it lies in the
    step's ``window``; without ``xattrs`` (zfs-fuse) their pax records are dropped."""
    out: Entries = []
    for name, item in entries:
        item = dict(item)
        if name in STEP_WRITES:
            mtime = item["mtime"]
            assert isinstance(mtime, int)
            item["mtime"] = f"within the step: {window[0] - 1 <= mtime <= window[1] + 1}"
        if not xattrs:
            pax = item["pax"]
            assert isinstance(pax, dict)
            item["pax"] = {k: v for k, v in pax.items() if not k.startswith("SCHILY.xattr.")}
        out.append((name, item))
    return out


def _assert_same_layer(stack: harness.Stack, overlay2: harness.Dockerd, ref: str,
                       tmp_path: Path, window: tuple[float, float], xattrs: bool) -> None:
    """The top layer of ``ref`` on strata is overlay2's, entry by entry."""
    theirs = _top_layer(overlay2, ref, tmp_path / "overlay2.tar")
    ours = _top_layer(stack, ref, tmp_path / "strata.tar")
    by_name = dict(theirs)
    # What the reference itself shows, so that equality below says something.
    assert [name for name, _ in theirs] == [
        "data", "data/lower_file", "data/mod", "data/mod/file.txt", "data/new"], theirs
    assert by_name["data/new"]["linkname"] == "data/lower_file"
    assert by_name["data/mod"]["mtime"] == LOWER_MTIMES["data/mod"]
    assert by_name["data/lower_file"]["mtime"] == LOWER_MTIMES["data/lower_file"]
    expected = _comparable(theirs, window, xattrs)
    got = _comparable(ours, window, xattrs)
    problems = [f"overlay2: {a}\nstrata:   {b}" for a, b in zip(expected, got, strict=False)
                if a != b]
    assert not problems and len(expected) == len(got), (
        "\n".join(problems) + f"\noverlay2 {len(expected)} entries, strata {len(got)}")


def _on_both(run: Callable[[harness.Stack | harness.Dockerd], None], stack: harness.Stack,
             overlay2: harness.Dockerd) -> tuple[float, float]:
    """Run the step on both engines; the window of time in which it ran."""
    start = time.time()
    run(overlay2)
    run(stack)
    return start, time.time()


def _keeps_xattrs(backend: str) -> bool:
    # zfs-fuse keeps no xattrs (ENOTSUP, shared/reference/host.md §3): a zfs layer
    # holds none to put in its tar, so they are the one thing not compared there.
    return backend != "zfs"


def test_commit_of_a_link_to_a_lower_file(
    stack: harness.Stack, overlay2: harness.Dockerd, lower_image: str, backend: str,
    tmp_path: Path
) -> None:
    """docker run (ln + append), docker diff, docker commit, docker save."""
    committed = "strata-test/hl-commit:1"

    def run(engine: harness.Stack | harness.Dockerd) -> None:
        engine.docker("run", "--network", "none", "--name", "hl", lower_image,
                      "/bin/sh", "-c", STEP)

    try:
        window = _on_both(run, stack, overlay2)
        theirs = overlay2.docker("diff", "hl").stdout.splitlines()
        ours = stack.docker("diff", "hl").stdout.splitlines()
        # overlay2's Changes in docker 20.10 compares the two mounts (ChangesDirs): the
        # linked-to name is no change there, though its Diff carries it.
        assert sorted(theirs) == [
            "A /data/new", "C /data", "C /data/mod", "C /data/mod/file.txt"], theirs
        assert sorted(ours) == sorted(theirs)
        for engine in (overlay2, stack):
            engine.docker("commit", "hl", committed)
    finally:
        for engine in (overlay2, stack):
            engine.docker("rm", "-f", "hl", check=False)
    _assert_same_layer(stack, overlay2, committed, tmp_path, window, _keeps_xattrs(backend))


def test_legacy_build_of_a_link_to_a_lower_file(
    stack: harness.Stack, overlay2: harness.Dockerd, lower_image: str, backend: str,
    tmp_path: Path
) -> None:
    """DOCKER_BUILDKIT=0 docker build with the step as a RUN, docker save."""
    built = "strata-test/hl-built:1"

    def run(engine: harness.Stack | harness.Dockerd) -> None:
        name = "overlay2" if isinstance(engine, harness.Dockerd) else "strata"
        _build(engine, tmp_path / f"ctx-{name}", f"FROM {lower_image}\nRUN {STEP}\n", built)

    window = _on_both(run, stack, overlay2)
    _assert_same_layer(stack, overlay2, built, tmp_path, window, _keeps_xattrs(backend))
