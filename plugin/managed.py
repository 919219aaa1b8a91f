"""strata as a Docker managed (v2) plugin: its config and ``strata plugin-create``.

A managed plugin is a rootfs plus ``config.json`` that dockerd runs as a
containerd task (namespace ``plugins.moby``). ``plugin/data/config.json`` is
that config (``spec/config.json`` links to it); it sets ``STRATA_MANAGED=1``,
which ``strata serve`` reads to behave as dockerd needs a managed plugin to:

- the Init record lives under the propagated mount (``/var/lib/docker``),
  because ``docker plugin upgrade`` replaces the rootfs, and a record kept in it
  would be lost: every call would then fail until dockerd restarts;
- logs go to stdout, because dockerd logs a managed plugin's stderr at error level;
- fuse-overlayfs is refused: its FUSE daemons would live in the plugin's
  container and die with it on any plugin restart or upgrade, taking the root
  filesystem of every running container with them.

``plugin-create`` drives the ``docker`` CLI rather than the Engine API: the CLI
already resolves ``DOCKER_HOST``, contexts and TLS exactly as the operator's
other docker commands do, and ``docker plugin create`` wants a directory anyway.
Facts and sources: docs/managed-plugin.md.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from importlib import resources

from plugin.errors import InvalidArgument, StrataError

#: ``propagatedMount`` of the config: dockerd's Home for the plugin is
#: ``<this>/<driver name>``, and the host sees it at
#: ``<data-root>/plugins/<id>/propagated-mount``.
PROPAGATED_MOUNT = "/var/lib/docker"
#: A sibling of Home under the propagated mount: it survives upgrades, and no
#: storage-driver name can be ``.strata-state``'s.
MANAGED_STATE_DIR = PROPAGATED_MOUNT + "/.strata-state"
#: The config's entrypoint; the image must have it.
ENTRYPOINT = "/opt/strata/bin/strata"
#: Backends a managed strata refuses at Init, and why (the operator reads this).
REFUSED_BACKENDS = {
    "fuse-overlayfs": (
        "fuse-overlayfs cannot serve as a managed plugin: its FUSE daemons run in the "
        "plugin's container and die on every plugin restart or upgrade, taking the root "
        "filesystem of each running container with them; use the overlay backend, or run "
        "strata as a host service (strata install) for fuse-overlayfs"),
}


class PluginCreateError(StrataError):
    """``strata plugin-create`` could not build the plugin; the message says which step."""


def is_managed(environ: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    return environ.get("STRATA_MANAGED", "").strip().lower() in ("1", "true", "yes")


def config_json() -> bytes:
    """The managed plugin config shipped with this strata."""
    return (resources.files("plugin") / "data" / "config.json").read_bytes()


def under_propagated_mount(path: str) -> bool:
    return os.path.normpath(path).startswith(PROPAGATED_MOUNT + "/")


def create_plugin(name: str, image: str, docker: str = "docker", config: str | None = None,
                  tmpdir: str | None = None) -> None:
    """``docker plugin create NAME`` from IMAGE's filesystem and strata's config."""
    if os.geteuid() != 0:
        raise PluginCreateError(
            "plugin-create must run as root: the rootfs keeps the image's owners and "
            "device nodes, which only root can recreate")
    config_bytes = _read_config(config)
    work = tempfile.mkdtemp(prefix="strata-plugin-", dir=tmpdir)
    try:
        rootfs = os.path.join(work, "rootfs")
        os.mkdir(rootfs)
        _export_image(docker, image, rootfs)
        if not os.path.lexists(rootfs + ENTRYPOINT):
            raise PluginCreateError(
                f"image {image} has no {ENTRYPOINT}, the entrypoint of config.json: "
                "build the image from strata's Dockerfile")
        with open(os.path.join(work, "config.json"), "wb") as f:
            f.write(config_bytes)
        _progress(f"docker plugin create {name} (the CLI packs the rootfs; this takes a while)")
        _docker(docker, "plugin", "create", name, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _read_config(path: str | None) -> bytes:
    if path is None:
        return config_json()
    try:
        with open(path, "rb") as f:
            data = f.read()
        json.loads(data)
    except (OSError, ValueError) as e:
        raise InvalidArgument(f"--config {path}: {e}") from e
    return data


def _export_image(docker: str, image: str, rootfs: str) -> None:
    """IMAGE's filesystem into ``rootfs``: docker create, docker export | tar -x, docker rm."""
    # The entrypoint is never run; it only lets images without a command be created.
    cid = _docker(docker, "create", "--entrypoint", ENTRYPOINT, image).strip()
    try:
        _progress(f"exporting {image} into {rootfs}")
        with tempfile.TemporaryFile() as export_err, tempfile.TemporaryFile() as tar_err:
            export = subprocess.Popen([docker, "export", cid], stdout=subprocess.PIPE,
                                      stderr=export_err)
            tar = subprocess.run(
                ["tar", "-C", rootfs, "-x", "--numeric-owner", "--same-permissions",
                 "--xattrs", "--xattrs-include=*"],
                stdin=export.stdout, stderr=tar_err, check=False)
            assert export.stdout is not None
            export.stdout.close()
            export.wait()
            for proc, err, what in ((export, export_err, "docker export"),
                                    (tar, tar_err, "tar -x")):
                if proc.returncode != 0:
                    err.seek(0)
                    raise PluginCreateError(f"{what} of {image} exited {proc.returncode}: "
                                            f"{err.read().decode(errors='replace').strip()}")
    finally:
        _docker(docker, "rm", "-f", cid, check=False)


def _docker(docker: str, *args: str, check: bool = True) -> str:
    argv: Sequence[str] = [docker, *args]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise PluginCreateError(f"no docker CLI at {docker!r} (use --docker PATH)") from e
    if check and result.returncode != 0:
        raise PluginCreateError(f"`{' '.join(argv)}` exited {result.returncode}: "
                                f"{result.stderr.strip()}")
    return result.stdout


def _progress(message: str) -> None:
    print(f"strata plugin-create: {message}", file=sys.stderr, flush=True)
