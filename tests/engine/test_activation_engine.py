"""Discovery and activation with a real dockerd: systemd socket activation and
``strata install --start``.

* ``systemd-socket-activate`` (Debian's, no systemd init needed) holds the
  plugin socket; dockerd's first connection (Plugin.Activate) makes it exec
  strata in the same pid, which must adopt the passed socket (LISTEN_FDS) and
  serve the whole start-up sequence on it.
* ``strata install --start`` writes the spec file and units and starts a
  detached server that a dockerd then uses; ``uninstall`` stops it by pid.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.engine import harness
from tests.engine.rootfs import Rootfs
from tests.support.plugin import plugin_env, unique_name
from tests.support.procs import cmdline, wait_for

SOCKET_ACTIVATE = "/usr/bin/systemd-socket-activate"


def _smoke(daemon: harness.Dockerd, rootfs: Rootfs) -> None:
    daemon.docker("import", str(rootfs.tar), "strata-activation:1")
    out = daemon.docker("run", "--rm", "--network", "none", "strata-activation:1",
                        "/bin/cat", "/etc/motd").stdout
    assert out.strip(), "container printed nothing from its image"


def test_first_dockerd_connection_starts_strata(dockerd_bin: str, rootfs: Rootfs,
                                                workdir: Path) -> None:
    if not os.access(SOCKET_ACTIVATE, os.X_OK):
        pytest.skip(f"{SOCKET_ACTIVATE} missing (Debian package systemd)")
    name = unique_name("strata-a")
    sock = harness.PLUGIN_SOCKET_DIR / f"{name}.sock"
    log_path = workdir / "plugin.log"
    harness.PLUGIN_SOCKET_DIR.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        activator = subprocess.Popen(
            [SOCKET_ACTIVATE, "-l", str(sock), f"--fdname={name}",
             sys.executable, "-m", "plugin", "serve", "--name", name, "--backend", "vfs",
             "--state-dir", str(workdir / "state"), "--log-level", "debug"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=plugin_env(), cwd=harness.REPO_ROOT, start_new_session=True)
    daemon = harness.Dockerd(driver=name, workdir=workdir / "d", dockerd_bin=dockerd_bin)
    daemon.workdir.mkdir()
    try:
        wait_for(sock.exists, f"{sock} bound by systemd-socket-activate", timeout=20)
        # Nothing has connected yet: the activator still waits, strata is not running.
        assert cmdline(activator.pid)[0].endswith("systemd-socket-activate")
        daemon.start()
        # dockerd's Activate made the activator exec strata in the same pid.
        assert cmdline(activator.pid)[1:4] == ["-m", "plugin", "serve"]
        _smoke(daemon, rootfs)
        log_text = log_path.read_text(errors="replace")
        assert "passed by the service manager" in log_text, log_text[-2000:]
        assert "Plugin.Activate" in log_text and "GraphDriver.Init" in log_text
    finally:
        try:
            daemon.close()
        finally:
            if activator.poll() is None:
                activator.send_signal(signal.SIGTERM)
                activator.wait(20)
            sock.unlink(missing_ok=True)


def test_install_start_serves_dockerd_and_uninstall_stops_it(dockerd_bin: str, rootfs: Rootfs,
                                                             workdir: Path) -> None:
    name = unique_name("strata-i")
    spec_dir, unit_dir = workdir / "plugins", workdir / "units"
    common = ["--name", name, "--spec-dir", str(spec_dir), "--unit-dir", str(unit_dir)]
    state_dir = Path("/var/lib/strata") / name
    log_file = Path(f"/var/log/strata-{name}.log")
    pid_file = Path(f"/run/strata/{name}.pid")

    def strata(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "plugin", *args], capture_output=True,
                              text=True, env=plugin_env(), cwd=harness.REPO_ROOT, timeout=60,
                              check=False)

    daemon = harness.Dockerd(driver=name, workdir=workdir / "d", dockerd_bin=dockerd_bin)
    daemon.workdir.mkdir()
    try:
        done = strata("install", *common, "--backend", "vfs", "--start")
        assert done.returncode == 0, done.stdout + done.stderr
        spec = spec_dir / f"{name}.spec"
        assert spec.read_text() == f"unix:///run/docker/plugins/{name}.sock\n"
        assert (unit_dir / f"{name}.socket").exists() and (unit_dir / f"{name}.service").exists()
        pid = int(pid_file.read_text())
        assert cmdline(pid)[1:4] == ["-m", "plugin", "serve"]
        sock = harness.PLUGIN_SOCKET_DIR / f"{name}.sock"
        assert oct(sock.stat().st_mode & 0o777) == "0o600"
        daemon.start()
        _smoke(daemon, rootfs)
        daemon.stop()
        done = strata("uninstall", *common)
        assert done.returncode == 0, done.stdout + done.stderr
        wait_for(lambda: not os.path.exists(f"/proc/{pid}"), "strata to exit", timeout=20)
        assert not spec.exists() and not sock.exists() and not pid_file.exists()
        assert not (unit_dir / f"{name}.socket").exists()
    finally:
        daemon.close()
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
            pid_file.unlink()
        (harness.PLUGIN_SOCKET_DIR / f"{name}.sock").unlink(missing_ok=True)
        shutil.rmtree(state_dir, ignore_errors=True)
        log_file.unlink(missing_ok=True)
