"""The load generators: skopeo pulls, curl for one blob, wrk and ab for manifests.

Each returns plain numbers; none of them measures anything the server reports about itself.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tests.support import skopeo

__all__ = ["LoadResult", "ab", "ab_head", "curl_get", "pull", "pulls", "wrk_get"]

log = logging.getLogger("bench")

_PULL_TIMEOUT = 600.0

# wrk reports through its Lua `done` hook: exact counts and the latency percentile, as JSON.
_WRK_SCRIPT = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "errors": %d, "p99_us": %d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(99)))
end
"""


@dataclass(frozen=True, slots=True)
class LoadResult:
    requests_per_second: float
    p99_ms: float


def pull(host: str, image: str, dest: Path) -> float:
    """One `skopeo copy docker://... dir:` into a fresh directory; seconds, wall clock."""
    shutil.rmtree(dest, ignore_errors=True)
    started = time.perf_counter()
    skopeo.copy(f"docker://{host}/{image}", f"dir:{dest}", timeout=_PULL_TIMEOUT)
    elapsed = time.perf_counter() - started
    shutil.rmtree(dest, ignore_errors=True)
    return elapsed


def pulls(host: str, image: str, dest: Path, count: int) -> tuple[float, int]:
    """`count` pulls of one image started together: seconds until the last one is done, and
    how many failed (a server that fails under concurrency is a finding, not a crash)."""
    dest.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with ThreadPoolExecutor(count) as pool:
        futures = [
            pool.submit(
                skopeo.copy,
                f"docker://{host}/{image}",
                f"dir:{dest / str(i)}",
                check=False,
                timeout=_PULL_TIMEOUT,
            )
            for i in range(count)
        ]
        done = [future.result() for future in futures]
    elapsed = time.perf_counter() - started
    shutil.rmtree(dest, ignore_errors=True)
    failed = [proc for proc in done if proc.returncode != 0]
    for proc in failed:
        reason = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        log.warning("a pull from %s failed: %s", host, reason[0])
    return elapsed, len(failed)


def curl_get(url: str) -> float:
    """One GET to /dev/null; MB/s (10^6 bytes) of body."""
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "--fail",
            "--noproxy",
            "*",
            "-o",
            "/dev/null",
            "-w",
            "%{size_download} %{time_total}",
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=_PULL_TIMEOUT,
    ).stdout
    size, seconds = out.split()
    return int(size) / float(seconds) / 1e6


def wrk_get(
    url: str, headers: dict[str, str], connections: int, seconds: int, workdir: Path
) -> LoadResult:
    script = workdir / "report.lua"
    script.write_text(_WRK_SCRIPT)
    args = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(script)]
    for key, value in headers.items():
        args += ["-H", f"{key}: {value}"]
    out = subprocess.run(
        [*args, url], capture_output=True, text=True, check=True, timeout=seconds + 60
    ).stdout
    report = json.loads(out.strip().splitlines()[-1])
    if report["errors"]:
        raise RuntimeError(f"wrk saw {report['errors']} errors on {url}:\n{out}")
    return LoadResult(report["requests"] / (report["duration_us"] / 1e6), report["p99_us"] / 1000)


def ab_head(
    url: str, headers: dict[str, str], connections: int, seconds: int, workdir: Path
) -> LoadResult:
    """HEAD load with ApacheBench (wrk 4.1 hangs on HEAD); keep-alive, as wrk. The p99 comes
    from ab's percentile file, in microseconds, not from its summary, in whole milliseconds."""
    percentiles = workdir / "ab-percentiles.csv"
    options = ["-i", "-c", str(connections), "-t", str(seconds), "-n", "100000000"]
    out = ab(url, headers, [*options, "-e", str(percentiles)], timeout=seconds + 60)
    rate = re.search(r"^Requests per second:\s+([\d.]+)", out, re.M)
    p99 = re.search(r"^99,([\d.]+)$", percentiles.read_text(), re.M)
    if rate is None or p99 is None:
        raise RuntimeError(f"unexpected ab output:\n{out}")
    return LoadResult(float(rate[1]), float(p99[1]))


def ab(url: str, headers: dict[str, str], options: list[str], timeout: float) -> str:
    """ApacheBench with keep-alive, as wrk; its report, or an error if any request failed."""
    args = ["ab", "-k", "-q", *options]
    for key, value in headers.items():
        args += ["-H", f"{key}: {value}"]
    out = subprocess.run(
        [*args, url], capture_output=True, text=True, check=True, timeout=timeout
    ).stdout
    failed = re.search(r"^(Failed requests|Non-2xx responses):\s+(\d+)", out, re.M)
    if failed and int(failed[2]):
        raise RuntimeError(f"ab saw failures on {url}:\n{out}")
    return out
