"""``strata install`` / ``uninstall`` / ``check``: put strata where dockerd finds it.

install writes ``/etc/docker/plugins/NAME.spec`` (``unix:///run/docker/plugins/
NAME.sock``) and the systemd pair ``NAME.socket`` + ``NAME.service`` (socket
activation: the first dockerd connection starts strata), plus a docker.service
drop-in ordering dockerd after the socket.  With ``--start`` it also starts
serving: through systemd when systemd is the init, otherwise as a detached
``strata serve`` whose pid is kept in ``/run/strata/NAME.pid`` (containers and
minimal hosts have no systemd).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time

from plugin import config
from plugin.driver import probes

#: The directory that holds the ``plugin`` package: a detached server started
#: from a source checkout needs it on PYTHONPATH.
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def socket_path(name: str) -> str:
    return f"/run/docker/plugins/{name}.sock"


#: What strata needs of root's powers (found by running the protocol suite under
#: exactly this bounding set, README "systemd units"): mounts, overlay's
#: trusted.* xattrs and btrfs ioctls (SYS_ADMIN), layer owners (CHOWN), device
#: nodes and overlay whiteouts (MKNOD), the chrooted extraction (SYS_CHROOT),
#: files whatever their owner and mode (DAC_OVERRIDE, DAC_READ_SEARCH, FOWNER),
#: setuid bits kept through chown (FSETID), file capabilities (SETFCAP).
CAPABILITIES = ("CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER",
                "CAP_FSETID", "CAP_MKNOD", "CAP_SETFCAP", "CAP_SYS_ADMIN", "CAP_SYS_CHROOT")

#: Why the usual sandboxing options are absent (written into the unit).
HARDENING_NOTE = """\
# Hardening that keeps strata's mounts visible to dockerd.  dockerd hands the
# path Get returns to the container runtime, so the layer mounts strata makes
# must be in the host's mount namespace: ProtectSystem=, ProtectHome=,
# PrivateTmp=, PrivateDevices=, ProtectKernelTunables=, ProtectKernelModules=,
# ProtectKernelLogs=, ProtectControlGroups=, ProtectProc=, ReadOnlyPaths= and
# the other options that give a service a private mount namespace would hide
# them, and are left out on purpose.  Also left out: PrivateUsers= (root in a
# user namespace cannot mount on the host), RestrictSUIDSGID= (layers carry
# setuid files), DevicePolicy= and ProtectClock= (fuse-overlayfs needs
# /dev/fuse), UMask=0077 (layer roots would shut out containers' non-root users).
"""


def render_units(name: str, serve_args: list[str], python: str = sys.executable,
                 inet: bool = False) -> dict[str, str]:
    """The systemd unit pair for plugin ``name`` (systemd/ holds the default one).

    ``serve_args`` follow ``serve --name NAME`` (settings given at install time;
    the config file is read by the service itself); ``inet`` allows TCP for a
    metrics address (otherwise only unix sockets)."""
    exec_start = shlex.join([python, "-m", "plugin", "serve", "--name", name, *serve_args])
    return {
        f"{name}.socket": f"""[Unit]
Description=strata graphdriver plugin socket ({name})
PartOf={name}.service

[Socket]
ListenStream={socket_path(name)}
SocketMode=0600

[Install]
WantedBy=sockets.target
""",
        f"{name}.service": f"""[Unit]
Description=strata graphdriver plugin ({name})
Documentation=https://docs.docker.com/engine/extend/plugins_graphdriver/
Requires={name}.socket
After={name}.socket
Before=docker.service

[Service]
Type=notify
ExecStart={exec_start}
KillMode=mixed
Restart=on-failure

{HARDENING_NOTE}{hardening(inet)}
[Install]
WantedBy=multi-user.target
""",
    }


def hardening(inet: bool = False) -> str:
    """The [Service] sandboxing lines both of strata's services carry (the graphdriver
    plugin's and the containerd snapshotter's; HARDENING_NOTE says what is left
    out and why); ``inet`` allows TCP (a metrics address), else only unix sockets."""
    families = "AF_UNIX AF_INET AF_INET6" if inet else "AF_UNIX"
    network = "" if inet else "IPAddressDeny=any\n"
    return f"""NoNewPrivileges=yes
