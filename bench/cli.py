"""`python -m bench`: seed an upstream, start both caches, run every workload, write the table."""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from importlib.metadata import version
from pathlib import Path

from bench.images import seed
from bench.plan import FULL, QUICK
from bench.report import Results, replace_section
from bench.servers import BareAiohttp, Baseline, Direct, HAProxy, Ours, Server
from bench.workloads import WORKLOADS, Bench, manifests
from tests.support.registry import Registry

__all__ = ["main"]

log = logging.getLogger("bench")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, one run (CI smoke)")
    parser.add_argument("--runs", type=int, help="runs of every workload (default: 3, quick 1)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="output folder")
    parser.add_argument("--docs", type=Path, help="also put the table into this document")
    parser.add_argument("--no-haproxy", action="store_true", help="baseline without HAProxy")
    parser.add_argument("--keep", action="store_true", help="keep the servers' files and logs")
    return parser


def _first_line(*command: str) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "absent"
    return (result.stdout or result.stderr).strip().splitlines()[0]


def machine() -> dict[str, str]:
    """What the numbers depend on: CPU, memory, kernel and the versions of every server."""
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    return {
        "cpu": f"{cpu} x {os.cpu_count()}",
        "memory": f"{memory:.0f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": version("aiohttp"),
        "distribution": _first_line("docker-registry", "--version"),
        "haproxy": _first_line("haproxy", "-v") if HAProxy.available() else "absent",
        "skopeo": _first_line("skopeo", "--version"),
    }


def _run(args: argparse.Namespace, results: Results, workdir: Path) -> None:
    plan = QUICK if args.quick else FULL
    runs = args.runs or plan.runs
    with Registry(workdir / "upstream") as upstream:
        log.info("seeding the upstream")
        images = seed(workdir / "layouts", upstream, plan)
        haproxy = HAProxy.available() and not args.no_haproxy
        servers: list[Server] = [
            Direct(upstream),
            Baseline(workdir / "baseline", upstream, haproxy=haproxy),
            Ours(workdir / "ours", upstream),
        ]
        shm = Path("/dev/shm")
        scratch = Path(tempfile.mkdtemp(dir=shm)) if shm.is_dir() else workdir
        bench = Bench(plan, images, upstream, results, workdir, scratch)
        floor = BareAiohttp(workdir, images.small.raw, images.small.media_type)
        try:
            for run in range(runs):
                # Alternate who goes first, so neither always meets a warmer page cache.
                order = servers if run % 2 == 0 else [servers[0], servers[2], servers[1]]
                for server in order:
                    log.info("run %d/%d: %s", run + 1, runs, server.name)
                    failed = sum(not _completed(workload, bench, server) for workload in WORKLOADS)
                    bench.record("failed_workloads", server, failed)
                floor.reset()
                manifests(bench, floor)
        finally:
            for server in [*servers, floor]:
                server.stop()
            shutil.rmtree(scratch, ignore_errors=True)


def _completed(workload: Callable[[Bench, Server], None], bench: Bench, server: Server) -> bool:
    """Run a workload; a client that saw the server fail (an error status, a failed pull) is a
    finding for the table, not the end of the run. A fault of the benchmark itself still is."""
    try:
        workload(bench, server)
    except (AssertionError, subprocess.SubprocessError, RuntimeError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        log.warning("%s failed %s: %s", server.name, workload.__name__, reason)
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    plan = QUICK if args.quick else FULL
    results = Results(
        machine(), plan.describe() if args.runs is None else f"{plan.describe()} ({args.runs} runs)"
    )
    workdir = Path(tempfile.mkdtemp(prefix="registry-cache-bench-"))
    try:
        _run(args, results, workdir)
    finally:
        if args.keep:
            log.info("files and logs kept in %s", workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    results.write(args.out)
    if args.docs:
        replace_section(args.docs, results.markdown())
    print(results.markdown())
    if failed := results.failures("ours"):
        # The baseline's failures are part of the comparison; ours are a defect.
        log.error("%d pulls or workloads through registry-cache failed", failed)
        return 1
    return 0
