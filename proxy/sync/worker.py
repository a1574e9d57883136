"""One sync pass over entries, the way regsync decides and copies.

Per tag: HEAD the source and the target and copy only when the digests differ. Copies share
`parallel` slots; before one starts, a source that announces `RateLimit-Remaining` below
`ratelimit.min` is waited for (without holding a slot) and checked again. A failing tag or entry
is recorded and reported, never allowed to stop the others.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from proxy.errors import BlobVerificationError, RegistryError, UpstreamError
from proxy.metadata import Metadata
from proxy.metrics import Metrics

from .attached import Attachments
from .config import PIN_OWNER_PREFIX, Entry, SyncConfig
from .copy import children, is_index
from .endpoints import Endpoints
from .filters import select
from .progress import SILENT, Progress, labelled
from .refs import CacheRef
from .remote import Head, Remote
from .retention import to_retire
from .targets import Destination

__all__ = ["EntryResult", "Worker"]

log = logging.getLogger("registry_cache.sync")

Sleep = Callable[[float], Awaitable[None]]


def event(name: str, **fields: object) -> None:
    """A structured log line: what happened, to which entry and reference."""
    log.info("%s", json.dumps({"event": name, **fields}, default=str))


@dataclass(slots=True)
class EntryResult:
    """What one entry's pass did (or, dry, would do)."""

    entry: str
    checked: int = 0
    copied: int = 0
    skipped: int = 0
    failed: int = 0
    bytes: int = 0
    errors: list[str] = field(default_factory=list)
    planned: list[str] = field(default_factory=list)
    retired: list[str] = field(default_factory=list)
    would_copy: list[str] = field(default_factory=list)  # target tags a dry run would write

    @property
    def ok(self) -> bool:
        return not self.errors

    def fail(self, reference: str, cause: Exception | str) -> None:
        message = f"{self.entry}: {reference}: {cause}"
        self.errors.append(message)
        # A failure we did not foresee (a bug) also gets its traceback in the log.
        foreseen = (UpstreamError, RegistryError, BlobVerificationError, ValueError, OSError)
        unforeseen = (
            cause if isinstance(cause, Exception) and not isinstance(cause, foreseen) else None
        )
        log.error("sync %s", message, exc_info=unforeseen)


