"""The sync worker inside `registry-cache serve`: regsync's server mode.

A first pass copies what the targets lack (regsync's "missing" pass), then every entry runs on
its `schedule` or `interval`; entries with neither only run with `sync once`.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import logging
import time

from proxy.cache import Cache
from proxy.metrics import Metrics
from proxy.status import SyncEntryStatus

from .config import SyncConfig
from .endpoints import Endpoints
from .schedule import run_on
from .worker import EntryResult, Worker

__all__ = ["SyncBoard", "serve"]

log = logging.getLogger("registry_cache.sync")


class SyncBoard:
    """Each entry's last run, its outcome and its next tick: what the status page shows."""

    def __init__(self, config: SyncConfig) -> None:
        self.config = config
        self._last: dict[str, tuple[float, str]] = {}
        self._next: dict[str, float] = {}

    def record(self, result: EntryResult) -> None:
        counts = f"{result.copied} copied, {result.skipped} skipped"
        outcome = counts if result.ok else f"failed ({len(result.errors)} errors), {counts}"
        self._last[result.entry] = (time.time(), outcome)

    def due(self, entry: str, moment: datetime.datetime) -> None:
        self._next[entry] = moment.timestamp()

    def entries(self) -> list[SyncEntryStatus]:
        statuses = []
        for entry in self.config.entries:
            last_run, result = self._last.get(entry.name, (None, None))
            statuses.append(
                SyncEntryStatus(
                    name=entry.name,
                    last_run=last_run,
                    result=result,
                    next_run=self._next.get(entry.name),
                )
            )
        return statuses


async def serve(board: SyncBoard, cache: Cache, metrics: Metrics) -> None:
    """Run `board`'s entries until cancelled, telling it how each run went."""
    config = board.config
    endpoints = Endpoints(cache.settings, config, metrics, cache)
    worker = Worker(config, endpoints, metrics, cache.metadata, on_result=board.record)
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
                    on_due=functools.partial(board.due, entry.name),
                )
            )
        await asyncio.gather(*loops)
    finally:
        await endpoints.close()
