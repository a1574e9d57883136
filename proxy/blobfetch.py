"""Bringing blobs from upstreams into the store.

One download per digest, whatever the number of clients; a download cut by the upstream
leaves its bytes for the next one to resume with `Range`; a download nobody waits for any more
is abandoned after `cache_write_timeout`; and when the disk is full, clients are served
straight from the upstream without caching until the cleaner has made room.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import sqlite3
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Final

import aiohttp

from . import errors
from .errors import BlobVerificationError, RegistryError, UpstreamError, upstream_failure
from .flight import CHUNK_SIZE, BlobDownload
from .metadata import ItemRecord, Metadata, sqlite_code
from .reference import Digest, Target
from .store import BlobStore
from .upstream import UpstreamClient

__all__ = ["BlobFetcher", "DirectTransfer", "disk_full_error"]

log = logging.getLogger(__name__)

_DISK_FULL: Final = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# After a write failed for want of space, how long to serve without caching before trying again.
_DISK_FULL_BACKOFF: Final = 30.0
_MAX_PARTIALS: Final = 16
# Batches of about CHUNK_SIZE received but not yet written: memory per download is bounded.
_PIPELINE_DEPTH: Final = 4


def _disk_full(exc: BaseException) -> bool:
    """Whether a write failed for want of space, on the file system or in SQLite."""
    if isinstance(exc, OSError):
        return exc.errno in _DISK_FULL
    return sqlite_code(exc) == sqlite3.SQLITE_FULL


def disk_full_error() -> RegistryError:
    """What a request that needs the cache to store a blob gets while its disk is full."""
    return RegistryError(errors.UNAVAILABLE, "the cache's disk is full")


class _Abandoned(Exception):
    """No client waited for the download for longer than `cache_write_timeout`."""


class DirectTransfer:
    """A blob streamed from the upstream to one client, verified but not cached."""

    def __init__(self, upstream: UpstreamClient, target: Target, digest: Digest) -> None:
        self.digest = digest
        self.size: int | None = None
        self._upstream = upstream
        self._target = target
        self._stack = contextlib.AsyncExitStack()
        self._response: aiohttp.ClientResponse | None = None

    async def wait_started(self) -> None:
        path = f"{self._target.repository}/blobs/{self.digest}"
        try:
            self._response = await self._stack.enter_async_context(
                self._upstream.open("GET", path, repository=self._target.repository)
            )
        except UpstreamError as exc:
            raise upstream_failure(exc, errors.BLOB_UNKNOWN) from None
        self.size = self._response.content_length

    async def close(self) -> None:
        """Let go of the upstream response when it will not be read."""
        await self._stack.aclose()

    async def read(self, start: int = 0, end: int | None = None) -> AsyncGenerator[bytes, None]:
        """Bytes `start` to `end`; the last piece only once the whole blob was verified."""
        assert self._response is not None, "wait_started() first"
        hasher = self.digest.hasher()
        position = 0
        held = b""
        try:
            async for chunk in self._response.content.iter_chunked(CHUNK_SIZE):
                hasher.update(chunk)
                low, high = max(start - position, 0), len(chunk)
                if end is not None:
                    high = min(high, end - position)
                position += len(chunk)
                if low < high:
                    if held:
                        yield held
                    held = chunk[low:high]
            if hasher.hexdigest() != self.digest.encoded:
                raise BlobVerificationError(f"{self.digest}: content does not match its digest")
            if held:
                yield held
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The response is already open: a failure now is a cut body, not an answer.
            raise RegistryError(errors.UNAVAILABLE, f"upstream transfer failed: {exc}") from None
        finally:
            await self.close()


class BlobFetcher:
    """Owns the downloads in flight and what cut ones left behind."""

    def __init__(
        self,
        store: BlobStore,
        metadata: Metadata,
        cache_write_timeout: float,
        *,
        parks_partials: bool = False,
    ) -> None:
        """`parks_partials`: whether cut downloads are parked under `partial/` and resumed
        from there; the server's fetcher only, whose cleaner budgets those files."""
        self.store = store
        self.metadata = metadata
        self.cache_write_timeout = cache_write_timeout
        self.parks_partials = parks_partials
        self.downloads: dict[Digest, BlobDownload] = {}
        # Downloads recorded in the metadata but not yet out of `downloads`: their bytes are in
        # the metadata's totals already, and must not count as incoming as well.
        self._recorded: set[Digest] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        # Cut downloads to continue from, oldest first: parked on disk, so a restart keeps them.
        self._partials: OrderedDict[Digest, Path] = OrderedDict()
        for parked in reversed(store.partials()) if parks_partials else ():
            self._keep_partial(parked.digest, parked.path)
        self._disk_full_until = 0.0
        # Told when a download learned its size, and when one landed: the cleaner's cue to
        # check the budget, `incoming_size()` included, before the disk fills.
        self.on_incoming: Callable[[], None] = lambda: None
        # Told how many bytes a write could not find room for: the cleaner must make room now.
        self.on_disk_full: Callable[[int], None] = lambda size: None

    @property
    def disk_full(self) -> bool:
        return time.monotonic() < self._disk_full_until

    def incoming_size(self) -> int:
        """Bytes on their way into the store: every download in flight, whole (what it has
        written to `tmp/` is not in the metadata's totals either)."""
        return sum(
            download.size or 0
            for digest, download in self.downloads.items()
            if digest not in self._recorded
        )

    def get(
        self, upstream: UpstreamClient, target: Target, digest: Digest
    ) -> tuple[BlobDownload | DirectTransfer, bool]:
        """The download bringing `digest` in (started if need be), or, while the disk is
        full, a direct transfer; and whether it joined a download already under way."""
        download = self.downloads.get(digest)
        if download is not None:
            return download, True
        if self.disk_full:
            return DirectTransfer(upstream, target, digest), False
        partial = self._partials.pop(digest, None)
        if partial is not None and partial.exists():
            download = BlobDownload(digest, partial, resume=True)
        else:
            download = BlobDownload(digest, self.store.temp_path())
        self.downloads[digest] = download
        task = asyncio.create_task(self._download(upstream, target, download))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return download, False

    async def close(self) -> None:
        """Let downloads in flight finish (they are bounded by the upstream timeouts)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def write_failed(self, exc: BaseException, needed: int) -> None:
        """A write into the cache failed (here, or a manifest's or tag's elsewhere): if for
        want of space, the whole cache reacts as one, as below."""
        if _disk_full(exc):
            self._disk_filled(needed)

    def _disk_filled(self, needed: int) -> None:
        """A write found no room: serve uncached for a while, give back what parked partial
        downloads hold, and have the cleaner free at least `needed` bytes."""
        self._disk_full_until = time.monotonic() + _DISK_FULL_BACKOFF
        self._drop_partials()
        self.on_disk_full(max(needed, CHUNK_SIZE))

    def _drop_partials(self) -> None:
        """Give a full disk back what parked partial downloads hold, ahead of the cleaner's
        next pass: they are worth less than the blobs it would otherwise evict."""
        while self._partials:
            _, path = self._partials.popitem()
            path.unlink(missing_ok=True)

    def _keep_partial(self, digest: Digest, path: Path) -> None:
        """Remember a partial download; beyond the newest few, the oldest file goes."""
        self._partials[digest] = path
        self._partials.move_to_end(digest)
        while len(self._partials) > _MAX_PARTIALS:
            _, oldest = self._partials.popitem(last=False)
            oldest.unlink(missing_ok=True)

    async def _download(
        self, upstream: UpstreamClient, target: Target, download: BlobDownload
    ) -> None:
        """Fetch a blob into the store, feeding its readers as it comes."""
        digest = download.digest
        try:
            await self._transfer(upstream, target, download)
            download.verify()
        except Exception as exc:
            self.downloads.pop(digest, None)
            self._fail(download, exc, target)
            return
        download.succeed()
        try:
            stored = await self._commit(download, target)
        finally:
            self.downloads.pop(digest, None)
            self._recorded.discard(digest)
            download.release()
        if stored:
            self.on_incoming()

    async def _commit(self, download: BlobDownload, target: Target) -> bool:
        """Move a verified download into the store, recorded first: a file under `blobs/`
        always has its record, so the cleaner's accounting never misses it. (A crash between
        the two leaves a record without a file, which start-up drops.) A blob that cannot be
        stored is dropped and fetched again when next asked for; a full disk, the file
        system's or SQLite's, also makes the cleaner free room."""
        digest = download.digest
        recorded = False
        try:
            await asyncio.get_running_loop().run_in_executor(None, download.sync)
            await self.metadata.add_item(
                ItemRecord(str(digest), "blob", download.written, None),
                (target.upstream, target.repository),
            )
            recorded = True
            self._recorded.add(digest)
            self.store.commit(download.temp_path, digest)
        except (OSError, sqlite3.Error) as exc:
            log.error("could not store %s: %s", digest, exc)
            download.temp_path.unlink(missing_ok=True)
            if recorded:
                await self._forget(digest)
            self.write_failed(exc, download.written)
            return False
        return True

    async def _forget(self, digest: Digest) -> None:
        """Drop the record of a blob that did not reach the store."""
        try:
            await self.metadata.remove_item(str(digest))
        except sqlite3.Error as exc:
            # No file: the cleaner's next eviction of it, or start-up, drops the record.
            log.warning("could not drop the record of unstored %s: %s", digest, exc)

    async def _transfer(
        self, upstream: UpstreamClient, target: Target, download: BlobDownload
    ) -> None:
        """Copy the upstream's bytes into the download, from where a cut one stopped."""
        if download.resuming:
            await download.resume_partial()
        offset = download.written
        headers = {"Range": f"bytes={offset}-"} if offset else None
        path = f"{target.repository}/blobs/{download.digest}"
        async with upstream.open(
            "GET", path, repository=target.repository, headers=headers
        ) as response:
            size = response.content_length
            if offset and response.status == 206:
                total = response.headers.get("Content-Range", "").rpartition("/")[2]
                size = int(total) if total.isdigit() else None
                log.info("resuming %s at byte %d of %s", download.digest, offset, size)
            elif offset:
                download.restart()
            download.start(size)
            self.on_incoming()
            await self._pipe(response, download)

    async def _pipe(self, response: aiohttp.ClientResponse, download: BlobDownload) -> None:
        """Receive from the socket while earlier chunks are hashed and written in a thread:
        the two stages overlap instead of taking turns."""
        batches: asyncio.Queue[list[bytes] | None] = asyncio.Queue(maxsize=_PIPELINE_DEPTH)
        storing = asyncio.create_task(self._store(download, batches))
        batch: list[bytes] = []
        batched = 0
        try:
            try:
                # Each piece as the socket gave it (`iter_any` would join what is buffered:
                # a copy of every byte, a tenth of the receiving thread's time).
                async for chunk, _ in response.content.iter_chunks():
                    batch.append(chunk)
                    batched += len(chunk)
                    if batched >= CHUNK_SIZE:
                        await self._hand_over(batches, batch, storing)
                        batch, batched = [], 0
            finally:
                # Even when the connection was cut: what arrived is kept, for a resume.
                if batch:
                    await self._hand_over(batches, batch, storing)
                await self._hand_over(batches, None, storing)
                await storing
        finally:
            storing.cancel()

    @staticmethod
    async def _hand_over(
        batches: asyncio.Queue[list[bytes] | None],
        batch: list[bytes] | None,
        storing: asyncio.Task[None],
    ) -> None:
        """Queue a batch for storing; if storing failed, raise its error instead of waiting."""
        if storing.done():
            storing.result()
        put = asyncio.ensure_future(batches.put(batch))
        await asyncio.wait({put, storing}, return_when=asyncio.FIRST_COMPLETED)
        if not put.done():
            put.cancel()
            storing.result()

    async def _store(
        self, download: BlobDownload, batches: asyncio.Queue[list[bytes] | None]
    ) -> None:
        while (batch := await batches.get()) is not None:
            idle = time.monotonic() - download.idle_since
            if not download.readers and idle > self.cache_write_timeout:
                raise _Abandoned(f"no client waited for {download.digest} for {idle:.0f}s")
            await download.append(batch)

    def _fail(self, download: BlobDownload, exc: Exception, target: Target) -> None:
        """Report a failed download to its readers; keep what a cut one got, for a resume."""
        digest = download.digest
        if _disk_full(exc):
            self._disk_filled((download.size or 0) - download.written)
            error: Exception = disk_full_error()
        elif isinstance(exc, UpstreamError):
            error = upstream_failure(exc, errors.BLOB_UNKNOWN)
        else:
            error = exc
        resumable = (
            self.parks_partials
            and isinstance(exc, errors.UpstreamUnavailable)
            and download.written > 0
        )
        download.fail(error, keep_partial=resumable)
        if resumable:
            try:
                self._keep_partial(digest, self.store.keep_partial(download.temp_path, digest))
            except OSError as kept_error:
                resumable = False
                download.temp_path.unlink(missing_ok=True)
                log.warning("could not keep the partial download of %s: %s", digest, kept_error)
        log.warning(
            "download of %s from %s failed after %d bytes%s: %s",
            digest,
            target.upstream,
            download.written,
            " (kept to resume)" if resumable else "",
            exc,
        )
