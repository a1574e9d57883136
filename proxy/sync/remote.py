"""One registry as the sync worker uses it: reads, and the OCI push API for a copy's target.

All I/O goes through `proxy.upstream.UpstreamClient` (auth, redirects, error mapping); this adds
the distribution-spec calls a copy needs and regsync's per-host throttle (`reqPerSec`,
`reqConcurrent`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Final

import aiohttp
from yarl import URL

from proxy.errors import UpstreamError, UpstreamNotFound, UpstreamStatusError
from proxy.manifest import ACCEPT_ALL_HEADER, MAX_MANIFEST_SIZE, OCI_INDEX, Manifest, read_manifest
from proxy.reference import Digest
from proxy.upstream import RateLimit, UpstreamClient, next_page_query, read_body

__all__ = ["Head", "Remote", "Throttle"]

log = logging.getLogger(__name__)

# Pages of a tag list followed at most: ten million tags at the usual thousand a page.
_MAX_TAG_PAGES: Final = 10_000

_CHUNK: Final = 1024 * 1024


class Throttle:
    """At most `concurrent` requests at a time, started at most `per_second` per second."""

    def __init__(self, per_second: float = 0.0, concurrent: int = 3) -> None:
        self.per_second = per_second
        self.concurrent = concurrent
        self._semaphore = asyncio.Semaphore(concurrent)
        self._spacing = 1.0 / per_second if per_second > 0 else 0.0
        self._next_start = 0.0
        self._lock = asyncio.Lock()

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        async with self._semaphore:
            if self._spacing:
                async with self._lock:
                    delay = self._next_start - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    self._next_start = time.monotonic() + self._spacing
            yield


@dataclass(frozen=True, slots=True)
class Head:
    """What a manifest HEAD told: the digest, the media type, the rate limit if announced."""

    digest: str
    media_type: str
    rate_limit: RateLimit | None


class Remote:
    """A registry, one repository at a time."""

    def __init__(self, name: str, client: UpstreamClient, throttle: Throttle | None = None) -> None:
        self.name = name
        self.client = client
        self.throttle = throttle or Throttle()
        self._write_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._writers: Counter[tuple[str, str]] = Counter()

    @asynccontextmanager
    async def writing(self, repository: str, digest: str) -> AsyncIterator[None]:
        """Hold the writing of `digest` into `repository`: one copy at a time. distribution
        writes its link files in place, so a second copy of the same content running at once
        (two tags on one image, two images sharing a layer) can read one half-written: a 500
        "invalid checksum digest format", or a 400 for a manifest. The copy that waited finds
        the content there, and writes nothing twice."""
        key = (repository, digest)
        lock = self._write_locks.setdefault(key, asyncio.Lock())
        self._writers[key] += 1
        try:
            async with lock:
                yield
        finally:
            self._writers[key] -= 1
            if not self._writers[key]:
                del self._writers[key], self._write_locks[key]

    @asynccontextmanager
    async def _open(
        self,
        method: str,
        path: str,
        repository: str,
        *,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
        data: bytes | None = None,
        push: bool = False,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        async with (
            self.throttle.slot(),
            self.client.open(
                method,
                f"{repository}/{path}",
                repository=repository,
                headers=headers,
                params=params,
                data=data,
                actions="pull,push" if push else "pull",
            ) as response,
        ):
            yield response

    @asynccontextmanager
    async def _request_at(
        self,
        method: str,
        location: str,
        repository: str,
        *,
        headers: dict[str, str] | None = None,
        data: bytes | None = None,
        query: dict[str, str] | None = None,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """`_open` for an upload session's `Location` (always with push rights)."""
        async with self.throttle.slot():
            url = self.client.resolve(location)
            if query:
                url = url.update_query(query)
            async with self.client.request(
                method, url, repository=repository, headers=headers, data=data, actions="pull,push"
            ) as response:
                yield response

    async def head_manifest(self, repository: str, reference: str) -> Head | None:
        """The manifest's digest (None if there is none); a HEAD, which Docker Hub does not
        count against the pull limit."""
        try:
            async with self._open(
                "HEAD",
                f"manifests/{reference}",
                repository,
                headers={"Accept": ACCEPT_ALL_HEADER},
            ) as response:
                digest = response.headers.get("Docker-Content-Digest")
                media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
                rate_limit = RateLimit.from_headers(response.headers)
        except UpstreamNotFound:
            return None
        if digest is None:
            # A registry that does not send the digest on HEAD: fall back to a GET.
            manifest = await self.manifest(repository, reference)
            return Head(str(manifest.digest), manifest.media_type, rate_limit)
        return Head(digest, media_type, rate_limit)

    async def manifest(self, repository: str, reference: str) -> Manifest:
        """A manifest's exact bytes, checked against the digest asked for or announced."""
        async with self._open(
            "GET", f"manifests/{reference}", repository, headers={"Accept": ACCEPT_ALL_HEADER}
        ) as response:
            data = await read_body(response, MAX_MANIFEST_SIZE)
            content_type = response.headers.get("Content-Type")
            announced = response.headers.get("Docker-Content-Digest")
        # A digest has a colon, a tag never does (`sha256-<hex>.sig` is a tag).
        expected = reference if ":" in reference else announced
        algorithm = expected.split(":", 1)[0] if expected else "sha256"
        digest = Digest.of(data, algorithm)
        if expected is not None and str(digest) != expected:
            raise UpstreamError(
                f"{self.name}/{repository}@{expected}: manifest does not match its digest"
            )
        media_type, _ = read_manifest(data, content_type)
        return Manifest(digest, media_type, data)

    async def blob(self, repository: str, digest: str) -> bytes:
        """A small blob (an image config), whole."""
        async with self._open("GET", f"blobs/{digest}", repository) as response:
            return await read_body(response, MAX_MANIFEST_SIZE)

    @asynccontextmanager
    async def blob_stream(
        self, repository: str, digest: str
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        """A blob's bytes as they arrive."""
        async with self._open("GET", f"blobs/{digest}", repository) as response:
            yield response.content.iter_chunked(_CHUNK)

    async def tags(self, repository: str) -> list[str]:
        """Every tag, following the `Link` to each next page as the registry wrote it (`last=`,
        or Quay's opaque token); a page asked for twice, or that names no new tag, ends it."""
        tags: dict[str, None] = {}
        query: str | None = "n=1000"
        asked: set[str] = set()
        for _ in range(_MAX_TAG_PAGES):
            if query is None or query in asked:
                return list(tags)
            asked.add(query)
            params = dict(URL(f"?{query}").query)
            async with self._open("GET", "tags/list", repository, params=params) as response:
                document = json.loads(await read_body(response, MAX_MANIFEST_SIZE))
                link = response.headers.get("Link")
            listed = document.get("tags") if isinstance(document, dict) else None
            known = len(tags)
            tags.update(dict.fromkeys(tag for tag in listed or [] if isinstance(tag, str)))
            query = next_page_query(link) if link and len(tags) > known else None
        log.warning("%s: stopped after %d pages of tags", repository, _MAX_TAG_PAGES)
        return list(tags)

    async def referrers(self, repository: str, digest: str) -> list[dict[str, object]] | None:
        """The OCI 1.1 referrers of `digest`, or None when the registry has no referrers API
        (distribution 2.8 answers 404), which means the fallback tag is where they are."""
        try:
            async with self._open(
                "GET", f"referrers/{digest}", repository, headers={"Accept": OCI_INDEX}
            ) as response:
                document = json.loads(await read_body(response, MAX_MANIFEST_SIZE))
        except UpstreamNotFound:
            return None
        listed = document.get("manifests") if isinstance(document, dict) else None
        return [d for d in listed or [] if isinstance(d, dict)]

    async def has_blob(self, repository: str, digest: str) -> bool:
        try:
            async with self._open("HEAD", f"blobs/{digest}", repository, push=True):
                return True
        except UpstreamNotFound:
            return False

    async def mount(self, repository: str, digest: str, source: str) -> bool:
        """Cross-repository mount from `source` in the same registry; False if not done."""
        params = {"mount": digest, "from": source}
        async with self._open("POST", "blobs/uploads/", repository, params=params, push=True) as r:
            mounted = r.status == 201
            location = r.headers.get("Location")
        if not mounted and location:
            # The registry opened an upload session instead; it expires by itself, but say so.
            await self._cancel(repository, location)
        return mounted

    async def _cancel(self, repository: str, location: str) -> None:
        try:
            async with self._request_at("DELETE", location, repository):
                pass
        except UpstreamError:
            pass  # distribution 2.x may refuse; the session times out anyway

    async def upload(
        self, repository: str, digest: str, chunks: AsyncIterator[bytes], chunk_size: int
    ) -> int:
        """Push a blob: one PUT if it fits `chunk_size`, else PATCHes and a closing PUT."""
        async with self._open("POST", "blobs/uploads/", repository, push=True) as response:
            location = self._location(response)
        buffer = bytearray()
        sent = 0
        async for chunk in chunks:
            buffer += chunk
            while len(buffer) >= chunk_size:
                location = await self._patch(repository, location, bytes(buffer[:chunk_size]), sent)
                sent += chunk_size
                del buffer[:chunk_size]
        headers = {"Content-Type": "application/octet-stream"}
        async with self._request_at(
            "PUT",
            location,
            repository,
            headers=headers,
            data=bytes(buffer),
            query={"digest": digest},
        ) as response:
            if response.status != 201:
                raise UpstreamStatusError(response.status, f"{self.name}: blob upload not created")
        return sent + len(buffer)

    async def _patch(self, repository: str, location: str, data: bytes, offset: int) -> str:
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Range": f"{offset}-{offset + len(data) - 1}",
        }
        async with self._request_at(
            "PATCH", location, repository, headers=headers, data=data
        ) as response:
            return self._location(response)

    def _location(self, response: aiohttp.ClientResponse) -> str:
        location = response.headers.get("Location")
        if not location:
            raise UpstreamError(f"{self.name} answered an upload without a Location")
        return location

    async def put_manifest(self, repository: str, reference: str, manifest: Manifest) -> None:
        headers = {"Content-Type": manifest.media_type}
        async with self._open(
            "PUT",
            f"manifests/{reference}",
            repository,
            headers=headers,
            data=manifest.data,
            push=True,
        ):
            pass

    async def delete_manifest(self, repository: str, reference: str) -> None:
        async with self._open("DELETE", f"manifests/{reference}", repository, push=True):
            pass
