"""A tiny stand-in upstream, only for faults a real registry cannot produce.

It serves one generated image from its OCI layout, and can be told to misbehave: send bytes
that do not match a blob's digest, challenge for a token from a realm on another host, or
redirect blob downloads or token requests elsewhere. It records every request with its
`Authorization`, so a second instance on another loopback address can stand for a host that
must never be reached. Everything else in the tests talks to real distribution.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from aiohttp import web

from tests.support.images import OCI_INDEX, Image
from tests.support.lifecycle import StartStop
from tests.support.ports import free_port

T = TypeVar("T")


class StandIn(StartStop):
    """An aiohttp registry look-alike in a background thread, serving `image` as `repo`."""

    def __init__(self, image: Image, repo: str, host: str = "127.0.0.1") -> None:
        self.image = image
        self.repo = repo
        self.host = host
        self.port = free_port()
        self.corrupt: set[str] = set()
        # `RateLimit-Remaining` for successive manifest requests (the last one stays), as
        # Docker Hub announces it; empty: no rate-limit headers.
        self.rate_limits: list[int] = []
        self.requests: Counter[tuple[str, str]] = Counter()
        self.authorizations: list[tuple[str, str | None]] = []
        """(path, Authorization header or None) of every request, in order."""
        self.challenge: str | None = None
        """A `WWW-Authenticate` to answer every request that has no `Authorization` with."""
        self.referrers: list[dict[str, object]] = []
        """Descriptors the referrers API lists for any subject."""
        self.tags: list[str] = []
        """What the tag list names."""
        self.page_size: int | None = None
        """Items per page of the referrers and tag lists, with a `Link` to the next page that
        carries an opaque token, as Quay pages its tag lists."""
        self.blob_redirect: str | None = None
        """A base URL that blob GETs are redirected to (same path)."""
        self.token_redirect: str | None = None
        """A base URL that token requests are redirected to (same path and query)."""
        self.compressing = False
        """Compress every answer a client accepts compressed, as CDNs and token services do."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def _base(self, request: web.Request) -> web.Response:
        return web.json_response({})

    async def _manifest(self, request: web.Request) -> web.Response:
        reference = request.match_info["reference"]
        digest = self.image.digest if reference == self.image.tag else reference
        data = self.image.manifests.get(digest)
        if data is None:
            return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN"}]}, status=404)
        media_type = self.image.media_type if digest == self.image.digest else None
        headers = {
            "Docker-Content-Digest": digest,
            "Content-Type": media_type or "application/vnd.oci.image.manifest.v1+json",
        }
        if self.rate_limits:
            remaining = (
                self.rate_limits.pop(0) if len(self.rate_limits) > 1 else self.rate_limits[0]
            )
            headers["RateLimit-Limit"] = "100;w=21600"
            headers["RateLimit-Remaining"] = f"{remaining};w=21600"
        return web.Response(body=data, headers=headers)

    async def _referrers(self, request: web.Request) -> web.Response:
        """An OCI 1.1 referrers index of `referrers`, filtered by `artifactType` if asked."""
        wanted = request.query.get("artifactType")
        descriptors = [d for d in self.referrers if wanted in (None, d.get("artifactType"))]
        headers = {"OCI-Filters-Applied": "artifactType"} if wanted else {}
        descriptors, headers["Link"] = self._page(request, descriptors)
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}
        headers["Content-Type"] = OCI_INDEX
        return web.Response(body=json.dumps(index).encode(), headers=headers)

    async def _tags(self, request: web.Request) -> web.Response:
        tags, link = self._page(request, self.tags)
        return web.json_response({"name": self.repo, "tags": tags}, headers={"Link": link})

    def _page(self, request: web.Request, items: list[T]) -> tuple[list[T], str]:
        """The page of `items` the request's token asks for, and the `Link` to the next one
        ("" when this is the last)."""
        if self.page_size is None:
            return items, ""
        start = int(request.query.get("next_page", "0"), 16)
        end = start + self.page_size
        link = f'<{request.path}?n={self.page_size}&next_page={end:x}>; rel="next"'
        return items[start:end], link if end < len(items) else ""

    async def _token(self, request: web.Request) -> web.Response:
        if self.token_redirect is not None:
            raise web.HTTPFound(self.token_redirect + request.path_qs)
        return web.json_response({"token": "standin-token", "expires_in": 300})

    async def _blob(self, request: web.Request) -> web.Response:
        digest = request.match_info["digest"]
        if self.blob_redirect is not None:
            raise web.HTTPTemporaryRedirect(self.blob_redirect + request.path)
        if digest not in self.image.blobs:
            return web.json_response({"errors": [{"code": "BLOB_UNKNOWN"}]}, status=404)
        data = self.image.blob_bytes(digest)
        if digest in self.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        return web.Response(body=data, headers={"Docker-Content-Digest": digest})

    @web.middleware
    async def _count(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        self.requests[(request.method, request.path)] += 1
        authorization = request.headers.get("Authorization")
        self.authorizations.append((request.path, authorization))
        if self.challenge is not None and authorization is None and request.path != "/token":
            return web.json_response(
                {"errors": [{"code": "UNAUTHORIZED"}]},
                status=401,
                headers={"WWW-Authenticate": self.challenge},
            )
        response = await handler(request)
        if self.compressing:
            response.enable_compression()
        return response

    async def _start(self) -> None:
        app = web.Application(middlewares=[self._count])
        app.router.add_get("/v2/", self._base)
        app.router.add_get("/token", self._token)
        app.router.add_get(f"/v2/{self.repo}/manifests/{{reference}}", self._manifest)
        app.router.add_get(f"/v2/{self.repo}/blobs/{{digest}}", self._blob)
        app.router.add_get(f"/v2/{self.repo}/referrers/{{digest}}", self._referrers)
        app.router.add_get(f"/v2/{self.repo}/tags/list", self._tags)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def start(self) -> StandIn:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


def blob_files(data_dir: Path) -> set[str]:
    """The digests (hex) of every blob a cache's data directory holds."""
    blobs = data_dir / "blobs"
    return {path.name for path in blobs.rglob("*") if path.is_file()} if blobs.exists() else set()
