"""A private containerd 1.6 with strata as its ``[proxy_plugins]`` snapshotter.

containerd 1.6 hard-codes its shims' sockets and ctr's stdio fifos under
``/run/containerd``, so everything runs in a mount namespace of its own with a
tmpfs over ``/run``: a holder process (``unshare -m`` then ``sleep``) keeps the
namespace, and containerd, the strata snapshotter and every ``ctr`` enter it
with ``nsenter``.  Their mounts (unpack temp mounts, container rootfs, fuse
daemons) stay in that namespace and go away with it.

Layout of the work dir (``/tmp/sc-<hex>``, short: sockets live in it)::

    config.toml   containerd's (root, state, sockets, proxy plugin, GC, TMPDIR)
    root/ state/  containerd's own
    tmp/          TMPDIR: where containerd mounts a snapshot to unpack or diff it
    c.sock        containerd's API; s.sock strata's snapshotter
    *.log         containerd.log, strata.log

Stop order: containerd, strata, then every process left in the namespace (shims,
fuse-overlayfs daemons: found by their ``/proc/PID/ns/mnt``, ended by pid), the
holder last.  Nothing is found by name.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from plugin.containerd_setup import add_proxy_plugin
from tests.support.mounts import mountinfo
from tests.support.plugin import plugin_env
from tests.support.procs import (
    HarnessError,
    pid_alive,
    spawn_logged,
    stop_child,
    tail,
    terminate_pid,
    wait_for,
)

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
SNAPSHOTTER = "strata"
START_TIMEOUT = 60.0
CALL_LINE = re.compile(r"strata\.snapshotter\.grpc: (\w+) '([^']*)' [\d.]+ms (\S+)")


def containerd_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "a private containerd needs root (mount namespace, mounts)"
    for tool in ("containerd", "ctr", "containerd-shim-runc-v2", "runc", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"no {tool} on PATH (apt-get install containerd runc util-linux)"
    return None


def render_config(workdir: Path, sandbox_image: str | None = None) -> str:
    """containerd 1.6 config (v2): its own root, state, sockets; a GC that runs after
    every deletion, so a removal reaches strata promptly.  The proxy plugin table is the
    one ``strata install --containerd`` appends.  CRI is off unless ``sandbox_image`` is
    given (there is no CNI plugin here, so pods must use the host's network)."""
    cri_off = 'disabled_plugins = ["io.containerd.grpc.v1.cri"]'
    base = f"""version = 2
root = "{workdir}/root"
state = "{workdir}/state"
{cri_off if sandbox_image is None else ""}

[grpc]
  address = "{workdir}/c.sock"

[ttrpc]
  address = "{workdir}/c.sock.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{workdir}/opt"

[plugins."io.containerd.gc.v1.scheduler"]
  deletion_threshold = 1
  schedule_delay = "0ms"
"""
    if sandbox_image is not None:
        base += render_cri(workdir, sandbox_image)
    return add_proxy_plugin(base, SNAPSHOTTER, f"{workdir}/s.sock").text


def render_cri(workdir: Path, sandbox_image: str) -> str:
    """The CRI plugin's table (README's Kubernetes row: ``snapshotter = "strata"``).  The
    sandbox image is one imported beforehand (no registry here); CNI looks in empty
    directories of the work dir, so a pod in its own network namespace would fail, one in
    the node's needs none; the streaming server takes a free port on loopback.  A sandbox's
    oom_score_adj is held to containerd's own: CRI asks -998 for it, and some kernels
    (this project's VM among them) refuse a negative value, which fails runc's init.
    AppArmor is off: with it on (Debian 12's default) CRI loads its own profile through
    ``apparmor_parser``, which is the host's security set-up, not storage."""
    return f"""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  restrict_oom_score_adj = true
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "{SNAPSHOTTER}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{workdir}/cni/bin"
    conf_dir = "{workdir}/cni/conf"
"""


class Namespace:
    """A private mount namespace with a tmpfs over /run, held by one ``sleep``."""

    def __init__(self, workdir: Path) -> None:
        script = ("mount -t tmpfs -o mode=0755 strata-run /run && echo ready "
                  "&& exec sleep infinity")
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=workdir, start_new_session=True)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != b"ready":
            err = self.proc.stderr.read().decode() if self.proc.stderr else ""
            self.proc.wait()
            raise HarnessError(f"mount namespace not set up: {err}")
        self.mnt = os.readlink(f"/proc/{self.proc.pid}/ns/mnt")

    def drop_foreign_mounts(self, keep: list[str]) -> None:
        """Lazily unmount, in the namespace only, the copies it took of other tests' mounts
        under /tmp and of every fuse mount (all but ``keep`` and what is above them).  A
        copy would keep their filesystems alive after they unmount them (a fuse daemon
        would not exit, a loop device not detach) until this namespace ends."""
        def ours(point: str) -> bool:
            return any(point == k or k.startswith(point.rstrip("/") + "/")
                       or point.startswith(k.rstrip("/") + "/") for k in keep)
        foreign = [m.mountpoint for m in mountinfo(f"/proc/{self.proc.pid}/mountinfo")
                   if (m.mountpoint.startswith("/tmp/") or m.fstype.startswith("fuse"))
                   and not ours(m.mountpoint)]
        for point in sorted(set(foreign), key=lambda p: p.count("/"), reverse=True):
            subprocess.run(self.enter("umount", "-l", point), capture_output=True, check=False)

    def enter(self, *argv: str) -> list[str]:
        return ["nsenter", "-t", str(self.proc.pid), "-m", "--", *argv]

    def members(self) -> list[int]:
        """Every process in the namespace but the holder."""
        found = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) == self.proc.pid:
                continue
            try:
                if os.readlink(f"/proc/{entry.name}/ns/mnt") == self.mnt:
                    found.append(int(entry.name))
            except OSError:
                continue
        return found

    def close(self) -> None:
        for _ in range(3):  # a killed shim can leave a child that re-parents
            for pid in self.members():
                terminate_pid(pid, timeout=10.0)
        stop_child(self.proc, 10.0)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()


