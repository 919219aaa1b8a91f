"""strata's settings: one table of options, read from a file, the environment and flags.

Every setting is one :class:`Option` in :data:`OPTIONS`: its key, its type, its
default and its help.  The three sources are all built from that table:

* the file: ``/etc/strata/strata.toml`` (missing is fine), or the one ``--config
  PATH`` or ``STRATA_CONFIG`` names (missing is an error), read with ``tomllib``,
  one top-level ``key = value`` per option; a key the table lacks is refused,
  naming the key and the file, so a typo never silently means "the default";
* the environment: ``STRATA_<KEY>`` (``STRATA_LOG_LEVEL=debug``; a list is
  comma-separated; an empty variable counts as unset, as systemd's
  ``Environment=X=`` means);
* flags: ``--<key with dashes>`` on each command the option belongs to.

Later sources win: default < file < environment < flag.  :func:`resolve`
returns every value with where it came from (``strata config`` prints both).

A command takes its options from the table by listing itself in
``Option.commands``; :func:`add_options` adds their flags to its parser.  A
command that names a setting differently on its command line (the containerd
snapshotter's ``--socket`` is not the graphdriver's) gets its own key
(``snapshotter_socket``) with ``flag="--socket"``.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from plugin.driver.registry import KNOWN
from plugin.errors import ConfigError
from plugin.snapshotter import BACKENDS as SNAPSHOTTER_BACKENDS

DEFAULT_FILE = "/etc/strata/strata.toml"
ENV_PREFIX = "STRATA_"
CONFIG_ENV = "STRATA_CONFIG"

SERVE = "serve"
INSTALL = "install"
FSCK = "fsck"
CONFIG = "config"
SNAPSHOTTER = "snapshotter"


# ---- the types an option can have ------------------------------------------------

@dataclass(frozen=True)
class Kind:
    """How one type of value is read from text (flag, environment) and from TOML,
    and how it is shown (in TOML syntax, so ``strata config`` output is a file)."""

    name: str
    from_text: Callable[[str], Any]
    from_toml: Callable[[Any], Any]
    show: Callable[[Any], str]


def _toml_str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _toml_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number, got {value!r}")
    return float(value)


def _octal(text: str) -> int:
    mode = int(text, 8)
    if not 0 <= mode <= 0o777:
        raise ValueError(f"{text!r} is not a permission mode (0000-0777)")
    return mode


def _toml_octal(value: Any) -> int:
    # TOML has octal literals (0o600); a string "0600" reads the way chmod's does.
    if isinstance(value, str):
        return _octal(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o777:
        raise ValueError(f"expected a mode such as \"0600\" or 0o600, got {value!r}")
    return value


def _toml_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected a list of strings, got {value!r}")
    return tuple(value)


def _address(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return text


def _quoted(value: Any) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


STR = Kind("string", str, _toml_str, _quoted)
FLOAT = Kind("number", float, _toml_float, lambda v: f"{v:g}")
OCTAL = Kind("mode", _octal, _toml_octal, lambda v: _quoted(f"{v:04o}"))
LIST = Kind("list of strings", lambda t: tuple(s for s in t.split(",") if s), _toml_list,
            lambda v: "[" + ", ".join(_quoted(s) for s in v) + "]")
ADDRESS = Kind("HOST:PORT", _address, lambda v: _address(_toml_str(v)), _quoted)


# ---- the table ---------------------------------------------------------------------

@dataclass(frozen=True)
class Option:
    key: str
    kind: Kind
    default: Any
    help: str
    commands: frozenset[str]
    choices: tuple[str, ...] = ()
    #: How the default reads in help when it depends on other settings.
    default_text: str | None = None
    #: The command-line flag, when it is not ``--<key with dashes>``.
    flag: str | None = None

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.key.upper()

    @property
    def flag_name(self) -> str:
        return self.flag or "--" + self.key.replace("_", "-")

    def shown_default(self) -> str:
        if self.default_text is not None:
            return self.default_text
        return "unset" if self.default is None else self.kind.show(self.default)

    def parse(self, raw: Any, text: bool) -> Any:
        value = self.kind.from_text(raw) if text else self.kind.from_toml(raw)
        if self.choices and value not in self.choices:
            raise ValueError(f"{value!r} is not one of {', '.join(self.choices)}")
        return value


def _commands(*names: str) -> frozenset[str]:
    return frozenset((CONFIG, *names))


OPTIONS: tuple[Option, ...] = (
    Option("name", STR, "strata", "plugin/driver name dockerd uses (--storage-driver NAME)",
           _commands(SERVE, INSTALL, FSCK)),
    Option("backend", STR, "auto", "storage backend; auto picks by Home's filesystem",
           _commands(SERVE, INSTALL), choices=(*KNOWN, "auto")),
    Option("socket", STR, None, "unix socket dockerd connects to",
           _commands(SERVE), default_text="/run/docker/plugins/NAME.sock"),
    Option("socket_mode", OCTAL, 0o600, "permissions of the socket(s) strata binds, octal",
           _commands(SERVE, SNAPSHOTTER)),
    Option("socket_group", STR, None, "group owning the socket(s) (use with socket_mode 0660)",
           _commands(SERVE, SNAPSHOTTER)),
    Option("state_dir", STR, None, "where the plugin keeps its own state (the Init record)",
           _commands(SERVE, FSCK), default_text="/var/lib/strata/NAME"),
    Option("spec_dir", STR, None, "write DIR/NAME.spec while serving (not needed when the "
           "socket is in /run/docker/plugins, which dockerd scans itself)", _commands(SERVE)),
    Option("storage_opt", LIST, (), "backend options key=value (Docker's prefixes: vfs., "
           "overlay2., ...); the flag may repeat, the variable is comma-separated",
           _commands(SERVE, SNAPSHOTTER)),
    Option("deadline", FLOAT, 600.0, "seconds a backend call may take before dockerd gets an "
           "Err (0 = wait forever, as dockerd itself does)", _commands(SERVE)),
    Option("log_level", STR, "info", "log level", _commands(SERVE, SNAPSHOTTER),
           choices=("debug", "info", "warning", "error")),
    Option("metrics_socket", STR, None, "serve Prometheus metrics (GET /metrics) on this unix "
           "socket; off when unset", _commands(SERVE)),
    Option("metrics_address", ADDRESS, None, "serve Prometheus metrics on this HOST:PORT "
           "(TCP); off when unset", _commands(SERVE, INSTALL)),
    # `strata snapshotter` (containerd's proxy snapshotter): keys of their own, so a
    # config file or environment can hold both servers' settings.
    Option("snapshotter_socket", STR, "/run/strata/snapshotter.sock", "unix socket containerd's "
           "[proxy_plugins] address names", _commands(SNAPSHOTTER), flag="--socket"),
    Option("snapshotter_root", STR, "/var/lib/strata/snapshotter", "where snapshots and their "
           "records live, never a Docker Home", _commands(SNAPSHOTTER), flag="--root"),
    Option("snapshotter_backend", STR, "overlay", "storage backend of the snapshotter",
           _commands(SNAPSHOTTER), choices=tuple(SNAPSHOTTER_BACKENDS), flag="--backend"),
)

BY_KEY: dict[str, Option] = {option.key: option for option in OPTIONS}


def options_for(command: str) -> list[Option]:
    return [option for option in OPTIONS if command in option.commands]


# ---- building the parser and resolving -----------------------------------------------

def add_options(parser: argparse.ArgumentParser, command: str) -> None:
    """``--config`` and the flag of every option of ``command``; each help line
    names the file key, the variable and the default."""
    parser.add_argument("--config", default=None, metavar="PATH",
                        help=f"the config file (env {CONFIG_ENV}; default {DEFAULT_FILE} "
                             "if it exists)")
    for option in options_for(command):
        def from_flag(text: str, option: Option = option) -> Any:
            try:
                # A list option's flag repeats: each flag is one item.
                return text if option.kind is LIST else option.parse(text, text=True)
            except ValueError as e:
                raise argparse.ArgumentTypeError(str(e)) from None

        # `strata config` takes every key, so two keys' shared flag (--socket of
        # serve and of snapshotter) is spelt after the key there.
        flag = "--" + option.key.replace("_", "-") if command == CONFIG else option.flag_name
        parser.add_argument(
            flag, dest=option.key, default=None, type=from_flag,
            action="append" if option.kind is LIST else "store",
            metavar=option.key.upper(),
            help=_help(option))


def _help(option: Option) -> str:
    one_of = f" (one of {', '.join(option.choices)})" if option.choices else ""
    text = (f"{option.help}{one_of} [key {option.key}, env {option.env}, "
            f"default {option.shown_default()}]")
    return text.replace("%", "%%")


@dataclass(frozen=True)
class Settings:
    """Every option's effective value and where it came from."""

    values: Mapping[str, Any]
    sources: Mapping[str, str]
    #: The file that was read, or None.
    file: str | None

    def __getitem__(self, key: str) -> Any:
        return self.values[key]


