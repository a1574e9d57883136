"""The cleaner: keeps the cache under its disk budget, least recently used first.

It runs every `run_every`, and at once when a download pushes the cache past the high-water
mark (`max_size * (1 + threshold/100)`), so that a burst of pulls cannot fill the disk between
two runs. Sizes come from the metadata database: no walk of the disk per run. The budget also
covers the parked starts of cut downloads (`partial/`, at most a few files), which go first,
oldest first, being worth less than any verified blob, and the downloads in flight: a pass
makes room for them before they land.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from proxy.metadata import Candidate, Metadata
from proxy.metrics import Metrics
from proxy.reference import Digest
from proxy.settings import CleanerSettings
from proxy.store import BlobStore, Parked

from .policy import choose_victims

__all__ = ["Cleaner", "EvictionReport"]

log = logging.getLogger(__name__)

_ROOM_RETRY: Final = 1.0


@dataclass(slots=True)
class EvictionReport:
    """What one pass did, or (dry run) would do."""

    size_before: int
    target: int
    victims: list[Candidate] = field(default_factory=list)
    dropped: list[Parked] = field(default_factory=list)

    @property
    def freed(self) -> int:
        return sum(victim.size for victim in self.victims) + self.dropped_size

    @property
    def dropped_size(self) -> int:
        return sum(parked.size for parked in self.dropped)


class Cleaner:
    """Evicts from one store and its metadata; one per process."""

    def __init__(
        self,
        settings: CleanerSettings,
        store: BlobStore,
        metadata: Metadata,
        in_use: Callable[[str], bool] = lambda digest: False,
        incoming: Callable[[], int] = lambda: 0,
        metrics: Metrics | None = None,
        *,
        manages_partials: bool = True,
    ) -> None:
        """`manages_partials`: whether the parked partial downloads are this cleaner's to
        budget and drop; only the server's, which knows the ones it is resuming."""
        self.settings = settings
        self.store = store
        self.metadata = metadata
        self.in_use = in_use
        self.incoming = incoming
        self.metrics = metrics
        self.manages_partials = manages_partials
        self._nudged = asyncio.Event()
        self._lock = asyncio.Lock()
        self._room_needed = 0

    def nudge(self) -> None:
        """Wake the cleaner now if the cache is past the high-water mark, counting what the
        downloads in flight will bring."""
        if self.budgeted_size() > self.settings.high_water_mark:
            self._nudged.set()

    def budgeted_size(self) -> int:
        """What the budget covers: the cached items, the parked partial downloads and the
        downloads in flight."""
        parked = sum(entry.size for entry in self._parked())
        return self.metadata.total_size + parked + self.incoming()

    def _parked(self) -> list[Parked]:
        """Parked partial downloads, oldest first, but for those being resumed right now.
        A handful of files: cheap enough to list on every pass and nudge."""
        if not self.manages_partials:
            return []
        return [
            parked
            for parked in reversed(self.store.partials())
            if not self.in_use(str(parked.digest))
        ]

    def make_room(self, needed: int) -> None:
        """The disk is full: free at least `needed` bytes now, whatever the budget says."""
        self._room_needed = max(self._room_needed, needed)
        self._nudged.set()

    async def serve(self) -> None:
        """Run every `run_every`, or when nudged; until cancelled. Room the disk still needs
        (what was in use could not go) is sought again every second."""
        while True:
            wait = _ROOM_RETRY if self._room_needed else self.settings.run_every
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._nudged.wait(), timeout=wait)
            self._nudged.clear()
            needed, self._room_needed = self._room_needed, 0
            try:
                await self._pass(needed)
            except Exception:
                # A busy or full database, a file system error: the next pass tries again.
                log.exception("cleaner pass failed")
                self._room_needed = max(self._room_needed, needed)

    async def _pass(self, needed: int) -> None:
        """Evict if over the high-water mark, or if the disk needs `needed` bytes now."""
        # The admin `clean` command may have evicted from another process meanwhile.
        await self.metadata.refresh_totals()
        if not (needed or self.budgeted_size() > self.settings.high_water_mark):
            return
        report = await self.clean(needed=needed)
        if needed > report.freed and self.metadata.total_size > 0:
            self._room_needed = max(self._room_needed, needed - report.freed)

    def _target(self, total: int, needed: int) -> int:
        """Where a pass evicts down to, given the items' `total` at the same moment as
        `incoming()` (read apart, a download landing in between counts twice).

        Down to the limit, or lower by as much as what is on its way in would pass the
        high-water mark when it lands (a burst of cold pulls); lower still only when the disk
        needs room now. (Not to the items' size of this moment: parked partials can pass the
        mark below the limit, and an item stored while the pass runs would then be evicted
        at once.)
        """
        target = min(self.settings.max_size, self.settings.high_water_mark - self.incoming())
        if needed:
            target = min(target, total - needed)
        return max(target, 0)

    async def clean(
        self, max_size: int | None = None, dry_run: bool = False, needed: int = 0
    ) -> EvictionReport:
        """Evict least recently used items until the cache holds at most `max_size`; by
        default, what the budget allows, with room for the downloads in flight and for
        `needed` more bytes."""
        async with self._lock:
            started = time.monotonic()
            try:
                await self.metadata.flush_access_times()
            except sqlite3.OperationalError as exc:
                # On a full disk even SQLite cannot write; evicting (files first) makes room.
                log.warning("evicting with access times not yet written: %s", exc)
            chosen_at = time.time()
            pinned = await self.metadata.pinned_size()
            total, _ = await self.metadata.totals()
            # The items' total, the downloads in flight and the parked partials are read in one
            # step, no await between: a download that lands (into the total) or is cut (into
            # the parked partials) is then counted once.
            target = self._target(total, needed) if max_size is None else max_size
            parked = self._parked()
            if pinned > target:
                log.warning(
                    "pinned images alone take %d bytes, over the %d-byte budget; "
                    "evicting everything else",
                    pinned,
                    target,
                )
            report = EvictionReport(total, target)
            total += sum(entry.size for entry in parked)
            for entry in parked:
                if total <= target:
                    break
                if not dry_run:
                    entry.path.unlink(missing_ok=True)
                report.dropped.append(entry)
                total -= entry.size
            candidates = await self.metadata.eviction_candidates()
            victims = choose_victims(candidates, total, target, self.in_use)
            for victim in victims:
                if dry_run or await self._evict(victim, chosen_at):
                    report.victims.append(victim)
            if not dry_run:
                self._record(report, time.monotonic() - started)
            return report

    async def _evict(self, victim: Candidate, chosen_at: float) -> bool:
        """Delete the file and its records; nothing in between lets a request see half. An
        item used since the victims were chosen (a pull of an old image, begun while a long
        pass evicts it) is left: the pull gets its whole image."""
        if await self.metadata.used_since(victim.digest, chosen_at):
            return False
        if self.in_use(victim.digest):
            return False
        # The check above and the unlink run without yielding to the event loop, so no
        # request can start reading this file in between.
        had_file = self.store.delete(Digest.parse(victim.digest))
        try:
            await self.metadata.remove_item(victim.digest)
        except sqlite3.OperationalError as exc:
            if not had_file:
                # An earlier pass evicted it and could not drop the record either: nothing
                # was freed now, and nothing is counted.
                return False
            # The file is gone and its space free; the record goes on a later pass (or at
            # start-up), and meanwhile a request finds no file and fetches it again.
            log.warning("evicted %s, record kept for now: %s", victim.digest, exc)
        return True

    def _record(self, report: EvictionReport, seconds: float) -> None:
        if report.dropped:
            log.info(
                "dropped %d parked partial downloads, %d bytes",
                len(report.dropped),
                report.dropped_size,
            )
        if report.victims:
            log.info(
                "evicted %d items, %d bytes (cache was %d bytes, target %d)",
                len(report.victims),
                report.freed,
                report.size_before,
                report.target,
            )
        if self.metrics is not None:
            self.metrics.cleaner_runs.inc()
            self.metrics.cleaner_duration.observe(seconds)
            self.metrics.evicted_items.inc(len(report.victims))
            self.metrics.evicted_bytes.inc(report.freed)
