"""Process harness for the engine ring: a real dockerd, a real strata plugin.

Everything here drives real programs (Debian's docker.io 20.10 dockerd and CLI,
``python -m plugin serve``); nothing is simulated. Every daemon gets its own
short work directory ``/tmp/se-<random8>/`` (unix socket paths must stay under
108 bytes: ``/tmp/se-xxxxxxxx/exec/containerd/containerd.sock`` is 48), and its
teardown is the reverse of what it started, by pid:

1. dockerd gets SIGTERM (SIGKILL after a deadline); it stops running
   containers and the containerd it supervises;
2. anything still alive whose command line names the work directory
   (containerd, ``containerd-shim-runc-v2 -address <dir>/exec/...``) is killed
   by pid -- those command lines contain the random directory, so nothing
   else on the host can match;
3. mounts left under the directory (data-root bind, netns files, layer mounts)
   are lazily unmounted, deepest first, then the directory is removed.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

# The process, mount and plugin helpers live in tests.support; these names stay
# importable from here for the engine tests.
from tests.support.mounts import mount_points, mounts_under, unmount_all_under
from tests.support.plugin import PLUGIN_SOCKET_DIR, REPO_ROOT, Plugin
from tests.support.procs import (
    HarnessError,
    children_of,
    pids_naming,
    spawn_logged,
    stop_child,
    tail,
    terminate_pid,
    wait_pid_gone,
)
from tests.support.workdir import keep_logs, new_workdir, remove_workdir

__all__ = [
    "BASE_IMAGE", "DOCKERD_CANDIDATES", "DOCKER_CLI", "INTREE_DRIVER", "PLUGIN_SOCKET_DIR",
    "REPO_ROOT", "Dockerd", "HarnessError", "Plugin", "Stack", "bind_private", "children_of",
    "find_dockerd", "keep_logs", "mount_points", "mounts_under", "new_workdir", "pids_naming",
    "remove_workdir", "start_intree", "start_stack", "tail", "terminate_pid",
    "unmount_all_under", "wait_pid_gone",
]

DOCKER_CLI = "/usr/bin/docker"  # /usr/local/bin/docker is CLI 28, first in PATH
DOCKERD_CANDIDATES = ("/usr/bin/dockerd", "/usr/sbin/dockerd")
# harness validation: run the ring on this in-tree driver (vfs, overlay2) instead of the plugin
INTREE_DRIVER = os.environ.get("STRATA_ENGINE_INTREE") or None
BASE_IMAGE = "strata-test/base:1"


def find_dockerd() -> str | None:
    for candidate in DOCKERD_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    return None


# ---------------------------------------------------------------------------
# dockerd


@dataclass
class Dockerd:
    """One real dockerd on private, throwaway directories."""

    driver: str
    workdir: Path
    dockerd_bin: str
    storage_opts: tuple[str, ...] = ()
    extra_args: tuple[str, ...] = ()  # more dockerd flags, e.g. --userns-remap=default
    extra_logs: list[Callable[[], str]] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    containerd_pids: set[int] = field(default_factory=set)

    @property
    def data_root(self) -> Path:
        return self.workdir / "root"

    @property
    def exec_root(self) -> Path:
        return self.workdir / "exec"

    @property
    def sock(self) -> Path:
        return self.workdir / "docker.sock"

    @property
    def log_path(self) -> Path:
        return self.workdir / "dockerd.log"

    @property
    def home(self) -> Path:
        """What dockerd passes as GraphDriver.Init Home (docs/protocol.md §3); under
        ``--userns-remap`` dockerd's own root is ``<data-root>/<uid>.<gid>``."""
        if self.userns_remap:
            remapped = sorted(self.data_root.glob("[0-9]*.[0-9]*"))
            if len(remapped) == 1:
                return remapped[0] / self.driver
        return self.data_root / self.driver

    @property
    def host(self) -> str:
        return f"unix://{self.sock}"

    def argv(self) -> list[str]:
        argv = [
            self.dockerd_bin,
            "--experimental",
            "--storage-driver",
            self.driver,
            "--data-root",
            str(self.data_root),
            "--exec-root",
            str(self.exec_root),
            "--pidfile",
            str(self.workdir / "dockerd.pid"),
            "-H",
            self.host,
            # an empty config file, so a host /etc/docker/daemon.json cannot leak in
            "--config-file",
            str(self.workdir / "daemon.json"),
            "--iptables=false",
            "--ip6tables=false",
            "--bridge=none",
            "--ip-masq=false",
            "--log-level",
            "debug",
        ]
        for opt in self.storage_opts:
            argv += ["--storage-opt", opt]
        return argv + list(self.extra_args)

    @property
    def userns_remap(self) -> bool:
        return any(arg.startswith("--userns-remap") for arg in self.extra_args)

    def start(self, timeout: float = 60.0) -> None:
        (self.workdir / "daemon.json").write_text("{}\n")
        if self.userns_remap:
            # dockerd refuses a data root whose path the remapped root cannot pass
            # through (setupDaemonRoot); the work dir is made 0700
            self.workdir.chmod(0o711)
        (self.workdir / "cli").mkdir(exist_ok=True)
        self.proc = spawn_logged(self.argv(), self.log_path, self.workdir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HarnessError(
                    f"dockerd exited with {self.proc.returncode} during start-up\n"
                    + self.diagnostics()
                )
            driver = self._probe_driver()
            if driver is not None:
                if driver != self.driver:
                    raise HarnessError(f"dockerd runs driver {driver!r}, wanted {self.driver!r}")
                self.containerd_pids.update(self._containerd_children())
                return
            time.sleep(0.3)
        raise HarnessError(
            f"dockerd did not answer `docker info` within {timeout}s\n" + self.diagnostics()
        )

    def _probe_driver(self) -> str | None:
        """The daemon's storage driver once its API answers, else None."""
        try:
            probe = subprocess.run(
                [DOCKER_CLI, "-H", self.host, "info", "--format", "{{.Driver}}"],
                check=False,
                capture_output=True,
                text=True,
                env=self.cli_env(),
                timeout=5,
            )
        except subprocess.TimeoutExpired:  # the socket exists before the API is served
            return None
        return probe.stdout.strip() if probe.returncode == 0 else None

    def _containerd_children(self) -> set[int]:
        if self.proc is None:
            return set()
        pids = set()
        for pid in children_of(self.proc.pid):
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "containerd":
                    pids.add(pid)
            except FileNotFoundError:
                continue
        return pids

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM by pid (running containers get docker's 10 s stop), then SIGKILL."""
        if self.proc is None:
            return
        self.containerd_pids.update(self._containerd_children())
        stop_child(self.proc, timeout)
        self.proc = None
        # dockerd stops the containerd it supervises on a clean exit; make sure
        for pid in sorted(self.containerd_pids):
            if not wait_pid_gone(pid, 15.0):
                terminate_pid(pid, timeout=10.0)
        self.containerd_pids.clear()

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop and remove everything; safe to call twice."""
        try:
            self.stop()
        finally:
            if self.workdir.exists():
                remove_workdir(self.workdir)

    def cli_env(self, env: Mapping[str, str] | None = None) -> dict[str, str]:
        base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("DOCKER_") or k == "DOCKER_BUILDKIT"
        }
        base["DOCKER_CONFIG"] = str(self.workdir / "cli")  # not the host's ~/.docker
        base.update(env or {})
        return base

    def docker(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        env: Mapping[str, str] | None = None,
        timeout: float = 180.0,
    ) -> subprocess.CompletedProcess[str]:
        argv = [DOCKER_CLI, "-H", self.host, *args]
        try:
            result = subprocess.run(
                argv,
                check=False,
                input=input,
                capture_output=True,
                text=True,
                errors="surrogateescape",
                env=self.cli_env(env),
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as exc:
            raise HarnessError(
                f"timed out after {timeout}s: {' '.join(argv)}\n" + self.diagnostics()
            ) from exc
        if check and result.returncode != 0:
            raise HarnessError(
                f"`docker {' '.join(args)}` exited {result.returncode}\n"
                f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}\n" + self.diagnostics()
            )
        return result

    def diagnostics(self) -> str:
        parts = [f"--- dockerd log ({self.log_path}), tail\n{tail(self.log_path)}"]
        parts += [describe() for describe in self.extra_logs]
        return "\n".join(parts)


# ---------------------------------------------------------------------------
# a strata stack: one plugin + the dockerd that uses it


@dataclass
class Stack:
    dockerd: Dockerd
    plugin: Plugin | None  # None when validating the harness on an in-tree driver

    @property
    def driver(self) -> str:
        return self.dockerd.driver

    def docker(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        env: Mapping[str, str] | None = None,
        timeout: float = 180.0,
    ) -> subprocess.CompletedProcess[str]:
        return self.dockerd.docker(*args, input=input, check=check, env=env, timeout=timeout)

    def close(self) -> None:
        # dockerd first: its shutdown sends Cleanup to the plugin
        try:
            self.dockerd.stop()
        finally:
            try:
                if self.plugin is not None:
                    self.plugin.close()
            finally:
                if self.dockerd.workdir.exists():
                    remove_workdir(self.dockerd.workdir)


def start_stack(
    dockerd_bin: str,
    backend: str,
    intree_driver: str | None = None,
    data_root_on: Path | None = None,
    plugin_env: Mapping[str, str] | None = None,
    dockerd_args: tuple[str, ...] = (),
) -> Stack:
    """A plugin named strata-t<random6> and a dockerd using it (or an in-tree driver).

    ``data_root_on``: a directory on the filesystem the backend needs (btrfs,
    zfs); it is bind-mounted as the data root, so dockerd's Home is on it and
    the usual work-directory teardown unmounts it.  ``plugin_env``: extra
    environment for the plugin (``STRATA_*`` settings).  ``dockerd_args``: more
    dockerd flags (``Dockerd.extra_args``).
    """
    workdir = new_workdir()
    plugin = None
    try:
        if data_root_on is not None:
            bind_private(data_root_on, workdir / "root")
        if intree_driver:
            driver = intree_driver
        else:
            driver = f"strata-t{secrets.token_hex(3)}"
            plugin = Plugin(
                name=driver,
                backend=backend,
                state_dir=workdir / "plugin-state",
                log_path=workdir / "plugin.log",
                extra_env=dict(plugin_env or {}),
            )
            plugin.start()
        dockerd = Dockerd(driver=driver, workdir=workdir, dockerd_bin=dockerd_bin,
                          extra_args=dockerd_args)
        if plugin is not None:
            dockerd.extra_logs.append(plugin.diagnostics)
        stack = Stack(dockerd=dockerd, plugin=plugin)
        try:
            dockerd.start()
        except BaseException:
            stack.close()
            raise
        return stack
    except BaseException:
        if plugin is not None:
            plugin.close()
        if workdir.exists():
            remove_workdir(workdir)
        raise


def bind_private(source: Path, target: Path) -> None:
    """Bind ``source`` at ``target``, private: mounts under it must not propagate back."""
    target.mkdir()
    for argv in (["mount", "--bind", str(source), str(target)],
                 ["mount", "--make-private", str(target)]):
        result = subprocess.run(argv, check=False, capture_output=True, text=True)
        if result.returncode != 0:
            raise HarnessError(f"{' '.join(argv)}: {result.stderr.strip()}")


def start_intree(dockerd_bin: str, driver: str, dockerd_args: tuple[str, ...] = ()) -> Dockerd:
    dockerd = Dockerd(driver=driver, workdir=new_workdir(), dockerd_bin=dockerd_bin,
                      extra_args=dockerd_args)
    try:
        dockerd.start()
    except BaseException:
        dockerd.close()
        raise
    return dockerd
