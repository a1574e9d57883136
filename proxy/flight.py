"""Single-flight: one upstream request per missing object, however many clients want it.

`SingleFlight` shares the result of one coroutine between concurrent callers (manifests, tag
revalidation). `BlobDownload` shares a blob download as it happens: the bytes go to a
temporary file while being hashed, and every waiting client reads the growing file (through a
descriptor of its own when it is sent by sendfile). The final byte is released only once the
whole blob matched its digest, so a client can never take a corrupt or cut transfer for a
complete one.

Downloads run as tasks owned by the cache, not by a request: a client that disconnects does
not abort a download others wait for.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Hashable
from pathlib import Path
from typing import BinaryIO, Final, Generic, TypeVar

from .errors import BlobVerificationError
from .reference import Digest
from .store import FILE_MODE

__all__ = ["CHUNK_SIZE", "BlobDownload", "SingleFlight"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

CHUNK_SIZE: Final = 1024 * 1024
Span = tuple[int, int]
# What a reader hands to its client at a time: each client holds up to one such piece in its
# socket buffer, so this bounds memory under hundreds of concurrent readers.
_READ_SIZE: Final = 256 * 1024


class SingleFlight(Generic[K, V]):
    """Concurrent calls with the same key share one execution and its outcome."""

    def __init__(self, on_join: Callable[[], None] = lambda: None) -> None:
        self._running: dict[K, asyncio.Task[V]] = {}
        self._on_join = on_join

    async def do(self, key: K, work: Callable[[], Awaitable[V]]) -> V:
        task = self._running.get(key)
        if task is None:
            task = asyncio.ensure_future(work())
            self._running[key] = task
            task.add_done_callback(lambda _: self._running.pop(key, None))
        else:
            self._on_join()
        # A caller that goes away must not cancel the work the others wait for.
        return await asyncio.shield(task)


class BlobDownload:
    """A blob on its way from the upstream into the store, readable while it grows."""

    def __init__(self, digest: Digest, temp_path: Path, *, resume: bool = False) -> None:
        """A new download into `temp_path`, or (`resume`) one continuing a cut download's
        partial file; `resume_partial` must then run before anything is appended."""
        self.digest = digest
        self.temp_path = temp_path
        self.resuming = resume
        self.size: int | None = None
        self.written = 0
        flags = os.O_RDWR | os.O_CREAT | (0 if resume else os.O_EXCL)
        self._fd = os.open(temp_path, flags, FILE_MODE)
        self._hasher = digest.hasher()
        self._users = 1  # the writer
        self.readers = 0
        self.idle_since = time.monotonic()
        loop = asyncio.get_running_loop()
        self._started: asyncio.Future[None] = loop.create_future()
        self.finished: asyncio.Future[None] = loop.create_future()
        self._progress = asyncio.Event()
        self._settled = False

    # -- the writer side ---------------------------------------------------------------------

    async def resume_partial(self) -> None:
        """Take the bytes a cut download left as already written (hashed again from disk)."""

        def rehash() -> int:
            with open(self.temp_path, "rb") as file:
                while chunk := file.read(CHUNK_SIZE):
                    self._hasher.update(chunk)
                return file.tell()

        self.written = await asyncio.get_running_loop().run_in_executor(None, rehash)

    def restart(self) -> None:
        """Forget a partial file the upstream would not let us continue (it ignored Range)."""
        os.ftruncate(self._fd, 0)
        self._hasher = self.digest.hasher()
        self.written = 0

    def start(self, size: int | None) -> None:
        """The upstream answered; readers may begin."""
        self.size = size
        if not self._started.done():
            self._started.set_result(None)

    async def append(self, chunks: list[bytes]) -> None:
        """Write chunks and hash them, in two threads at once (pwritev and hashlib release the
        GIL), without joining them first. Readers get the bytes as soon as they are written:
        the hash only gates the last byte, which `succeed` releases."""
        loop = asyncio.get_running_loop()
        hashed = loop.run_in_executor(None, self._hash, chunks)
        try:
            await loop.run_in_executor(None, self._write, chunks)
            self.written += sum(len(chunk) for chunk in chunks)
            self._notify()
        finally:
            await hashed

    def _hash(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self._hasher.update(chunk)

    def _write(self, chunks: list[bytes]) -> None:
        offset = self.written
        views = [memoryview(chunk) for chunk in chunks]
        while views:
            done = os.pwritev(self._fd, views, offset)
            offset += done
            while views and done >= len(views[0]):
                done -= len(views.pop(0))
            if views:
                views[0] = views[0][done:]

    def verify(self) -> None:
        """Check what was written against the digest; raises `BlobVerificationError`."""
        if self.size is not None and self.written != self.size:
            raise BlobVerificationError(
                f"{self.digest}: upstream sent {self.written} bytes of {self.size}"
            )
        if self._hasher.hexdigest() != self.digest.encoded:
            raise BlobVerificationError(f"{self.digest}: content does not match its digest")

    def sync(self) -> None:
        """Flush the file to disk before it is renamed into the store. Blocking."""
        os.fsync(self._fd)

    def succeed(self) -> None:
        """Release the last bytes to the readers. The writer still holds the file."""
        self.size = self.written
        self._settle(None)

    def fail(self, error: BaseException, *, keep_partial: bool = False) -> None:
        """Fail every reader and let go of the descriptor; drop the temporary file unless it
        is kept for a later download to resume from."""
        self._settle(error)
        if not keep_partial:
            with contextlib.suppress(FileNotFoundError):
                self.temp_path.unlink()
        self.release()

    def _settle(self, error: BaseException | None) -> None:
        if self._settled:
            return
        self._settled = True
        for future in (self._started, self.finished):
            if future.done():
                continue
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)
                # Nobody may be waiting; the error is reported by the download task.
                future.exception()
        self._notify()

    def _notify(self) -> None:
        event, self._progress = self._progress, asyncio.Event()
        event.set()

    def release(self) -> None:
        self._users -= 1
        if self._users == 0:
            os.close(self._fd)

    # -- the reader side ---------------------------------------------------------------------

    async def wait_started(self) -> None:
        """Wait until the size is known (or the download failed, which raises)."""
        await asyncio.shield(self._started)

    async def spans(self, start: int = 0, end: int | None = None) -> AsyncGenerator[Span, None]:
        """Yield `(offset, count)` pieces of bytes `start` to `end` (exclusive) as they arrive,
        for the caller to send from `open_file()`.

        Raises the download's error if it fails; the last byte (of the blob, or of the range)
        is only released after the digest was verified.
        """
        self._users += 1
        self.readers += 1
        try:
            await self.wait_started()
            position = start
            while end is None or position < end:
                progress = self._progress
                wanted = self.written if end is None else min(self.written, end)
                if self.finished.done():
                    self.finished.result()
                    limit = wanted
                else:
                    # The last byte of a range, as of the whole blob, waits for the check: a
                    # ranged reader must not take an unverified transfer for a complete one.
                    limit = wanted - 1
                if position < limit:
                    yield position, limit - position
                    position = limit
                elif self.finished.done():
                    return
                else:
                    await progress.wait()
        finally:
            self.release()
            self.readers -= 1
            self.idle_since = time.monotonic()

    async def read(self, start: int = 0, end: int | None = None) -> AsyncGenerator[bytes, None]:
        """The bytes of `spans`, in pieces small enough that many readers stay cheap."""
        loop = asyncio.get_running_loop()
        async with contextlib.aclosing(self.spans(start, end)) as spans:
            async for offset, count in spans:
                for position in range(offset, offset + count, _READ_SIZE):
                    size = min(_READ_SIZE, offset + count - position)
                    yield await loop.run_in_executor(None, os.pread, self._fd, size, position)

    def open_file(self) -> BinaryIO:
        """A file on the growing download for `loop.sendfile` (its own descriptor, which
        outlives the rename into the store)."""
        return os.fdopen(os.dup(self._fd), "rb", buffering=0)
