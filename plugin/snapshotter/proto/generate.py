"""Regenerate the snapshots API stubs from containerd's own ``.proto`` files.

    python -m plugin.snapshotter.proto.generate [--containerd-src DIR] [--out DIR]

Two steps, both deterministic:

1. ``strip``: containerd's ``api/types/mount.proto`` and
   ``api/services/snapshots/v1/snapshots.proto`` (Debian's
   ``golang-github-containerd-containerd-dev`` ships them) minus the gogo
   options, which only steer Go code generation; the proto packages
   (``containerd.types``, ``containerd.services.snapshots.v1``) stay as they are,
   because the gRPC path ``/containerd.services.snapshots.v1.Snapshots/<Method>``
   is built from them.  The stripped files are committed here, so step 2 runs
   without the Go source.
2. ``compile``: grpcio-tools' protoc with grpclib's plugin writes ``*_pb2.py``,
   ``*_pb2.pyi`` and ``snapshots_grpc.py`` (``SnapshotsBase``, ``SnapshotsStub``).

``tests/unit/test_snapshotter_proto.py`` runs both into a temporary directory
and fails when the committed files differ.  The output depends on the protoc
grpcio-tools bundles, which is why pyproject pins grpcio-tools exactly.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Collection
from importlib import resources

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
#: The proto files' directory as an import path: what protoc writes into imports.
PROTO_PATH = "plugin/snapshotter/proto"
DEBIAN_SOURCE = "/usr/share/gocode/src/github.com/containerd/containerd"
#: Committed proto file -> its path in the containerd source tree.
SOURCES = {
    "mount.proto": "api/types/mount.proto",
    "snapshots.proto": "api/services/snapshots/v1/snapshots.proto",
}
GENERATED = ["mount_pb2.py", "mount_pb2.pyi", "snapshots_pb2.py", "snapshots_pb2.pyi",
             "snapshots_grpc.py"]
_MOUNT_IMPORT = 'import "github.com/containerd/containerd/api/types/mount.proto";'


def strip(text: str) -> str:
    """containerd's proto text without gogo (import, field and enum options),
    importing mount.proto from this package instead of containerd's Go path."""
    text = re.sub(r'import weak "gogoproto/gogo\.proto";\n', "", text)
    text = re.sub(r"\s*\[\(gogoproto\.[^\]]*\]", "", text)
    text = re.sub(r"\n\s*option \(gogoproto\.[^;]*;", "", text)
    return text.replace(_MOUNT_IMPORT, f'import "{PROTO_PATH}/mount.proto";')


def write_stripped(containerd_src: str, out_dir: str) -> None:
    for name, source in SOURCES.items():
        with open(os.path.join(containerd_src, source), encoding="utf-8") as f:
            text = strip(f.read())
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            f.write(text)


def compile_protos(proto_dir: str, out_dir: str, *, proto_path: str = PROTO_PATH,
                   sources: Collection[str] = SOURCES,
                   generated: Collection[str] = GENERATED) -> None:
    """Compile ``proto_dir``'s ``sources`` into ``out_dir`` (a tree is laid out under
    a temporary include root so that imports read ``proto_path`` as a package:
    ``plugin.snapshotter.proto`` by default; the tests' CRI stubs use it too)."""
    with tempfile.TemporaryDirectory(prefix="strata-protoc-") as root:
        staged = os.path.join(root, proto_path)
        os.makedirs(staged)
        for name in sources:
            shutil.copyfile(os.path.join(proto_dir, name), os.path.join(staged, name))
        well_known = str(resources.files("grpc_tools") / "_proto")
        env = dict(os.environ)
        # protoc finds protoc-gen-grpclib_python on PATH: grpclib installs it beside python.
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        subprocess.run(
            [sys.executable, "-m", "grpc_tools.protoc", f"-I{root}", f"-I{well_known}",
             f"--python_out={root}", f"--pyi_out={root}", f"--grpclib_python_out={root}",
             *(f"{proto_path}/{name}" for name in sources)],
            check=True, env=env, cwd=root)
        for name in generated:
            shutil.copyfile(os.path.join(staged, name), os.path.join(out_dir, name))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--containerd-src", default=None,
                        help="containerd source tree to strip the protos from (e.g. "
                             f"{DEBIAN_SOURCE}); without it the committed .proto files "
                             "are compiled as they are")
    parser.add_argument("--out", default=PACKAGE_DIR, help="where to write (default: here)")
    args = parser.parse_args(argv)
    proto_dir = PACKAGE_DIR
    if args.containerd_src:
        write_stripped(args.containerd_src, args.out)
        proto_dir = args.out
    compile_protos(proto_dir, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
