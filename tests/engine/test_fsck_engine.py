"""``strata fsck`` against a real dockerd's data root: it names a planted
orphan layer and staging debris, never a layer dockerd uses, and ``--repair``
removes exactly those while images and containers keep working."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from tests.engine import harness
from tests.support.client import DockerLikeClient
from tests.support.plugin import plugin_env


def fsck(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "plugin", "fsck", *args], capture_output=True,
                          text=True, env=plugin_env(), timeout=120, check=False)


async def plant_orphan(socket_path: str, layer: str) -> None:
    client = DockerLikeClient(socket_path)
    try:
        await client.create(layer)
    finally:
        await client.close()


def test_fsck_finds_and_repairs_only_what_dockerd_does_not_own(
        stack: harness.Stack, base_image: str) -> None:
    if stack.plugin is None:
        pytest.skip("in-tree validation mode: no strata Home to check")
    stack.docker("create", "--name", "fsck-c", "--network", "none", base_image,
                 "/bin/cat", "/etc/motd")
    home = stack.dockerd.home
    asyncio.run(plant_orphan(str(stack.plugin.socket_path), "orphan-layer"))
    (home / "staging" / "junk.0123").mkdir()
    in_use = set(os.listdir(home / "layers")) - {"orphan-layer"}

    found = fsck("--home", str(home), "--min-age", "0")
    assert found.returncode == 1, found.stdout + found.stderr
    assert "orphaned layer: orphan-layer" in found.stdout
    assert "junk.0123" in found.stdout
    assert not any(layer in found.stdout for layer in in_use), found.stdout

    young = fsck("--home", str(home))  # default --min-age: a new layer may be registering
    assert "orphan-layer" not in young.stdout

    repaired = fsck("--home", str(home), "--min-age", "0", "--repair")
    assert repaired.returncode == 0 and "repaired" in repaired.stdout
    assert set(os.listdir(home / "layers")) == in_use
    assert os.listdir(home / "staging") == []
    again = fsck("--home", str(home), "--min-age", "0")
    assert again.returncode == 0 and "clean" in again.stdout, again.stdout
    out = stack.docker("start", "-a", "fsck-c").stdout
    assert out.strip()
    stack.docker("rm", "fsck-c")
