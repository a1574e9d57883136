"""The workloads of issue 6, each run against one server and recorded under its name.

A server is emptied before each group that needs a cold cache; the direct upstream runs
only the workloads where it is the reference (a pull, a blob GET).
"""

from __future__ import annotations

import logging
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import clients
from bench.cpu import cores_busy
from bench.images import BIG, MANY, SMALL, TAG, Images
from bench.plan import MiB, Plan
from bench.report import Results
from bench.rss import peak_rss, reset_peak, tree
from bench.servers import Server
from tests.support.images import OCI_INDEX, OCI_MANIFEST
from tests.support.registry import Registry

__all__ = ["WORKLOADS", "Bench", "manifests"]

log = logging.getLogger("bench")

_ACCEPT = {"Accept": f"{OCI_INDEX}, {OCI_MANIFEST}"}
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_QUIET_SECONDS = 1.0
_SETTLE_LIMIT = 60.0


@dataclass(frozen=True, slots=True)
class Bench:
    plan: Plan
    images: Images
    upstream: Registry
    results: Results
    workdir: Path
    scratch: Path
    """Where clients write what they pull: tmpfs when there is one, so the client's disk
    is not what is measured."""

    def record(self, key: str, server: Server, value: float) -> None:
        log.info("%-9s %-28s %.4g", server.name, key, value)
        self.results.add(key, server.name, value)

    def served(self) -> int:
        """Bytes the upstream served since `clear_requests`, once it has gone quiet.

        distribution's proxy fills its cache after the client is answered, so the count
        waits until the upstream's access log stops growing.
        """
        deadline = time.monotonic() + _SETTLE_LIMIT
        last = -1
        while True:
            total = sum(entry.size for entry in self.upstream.entries())
            if total == last or time.monotonic() > deadline:
                return total
            last = total
            time.sleep(_QUIET_SECONDS)

    def largest_layer(self) -> str:
        blobs = self.images.big.blobs
        return max(blobs, key=blobs.__getitem__)


def server_pids(server: Server) -> list[int]:
    """The server's processes and their children (HAProxy and distribution, or ours)."""
    return [pid for top in server.pids() for pid in tree(top)]


def _image(repository: str) -> str:
    return f"{repository}:{TAG}"


def _request(method: str, url: str) -> None:
    request = urllib.request.Request(url, method=method, headers=_ACCEPT)
    with _NO_PROXY.open(request, timeout=60) as response:
        response.read()


def pulls_and_blobs(bench: Bench, server: Server) -> None:
    """Cold then warm pulls, a warm blob, the manifest load: one emptied cache."""
    server.reset()
    direct = server.name == "direct"
    dest = bench.scratch / "pull"
    bench.upstream.clear_requests()
    bench.record("cold_pull", server, clients.pull(server.host, _image(BIG), dest))
    if not direct:
        served = bench.served() / Images.size(bench.images.big)
        bench.record("cold_pull_upstream", server, served)
        with cores_busy(server_pids(server)) as busy:
            warm = clients.pull(server.host, _image(BIG), dest)
        bench.record("warm_pull", server, warm)
        bench.record("warm_pull_client_cores", server, busy.clients)
        bench.record("warm_pull_server_cores", server, busy.servers)
    blob_url = f"http://{server.host}/v2/{BIG}/blobs/{bench.largest_layer()}"
    bench.record("blob_warm", server, clients.curl_get(blob_url))
    if not direct:
        manifests(bench, server)
    bench.record("many_cold", server, clients.pull(server.host, _image(MANY), dest))
    if not direct:
        bench.record("many_warm", server, clients.pull(server.host, _image(MANY), dest))


def manifests(bench: Bench, server: Server) -> None:
    """Requests per second and p99 for cached manifests, by tag and by digest."""
    base = f"http://{server.host}/v2/{SMALL}/manifests"
    plan = bench.plan
    for by, reference in (("tag", TAG), ("digest", bench.images.small.digest)):
        url = f"{base}/{reference}"
        _request("GET", url)  # cached from here on
        get = clients.wrk_get(url, _ACCEPT, plan.connections, plan.load_seconds, bench.workdir)
        head = clients.ab_head(url, _ACCEPT, plan.connections, plan.load_seconds, bench.workdir)
        for method, result in (("GET", get), ("HEAD", head)):
            bench.record(f"manifest_{method}_{by}_rps", server, result.requests_per_second)
            bench.record(f"manifest_{method}_{by}_p99", server, result.p99_ms)


def cold_blob(bench: Bench, server: Server) -> None:
    """A HEAD and then a GET of a blob the cache does not hold."""
    if server.name == "direct":
        return
    server.reset()
    url = f"http://{server.host}/v2/{BIG}/blobs/{bench.largest_layer()}"
    bench.upstream.clear_requests()
    _request("HEAD", url)
    bench.record("blob_head_upstream", server, bench.served() / MiB)
    bench.record("blob_cold", server, clients.curl_get(url))


def concurrent_pulls(bench: Bench, server: Server) -> None:
    """Concurrent pulls, cold then warm: wall time, upstream bytes, peak memory."""
    server.reset()
    count, dest = bench.plan.concurrency, bench.scratch / "pulls"
    pids = server_pids(server)
    reset_peak(pids)
    bench.upstream.clear_requests()
    cold, failed = clients.pulls(server.host, _image(BIG), dest, count)
    bench.record("cold_pulls", server, cold)
    if server.name == "direct":
        return
    bench.record("cold_pulls_failed", server, failed)
    served = bench.served() / Images.size(bench.images.big)
    bench.record("cold_pulls_upstream", server, served)
    bench.record("cold_pulls_rss", server, peak_rss(pids) / MiB)
    reset_peak(pids)
    with cores_busy(pids) as busy:
        warm, failed = clients.pulls(server.host, _image(BIG), dest, count)
    bench.record("warm_pulls", server, warm)
    bench.record("warm_pulls_failed", server, failed)
    bench.record("warm_pulls_rss", server, peak_rss(pids) / MiB)
    bench.record("warm_pulls_client_cores", server, busy.clients)
    bench.record("warm_pulls_server_cores", server, busy.servers)


WORKLOADS: tuple[Callable[[Bench, Server], None], ...] = (
    pulls_and_blobs,
    cold_blob,
    concurrent_pulls,
)
