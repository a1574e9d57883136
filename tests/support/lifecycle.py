"""`with` for the test servers that start and stop on demand (a test may also restart one)."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class StartStop:
    """`with Server(...) as server:` starts it and stops it whatever happens inside."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> object:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
