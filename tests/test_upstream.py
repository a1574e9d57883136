"""The registry client's own state, apart from any server: what it keeps of the tokens."""

from __future__ import annotations

import time

from proxy.upstream import TokenCache, _Token


def _token(value: str, lifetime: float = 300.0) -> _Token:
    return _Token(value, time.monotonic() + lifetime)


def test_tokens_are_kept_for_the_most_recently_used_scopes_only() -> None:
    tokens = TokenCache(limit=3)
    for name in ("a", "b", "c"):
        tokens.put(f"repository:{name}:pull", _token(name))
    assert tokens.get("repository:a:pull") is not None  # now the most recently used

    tokens.put("repository:d:pull", _token("d"))

    kept = {name: tokens.get(f"repository:{name}:pull") for name in "abcd"}
    assert {name for name, token in kept.items() if token is not None} == {"a", "c", "d"}


def test_expired_tokens_are_dropped_before_any_good_one() -> None:
    tokens = TokenCache(limit=2)
    tokens.put("repository:a:pull", _token("a"))
    tokens.put("repository:b:pull", _token("b", lifetime=-1.0))

    tokens.put("repository:c:pull", _token("c"))

    # The expired token made room, not the least recently used good one.
    assert tokens.get("repository:a:pull") is not None
    assert tokens.get("repository:c:pull") is not None
