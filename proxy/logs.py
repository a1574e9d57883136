"""Where log records go: text lines on stderr for people, or JSON lines on stdout for collectors.

In JSON, an access record's fields (method, path, status, ...) are top-level keys of its line,
next to time, level and logger, so a collector indexes them without parsing a message.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import Final

from .settings import Settings

__all__ = ["ACCESS_FIELDS", "JsonFormatter", "configure"]

ACCESS_FIELDS: Final = "access_fields"
"""The `extra` key under which the access logger passes a request's fields."""
_TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s %(message)s"


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
        fields = getattr(record, ACCESS_FIELDS, None)
        if isinstance(fields, dict):
            entry.update(fields)
        else:
            entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure(settings: Settings) -> None:
    """The root logger's one handler and level, as `log.format` and `log.level` say."""
    if settings.log_format == "json":
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(JsonFormatter())
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_TEXT_FORMAT))
    logging.basicConfig(level=settings.log_level, handlers=[handler], force=True)
