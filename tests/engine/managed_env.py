"""What the managed-plugin engine test needs beyond harness.py.

- ``debian_base()``: a ``debian:bookworm-slim`` stand-in (tests cannot pull from
  Docker Hub): ``debootstrap --variant=minbase bookworm``, trimmed the way the
  official -slim images are, packed as a tar and cached under
  ``/var/cache/strata-test/`` because debootstrap takes minutes.
- ``MountNamespace``: dockerd 20.10 puts every managed plugin's socket in
  ``/run/docker/plugins/<id>/`` whatever ``--exec-root`` says, so each test
  dockerd runs in a private mount namespace with a tmpfs over that directory.
- ``NsDockerd``: harness.Dockerd started inside such a namespace.
- ``Registry``: Debian's docker-registry on loopback, for ``docker plugin
  push``/``upgrade`` (an upgrade always pulls).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.engine import harness

CACHE_DIR = Path(os.environ.get("STRATA_TEST_CACHE", "/var/cache/strata-test"))
MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
#: A base older than this is rebuilt, so that the image's own `apt-get upgrade`
#: never has a month of security updates to fetch.
MAX_BASE_AGE = 30 * 24 * 3600
#: What the official -slim images leave out (debuerreotype's slimify); the same
#: dpkg filter keeps what the Dockerfile installs just as lean.
SLIM_DPKG_CFG = """\
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
"""
#: This machine's egress TLS is intercepted: pip in the Dockerfile needs the host's
#: CA bundle. Test-only; it goes into the stand-in base, never into the Dockerfile.
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
RECIPE_VERSION = "1"


def base_cache_key() -> str:
    """Changes whenever what the base is made of would change."""
    digest = hashlib.sha256()
    arch = subprocess.run(["dpkg", "--print-architecture"], check=True, capture_output=True,
                          text=True).stdout.strip()
    for part in (RECIPE_VERSION, SUITE, "minbase", arch, MIRROR, SLIM_DPKG_CFG):
        digest.update(part.encode() + b"\0")
    if HOST_CA_BUNDLE.exists():
        digest.update(HOST_CA_BUNDLE.read_bytes())
    return f"debian-{SUITE}-minbase-{arch}-{digest.hexdigest()[:12]}"


def debian_base() -> Path:
    """The cached base tar, built first if missing or stale (one builder at a time)."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tar = CACHE_DIR / f"{base_cache_key()}.tar"
    with open(CACHE_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if tar.exists() and time.time() - tar.stat().st_mtime < MAX_BASE_AGE:
            return tar
        for stale in CACHE_DIR.glob(f"debian-{SUITE}-minbase-*.tar"):
            stale.unlink()
        _build_base(tar)
    return tar


def _build_base(tar: Path) -> None:
    work = harness.new_workdir("sdeb")
    try:
        tree = work / "tree"
        result = subprocess.run(
            ["debootstrap", "--variant=minbase", SUITE, str(tree), MIRROR],
            check=False, capture_output=True, text=True, timeout=1200,
        )
        if result.returncode != 0:
            raise harness.HarnessError(f"debootstrap failed:\n{result.stdout[-3000:]}"
                                       f"\n{result.stderr[-3000:]}")
        _slim(tree)
        partial = tar.with_suffix(".partial")
        subprocess.run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*",
                        "-C", str(tree), "-cf", str(partial), "."], check=True)
        partial.replace(tar)
    finally:
        harness.remove_workdir(work)


def _slim(tree: Path) -> None:
    (tree / "etc/dpkg/dpkg.cfg.d/docker-slim").write_text(SLIM_DPKG_CFG)
    for pattern in ("usr/share/man/*", "usr/share/info/*", "usr/share/groff/*",
                    "usr/share/lintian/*", "usr/share/linda/*", "var/cache/apt/*.bin",
                    "var/cache/apt/archives/*.deb", "var/lib/apt/lists/*"):
        for path in tree.glob(pattern):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    for doc in (tree / "usr/share/doc").glob("*/*"):
        if doc.name != "copyright":
            shutil.rmtree(doc) if doc.is_dir() and not doc.is_symlink() else doc.unlink()
    for locale in (tree / "usr/share/locale").glob("*"):
        if locale.name != "locale.alias":
            shutil.rmtree(locale) if locale.is_dir() else locale.unlink()
    if HOST_CA_BUNDLE.exists():
        (tree / "etc/ssl/certs").mkdir(parents=True, exist_ok=True)
        shutil.copy(HOST_CA_BUNDLE, tree / "etc/ssl/certs/host-ca-bundle.crt")
        (tree / "etc/pip.conf").write_text(
            "[global]\ncert = /etc/ssl/certs/host-ca-bundle.crt\n")
