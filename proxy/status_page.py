"""The status page as one self-contained HTML document: inline CSS and SVG, no script.

The cache often runs where nothing outside is reachable, so the page needs no asset from
anywhere; it reloads itself every 30 s with a meta refresh rather than with JavaScript.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Sequence
from html import escape
from typing import TYPE_CHECKING, Final

from humanfriendly import format_timespan

from .settings import format_bytes
from .traffic import SAMPLE_EVERY, SAMPLES

if TYPE_CHECKING:
    from .status import CacheFill, Status, TrafficStatus, TrafficTotals, UpstreamStatus

__all__ = ["render"]

_GREEN: Final = "#2e7d32"
_AMBER: Final = "#ef8f00"
_RED: Final = "#c62828"
_GREY: Final = "#9e9e9e"
_BLUE: Final = "#1565c0"
_NONE: Final = "\u2013"  # an en dash: no value

_STYLE: Final = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0; background: #f4f5f7; color: #1d1f23; }
header { background: #1d2b3a; color: #fff; padding: 14px 24px; display: flex;
  align-items: baseline; gap: 24px; }
header h1 { font-size: 20px; margin: 0; }
header span { color: #b8c4d0; }
main { display: grid; grid-template-columns: 1fr 1fr; gap: 16px; padding: 16px 24px; }
section { background: #fff; border-radius: 8px; padding: 14px 18px;
  box-shadow: 0 1px 2px rgba(0, 0, 0, .12); }
section.wide { grid-column: 1 / -1; }
h2 { font-size: 15px; margin: 0 0 10px; text-transform: uppercase; letter-spacing: .04em;
  color: #4a5563; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 4px 8px 4px 0; border-bottom: 1px solid #eceef1;
  vertical-align: top; }
th { font-weight: 600; color: #4a5563; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.big { font-size: 22px; font-weight: 600; }
.stats { display: flex; gap: 28px; margin: 10px 0; }
.stats div span { display: block; color: #6b7380; font-size: 12px; }
.badge { display: inline-block; padding: 0 8px; border-radius: 10px; color: #fff;
  font-size: 12px; }
.muted { color: #6b7380; }
.err { color: #c62828; font-size: 12px; }
.legend i { display: inline-block; width: 10px; height: 10px; margin: 0 4px 0 12px; }
svg { display: block; }
"""


def _percent(ratio: float | None) -> str:
    return _NONE if ratio is None else f"{ratio:.1%}"


def _ago(moment: float | None, now: float) -> str:
    if moment is None:
        return "never"
    return f"{format_timespan(max(now - moment, 0), max_units=2)} ago"


def _in(moment: float | None, now: float) -> str:
    if moment is None:
        return "not scheduled"
    return f"in {format_timespan(max(moment - now, 0), max_units=2)}"


