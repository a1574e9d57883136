"""Start-up reconciliation of the metadata database with the files on disk.

After a crash or a manual intervention the two may disagree: a temporary file left by an
interrupted download, a file the database does not know, a record whose file is gone or has
the wrong size. Nothing unverified is kept: an unknown file is adopted only if it hashes to its
name.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from proxy.metadata import ItemRecord, Metadata
from proxy.reference import Digest
from proxy.store import BlobStore

__all__ = ["ReconcileReport", "reconcile"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ReconcileReport:
    temp_removed: int = 0
    records_dropped: int = 0
    adopted: int = 0
    removed: int = 0


async def reconcile(store: BlobStore, metadata: Metadata) -> ReconcileReport:
    """Make the database and the store agree; slow only for files the database does not know."""
    report = ReconcileReport()
    for temp in await asyncio.to_thread(store.temp_files):
        await asyncio.to_thread(temp.unlink, missing_ok=True)
        report.temp_removed += 1
    known = {record.digest: record for record in await metadata.items()}
    on_disk, strays = await asyncio.to_thread(store.scan)
    for stray in strays:
        await asyncio.to_thread(stray.unlink, missing_ok=True)
        report.removed += 1
    for digest_text, record in known.items():
        digest = Digest.parse(digest_text)
        path = on_disk.get(digest)
        size = await asyncio.to_thread(store.size, digest) if path else None
        if size != record.size:
            if path is not None:
                store.delete(digest)
            await metadata.remove_item(digest_text)
            report.records_dropped += 1
    for digest, path in on_disk.items():
        if str(digest) in known:
            continue
        if await asyncio.to_thread(store.intact, digest):
            size = path.stat().st_size
            await metadata.add_item(ItemRecord(str(digest), "blob", size, None), holder=None)
            report.adopted += 1
        else:
            store.delete(digest)
            report.removed += 1
    if report != ReconcileReport():
        log.info("reconciled the store with the database: %s", report)
    return report
