"""Unit ring: socket activation, readiness notification, the shipped units."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest

from plugin.install import render_units
from plugin.server import activation

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_shipped_units_are_what_install_writes() -> None:
    for name, text in render_units("strata", [], python="/opt/strata/bin/python").items():
        with open(os.path.join(REPO, "systemd", name)) as f:
            assert f.read() == text, name
    with open(os.path.join(REPO, "spec", "strata.spec")) as f:
        assert f.read().strip() == "unix:///run/docker/plugins/strata.sock"


def test_notify_reaches_the_service_manager(tmp_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path = os.path.join(str(tmp_path), "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert activation.notify("READY=1")
        assert manager.recv(64) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not activation.notify("READY=1")


def test_listen_fds_ignores_another_pids_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert activation.listen_fds() == []
    assert "LISTEN_FDS" not in os.environ


def test_listen_fds_adopts_the_passed_socket(tmp_path: str) -> None:
    """A child started with fd 3 bound and LISTEN_PID=itself serves on it."""
    path = os.path.join(str(tmp_path), "s.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    code = textwrap.dedent("""
        import os, sys
        os.environ["LISTEN_PID"] = str(os.getpid())
        os.environ["LISTEN_FDS"] = "1"
        from plugin.server.activation import listen_fds
        socks = listen_fds()
        conn, _ = socks[0].accept()
        conn.sendall(b"adopted %d" % socks[0].fileno())
    """)
    # The shell moves the listener to fd 3, where sd_listen_fds(3) expects it.
    fd = listener.fileno()
    proc = subprocess.Popen(["bash", "-c", f'exec 3<&{fd} {fd}<&-; exec "$@"', "sh",
                             sys.executable, "-c", code], pass_fds=(fd,), cwd=REPO)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(30)
            client.connect(path)
            assert client.recv(64) == b"adopted 3"
    finally:
        assert proc.wait(timeout=30) == 0
        listener.close()
