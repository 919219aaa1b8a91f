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

import fcntl
import hashlib
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
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


# ---------------------------------------------------------------------------
# a private mount namespace with its own /run/docker/plugins


def _mnt_ns(pid: int | str) -> str:
    return os.readlink(f"/proc/{pid}/ns/mnt")


@dataclass
class MountNamespace:
    """``unshare -m --propagation slave``, held open by a ``sleep``; the host's
    mounts reach in, nothing made inside reaches out. Ends with its holder (and
    every mount in it), once nothing else runs in it."""

    holder: subprocess.Popen[bytes]
    ns: str

    @classmethod
    def start(cls) -> MountNamespace:
        holder = subprocess.Popen(
            ["unshare", "-m", "--propagation", "slave", "sleep", "infinity"],
            stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10
        while _mnt_ns(holder.pid) == _mnt_ns("self"):
            if time.monotonic() > deadline or holder.poll() is not None:
                holder.kill()
                raise harness.HarnessError("unshare -m did not make a mount namespace")
            time.sleep(0.02)
        namespace = cls(holder, _mnt_ns(holder.pid))
        try:
            namespace.run("mkdir", "-p", str(harness.PLUGIN_SOCKET_DIR))
            namespace.run("mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs",
                          str(harness.PLUGIN_SOCKET_DIR))
        except BaseException:
            namespace.close()
            raise
        return namespace

    def prefix(self) -> list[str]:
        return ["nsenter", "-t", str(self.holder.pid), "-m", "--"]

    def run(self, *argv: str) -> str:
        result = subprocess.run([*self.prefix(), *argv], check=False, capture_output=True,
                                text=True)
        if result.returncode != 0:
            raise harness.HarnessError(f"{' '.join(argv)} in the namespace: {result.stderr}")
        return result.stdout

    def members(self) -> list[int]:
        """Processes still in the namespace, the holder aside."""
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != self.holder.pid:
                try:
                    if _mnt_ns(entry.name) == self.ns:
                        found.append(int(entry.name))
                except OSError:
                    continue
        return found

    def close(self) -> None:
        """End the holder; anything still inside was a leak: end it by pid, report it."""
        leaked = self.members()
        for pid in leaked:
            harness.terminate_pid(pid, timeout=10.0)
        harness.terminate_pid(self.holder.pid)
        self.holder.wait(10)
        if leaked:
            raise harness.HarnessError(f"processes left in the test namespace: {leaked}")


@dataclass
class NsDockerd(harness.Dockerd):
    """harness.Dockerd, run inside ``namespace``."""

    namespace: MountNamespace | None = None

    def argv(self) -> list[str]:
        assert self.namespace is not None
        return [*self.namespace.prefix(), *super().argv()]

    @property
    def containerd_address(self) -> Path:
        return self.exec_root / "containerd" / "containerd.sock"

    def plugin_pid(self, plugin_id: str, timeout: float = 20.0) -> int:
        """The pid of a managed plugin: dockerd runs it as a containerd task named by
        its ID in the ``plugins.moby`` namespace."""
        deadline = time.monotonic() + timeout
        listing = ""
        while time.monotonic() < deadline:
            listing = subprocess.run(
                ["ctr", "--address", str(self.containerd_address), "-n", "plugins.moby",
                 "task", "ls"], check=False, capture_output=True, text=True).stdout
            for line in listing.splitlines()[1:]:
                task, pid, status = line.split()[:3]
                if task == plugin_id and status == "RUNNING":
                    return int(pid)
            time.sleep(0.2)
        raise harness.HarnessError(f"no running task {plugin_id} in plugins.moby:\n{listing}"
                                   + self.diagnostics())


# ---------------------------------------------------------------------------
# a registry on loopback (docker plugin upgrade pulls, always)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Registry:
    workdir: Path
    port: int = field(default_factory=_free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        # 127.0.0.0/8 is an insecure registry to dockerd by default: plain HTTP works
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> None:
        config = self.workdir / "registry.yml"
        config.write_text(
            "version: 0.1\nlog: {level: warn}\n"
            f"storage: {{filesystem: {{rootdirectory: {self.workdir / 'registry'}}}}}\n"
            f"http: {{addr: {self.address}}}\n")
        with open(self.workdir / "registry.log", "ab") as log:
            self.proc = subprocess.Popen(["docker-registry", "serve", str(config)],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
                with direct.open(f"http://{self.address}/v2/", timeout=2):
                    return
            except OSError:
                time.sleep(0.1)
        raise harness.HarnessError("docker-registry did not answer\n"
                                   + harness.tail(self.workdir / "registry.log"))

    def stop(self) -> None:
        if self.proc is not None:
            harness.terminate_pid(self.proc.pid)
            self.proc.wait(10)
            self.proc = None