class Worker:
    """Runs entries; one per process, sharing the `parallel` slots."""

    def __init__(
        self,
        config: SyncConfig,
        endpoints: Endpoints,
        metrics: Metrics,
        metadata: Metadata | None = None,
        *,
        dry_run: bool = False,
        sleep: Sleep = asyncio.sleep,
        progress: Progress = SILENT,
        on_result: Callable[[EntryResult], None] = lambda result: None,
    ) -> None:
        self.config = config
        self.endpoints = endpoints
        self.metrics = metrics
        self.metadata = metadata
        self.dry_run = dry_run
        self.sleep = sleep
        self.progress = progress
        self.on_result = on_result
        self._slots = asyncio.Semaphore(config.parallel)

    async def run_all(self, missing: bool = False) -> list[EntryResult]:
        results = await asyncio.gather(*(self.run(e, missing) for e in self.config.entries))
        await self._drop_stale_pins()
        return list(results)

    async def run(self, entry: Entry, missing: bool = False) -> EntryResult:
        """One pass of one entry; never raises for a registry's or an image's fault."""
        result = EntryResult(entry.name)
        started = time.monotonic()
        event("sync.start", entry=entry.name, source=str(entry.source), target=str(entry.target))
        try:
            source = self.endpoints.source(entry)
            destination = self.endpoints.destination(entry)
            tags = await self._tags(entry, source)
            attachments = (
                Attachments(
                    source,
                    entry.source.repository,
                    destination,
                    digest_tags=entry.digest_tags,
                    referrers=entry.referrers,
                    filters=entry.referrer_filters,
                )
                if entry.digest_tags or entry.referrers
                else None
            )
            await asyncio.gather(
                *(
                    self._tag(entry, source, destination, attachments, tag, result, missing)
                    for tag in tags
                )
            )
            retired = await self._retention(entry, destination, result)
            if entry.pin and not self.dry_run and self.metadata is not None:
                await self._pin(entry, destination, [t for t in tags if t not in retired])
        except Exception as exc:  # one entry's failure, of any kind, is its own
            result.fail(str(entry.source), exc)
        self._account(entry, result, time.monotonic() - started)
        return result

    async def _tags(self, entry: Entry, source: Remote) -> list[str]:
        if entry.type == "image":
            return [entry.source.tag or entry.source.digest or "latest"]
        return select(await source.tags(entry.source.repository), entry.tags)

    async def _tag(
        self,
        entry: Entry,
        source: Remote,
        destination: Destination,
        attachments: Attachments | None,
        tag: str,
        result: EntryResult,
        missing: bool,
    ) -> None:
        target_tag = entry.target.tag or tag
        reference = f"{entry.source.name}:{tag}"
        result.checked += 1
        try:
            head = await source.head_manifest(entry.source.repository, tag)
            if head is None:
                raise UpstreamError("not found at the source")
            digest = await self._wanted_digest(entry, source, tag, head)
            current = await destination.digest(target_tag)
            up_to_date = current == digest
            # As regsync: an image that is up to date still gets its attachments checked.
            if (up_to_date and attachments is None) or (missing and current is not None):
                result.skipped += 1
                return
            if head.media_type and head.media_type not in entry.media_types:
                event("sync.skip", entry=entry.name, ref=reference, media_type=head.media_type)
                result.skipped += 1
                return
            if self.dry_run and up_to_date:
                result.skipped += 1
                return
            if self.dry_run:
                plan = f"copy {reference} ({digest}) to {destination.description}:{target_tag}"
                result.planned.append(plan)
                result.would_copy.append(target_tag)
                event("sync.plan", entry=entry.name, ref=reference, digest=digest)
                return
            await self._acquire(entry, source, tag, head)
            try:
                if not up_to_date:
                    await self._copy(
                        entry, source, destination, tag, target_tag, digest, current, result
                    )
                if attachments is not None:
                    await self._attach(entry, attachments, reference, digest, result)
                if up_to_date:
                    result.skipped += 1  # only once its attachments did not fail it
            finally:
                self._slots.release()
        except Exception as exc:  # one tag's failure, of any kind, is its own
            result.failed += 1
            result.fail(reference, exc)

    async def _wanted_digest(self, entry: Entry, source: Remote, tag: str, head: Head) -> str:
        """The source digest the target should name: with `platform`, the one platform's."""
        if entry.platform is None or (
            "index" not in head.media_type and "list" not in head.media_type
        ):
            return head.digest
        index = await source.manifest(entry.source.repository, head.digest)
        matching = children(index, (entry.platform,)) if is_index(index) else []
        if not matching:
            raise ValueError(f"no {entry.platform} image in {head.digest}")
        return str(matching[0]["digest"])

    async def _acquire(self, entry: Entry, source: Remote, tag: str, head: Head) -> None:
        """Take a `parallel` slot once the source's rate limit allows a pull (regsync's gate:
        only when the source announced a limit, re-checked with a HEAD, the slot given back
        while waiting)."""
        await self._slots.acquire()
        policy = entry.ratelimit
        if policy.min <= 0 or head.rate_limit is None or head.rate_limit.remaining is None:
            return
        try:
            while True:
                current = await source.head_manifest(entry.source.repository, tag)
                limit = current.rate_limit if current else None
                if limit is None or limit.remaining is None or limit.remaining >= policy.min:
                    return
                self._slots.release()
                self.metrics.sync_ratelimit_waits.labels(source.name).inc()
                event(
                    "sync.ratelimit_wait",
                    entry=entry.name,
                    registry=source.name,
                    remaining=limit.remaining,
                    min=policy.min,
                    wait_seconds=policy.retry,
                )
                await self.sleep(policy.retry)
                await self._slots.acquire()
        except BaseException:
            self._slots.release()
            raise

    async def _copy(
        self,
        entry: Entry,
        source: Remote,
        destination: Destination,
        tag: str,
        target_tag: str,
        digest: str,
        current: str | None,
        result: EntryResult,
    ) -> None:
        reference = f"{entry.source.name}:{tag}"
        if current is not None and entry.backup is not None:
            target = entry.target
            registry = target.upstream if isinstance(target, CacheRef) else target.registry
            ref = {
                "Reference": f"{registry}/{target.repository}:{target_tag}",
                "Registry": registry,
                "Repository": target.repository,
                "Tag": target_tag,
                "Digest": current,
            }
            name = entry.backup.render({"Ref": ref, "Sync": entry.template_view})
            try:
                where = await destination.backup(target_tag, current, name)
                event("sync.backup", entry=entry.name, ref=reference, backup=where, digest=current)
            except (UpstreamError, RegistryError, ValueError) as exc:
                # As regsync: a failed backup is a warning, the copy goes on.
                log.warning("sync %s: backup of %s failed: %s", entry.name, target_tag, exc)
        started = time.monotonic()
        event("sync.copy", entry=entry.name, ref=reference, digest=digest)
        copied = await destination.copy(
            source,
            entry.source.repository,
            digest,
            target_tag,
            entry.platforms,
            labelled(self.progress, reference),
        )
        result.copied += 1
        result.bytes += copied
        event(
            "sync.copied",
            entry=entry.name,
            ref=reference,
            target=f"{destination.description}:{target_tag}",
            digest=digest,
            bytes=copied,
            seconds=round(time.monotonic() - started, 3),
        )

    async def _attach(
        self,
        entry: Entry,
        attachments: Attachments,
        reference: str,
        digest: str,
        result: EntryResult,
    ) -> None:
        """Copy the image's digest tags and referrers (`digestTags`, `referrers`)."""
        attached = await attachments.attach(digest, entry.platforms)
        result.bytes += attached.bytes
        if attached.refs:
            event(
                "sync.attached",
                entry=entry.name,
                ref=reference,
                digest=digest,
                copied=attached.refs,
                bytes=attached.bytes,
            )

    async def _retention(
        self, entry: Entry, destination: Destination, result: EntryResult
    ) -> set[str]:
        if entry.retention is None:
            return set()
        tags = select({*await destination.tags(), *result.would_copy}, entry.tags)
        created = (
            {tag: await destination.created(tag) for tag in tags}
            if entry.retention.sort == "date"
            else None
        )
        retired = to_retire(tags, entry.retention, created)
        for tag in retired:
            if self.dry_run:
                result.planned.append(f"delete {destination.description}:{tag}")
                event("sync.plan_delete", entry=entry.name, tag=tag)
                continue
            await destination.retire(tag)
            result.retired.append(tag)
            event("sync.retired", entry=entry.name, target=f"{destination.description}:{tag}")
        return set(retired)

    async def _pin(self, entry: Entry, destination: Destination, tags: list[str]) -> None:
        """Protect what the entry's tags name now; what left the set is unpinned."""
        assert self.metadata is not None
        digests = [d for tag in tags if (d := await destination.digest(tag)) is not None]
        await self.metadata.set_pins(entry.pin_owner, digests)

    async def _drop_stale_pins(self) -> None:
        """Entries removed from the configuration no longer protect anything."""
        if self.metadata is None or self.dry_run:
            return
        current = {e.pin_owner for e in self.config.entries if e.pin}
        for owner in await self.metadata.pin_owners():
            if owner.startswith(PIN_OWNER_PREFIX) and owner not in current:
                await self.metadata.set_pins(owner, [])

    def _account(self, entry: Entry, result: EntryResult, seconds: float) -> None:
        name = entry.name
        if not self.dry_run:
            self.metrics.sync_runs.labels(name, "ok" if result.ok else "failed").inc()
            for outcome, count in (
                ("copied", result.copied),
                ("skipped", result.skipped),
                ("failed", result.failed),
                ("retired", len(result.retired)),
            ):
                if count:
                    self.metrics.sync_tags.labels(name, outcome).inc(count)
            self.metrics.sync_bytes.labels(name).inc(result.bytes)
            self.metrics.sync_last_run.labels(name).set(time.time())
            self.on_result(result)
        event(
            "sync.done",
            entry=name,
            ok=result.ok,
            checked=result.checked,
            copied=result.copied,
            skipped=result.skipped,
            failed=result.failed,
            bytes=result.bytes,
            seconds=round(seconds, 3),
        )
