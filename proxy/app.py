"""Builds the aiohttp application: wires settings, store, metadata, upstreams and the cache."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from . import errors
from .cache import Cache
from .errors import RegistryError
from .metadata import Metadata
from .routes import API_VERSION_HEADERS, CACHE, CACHE_STATUS, Routes
from .settings import Settings
from .store import BlobStore
from .upstream import UpstreamClient

__all__ = ["AccessLogger", "build_app"]

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error_response(error: RegistryError) -> web.Response:
    return web.Response(
        status=error.status,
        body=error.body(),
        content_type="application/json",
        headers={**API_VERSION_HEADERS, **error.headers},
    )


@web.middleware
async def oci_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves as the OCI `{"errors": [...]}` JSON with its status; no tracebacks."""
    try:
        return await handler(request)
    except RegistryError as exc:
        return _error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = errors.UNSUPPORTED if exc.status == 405 else errors.NAME_UNKNOWN
        return _error_response(RegistryError(code, exc.reason, status=exc.status))
    except Exception:
        log.exception("unexpected error serving %s %s", request.method, request.path)
        return _error_response(RegistryError(errors.UNAVAILABLE, "internal error", status=500))


class AccessLogger(AbstractAccessLogger):
    """One JSON line per request: method, path, status, bytes, cache hit or miss, duration."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        self.logger.info(
            json.dumps(
                {
                    "method": request.method,
                    "path": request.path,
                    "status": response.status,
                    "bytes": _bytes_sent(request, response),
                    "cache": request.get(CACHE_STATUS),
                    "duration_ms": round(time * 1000, 2),
                    "remote": request.remote,
                }
            )
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


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


def build_app(settings: Settings) -> web.Application:
    """The application; its resources are opened on startup and closed on cleanup."""
    app = web.Application(middlewares=[oci_errors], client_max_size=1024**2)

    async def resources(app: web.Application) -> AsyncIterator[None]:
        store = BlobStore(settings.storage_root)
        metadata = Metadata(store.root / "metadata.db")
        await metadata.open()
        upstreams = {
            name: UpstreamClient(
                upstream,
                connect_timeout=settings.upstream_connect_timeout,
                read_timeout=settings.upstream_read_timeout,
            )
            for name, upstream in settings.upstreams.items()
        }
        cache = Cache(settings, store, metadata, upstreams)
        app[CACHE] = cache
        log.info(
            "serving upstreams %s (default %s), data in %s",
            ", ".join(sorted(upstreams)),
            settings.default_upstream,
            store.root,
        )
        try:
            yield
        finally:
            await cache.close()
            for client in upstreams.values():
                await client.close()
            await metadata.close()

    app.cleanup_ctx.append(resources)
    app.router.add_get("/healthz", health)
    app.router.add_get("/readyz", ready)
    Routes(settings).install(app)
    return app
