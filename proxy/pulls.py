"""Which repositories are pulled most, counted in memory since start.

A pull is a manifest GET (as Docker Hub counts them). Counting in memory keeps the hot path
free of database writes; the status page reads the top of the list.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

__all__ = ["PullCounter", "Pulls"]


@dataclass(slots=True)
class Pulls:
    """One repository's pulls and when it was last pulled (wall-clock)."""

    upstream: str
    repository: str
    count: int
    last_at: float


class PullCounter:
    """Pulls per (upstream, repository)."""

    def __init__(self) -> None:
        self._by_repository: dict[tuple[str, str], Pulls] = {}

    def record(self, upstream: str, repository: str) -> None:
        now = time.time()
        entry = self._by_repository.get((upstream, repository))
        if entry is None:
            self._by_repository[upstream, repository] = Pulls(upstream, repository, 1, now)
        else:
            entry.count += 1
            entry.last_at = now

    def top(self, n: int) -> list[Pulls]:
        """The `n` most pulled, most recently pulled first among equals."""
        ranked = sorted(self._by_repository.values(), key=lambda p: (p.count, p.last_at))
        return ranked[::-1][:n]
