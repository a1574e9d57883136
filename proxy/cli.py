"""The `registry-cache` command: parse arguments, load settings, run. No policy lives here."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from .app import AccessLogger, build_app
from .settings import ConfigError, Settings, load_settings

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
    return parser


def _serve(settings: Settings) -> int:
    app = build_app(settings)
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        access_log_class=AccessLogger,
        access_log=logging.getLogger("registry_cache.access"),
        print=lambda message: log.info(message.strip()),
        shutdown_timeout=30.0,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"registry-cache: configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    return _serve(settings)


if __name__ == "__main__":
    sys.exit(main())
