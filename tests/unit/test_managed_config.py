"""Unit ring: the managed plugin's config.json and what ``--managed`` changes."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from plugin import cli, managed
from plugin.driver import registry
from plugin.driver.manager import DriverManager
from plugin.errors import InvalidArgument, Prerequisites
from plugin.idtools import IDMappings
from plugin.state.config import init_path

REPO = Path(__file__).resolve().parents[2]


def config() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(managed.config_json())
    return loaded


def serve_actions() -> dict[str, argparse.Action]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a for a in sub.choices["serve"]._actions}


def test_spec_config_is_the_packaged_config() -> None:
    """spec/config.json and the packaged copy cannot drift: one is the other."""
    spec = REPO / "spec" / "config.json"
    assert spec.read_bytes() == managed.config_json()
    assert spec.resolve() == (REPO / "plugin" / "data" / "config.json").resolve()


def test_config_is_a_graphdriver_on_stratas_default_socket() -> None:
    cfg = config()
    assert cfg["interface"] == {"socket": f"{cli.DEFAULT_NAME}.sock",
                                "types": ["docker.graphdriver/1.0"]}
    assert cfg["entrypoint"][0] == managed.ENTRYPOINT
    assert cfg["propagatedMount"] == managed.PROPAGATED_MOUNT
    assert managed.under_propagated_mount(managed.MANAGED_STATE_DIR)
    assert cfg["linux"]["capabilities"] == ["CAP_SYS_ADMIN"]
    assert cfg["linux"]["allowAllDevices"] is True


def test_every_config_env_is_a_valid_serve_option() -> None:
    actions = serve_actions()
    env = config()["env"]
    assert {e["name"] for e in env} >= {"STRATA_MANAGED", "STRATA_BACKEND",
                                        "STRATA_LOG_LEVEL", "STRATA_STATE_DIR"}
    for entry in env:
        dest = entry["name"].removeprefix("STRATA_").lower()
        assert dest in actions, f"{entry['name']} names no `strata serve` option"
        choices = actions[dest].choices
        if choices is not None:
            assert entry["value"] in choices, entry
    managed_entry = next(e for e in env if e["name"] == "STRATA_MANAGED")
    assert managed.is_managed({"STRATA_MANAGED": managed_entry["value"]})
    assert not managed_entry.get("settable"), "STRATA_MANAGED must not be settable"


def test_the_config_env_runs_serve_managed(monkeypatch: pytest.MonkeyPatch) -> None:
    for entry in config()["env"]:
        monkeypatch.setenv(entry["name"], entry["value"])
    args = cli.parse_args(["serve"])
    assert args.managed
    assert args.backend == "auto"
    assert cli.serve_state_dir(args) == "/var/lib/docker/.strata-state"


def test_state_dir_defaults() -> None:
    parse = cli.parse_args
    assert cli.serve_state_dir(parse(["serve", "--name", "x"])) == "/var/lib/strata/x"
    assert cli.serve_state_dir(parse(["serve", "--managed"])) == managed.MANAGED_STATE_DIR
    chosen = parse(["serve", "--managed", "--state-dir", "/var/lib/docker/s"])
    assert cli.serve_state_dir(chosen) == "/var/lib/docker/s"


def test_managed_refuses_fuse_overlayfs_at_init(tmp_path: Path) -> None:
    state = tmp_path / "state"
    manager = DriverManager(str(state), "fuse-overlayfs",
                            refused_backends=managed.REFUSED_BACKENDS)
    with pytest.raises(Prerequisites, match="cannot serve as a managed plugin"):
        manager.init(str(tmp_path / "home"), [], [], [])
    assert not os.path.exists(init_path(str(state))), "a refused Init must not be recorded"


def test_auto_passes_over_excluded_backends(tmp_path: Path) -> None:
    excluded = {b for b in registry.PRIORITY if b != "vfs"}
    driver = registry.new(str(tmp_path), [], IDMappings(), exclude=excluded)
    try:
        assert driver.name == "vfs"
    finally:
        driver.close()
    with pytest.raises(Prerequisites, match="no backend can run"):
        registry.new(str(tmp_path), [], IDMappings(), exclude=registry.PRIORITY)


def test_managed_serve_logs_on_stdout(tmp_path: Path) -> None:
    """dockerd logs a managed plugin's stderr at error level: nothing may go there."""
    sock = tmp_path / "s.sock"
    env = {**os.environ, "STRATA_MANAGED": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "plugin", "serve", "--socket", str(sock),
         "--state-dir", str(tmp_path / "state")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    seen = b""
    try:
        while b"serving strata on" not in seen:
            line = proc.stdout.readline()
            assert line, f"the server exited: {seen!r}"
            seen += line
        # an answer comes from the running loop, after the SIGTERM handler is set
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(sock))
            client.sendall(b"POST /Plugin.Activate HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
            assert b"GraphDriver" in client.recv(4096)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    out = seen + out
    assert b"serving strata on" in out
    assert b"shutting down" in out
    assert err == b""


def test_plugin_create_removes_its_temp_dir_on_failure(tmp_path: Path) -> None:
    with pytest.raises(managed.PluginCreateError, match="no docker CLI"):
        managed.create_plugin("x", "img", docker=str(tmp_path / "no-docker"),
                              tmpdir=str(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == []


def test_plugin_create_refuses_a_config_that_is_not_json(tmp_path: Path) -> None:
    bad = tmp_path / "config.json"
    bad.write_text("{")
    with pytest.raises(InvalidArgument, match="--config"):
        managed.create_plugin("x", "img", config=str(bad), tmpdir=str(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
