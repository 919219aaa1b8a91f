"""``strata install --containerd`` / ``uninstall --containerd``: strata as containerd's
proxy snapshotter, set up the way stargz, nydus and overlaybd are.

Two things are written:

* the systemd unit ``NAME-snapshotter.service`` running ``strata snapshotter`` (socket,
  root, backend given at install time), ready by ``sd_notify``, ordered before and wanted
  by ``containerd.service``.  No socket unit: containerd dials a proxy plugin lazily and
  redials with backoff, so the order alone is enough;
* a ``[proxy_plugins.NAME]`` table (``type = "snapshot"``, ``address = SOCKET``) in
  containerd's config (``/etc/containerd/config.toml`` or ``--containerd-config``).

The config is the user's file: it is edited as text, never re-serialised.  The table is
appended after a marker comment (the rest stays byte for byte), the file is copied to
``PATH.strata.bak`` before any change and replaced atomically, with its mode and owner.
Every edit is checked by parsing the result (``tomllib``): it must equal the old
document with only our table added, replaced or removed, or nothing is written.  A table
of that name that differs is refused unless ``--force``.  The table is the same in config
versions 1 (no ``version`` key), 2 (containerd 1.x) and 3 (2.x); any other version is
refused.  containerd reads proxy plugins at start: it must be restarted after a change.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from typing import Any

from plugin.errors import ConfigError
from plugin.install import hardening

DEFAULT_CONFIG = "/etc/containerd/config.toml"
MARKER = "# strata: containerd proxy snapshotter (strata install --containerd)"
#: containerd config versions whose [proxy_plugins] table has this shape.
VERSIONS = (1, 2, 3)
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_HEADER = re.compile(r"^\s*\[\s*proxy_plugins\s*\.\s*(?P<key>\"[^\"]*\"|'[^']*'|[A-Za-z0-9_-]+)"
                     r"\s*\]\s*(#.*)?$")
_ANY_HEADER = re.compile(r"^\s*\[")


def unit_name(name: str) -> str:
    return f"{name}-snapshotter.service"


def render_unit(name: str, socket: str, root: str, backend: str,
                python: str = sys.executable) -> str:
    exec_start = shlex.join([python, "-m", "plugin", "snapshotter", "--socket", socket,
                             "--root", root, "--backend", backend])
    return f"""[Unit]
Description=strata snapshotter for containerd ({name})
Documentation=https://github.com/containerd/containerd/blob/main/docs/PLUGINS.md
Before=containerd.service

[Service]
Type=notify
ExecStart={exec_start}
Restart=on-failure

# The same sandboxing as strata's graphdriver service: containerd mounts the
# specs this service returns, and the mounts strata makes itself (a
# fuse-overlayfs) must be in the host's mount namespace too, so no option that
# gives the service a private one (see strata.service for the list).
{hardening()}
[Install]
WantedBy=multi-user.target containerd.service
"""


def _toml_key(name: str) -> str:
    return name if _BARE_KEY.fullmatch(name) else json.dumps(name)


def stanza(name: str, address: str) -> str:
    """The table, after the marker.  A JSON string is a valid TOML basic string."""
    return (f"{MARKER}\n[proxy_plugins.{_toml_key(name)}]\n"
            f"  type = \"snapshot\"\n  address = {json.dumps(address)}\n")


@dataclass(frozen=True)
class Edit:
    text: str
    action: str  # "added", "replaced", "present", "removed", "absent"


def _parse(text: str, where: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where} is not valid TOML: {e}") from None


def _check_version(doc: dict[str, Any], where: str) -> None:
    version = doc.get("version", 1)
    if version not in VERSIONS:
        raise ConfigError(f"{where}: containerd config version {version!r} is not one strata "
                          f"knows ({', '.join(map(str, VERSIONS))}); add the table by hand")


def _without(doc: dict[str, Any], name: str) -> dict[str, Any]:
    """``doc`` without ``proxy_plugins.NAME`` (and without an emptied ``proxy_plugins``)."""
    out = dict(doc)
    plugins = dict(out.get("proxy_plugins", {}))
    plugins.pop(name, None)
    out.pop("proxy_plugins", None)
    if plugins:
        out["proxy_plugins"] = plugins
    return out


def _cut_table(text: str, name: str, where: str) -> str:
    """``text`` without the ``[proxy_plugins.NAME]`` table (and our marker above it, and
    the blank line install put before it); refuses a table written another way."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if (m := _HEADER.match(line))
              and _unquote(m["key"]) == name]
    if len(starts) != 1:
        raise ConfigError(f"{where}: proxy_plugins.{name} is not written as one "
                          f"[proxy_plugins.{name}] table; edit it by hand")
    start = end = starts[0]
    end += 1
    while end < len(lines) and not _ANY_HEADER.match(lines[end]):
        end += 1
    if start > 0 and lines[start - 1].rstrip("\r\n") == MARKER:
        start -= 1
        if end == len(lines) and start > 0 and not lines[start - 1].strip():
            start -= 1
    return "".join(lines[:start] + lines[end:])


def _unquote(key: str) -> str:
    return json.loads(key) if key.startswith('"') else key.strip("'")


