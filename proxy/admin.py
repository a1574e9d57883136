"""The admin sub-commands: du, ls, clean, verify. They work on a data directory, also while
the server runs (SQLite in WAL mode lets both use the database)."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from cleaner.service import Cleaner
from proxy.metadata import DATABASE_FILE, Metadata, Usage
from proxy.settings import ConfigError, Settings, format_bytes
from proxy.store import BlobStore

__all__ = ["clean", "du", "ls", "verify"]

Print = Callable[[str], None]


@asynccontextmanager
async def _open(settings: Settings) -> AsyncIterator[tuple[BlobStore, Metadata]]:
    """The server's store and database. A missing directory is refused, not created: it means
    the command was not given the server's configuration, and would report on an empty cache."""
    if not settings.storage_root.is_dir():
        raise ConfigError(
            f"storage.root (REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY): data directory "
            f"{settings.storage_root} does not exist; give the server's --config"
        )
    store = BlobStore(settings.storage_root)
    metadata = Metadata(store.root / DATABASE_FILE)
    await metadata.open()
    try:
        yield store, metadata
    finally:
        await metadata.close()


def _usage_lines(title: str, rows: list[Usage]) -> list[str]:
    width = max([len(row.name) for row in rows] + [len(title)])
    lines = [f"{title:<{width}}  {'SIZE':>10}  ITEMS"]
    lines += [f"{row.name:<{width}}  {format_bytes(row.size):>10}  {row.items}" for row in rows]
    return lines


async def du(settings: Settings, out: Print) -> int:
    """Size and item count, in total, per upstream and per repository."""
    async with _open(settings) as (_, metadata):
        total, upstreams, repositories = await metadata.usage()
    limit = format_bytes(settings.cleaner.max_size)
    out(f"total: {format_bytes(total.size)} in {total.items} items (limit {limit})")
    for title, rows in (("UPSTREAM", upstreams), ("REPOSITORY", repositories)):
        if rows:
            out("")
            for line in _usage_lines(title, rows):
                out(line)
    return 0


async def ls(settings: Settings, prefix: str, out: Print) -> int:
    """Cached tags under `prefix` with digest, image size and last access."""
    async with _open(settings) as (_, metadata):
        listing = await metadata.tag_listing(prefix)
    for entry in listing:
        accessed = datetime.datetime.fromtimestamp(entry.accessed_at, datetime.UTC)
        out(
            f"{entry.upstream}/{entry.repository}:{entry.tag}  {entry.digest}  "
            f"{format_bytes(entry.size)}  {accessed:%Y-%m-%d %H:%M:%S}Z"
        )
    return 0


async def clean(settings: Settings, max_size: int | None, dry_run: bool, out: Print) -> int:
    """One cleaner pass now. Without `max_size`, the server's rule: act above the high-water
    mark, down to the limit; with it, evict down to `max_size` whatever the size.

    Only verified items go: `partial/` and `tmp/` are the server's working files (it may be
    resuming a download into one right now), left to its own cleaner and start-up."""
    async with _open(settings) as (store, metadata):
        cleaner = Cleaner(settings.cleaner, store, metadata, manages_partials=False)
        total = cleaner.budgeted_size()  # items counted when the database was opened
        if max_size is None and total <= settings.cleaner.high_water_mark:
            out(
                f"cache holds {format_bytes(total)}, under the high-water mark "
                f"{format_bytes(settings.cleaner.high_water_mark)}: nothing to do"
            )
            return 0
        report = await cleaner.clean(max_size=max_size, dry_run=dry_run)
    verb = "would evict" if dry_run else "evicted"
    for victim in report.victims:
        out(f"{verb} {victim.kind} {victim.digest} {format_bytes(victim.size)}")
    out(f"{verb} {len(report.victims)} items, {format_bytes(report.freed)} ({report.freed} bytes)")
    return 0


async def verify(settings: Settings, repair: bool, out: Print) -> int:
    """Re-hash every stored file; report corrupt ones and, with `repair`, remove them."""
    async with _open(settings) as (store, metadata):
        found, _ = await asyncio.to_thread(store.scan)
        corrupt = 0
        for digest in sorted(found, key=str):
            if await asyncio.to_thread(store.intact, digest):
                continue
            corrupt += 1
            if repair:
                store.delete(digest)
                await metadata.remove_item(str(digest))
                out(f"corrupt, removed: {digest}")
            else:
                out(f"corrupt: {digest}")
    out(f"verified {len(found)} files, {corrupt} corrupt")
    return 1 if corrupt and not repair else 0
