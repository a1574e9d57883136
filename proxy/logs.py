"""Where log records go: text lines on stderr for people, or JSON lines on stdout for collectors
(on stderr for the commands whose stdout is their output: `sync`, `du`, `ls`, ...).

In JSON, an access record's fields (method, path, status, ...) are top-level keys of its line,
next to time, level and logger, so a collector indexes them without parsing a message.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import sys
import time
from json.encoder import encode_basestring_ascii
from typing import Final, TextIO

from .settings import Settings

__all__ = [
    "ACCESS_LOGGER",
    "AccessLines",
    "JsonFormatter",
    "access_lines",
    "access_members",
    "configure",
]

_TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s %(message)s"
ACCESS_LOGGER: Final = "registry_cache.access"
"""The access log's logger: its level decides whether lines are written."""


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
        }
        entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class AccessLines:
    """The access log's lines, in the same two formats as every other record, written once per
    event-loop turn: under load one write carries many requests' lines, where a `logging`
    record per request (its object, its handler lock, its flush) was a fifth of a cached
    manifest's cost (docs/benchmarks.md)."""

    def __init__(self, stream: TextIO, json_lines: bool) -> None:
        self._stream = stream
        self._json_lines = json_lines
        self._pending: list[str] = []
        self._second = -1
        self._stamp = ""

    def add(self, members: str) -> None:
        """Queue one request's line (its `access_members`); the first of a turn schedules the
        write."""
        if not self._pending:
            asyncio.get_running_loop().call_soon(self.flush)
        stamp = self._time(time.time())
        if self._json_lines:
            head = f'{{"time": "{stamp}", "level": "INFO", "logger": "{ACCESS_LOGGER}", '
            self._pending.append(f"{head}{members}}}\n")
        else:
            self._pending.append(f"{stamp} INFO {ACCESS_LOGGER} {{{members}}}\n")

    def flush(self) -> None:
        if self._pending:
            self._stream.write("".join(self._pending))
            self._pending.clear()
            self._stream.flush()

    def _time(self, now: float) -> str:
        """The timestamp as the formatters write it; its seconds are formatted once a second."""
        second = int(now)
        if second != self._second:
            self._second = second
            if self._json_lines:
                self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            else:
                self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        millis = int((now - second) * 1000)
        if self._json_lines:
            return f"{self._stamp}.{millis:03d}+00:00"
        return f"{self._stamp},{millis:03d}"


def access_members(
    *,
    method: str,
    path: str,
    status: int,
    size: int,
    cache: str | None,
    duration_ms: float,
    remote: str | None,
    user: str | None,
) -> str:
    """One request's `"key": value, ...` as `json.dumps` writes them, from one format string:
    the access line was the costliest part of answering a cached manifest (docs/benchmarks.md).
    """
    return (
        f'"method": {_string(method)}, "path": {_string(path)}, "status": {status}, '
        f'"bytes": {size}, "cache": {_string(cache)}, "duration_ms": {duration_ms!r}, '
        f'"remote": {_string(remote)}, "user": {_string(user)}'
    )


def _string(value: str | None) -> str:
    return "null" if value is None else encode_basestring_ascii(value)


_access_lines = AccessLines(sys.stderr, json_lines=False)


def access_lines() -> AccessLines:
    """Where the access logger writes, as `configure` set it up."""
    return _access_lines


def configure(settings: Settings, stdout_is_output: bool = False) -> None:
    """The root logger's one handler and level, as `log.format` and `log.level` say, and the
    access lines' stream and format to match. JSON lines go to stdout unless the command
    prints its own output there."""
    global _access_lines
    json_lines = settings.log_format == "json"
    stream = sys.stdout if json_lines and not stdout_is_output else sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(_TEXT_FORMAT))
    logging.basicConfig(level=settings.log_level, handlers=[handler], force=True)
    _access_lines = AccessLines(stream, json_lines)
