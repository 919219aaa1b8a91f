"""Regenerate the CRI API stubs from kubernetes/cri-api's ``api.proto``.

    python -m tests.containerd.cri.generate [--cri-api-git DIR [--tag TAG]] [--out DIR]

As ``plugin/snapshotter/proto/generate.py`` does for containerd's snapshots API:

1. ``strip`` (with ``--cri-api-git``): ``pkg/apis/runtime/v1/api.proto`` at ``--tag`` of a
   kubernetes/cri-api clone (a bare one will do), minus the gogo import and options, which
   only steer Go code generation.  ``package runtime.v1`` stays: the gRPC paths
   (``/runtime.v1.RuntimeService/RunPodSandbox``) are built from it.  The stripped file
   is committed here, so step 2 runs without the clone.
2. ``compile``: grpcio-tools' protoc with grpclib's plugin writes ``api_pb2.py``,
   ``api_pb2.pyi`` and ``api_grpc.py`` (``RuntimeServiceStub``, ``ImageServiceStub``).

The tag is the cri-api containerd 1.6.20 serves: its binary registers exactly the v1
RPCs of cri-api v0.25 (``CheckpointContainer`` and ``GetContainerEvents``, none of
v0.26's ``ListMetricDescriptors``), and ``api.proto`` is the same in every v0.25.x.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

from plugin.snapshotter.proto.generate import compile_protos

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
#: The proto's directory as an import path: what protoc writes into the imports.
PROTO_PATH = "tests/containerd/cri"
PROTO = "api.proto"
UPSTREAM_PATH = "pkg/apis/runtime/v1/api.proto"
TAG = "v0.25.0"
GENERATED = ["api_pb2.py", "api_pb2.pyi", "api_grpc.py"]


def strip(text: str) -> str:
    """cri-api's proto text without gogo (its import and its file options)."""
    text = re.sub(r'import "github\.com/gogo/protobuf/gogoproto/gogo\.proto";\n', "", text)
    text = re.sub(r"\s*\[\(gogoproto\.[^\]]*\]", "", text)
    return re.sub(r"\noption \(gogoproto\.[^;]*;", "", text)


def upstream_proto(git_dir: str, tag: str) -> str:
    return subprocess.run(["git", "-C", git_dir, "show", f"{tag}:{UPSTREAM_PATH}"],
                          capture_output=True, text=True, check=True).stdout


def compile_proto(proto_dir: str, out_dir: str) -> None:
    """Compile ``proto_dir/api.proto`` into ``out_dir``, laid out under a temporary
    include root so that the generated imports read ``tests.containerd.cri``."""
    compile_protos(proto_dir, out_dir, proto_path=PROTO_PATH, sources=[PROTO],
                   generated=GENERATED)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cri-api-git", default=None,
                        help="a kubernetes/cri-api clone to strip api.proto from; without "
                             "it the committed api.proto is compiled as it is")
    parser.add_argument("--tag", default=TAG, help=f"the cri-api tag (default {TAG})")
    parser.add_argument("--out", default=PACKAGE_DIR, help="where to write (default: here)")
    args = parser.parse_args(argv)
    proto_dir = PACKAGE_DIR
    if args.cri_api_git:
        with open(os.path.join(args.out, PROTO), "w", encoding="utf-8") as f:
            f.write(strip(upstream_proto(args.cri_api_git, args.tag)))
        proto_dir = args.out
    compile_proto(proto_dir, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