def config_path(flag: str | None, environ: Mapping[str, str]) -> tuple[str, bool]:
    """The file to read and whether it must exist (it was named, not defaulted)."""
    if flag:
        return flag, True
    if environ.get(CONFIG_ENV):
        return environ[CONFIG_ENV], True
    return DEFAULT_FILE, False


def read_file(path: str, required: bool, keys: Iterable[str]) -> dict[str, Any]:
    """The file's table, refusing what is not TOML and any key not in ``keys``."""
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except FileNotFoundError:
        if required:
            raise ConfigError(f"config file {path} does not exist") from None
        return {}
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    known = set(keys)
    for key in table:
        if key not in known:
            raise ConfigError(f"config file {path}: unknown key {key!r} (known keys: "
                              f"{', '.join(sorted(known))})")
    return table


def resolve(args: argparse.Namespace, command: str,
            environ: Mapping[str, str] | None = None) -> Settings:
    """Each option of ``command``: its flag, else its variable, else the file, else
    the default.  Raises ``ConfigError`` naming the key and the source."""
    env = os.environ if environ is None else environ
    path, required = config_path(getattr(args, "config", None), env)
    # Every key of the table is allowed in the file, also those another command uses.
    table = read_file(path, required, BY_KEY)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for option in options_for(command):
        flag_value = getattr(args, option.key, None)
        if flag_value is not None:
            value: Any = tuple(flag_value) if option.kind is LIST else flag_value
            values[option.key], sources[option.key] = value, f"flag {option.flag_name}"
        elif env.get(option.env):
            values[option.key] = _parse(option, env[option.env], f"env {option.env}", True)
            sources[option.key] = f"env {option.env}"
        elif option.key in table:
            values[option.key] = _parse(option, table[option.key], f"config file {path}", False)
            sources[option.key] = f"file {path}"
        else:
            values[option.key], sources[option.key] = option.default, "default"
    return Settings(values, sources, path if table or required else None)


