"""``strata install --containerd``: the unit and the [proxy_plugins] table, on temp paths only.

The user's config comes back byte for byte after install + uninstall, everything outside
our table is kept byte for byte, a different table is refused without --force, and
containerd itself (``containerd --config PATH config dump``) accepts what was written.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from plugin import cli, containerd_setup
from plugin.containerd_setup import MARKER, add_proxy_plugin, remove_proxy_plugin
from plugin.errors import ConfigError

SOCK = "/run/strata/snapshotter.sock"

#: A config as a user keeps it: comments, CRI settings, another proxy plugin, odd spacing.
USER_V2 = """# managed by hand, do not reformat
version = 2
root = "/var/lib/containerd"

[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "overlayfs"   # keep this comment
  default_runtime_name = "runc"

[proxy_plugins]
  [proxy_plugins.stargz]
    type = "snapshot"
    address = "/run/containerd-stargz-grpc/containerd-stargz-grpc.sock"

[plugins."io.containerd.gc.v1.scheduler"]
  pause_threshold = 0.02
"""

USER_V1 = """root = "/var/lib/containerd"
[plugins.cri]
  sandbox_image = "registry.k8s.io/pause:3.6"
"""


@pytest.mark.parametrize("text", [USER_V2, USER_V1, USER_V2.rstrip("\n"), ""],
                         ids=["v2", "v1", "no-final-newline", "empty"])
def test_round_trip_keeps_the_users_text(text: str) -> None:
    added = add_proxy_plugin(text, "strata", SOCK)
    assert added.action == "added"
    assert added.text.startswith(text)  # the user's bytes untouched, ours appended
    doc = tomllib.loads(added.text)
    assert doc["proxy_plugins"]["strata"] == {"type": "snapshot", "address": SOCK}
    assert MARKER in added.text
    removed = remove_proxy_plugin(added.text, "strata")
    assert removed.action == "removed"
    # exact when the file ended with a newline; otherwise one newline is left added
    assert removed.text in (text, text + "\n"), removed.text
    assert tomllib.loads(removed.text) == tomllib.loads(text)


def test_present_is_a_no_op_and_other_plugins_stay() -> None:
    once = add_proxy_plugin(USER_V2, "strata", SOCK).text
    again = add_proxy_plugin(once, "strata", SOCK)
    assert (again.action, again.text) == ("present", once)
    assert tomllib.loads(once)["proxy_plugins"]["stargz"]["type"] == "snapshot"
    assert remove_proxy_plugin(USER_V2, "strata").action == "absent"


def test_a_different_table_is_refused_unless_forced() -> None:
    theirs = USER_V2 + '\n[proxy_plugins.strata]\n  type = "snapshot"\n  address = "/old.sock"\n'
    with pytest.raises(ConfigError, match=r"different.*--force"):
        add_proxy_plugin(theirs, "strata", SOCK)
    forced = add_proxy_plugin(theirs, "strata", SOCK, force=True)
    assert forced.action == "replaced"
    assert forced.text.startswith(USER_V2)
    assert "/old.sock" not in forced.text
    assert tomllib.loads(forced.text)["proxy_plugins"]["strata"]["address"] == SOCK


def test_a_user_table_in_the_middle_is_removed_alone() -> None:
    head, tail = USER_V2.split("[plugins.\"io.containerd.gc")
    text = (head + '[proxy_plugins.strata]\n  type = "snapshot"\n  address = "/x"\n\n'
            + '[plugins."io.containerd.gc' + tail)
    removed = remove_proxy_plugin(text, "strata").text
    assert removed == USER_V2


@pytest.mark.parametrize("text, message", [
    ("version = 7\n", "version 7"),
    ("version = 2\n[plugins\n", "not valid TOML"),
    ('version = 2\nproxy_plugins = { other = { type = "snapshot", address = "/o" } }\n',
     "TOML"),
    ("version = 2\nproxy_plugins = 3\n", "not a table"),
], ids=["unknown-version", "broken", "inline-table", "not-a-table"])
def test_refusals_name_the_reason(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        add_proxy_plugin(text, "strata", SOCK)


def test_inline_strata_table_is_left_to_the_user() -> None:
    text = 'version = 2\nproxy_plugins.strata = { type = "snapshot", address = "/o" }\n'
    with pytest.raises(ConfigError, match="edit it by hand"):
        add_proxy_plugin(text, "strata", SOCK, force=True)
    with pytest.raises(ConfigError, match="edit it by hand"):
        remove_proxy_plugin(text, "strata")


def test_a_name_that_needs_quotes() -> None:
    text = add_proxy_plugin(USER_V2, "strata.v2", SOCK).text
    assert tomllib.loads(text)["proxy_plugins"]["strata.v2"]["address"] == SOCK
    assert remove_proxy_plugin(text, "strata.v2").text == USER_V2


# ---- the command, on temp paths (systemd is never asked) -----------------------------

@pytest.fixture
def no_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(containerd_setup, "_systemd_running", lambda: False)


def _install(tmp_path: Path, config: Path, *extra: str) -> int:
    return cli.main(["install", "--containerd", "--containerd-config", str(config),
                     "--unit-dir", str(tmp_path / "units"), "--snapshotter-socket", SOCK,
                     "--snapshotter-root", str(tmp_path / "root"),
                     "--snapshotter-backend", "vfs", *extra])


def test_command_round_trip(tmp_path: Path, no_systemd: None) -> None:
    config = tmp_path / "config.toml"
    config.write_text(USER_V2)
    config.chmod(0o600)
    assert _install(tmp_path, config) == 0
    unit = (tmp_path / "units" / "strata-snapshotter.service").read_text()
    assert "Type=notify" in unit and "WantedBy=multi-user.target containerd.service" in unit
    assert (f"-m plugin snapshotter --socket {SOCK} --root {tmp_path / 'root'} "
            "--backend vfs") in unit
    assert config.read_text().startswith(USER_V2)
    assert (config.stat().st_mode & 0o777) == 0o600
    assert Path(f"{config}.strata.bak").read_text() == USER_V2
    mtime = config.stat().st_mtime_ns
    assert _install(tmp_path, config) == 0  # present: not rewritten
    assert config.stat().st_mtime_ns == mtime
    assert cli.main(["uninstall", "--containerd", "--containerd-config", str(config),
                     "--unit-dir", str(tmp_path / "units")]) == 0
    assert config.read_text() == USER_V2
    assert not (tmp_path / "units" / "strata-snapshotter.service").exists()


def test_command_refusal_writes_nothing(tmp_path: Path, no_systemd: None,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.toml"
    theirs = 'version = 2\n[proxy_plugins.strata]\n  type = "snapshot"\n  address = "/o"\n'
    config.write_text(theirs)
    assert _install(tmp_path, config) == 1
    assert "--force" in capsys.readouterr().err
    assert config.read_text() == theirs
    assert not (tmp_path / "units").exists()
    assert not Path(f"{config}.strata.bak").exists()
    assert _install(tmp_path, config, "--force") == 0
    assert tomllib.loads(config.read_text())["proxy_plugins"]["strata"]["address"] == SOCK


def test_command_creates_a_v2_config(tmp_path: Path, no_systemd: None) -> None:
    config = tmp_path / "etc" / "containerd" / "config.toml"
    assert _install(tmp_path, config) == 0
    assert tomllib.loads(config.read_text())["version"] == 2


# ---- containerd's own reading of the result ---------------------------------------------

@pytest.mark.skipif(shutil.which("containerd") is None, reason="no containerd binary")
@pytest.mark.parametrize("text", [USER_V2, USER_V1, ""], ids=["v2", "v1", "empty"])
def test_containerd_accepts_the_result(tmp_path: Path, text: str) -> None:
    config = tmp_path / "config.toml"
    config.write_text(add_proxy_plugin(text or "version = 2\n", "strata", SOCK).text)
    dump = subprocess.run(["containerd", "--config", str(config), "config", "dump"],
                          capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "TMPDIR": str(tmp_path)})
    assert dump.returncode == 0, dump.stderr
    merged = tomllib.loads(dump.stdout)
    assert merged["proxy_plugins"]["strata"] == {"type": "snapshot", "address": SOCK}
    if text == USER_V2:
        assert merged["proxy_plugins"]["stargz"]["type"] == "snapshot"
    # and a broken table is not accepted (the check can fail)
    config.write_text("version = 2\n[proxy_plugins]\nstrata = 3\n")
    bad = subprocess.run(["containerd", "--config", str(config), "config", "dump"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode != 0
