"""The manifest memory: bounded by bytes, least recently used out first."""

from __future__ import annotations

from proxy.memo import BytesLRU


def test_evicts_least_recently_used_to_stay_within_budget() -> None:
    lru = BytesLRU(budget=40)
    lru.put("a", b"a" * 10)
    lru.put("b", b"b" * 10)
    lru.put("c", b"c" * 10)
    assert lru.get("a") == b"a" * 10  # now the most recent
    lru.put("d", b"d" * 10)
    lru.put("e", b"e" * 10)
    assert lru.get("b") is None
    assert [lru.get(key) is not None for key in "acde"] == [True, True, True, True]
    assert lru.size == 40


def test_skips_large_entries_and_forgets_on_discard() -> None:
    lru = BytesLRU(budget=40)
    lru.put("big", b"x" * 11)
    assert lru.get("big") is None
    lru.put("a", b"a" * 10)
    lru.put("a", b"a" * 5)
    assert lru.size == 5
    lru.discard("a")
    lru.discard("missing")
    assert lru.get("a") is None
    assert lru.size == 0
