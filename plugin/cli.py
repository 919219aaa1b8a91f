"""The ``strata`` command: serve, install, uninstall, check, fsck, migrate.

Every option can also come from the environment (``STRATA_<OPTION>``, e.g.
``STRATA_BACKEND=vfs``), which is how the systemd unit configures it.
"""

from __future__ import annotations

import argparse
import asyncio
import grp
import logging
import os
import sys

from plugin.driver.registry import KNOWN

DEFAULT_NAME = "strata"
PLUGIN_SOCKET_DIR = "/run/docker/plugins"


def _env(name: str, default: str | None) -> str | None:
    return os.environ.get("STRATA_" + name.upper().replace("-", "_"), default)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="strata", description="Docker graphdriver plugin")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the graphdriver protocol")
    serve.add_argument("--name", default=_env("name", DEFAULT_NAME),
                       help="plugin/driver name dockerd uses (default strata)")
    serve.add_argument("--socket", default=_env("socket", None),
                       help="unix socket path (default /run/docker/plugins/NAME.sock)")
    serve.add_argument("--socket-mode", default=_env("socket-mode", "0600"),
                       help="socket permissions, octal (default 0600)")
    serve.add_argument("--socket-group", default=_env("socket-group", None),
                       help="group owning the socket (use with --socket-mode 0660)")
    serve.add_argument("--backend", default=_env("backend", "auto"), choices=[*KNOWN, "auto"])
    serve.add_argument("--state-dir", default=_env("state-dir", None),
                       help="where the plugin keeps its own state (default /var/lib/strata/NAME)")
    serve.add_argument("--spec-dir", default=_env("spec-dir", None),
                       help="write DIR/NAME.spec while serving (not needed when the socket "
                            "is in /run/docker/plugins, which dockerd scans itself)")
    serve.add_argument("--storage-opt", action="append", default=[],
                       help="backend option key=value (Docker's prefixes: vfs., overlay2., …)")
    serve.add_argument("--deadline", type=float, default=float(_env("deadline", "600") or 600),
                       help="seconds a backend call may take before dockerd gets an Err "
                            "(0 = wait forever, as dockerd itself does; default 600)")
    serve.add_argument("--log-level", default=_env("log-level", "info"),
                       choices=["debug", "info", "warning", "error"])

    for verb in ("install", "uninstall"):
        cmd = sub.add_parser(verb, help=f"{verb} the spec file and systemd units")
        cmd.add_argument("--name", default=_env("name", DEFAULT_NAME))
        cmd.add_argument("--spec-dir", default="/etc/docker/plugins")
        cmd.add_argument("--unit-dir", default="/etc/systemd/system")
        cmd.add_argument("--backend", default=_env("backend", "auto"), choices=[*KNOWN, "auto"])
        if verb == "install":
            cmd.add_argument("--start", action="store_true",
                             help="also start serving (systemd if it is init, else detached)")

    fsck = sub.add_parser("fsck", help="list orphaned layers, leaked mounts and debris")
    fsck.add_argument("--home", default=None, help="the Home to check (default: the recorded Init's)")
    fsck.add_argument("--name", default=_env("name", DEFAULT_NAME))
    fsck.add_argument("--state-dir", default=_env("state-dir", None))
    fsck.add_argument("--min-age", type=float, default=600.0,
                      help="seconds a layer must be old before it can be an orphan (default 600)")
    fsck.add_argument("--repair", action="store_true", help="remove what was found")

    # strata migrate (plugin/migrate): its options live with it
    from plugin.migrate.command import add_parser as add_migrate_parser

    add_migrate_parser(sub)

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
        socket_mode=int(args.socket_mode, 8),
        socket_group=grp.getgrnam(args.socket_group).gr_gid if args.socket_group else None,
        backend=args.backend,
        state_dir=args.state_dir or os.path.join("/var/lib/strata", name),
        spec_dir=args.spec_dir,
        options=tuple(args.storage_opt),
        deadline=args.deadline,
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
    if args.command == "serve":
        return cmd_serve(args)
    if args.command == "migrate":
        from plugin.migrate.command import main as migrate_main

        return migrate_main(args)
    if args.command == "fsck":
        from plugin.fsck import fsck

        return fsck(args)
    from plugin import install

    if args.command == "install":
        return install.install(args)
    if args.command == "uninstall":
        return install.uninstall(args)
    return install.check(args)
