"""Which items to evict: a pure function, so the policy can be read and tested on its own."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from proxy.metadata import Candidate

__all__ = ["choose_victims"]


def choose_victims(
    candidates: Iterable[Candidate],
    total: int,
    target: int,
    in_use: Callable[[str], bool],
) -> list[Candidate]:
    """The least recently used items to remove so that `total` falls to `target` or below.

    `candidates` come oldest first and exclude pinned items; anything being served or
    downloaded right now is skipped, so that eviction never cuts a transfer short.
    """
    victims = []
    for candidate in candidates:
        if total <= target:
            break
        if in_use(candidate.digest):
            continue
        victims.append(candidate)
        total -= candidate.size
    return victims
