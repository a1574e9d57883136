"""The pull side of the distribution API: parse a /v2/ path into a typed request, call the cache.

A route pattern cannot split a name that contains slashes from what follows, so the path is
parsed here, from the right, as the spec says: the last `/manifests/`, `/blobs/`, `/referrers/`
or `/tags/list` separates the name from the reference.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from aiohttp import web
from yarl import URL

from . import errors
from .blobfetch import DirectTransfer
from .cache import Cache, LocalBlob, Page
from .errors import RegistryError
from .flight import BlobDownload
from .manifest import parse_accept
from .pulls import PullCounter
from .reference import Digest, Tag, Target, looks_like_host, validate_repository
from .send import BlobSender, blob_response, send_growing
from .settings import DOCKER_HUB, Settings
from .typedefs import Handler

__all__ = [
    "API_VERSION_HEADERS",
    "CACHE_STATUS",
    "READ_METHODS",
    "WRITE_METHODS",
    "Routes",
    "parse_range",
    "require_read",
    "resolve_target",
]

log = logging.getLogger(__name__)

API_VERSION_HEADERS: Final = {"Docker-Distribution-Api-Version": "registry/2.0"}
CACHE_STATUS: Final = "cache_status"
WRITE_METHODS: Final = frozenset({"POST", "PUT", "PATCH", "DELETE"})
READ_METHODS: Final = frozenset({"GET", "HEAD"})
_DOCKER_HUB_NAMES: Final = frozenset({"docker.io", "registry-1.docker.io", "index.docker.io"})
_ROUTE_MEMO_SIZE: Final = 1024


@dataclass(frozen=True, slots=True)
class _ParsedPath:
    kind: str  # manifests, blobs, tags, referrers
    name: str
    reference: str


def _split_path(path: str) -> _ParsedPath:
    """`<name>/<kind>/<reference>` from the path after /v2/, parsed from the right."""
    if path.endswith("/tags/list"):
        return _ParsedPath("tags", path.removesuffix("/tags/list"), "")
    for kind in ("manifests", "blobs", "referrers"):
        name, sep, reference = path.rpartition(f"/{kind}/")
        if sep and name and reference and "/" not in reference:
            return _ParsedPath(kind, name, reference)
    raise RegistryError(errors.NAME_INVALID, f"not a distribution API path: /v2/{path[:200]}")


def resolve_target(name: str, ns: str | None, settings: Settings) -> Target:
    """Which upstream and repository a client's name refers to.

    containerd's `?ns=` names the upstream; otherwise `quay.io/foo/bar` names its upstream, a
    first component that looks like a host but is not configured is refused (never an open
    proxy), and anything else is Docker Hub mirror mode (the default upstream).
    """
    first, _, rest = name.partition("/")
    if ns is not None:
        # containerd names the registry and sends the repository as it is there, whatever
        # its first component looks like (gcr.io/google.com/...); or, with a mirror path
        # that ends in the upstream, after the upstream's name.
        upstream = DOCKER_HUB if ns in _DOCKER_HUB_NAMES else ns
        if upstream not in settings.upstreams:
            raise RegistryError(errors.NAME_UNKNOWN, f"upstream not configured: {ns[:100]}")
        prefixed = first in (upstream, ns) or (
            upstream == DOCKER_HUB and first in _DOCKER_HUB_NAMES
        )
        repository = rest if prefixed else name
    elif first in settings.upstreams:
        upstream, repository = first, rest
    elif looks_like_host(first):
        raise RegistryError(errors.NAME_UNKNOWN, f"upstream not configured: {first[:100]}")
    else:
        upstream, repository = settings.default_upstream, name
    if not repository:
        raise RegistryError(errors.NAME_INVALID, "a repository name is required after the upstream")
    validate_repository(repository)
    if upstream == DOCKER_HUB and "/" not in repository:
        repository = f"library/{repository}"
    return Target(upstream, repository, name)


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """`(start, end)` (end exclusive) for a single-range `Range` header; None for the whole.

    RFC 9110 section 14.2: an unsatisfiable range is a 416; a header we do not understand
    (several ranges, another unit) is ignored and the whole content served.
    """
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash or not (first or last) or not all(map(_decimal, (first, last))):
        return None
    if not first:
        length = int(last)
        if length == 0:
            raise _unsatisfiable(size)
        return max(size - length, 0), size
    start = int(first)
    end = min(int(last) + 1, size) if last else size
    if last and int(last) < start:
        return None
    if start >= size:
        raise _unsatisfiable(size)
    return start, end


def _decimal(text: str) -> bool:
    """Whether one end of a byte range is empty or ASCII digits (`isdigit` also takes "²")."""
    return text.isascii() and (not text or text.isdigit())


def _unsatisfiable(size: int) -> RegistryError:
    return RegistryError(
        errors.RANGE_INVALID,
        "requested range not satisfiable",
        headers={"Content-Range": f"bytes */{size}"},
    )


def _page_number(query: Mapping[str, str]) -> int | None:
    text = query.get("n")
    if text is None:
        return None
    if not text.isdigit() or int(text) > 100_000:
        raise RegistryError(errors.PAGINATION_NUMBER_INVALID, f"invalid n: {text[:20]!r}")
    return int(text)


def _link(request: web.BaseRequest, next_query: str | None) -> dict[str, str]:
    """The RFC 5988 `Link` to the next page, if there is one, under our path; it keeps
    containerd's `ns`, which chose the upstream of the first page."""
    if next_query is None:
        return {}
    link = URL(f"{request.path}?{next_query}")
    ns = request.query.get("ns")
    if ns is not None:
        link = link.update_query(ns=ns)
    return {"Link": f'<{link}>; rel="next"'}


