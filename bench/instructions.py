"""`python -m bench.instructions`: instructions per cached manifest request, counted by
callgrind, for registry-cache (one or more source trees, side by side) and a bare aiohttp
handler.

On a shared virtual machine, requests per second and even CPU time per request move with the
neighbours (docs/benchmarks.md, "This machine"); the number of instructions a request takes
does not. A change to the manifest path is judged here: run it with `--root` pointing at a
checkout of the code before the change and another at the code after it. Only user-space
instructions count: the kernel's share (the socket calls) is the same for every server.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from bench.clients import ab
from bench.servers import BareAiohttp
from tests.support.images import OCI_INDEX, OCI_MANIFEST, Image, push, write_layout
from tests.support.proxy import Proxy
from tests.support.registry import Registry

__all__ = ["main"]

_REPOSITORY = "bench/small"
_TAG = "latest"
_ACCEPT = f"{OCI_INDEX}, {OCI_MANIFEST}"
_READY_TIMEOUT = 300.0
"""Python starts some fifty times slower under callgrind."""
_WARM_UP_REQUESTS = 300
_TOTALS = re.compile(r"^totals: (\d+)", re.M)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__)
    parser.add_argument(
        "--root",
        type=Path,
        action="append",
        help="a source tree of registry-cache to measure (repeatable; default: this one)",
    )
    parser.add_argument("--requests", type=int, default=2000, help="counted requests per case")
    return parser


class _Counted:
    """A server started under callgrind, counting only while the measured load runs."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.out = workdir / "callgrind.out"
        self.launcher = [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={self.out}",
        ]

    def per_request(self, pid: int, url: str, requests: int) -> None:
        """Warm up uncounted, then count `requests` requests; the total is written when the
        process exits (callgrind_control's dumps of an idle process arrive late)."""
        _load(url, _WARM_UP_REQUESTS)
        self._control("on", pid)
        _load(url, requests)
        self._control("off", pid)
        self.requests = requests

    def result(self) -> int:
        """Instructions per counted request, once the process has exited."""
        found = _TOTALS.search(self.out.read_text())
        if found is None:
            raise RuntimeError(f"no instruction total in {self.out}")
        return int(found[1]) // self.requests

    @staticmethod
    def _control(state: str, pid: int) -> None:
        command = ["callgrind_control", "-i", state, str(pid)]
        subprocess.run(command, check=True, capture_output=True, timeout=60)


def _load(url: str, requests: int) -> None:
    """Keep-alive GETs from 8 connections, as a registry client would send them."""
    ab(url, {"Accept": _ACCEPT}, ["-c", "8", "-n", str(requests)], timeout=600)


@contextmanager
def _upstream(workdir: Path) -> Iterator[tuple[Registry, Image]]:
    with Registry(workdir / "upstream") as upstream:
        image = write_layout(workdir / "layout", _TAG, [("linux", "amd64")], [10_000], seed=63)
        push(image, upstream.host, _REPOSITORY)
        yield upstream, image


def _ours(root: Path, workdir: Path, upstream: Registry, reference: str, requests: int) -> int:
    counted = _Counted(workdir)
    proxy = Proxy(
        workdir,
        {
            "upstreams": [{"name": "bench.upstream", "url": upstream.url}],
            "default_upstream": "bench.upstream",
        },
        env={"PYTHONPATH": str(root)},
        launcher=counted.launcher,
        ready_timeout=_READY_TIMEOUT,
    )
    with proxy:
        assert proxy.pid is not None
        url = f"{proxy.url}/v2/{_REPOSITORY}/manifests/{reference}"
        counted.per_request(proxy.pid, url, requests)
    return counted.result()


def _bare(workdir: Path, image: Image, requests: int) -> int:
    counted = _Counted(workdir)
    server = BareAiohttp(
        workdir, image.raw, image.media_type, counted.launcher, ready_timeout=_READY_TIMEOUT
    )
    server.reset()
    try:
        (pid,) = server.pids()
        counted.per_request(
            pid, f"http://{server.host}/v2/{_REPOSITORY}/manifests/{_TAG}", requests
        )
    finally:
        server.stop()
    return counted.result()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    roots = args.root or [Path(__file__).resolve().parent.parent]
    workdir = Path(tempfile.mkdtemp(prefix="registry-cache-instructions-"))
    rows: list[tuple[str, int, int]] = []
    try:
        with _upstream(workdir) as (upstream, image):
            for index, root in enumerate(roots):
                by_tag, by_digest = (
                    _ours(
                        root, workdir / f"ours-{index}-{case}", upstream, reference, args.requests
                    )
                    for case, reference in (("tag", _TAG), ("digest", str(image.digest)))
                )
                rows.append((f"registry-cache ({root})", by_tag, by_digest))
            bare = _bare(workdir / "bare", image, args.requests)
            rows.append(("bare aiohttp (answers every path alike)", bare, bare))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print("Instructions per cached manifest GET (user space, callgrind):\n")
    print("| server | by tag | by digest |")
    print("| --- | --- | --- |")
    for name, by_tag, by_digest in rows:
        print(f"| {name} | {by_tag:,} | {by_digest:,} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
