"""How a blob's bytes reach a client from its file (stored, or growing as it downloads):
copied through a 1 MiB buffer, or by sendfile.

Measured over loopback (docs/benchmarks.md, "Sending warm blobs"), a 128 MiB blob went out at
2.6 GB/s copied in 1 MiB pieces and at 2.0 GB/s by sendfile, and the receiving client spent
less CPU on copied bytes (sendfile hands it page-sized fragments to gather). sendfile holds no
memory per client, though. So a few transfers at a time copy, and any more use sendfile; under
TLS, which encrypts in Python anyway, the ones beyond those few copy through a smaller buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, Final

from aiohttp import web

from . import errors
from .errors import RegistryError
from .flight import BlobDownload
from .reference import Digest

__all__ = ["BlobSender", "blob_response", "client_gone", "send_growing"]

COPY_SLOTS: Final = 8
"""Transfers that may copy at once: at most this many 1 MiB buffers."""
_COPY_CHUNK: Final = 1024 * 1024
_TLS_CHUNK: Final = 256 * 1024


class BlobSender:
    """Sends stored blobs for one server, sharing its copy slots among them."""

    def __init__(self, copy_slots: int = COPY_SLOTS) -> None:
        self._free_slots = copy_slots

    async def send(
        self,
        request: web.BaseRequest,
        path: Path,
        digest: Digest,
        span: tuple[int, int] | None,
        size: int,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        """The whole blob, or `span` of it (206), from the file at `path`; the file is
        opened before anything is sent, so a missing one is an error, not a short body.

        `headers` carry the ETag (the digest, as distribution sends it): an `If-None-Match`
        listing it is a 304, and an `If-Range` naming anything else asks for the whole blob.
        """
        etag = headers["ETag"]
        if _none_match(request.headers.get("If-None-Match"), etag):
            return web.StreamResponse(status=304, headers=headers)
        if request.headers.get("If-Range", etag) != etag:
            span = None
        start, end = span or (0, size)
        response = blob_response(headers, span, size)
        try:
            file = open(path, "rb")  # noqa: SIM115 (closed below, once the body is sent)
        except FileNotFoundError:
            # Evicted by another process (the admin `clean`) since it was found.
            raise RegistryError(errors.BLOB_UNKNOWN, f"blob {digest} is gone") from None
        with file, self._copy_slot() as copying:
            await response.prepare(request)
            if copying or request.secure:
                await _copy(response, file, start, end, _COPY_CHUNK if copying else _TLS_CHUNK)
            else:
                await _sendfile(request, file, start, end)
        await response.write_eof()
        return response

    @contextlib.contextmanager
    def _copy_slot(self) -> Iterator[bool]:
        """Whether this transfer may copy: a slot is held until it ends, if one was free."""
        if not self._free_slots:
            yield False
            return
        self._free_slots -= 1
        try:
            yield True
        finally:
            self._free_slots += 1


async def send_growing(
    request: web.BaseRequest,
    download: BlobDownload,
    span: tuple[int, int | None],
    count_bytes: Callable[[int], None],
) -> None:
    """Send a download's bytes by sendfile as they land, over plain HTTP (TLS reads
    `download.read`). Copying them instead only moved CPU time from the client to the
    server, which is busy hashing and writing them: a cold pull took as long either way."""
    with download.open_file() as file:
        async with contextlib.aclosing(download.spans(*span)) as spans:
            async for offset, count in spans:
                count_bytes(count)
                await _sendfile(request, file, offset, offset + count)


def blob_response(
    headers: dict[str, str], span: tuple[int, int] | None, size: int | None
) -> web.StreamResponse:
    """A blob's response before its body: 206 with `Content-Range` for a span, and its length
    when the size is known."""
    response = web.StreamResponse(status=206 if span else 200, headers=headers)
    if span is not None:
        response.headers["Content-Range"] = f"bytes {span[0]}-{span[1] - 1}/{size}"
    if size is not None:
        start, end = span or (0, size)
        response.content_length = end - start
    return response


def _none_match(header: str | None, etag: str) -> bool:
    """Whether an `If-None-Match` header lists `etag` or is "*" (RFC 9110, 13.1.2: a list,
    compared weakly)."""
    if header is None:
        return False
    listed = {tag.strip().removeprefix("W/") for tag in header.split(",")}
    return etag in listed or "*" in listed


def client_gone(request: web.BaseRequest) -> bool:
    """Whether the client's connection is closed or closing: nothing more reaches it."""
    return request.transport is None or request.transport.is_closing()


async def _sendfile(request: web.BaseRequest, file: BinaryIO, start: int, end: int) -> None:
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("the client went away")
    try:
        await asyncio.get_running_loop().sendfile(transport, file, start, end - start)
    except ConnectionError:
        # sendfile writes to the socket past the transport, which has not seen the client
        # leave: closed now, so that the answer counts as a departure (499), not an error.
        transport.abort()
        raise


async def _copy(
    response: web.StreamResponse, file: BinaryIO, start: int, end: int, chunk: int
) -> None:
    """Read in a thread (a read may wait for the disk), write with the response's
    back-pressure: at most one chunk and the socket's buffer are held."""
    loop = asyncio.get_running_loop()
    offset = start
    while offset < end:
        data = await loop.run_in_executor(
            None, os.pread, file.fileno(), min(chunk, end - offset), offset
        )
        if not data:
            raise OSError(f"{file.name} ended at byte {offset} of {end}")
        await response.write(data)
        offset += len(data)