def _upstream_query(request: web.BaseRequest) -> dict[str, str]:
    """The request's query as the upstream is to get it: without containerd's `ns`, which is
    ours."""
    return {key: value for key, value in request.query.items() if key != "ns"}


def require_read(request: web.BaseRequest) -> None:
    """Refuse writes (this is a read-only cache) and methods the API does not have."""
    if request.method in WRITE_METHODS:
        raise RegistryError(errors.UNSUPPORTED, "this registry is a read-only cache")
    if request.method not in READ_METHODS:
        raise RegistryError(errors.UNSUPPORTED, f"method {request.method} is not supported")


@functools.lru_cache(maxsize=4096)
def _manifest_headers(digest: Digest, media_type: str) -> Mapping[str, str]:
    """A manifest's response headers, built once per manifest (the response copies them)."""
    return {
        **API_VERSION_HEADERS,
        "Content-Type": media_type,
        "Docker-Content-Digest": str(digest),
        "ETag": f'"{digest}"',
    }


class Routes:
    """Thin handlers: parse, call the cache, shape the response."""

    def __init__(self, settings: Settings, cache: Cache, pulls: PullCounter) -> None:
        self.settings = settings
        self.cache = cache
        self.pulls = pulls
        self._route = functools.lru_cache(maxsize=_ROUTE_MEMO_SIZE)(self._parse_route)
        self._sender = BlobSender()

    async def base(self, request: web.BaseRequest) -> web.Response:
        """`/v2/`: the API version check clients make first (only reads are routed here)."""
        return web.json_response({}, headers=API_VERSION_HEADERS)

    async def dispatch(self, request: web.BaseRequest) -> web.StreamResponse:
        """A path below `/v2/`."""
        require_read(request)
        handler = self._route(request.path.removeprefix("/v2/"), request.query.get("ns"))
        return await handler(request)

    def _parse_route(self, path: str, ns: str | None) -> Handler:
        """The handler a path after /v2/ asks for, bound to its validated arguments.

        Memoised as `_route`: clients repeat the same few paths, and parsing them was a tenth
        of a cached manifest's cost. An invalid path raises every time (errors are not kept).
        """
        if path == "_catalog":
            return self.catalog
        parsed = _split_path(path)
        target = resolve_target(parsed.name, ns, self.settings)
        if parsed.kind == "manifests":
            reference = parsed.reference
            ref = Digest.parse(reference) if ":" in reference else Tag.parse(reference)
            return functools.partial(self.manifest, target=target, reference=ref)
        if parsed.kind == "tags":
            return functools.partial(self.tags, target=target)
        digest = Digest.parse(parsed.reference)
        if parsed.kind == "blobs":
            return functools.partial(self.blob, target=target, digest=digest)
        return functools.partial(self.referrers, target=target, digest=digest)

    async def manifest(
        self, request: web.BaseRequest, target: Target, reference: Tag | Digest
    ) -> web.Response:
        accept = parse_accept(tuple(request.headers.getall("Accept", ())))
        manifest = await self.cache.manifest(target, reference, accept)
        if request.method == "GET":
            self.pulls.record(target.upstream, target.repository)
        request[CACHE_STATUS] = "miss" if manifest.fetched else "hit"
        return web.Response(
            body=manifest.data, headers=_manifest_headers(manifest.digest, manifest.media_type)
        )

    async def blob(
        self, request: web.BaseRequest, target: Target, digest: Digest
    ) -> web.StreamResponse:
        headers = {
            **API_VERSION_HEADERS,
            "Docker-Content-Digest": str(digest),
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "ETag": f'"{digest}"',
        }
        if request.method == "HEAD":
            size = await self.cache.blob_size(target, digest)
            if size is not None:
                headers["Content-Length"] = str(size)
            return web.Response(headers=headers)
        cache = self.cache
        with cache.lease(digest):
            found = await cache.blob(target, digest)
            if isinstance(found, LocalBlob):
                request[CACHE_STATUS] = "hit"
                span = parse_range(request.headers.get("Range"), found.size)  # 416: OCI JSON
                # Counted before sending, so a scrape right after the transfer sees it.
                start, end = span or (0, found.size)
                cache.metrics.bytes_served.labels("cache").inc(end - start)
                # Sent here, under the lease, so the cleaner cannot remove it meanwhile.
                return await self._sender.send(
                    request, found.path, digest, span, found.size, headers
                )
        request[CACHE_STATUS] = "miss"
        return await self._stream_download(request, found, headers)

    async def _stream_download(
        self,
        request: web.BaseRequest,
        download: BlobDownload | DirectTransfer,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        """Serve a blob while it downloads; a failure cuts the transfer short."""
        await download.wait_started()
        try:
            return await self._send_download(request, download, headers)
        finally:
            # A direct transfer's upstream response is not shared: it goes with this request.
            if isinstance(download, DirectTransfer):
                await download.close()

    async def _send_download(
        self,
        request: web.BaseRequest,
        download: BlobDownload | DirectTransfer,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        size = download.size
        span = parse_range(request.headers.get("Range"), size) if size is not None else None
        response = blob_response(headers, span, size)
        start, end = span or (0, size)
        await response.prepare(request)
        served = self.cache.metrics.bytes_served.labels("upstream")
        try:
            if isinstance(download, BlobDownload) and not request.secure:
                await send_growing(request, download, (start, end), served.inc)
            else:
                async with contextlib.aclosing(download.read(start, end)) as chunks:
                    async for chunk in chunks:
                        served.inc(len(chunk))
                        await response.write(chunk)
        except (RegistryError, errors.BlobVerificationError) as exc:
            # The status is sent: the only honest signal left is to cut the connection, so
            # the client sees a short transfer instead of a complete one.
            log.warning("transfer of %s cut: %s", download.digest, exc)
            if request.transport is not None:
                request.transport.abort()
            return response
        # A client that goes away raises ConnectionError (a 499 in the access log, from
        # the `_counted` wrapper in proxy.app); the download goes on for the others and the cache.
        await response.write_eof()
        return response

    async def tags(self, request: web.BaseRequest, target: Target) -> web.Response:
        n = _page_number(request.query)
        if n == 0:
            return web.json_response(
                {"name": target.client_name, "tags": []}, headers=API_VERSION_HEADERS
            )
        query = _upstream_query(request)
        page = await self.cache.tags(target, query, n)
        return web.json_response(
            {"name": target.client_name, "tags": page.items},
            headers={**API_VERSION_HEADERS, **_link(request, page.next_query)},
        )

    async def referrers(
        self, request: web.BaseRequest, target: Target, digest: Digest
    ) -> web.Response:
        """Passed through a page at a time: the upstream's next page is linked under our path."""
        query = _upstream_query(request)
        page = await self.cache.referrers(target, digest, query)
        headers = {**API_VERSION_HEADERS, **page.headers, **_link(request, page.next_query)}
        return web.Response(body=page.body, headers=headers)

    async def catalog(self, request: web.BaseRequest) -> web.Response:
        n = _page_number(request.query)
        page = await self.cache.catalog(n, request.query.get("last"))
        if n == 0:
            page = Page([], None)
        return web.Response(
            text=json.dumps({"repositories": page.items}),
            content_type="application/json",
            headers={**API_VERSION_HEADERS, **_link(request, page.next_query)},
        )