def add_proxy_plugin(text: str, name: str, address: str, force: bool = False,
                     where: str = "the config") -> Edit:
    """``text`` with our table; refuses a different table of that name unless ``force``."""
    doc = _parse(text, where)
    _check_version(doc, where)
    wanted = {"type": "snapshot", "address": address}
    plugins = doc.get("proxy_plugins", {})
    if not isinstance(plugins, dict):
        raise ConfigError(f"{where}: proxy_plugins is not a table")
    existing = plugins.get(name)
    if existing == wanted:
        return Edit(text, "present")
    if existing is not None and not force:
        raise ConfigError(f"{where} already has a different [proxy_plugins.{name}] "
                          f"({existing}); pass --force to replace it")
    base = text if existing is None else _cut_table(text, name, where)
    separator = "" if not base else "\n" if base.endswith("\n") else "\n\n"
    new = base + separator + stanza(name, address)
    result = _parse(new, f"{where} with the table added")
    expected = _without(doc, name)
    expected.setdefault("proxy_plugins", {})[name] = wanted
    if result != expected:  # e.g. an inline proxy_plugins = {...} a table cannot extend
        raise ConfigError(f"{where}: appending [proxy_plugins.{name}] would change other "
                          "settings; add it by hand")
    return Edit(new, "added" if existing is None else "replaced")


def remove_proxy_plugin(text: str, name: str, where: str = "the config") -> Edit:
    doc = _parse(text, where)
    if name not in doc.get("proxy_plugins", {}):
        return Edit(text, "absent")
    new = _cut_table(text, name, where)
    result = _parse(new, f"{where} without the table")
    if name in result.get("proxy_plugins", {}) or _without(result, name) != _without(doc, name):
        raise ConfigError(f"{where}: removing [proxy_plugins.{name}] would change other "
                          "settings; remove it by hand")
    return Edit(new, "removed")


# ---- files -------------------------------------------------------------------------------

def read_config(path: str) -> str:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text: {e}") from None


def write_config(path: str, text: str) -> str | None:
    """Replace ``path`` atomically with ``text``, keeping its mode and owner; the old
    file is copied to ``PATH.strata.bak`` first.  Returns the backup's path."""
    backup = None
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    try:
        st: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        backup = path + ".strata.bak"
        shutil.copy2(path, backup)
    fd, tmp = tempfile.mkstemp(prefix=".strata-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, st.st_mode & 0o7777 if st else 0o644)
        if st is not None:
            os.chown(tmp, st.st_uid, st.st_gid)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return backup


# ---- the commands ------------------------------------------------------------------------

def _systemd_running() -> bool:
    return os.path.isdir("/run/systemd/system")


def _systemctl(*argv: str, check: bool) -> None:
    subprocess.run(["systemctl", *argv], check=check)


def install(args: argparse.Namespace) -> int:
    """Unit, then the config table (a refused config leaves no unit behind)."""
    path, name = args.containerd_config, args.name
    socket = os.path.abspath(args.snapshotter_socket)
    root = os.path.abspath(args.snapshotter_root)
    # A new file gets containerd 1.6's current format; one without `version` is v1.
    text = read_config(path) if os.path.exists(path) else "version = 2\n"
    try:
        edit = add_proxy_plugin(text, name, socket, force=args.force, where=path)
    except ConfigError as e:
        print(f"strata install --containerd: {e}", file=sys.stderr)
        return 1
    unit_path = os.path.join(args.unit_dir, unit_name(name))
    os.makedirs(args.unit_dir, exist_ok=True)
    with open(unit_path, "w", encoding="utf-8") as f:
        f.write(render_unit(name, socket, root, args.snapshotter_backend))
    print(f"wrote {unit_path}")
    if edit.action == "present":
        print(f"{path} already has [proxy_plugins.{name}] for {socket}")
    else:
        backup = write_config(path, edit.text)
        print(f"{edit.action} [proxy_plugins.{name}] in {path}"
              + (f" (backup {backup})" if backup else ""))
        print("restart containerd to load it (systemctl restart containerd)")
    if args.start:
        if not _systemd_running():
            print("no systemd: start it yourself: "
                  f"strata snapshotter --socket {socket} --root {root} "
                  f"--backend {args.snapshotter_backend}")
            return 0
        _systemctl("daemon-reload", check=True)
        _systemctl("enable", "--now", unit_name(name), check=True)
    return 0


def uninstall(args: argparse.Namespace) -> int:
    """The config table out, the unit stopped and removed; the snapshots stay in the root."""
    path, name = args.containerd_config, args.name
    try:
        text = read_config(path) if os.path.exists(path) else ""
        edit = remove_proxy_plugin(text, name, where=path)
    except ConfigError as e:
        print(f"strata uninstall --containerd: {e}", file=sys.stderr)
        return 1
    if edit.action == "removed":
        backup = write_config(path, edit.text)
        print(f"removed [proxy_plugins.{name}] from {path} (backup {backup}); "
              "restart containerd")
    if _systemd_running():
        _systemctl("disable", "--now", unit_name(name), check=False)
    unit_path = os.path.join(args.unit_dir, unit_name(name))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(unit_path)
        print(f"removed {unit_path}")
    if _systemd_running():
        _systemctl("daemon-reload", check=False)
    return 0
