"""A stand-in upstream that misbehaves on cue: faults a real registry cannot be made to show.

It serves its image like `StandIn`, plus Range requests, and can cut a blob transfer after a
number of bytes, stall, answer with a queue of error statuses, or send a hostile manifest.
"""

from __future__ import annotations

import asyncio
from collections import deque

from aiohttp import web

from tests.support.images import Image
from tests.support.standin import StandIn


class FaultyUpstream(StandIn):
    """`StandIn` with fault injection. Every knob is consumed or reset by the test."""

    def __init__(self, image: Image, repo: str) -> None:
        super().__init__(image, repo)
        self.cut_after: dict[str, int] = {}
        """digest -> bytes to send before dropping the connection (once)."""
        self.stall_after: dict[str, int] = {}
        """digest -> bytes to send before going silent until the stand-in stops."""
        self.statuses: deque[int] = deque()
        """Statuses to answer manifest and blob requests with, first to last, before behaving."""
        self.retry_after = "7"
        self.manifest_body: bytes | None = None
        """Sent instead of every manifest, with `manifest_headers`."""
        self.manifest_headers: dict[str, str] = {}
        self.manifest_length_lie = 0
        """Bytes more than the body that the manifest's Content-Length claims (then cut)."""
        self.ranges: list[str] = []
        """The Range header of every blob request that had one."""
        self._silence = asyncio.Event()

    def _queued_error(self) -> web.Response | None:
        if not self.statuses:
            return None
        status = self.statuses.popleft()
        headers = {"Retry-After": self.retry_after} if status == 429 else {}
        return web.json_response({"errors": [{"code": "UNKNOWN"}]}, status=status, headers=headers)

    async def _manifest(self, request: web.Request) -> web.StreamResponse:  # type: ignore[override]
        error = self._queued_error()
        if error is not None:
            return error
        if self.manifest_body is None:
            return await super()._manifest(request)
        if not self.manifest_length_lie:
            return web.Response(body=self.manifest_body, headers=self.manifest_headers)
        response = web.StreamResponse(headers=self.manifest_headers)
        response.content_length = len(self.manifest_body) + self.manifest_length_lie
        await response.prepare(request)
        await response.write(self.manifest_body)
        assert request.transport is not None
        request.transport.abort()
        return response

    async def _blob(self, request: web.Request) -> web.StreamResponse:  # type: ignore[override]
        error = self._queued_error()
        if error is not None:
            return error
        digest = request.match_info["digest"]
        if digest not in self.image.blobs or self.blob_redirect is not None:
            return await super()._blob(request)
        data = self.image.blob_bytes(digest)
        start = 0
        status = 200
        headers = {"Docker-Content-Digest": digest, "Accept-Ranges": "bytes"}
        if range_header := request.headers.get("Range"):
            self.ranges.append(range_header)
            start = int(range_header.removeprefix("bytes=").split("-")[0])
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = len(data) - start
        await response.prepare(request)
        if (limit := self.cut_after.pop(digest, None)) is not None:
            await response.write(data[start : start + limit])
            assert request.transport is not None
            request.transport.abort()
            return response
        if (limit := self.stall_after.get(digest)) is not None:
            await response.write(data[start : start + limit])
            await self._silence.wait()
            return response
        await response.write(data[start:])
        await response.write_eof()
        return response

    async def _stop(self) -> None:
        self._silence.set()
        await super()._stop()
