"""The committed CRI API stubs (``tests/containerd/cri``) are what ``generate.py`` makes
now from the committed stripped ``api.proto``, and keep CRI's gRPC paths."""

from __future__ import annotations

import os

from tests.containerd.cri import generate


def test_committed_stubs_match_a_fresh_generation(tmp_path: str) -> None:
    generate.main(["--out", str(tmp_path)])
    for name in generate.GENERATED:
        with open(os.path.join(str(tmp_path), name), encoding="utf-8") as f:
            fresh = f.read()
        with open(os.path.join(generate.PACKAGE_DIR, name), encoding="utf-8") as f:
            assert fresh == f.read(), (f"{name} differs from a fresh generation: run "
                                       "python -m tests.containerd.cri.generate and commit")


def test_the_stripped_proto_keeps_the_runtime_v1_package() -> None:
    from tests.containerd.cri import api_grpc, api_pb2

    assert api_pb2.DESCRIPTOR.package == "runtime.v1"
    with open(os.path.join(generate.PACKAGE_DIR, generate.PROTO), encoding="utf-8") as f:
        assert "gogo" not in f.read()
    paths = api_grpc.RuntimeServiceStub.__init__.__code__.co_consts
    assert "/runtime.v1.RuntimeService/RunPodSandbox" in paths
