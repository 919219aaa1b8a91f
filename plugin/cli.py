"""The ``strata`` command: serve, snapshotter, install, uninstall, check, fsck, config,
plugin-create, migrate.

The settings (name, backend, socket, ...) are one table, ``plugin.config.OPTIONS``:
each command's flags are built from it, and each value may also come from the
config file (``/etc/strata/strata.toml`` or ``--config``) or the environment
(``STRATA_<KEY>``); ``strata config`` shows the effective values and their source.
"""

from __future__ import annotations

import argparse
import asyncio
import grp
import logging
import os
import sys
from collections.abc import Coroutine
from typing import Any, TextIO

from plugin import config, managed
from plugin.errors import ConfigError, StrataError
from plugin.printable import PrintableFormatter

DEFAULT_NAME = "strata"
PLUGIN_SOCKET_DIR = "/run/docker/plugins"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="strata", description="Docker graphdriver plugin")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve", help="serve the graphdriver protocol",
        epilog=f"Every option is also a key of the config file ({config.DEFAULT_FILE}, "
               "KEY = value) and a variable STRATA_KEY; flag > variable > file > default.")
    config.add_options(serve, config.SERVE)
    serve.add_argument("--managed", action="store_true", default=managed.is_managed(),
                       help="run as a Docker managed plugin (set by its config.json as "
                            "STRATA_MANAGED=1): state under /var/lib/docker, logs on stdout, "
                            "fuse-overlayfs refused")

    snap = sub.add_parser("snapshotter", help="serve containerd's snapshots API (a "
                          "[proxy_plugins] snapshotter)")
    config.add_options(snap, config.SNAPSHOTTER)

    for verb in ("install", "uninstall"):
        cmd = sub.add_parser(verb, help=f"{verb} the spec file and systemd units")
        config.add_options(cmd, config.INSTALL)
        cmd.add_argument("--spec-dir", default="/etc/docker/plugins",
                         help="where dockerd looks for spec files (default /etc/docker/plugins)")
        cmd.add_argument("--unit-dir", default="/etc/systemd/system",
                         help="where the systemd units go (default /etc/systemd/system)")
        if verb == "install":
            cmd.add_argument("--start", action="store_true",
                             help="also start serving (systemd if it is init, else detached)")
        _add_containerd_options(cmd, verb)

    fsck = sub.add_parser("fsck", help="list orphaned layers, leaked mounts and debris")
    config.add_options(fsck, config.FSCK)
    fsck.add_argument("--home", default=None,
                      help="the Home to check (default: the recorded Init's)")
    fsck.add_argument("--min-age", type=float, default=600.0,
                      help="seconds a layer must be old before it can be an orphan (default 600)")
    fsck.add_argument("--repair", action="store_true", help="remove what was found")

    shown = sub.add_parser("config", help="print the effective configuration and where each "
                                          "value came from")
    config.add_options(shown, config.CONFIG)

    create = sub.add_parser("plugin-create",
                            help="make a Docker managed plugin NAME from strata's image")
    create.add_argument("name", metavar="NAME",
                        help="plugin name; dockerd's --storage-driver takes the same name")
    create.add_argument("--image", required=True,
                        help="an image built from strata's Dockerfile")
    create.add_argument("--docker", default="docker",
                        help="the docker CLI to run (default: docker on PATH); it talks to "
                             "the dockerd DOCKER_HOST or the current context names")
    create.add_argument("--config", default=None,
                        help="a config.json to use instead of the one shipped with strata")
    create.add_argument("--tmpdir", default=None,
                        help="where to unpack the rootfs meanwhile (default: $TMPDIR)")

    # strata migrate (plugin/migrate): its options live with it
    from plugin.migrate.command import add_parser as add_migrate_parser

    add_migrate_parser(sub)

    check = sub.add_parser("check", help="report whether this host can run strata")
    check.add_argument("--home", default="/var/lib/docker", help="the data root to probe")
    return parser


def _add_containerd_options(cmd: argparse.ArgumentParser, verb: str) -> None:
    """``--containerd``: the snapshotter unit and containerd's [proxy_plugins] table
    (plugin/containerd_setup.py) instead of the graphdriver's spec and units."""
    from plugin.containerd_setup import DEFAULT_CONFIG

    group = cmd.add_argument_group("containerd (with --containerd)")
    group.add_argument("--containerd", action="store_true",
                       help=f"{verb} strata as containerd's proxy snapshotter (the unit "
                            "NAME-snapshotter.service and [proxy_plugins.NAME]) instead of "
                            "the graphdriver plugin")
    group.add_argument("--containerd-config", default=DEFAULT_CONFIG, metavar="PATH",
                       help=f"containerd's config file (default {DEFAULT_CONFIG})")
    if verb != "install":
        return
    for key in ("snapshotter_socket", "snapshotter_root", "snapshotter_backend"):
        option = config.BY_KEY[key]
        group.add_argument("--" + key.replace("_", "-"), default=option.default,
                           choices=option.choices or None,
                           help=f"{option.help} (default {option.default})")
    group.add_argument("--force", action="store_true",
                       help="replace a different [proxy_plugins.NAME] already in the config")


def _socket_group(args: argparse.Namespace) -> int | None:
    return grp.getgrnam(args.socket_group).gr_gid if args.socket_group else None


