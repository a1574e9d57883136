"""Prometheus collectors, in a registry of their own per service (no module globals)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["HotCounter", "Metrics", "counter_total", "counter_values"]

_PREFIX = "registry_cache"


class _Live(Collector):
    """Gauges read at scrape time from the objects that know them, never stale."""

    def __init__(self, read: Callable[[], list[Metric]]) -> None:
        self._read = read

    def collect(self) -> list[Metric]:
        return self._read()


class HotCounter(Collector):
    """A labelled counter for what every request counts: one dict update per increment, on
    the event loop's thread only, where prometheus-client's `Counter` takes a lock and makes
    four calls. Exposed as a counter family at scrape time."""

    def __init__(
        self, name: str, documentation: str, labelnames: list[str], registry: CollectorRegistry
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = labelnames
        self._values: dict[tuple[str, ...], float] = {}
        registry.register(self)

    def inc(self, *labels: str, amount: float = 1) -> None:
        self._values[labels] = self._values.get(labels, 0) + amount

    def collect(self) -> list[Metric]:
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for labels, value in self._values.items():
            family.add_metric(list(labels), value)
        return [family]


def counter_values(counter: Collector) -> dict[tuple[str, ...], float]:
    """A counter's totals by label values, for readers other than a Prometheus scrape."""
    return {
        tuple(sample.labels.values()): sample.value
        for family in counter.collect()
        for sample in family.samples
        if sample.name.endswith("_total")
    }


def counter_total(counter: Collector) -> float:
    """A counter's total over all its label values."""
    return sum(counter_values(counter).values())


class Metrics:
    """Every collector the cache exposes on /metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = HotCounter(
            f"{_PREFIX}_http_requests", "Requests served", ["route", "method", "status"], r
        )
        self.hits = HotCounter(f"{_PREFIX}_cache_hits", "Requests served from cache", ["kind"], r)
        self.misses = HotCounter(
            f"{_PREFIX}_cache_misses", "Requests that went to the upstream", ["kind"], r
        )
        self.bytes_served = Counter(
            f"{_PREFIX}_served_bytes", "Blob bytes sent to clients", ["source"], registry=r
        )
        self.upstream_requests = Counter(
            f"{_PREFIX}_upstream_requests",
            "Requests sent to upstreams",
            ["upstream", "status"],
            registry=r,
        )
        self.upstream_latency = Histogram(
            f"{_PREFIX}_upstream_request_seconds",
            "Time to an upstream's response headers",
            ["upstream"],
            registry=r,
        )
        self.coalesced = Counter(
            f"{_PREFIX}_coalesced_requests",
            "Requests that joined an upstream request already under way",
            ["kind"],
            registry=r,
        )
        self.cleaner_runs = Counter(f"{_PREFIX}_cleaner_runs", "Cleaner passes", registry=r)
        self.cleaner_duration = Histogram(
            f"{_PREFIX}_cleaner_run_seconds", "Duration of cleaner passes", registry=r
        )
        self.evicted_items = Counter(f"{_PREFIX}_evicted_items", "Items evicted", registry=r)
        self.evicted_bytes = Counter(f"{_PREFIX}_evicted_bytes", "Bytes evicted", registry=r)
        self.max_size = Gauge(f"{_PREFIX}_cache_max_bytes", "CLEANER_MAXSIZE", registry=r)
        self.high_water = Gauge(
            f"{_PREFIX}_cache_high_water_bytes", "Size that triggers eviction", registry=r
        )
        self.sync_runs = Counter(
            f"{_PREFIX}_sync_runs", "Sync entry runs, by outcome", ["entry", "result"], registry=r
        )
        self.sync_tags = Counter(
            f"{_PREFIX}_sync_tags",
            "Tags a sync checked, by outcome (copied, skipped, failed, retired)",
            ["entry", "result"],
            registry=r,
        )
        self.sync_bytes = Counter(
            f"{_PREFIX}_sync_bytes", "Bytes a sync copied", ["entry"], registry=r
        )
        self.sync_ratelimit_waits = Counter(
            f"{_PREFIX}_sync_ratelimit_waits",
            "Times a sync waited for a source's rate limit to recover",
            ["registry"],
            registry=r,
        )
        self.sync_skipped_ticks = Counter(
            f"{_PREFIX}_sync_skipped_ticks",
            "Scheduled sync runs skipped because the previous one was still going",
            ["entry"],
            registry=r,
        )
        self.sync_last_run = Gauge(
            f"{_PREFIX}_sync_last_run_timestamp_seconds",
            "When a sync entry last finished",
            ["entry"],
            registry=r,
        )

    def watch(self, read: Callable[[], dict[str, float | dict[str, float]]]) -> None:
        """Expose values computed at scrape time: `{"name": value}` or `{"name": {label: v}}`."""

        def collect() -> list[Metric]:
            families: list[Metric] = []
            for name, value in read().items():
                full = f"{_PREFIX}_{name}"
                if isinstance(value, dict):
                    family = GaugeMetricFamily(full, name.replace("_", " "), labels=["upstream"])
                    for label, sample in value.items():
                        family.add_metric([label], sample)
                else:
                    family = GaugeMetricFamily(full, name.replace("_", " "), value=value)
                families.append(family)
            return families

        self.registry.register(_Live(collect))

    def render(self) -> bytes:
        return generate_latest(self.registry)
