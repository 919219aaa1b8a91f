"""The committed snapshots API stubs are what ``generate.py`` makes now: from the
committed stripped protos always, and from containerd's own protos when its
source is installed (Debian's golang-github-containerd-containerd-dev)."""

from __future__ import annotations

import os

import pytest

from plugin.snapshotter.proto import generate


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def test_committed_stubs_match_a_fresh_generation(tmp_path: str) -> None:
    generate.main(["--out", str(tmp_path)])
    for name in generate.GENERATED:
        fresh = read(os.path.join(str(tmp_path), name))
        assert fresh == read(os.path.join(generate.PACKAGE_DIR, name)), (
            f"{name} differs from a fresh generation: run python -m "
            "plugin.snapshotter.proto.generate and commit the result")


def test_committed_protos_are_containerds_stripped(tmp_path: str) -> None:
    if not os.path.isdir(os.path.join(generate.DEBIAN_SOURCE, "api")):
        pytest.skip("containerd source absent "
                    "(apt-get install golang-github-containerd-containerd-dev)")
    generate.write_stripped(generate.DEBIAN_SOURCE, str(tmp_path))
    for name in generate.SOURCES:
        stripped = read(os.path.join(str(tmp_path), name))
        assert "gogo" not in stripped
        assert stripped == read(os.path.join(generate.PACKAGE_DIR, name))


def test_the_service_path_keeps_containerds_package() -> None:
    from plugin.snapshotter.proto import snapshots_grpc, snapshots_pb2

    assert snapshots_pb2.DESCRIPTOR.package == "containerd.services.snapshots.v1"
    handlers = snapshots_grpc.SnapshotsStub.__init__.__code__.co_consts
    assert "/containerd.services.snapshots.v1.Snapshots/Prepare" in handlers
