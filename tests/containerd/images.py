"""Images for the containerd ring, built here in Python (no registry): ``docker save`` tars.

Two images share their first layer, the busybox root file system of the engine tests
(``tests/engine/rootfs.py``):

* ``BUSYBOX``: that one layer;
* ``TWO``: a second layer on it with a file (``/hello.txt``), a whiteout
  (``etc/.wh.victim`` deletes ``/etc/victim``) and an opaque directory
  (``opt/.wh..wh..opq`` hides everything the first layer had under ``/opt``).

For the CRI test, ``build_cri_images`` writes a tar of ``BUSYBOX`` and ``PAUSE``: the
same one layer, with a config whose entrypoint blocks (``sleep inf``), which is what a
pod sandbox's image must do.

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

BUSYBOX = "docker.io/strata/busybox:1"
TWO = "docker.io/strata/two:1"
PAUSE = "docker.io/strata/pause:1"

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


@dataclass(frozen=True)
class CriImageSet:
    tar: Path  # one docker-save tar holding both images
    busybox: Image
    pause: Image  # the pod sandbox's image: busybox's layer, entrypoint ``sleep inf``


def _config(diff_ids: list[str], entrypoint: list[str] | None = None) -> bytes:
    config: dict[str, object] = {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]}
    if entrypoint:
        config = {"Entrypoint": entrypoint, "Env": ["PATH=/bin"]}
    return json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": f"strata test layer {i}"} for i in range(len(diff_ids))],
    }, sort_keys=True).encode()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
    tf.addfile(info, io.BytesIO(data))


def _write_save_tar(tar_path: Path, layers: list[bytes],
                    images: list[tuple[str, int, bytes]]) -> None:
    """A docker-save tar of ``layers`` and of ``images`` (ref, how many layers from the
    bottom, config)."""
    ids = _diff_ids(layers)
    manifest = []
    with tarfile.open(tar_path, "w") as tf:
        for diff_id, data in zip(ids, layers, strict=True):
            _add(tf, f"{diff_id[7:]}/layer.tar", data)
        for ref, n, config in images:
            config_name = hashlib.sha256(config).hexdigest() + ".json"
            _add(tf, config_name, config)
            manifest.append({"Config": config_name, "RepoTags": [ref.removeprefix("docker.io/")],
                             "Layers": [f"{d[7:]}/layer.tar" for d in ids[:n]]})
        _add(tf, "manifest.json", json.dumps(manifest).encode())


def _diff_ids(layers: list[bytes]) -> list[str]:
    return ["sha256:" + hashlib.sha256(data).hexdigest() for data in layers]


def build_images(workdir: Path) -> ImageSet:
    """Write ``workdir/images.tar`` (docker save format) with both images."""
    rootfs = build_rootfs_tar(workdir)
    layers = [rootfs.tar.read_bytes(), second_layer()]
    ids = _diff_ids(layers)
    _write_save_tar(workdir / "images.tar", layers,
                    [(BUSYBOX, 1, _config(ids[:1])), (TWO, 2, _config(ids))])
    return ImageSet(workdir / "images.tar", rootfs, Image(BUSYBOX, tuple(ids[:1])),
                    Image(TWO, tuple(ids)))


def build_cri_images(workdir: Path) -> CriImageSet:
    """Write ``workdir/cri-images.tar`` (docker save format) with BUSYBOX and PAUSE."""
    layer = build_rootfs_tar(workdir).tar.read_bytes()
    ids = _diff_ids([layer])
    _write_save_tar(workdir / "cri-images.tar", [layer],
                    [(BUSYBOX, 1, _config(ids)),
                     (PAUSE, 1, _config(ids, entrypoint=["/bin/sleep", "inf"]))])
    return CriImageSet(workdir / "cri-images.tar", Image(BUSYBOX, tuple(ids)),
                       Image(PAUSE, tuple(ids)))
