"""Builds the aiohttp application: wires settings, store, metadata, upstreams and the cache."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.typedefs import Handler
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from cleaner.reconcile import reconcile
from cleaner.service import Cleaner

from . import errors
from .auth import AUTH_USER, Authenticator, require_user
from .cache import Cache, open_cache
from .errors import RegistryError
from .logs import access_lines, access_members
from .metadata import DATABASE_FILE, Metadata, set_aside_if_corrupt
from .metrics import Metrics
from .routes import API_VERSION_HEADERS, CACHE, CACHE_STATUS, Guard, Routes, require_read
from .send import client_gone
from .settings import Settings
from .status import SYNC_STATUS, install_status
from .sync import service as sync_service
from .sync.config import load_sync_config
from .sync.endpoints import with_sync_logins

__all__ = ["METRICS", "AccessLogger", "access_logger", "build_app"]

log = logging.getLogger(__name__)

METRICS: Final = web.AppKey("metrics", Metrics)
_ACCESS_FLUSH_INTERVAL: Final = 5.0
_CLIENT_CLOSED_REQUEST: Final = 499


def _error_response(error: RegistryError) -> web.Response:
    return web.Response(
        status=error.status,
        body=error.body(),
        content_type="application/json",
        headers={**API_VERSION_HEADERS, **error.headers},
    )


def oci_errors_counted(handler: Handler) -> Handler:
    """A route wrapper: every error leaves as the OCI `{"errors": [...]}` JSON with its status
    (no tracebacks), and every answer is counted by route, method and status.

    A wrapper given to each route, not a middleware: aiohttp runs middlewares through a chain
    it builds per request, with a layer of its own, which was 5% of a cached manifest's
    instructions (docs/benchmarks.md)."""

    @functools.wraps(handler)
    async def answer(request: web.Request) -> web.StreamResponse:
        try:
            response = await handler(request)
        except RegistryError as exc:
            response = _error_response(exc)
        except Exception as exc:
            if isinstance(exc, ConnectionError) and client_gone(request):
                # The client went away mid-answer (a cancelled pull): nothing to report.
                # aiohttp closes the connection when this answer cannot be written; the access
                # log and the request counts say 499, as nginx does for a client that closed
                # its request.
                response = web.Response(status=_CLIENT_CLOSED_REQUEST)
            else:
                log.exception("unexpected error serving %s %s", request.method, request.path)
                response = _error_response(
                    RegistryError(errors.UNAVAILABLE, "internal error", status=500)
                )
        request.app[METRICS].requests.inc(
            _route_label(request.path), request.method, str(response.status)
        )
        return response

    return answer


def _guard(settings: Settings) -> Guard:
    """The wrapper for routes behind client auth (when it is on; the probes take
    `oci_errors_counted` alone). Client auth comes inside `oci_errors_counted`, so that its
    401 is OCI JSON and counted; loading the htpasswd file here makes a bad one stop start-up."""
    if not settings.auth:
        return oci_errors_counted
    with_user = require_user(Authenticator(settings.auth))
    return lambda handler: oci_errors_counted(with_user(handler))


async def _unknown_path(request: web.Request) -> web.Response:
    """What no route answers: a write is refused as such, anything else is not found."""
    require_read(request)
    raise RegistryError(errors.NAME_UNKNOWN, "not found", status=404)


class AccessLogger(AbstractAccessLogger):
    """One JSON line per request: method, path, status, bytes, cache hit or miss, duration."""

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


async def health(request: web.Request) -> web.Response:
    """The process is alive; never behind client auth."""
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    """Storage writable and database open; never behind client auth."""
    problems = await request.app[CACHE].readiness_problems()
    return web.json_response(
        {"status": "degraded" if problems else "ok", "problems": problems},
        status=503 if problems else 200,
    )


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


async def metrics_endpoint(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(), content_type="text/plain")


async def _flush_access_times(metadata: Metadata) -> None:
    """Write batched access times every few seconds: no database write per request."""
    while True:
        await asyncio.sleep(_ACCESS_FLUSH_INTERVAL)
        try:
            await metadata.flush_access_times()
        except Exception:
            log.exception("writing access times failed")


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
) -> AsyncIterator[None]:
    """The server's own tasks: the cleaner, the access-time writer, the sync worker."""
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
        asyncio.create_task(_flush_access_times(cache.metadata), name="access-times"),
    ]
    if sync is not None:
        tasks.append(
            asyncio.create_task(sync_service.serve(settings, sync, cache, metrics), name="sync")
        )
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def build_app(settings: Settings) -> web.Application:
    """The application; its resources are opened on startup and closed on cleanup."""
    guarded = _guard(settings)
    # No middlewares: every route is wrapped instead (see oci_errors_counted).
    app = web.Application(client_max_size=1024**2)
    metrics = app[METRICS] = Metrics()
    metrics.max_size.set(settings.cleaner.max_size)
    metrics.high_water.set(settings.cleaner.high_water_mark)
    # Loaded now, so that a bad sync file stops start-up like a bad main configuration.
    sync = None
    if settings.sync_config:
        sync = sync_service.SyncBoard(load_sync_config(settings.sync_config))
        app[SYNC_STATUS] = sync.entries

    async def resources(app: web.Application) -> AsyncIterator[None]:
        # A corrupt database would stop every start: a fresh one is rebuilt from the store
        # (the reconciliation adopts every file that verifies).
        database = settings.storage_root.resolve() / DATABASE_FILE
        await asyncio.to_thread(set_aside_if_corrupt, database)
        # Sync entries into the cache fetch through its clients, with the sync file's logins.
        cache_settings = settings if sync is None else with_sync_logins(settings, sync.config)
        async with open_cache(cache_settings, metrics) as cache:
            await reconcile(cache.store, cache.metadata)
            async with _background(settings, sync, cache, metrics):
                app[CACHE] = cache
                _watch(metrics, cache)
                log.info(
                    "serving upstreams %s (default %s), data in %s",
                    ", ".join(sorted(cache.upstreams)),
                    settings.default_upstream,
                    cache.store.root,
                )
                yield

    app.cleanup_ctx.append(resources)

    app.router.add_get("/healthz", oci_errors_counted(health))
    app.router.add_get("/readyz", oci_errors_counted(ready))
    protected = settings.auth and settings.auth.protect_metrics
    metrics_guard = guarded if protected else oci_errors_counted
    app.router.add_get("/metrics", metrics_guard(metrics_endpoint))
    Routes(settings).install(app, guarded)
    install_status(app, settings, metrics, guarded)
    # Last: aiohttp tries it after every other route, and answers what none of them takes.
    app.router.add_route("*", "/{path:.*}", guarded(_unknown_path))
    return app
