"""A private containerd 1.6 for benchmarks, and an OCI image tar to feed it.

:class:`PrivateContainerd` runs ``containerd`` in its own mount namespace
(``unshare -m``) with a tmpfs on ``/run/containerd`` (1.6 puts shim sockets
there whatever its state dir), its root, state and sockets under a bench
workspace, the CRI plugin off, and strata's snapshotter socket as the
``[proxy_plugins]`` snapshotters (one per strata socket).  ``ctr`` runs inside that namespace
(``nsenter``), so its fifos and the shim's mounts are the same ones.  Stopped by
pid.  tests/containerd has its own launcher for the flow tests (another
branch); this one stays a bench helper until the two are merged.

:func:`oci_image_tar` writes an OCI image layout tar: a busybox-static layer
(``/bin/sh``, ``/bin/true``) and a layer with the given tree.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import tarfile
import time
from pathlib import Path

from plugin.server.serve import socket_answers

IMAGE = "docker.io/library/strata-bench:latest"


class PrivateContainerd:
    def __init__(self, base: Path, proxies: dict[str, str]) -> None:
        self.base = base
        self.address = str(base / "c.sock")
        base.mkdir(parents=True, exist_ok=True)
        config = base / "config.toml"
        config.write_text(f'''version = 2
root = "{base / 'root'}"
state = "{base / 'state'}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{self.address}"
[ttrpc]
  address = "{self.address}.ttrpc"
[proxy_plugins]
''' + "".join(f'  [proxy_plugins."{name}"]\n    type = "snapshot"\n    address = "{sock}"\n'
              for name, sock in proxies.items()))
        self.log = open(base / "containerd.log", "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c",
             "mkdir -p /run/containerd && mount -t tmpfs strata-bench /run/containerd && "
             f"exec containerd --config {config}"], stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 30
        while not socket_answers(self.address):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"containerd did not start: see {base / 'containerd.log'}")
            time.sleep(0.1)

    def ctr(self, *args: str) -> str:
        done = subprocess.run(["nsenter", "-t", str(self.process.pid), "-m", "ctr",
                               "-a", self.address, *args],
                              capture_output=True, text=True, timeout=600, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


def _layer(tree: Path | None) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        if tree is None:
            bin_dir = tarfile.TarInfo("bin")
            bin_dir.type, bin_dir.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(bin_dir)
            tar.add("/bin/busybox", "bin/busybox")
            for name in ("sh", "true", "cat"):
                link = tarfile.TarInfo(f"bin/{name}")
                link.type, link.linkname = tarfile.SYMTYPE, "busybox"
                tar.addfile(link)
        else:
            tar.add(str(tree), tree.name)
    return out.getvalue()


def oci_image_tar(path: Path, tree: Path) -> None:
    """An OCI layout tar of :data:`IMAGE`: busybox, then ``tree``."""
    blobs: dict[str, bytes] = {}

    def blob(data: bytes, media: str) -> dict[str, object]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"mediaType": media, "digest": digest, "size": len(data)}

    layers = [blob(_layer(t), "application/vnd.oci.image.layer.v1.tar") for t in (None, tree)]
    config = blob(json.dumps({
        "architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [str(d["digest"]) for d in layers]},
    }).encode(), "application/vnd.oci.image.config.v1+json")
    manifest = blob(json.dumps({"schemaVersion": 2, "config": config, "layers": layers,
                                "mediaType": "application/vnd.oci.image.manifest.v1+json"}
                               ).encode(), "application/vnd.oci.image.manifest.v1+json")
    manifest["annotations"] = {"io.containerd.image.name": IMAGE,
                               "org.opencontainers.image.ref.name": "latest"}
    index = {"schemaVersion": 2, "manifests": [manifest]}
    with tarfile.open(path, "w") as tar:
        for name, data in [("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'),
                           ("index.json", json.dumps(index).encode())] + [
                (f"blobs/sha256/{d.removeprefix('sha256:')}", b) for d, b in blobs.items()]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
