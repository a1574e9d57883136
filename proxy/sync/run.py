"""`registry-cache sync once|check`: one pass, a summary table, an exit status."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from proxy.cache import Cache, open_cache
from proxy.metrics import Metrics
from proxy.settings import ConfigError, Settings, format_bytes

from .config import SyncConfig, load_sync_config
from .endpoints import Endpoints, with_sync_logins
from .progress import Progress, on_terminal
from .worker import EntryResult, Worker

__all__ = ["once", "summary"]

Print = Callable[[str], None]


def summary(results: list[EntryResult]) -> list[str]:
    """The table `sync once` prints, then every plan and error."""
    header = ("ENTRY", "CHECKED", "COPIED", "SKIPPED", "FAILED", "BYTES")
    rows = [
        (
            r.entry,
            str(r.checked),
            str(r.copied),
            str(r.skipped),
            str(r.failed),
            format_bytes(r.bytes),
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in [header, *rows]
    ]
    for result in results:
        lines += [f"would {plan}" for plan in result.planned]
        lines += [f"retired {result.entry}: {tag}" for tag in result.retired]
        lines += [f"error {message}" for message in result.errors]
    return lines


async def once(
    settings: Settings, path: Path | None, dry_run: bool, missing: bool, out: Print
) -> int:
    """One pass over every entry; 1 if any entry failed."""
    if path is None:
        raise ConfigError("no sync configuration: set sync.config (SYNC_CONFIG) or --sync-config")
    config: SyncConfig = load_sync_config(path)
    settings = with_sync_logins(settings, config)
    metrics = Metrics()
    with on_terminal(sys.stderr) as progress:
        if any(entry.to_cache for entry in config.entries):
            async with open_cache(settings, metrics) as cache:
                results = await _run(settings, config, metrics, cache, dry_run, missing, progress)
        else:
            results = await _run(settings, config, metrics, None, dry_run, missing, progress)
    for line in summary(results):
        out(line)
    return 0 if all(result.ok for result in results) else 1


async def _run(
    settings: Settings,
    config: SyncConfig,
    metrics: Metrics,
    cache: Cache | None,
    dry_run: bool,
    missing: bool,
    progress: Progress,
) -> list[EntryResult]:
    endpoints = Endpoints(settings, config, metrics, cache)
    try:
        metadata = cache.metadata if cache is not None else None
        worker = Worker(config, endpoints, metrics, metadata, dry_run=dry_run, progress=progress)
        return await worker.run_all(missing)
    finally:
        await endpoints.close()
