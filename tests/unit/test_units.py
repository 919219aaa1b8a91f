"""The systemd units (tests/unit/test_activation.py checks the repo's are what install
renders): the repo's and what ``strata install`` writes pass ``systemd-analyze
verify`` with no warning, carry the hardening (and only inet when a metrics address is
configured), and score the exposure the README states."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="no systemd-analyze (apt systemd)")
INSTALLED_PYTHON = "/opt/strata/bin/python"  # what the README's set-up installs


def verify(unit_dir: Path) -> None:
    """``systemd-analyze verify`` of every unit in ``unit_dir``: exit 0 and not one
    message (an unknown or misspelt key is only a warning, with exit status 0)."""
    units = sorted(str(p) for p in unit_dir.iterdir() if p.suffix in (".service", ".socket"))
    done = subprocess.run([str(ANALYZE), "verify", *units], capture_output=True, text=True,
                          check=False, timeout=120)
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), \
        done.stdout + done.stderr


def exposure(service: Path) -> tuple[str, str]:
    done = subprocess.run([str(ANALYZE), "security", "--offline=true", str(service)],
                          capture_output=True, text=True, check=False, timeout=120)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d) (\w+)", done.stdout)
    assert found, done.stdout + done.stderr
    passed = {line.split()[1] for line in done.stdout.splitlines() if line.startswith("✓")}
    assert {"NoNewPrivileges=", "SystemCallArchitectures=", "LockPersonality=",
            "RestrictRealtime=", "CapabilityBoundingSet=~CAP_SYS_MODULE",
            "RestrictNamespaces=~user"} <= passed, done.stdout
    return found.group(1), found.group(2)


def runnable_copy(src: Path, dest: Path) -> Path:
    """The repo's units with ExecStart's python pointed at one that exists here
    (verify checks that the command is executable)."""
    dest.mkdir()
    for unit in src.iterdir():
        text = unit.read_text().replace(INSTALLED_PYTHON, sys.executable)
        (dest / unit.name).write_text(text)
    return dest


@needs_analyze
def test_repo_units_verify_and_score_the_readme_exposure(tmp_path: Path) -> None:
    units = runnable_copy(REPO / "systemd", tmp_path / "units")
    verify(units)
    score, verdict = exposure(units / "strata.service")
    readme = (REPO / "README.md").read_text()
    assert f"`strata.service` as shipped (unix sockets only) | {score} {verdict}" in readme


def install(tmp_path: Path, *extra: str) -> Path:
    unit_dir = tmp_path / "units"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
    done = subprocess.run(
        [sys.executable, "-m", "plugin", "install", "--name", "strata-u", "--spec-dir",
         str(tmp_path / "plugins"), "--unit-dir", str(unit_dir), *extra],
        capture_output=True, text=True, cwd=REPO, env=env, check=False, timeout=60)
    assert done.returncode == 0, done.stderr
    return unit_dir


def service_lines(unit_dir: Path) -> dict[str, str]:
    text = (unit_dir / "strata-u.service").read_text()
    return dict(line.split("=", 1) for line in text.splitlines()
                if "=" in line and not line.startswith("#"))


@needs_analyze
def test_installed_units_unix_only(tmp_path: Path) -> None:
    unit_dir = install(tmp_path, "--backend", "vfs")
    verify(unit_dir)
    lines = service_lines(unit_dir)
    assert lines["ExecStart"].endswith("serve --name strata-u --backend vfs")
    assert lines["RestrictAddressFamilies"] == "AF_UNIX"
    assert lines["IPAddressDeny"] == "any"
    exposure(unit_dir / "strata-u.service")


@needs_analyze
def test_installed_units_with_a_metrics_address_allow_inet(tmp_path: Path) -> None:
    conf = tmp_path / "strata.toml"
    conf.write_text('log_level = "debug"\n')
    unit_dir = install(tmp_path, "--config", str(conf), "--metrics-address", "127.0.0.1:9464")
    verify(unit_dir)
    lines = service_lines(unit_dir)
    assert lines["ExecStart"].endswith(
        f"serve --name strata-u --config {conf} --metrics-address 127.0.0.1:9464")
    assert lines["RestrictAddressFamilies"] == "AF_UNIX AF_INET AF_INET6"
    assert "IPAddressDeny" not in lines
    score, verdict = exposure(unit_dir / "strata-u.service")
    readme = (REPO / "README.md").read_text()
    assert f"with a metrics address (inet allowed) | {score} {verdict}" in readme


@needs_analyze
def test_installed_snapshotter_unit_verifies_and_is_hardened(tmp_path: Path) -> None:
    """``install --containerd`` writes the snapshotter's unit with the same sandboxing."""
    unit_dir = tmp_path / "units"
    config_path = tmp_path / "config.toml"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
    done = subprocess.run(
        [sys.executable, "-m", "plugin", "install", "--containerd", "--name", "strata-u",
         "--containerd-config", str(config_path), "--unit-dir", str(unit_dir),
         "--snapshotter-socket", str(tmp_path / "snap.sock"),
         "--snapshotter-root", str(tmp_path / "root")],
        capture_output=True, text=True, cwd=REPO, env=env, check=False, timeout=60)
    assert done.returncode == 0, done.stderr
    unit = unit_dir / "strata-u-snapshotter.service"
    verify(unit_dir)
    text = unit.read_text()
    assert "RestrictAddressFamilies=AF_UNIX\n" in text and "IPAddressDeny=any\n" in text
    score, verdict = exposure(unit)
    readme = (REPO / "README.md").read_text()
    assert f"from `strata install --containerd` (the same lines) | {score} {verdict}" in readme
