"""The caching policy: local first, then one upstream request, verify, store, record.

Handlers ask this module for typed things (a manifest, a blob, a tag list) and get typed
answers or a `RegistryError`; it alone decides when the upstream is asked, when a stale copy
stands in for an unreachable upstream, and what enters the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlencode

import aiohttp

from . import errors
from .blobfetch import BlobFetcher, DirectTransfer
from .errors import RegistryError, UpstreamError, upstream_failure
from .flight import BlobDownload, SingleFlight
from .manifest import (
    ACCEPT_ALL,
    ACCEPT_ALL_HEADER,
    MAX_MANIFEST_SIZE,
    Manifest,
    acceptable,
    is_schema1,
    read_manifest,
)
from .memo import LRU
from .metadata import (
    DATABASE_FILE,
    ItemRecord,
    Metadata,
    ReferrersPage,
    TagRecord,
    set_aside_if_corrupt,
)
from .metrics import Metrics
from .reference import Digest, Tag, Target
from .settings import Settings
from .store import BlobStore
from .upstream import UpstreamClient, next_page_query, read_body

__all__ = ["Cache", "LocalBlob", "Page", "open_cache", "paginate"]

log = logging.getLogger(__name__)

# Tags and Accept sets whose variant (`Cache._variant`) is remembered.
_VARIANTS_KEPT: Final = 4096
# How often, at most, the cache says that it serves stale content for an unreachable upstream.
_STALE_WARNING_INTERVAL: Final = 60.0


@dataclass(frozen=True, slots=True)
class LocalBlob:
    """A verified blob in the store."""

    digest: Digest
    path: Path
    size: int


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a listing, and the query that asks for the next one, if there is more:
    ours (`last`, `n`), or an upstream's own, opaque (Quay pages with a `next_page` token)."""

    items: list[str]
    next_query: str | None


def paginate(items: list[str], n: int | None, last: str | None) -> Page:
    """The spec's `n`/`last` pagination over a sorted list (distribution-spec, "Listing Tags")."""
    if last is not None:
        items = [item for item in items if item > last]
    if n is None or n >= len(items):
        return Page(items, None)
    page = items[:n]
    return Page(page, urlencode({"last": page[-1], "n": n}) if page else None)