def _parse(option: Option, raw: Any, where: str, text: bool) -> Any:
    try:
        return option.parse(raw, text)
    except ValueError as e:
        raise ConfigError(f"{where}: {option.key}: {e}") from None


def describe(settings: Settings) -> str:
    """The effective configuration as a TOML file, each line saying where its value
    came from (``strata config``); an unset option is a comment."""
    lines = [f"# strata configuration; file: {settings.file or 'none read'}",
             "# precedence: default < file < environment (STRATA_*) < flag"]
    width = max(len(key) for key in settings.values)
    for key, value in settings.values.items():
        option, source = BY_KEY[key], settings.sources[key]
        if value is None:
            meaning = f": {option.default_text}" if option.default_text else ""
            lines.append(f"# {key:<{width}} (unset{meaning})  # {source}")
        else:
            lines.append(f"{key:<{width}} = {option.kind.show(value)}  # {source}")
    return "\n".join(lines) + "\n"


def as_flags(settings: Settings, keys: Iterable[str]) -> list[str]:
    """Flags that reproduce ``keys``' values where they came from a flag or the
    environment (what ``strata install`` puts in the unit; the file is read by
    the service itself)."""
    argv: list[str] = []
    for key in keys:
        source, value = settings.sources[key], settings.values[key]
        if value is None or not source.startswith(("flag", "env")):
            continue
        option = BY_KEY[key]
        texts = list(value) if option.kind is LIST else [
            f"{value:04o}" if option.kind is OCTAL else
            f"{value:g}" if option.kind is FLOAT else str(value)]
        for text in texts:
            argv += [option.flag_name, text]
    return argv
