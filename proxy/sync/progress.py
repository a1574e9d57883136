"""Progress of blob copies: a bar per copy on a terminal, nothing otherwise.

The structured log lines say what was copied either way; the bar is for the person watching a
long `sync once`, so it is drawn only when stderr is a terminal. Redraws are throttled (10 a second
by default, across all bars) so a fast copy pays for two short writes. Concurrent copies share
the one line; each finished copy leaves its final line behind.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Final, Protocol, TextIO

from proxy.settings import format_bytes

__all__ = ["SILENT", "Bars", "Progress", "Silent", "labelled", "on_terminal", "short"]

_BAR_WIDTH: Final = 24
_DEFAULT_COLUMNS: Final = 80
_CLEAR_TO_END: Final = "\x1b[K"


class Progress(Protocol):
    def track(
        self, label: str, total: int | None, chunks: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        """`chunks`, unchanged, reporting how far they got."""
        ...


class Silent:
    """No terminal: the log lines are the record."""

    def track(
        self, label: str, total: int | None, chunks: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        return chunks


SILENT: Final = Silent()


class _Labelled:
    def __init__(self, inner: Progress, prefix: str) -> None:
        self.inner = inner
        self.prefix = prefix

    def track(
        self, label: str, total: int | None, chunks: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        return self.inner.track(f"{self.prefix} {label}", total, chunks)


def labelled(progress: Progress, prefix: str) -> Progress:
    """The same progress with labels that say which reference a blob belongs to: the copier
    only knows digests."""
    return progress if isinstance(progress, Silent) else _Labelled(progress, prefix)


def short(digest: str) -> str:
    """The 12 hex digits people recognise a layer by (as docker shows them)."""
    return digest.partition(":")[2][:12] or digest[:12]


class Bars:
    """Bars drawn in place with `\\r` on one terminal line, finished with a newline."""

    def __init__(
        self,
        stream: TextIO,
        *,
        interval: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self.interval = interval
        self.clock = clock
        self._drawn_at = -math.inf
        self._dirty = False  # a bar is on the current line, not yet ended by a newline

    async def track(
        self, label: str, total: int | None, chunks: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        done = 0
        try:
            async for chunk in chunks:
                done += len(chunk)
                now = self.clock()
                if now - self._drawn_at >= self.interval:
                    self._drawn_at = now
                    self._draw(label, done, total, final=False)
                yield chunk
        finally:
            self._draw(label, done, total, final=True)

    def clear(self) -> None:
        """Erase a partly drawn bar, so that other output (a log line) starts a clean line; the
        next redraw brings the bar back."""
        if self._dirty:
            self._write(f"\r{_CLEAR_TO_END}")
            self._dirty = False

    def _draw(self, label: str, done: int, total: int | None, *, final: bool) -> None:
        if total:
            fraction = min(done / total, 1.0)
            filled = round(fraction * _BAR_WIDTH)
            bar = "#" * filled + "." * (_BAR_WIDTH - filled)
            percent = math.floor(fraction * 100)
            figures = f"{format_bytes(done)} / {format_bytes(total)} {percent:3d}% [{bar}]"
        else:
            figures = format_bytes(done)
        room = self._columns() - len(figures) - 2
        if len(label) > room:
            label = "..." + label[len(label) - max(room - 3, 0) :] if room > 3 else ""
        self._write(f"\r{label.ljust(room)}  {figures}{_CLEAR_TO_END}" + ("\n" if final else ""))
        self._dirty = not final

    def _columns(self) -> int:
        """The terminal's width, so a line never wraps (a wrapped line defeats `\\r`)."""
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, ValueError):
            columns = 0
        return columns or _DEFAULT_COLUMNS

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


@contextlib.contextmanager
def on_terminal(stream: TextIO) -> Iterator[Progress]:
    """Bars on `stream` if it is a terminal (log lines clear the bar before they print), else
    nothing at all."""
    if not stream.isatty():
        yield SILENT
        return
    bars = Bars(stream)
    handlers = logging.getLogger().handlers

    def before_a_log_line(record: logging.LogRecord) -> bool:
        bars.clear()
        return True

    for handler in handlers:
        handler.addFilter(before_a_log_line)
    try:
        yield bars
    finally:
        for handler in handlers:
            handler.removeFilter(before_a_log_line)