class Cache:
    """One per process: owns the downloads in flight and the upstream clients."""

    def __init__(
        self,
        settings: Settings,
        store: BlobStore,
        metadata: Metadata,
        upstreams: Mapping[str, UpstreamClient],
        metrics: Metrics,
        *,
        owner: bool = False,
    ) -> None:
        """`owner`: whether this is the server, which owns the data directory's working files."""
        self.settings = settings
        self.metrics = metrics
        self.store = store
        self.metadata = metadata
        self.upstreams = upstreams
        self.fetcher = BlobFetcher(
            store, metadata, settings.cache_write_timeout, parks_partials=owner
        )
        self._manifest_flights: SingleFlight[tuple[object, ...], Manifest] = SingleFlight(
            on_join=metrics.coalesced.labels("manifest").inc
        )
        self._confirmations: SingleFlight[tuple[str, str, Digest], int | None] = SingleFlight()
        # What the upstream picked for a tag and a narrow Accept (`_variant`).
        self._variants: LRU[tuple[str, str, str, tuple[str, ...]], TagRecord] = LRU(_VARIANTS_KEPT)
        self._stale_warned: dict[str, float] = {}
        self._leases: Counter[Digest] = Counter()

    @contextlib.contextmanager
    def lease(self, digest: Digest) -> Iterator[None]:
        """Hold a stored blob while it is served, so the cleaner leaves it alone."""
        self._leases[digest] += 1
        try:
            yield
        finally:
            self._leases[digest] -= 1
            if not self._leases[digest]:
                del self._leases[digest]

    def in_use(self, digest: str) -> bool:
        """Whether a blob is being served or downloaded right now."""
        parsed = Digest.parse(digest)
        return parsed in self._leases or parsed in self.fetcher.downloads

    async def readiness_problems(self) -> list[str]:
        """What keeps the cache from serving well: an unwritable store or a closed database."""
        problems = []
        if not await asyncio.to_thread(self.store.writable):
            problems.append(f"storage {self.store.root} is not writable")
        if not self.metadata.is_open:
            problems.append("metadata database is not open")
        if self.fetcher.disk_full:
            problems.append("the disk is full: serving without caching until there is room")
        return problems

    async def close(self) -> None:
        """Let downloads in flight finish (they are bounded by the upstream timeouts)."""
        await self.fetcher.close()

    # -- manifests ---------------------------------------------------------------------------

    async def manifest(
        self, target: Target, reference: Tag | Digest, accept: tuple[str, ...]
    ) -> Manifest:
        """The manifest a GET or HEAD of `reference` answers with."""
        manifest = await self._manifest(target, reference, accept)
        (self.metrics.misses if manifest.fetched else self.metrics.hits).inc("manifest")
        return manifest

    async def _manifest(
        self, target: Target, reference: Tag | Digest, accept: tuple[str, ...]
    ) -> Manifest:
        if isinstance(reference, Digest):
            return await self._manifest_by_digest(target, reference)
        ttl = self.upstreams[target.upstream].settings.manifest_ttl
        record = await self.metadata.tag(target.upstream, target.repository, reference.value)
        tagged = None
        if record is not None and time.time() - record.checked_at < ttl:
            tagged = await self._local_manifest(Digest.parse(record.digest))
        if tagged is None:
            # One revalidation per tag, whatever the clients accept: the tag is recorded as
            # the upstream answers a client that takes every type (a list, for multi-arch).
            key = ("tag", target.upstream, target.repository, reference.value)
            tagged = await self._manifest_flights.do(
                key, lambda: self._refresh_tag(target, reference, record)
            )
        if acceptable(tagged.media_type, accept):
            self.metadata.touch(str(tagged.digest))
            return tagged
        return await self._variant(target, reference, accept, tagged)

    async def _local_manifest(self, digest: Digest) -> Manifest | None:
        record = await self.metadata.item(str(digest))
        if record is None or record.kind != "manifest" or record.media_type is None:
            return None
        data = self.store.read(digest)
        if data is None:
            self.metadata.forget_cached(str(digest))
            return None
        return Manifest(digest, record.media_type, data)

    async def _manifest_by_digest(self, target: Target, digest: Digest) -> Manifest:
        local = await self._local_manifest(digest)
        if local is not None:
            if not self._granted(target, digest):
                await self._confirm(target, digest, "manifests")
            self.metadata.touch(str(digest))
            return local
        # Per repository: a repository that joined another's fetch would get it unconfirmed.
        key = ("digest", target.upstream, target.repository, digest)
        try:
            return await self._manifest_flights.do(
                key, lambda: self._fetch_manifest(target, str(digest), ACCEPT_ALL, digest)
            )
        except UpstreamError as exc:
            raise upstream_failure(exc, errors.MANIFEST_UNKNOWN) from None

    async def _refresh_tag(self, target: Target, tag: Tag, record: TagRecord | None) -> Manifest:
        """Revalidate a tag with a HEAD (free on Docker Hub), fetching only what changed; while
        the upstream is unreachable, the copy we hold stands in."""
        local = await self._local_manifest(Digest.parse(record.digest)) if record else None
        try:
            current = await self._head_manifest_digest(target, tag) if local is not None else None
            if local is not None and current == local.digest:
                manifest = local
            elif current is not None:
                # The repository's own HEAD named it: this repository has it.
                await self.metadata.hold(target.upstream, target.repository, str(current))
                manifest = await self._manifest_by_digest(target, current)
            else:
                manifest = await self._fetch_manifest(target, tag.value, ACCEPT_ALL)
        except UpstreamError as exc:
            if local is not None and _stands_in(exc):
                self._warn_stale(target.upstream, exc)
                return local
            if isinstance(exc, errors.UpstreamUnauthorized):
                # The repository turned private (or our login lost it): what it was granted
                # goes too, or it would still be served by digest.
                await self.metadata.revoke(target.upstream, target.repository)
            raise upstream_failure(exc, errors.MANIFEST_UNKNOWN) from None
        await self._record_tag(target, tag, manifest)
        return manifest

    async def _record_tag(self, target: Target, tag: Tag, manifest: Manifest) -> None:
        """Point the tag at its manifest. A full disk (or database) leaves it unrecorded: the
        manifest is served all the same, and the tag is asked for again next time."""
        key = (target.upstream, target.repository, tag.value)
        record = TagRecord(str(manifest.digest), time.time())
        try:
            try:
                await self.metadata.set_tag(*key, record)
            except sqlite3.IntegrityError:
                # The manifest was evicted since it was read (by the cleaner, or by `clean`
                # in another process): kept again from the verified bytes in hand.
                self.metadata.forget_cached(str(manifest.digest))
                _, children = read_manifest(manifest.data, manifest.media_type)
                await self._keep_manifest(target, manifest, children)
                await self.metadata.set_tag(*key, record)
        except (OSError, sqlite3.Error) as exc:
            self.fetcher.write_failed(exc, len(manifest.data))
            where = f"{target.upstream}/{target.repository}:{tag}"
            log.warning("serving %s without recording the tag: %s", where, exc)

    async def _variant(
        self, target: Target, tag: Tag, accept: tuple[str, ...], tagged: Manifest
    ) -> Manifest:
        """The manifest for a client that does not take the tag's own type (a client without
        lists asking for a multi-arch tag): the upstream is asked with just the types the
        client named, and picks, as registries do, a platform's manifest. Never recorded as
        the tag, which stays what clients that take every type get; the pick is remembered
        for the tag's TTL, and stands in while the upstream is down."""
        wanted = tuple(media_type for media_type in accept if media_type in ACCEPT_ALL)
        if not wanted:
            raise RegistryError(
                errors.MANIFEST_UNKNOWN,
                f"{tag} is a {tagged.media_type}, which the request's Accept header does not take",
            )
        key = (target.upstream, target.repository, tag.value, wanted)
        picked = self._variants.get(key)
        ttl = self.upstreams[target.upstream].settings.manifest_ttl
        kept, fresh = None, False
        if picked is not None:
            kept = await self._local_manifest(Digest.parse(picked.digest))
            fresh = time.time() - picked.checked_at < ttl
        try:
            if kept is None or not fresh:
                kept = await self._manifest_flights.do(
                    ("variant", *key), lambda: self._fetch_manifest(target, tag.value, wanted)
                )
                self._variants.put(key, TagRecord(str(kept.digest), time.time()))
        except UpstreamError as exc:
            if kept is None or not _stands_in(exc):
                raise upstream_failure(exc, errors.MANIFEST_UNKNOWN) from None
            self._warn_stale(target.upstream, exc)
        if not acceptable(kept.media_type, accept):
            raise RegistryError(
                errors.MANIFEST_UNKNOWN,
                f"{tag} has no manifest of a type the request's Accept header takes",
            )
        self.metadata.touch(str(kept.digest))
        return kept

    async def _head_manifest_digest(self, target: Target, tag: Tag) -> Digest | None:
        headers = {"Accept": ACCEPT_ALL_HEADER}
        async with self._request(
            target,
            "HEAD",
            f"manifests/{tag}",
            headers=headers,
        ) as response:
            header = response.headers.get("Docker-Content-Digest")
        try:
            return Digest.parse(header) if header else None
        except RegistryError:
            return None

    async def _fetch_manifest(
        self,
        target: Target,
        reference: str,
        accept: tuple[str, ...],
        expected: Digest | None = None,
    ) -> Manifest:
        """GET a manifest from the upstream, verify it and store it."""
        headers = {"Accept": ", ".join(accept)}
        async with self._request(
            target,
            "GET",
            f"manifests/{reference}",
            headers=headers,
        ) as response:
            data = await read_body(response, MAX_MANIFEST_SIZE)
            content_type = response.headers.get("Content-Type")
            header_digest = response.headers.get("Docker-Content-Digest")
        if is_schema1(content_type):
            # What distribution converts a manifest to for a client that takes none of the
            # modern types; a signed one's digest does not cover its bytes.
            raise RegistryError(
                errors.MANIFEST_UNKNOWN, f"{reference}: the upstream has only a schema 1 manifest"
            )
        digest = self._verify_manifest(data, expected, header_digest)
        media_type, children = read_manifest(data, content_type)
        manifest = Manifest(digest, media_type, data, fetched=True)
        try:
            await self._keep_manifest(target, manifest, children)
        except (OSError, sqlite3.Error) as exc:
            # A full disk: the cleaner makes room, and meanwhile pulls go on uncached.
            self.fetcher.write_failed(exc, len(data))
            log.warning("serving manifest %s without caching it: %s", digest, exc)
        return manifest

    async def _keep_manifest(self, target: Target, manifest: Manifest, children: list[str]) -> None:
        """Store a verified manifest (unless it is already) and record it, with the blobs and
        manifests it names."""
        new_file = self.store.size(manifest.digest) is None
        if new_file:
            await asyncio.to_thread(self.store.write, manifest.digest, manifest.data)
        record = ItemRecord(
            str(manifest.digest), "manifest", len(manifest.data), manifest.media_type
        )
        try:
            await self.metadata.add_item(record, (target.upstream, target.repository), children)
        except sqlite3.Error:
            # A file the database does not know of is one the cleaner never accounts for; one
            # stored before has its record already.
            if new_file:
                self.store.delete(manifest.digest)
            raise

    @staticmethod
    def _verify_manifest(data: bytes, expected: Digest | None, header: str | None) -> Digest:
        """The digest the manifest is stored under; it must match every claim made about it."""
        claimed = expected
        if claimed is None and header:
            try:
                claimed = Digest.parse(header)
            except RegistryError:
                raise RegistryError(
                    errors.DIGEST_INVALID,
                    f"upstream sent an unusable Docker-Content-Digest: {header[:100]!r}",
                    status=502,
                ) from None
        actual = Digest.of(data, claimed.algorithm if claimed else "sha256")
        if claimed is not None and actual != claimed:
            raise RegistryError(
                errors.DIGEST_INVALID,
                f"upstream manifest does not match its digest {claimed}",
                status=502,
            )
        return actual

    def _request(
        self, target: Target, method: str, path: str, **options: Any
    ) -> AbstractAsyncContextManager[aiohttp.ClientResponse]:
        """A request to the target's upstream for `<repository>/<path>`."""
        client = self.upstreams[target.upstream]
        return client.open(
            method, f"{target.repository}/{path}", repository=target.repository, **options
        )

    def _warn_stale(self, upstream: str, exc: Exception) -> None:
        now = time.monotonic()
        if (
            now - self._stale_warned.get(upstream, -_STALE_WARNING_INTERVAL)
            >= _STALE_WARNING_INTERVAL
        ):
            self._stale_warned[upstream] = now
            log.warning("upstream %s unavailable, serving cached content: %s", upstream, exc)

    # -- blobs -------------------------------------------------------------------------------

    def local_blob(self, digest: Digest) -> LocalBlob | None:
        size = self.store.size(digest)
        if size is None:
            return None
        self.metadata.touch(str(digest))
        return LocalBlob(digest, self.store.path(digest), size)

    async def blob(
        self, target: Target, digest: Digest
    ) -> LocalBlob | BlobDownload | DirectTransfer:
        """The stored blob, or the download that is bringing it in (started if need be); what
        another repository brought in, once this one's upstream says it has it too."""
        local = self.local_blob(digest)
        if (local is not None or digest in self.fetcher.downloads) and not self._granted(
            target, digest
        ):
            await self._confirm(target, digest, "blobs")
            local = self.local_blob(digest)
        if local is not None:
            self.metrics.hits.inc("blob")
            return local
        self.metrics.misses.inc("blob")
        transfer, joined = self.fetcher.get(self.upstreams[target.upstream], target, digest)
        if joined:
            self.metrics.coalesced.labels("blob").inc()
        return transfer

    async def blob_size(self, target: Target, digest: Digest) -> int | None:
        """What a blob HEAD answers: the size, from the store or a download this repository
        may have, or an upstream HEAD."""
        local = self.local_blob(digest)
        download = self.fetcher.downloads.get(digest)
        known = local.size if local is not None else download.size if download else None
        if known is not None and self._granted(target, digest):
            return known
        return await self._confirm(target, digest, "blobs")

    # -- which repository may have what ----------------------------------------------------

    def _granted(self, target: Target, digest: Digest) -> bool:
        return self.metadata.granted(target.upstream, target.repository, str(digest))

    async def _confirm(self, target: Target, digest: Digest, kind: str) -> int | None:
        """Ask the upstream (a HEAD, once per repository and digest at a time) whether this
        repository has `digest`, before the cache gives it what another repository, or another
        upstream, brought in: a digest alone must not open a repository that is private, or
        that credentials scoped to one repository fetched from. Returns the size it says."""
        unknown = errors.BLOB_UNKNOWN if kind == "blobs" else errors.MANIFEST_UNKNOWN
        headers = {"Accept": ACCEPT_ALL_HEADER} if kind == "manifests" else None

        async def ask() -> int | None:
            try:
                async with self._request(
                    target, "HEAD", f"{kind}/{digest}", headers=headers
                ) as response:
                    size = response.content_length
            except UpstreamError as exc:
                raise upstream_failure(exc, unknown) from None
            await self.metadata.hold(target.upstream, target.repository, str(digest))
            return size

        key = (target.upstream, target.repository, digest)
        return await self._confirmations.do(key, ask)

    # -- listings ----------------------------------------------------------------------------

    async def tags(self, target: Target, query: Mapping[str, str], n: int | None) -> Page:
        """The upstream's tag list, or the tags we know when the upstream is unreachable.

        The query (`n`, `last`, or an upstream's own paging token) goes to the upstream as the
        client sent it; an upstream that does not page has its whole list paged here.
        """
        last = query.get("last")
        try:
            async with self._request(
                target, "GET", "tags/list", params=dict(query) or None
            ) as response:
                document = json.loads(await read_body(response, MAX_MANIFEST_SIZE))
                link = response.headers.get("Link")
        except UpstreamError as exc:
            known = None
            if _stands_in(exc):
                known = await self.metadata.tags(target.upstream, target.repository)
            if not known:
                raise upstream_failure(exc, errors.NAME_UNKNOWN) from None
            self._warn_stale(target.upstream, exc)
            return paginate(known, n, last)
        except ValueError:
            raise RegistryError(
                errors.UNAVAILABLE, "upstream tag list is not JSON", status=502
            ) from None
        tags = document.get("tags") if isinstance(document, dict) else None
        listed = [tag for tag in tags or [] if isinstance(tag, str)]
        if link:
            return Page(listed, next_page_query(link))
        # An upstream that does not paginate (distribution 2.x) gets paginated here.
        return paginate(sorted(listed), n, last)

    async def referrers(
        self, target: Target, digest: Digest, query: Mapping[str, str]
    ) -> ReferrersPage:
        """One page of the upstream's referrers index, passed through with its filter header;
        the last answer for a subject the cache holds is kept, and served while the upstream
        is down (signature checks at the edge need it as much as the image).

        The query (the `artifactType` filter, the upstream's own paging parameters) goes to the
        upstream as the client sent it; the next page's query comes back as the upstream wrote
        it, opaque, for the client to ask us for. Only first pages are kept (at most one per
        filter): a query with anything else would let clients add rows at will.
        """
        kept_as = None
        if set(query) <= {"artifactType"}:
            kept_as = (target.upstream, target.repository, str(digest), urlencode(query))
        try:
            async with self._request(
                target, "GET", f"referrers/{digest}", params=dict(query) or None
            ) as response:
                body = await read_body(response, MAX_MANIFEST_SIZE)
                headers = {
                    key: response.headers[key]
                    for key in ("Content-Type", "OCI-Filters-Applied")
                    if key in response.headers
                }
                link = response.headers.get("Link")
        except UpstreamError as exc:
            kept = None
            if kept_as is not None and _stands_in(exc):
                kept = await self.metadata.referrers(*kept_as)
            if kept is None:
                raise upstream_failure(exc, errors.MANIFEST_UNKNOWN) from None
            self._warn_stale(target.upstream, exc)
            return kept
        page = ReferrersPage(body, headers, next_page_query(link) if link else None)
        if kept_as is not None:
            await self.metadata.set_referrers(*kept_as, page)
        return page

    async def catalog(self, n: int | None, last: str | None) -> Page:
        return paginate(await self.metadata.repositories(), n, last)


