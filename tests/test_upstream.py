"""The registry client's own state, apart from any server: what it keeps of the tokens, and for
how long."""

from __future__ import annotations

import math
import time

import pytest

from proxy.upstream import TokenCache, _Token, token_lifetime


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


@pytest.mark.parametrize(
    ("expires_in", "lifetime"),
    [(300, 300.0), (5, 60.0), (None, 60.0), ("300", 60.0), (math.nan, 60.0), (math.inf, 60.0)],
)
def test_a_token_lives_what_its_service_says_but_always_expires(
    expires_in: object, lifetime: float
) -> None:
    assert token_lifetime(expires_in) == lifetime