def run_server(main: Coroutine[Any, Any, None]) -> int:
    """Run a server coroutine to its end on uvloop where installed."""
    from plugin.memtune import tune_allocator

    tune_allocator()
    try:
        import uvloop  # type: ignore[import-not-found, unused-ignore]
        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main)
    return 0


def configure_logging(level: str, stream: TextIO = sys.stderr) -> None:
    # No record needs its caller's file and line, thread or process name (the
    # format has none of them): finding the caller walks the stack for every
    # line, and the server writes one line per call (logging HOWTO,
    # "Optimization").
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # Records name paths and Err texts, which may hold any byte (plugin/printable.py).
    handler = logging.StreamHandler(stream)
    handler.setFormatter(PrintableFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])


def serve_state_dir(args: argparse.Namespace) -> str:
    """``--state-dir``, else the default; an empty value means the default (the
    managed plugin's config ships ``STRATA_STATE_DIR`` empty, so that the code
    keeps choosing it: an upgrade never refreshes a plugin's settings)."""
    if args.state_dir:
        state_dir: str = args.state_dir
    elif args.managed:
        state_dir = managed.MANAGED_STATE_DIR
    else:
        state_dir = os.path.join("/var/lib/strata", args.name)
    if args.managed and not managed.under_propagated_mount(state_dir):
        logging.getLogger("strata").warning(
            "state dir %s is outside the propagated mount %s: a docker plugin upgrade "
            "replaces it, and every call then fails until dockerd restarts",
            state_dir, managed.PROPAGATED_MOUNT)
    return state_dir


def cmd_serve(args: argparse.Namespace) -> int:
    from plugin.server.serve import ServeConfig, serve

    # dockerd logs a managed plugin's stderr at error level, its stdout at info.
    configure_logging(args.log_level, sys.stdout if args.managed else sys.stderr)
    name = args.name
    state_dir = serve_state_dir(args)
    socket_path = args.socket or os.path.join(PLUGIN_SOCKET_DIR, f"{name}.sock")
    config = ServeConfig(
        name=name,
        socket_path=os.path.abspath(socket_path),
        socket_mode=args.socket_mode,
        socket_group=_socket_group(args),
        backend=args.backend,
        state_dir=state_dir,
        spec_dir=args.spec_dir,
        options=tuple(args.storage_opt),
        deadline=args.deadline,
        refused_backends=managed.REFUSED_BACKENDS if args.managed else {},
        metrics_socket=args.metrics_socket,
        metrics_address=args.metrics_address,
    )
    return run_server(serve(config))


def cmd_snapshotter(args: argparse.Namespace) -> int:
    from plugin.snapshotter.serve import SnapshotterConfig, serve_snapshotter

    configure_logging(args.log_level)
    # h2 and hpack log every frame and header at debug: not an operator's concern.
    for chatty in ("h2", "hpack"):
        logging.getLogger(chatty).setLevel(max(logging.INFO, logging.getLogger().level))
    config = SnapshotterConfig(
        socket_path=os.path.abspath(args.snapshotter_socket),
        root=os.path.abspath(args.snapshotter_root),
        backend=args.snapshotter_backend,
        socket_mode=args.socket_mode,
        socket_group=_socket_group(args),
        options=tuple(args.storage_opt),
    )
    return run_server(serve_snapshotter(config))


#: Commands whose settings come from the table (plugin/config.py).
CONFIGURED = {"serve": config.SERVE, "snapshotter": config.SNAPSHOTTER,
              "install": config.INSTALL, "uninstall": config.INSTALL, "fsck": config.FSCK,
              "config": config.CONFIG}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line with every table setting resolved (flag > env > file >
    default) onto the namespace; raises ``ConfigError`` naming the bad key."""
    args = build_parser().parse_args(argv)
    if args.command in CONFIGURED:
        settings = config.resolve(args, CONFIGURED[args.command])
        # The commands read their settings as attributes, whatever the source.
        vars(args).update(settings.values)
        args.settings = settings
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except ConfigError as e:
        print(f"strata: {e}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(config.describe(args.settings), end="")
        return 0
    if args.command == "serve":
        return cmd_serve(args)
    if args.command == "snapshotter":
        return cmd_snapshotter(args)
    if args.command == "plugin-create":
        try:
            managed.create_plugin(args.name, args.image, docker=args.docker,
                                  config=args.config, tmpdir=args.tmpdir)
        except StrataError as e:
            print(f"strata plugin-create: {e}", file=sys.stderr)
            return 1
        print(f"created plugin {args.name}; next: docker plugin enable {args.name}, then "
              f"restart dockerd with --experimental --storage-driver {args.name}",
              file=sys.stderr)
        return 0
    if args.command == "migrate":
        from plugin.migrate.command import main as migrate_main

        return migrate_main(args)
    if args.command == "fsck":
        from plugin.fsck import fsck

        return fsck(args)
    from plugin import install

    if args.command in ("install", "uninstall") and args.containerd:
        from plugin import containerd_setup

        return (containerd_setup.install if args.command == "install"
                else containerd_setup.uninstall)(args)
    if args.command == "install":
        return install.install(args)
    if args.command == "uninstall":
        return install.uninstall(args)
    return install.check(args)
