"""Samples in, a table out: median, min and max per server, and how ours compares.

The comparison column is oriented so that above 1 means registry-cache did better: the
baseline's figure over ours for times, bytes and memory, ours over the baseline's for rates.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

__all__ = ["METRICS", "Metric", "Results", "replace_section"]

SERVERS = ("direct", "baseline", "ours", "bare aiohttp")
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"

Better = Literal["lower", "higher", "neither"]
"""Which way a metric is better; "neither" for context (whose CPU a workload spent), which
gets no comparison."""


@dataclass(frozen=True, slots=True)
class Metric:
    key: str
    title: str
    unit: str
    better: Better


_LOAD_MEASURES: tuple[tuple[str, str, Better], ...] = (
    ("rps", "req/s", "higher"),
    ("p99", "p99 ms", "lower"),
)

METRICS = (
    Metric("cold_pull", "cold pull, big image", "s", "lower"),
    Metric("cold_pull_upstream", "cold pull: upstream served", "x image", "lower"),
    Metric("warm_pull", "warm pull, big image", "s", "lower"),
    Metric("warm_pull_client_cores", "warm pull: cores busy in skopeo", "cores", "neither"),
    Metric("warm_pull_server_cores", "warm pull: cores busy in the server", "cores", "lower"),
    Metric("cold_pulls", "8 concurrent cold pulls", "s", "lower"),
    Metric("cold_pulls_failed", "8 concurrent cold pulls: pulls that failed", "pulls", "lower"),
    Metric("cold_pulls_upstream", "8 concurrent cold pulls: upstream served", "x image", "lower"),
    Metric("cold_pulls_rss", "8 concurrent cold pulls: peak RSS", "MiB", "lower"),
    Metric("warm_pulls", "8 concurrent warm pulls", "s", "lower"),
    Metric("warm_pulls_failed", "8 concurrent warm pulls: pulls that failed", "pulls", "lower"),
    Metric("warm_pulls_rss", "8 concurrent warm pulls: peak RSS", "MiB", "lower"),
    Metric(
        "warm_pulls_client_cores",
        "8 concurrent warm pulls: cores busy in skopeo",
        "cores",
        "neither",
    ),
    Metric(
        "warm_pulls_server_cores",
        "8 concurrent warm pulls: cores busy in the server",
        "cores",
        "lower",
    ),
    Metric("blob_cold", "blob GET (largest layer), cold", "MB/s", "higher"),
    Metric("blob_warm", "blob GET (largest layer), warm", "MB/s", "higher"),
    Metric("blob_head_upstream", "HEAD of an uncached blob: upstream served", "MiB", "lower"),
    *(
        Metric(f"manifest_{method}_{by}_{measure}", f"manifest {method} by {by}", unit, better)
        for method in ("GET", "HEAD")
        for by in ("tag", "digest")
        for measure, unit, better in _LOAD_MEASURES
    ),
    Metric("many_cold", "cold pull, many-layer image", "s", "lower"),
    Metric("many_warm", "warm pull, many-layer image", "s", "lower"),
    Metric("failed_workloads", "workloads its client saw fail, per run", "workloads", "lower"),
)
_FAILED = ("pulls", "workloads")  # the units of the rows that count failures


def _advantage(metric: Metric, baseline: float, ours: float) -> float:
    """How many times better ours is; inf when ours needed none of what the baseline did."""
    low, high = (ours, baseline) if metric.better == "lower" else (baseline, ours)
    if low == 0:
        return math.inf if high > 0 else 1.0
    return high / low


def _number(value: float) -> str:
    if math.isinf(value):
        return "∞"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if value < 10 else f"{value:.1f}"


class Results:
    """Samples per metric and server, in the order they were taken."""

    def __init__(self, machine: dict[str, str], plan: str) -> None:
        self.machine = machine
        self.plan = plan
        self.samples: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))

    def add(self, key: str, server: str, value: float) -> None:
        self.samples[key][server].append(value)

    def failures(self, server: str) -> int:
        """Pulls and whole workloads that failed on `server`."""
        counts = (self.samples.get(m.key, {}).get(server, []) for m in METRICS if m.unit in _FAILED)
        return int(sum(sum(values) for values in counts))

    def _medians(self, key: str) -> dict[str, float]:
        return {s: statistics.median(v) for s, v in self.samples[key].items() if v}

    def rows(self) -> list[dict[str, Any]]:
        rows = []
        for metric in METRICS:
            if metric.key not in self.samples:
                continue
            medians = self._medians(metric.key)
            row: dict[str, Any] = {"key": metric.key, "title": metric.title}
            row |= {"unit": metric.unit, "better": metric.better}
            for server, values in self.samples[metric.key].items():
                row[server] = {
                    "median": medians[server],
                    "min": min(values),
                    "max": max(values),
                    "samples": values,
                }
            if metric.better != "neither" and "baseline" in medians and "ours" in medians:
                advantage = _advantage(metric, medians["baseline"], medians["ours"])
                row["ours_vs_baseline"] = None if math.isinf(advantage) else advantage
                row["ours_wins"] = advantage >= 1.0
            rows.append(row)
        return rows

    def markdown(self) -> str:
        lines = [
            "| workload | unit | direct | baseline | ours | bare aiohttp | ours vs baseline |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in self.rows():
            cells = []
            for server in SERVERS:
                stats = row.get(server)
                cells.append(
                    f"{_number(stats['median'])} ({_number(stats['min'])}-{_number(stats['max'])})"
                    if stats
                    else ""
                )
            ratio = ""
            if "ours_wins" in row:
                value = row["ours_vs_baseline"]
                ratio = f"{'∞' if value is None else _number(value)}x"
                ratio = ratio if row["ours_wins"] else f"**{ratio}**"
            lines.append(f"| {row['title']} | {row['unit']} | {' | '.join(cells)} | {ratio} |")
        machine = ", ".join(f"{key}: {value}" for key, value in self.machine.items())
        return (
            f"Machine: {machine}.\n\nPlan: {self.plan}. Cells: median (min-max). "
            "Last column: how many times better ours is (above 1: ours wins; bold: it lost).\n\n"
            + "\n".join(lines)
            + "\n"
        )

    def write(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "benchmarks.md").write_text(self.markdown())
        document = {"machine": self.machine, "plan": self.plan, "rows": self.rows()}
        (out / "benchmarks.json").write_text(json.dumps(document, indent=2) + "\n")


def replace_section(path: Path, text: str) -> None:
    """Put `text` between the bench markers of a document, keeping the prose around them."""
    document = path.read_text()
    head, begin, rest = document.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not begin or not end:
        raise ValueError(f"{path} has no {BEGIN} ... {END} section")
    path.write_text(f"{head}{BEGIN}\n{text}{END}{tail}")
