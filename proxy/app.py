"""The server's one request handler, and everything it needs while it runs: settings, store,
metadata, upstreams, the cache and the background tasks.

aiohttp's low-level server (`web.Server`) calls `Service.handle` for every request, which picks
the handler from the path itself: a `web.Application` resolves a route through its router and
builds a match info and a handler chain for every request, a sixth of what a bare aiohttp
handler costs (docs/benchmarks.md). Each handler is wrapped once, when the service is built,
with what every answer needs (`_counted`, and client auth when it is on).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Final

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from cleaner.reconcile import reconcile
from cleaner.service import Cleaner

from . import errors
from .auth import AUTH_USER, Authenticator, require_user
from .cache import Cache, open_cache
from .errors import RegistryError
from .logs import access_lines, access_members
from .metadata import Metadata
from .metrics import Metrics
from .pulls import PullCounter
from .routes import (
    API_VERSION_HEADERS,
    CACHE_STATUS,
    READ_METHODS,
    WRITE_METHODS,
    Routes,
    require_read,
)
from .send import client_gone
from .settings import Settings
from .status import StatusCollector
from .sync import service as sync_service
from .sync.config import load_sync_config
from .sync.endpoints import with_sync_logins
from .traffic import TrafficHistory
from .typedefs import Guard, Handler

__all__ = ["AccessLogger", "Service", "access_logger", "serving"]

log = logging.getLogger(__name__)

_BOOKKEEPING_INTERVAL: Final = 5.0
_CLIENT_CLOSED_REQUEST: Final = 499
_LABELLED_METHODS: Final = READ_METHODS | WRITE_METHODS | {"OPTIONS"}
"""Methods counted by name; any other token a client sends is counted as "other", so that
clients cannot add series to the metrics at will."""


def _error_response(error: RegistryError) -> web.Response:
    return web.Response(
        status=error.status,
        body=error.body(),
        content_type="application/json",
        headers={**API_VERSION_HEADERS, **error.headers},
    )


def _counted(metrics: Metrics) -> Guard:
    """A route wrapper: every error leaves as the OCI `{"errors": [...]}` JSON with its status
    (no tracebacks), and every answer is counted by route, method and status."""

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def answer(request: web.BaseRequest) -> web.StreamResponse:
            try:
                response = await handler(request)
            except RegistryError as exc:
                response = _error_response(exc)
            except Exception as exc:
                if isinstance(exc, ConnectionError) and client_gone(request):
                    # The client went away mid-answer (a cancelled pull): nothing to report.
                    # aiohttp closes the connection when this answer cannot be written; the
                    # access log and the request counts say 499, as nginx does for a client
                    # that closed its request.
                    response = web.Response(status=_CLIENT_CLOSED_REQUEST)
                else:
                    log.exception("unexpected error serving %s %s", request.method, request.path)
                    response = _error_response(
                        RegistryError(errors.UNAVAILABLE, "internal error", status=500)
                    )
            method = request.method if request.method in _LABELLED_METHODS else "other"
            metrics.requests.inc(_route_label(request.path), method, str(response.status))
            return response

        return answer

    return wrap


def _with_auth(authenticator: Authenticator | None, counted: Guard) -> Guard:
    """The wrapper for routes behind client auth, when it is on (the probes take `counted`
    alone). Client auth comes inside `counted`, so that its 401 is OCI JSON and counted."""
    if authenticator is None:
        return counted
    with_user = require_user(authenticator)
    return lambda handler: counted(with_user(handler))


async def _unknown_path(request: web.BaseRequest) -> web.Response:
    """What no route answers: a write is refused as such, anything else is not found."""
    require_read(request)
    raise RegistryError(errors.NAME_UNKNOWN, "not found", status=404)


class AccessLogger(AbstractAccessLogger):
    """One access line per request (JSON or text, as `log.format` says): method, path, status,
    bytes, cache hit or miss, duration, remote address, user."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        access_lines().add(
            access_members(
                method=request.method,
                path=request.path,
                status=response.status,
                size=_bytes_sent(request, response),
                cache=request.get(CACHE_STATUS),
                duration_ms=round(time * 1000, 2),
                remote=request.remote,
                user=self._user(request),
            )
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)

    @staticmethod
    def _user(request: BaseRequest) -> str | None:
        """Nobody: client auth is off. (Asking the request would raise and catch a KeyError
        on every request, a percent of a cached manifest's cost.)"""
        return None


