"""The dependency floors in pyproject.toml are versions strata really works with.

A venv holds every runtime and test dependency at exactly its floor
(``floors.py``); in it, as a child process, run the protocol conformance suite
and the bad and fuzzed requests on vfs, and the archive tests that use
hypothesis.  The suites run the server in pytest's own loop, so uvloop is
exercised separately: ``strata serve`` (which installs uvloop) answers a few
calls from that venv.

Only the package index being out of reach skips this (the reason is printed);
a floor that fails to install or to pass fails it.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.deps.floors import (
    ROOT,
    SUMMARY_KEY,
    FloorsVenv,
    floor_of,
    floors,
    floors_venv,
)

#: The child run: never ``tests/deps`` (no recursion), only vfs (no loop devices or
#: pools shared with the outer run), and the hypothesis users among the unit tests.
INNER_RUN = ["tests/protocol", "tests/hostile/test_bad_requests.py",
             "tests/unit/test_archive_tarread.py", "tests/unit/test_archive_filehelper.py",
             "-k", "vfs or tarread or filehelper"]


def child_env() -> dict[str, str]:
    """The outer run's environment without what belongs to the outer pytest."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith("PYTEST_") and k != "PYTHONPATH"}


@pytest.fixture(scope="module")
def venv(pytestconfig: pytest.Config) -> FloorsVenv:
    pins = floors()
    made = floors_venv(pins)
    if isinstance(made, str):
        pytest.skip(made)
    how = "built" if made.built else "kept from an earlier run, checked"
    summary = pytestconfig.stash.setdefault(SUMMARY_KEY, [])
    summary.append("pins: " + " ".join(f"{name}=={floor}" for name, floor in pins.items()))
    summary.append(f"venv {made.path}: {how} in {made.seconds:.1f}s")
    return made


@pytest.fixture
def scratch() -> Iterator[str]:
    # Short: the socket path below must stay under 108 bytes.
    path = tempfile.mkdtemp(prefix="floors-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_every_dependency_has_one_floor() -> None:
    assert floor_of("aiohttp>=3.14,<4") == ("aiohttp", "3.14")
    assert floor_of("grpcio-tools==1.85.1") == ("grpcio-tools", "1.85.1")
    for spec in ("aiohttp", "aiohttp>=3.14,>=3.15", "aiohttp>=3.14,==3.15"):
        with pytest.raises(ValueError, match="floor"):
            floor_of(spec)
    names = set(floors())
    assert {"aiohttp", "msgspec", "uvloop", "grpclib", "protobuf", "prometheus-client",
            "pytest", "pytest-asyncio", "ruff", "mypy"} <= names


def test_suites_pass_with_every_dependency_at_its_floor(
        venv: FloorsVenv, scratch: str, pytestconfig: pytest.Config) -> None:
    started = time.monotonic()
    # A basetemp of its own: the child never prunes the outer run's /tmp/pytest-of-*.
    done = subprocess.run(
        [venv.python, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         f"--basetemp={scratch}/basetemp", *INNER_RUN],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=1800)
    lines = done.stdout.strip().splitlines()
    last = lines[-1] if lines else "(no output)"
    pytestconfig.stash.setdefault(SUMMARY_KEY, []).append(
        f"suites at the floors: {last} ({time.monotonic() - started:.0f}s with start-up)")
    print(last)
    assert done.returncode == 0, f"{last}\n{done.stdout[-6000:]}\n{done.stderr[-2000:]}"
    # Skips are the suite's own (a backend or a depth that does not apply); what a
    # floor breaks shows as a failure or an error.
    assert " passed" in last and "failed" not in last and "error" not in last, last


def call(socket_path: str, op: str, body: dict[str, Any]) -> dict[str, Any]:
    """One POST as dockerd makes it, on a plain stdlib connection."""
    conn = http.client.HTTPConnection("plugin", timeout=60)
    conn.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.sock.settimeout(60)
    conn.sock.connect(socket_path)
    try:
        conn.request("POST", f"/{op}", body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        reply: dict[str, Any] = json.loads(response.read())
    finally:
        conn.close()
    assert response.status == 200 and not reply.get("Err"), f"{op}: {response.status} {reply}"
    return reply


def wait_for_socket(path: str, server: subprocess.Popen[bytes], log: str) -> None:
    deadline = time.monotonic() + 60
    while not os.path.exists(path):
        if server.poll() is not None or time.monotonic() > deadline:
            with open(log, encoding="utf-8", errors="replace") as f:
                raise AssertionError(f"strata serve did not come up:\n{f.read()[-3000:]}")
        time.sleep(0.1)


def test_strata_serve_runs_on_uvloop_at_its_floor(venv: FloorsVenv, scratch: str) -> None:
    socket_path, log = os.path.join(scratch, "p.sock"), os.path.join(scratch, "serve.log")
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [os.path.join(venv.path, "bin", "strata"), "serve", "--backend", "vfs",
             "--name", f"floors-{os.getpid()}", "--socket", socket_path,
             "--state-dir", os.path.join(scratch, "state")],
            stdout=out, stderr=subprocess.STDOUT, env=child_env())
    try:
        wait_for_socket(socket_path, server, log)
        with open(f"/proc/{server.pid}/maps", encoding="utf-8") as f:
            # cli.py imports uvloop only to install it as the loop, just before serving.
            assert "/uvloop/" in f.read(), "strata serve did not load uvloop"
        call(socket_path, "Plugin.Activate", {})
        call(socket_path, "GraphDriver.Init", {"Home": os.path.join(scratch, "home"),
                                               "Opts": None, "UIDMaps": None, "GIDMaps": None})
        call(socket_path, "GraphDriver.Create", {"ID": "floor", "Parent": ""})
        assert call(socket_path, "GraphDriver.Exists", {"ID": "floor"})["Exists"] is True
        call(socket_path, "GraphDriver.Cleanup", {})
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    with open(log, encoding="utf-8", errors="replace") as f:
        assert server.returncode == 0, f.read()[-3000:]