class PrivateContainerd:
    """containerd + strata snapshotter in a :class:`Namespace`, driven by ``ctr``."""

    def __init__(self, workdir: Path, strata_root: str, backend: str,
                 sandbox_image: str | None = None) -> None:
        """``sandbox_image``: enable containerd's CRI plugin (on the same socket) with
        strata as its snapshotter and this image for pod sandboxes."""
        self.workdir = workdir
        self.strata_root = strata_root
        self.backend = backend
        self.socket = str(workdir / "c.sock")
        self.strata_socket = str(workdir / "s.sock")
        self.ns: Namespace | None = None
        self.containerd: subprocess.Popen[bytes] | None = None
        self.strata: subprocess.Popen[bytes] | None = None
        for sub in ("root", "state", "tmp", "opt", "cni/bin", "cni/conf"):
            (workdir / sub).mkdir(mode=0o711, parents=True, exist_ok=True)
        (workdir / "config.toml").write_text(render_config(workdir, sandbox_image))

    # ---- processes -------------------------------------------------------------------
    def start(self) -> None:
        self.ns = Namespace(self.workdir)
        self.ns.drop_foreign_mounts([str(self.workdir), self.strata_root])
        self.start_strata()
        self.start_containerd()

    def _env(self) -> dict[str, str]:
        """nsenter into a mount namespace moves the cwd to its root (setns(2)), so
        ``python -m plugin`` finds this checkout only through PYTHONPATH (else the
        venv's editable install, which may be another checkout)."""
        env = {k: v for k, v in plugin_env(REPO_ROOT).items() if k != "XDG_RUNTIME_DIR"}
        return {**env, "TMPDIR": str(self.workdir / "tmp")}

    def start_or_skip(self) -> None:
        """``start``, or skip the test when strata's backend cannot run on this host."""
        try:
            self.start()
        except HarnessError as e:
            if "NotSupported" in str(e) or "Prerequisites" in str(e):
                pytest.skip(f"backend {self.backend} unavailable here: {e}")
            raise

    def start_strata(self) -> None:
        assert self.ns is not None
        argv = self.ns.enter(sys.executable, "-m", "plugin", "snapshotter",
                             "--socket", self.strata_socket, "--root", self.strata_root,
                             "--backend", self.backend, "--log-level", "info")
        log = self.workdir / "strata.log"
        self.strata = spawn_logged(argv, log, REPO_ROOT, self._env())
        self._wait_socket(self.strata, self.strata_socket, log, "strata snapshotter")

    def start_containerd(self) -> None:
        assert self.ns is not None
        argv = self.ns.enter("containerd", "--config", str(self.workdir / "config.toml"),
                             "--log-level", "debug")
        log = self.workdir / "containerd.log"
        self.containerd = spawn_logged(argv, log, self.workdir, self._env())
        self._wait_socket(self.containerd, self.socket, log, "containerd")
        wait_for(lambda: self.ctr("version", check=False).returncode == 0,
                 "containerd to answer", timeout=START_TIMEOUT)

    def _wait_socket(self, proc: subprocess.Popen[bytes], path: str, log: Path,
                     what: str) -> None:
        def up() -> bool:
            if proc.poll() is not None:
                raise HarnessError(f"{what} exited {proc.returncode}:\n{tail(log)}")
            return os.path.exists(path)
        wait_for(up, f"{what} to listen on {path}", timeout=START_TIMEOUT)

    def stop_strata(self, sig: int = signal.SIGTERM) -> None:
        """SIGTERM (a clean stop) or SIGKILL (a crash), by the pid it was given."""
        if self.strata is not None:
            if sig == signal.SIGKILL:
                self.strata.kill()
                self.strata.wait(10)
            stop_child(self.strata, 30.0)
            self.strata = None

    def stop_containerd(self) -> None:
        if self.containerd is not None:
            stop_child(self.containerd, 30.0)
            self.containerd = None

    def close(self) -> None:
        self.stop_containerd()
        self.stop_strata()
        if self.ns is not None:
            self.ns.close()
            self.ns = None

    # ---- ctr -------------------------------------------------------------------------
    def ctr(self, *args: str, check: bool = True, timeout: float = 180.0,
            snapshotter: str | None = None) -> subprocess.CompletedProcess[bytes]:
        """``ctr --address c.sock ARGS`` inside the namespace; output as bytes
        (file names in a container may be any bytes)."""
        assert self.ns is not None
        env = self._env()
        if snapshotter:
            env["CONTAINERD_SNAPSHOTTER"] = snapshotter
        result = subprocess.run(self.ns.enter("ctr", "--address", self.socket, *args),
                                capture_output=True, env=env, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise HarnessError(f"ctr {' '.join(args)} exited {result.returncode}: "
                               f"{result.stderr.decode(errors='replace')}\n"
                               f"containerd.log:\n{tail(self.workdir / 'containerd.log', 30)}\n"
                               f"strata.log:\n{tail(self.workdir / 'strata.log', 30)}")
        return result

    def sync_gc(self) -> None:
        """A garbage collection now, waited for: containerd's scheduler can miss a deletion
        that lands while a collection runs (an event older than the last collection is
        dropped, gc/scheduler), leaving it to a later trigger; a lease deleted with
        ``--sync`` runs one and returns when it is done."""
        lease = f"strata-gc-{os.urandom(4).hex()}"
        self.ctr("leases", "create", "--id", lease)
        self.ctr("leases", "rm", "--sync", lease)

    def in_ns(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A tool run inside the namespace (mount, umount, ls of a mounted snapshot)."""
        assert self.ns is not None
        return subprocess.run(self.ns.enter(*argv), capture_output=True, text=True,
                              check=check, timeout=60)

    # ---- strata's side ---------------------------------------------------------------
    def calls(self) -> list[tuple[str, str, str]]:
        """(op, key, outcome) of every call strata logged, in order."""
        text = (self.workdir / "strata.log").read_text(errors="replace")
        return CALL_LINE.findall(text)

    def rows(self) -> dict[str, tuple[int, int | None, int]]:
        """strata's records: key -> (id, parent id, kind), read from its sqlite."""
        db = sqlite3.connect(f"file:{self.strata_root}/snapshotter.db?mode=ro", uri=True)
        try:
            return {key: (rid, parent, kind) for rid, key, parent, kind in
                    db.execute("SELECT id, key, parent, kind FROM snapshots")}
        finally:
            db.close()

    def key_of(self, name: str) -> str:
        """strata's key for containerd's snapshot ``name`` (containerd adds ``ns/seq/``)."""
        found = [k for k in self.rows() if k.split("/", 2)[2] == name]
        assert len(found) == 1, (name, found)
        return found[0]

    def layer_dirs(self) -> list[str]:
        return sorted(os.listdir(os.path.join(self.strata_root, self.backend, "layers")))

    def alive(self) -> bool:
        return all(p is not None and pid_alive(p.pid) for p in (self.containerd, self.strata))