class _AuthAccessLogger(AccessLogger):
    """The access log when client auth is on: it names the user."""

    @staticmethod
    def _user(request: BaseRequest) -> str | None:
        user: str | None = request.get(AUTH_USER)
        return user


def access_logger(settings: Settings) -> type[AccessLogger]:
    """The access log's class for this configuration."""
    return _AuthAccessLogger if settings.auth else AccessLogger


def _bytes_sent(request: BaseRequest, response: StreamResponse) -> int:
    """Body bytes; a sendfile body never passes the writer, so count it by its length."""
    if request.method == "HEAD":
        return 0
    if response.content_length is not None:
        return response.content_length
    return response.body_length


@functools.lru_cache(maxsize=1024)
def _route_label(path: str) -> str:
    """A low-cardinality name for what a request asked for (memoised: clients repeat paths)."""
    if not path.startswith("/v2"):
        return path.strip("/") if path in ("/healthz", "/readyz", "/metrics") else "other"
    for label in ("blobs", "manifests", "referrers"):
        if f"/{label}/" in path:
            return label
    if path.endswith("/tags/list"):
        return "tags"
    return "catalog" if path == "/v2/_catalog" else "base" if path in ("/v2", "/v2/") else "other"


async def _keep_books(metadata: Metadata, cleaner: Cleaner) -> None:
    """Every few seconds: write the batched access times (no database write per request), and
    follow what a command beside the server (`sync once`, `clean`) stored or evicted, so that
    the budget and the metrics follow what is really stored."""
    while True:
        await asyncio.sleep(_BOOKKEEPING_INTERVAL)
        try:
            await metadata.flush_access_times()
            if await metadata.follow_other_writers():
                cleaner.nudge()
        except Exception:
            log.exception("writing access times or reading the totals failed")


def _watch(metrics: Metrics, cache: Cache) -> None:
    def read() -> dict[str, float | dict[str, float]]:
        limits = {
            name: client.rate_limit for name, client in cache.upstreams.items() if client.rate_limit
        }
        return {
            "cache_size_bytes": cache.metadata.total_size,
            "cache_items": cache.metadata.total_items,
            "inflight_downloads": len(cache.fetcher.downloads),
            "ratelimit_limit": {
                name: rate.limit for name, rate in limits.items() if rate.limit is not None
            },
            "ratelimit_remaining": {
                name: rate.remaining for name, rate in limits.items() if rate.remaining is not None
            },
        }

    metrics.watch(read)


