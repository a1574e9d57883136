"""When an entry runs: a cron `schedule` (five fields or `@daily`...) or an `interval`.

regsync registers `schedule`, else `"@every " + interval`, with robfig/cron in local time (or
the zone of a `CRON_TZ=` or `TZ=` prefix) and skips a tick while the previous run of the same
entry is still going; so does `run_on`.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import re
import zoneinfo
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, Protocol

from croniter import croniter

from proxy.settings import ConfigError, parse_duration

__all__ = ["Cron", "Every", "Schedule", "parse_schedule", "run_on"]

log = logging.getLogger(__name__)

_DESCRIPTORS: Final = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}


class Schedule(Protocol):
    def next_after(self, moment: datetime.datetime) -> datetime.datetime: ...


@dataclass(frozen=True, slots=True)
class Cron:
    """Five cron fields, in local time or in `zone`."""

    expression: str
    zone: zoneinfo.ZoneInfo | None = None

    def next_after(self, moment: datetime.datetime) -> datetime.datetime:
        if self.zone is not None:
            moment = moment.astimezone(self.zone)
        result: datetime.datetime = croniter(self.expression, moment).get_next(datetime.datetime)
        return result


@dataclass(frozen=True, slots=True)
class Every:
    """A fixed period from the last tick (`interval`, `@every 1h`)."""

    seconds: float

    def next_after(self, moment: datetime.datetime) -> datetime.datetime:
        return moment + datetime.timedelta(seconds=self.seconds)


def parse_schedule(schedule: object, interval: object, key: str) -> Schedule | None:
    """`schedule` wins over `interval`; neither means the entry only runs with `sync once`."""
    if schedule is not None:
        if not isinstance(schedule, str) or not schedule.strip():
            raise ConfigError(f"{key}.schedule: expected a cron expression, got {schedule!r}")
        text = " ".join(schedule.split())
        if text.startswith("@every "):
            return _every(text.removeprefix("@every "), f"{key}.schedule")
        zone_prefix = re.match(r"(?:CRON_)?TZ=(\S+) ", text)
        zone = None
        if zone_prefix is not None:
            zone = _zone(zone_prefix[1], f"{key}.schedule")
            text = text[zone_prefix.end() :]
        expression = _DESCRIPTORS.get(text, text)
        if len(expression.split()) != 5 or not croniter.is_valid(expression):
            raise ConfigError(
                f"{key}.schedule: expected five cron fields or @daily/@hourly/@every <duration>, "
                f"optionally after CRON_TZ=<zone>, got {schedule!r}"
            )
        return Cron(expression, zone)
    if interval is not None:
        return _every(interval, f"{key}.interval")
    return None


def _zone(name: str, key: str) -> zoneinfo.ZoneInfo:
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"{key}: unknown time zone {name!r}") from None


def _every(value: object, key: str) -> Every:
    if not isinstance(value, str | int | float):
        raise ConfigError(f"{key}: expected a duration such as 60m, got {value!r}")
    seconds = parse_duration(value, key)
    if seconds <= 0:
        raise ConfigError(f"{key}: must be longer than zero, got {value!r}")
    return Every(seconds)


def _now() -> datetime.datetime:
    return datetime.datetime.now().astimezone()


async def run_on(
    schedule: Schedule,
    run: Callable[[], Awaitable[object]],
    name: str,
    on_skip: Callable[[], None] = lambda: None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    now: Callable[[], datetime.datetime] = _now,
    on_due: Callable[[datetime.datetime], None] = lambda due: None,
) -> None:
    """Start `run` at every tick, unless the previous one is still going; until cancelled.
    `on_due` is told when the next tick is."""
    running: asyncio.Task[object] | None = None
    try:
        while True:
            due = schedule.next_after(now())
            on_due(due)
            await sleep(max(0.0, (due - now()).total_seconds()))
            if running is not None and not running.done():
                log.info("sync %s: previous run still going, tick skipped", name)
                on_skip()
                continue
            running = asyncio.ensure_future(run())
    finally:
        if running is not None and not running.done():
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
