"""Engine ring, overlay only: what Docker's own overlay2 cannot do, and what it
must agree with.

* a legacy (``DOCKER_BUILDKIT=0``) build as deep as dockerd itself allows:
  dockerd 20.10's layer store refuses any image chain past 125 layers
  (``maxLayerDepth = 125`` in moby ``layer/layer_store.go``, "max depth
  exceeded", whatever the driver), so a 130-step build cannot succeed on any
  driver of this engine.  The test builds the 125-layer maximum, runs on it,
  and checks that the 126th step is refused by dockerd, not by strata.  The
  500-lower chain the backend supports is proven in
  ``tests/unit/test_overlay_depth.py``;
* the same build on strata-overlay and on overlay2 saves layer tars with the
  same entries, modes, owners, xattrs, whiteouts and link targets;
* ``docker info`` shows the overlay probes.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from tests.engine import harness
from tests.engine.harness import BASE_IMAGE
from tests.engine.rootfs import Rootfs

pytestmark = pytest.mark.engine

DOCKERD_MAX_LAYERS = 125  # moby layer/layer_store.go maxLayerDepth
DEEP_STEPS = DOCKERD_MAX_LAYERS - 1  # RUN steps on the base: the deepest image dockerd builds


@pytest.fixture(scope="module")
def backend() -> str:
    """This module runs on the overlay backend only (overrides conftest's params)."""
    return "overlay"


@pytest.fixture(scope="module")
def overlay_stack(stack: harness.Stack) -> harness.Stack:
    if stack.plugin is None:
        pytest.skip("runs the strata overlay backend, not an in-tree driver")
    return stack


def build(engine: harness.Stack | harness.Dockerd, context: Path, tag: str) -> None:
    engine.docker("build", "--network", "none", "-t", tag, str(context),
                  env={"DOCKER_BUILDKIT": "0"}, timeout=600)


def driver_status(engine: harness.Stack | harness.Dockerd) -> dict[str, str]:
    rows = json.loads(engine.docker("info", "--format", "{{json .DriverStatus}}").stdout)
    return {key: value for key, value in rows}


def test_status_shows_the_probes(overlay_stack: harness.Stack) -> None:
    status = driver_status(overlay_stack)
    assert status["Backend"] == "overlay"
    assert status["Supports d_type"] == "true"
    assert status["Native Overlay Diff"] == "true"
    assert status["Mount API"] in ("fsopen/fsconfig lowerdir+", "mount(2), relative lowerdirs")
    assert int(status["Max Depth"]) >= 129
    assert status["Backing Filesystem"]


def test_legacy_build_as_deep_as_dockerd_allows(
    overlay_stack: harness.Stack, base_image: str, tmp_path: Path
) -> None:
    stack = overlay_stack
    context = tmp_path / "deep"
    context.mkdir()
    steps = "".join(f"RUN echo {n} > /f{n}\n" for n in range(DEEP_STEPS))
    (context / "Dockerfile").write_text(f"FROM {base_image}\n{steps}")
    deep = "strata-test/deep:1"
    build(stack, context, deep)
    layers = stack.docker("image", "inspect", "-f", "{{len .RootFS.Layers}}", deep).stdout
    assert int(layers) == DOCKERD_MAX_LAYERS
    # a container on it stacks init + 125 image layers under its upper dir
    out = stack.docker("run", "--rm", "--network", "none", deep, "/bin/sh", "-c",
                       f"cat /f0 /f{DEEP_STEPS // 2} /f{DEEP_STEPS - 1}").stdout
    assert out.split() == ["0", str(DEEP_STEPS // 2), str(DEEP_STEPS - 1)]

    # one more layer: dockerd's own layer store refuses, before asking the driver
    more = tmp_path / "more"
    more.mkdir()
    (more / "Dockerfile").write_text(f"FROM {deep}\nRUN echo one-more > /more\n")
    refused = stack.docker("build", "--network", "none", "--force-rm", "-t",
                           "strata-test/deeper:1", str(more),
                           env={"DOCKER_BUILDKIT": "0"}, check=False, timeout=300)
    assert refused.returncode != 0 and "max depth exceeded" in refused.stderr, refused
    # every driver call succeeded (dockerd drops the Diff stream it no longer wants,
    # which the server logs as an aborted stream, not as a failed call)
    assert stack.plugin is not None
    calls = [line for line in stack.plugin.log_path.read_text(errors="replace").splitlines()
             if "strata.server: GraphDriver." in line]
    assert calls and all(line.endswith(" ok") for line in calls), [
        line for line in calls if not line.endswith(" ok")]
    stack.docker("rmi", deep)


COMPARE_DOCKERFILE = """\
FROM {image}
COPY hello.txt /opt/
RUN rm /etc/victim && rm -rf /opt/dir1 && mkdir /opt/dir1 && echo new > /opt/dir1/other \
 && echo built > /built.txt
RUN chmod 600 /etc/motd && chown 1000:1000 /opt/keep.txt && ln /built.txt /built.hl \
 && ln -s /etc/passwd /pw && mkfifo /fifo && mknod /null2 c 1 3 && rm /fid/sym \
 && mkdir -p /a/b/c && echo x > /a/b/c/d && chmod 2750 /a/b && rm /fid/hl_b \
 && echo more >> /fid/owned && chmod 711 /fid/owned_dir
RUN rm -rf /a/b && rm /built.hl && touch /opt/dir1/third
"""


def layer_entries(archive: Path) -> list[list[tuple[object, ...]]]:
    """Each saved layer's tar entries, bottom first, without times (they differ per build)."""
    out: list[list[tuple[object, ...]]] = []
    with tarfile.open(archive) as outer:
        manifest = outer.extractfile("manifest.json")
        assert manifest is not None
        for name in json.load(manifest)[0]["Layers"]:
            member = outer.extractfile(name)
            assert member is not None
            with tarfile.open(fileobj=member) as layer:
                out.append([
                    (m.name, m.type, oct(m.mode), m.uid, m.gid, m.linkname, m.size,
                     m.devmajor, m.devminor,
                     tuple(sorted((k, v) for k, v in m.pax_headers.items()
                                  if k.startswith("SCHILY.xattr."))))
                    for m in layer.getmembers()
                ])
    return out


def test_saved_layers_match_overlay2(
    overlay_stack: harness.Stack, base_image: str, overlay2: harness.Dockerd,
    rootfs: Rootfs, tmp_path: Path
) -> None:
    """Same base, same legacy build on both stores: `docker save` layer tars agree."""
    overlay2.docker("import", str(rootfs.tar), BASE_IMAGE)
    context = tmp_path / "cmp"
    context.mkdir()
    (context / "hello.txt").write_text("hello from build\n")
    (context / "Dockerfile").write_text(COMPARE_DOCKERFILE.format(image=base_image))
    tag = "strata-test/compare:1"
    saved = {}
    for label, engine in (("strata", overlay_stack), ("overlay2", overlay2)):
        build(engine, context, tag)
        saved[label] = tmp_path / f"{label}.tar"
        engine.docker("save", "-o", str(saved[label]), tag)
    ours, theirs = layer_entries(saved["strata"]), layer_entries(saved["overlay2"])
    assert len(ours) == len(theirs) == 5
    for index, (mine, reference) in enumerate(zip(ours, theirs, strict=True)):
        assert mine == reference, f"layer {index} differs from overlay2's"
    names = {entry[0] for layer in ours for entry in layer}
    assert {"etc/.wh.victim", "opt/dir1/.wh..wh..opq", "fid/.wh.sym", "a/.wh.b"} <= names
