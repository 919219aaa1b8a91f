"""The settings table: file < environment < flag, refusals that name the key and the
file, and documentation that covers every key (``strata serve --help``, README)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from plugin import config
from plugin.cli import build_parser
from plugin.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def resolved(argv: list[str], env: dict[str, str]) -> config.Settings:
    args = build_parser().parse_args(argv)
    return config.resolve(args, args.command, env)


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_file_then_env_then_flag(tmp_path: Path) -> None:
    conf = write(tmp_path / "s.toml", 'backend = "overlay"\nlog_level = "warning"\n'
                 'deadline = 30\nsocket_mode = 0o660\nname = "fromfile"\n')
    env = {"STRATA_LOG_LEVEL": "error", "STRATA_DEADLINE": "45.5"}
    got = resolved(["serve", "--config", conf, "--deadline", "7"], env)
    assert got["backend"] == "overlay" and got.sources["backend"] == f"file {conf}"
    assert got["log_level"] == "error" and got.sources["log_level"] == "env STRATA_LOG_LEVEL"
    assert got["deadline"] == 7.0 and got.sources["deadline"] == "flag --deadline"
    assert got["socket_mode"] == 0o660 and got["name"] == "fromfile"
    assert got["socket"] is None and got.sources["socket"] == "default"
    assert got.file == conf


def test_defaults_without_a_file(tmp_path: Path) -> None:
    got = resolved(["serve", "--config", write(tmp_path / "e.toml", "")], {})
    for option in config.options_for(config.SERVE):
        assert got[option.key] == option.default, option.key
        assert got.sources[option.key] == "default"


def test_config_file_named_by_the_environment(tmp_path: Path) -> None:
    conf = write(tmp_path / "s.toml", 'storage_opt = ["vfs.x=1", "vfs.y=2"]\n')
    got = resolved(["serve"], {"STRATA_CONFIG": conf})
    assert got["storage_opt"] == ("vfs.x=1", "vfs.y=2")
    env_list = resolved(["serve"], {"STRATA_CONFIG": conf, "STRATA_STORAGE_OPT": "a=1,b=2"})
    assert env_list["storage_opt"] == ("a=1", "b=2")
    flags = resolved(["serve", "--storage-opt", "c=3", "--storage-opt", "d=4"],
                     {"STRATA_CONFIG": conf})
    assert flags["storage_opt"] == ("c=3", "d=4")


def test_empty_variable_counts_as_unset(tmp_path: Path) -> None:
    conf = write(tmp_path / "s.toml", 'backend = "vfs"\n')
    got = resolved(["serve", "--config", conf], {"STRATA_BACKEND": ""})
    assert got["backend"] == "vfs"


@pytest.mark.parametrize(("text", "names"), [
    ('bakend = "vfs"\n', ["'bakend'"]),
    ('[serve]\nbackend = "vfs"\n', ["'serve'"]),
    ('deadline = "soon"\n', ["deadline", "expected a number"]),
    ('backend = "ext9"\n', ["backend", "'ext9' is not one of"]),
    ('socket_mode = 0o1777\n', ["socket_mode"]),
    ('metrics_address = "localhost"\n', ["metrics_address", "HOST:PORT"]),
    ('storage_opt = "a=b"\n', ["storage_opt", "list of strings"]),
    ('backend = \n', ["not valid TOML"]),
])
def test_file_refusals_name_the_key_and_the_file(tmp_path: Path, text: str,
                                                 names: list[str]) -> None:
    conf = write(tmp_path / "bad.toml", text)
    with pytest.raises(ConfigError) as caught:
        resolved(["serve", "--config", conf], {})
    for needle in [conf, *names]:
        assert needle in str(caught.value)


def test_env_refusal_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="env STRATA_SOCKET_MODE: socket_mode"):
        resolved(["serve", "--config", os.devnull], {"STRATA_SOCKET_MODE": "999"})


def test_a_named_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        resolved(["serve", "--config", str(tmp_path / "none.toml")], {})
    with pytest.raises(ConfigError, match="does not exist"):
        resolved(["serve"], {"STRATA_CONFIG": str(tmp_path / "none.toml")})


def run_strata(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "plugin", *argv], capture_output=True,
                          text=True, cwd=REPO, env=full_env, timeout=60, check=False)


def test_strata_config_prints_values_and_sources(tmp_path: Path) -> None:
    conf = write(tmp_path / "s.toml", 'backend = "overlay"\ndeadline = 12\n')
    done = run_strata("config", "--config", conf, "--name", "flagname",
                      env={"STRATA_DEADLINE": "99"})
    assert done.returncode == 0, done.stderr
    lines = {line.split()[0]: line for line in done.stdout.splitlines()
             if not line.startswith("#")}
    assert lines["backend"].endswith(f'= "overlay"  # file {conf}')
    assert lines["deadline"].endswith("= 99  # env STRATA_DEADLINE")
    assert lines["name"].endswith('= "flagname"  # flag --name')
    assert lines["log_level"].endswith('= "info"  # default')


def test_serve_refuses_an_unknown_key_before_doing_anything(tmp_path: Path) -> None:
    conf = write(tmp_path / "s.toml", 'metrics_adress = "127.0.0.1:1"\n')
    sock = tmp_path / "never.sock"
    done = run_strata("serve", "--config", conf, "--socket", str(sock))
    assert done.returncode == 2
    assert f"config file {conf}: unknown key 'metrics_adress'" in done.stderr
    assert not sock.exists()


def test_help_and_readme_document_every_key_with_its_default() -> None:
    help_text = " ".join(run_strata("serve", "--help").stdout.split())
    readme = (REPO / "README.md").read_text()
    for option in config.options_for(config.SERVE):
        assert f"[key {option.key}, env {option.env}, default {option.shown_default()}]" \
            in help_text, option.key
        row = f"| `{option.key}` | {option.kind.name} | `{option.shown_default()}` |"
        assert row in readme, f"README lacks the row {row}"