def _stands_in(exc: UpstreamError) -> bool:
    """Whether what the cache holds may answer instead of the upstream: it is unreachable or
    rate-limited, not refusing (a 404, or a 401/403 after a repository turned private)."""
    return isinstance(exc, (errors.UpstreamUnavailable, errors.UpstreamRateLimited))


@asynccontextmanager
async def open_cache(
    settings: Settings, metrics: Metrics, *, owner: bool = False
) -> AsyncIterator[Cache]:
    """The cache of a data directory with its upstream clients, closed on exit: for the server
    and for commands that run beside (or without) it; SQLite in WAL mode lets both in. The
    server (`owner`) first moves a corrupt database aside, to be rebuilt, and resumes and parks
    cut downloads under `partial/`: only the process that owns the data may, not a command
    beside it (two processes resuming one file would interleave their writes)."""
    store = BlobStore(settings.storage_root)
    metadata = Metadata(store.root / DATABASE_FILE)
    if owner:
        await asyncio.to_thread(set_aside_if_corrupt, metadata.path)
    await metadata.open()
    upstreams = {
        name: UpstreamClient(
            upstream,
            connect_timeout=settings.upstream_connect_timeout,
            read_timeout=settings.upstream_read_timeout,
            metrics=metrics,
        )
        for name, upstream in settings.upstreams.items()
    }
    cache = Cache(settings, store, metadata, upstreams, metrics, owner=owner)
    try:
        yield cache
    finally:
        await cache.close()
        for client in upstreams.values():
            await client.close()
        await metadata.close()