def _clock(moment: float) -> str:
    return datetime.datetime.fromtimestamp(moment, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], numeric: set[int]) -> str:
    """Cells are HTML already; columns in `numeric` are right-aligned."""

    def cls(index: int) -> str:
        return ' class="n"' if index in numeric else ""

    head = "".join(f"<th{cls(i)}>{escape(h)}</th>" for i, h in enumerate(headers))
    body = "".join(
        "<tr>" + "".join(f"<td{cls(i)}>{cell}</td>" for i, cell in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _badge(text: str, color: str) -> str:
    return f'<span class="badge" style="background:{color}">{escape(text)}</span>'


def _fill_bar(cache: CacheFill) -> str:
    """The fill on a scale to the high-water mark, with marks at the budget and the mark."""
    scale = max(cache.high_water_mark, cache.size, 1)
    color = (
        _GREEN
        if cache.size <= cache.max_size
        else _AMBER
        if cache.size <= cache.high_water_mark
        else _RED
    )
    fill = 1000 * cache.size / scale
    budget = 1000 * cache.max_size / scale
    mark = 1000 * cache.high_water_mark / scale
    return (
        '<svg viewBox="0 0 1000 30" width="100%" height="30" preserveAspectRatio="none"'
        ' role="img" aria-label="cache fill">'
        '<rect width="1000" height="30" rx="4" fill="#e3e6ea"/>'
        f'<rect width="{max(fill, 2):.1f}" height="30" rx="4" fill="{color}"/>'
        f'<line x1="{budget:.1f}" x2="{budget:.1f}" y1="0" y2="30" stroke="#1d1f23"'
        ' stroke-width="3"/>'
        f'<line x1="{mark:.1f}" x2="{mark:.1f}" y1="0" y2="30" stroke="{_RED}"'
        ' stroke-width="3" stroke-dasharray="5 3"/></svg>'
    )


def _bars(series: Sequence[Sequence[float]], colors: Sequence[str], ceiling: float) -> str:
    """A stacked bar per interval, the newest at the right, an hour wide."""
    width, height = 3 * SAMPLES, 48
    scale = height / ceiling if ceiling > 0 else 0.0
    offset = SAMPLES - len(series)
    rects = []
    for slot, stack in enumerate(series, start=offset):
        base = float(height)
        for value, color in zip(stack, colors, strict=True):
            tall = value * scale
            if tall > 0:
                base -= tall
                rects.append(
                    f'<rect x="{3 * slot}" y="{base:.1f}" width="2" height="{tall:.1f}"'
                    f' fill="{color}"/>'
                )
    return (
        f'<svg viewBox="0 0 {width} {height}" width="100%" height="{height}"'
        ' preserveAspectRatio="none" role="img">'
        f'<rect width="{width}" height="{height}" fill="#f4f5f7"/>{"".join(rects)}</svg>'
    )


def _cache_section(status: Status) -> str:
    cache = status.cache
    used = cache.size / cache.max_size
    return (
        "<section><h2>Cache</h2>"
        f'<div class="big">{format_bytes(cache.size)} <span class="muted">of'
        f" {format_bytes(cache.max_size)} ({used:.1%})</span></div>"
        f"{_fill_bar(cache)}"
        f'<div class="muted">black mark: budget (CLEANER_MAXSIZE) {format_bytes(cache.max_size)};'
        f" red mark: eviction starts at {format_bytes(cache.high_water_mark)}</div>"
        '<div class="stats">'
        f"<div><span>items</span>{cache.items} items</div>"
        f"<div><span>evicted</span>{format_bytes(cache.evicted_bytes)}"
        f" ({cache.evicted_items} items)</div></div></section>"
    )


def _traffic_row(label: str, totals: TrafficTotals) -> list[str]:
    return [
        escape(label),
        _percent(totals.hit_ratio),
        str(totals.hits),
        str(totals.misses),
        format_bytes(totals.bytes_from_cache),
        format_bytes(totals.bytes_from_upstream),
    ]


def _traffic_section(traffic: TrafficStatus) -> str:
    served = [[t.bytes_from_cache, t.bytes_from_upstream] for t in traffic.intervals]
    peak = max((sum(s) for s in served), default=0)
    ratios = [[t.hit_ratio or 0.0] for t in traffic.intervals]
    table = _table(
        ["", "hit ratio", "hits", "misses", "from cache", "from upstream"],
        [
            _traffic_row("since start", traffic.since_start),
            _traffic_row("last hour", traffic.last_hour),
        ],
        {1, 2, 3, 4, 5},
    )
    return (
        f"<section><h2>Traffic</h2>{table}"
        f'<p class="legend muted">bytes served per {traffic.interval_seconds:.0f} s, last hour'
        f'<i style="background:{_GREEN}"></i>from cache'
        f'<i style="background:{_AMBER}"></i>from upstream (peak {format_bytes(peak)})</p>'
        f"{_bars(served, [_GREEN, _AMBER], peak)}"
        f'<p class="legend muted">hit ratio per {traffic.interval_seconds:.0f} s (0 to 100%)</p>'
        f"{_bars(ratios, [_BLUE], 1.0)}</section>"
    )


def _upstream_state(upstream: UpstreamStatus, now: float) -> str:
    if upstream.reachable is None:
        return _badge("not contacted yet", _GREY)
    state = _badge("reachable", _GREEN) if upstream.reachable else _badge("unreachable", _RED)
    if upstream.last_error is not None:
        state += (
            f'<div class="err">last error {_ago(upstream.last_error_at, now)}:'
            f" {escape(upstream.last_error)}</div>"
        )
    return state


def _rate_limit(upstream: UpstreamStatus) -> str:
    if upstream.rate_limit_remaining is None:
        return f'<span class="muted">{_NONE}</span>'
    limit = f" of {upstream.rate_limit}" if upstream.rate_limit is not None else ""
    return f"{upstream.rate_limit_remaining}{limit} left"


def _upstreams_section(status: Status) -> str:
    rows = [
        [
            f"<b>{escape(u.name)}</b><div class='muted'>{escape(u.url)}"
            f"{' (with credentials)' if u.credentials else ''}</div>",
            _upstream_state(u, status.generated_at),
            str(u.requests),
            str(u.errors),
            _rate_limit(u),
        ]
        for u in status.upstreams
    ]
    table = _table(["upstream", "state", "requests", "errors", "rate limit"], rows, {2, 3, 4})
    return f'<section class="wide"><h2>Upstreams</h2>{table}</section>'


def _repositories_section(status: Status) -> str:
    if not status.repositories:
        return '<section><h2>Most pulled</h2><p class="muted">nothing pulled yet</p></section>'
    rows = [
        [
            escape(f"{r.upstream}/{r.repository}"),
            str(r.pulls),
            format_bytes(r.size),
            _ago(r.last_pulled_at, status.generated_at),
        ]
        for r in status.repositories
    ]
    table = _table(["repository", "pulls", "size", "last pulled"], rows, {1, 2})
    return f"<section><h2>Most pulled</h2>{table}</section>"


def _sync_section(status: Status) -> str:
    if status.sync is None:
        return '<section><h2>Sync</h2><p class="muted">no sync configured</p></section>'
    now = status.generated_at
    rows = [
        [
            escape(entry["name"]),
            _ago(entry["last_run"], now),
            escape(entry["result"] or _NONE),
            _in(entry["next_run"], now),
        ]
        for entry in status.sync
    ]
    table = _table(["entry", "last run", "result", "next run"], rows, set())
    return f"<section><h2>Sync</h2>{table}</section>"


def _setting(key: str, value: str | int | float | bool | None) -> str:
    """A setting as an operator writes it: units from the key's suffix, yes/no for flags."""
    if value is None:
        return _NONE
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, str):
        return escape(value)
    if key.endswith("_bytes"):
        return format_bytes(value)
    if key.endswith("_seconds"):
        return str(format_timespan(value))
    return str(value)


def _config_section(status: Status) -> str:
    rows = [[escape(key), _setting(key, value)] for key, value in status.config.items()]
    return f"<section><h2>Configuration</h2>{_table(['setting', 'value'], rows, set())}</section>"


def render(status: Status) -> str:
    """The whole page."""
    sections = [
        _cache_section(status),
        _traffic_section(status.traffic),
        _upstreams_section(status),
        _repositories_section(status),
        _sync_section(status),
        _config_section(status),
    ]
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="refresh" content="{SAMPLE_EVERY:.0f}">'
        "<title>registry-cache status</title>"
        f"<style>{_STYLE}</style></head><body>"
        f"<header><h1>registry-cache</h1><span>version {escape(status.version)}</span>"
        f"<span>up {format_timespan(status.uptime, max_units=2)}</span>"
        f"<span>as of {_clock(status.generated_at)}</span></header>"
        f"<main>{''.join(sections)}</main></body></html>"
    )
