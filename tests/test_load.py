"""Load: hundreds of concurrent connections pulling cached and uncached blobs for a while.

Every transfer is verified against its digest; the cache's peak RSS is reported (and bounded).
`LOAD_SECONDS` sets the duration (default 60) and `LOAD_REPORT` a file for the figures.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

from bench.rss import peak_rss
from tests.conftest import StartProxy
from tests.support import skopeo
from tests.support.images import Image, push, write_layout
from tests.support.proxy import Proxy
from tests.support.registry import Registry

CONNECTIONS = 200
DURATION = float(os.environ.get("LOAD_SECONDS", "60"))
PEAK_RSS_LIMIT = 256 * 1024 * 1024


@dataclass
class Tally:
    transfers: int = 0
    verified: int = 0
    bytes: int = 0
    errors: list[str] = field(default_factory=list)


async def _worker(
    session: aiohttp.ClientSession, base: str, blobs: list[str], deadline: float, tally: Tally
) -> None:
    chooser = random.Random(id(tally) ^ hash(asyncio.current_task()))
    while time.monotonic() < deadline:
        digest = chooser.choice(blobs)
        try:
            async with session.get(f"{base}/blobs/{digest}") as response:
                body = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            tally.errors.append(f"{digest}: {type(exc).__name__}: {exc}")
            continue
        tally.transfers += 1
        tally.bytes += len(body)
        if status != 200:
            tally.errors.append(f"{digest}: status {status}")
        elif hashlib.sha256(body).hexdigest() == digest.removeprefix("sha256:"):
            tally.verified += 1
        else:
            tally.errors.append(f"{digest}: corrupt body")


async def _load(proxy: Proxy, repository: str, blobs: list[str]) -> Tally:
    tally = Tally()
    connector = aiohttp.TCPConnector(limit=CONNECTIONS)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        deadline = time.monotonic() + DURATION
        base = f"{proxy.url}/v2/test.local/{repository}"
        await asyncio.gather(
            *(_worker(session, base, blobs, deadline, tally) for _ in range(CONNECTIONS))
        )
    return tally


def test_two_hundred_connections_pulling_a_mix(
    tmp_path: Path, upstream: Registry, start_proxy: StartProxy
) -> None:
    cached: Image = write_layout(tmp_path / "cached", "v1", None, [2 * 1024 * 1024] * 4, seed=70)
    cold: Image = write_layout(tmp_path / "cold", "v2", None, [3 * 1024 * 1024] * 6, seed=71)
    push(cached, upstream.host, "load/app")
    push(cold, upstream.host, "load/app")
    proxy = start_proxy(
        {
            "upstreams": [{"name": "test.local", "url": upstream.url}],
            "default_upstream": "test.local",
            "log": {"access": False},
        }
    )
    skopeo.copy(f"docker://{proxy.host}/test.local/load/app:v1", f"dir:{tmp_path / 'warm'}")
    blobs = list(cached.blobs) + list(cold.blobs)

    tally = asyncio.run(_load(proxy, "load/app", blobs))

    assert proxy.pid is not None
    rss = peak_rss([proxy.pid])
    assert rss > 0, "no VmHWM"
    figures = {**asdict(tally), "errors": len(tally.errors), "peak_rss": rss, "seconds": DURATION}
    if report := os.environ.get("LOAD_REPORT"):
        Path(report).write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures))
    assert tally.errors == []
    assert tally.transfers > CONNECTIONS and tally.verified == tally.transfers
    for blob in cold.blobs:
        assert upstream.blob_gets(blob) == 1, "each cold blob came from the upstream once"
    assert rss < PEAK_RSS_LIMIT, f"peak RSS {rss / 2**20:.0f} MiB"
