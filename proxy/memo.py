"""A bounded LRU of small immutable byte strings, keyed by digest, for the event loop's use.

Cached manifests are asked for far more often than anything else and are small; reading one
from disk on every request cost more than the rest of the request (docs/benchmarks.md).
Content-addressed bytes never change, so a copy in memory is never stale; it only has to go
when its file does.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

__all__ = ["BytesLRU"]


class BytesLRU:
    """At most `budget` bytes in total; an entry larger than a quarter of it is not kept."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.size = 0
        self._entries: OrderedDict[Hashable, bytes] = OrderedDict()

    def get(self, key: Hashable) -> bytes | None:
        data = self._entries.get(key)
        if data is not None:
            self._entries.move_to_end(key)
        return data

    def put(self, key: Hashable, data: bytes) -> None:
        if len(data) > self.budget // 4:
            return
        old = self._entries.pop(key, None)
        self.size += len(data) - (len(old) if old is not None else 0)
        self._entries[key] = data
        while self.size > self.budget:
            _, evicted = self._entries.popitem(last=False)
            self.size -= len(evicted)

    def discard(self, key: Hashable) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self.size -= len(old)
