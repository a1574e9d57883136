"""Values loaded from files that operators replace under a running cache (certificates, htpasswd).

The files are checked each time the value is used: a `stat` per file (microseconds, next to a
bcrypt check or a TLS handshake), no background task, and a rotation is picked up by the very
next request or handshake. A changed file that cannot be used (half written, a key that does
not match yet) leaves the last good value in place, so a rotation in several steps never takes
the service down; unless its owner names a value for that case instead (the htpasswd file:
nobody, rather than the users an operator may have just removed).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Generic, TypeVar

from .settings import ConfigError

__all__ = ["WatchedFiles"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_Signature = tuple[tuple[int, int, int] | None, ...]


def _signature(paths: Sequence[Path]) -> _Signature:
    """What tells a replaced or rewritten file apart (symlink swaps included: stat follows)."""
    result: list[tuple[int, int, int] | None] = []
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError:
            result.append(None)
        else:
            result.append((stat.st_mtime_ns, stat.st_size, stat.st_ino))
    return tuple(result)


class WatchedFiles(Generic[T]):
    """`load()`'s result, loaded again when one of `paths` changes.

    The first load happens here and raises `ConfigError`, so a bad file stops start-up. Later,
    a file that cannot be used gives `broken` if set, else the last good value.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        load: Callable[[], T],
        what: str,
        *,
        broken: T | None = None,
    ) -> None:
        self._paths = tuple(paths)
        self._load = load
        self._what = what
        self._broken = broken
        self._signature = _signature(self._paths)
        self._value = load()

    def current(self) -> T:
        signature = _signature(self._paths)
        if signature != self._signature:
            self._signature = signature
            self._reload()
        return self._value

    def _reload(self) -> None:
        try:
            self._value = self._load()
        except ConfigError as exc:
            if self._broken is None:
                instead = "keeping the previous one"
            else:
                self._value, instead = self._broken, "using none instead"
            log.error("%s changed but cannot be used, %s: %s", self._what, instead, exc)
        else:
            log.info("%s changed: reloaded", self._what)
