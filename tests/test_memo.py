"""The bounded memory: by total weight, least recently used out first."""

from __future__ import annotations

from proxy.memo import LRU


def test_evicts_least_recently_used_to_stay_within_budget() -> None:
    lru: LRU[str, bytes] = LRU(40, weigh=len)
    lru.put("a", b"a" * 10)
    lru.put("b", b"b" * 10)
    lru.put("c", b"c" * 10)
    assert lru.get("a") == b"a" * 10  # now the most recent
    lru.put("d", b"d" * 10)
    lru.put("e", b"e" * 10)
    assert lru.get("b") is None
    assert [lru.get(key) is not None for key in "acde"] == [True, True, True, True]
    assert lru.size == 40


def test_replacing_and_discarding_keep_the_weight_right() -> None:
    lru: LRU[str, bytes] = LRU(40, weigh=len)
    lru.put("a", b"a" * 10)
    lru.put("a", b"a" * 5)
    assert lru.size == 5
    lru.discard("a")
    lru.discard("missing")
    assert lru.get("a") is None
    assert lru.size == 0


def test_counts_entries_unless_told_how_to_weigh_them() -> None:
    lru: LRU[int, str] = LRU(2)
    for key in range(3):
        lru.put(key, str(key))
    assert len(lru) == 2
    assert [key for key, _ in lru.items()] == [1, 2]


def test_an_entry_heavier_than_the_limit_is_not_kept_and_evicts_nothing() -> None:
    lru: LRU[str, bytes] = LRU(40, weigh=len)
    lru.put("a", b"a" * 10)
    lru.put("big", b"x" * 41)
    assert lru.get("big") is None
    assert lru.get("a") == b"a" * 10 and lru.size == 10