CapabilityBoundingSet={" ".join(CAPABILITIES)}
RestrictAddressFamilies={families}
{network}RestrictNamespaces=yes
SystemCallArchitectures=native
SystemCallFilter=~@clock @cpu-emulation @debug @module @obsolete @raw-io @reboot @swap
LockPersonality=yes
RestrictRealtime=yes
"""


def serve_args(args: argparse.Namespace) -> list[str]:
    """What ``strata serve`` needs besides ``--name`` to run as installed: the
    config file and the settings given to ``install`` by flag or environment."""
    argv = ["--config", args.config] if args.config else []
    return argv + config.as_flags(args.settings, ["backend", "metrics_address"])


def _systemd_running() -> bool:
    return os.path.isdir("/run/systemd/system")


def pid_file(name: str) -> str:
    return f"/run/strata/{name}.pid"


def _write(path: str, text: str, mode: int = 0o644) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, mode)
    print(f"wrote {path}")


def install(args: argparse.Namespace) -> int:
    name = args.name
    _write(os.path.join(args.spec_dir, f"{name}.spec"), f"unix://{socket_path(name)}\n")
    units = render_units(name, serve_args(args), inet=bool(args.metrics_address))
    for unit, text in units.items():
        _write(os.path.join(args.unit_dir, unit), text)
    _write(os.path.join(args.unit_dir, "docker.service.d", f"10-{name}.conf"),
           f"[Unit]\nWants={name}.socket\nAfter={name}.socket\n")
    if not args.start:
        return 0
    if _systemd_running():
        subprocess.run(["systemctl", "daemon-reload"], check=True)
        subprocess.run(["systemctl", "enable", "--now", f"{name}.socket"], check=True)
        print(f"{name}.socket enabled; dockerd's first connection starts strata")
        return 0
    return _start_detached(name, serve_args(args))


def _start_detached(name: str, extra: list[str]) -> int:
    if _running_pid(name):
        print(f"strata {name} already running (pid {_running_pid(name)})")
        return 0
    os.makedirs("/run/strata", exist_ok=True)
    log_path = f"/var/log/strata-{name}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "plugin", "serve", "--name", name, *extra],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            cwd="/", env={**os.environ, "PYTHONPATH": PACKAGE_PARENT})
    _write(pid_file(name), f"{proc.pid}\n")
    for _ in range(100):
        if os.path.exists(socket_path(name)):
            print(f"strata {name} serving on {socket_path(name)} (pid {proc.pid}, log {log_path})")
            return 0
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    print(f"strata {name} did not start; see {log_path}", file=sys.stderr)
    return 1


def _running_pid(name: str) -> int | None:
    try:
        with open(pid_file(name), encoding="ascii") as f:
            pid = int(f.read().strip())
        os.kill(pid, 0)
        return pid
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None


def uninstall(args: argparse.Namespace) -> int:
    name = args.name
    if _systemd_running():
        subprocess.run(["systemctl", "disable", "--now", f"{name}.socket", f"{name}.service"],
                       check=False)
    pid = _running_pid(name)
    if pid:
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
    paths = [os.path.join(args.spec_dir, f"{name}.spec"), pid_file(name),
             os.path.join(args.unit_dir, "docker.service.d", f"10-{name}.conf"),
             *(os.path.join(args.unit_dir, unit) for unit in render_units(name, []))]
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            print(f"removed {path}")
    if _systemd_running():
        subprocess.run(["systemctl", "daemon-reload"], check=False)
    return 0


def check(args: argparse.Namespace) -> int:
    """A readiness report: what this host offers each backend."""
    kernel = probes.filesystems()
    home = args.home
    rows = [
        ("kernel", os.uname().release),
        ("backing filesystem of " + home, probes.fs_name(home)),
        ("overlay", "yes" if "overlay" in kernel else "no"),
        ("btrfs", "yes" if "btrfs" in kernel else "no"),
        ("fuse", "yes" if os.path.exists("/dev/fuse") else "no"),
        ("device-mapper", "yes" if os.path.exists("/dev/mapper/control") else "no"),
        ("aufs", "yes" if "aufs" in kernel else "no"),
        ("dockerd", _dockerd_version()),
        ("dockerd experimental (daemon.json)", _daemon_json_experimental()),
        ("graphdriver plugins", ("supported by Docker 20.10-27.x with --experimental "
                                 "(27.x: DOCKERD_DEPRECATED_GRAPHDRIVER_PLUGINS=1); "
                                 "removed in 28")),
        *probes.userns_report(home),
    ]
    for key, value in rows:
        print(f"{key:<40} {value}")
    return 0


def _daemon_json_experimental(path: str = "/etc/docker/daemon.json") -> str:
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        return f"no {path}: pass --experimental to dockerd"
    except ValueError as e:
        return f"{path} is not valid JSON: {e}"
    if config.get("experimental") is True:
        return "yes"
    return f"no: add \"experimental\": true to {path} or pass --experimental"


def _dockerd_version() -> str:
    try:
        out = subprocess.run(["dockerd", "--version"], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return "not installed"
    return out.stdout.strip() or out.stderr.strip()
