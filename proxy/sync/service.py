"""The sync worker inside `registry-cache serve`: regsync's server mode.

A first pass copies what the targets lack (regsync's "missing" pass), then every entry runs on
its `schedule` or `interval`; entries with neither only run with `sync once`.
"""

from __future__ import annotations

import asyncio
import functools
import logging

from proxy.cache import Cache
from proxy.metrics import Metrics
from proxy.settings import Settings

from .config import SyncConfig
from .endpoints import Endpoints
from .schedule import run_on
from .worker import Worker

__all__ = ["serve"]

log = logging.getLogger("registry_cache.sync")


async def serve(settings: Settings, config: SyncConfig, cache: Cache, metrics: Metrics) -> None:
    """Run until cancelled."""
    endpoints = Endpoints(settings, config, metrics, cache)
    worker = Worker(config, endpoints, metrics, cache.metadata)
    try:
        await worker.run_all(missing=True)
        loops = []
        for entry in config.entries:
            if entry.schedule is None:
                log.info(
                    "sync %s has no schedule or interval; it runs with `sync once`", entry.name
                )
                continue
            loops.append(
                run_on(
                    entry.schedule,
                    functools.partial(worker.run, entry),
                    entry.name,
                    metrics.sync_skipped_ticks.labels(entry.name).inc,
                )
            )
        await asyncio.gather(*loops)
    finally:
        await endpoints.close()
