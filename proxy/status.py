"""What the status page shows, gathered from the running cache: one `Status` for HTML and JSON.

Everything comes from state the process already keeps (counters, the metadata totals, the
upstream clients, the pull counter), so a look at the page costs one database query (sizes of
the most pulled repositories) and the serving path pays nothing for it.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, TypedDict

from aiohttp import web
from yarl import URL

from .cache import Cache
from .metrics import Metrics, counter_total, counter_values
from .pulls import PullCounter
from .settings import Settings
from .status_page import render
from .traffic import SAMPLE_EVERY, Traffic, TrafficHistory

__all__ = ["Status", "StatusCollector", "SyncEntryStatus", "SyncStatusProvider"]

_TOP_REPOSITORIES: Final = 10
# The page is self-contained: no script, no request anywhere but inline styles and images.
_CSP: Final = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


class SyncEntryStatus(TypedDict):
    """One sync entry as the sync worker reports it; times are wall-clock seconds."""

    name: str
    last_run: float | None
    result: str | None
    next_run: float | None


SyncStatusProvider = Callable[[], list[SyncEntryStatus]]
"""The sync worker's entries (`proxy.sync.service.SyncBoard`), when a sync file is configured."""


@dataclass(frozen=True, slots=True)
class CacheFill:
    size: int
    max_size: int
    high_water_mark: int
    items: int
    evicted_bytes: int
    evicted_items: int


@dataclass(frozen=True, slots=True)
class TrafficTotals:
    hits: int
    misses: int
    hit_ratio: float | None
    bytes_from_cache: int
    bytes_from_upstream: int

    @classmethod
    def of(cls, traffic: Traffic) -> TrafficTotals:
        return cls(
            int(traffic.hits),
            int(traffic.misses),
            traffic.hit_ratio,
            int(traffic.bytes_from_cache),
            int(traffic.bytes_from_upstream),
        )


@dataclass(frozen=True, slots=True)
class TrafficStatus:
    since_start: TrafficTotals
    last_hour: TrafficTotals
    interval_seconds: float
    intervals: list[TrafficTotals]
    """Oldest first; the last one is the interval under way."""


@dataclass(frozen=True, slots=True)
class UpstreamStatus:
    name: str
    url: str
    credentials: bool
    reachable: bool | None
    last_success_at: float | None
    last_error: str | None
    last_error_at: float | None
    requests: int
    errors: int
    rate_limit: int | None
    rate_limit_remaining: int | None


@dataclass(frozen=True, slots=True)
class RepositoryStatus:
    upstream: str
    repository: str
    pulls: int
    last_pulled_at: float
    size: int


@dataclass(frozen=True, slots=True)
class Status:
    version: str
    generated_at: float
    started_at: float
    cache: CacheFill
    traffic: TrafficStatus
    upstreams: list[UpstreamStatus]
    repositories: list[RepositoryStatus]
    sync: list[SyncEntryStatus] | None
    config: dict[str, str | int | float | bool | None]

    @property
    def uptime(self) -> float:
        return self.generated_at - self.started_at


def _version() -> str:
    try:
        return importlib.metadata.version("registry-cache")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return "unknown"


def _config_summary(settings: Settings) -> dict[str, str | int | float | bool | None]:
    """Settings by allow-list: credentials, pull secret and htpasswd contents never appear."""
    auth = settings.auth
    return {
        "listen": f"{settings.host}:{settings.port}",
        "tls": settings.tls is not None,
        "storage_root": str(settings.storage_root),
        "default_upstream": settings.default_upstream,
        "manifest_ttl_seconds": settings.manifest_ttl,
        "upstream_connect_timeout_seconds": settings.upstream_connect_timeout,
        "upstream_read_timeout_seconds": settings.upstream_read_timeout,
        "cleaner_max_size_bytes": settings.cleaner.max_size,
        "cleaner_threshold_percentage": settings.cleaner.threshold_percentage,
        "cleaner_run_every_seconds": settings.cleaner.run_every,
        "client_auth": auth is not None,
        "metrics_behind_auth": auth is not None and auth.protect_metrics,
        "sync_config": str(settings.sync_config) if settings.sync_config else None,
        "log_level": settings.log_level,
    }


def _public_url(url: str) -> str:
    """An upstream URL without any user or password written into it."""
    return str(URL(url).with_user(None))


class StatusCollector:
    """Builds a `Status` on demand and keeps the traffic history it needs."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        cache: Cache,
        pulls: PullCounter,
        sync_entries: SyncStatusProvider | None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.cache = cache
        self.pulls = pulls
        self.sync_entries = sync_entries
        self.history = TrafficHistory(metrics)
        self.started_at = time.time()
        self.version = _version()

    async def collect(self) -> Status:
        cache = self.cache
        window = self.history.window()
        return Status(
            version=self.version,
            generated_at=time.time(),
            started_at=self.started_at,
            cache=CacheFill(
                cache.metadata.total_size,
                self.settings.cleaner.max_size,
                self.settings.cleaner.high_water_mark,
                cache.metadata.total_items,
                int(counter_total(self.metrics.evicted_bytes)),
                int(counter_total(self.metrics.evicted_items)),
            ),
            traffic=TrafficStatus(
                TrafficTotals.of(window.since_start),
                TrafficTotals.of(window.last_hour),
                SAMPLE_EVERY,
                [TrafficTotals.of(interval) for interval in window.intervals],
            ),
            upstreams=self._upstreams(),
            repositories=await self._repositories(),
            sync=self.sync_entries() if self.sync_entries else None,
            config=_config_summary(self.settings),
        )

    def _upstreams(self) -> list[UpstreamStatus]:
        requests: dict[str, int] = {}
        errors: dict[str, int] = {}
        for (name, status), count in counter_values(self.metrics.upstream_requests).items():
            requests[name] = requests.get(name, 0) + int(count)
            if status == "error" or int(status) >= 500:
                errors[name] = errors.get(name, 0) + int(count)
        result = []
        for name, client in sorted(self.cache.upstreams.items()):
            seen = client.reachability
            rate = client.rate_limit
            result.append(
                UpstreamStatus(
                    name=name,
                    url=_public_url(client.settings.url),
                    credentials=client.settings.has_credentials,
                    reachable=seen.reachable,
                    last_success_at=seen.last_success_at,
                    last_error=seen.last_error,
                    last_error_at=seen.last_error_at,
                    requests=requests.get(name, 0),
                    errors=errors.get(name, 0),
                    rate_limit=rate.limit if rate else None,
                    rate_limit_remaining=rate.remaining if rate else None,
                )
            )
        return result

    async def _repositories(self) -> list[RepositoryStatus]:
        top = self.pulls.top(_TOP_REPOSITORIES)
        if not top:
            return []
        sizes = {usage.name: usage.size for usage in await self.cache.metadata.repository_usage()}
        return [
            RepositoryStatus(
                p.upstream,
                p.repository,
                p.count,
                p.last_at,
                sizes.get(f"{p.upstream}/{p.repository}", 0),
            )
            for p in top
        ]

    async def page(self, request: web.BaseRequest) -> web.Response:
        status = await self.collect()
        return web.Response(
            text=render(status),
            content_type="text/html",
            headers={"Content-Security-Policy": _CSP, "Cache-Control": "no-store"},
        )

    async def json(self, request: web.BaseRequest) -> web.Response:
        status = await self.collect()
        return web.json_response(
            {**dataclasses.asdict(status), "uptime_seconds": status.uptime},
            headers={"Cache-Control": "no-store"},
        )
