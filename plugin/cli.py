"""The ``strata`` command: serve, install, uninstall, check, fsck, config.

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

from plugin import config
from plugin.errors import ConfigError

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

    check = sub.add_parser("check", help="report whether this host can run strata")
    check.add_argument("--home", default="/var/lib/docker", help="the data root to probe")
    return parser


def configure_logging(level: str) -> None:
    # No record needs its caller's file and line, thread or process name (the
    # format has none of them): finding the caller walks the stack for every
    # line, and the server writes one line per call (logging HOWTO,
    # "Optimization").
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def cmd_serve(args: argparse.Namespace) -> int:
    from plugin.memtune import tune_allocator
    from plugin.server.serve import ServeConfig, serve

    configure_logging(args.log_level)
    name = args.name
    socket_path = args.socket or os.path.join(PLUGIN_SOCKET_DIR, f"{name}.sock")
    config = ServeConfig(
        name=name,
        socket_path=os.path.abspath(socket_path),
        socket_mode=args.socket_mode,
        socket_group=grp.getgrnam(args.socket_group).gr_gid if args.socket_group else None,
        backend=args.backend,
        state_dir=args.state_dir or os.path.join("/var/lib/strata", name),
        spec_dir=args.spec_dir,
        options=tuple(args.storage_opt),
        deadline=args.deadline,
        metrics_socket=args.metrics_socket,
        metrics_address=args.metrics_address,
    )
    tune_allocator()
    try:
        import uvloop  # type: ignore[import-not-found, unused-ignore]
        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(config))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "check":
        try:
            settings = config.resolve(args, args.command.replace("uninstall", "install"))
        except ConfigError as e:
            print(f"strata {args.command}: {e}", file=sys.stderr)
            return 2
        # The commands read their settings as attributes, whatever the source.
        vars(args).update(settings.values)
        args.settings = settings
    if args.command == "config":
        print(config.describe(args.settings), end="")
        return 0
    if args.command == "serve":
        return cmd_serve(args)
    if args.command == "fsck":
        from plugin.fsck import fsck

        return fsck(args)
    from plugin import install

    if args.command == "install":
        return install.install(args)
    if args.command == "uninstall":
        return install.uninstall(args)
    return install.check(args)