@asynccontextmanager
async def _background(
    settings: Settings,
    sync: sync_service.SyncBoard | None,
    cache: Cache,
    metrics: Metrics,
    traffic: TrafficHistory,
) -> AsyncIterator[None]:
    """The server's own tasks: the cleaner, the access-time writer, the status page's traffic
    sampler, the sync worker."""
    cleaner = Cleaner(
        settings.cleaner,
        cache.store,
        cache.metadata,
        cache.in_use,
        cache.fetcher.incoming_size,
        metrics,
    )
    cache.fetcher.on_incoming = cleaner.nudge
    cache.fetcher.on_disk_full = cleaner.make_room
    tasks = [
        asyncio.create_task(cleaner.serve(), name="cleaner"),
        asyncio.create_task(_keep_books(cache.metadata, cleaner), name="bookkeeping"),
        asyncio.create_task(traffic.run(), name="traffic-history"),
    ]
    if sync is not None:
        tasks.append(asyncio.create_task(sync_service.serve(sync, cache, metrics), name="sync"))
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Service:
    """Answers every request: by its path, with a handler wrapped once, here."""

    def __init__(
        self,
        settings: Settings,
        authenticator: Authenticator | None,
        cache: Cache,
        metrics: Metrics,
        sync: sync_service.SyncBoard | None,
    ) -> None:
        self.cache = cache
        self.metrics = metrics
        counted = _counted(metrics)
        guarded = _with_auth(authenticator, counted)
        routes = Routes(settings, cache, PullCounter())
        self.status = StatusCollector(
            settings, metrics, cache, routes.pulls, sync.entries if sync else None
        )
        protected = settings.auth is not None and settings.auth.protect_metrics
        base = guarded(routes.base)
        page = guarded(self.status.page)
        self._below_v2 = guarded(routes.dispatch)
        self._unknown = guarded(_unknown_path)
        self._reads: dict[str, Handler] = {
            "/healthz": counted(self.health),
            "/readyz": counted(self.ready),
            "/metrics": (guarded if protected else counted)(self.metrics_text),
            "/v2": base,
            "/v2/": base,
            "/": page,
            "/status": page,
            "/status.json": guarded(self.status.json),
        }

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Nearly every request is for a path below /v2/; the others have a path each, for
        reading (anything else, writes included, is refused by `_unknown_path`).

        An `Expect: 100-continue` gets no interim 100: only a write sends a body, and a write
        is refused at once, which RFC 9110 (10.1.1) allows in place of the 100."""
        path = request.path
        if path.startswith("/v2/") and len(path) > 4:
            return await self._below_v2(request)
        if request.method in READ_METHODS:
            return await self._reads.get(path, self._unknown)(request)
        return await self._unknown(request)

    async def health(self, request: web.BaseRequest) -> web.Response:
        """The process is alive; never behind client auth."""
        return web.json_response({"status": "ok"})

    async def ready(self, request: web.BaseRequest) -> web.Response:
        """Storage writable and database open; never behind client auth."""
        problems = await self.cache.readiness_problems()
        return web.json_response(
            {"status": "degraded" if problems else "ok", "problems": problems},
            status=503 if problems else 200,
        )

    async def metrics_text(self, request: web.BaseRequest) -> web.Response:
        return web.Response(body=self.metrics.render(), content_type="text/plain")


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[Service]:
    """The service, with its resources open and its background tasks running, until the
    server that calls it has stopped."""
    async with AsyncExitStack() as stack:
        # Loaded first, so that a bad sync or htpasswd file stops start-up like a bad main
        # configuration, before anything is opened.
        sync = None
        if settings.sync_config:
            sync = sync_service.SyncBoard(load_sync_config(settings.sync_config))
        authenticator = None
        if settings.auth:
            authenticator = Authenticator(settings.auth)
            stack.callback(authenticator.close)
        metrics = Metrics()
        metrics.max_size.set(settings.cleaner.max_size)
        metrics.high_water.set(settings.cleaner.high_water_mark)
        # Sync entries into the cache fetch through its clients, with the sync file's logins.
        # A corrupt database would stop every start: a fresh one is rebuilt from the store
        # (the reconciliation adopts every file that verifies).
        cache_settings = settings if sync is None else with_sync_logins(settings, sync.config)
        cache = await stack.enter_async_context(open_cache(cache_settings, metrics, owner=True))
        await reconcile(cache.store, cache.metadata)
        service = Service(settings, authenticator, cache, metrics, sync)
        traffic = service.status.history
        await stack.enter_async_context(_background(settings, sync, cache, metrics, traffic))
        _watch(metrics, cache)
        log.info(
            "serving upstreams %s (default %s), data in %s",
            ", ".join(sorted(cache.upstreams)),
            settings.default_upstream,
            cache.store.root,
        )
        yield service
