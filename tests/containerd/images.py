"""Images for the containerd ring, built here in Python (no registry): ``docker save`` tars.

Two images share their first layer, the busybox root file system of the engine tests
(``tests/engine/rootfs.py``):

* ``BUSYBOX``: that one layer;
* ``TWO``: a second layer on it with a file (``/hello.txt``), a whiteout
  (``etc/.wh.victim`` deletes ``/etc/victim``) and an opaque directory
  (``opt/.wh..wh..opq`` hides everything the first layer had under ``/opt``).

``ctr images import`` reads ``manifest.json`` (RepoTags, Config, Layers) as ``docker
save`` writes it, stores each layer as an uncompressed blob and, with ``--snapshotter``,
unpacks it: a Prepare and a Commit per layer, named by chain id.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

from tests.engine.rootfs import Rootfs, build_rootfs_tar
from tests.support.files import sha256_file

BUSYBOX = "docker.io/strata/busybox:1"
TWO = "docker.io/strata/two:1"

HELLO = b"layer two\n"
OPAQUE_NEW = b"only file left in /opt\n"


@dataclass(frozen=True)
class Image:
    ref: str
    diff_ids: tuple[str, ...]  # "sha256:<hex>" per layer, bottom first

    @property
    def chain_ids(self) -> tuple[str, ...]:
        """The snapshot names containerd unpacks into (OCI image spec, "ChainID")."""
        chain: list[str] = []
        for diff_id in self.diff_ids:
            if not chain:
                chain.append(diff_id)
            else:
                chain.append("sha256:" + hashlib.sha256(
                    f"{chain[-1]} {diff_id}".encode()).hexdigest())
        return tuple(chain)


@dataclass(frozen=True)
class ImageSet:
    tar: Path  # one docker-save tar holding both images
    rootfs: Rootfs
    busybox: Image
    two: Image


def second_layer() -> bytes:
    """``/hello.txt``, a whiteout of ``/etc/victim`` and an opaque ``/opt``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in (("hello.txt", HELLO), ("etc/", None), ("etc/.wh.victim", b""),
                           ("opt/", None), ("opt/.wh..wh..opq", b""),
                           ("opt/new.txt", OPAQUE_NEW)):
            info = tarfile.TarInfo(name.rstrip("/"))
            info.mtime = 1_700_000_000
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _config(diff_ids: list[str]) -> bytes:
    return json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": f"strata test layer {i}"} for i in range(len(diff_ids))],
    }, sort_keys=True).encode()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
    tf.addfile(info, io.BytesIO(data))


def build_images(workdir: Path) -> ImageSet:
    """Write ``workdir/images.tar`` (docker save format) with both images."""
    rootfs = build_rootfs_tar(workdir)
    layer1 = rootfs.tar.read_bytes()
    layer2 = second_layer()
    ids = ["sha256:" + sha256_file(rootfs.tar), "sha256:" + hashlib.sha256(layer2).hexdigest()]
    manifest = []
    tar_path = workdir / "images.tar"
    with tarfile.open(tar_path, "w") as tf:
        for diff_id, data in zip(ids, (layer1, layer2), strict=True):
            _add(tf, f"{diff_id[7:]}/layer.tar", data)
        for ref, n in ((BUSYBOX, 1), (TWO, 2)):
            config = _config(ids[:n])
            config_name = hashlib.sha256(config).hexdigest() + ".json"
            _add(tf, config_name, config)
            manifest.append({"Config": config_name, "RepoTags": [ref.removeprefix("docker.io/")],
                             "Layers": [f"{d[7:]}/layer.tar" for d in ids[:n]]})
        _add(tf, "manifest.json", json.dumps(manifest).encode())
    return ImageSet(tar_path, rootfs, Image(BUSYBOX, tuple(ids[:1])), Image(TWO, tuple(ids)))
