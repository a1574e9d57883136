"""The `registry-cache` command: parse arguments, load settings, run. No policy lives here."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from . import admin, health, logs
from .app import access_logger, serving
from .limits import ConnectionLimiter
from .settings import ConfigError, Settings, load_settings, parse_size
from .sync import run as sync_run
from .tls import server_context

__all__ = ["main"]

log = logging.getLogger("registry_cache")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="registry-cache", description="A pull-through cache for OCI registries."
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=os.environ.get("REGISTRY_CACHE_CONFIG"),
        help="YAML configuration file (default: $REGISTRY_CACHE_CONFIG, else built-in defaults)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the cache")
    health_check = commands.add_parser("health", help="exit 0 if the running cache is healthy")
    health_check.add_argument(
        "--ready", action="store_true", help="ask /readyz (storage, database) instead of /healthz"
    )
    commands.add_parser("du", help="size and items, in total, per upstream and repository")
    ls = commands.add_parser("ls", help="cached repositories and tags")
    ls.add_argument("prefix", nargs="?", default="", metavar="UPSTREAM[/REPO]")
    clean = commands.add_parser("clean", help="one cleaner pass now")
    clean.add_argument("--dry-run", action="store_true", help="list what would go; change nothing")
    clean.add_argument("--max-size", help="evict down to this size (e.g. 5G), now")
    verify = commands.add_parser("verify", help="re-hash every cached blob")
    verify.add_argument("--repair", action="store_true", help="remove corrupt blobs")
    sync = commands.add_parser("sync", help="mirror images as a regsync configuration says")
    sync.add_argument("--sync-config", type=Path, help="regsync-format file (default: sync.config)")
    sync_commands = sync.add_subparsers(dest="sync_command", required=True)
    sync_once = sync_commands.add_parser("once", help="one pass; exit 1 if any entry failed")
    sync_once.add_argument("--dry-run", action="store_true", help="show copies and deletions only")
    sync_once.add_argument("--missing", action="store_true", help="copy only absent tags")
    sync_commands.add_parser("check", help="what would be copied or deleted; change nothing")
    return parser


def _sync(args: argparse.Namespace, settings: Settings) -> int:
    dry_run = args.sync_command == "check" or args.dry_run
    missing = args.sync_command == "once" and args.missing
    path = args.sync_config or settings.sync_config
    return asyncio.run(sync_run.once(settings, path, dry_run, missing, print))


def _admin(args: argparse.Namespace, settings: Settings) -> int:
    """Run an admin sub-command on the data directory."""
    if args.command == "du":
        return asyncio.run(admin.du(settings, print))
    if args.command == "ls":
        return asyncio.run(admin.ls(settings, args.prefix, print))
    if args.command == "clean":
        max_size = parse_size(args.max_size, "--max-size") if args.max_size else None
        return asyncio.run(admin.clean(settings, max_size, args.dry_run, print))
    return asyncio.run(admin.verify(settings, args.repair, print))


def _serve(settings: Settings) -> int:
    # Unusable certificates stop start-up (a ConfigError) before anything is opened.
    ssl_context = server_context(settings.tls) if settings.tls else None
    asyncio.run(_run_server(settings, ssl_context))
    return 0


async def _run_server(settings: Settings, ssl_context: ssl.SSLContext | None) -> None:
    """Serve until SIGTERM or SIGINT, then stop accepting and let running transfers finish,
    up to the drain timeout. (web.run_app does the same, but hides the server we need to
    hook the per-address connection cap into.) A signal during start-up ends it at once: a
    reconciliation after a lost database may hash the store for minutes."""
    stop, listening = asyncio.Event(), asyncio.Event()
    starting = asyncio.current_task()
    assert starting is not None

    def on_signal() -> None:
        stop.set()
        if not listening.is_set():
            starting.cancel()

    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, on_signal)
    try:
        async with serving(settings) as service:
            server = web.Server(
                service.handle,
                access_log_class=access_logger(settings),
                access_log=logging.getLogger(logs.ACCESS_LOGGER) if settings.access_log else None,
                keepalive_timeout=settings.idle_timeout,
            )
            ConnectionLimiter(settings.max_connections_per_address).install(server)
            runner = web.ServerRunner(server, shutdown_timeout=settings.drain_timeout)
            await runner.setup()
            try:
                site = web.TCPSite(runner, settings.host, settings.port, ssl_context=ssl_context)
                await site.start()
                listening.set()
                _freeze_startup_objects()
                log.info("serving on %s", site.name)
                await stop.wait()
                log.info("stopping: draining transfers for up to %.0fs", settings.drain_timeout)
            finally:
                await runner.cleanup()
    except asyncio.CancelledError:
        if listening.is_set() or not stop.is_set():
            raise
        log.info("stopped during start-up")
    finally:
        logs.access_lines().flush()


def _freeze_startup_objects() -> None:
    """Move what start-up built (modules, the service, settings: some 50,000 objects) out of the
    garbage collector's sight. They live as long as the process, and every full collection
    would traverse them again: 13 ms each here, paid by whichever requests are waiting."""
    gc.collect()
    gc.freeze()


def _lighten_log_records() -> None:
    """Skip what our log format never shows (logging HOWTO, "Optimization"): the access log
    writes a record per request, and the caller lookup alone was a tenth of a cached
    manifest's cost (docs/benchmarks.md)."""
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
        logs.configure(settings, stdout_is_output=args.command != "serve")
        _lighten_log_records()
        if args.command == "health":
            return health.check(settings, "/readyz" if args.ready else "/healthz")
        if args.command == "sync":
            return _sync(args, settings)
        return _serve(settings) if args.command == "serve" else _admin(args, settings)
    except ConfigError as exc:
        print(f"registry-cache: configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
