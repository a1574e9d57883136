"""Cache traffic over the last hour, from snapshots of the counters kept in a ring buffer.

Prometheus counters only know totals since start; the status page also shows the last hour.
Snapshotting the counters every `SAMPLE_EVERY` seconds costs nothing per request and no
database write.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from dataclasses import dataclass
from typing import Final

from .metrics import Metrics, counter_total, counter_values

__all__ = ["SAMPLES", "SAMPLE_EVERY", "Traffic", "TrafficHistory", "Window"]

SAMPLE_EVERY: Final = 30.0
_WINDOW: Final = 3600.0
SAMPLES: Final = int(_WINDOW / SAMPLE_EVERY)
"""Intervals in the window: what the status page's charts have room for."""


@dataclass(frozen=True, slots=True)
class Traffic:
    """Counter totals at one moment (monotonic time)."""

    at: float
    hits: float
    misses: float
    bytes_from_cache: float
    bytes_from_upstream: float

    def __sub__(self, other: Traffic) -> Traffic:
        return Traffic(
            self.at - other.at,
            self.hits - other.hits,
            self.misses - other.misses,
            self.bytes_from_cache - other.bytes_from_cache,
            self.bytes_from_upstream - other.bytes_from_upstream,
        )

    @property
    def hit_ratio(self) -> float | None:
        """Hits among requests answered, None when there were none."""
        requests = self.hits + self.misses
        return self.hits / requests if requests else None


@dataclass(frozen=True, slots=True)
class Window:
    """Traffic since start, over the last hour, and per sampling interval within that hour."""

    since_start: Traffic
    last_hour: Traffic
    intervals: list[Traffic]


class TrafficHistory:
    """Snapshots of the cache counters, one per interval, an hour's worth."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._samples: deque[Traffic] = deque(maxlen=SAMPLES + 1)
        self.sample()

    def now(self) -> Traffic:
        served = counter_values(self._metrics.bytes_served)
        return Traffic(
            time.monotonic(),
            counter_total(self._metrics.hits),
            counter_total(self._metrics.misses),
            served.get(("cache",), 0.0),
            served.get(("upstream",), 0.0),
        )

    def sample(self) -> None:
        self._samples.append(self.now())

    async def run(self) -> None:
        """Sample until cancelled."""
        while True:
            await asyncio.sleep(SAMPLE_EVERY)
            self.sample()

    def window(self) -> Window:
        """The oldest sample within the hour is the baseline; the interval under way is last."""
        current = self.now()
        recent = [s for s in self._samples if current.at - s.at <= _WINDOW]
        points = [*recent, current]
        intervals = [later - earlier for earlier, later in itertools.pairwise(points)]
        return Window(current, current - points[0], intervals)
