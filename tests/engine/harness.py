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
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

DOCKER_CLI = "/usr/bin/docker"  # /usr/local/bin/docker is CLI 28, first in PATH
DOCKERD_CANDIDATES = ("/usr/bin/dockerd", "/usr/sbin/dockerd")
REPO_ROOT = Path(__file__).resolve().parents[2]
PLUGIN_SOCKET_DIR = Path("/run/docker/plugins")  # hard-coded in dockerd's legacy lookup
# harness validation: run the ring on this in-tree driver (vfs, overlay2) instead of the plugin
INTREE_DRIVER = os.environ.get("STRATA_ENGINE_INTREE") or None
BASE_IMAGE = "strata-test/base:1"


class HarnessError(AssertionError):
    """A harness step failed; the message carries the logs needed to see why."""


def find_dockerd() -> str | None:
    for candidate in DOCKERD_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def new_workdir(prefix: str = "se") -> Path:
    path = Path("/tmp") / f"{prefix}-{secrets.token_hex(4)}"
    path.mkdir(mode=0o700)
    return path


def tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"<{path} does not exist>"
    return "\n".join(text.splitlines()[-lines:])


# ---------------------------------------------------------------------------
# processes and mounts


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            # a zombie still answers kill(0); it is gone for our purposes
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def wait_pid_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return True
        time.sleep(0.1)
    return not _pid_alive(pid)


def terminate_pid(pid: int, timeout: float = 20.0) -> None:
    """SIGTERM, wait, SIGKILL: the only way this harness ends a process."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if wait_pid_gone(pid, wait):
            return


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def pids_naming(path: Path) -> list[int]:
    """Processes whose command line contains ``path`` (a unique random dir)."""
    needle = os.fsencode(str(path))
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if needle in cmdline:
            found.append(int(entry.name))
    return found


def _unescape_mountinfo(field_text: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal
    out, i = [], 0
    while i < len(field_text):
        if field_text[i] == "\\" and field_text[i + 1 : i + 4].isdigit():
            out.append(chr(int(field_text[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field_text[i])
            i += 1
    return "".join(out)


def mount_points(mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    with open(mountinfo) as f:
        return [_unescape_mountinfo(line.split()[4]) for line in f]


def mounts_under(root: Path) -> list[str]:
    prefix = str(root)
    return [m for m in mount_points() if m == prefix or m.startswith(prefix + "/")]


def unmount_all_under(root: Path) -> None:
    for _ in range(5):  # a lazy unmount of a parent can reveal nothing new, but be sure
        found = mounts_under(root)
        if not found:
            return
        for point in sorted(set(found), key=lambda p: p.count("/"), reverse=True):
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)
    left = mounts_under(root)
    if left:
        raise HarnessError(f"could not unmount under {root}: {left}")


def keep_logs(root: Path) -> None:
    """Copy ``root/*.log`` to $STRATA_ENGINE_KEEP_LOGS/<root name>/ when that is set."""
    keep = os.environ.get("STRATA_ENGINE_KEEP_LOGS")
    if not keep:
        return
    dest = Path(keep) / root.name
    dest.mkdir(parents=True, exist_ok=True)
    for log in root.glob("*.log"):
        shutil.copy2(log, dest / log.name)


def remove_workdir(root: Path) -> None:
    """Kill leftovers naming ``root``, unmount under it, remove it."""
    keep_logs(root)
    for pid in pids_naming(root):
        terminate_pid(pid, timeout=10.0)
    unmount_all_under(root)
    shutil.rmtree(root, ignore_errors=True)
    if root.exists():
        raise HarnessError(f"could not remove {root}")


# ---------------------------------------------------------------------------
# dockerd


@dataclass
class Dockerd:
    """One real dockerd on private, throwaway directories."""

    driver: str
    workdir: Path
    dockerd_bin: str
    storage_opts: tuple[str, ...] = ()
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
        """What dockerd passes as GraphDriver.Init Home (docs/protocol.md §3)."""
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
        return argv

    def start(self, timeout: float = 60.0) -> None:
        (self.workdir / "daemon.json").write_text("{}\n")
        (self.workdir / "cli").mkdir(exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== harness: start {' '.join(self.argv())}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
            )
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
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
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
# the strata plugin process


@dataclass
class Plugin:
    """``python -m plugin serve`` as dockerd finds it: /run/docker/plugins/NAME.sock."""

    name: str
    backend: str
    state_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def socket_path(self) -> Path:
        return PLUGIN_SOCKET_DIR / f"{self.name}.sock"

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "plugin",
            "serve",
            "--name",
            self.name,
            "--socket",
            str(self.socket_path),
            "--state-dir",
            str(self.state_dir),
            "--backend",
            self.backend,
            "--log-level",
            "debug",
        ]

    def start(self, timeout: float = 30.0) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        env.update(self.extra_env)
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== harness: start {' '.join(self.argv())}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HarnessError(
                    f"plugin exited with {self.proc.returncode} during start-up\n"
                    + self.diagnostics()
                )
            if self._accepts_connections():
                return
            time.sleep(0.1)
        raise HarnessError(
            f"plugin socket {self.socket_path} not accepting within {timeout}s\n"
            + self.diagnostics()
        )

    def _accepts_connections(self) -> bool:
        # a stale socket file left by kill -9 exists but refuses connections
        try:
            if not stat.S_ISSOCK(self.socket_path.lstat().st_mode):
                return False
        except FileNotFoundError:
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(2.0)
            try:
                probe.connect(str(self.socket_path))
            except OSError:
                return False
        return True

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM by pid; returns the exit status (None if it was not running)."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
                raise HarnessError(f"plugin ignored SIGTERM for {timeout}s\n" + self.diagnostics())
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL by pid: a crash, no chance to clean up."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        proc.kill()
        proc.wait(10)

    def restart(self, hard: bool = False) -> None:
        self.kill() if hard else self.stop()
        self.start()

    def close(self) -> None:
        try:
            self.stop()
        finally:
            self.socket_path.unlink(missing_ok=True)

    def diagnostics(self) -> str:
        return f"--- plugin log ({self.log_path}), tail\n{tail(self.log_path, 80)}"


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
) -> Stack:
    """A plugin named strata-t<random6> and a dockerd using it (or an in-tree driver).

    ``data_root_on``: a directory on the filesystem the backend needs (btrfs,
    zfs); it is bind-mounted as the data root, so dockerd's Home is on it and
    the usual work-directory teardown unmounts it.
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
            )
            plugin.start()
        dockerd = Dockerd(driver=driver, workdir=workdir, dockerd_bin=dockerd_bin)
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


def start_intree(dockerd_bin: str, driver: str) -> Dockerd:
    dockerd = Dockerd(driver=driver, workdir=new_workdir(), dockerd_bin=dockerd_bin)
    try:
        dockerd.start()
    except BaseException:
        dockerd.close()
        raise
    return dockerd
