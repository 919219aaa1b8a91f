"""strata migrate's refusals and layout moves, on a data root laid out by hand.

The engine ring (tests/engine/test_migrate_engine.py) migrates a root dockerd
made; these cover what that root never shows: each reason to refuse, and that a
refusal changes nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.plugin import plugin_env

BASE, CHILD = "a" * 64, "b" * 64


def make_root(root: Path) -> None:
    """An overlay2 root: a base layer, a child on it, their layerdb, one container."""
    home = root / "overlay2"
    (home / "l").mkdir(parents=True)
    for layer_id, link, lower in ((BASE, "LINKBASE", ""), (CHILD, "LINKCHILD", "l/LINKBASE")):
        (home / layer_id / "diff").mkdir(parents=True)
        (home / layer_id / "diff" / f"file-{link}").write_text(link)
        (home / layer_id / "link").write_text(link)
        if lower:
            (home / layer_id / "lower").write_text(lower)
            (home / layer_id / "work").mkdir()
        (home / "l" / link).symlink_to(f"../{layer_id}/diff")
    chain = root / "image/overlay2/layerdb/sha256/c1"
    chain.mkdir(parents=True)
    (chain / "cache-id").write_text(BASE)
    record = root / "containers/cid1/config.v2.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"ID": "cid1", "Driver": "overlay2",  # compact, as Go writes
                                  "State": {"Running": False}}, separators=(",", ":")))


def migrate(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "plugin", "migrate", "--data-root", str(root),
                           "--to", "strata-u", *args], capture_output=True, text=True,
                          env=plugin_env(), check=False, timeout=60)


def snapshot(root: Path) -> list[tuple[str, str]]:
    return sorted((str(p.relative_to(root)), os.readlink(p) if p.is_symlink() else
                   (p.read_text() if p.is_file() else "dir")) for p in root.rglob("*"))


def test_round_trip_moves_layers_and_rewrites_records(tmp_path: Path) -> None:
    make_root(tmp_path)
    before = snapshot(tmp_path)
    done = migrate(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    home = tmp_path / "strata-u"
    assert os.readlink(home / "l/LINKCHILD") == f"../layers/{CHILD}/diff"
    assert json.loads((home / "layers" / CHILD / "meta.json").read_text())["parent"] == BASE
    assert (home / "layers" / CHILD / "merged").is_dir()
    assert (tmp_path / "image/strata-u/layerdb/sha256/c1/cache-id").read_text() == BASE
    record = json.loads((tmp_path / "containers/cid1/config.v2.json").read_text())
    assert record["Driver"] == "strata-u"
    assert not (tmp_path / "overlay2").exists() and not (tmp_path / ".strata-migrate").exists()
    back = migrate(tmp_path, "--back")
    assert back.returncode == 0, back.stdout + back.stderr
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("damage, reason", [
    (lambda r: (r / "overlay2" / BASE / "link").unlink(), "no usable link file"),
    (lambda r: (r / "overlay2" / "stray.txt").write_text("x"), "is not a directory"),
    (lambda r: (r / "overlay2" / CHILD / "lower").write_text("l/NOSUCH"), "which no layer owns"),
    (lambda r: (r / "image/overlay2/layerdb/sha256/c1/cache-id").write_text("c" * 64),
     "which"),
    (lambda r: (r / "containers/cid1/config.v2.json").write_text(
        json.dumps({"Driver": "overlay2", "State": {"Running": True}})), "recorded as running"),
    (lambda r: (r / "strata-u/layers/x/diff").mkdir(parents=True), "already holds"),
    (lambda r: (r / "image/strata-u").mkdir(parents=True), "already exists"),
])
def test_refusals_change_nothing(tmp_path: Path, damage: object, reason: str) -> None:
    make_root(tmp_path)
    damage(tmp_path)  # type: ignore[operator]
    before = snapshot(tmp_path)
    for args in (("--dry-run",), ()):
        refused = migrate(tmp_path, *args)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert "refused" in refused.stdout and reason in refused.stdout, refused.stdout
    assert snapshot(tmp_path) == before


def test_refuses_while_a_process_holds_the_root(tmp_path: Path) -> None:
    make_root(tmp_path)
    holder = subprocess.Popen(["sleep", "60"], cwd=tmp_path / "containers")
    try:
        refused = migrate(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert refused.returncode == 2 and f"process {holder.pid} (sleep)" in refused.stdout
    assert (tmp_path / "overlay2" / BASE).is_dir()


def test_refuses_a_mounted_layer_and_another_filesystem(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    make_root(tmp_path)
    merged = tmp_path / "overlay2" / CHILD / "merged"
    merged.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(merged)], check=True)
    try:
        refused = migrate(tmp_path, "--dry-run")
    finally:
        subprocess.run(["umount", str(merged)], check=True)
    assert refused.returncode == 2 and f"{merged} is mounted" in refused.stdout
    home = tmp_path / "overlay2"
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(home)], check=True)
    try:
        refused = migrate(tmp_path, "--dry-run")
    finally:
        subprocess.run(["umount", str(home)], check=True)
    assert refused.returncode == 2 and "on another filesystem" in refused.stdout


def test_strata_init_refuses_an_unfinished_migration(tmp_path: Path) -> None:
    from plugin.driver.manager import DriverManager
    from plugin.errors import Prerequisites

    (tmp_path / ".strata-migrate").mkdir()
    (tmp_path / ".strata-migrate/journal.json").write_text("{}")
    manager = DriverManager(str(tmp_path / "state"), "vfs")
    with pytest.raises(Prerequisites, match="strata migrate"):
        manager.init(str(tmp_path / "strata-u"), [], [], [])
