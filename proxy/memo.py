"""A bounded least-recently-used memory for the event loop's use.

Three things are kept this way: manifest bytes (asked for far more often than anything else,
and reading one from disk on every request cost more than the rest of the request,
docs/benchmarks.md), upstream tokens by scope, and the variant of a tag a narrow client gets.
Each would otherwise grow with every name clients try.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

__all__ = ["LRU"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def _one(value: object) -> int:
    return 1


class LRU(Generic[K, V]):
    """Entries of at most `limit` in total weight (one each, unless `weigh` says otherwise);
    the least recently used leave first."""

    def __init__(self, limit: int, weigh: Callable[[V], int] = _one) -> None:
        self.limit = limit
        self.size = 0
        self._weigh = weigh
        self._entries: OrderedDict[K, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> Iterator[tuple[K, V]]:
        """From the least recently used; a snapshot, so the caller may discard as it goes."""
        return iter(list(self._entries.items()))

    def get(self, key: K) -> V | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        """Keep `value`, unless it alone weighs more than the limit."""
        self.discard(key)
        if self._weigh(value) > self.limit:
            return
        self._entries[key] = value
        self.size += self._weigh(value)
        while self.size > self.limit:
            _, evicted = self._entries.popitem(last=False)
            self.size -= self._weigh(evicted)

    def discard(self, key: K) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self.size -= self._weigh(old)
