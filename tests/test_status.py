"""The status page and /status.json after real pulls, read by a script and by a real browser."""

from __future__ import annotations

import base64
import importlib.metadata
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from humanfriendly import format_size

from proxy.cache import open_cache
from proxy.metrics import Metrics
from proxy.pulls import PullCounter
from proxy.settings import Settings
from proxy.status import StatusCollector, SyncEntryStatus
from proxy.status_page import render
from tests.conftest import StartProxy
from tests.support import skopeo
from tests.support.images import Image, push, write_layout
from tests.support.ports import free_port
from tests.support.proxy import Proxy
from tests.support.registry import Registry

PASSWORD = "upstream-Pa55word-never-shown"
PULL_SECRET_PASSWORD = "pull-secret-Pa55word-never-shown"
MAX_SIZE = 64 * 1024**2
# What Docker Hub sends; distribution adds configured headers to every response.
RATE_LIMIT_HEADERS = {"RateLimit-Limit": ["100;w=21600"], "RateLimit-Remaining": ["76;w=21600"]}


@dataclass
class Pulled:
    """A cache that served `app` twice and `tool` once from `upstream`, and failed on `down`."""

    proxy: Proxy
    upstream: Registry
    app: Image
    tool: Image
    secrets: list[str]


def fetch_json(proxy: Proxy) -> tuple[str, dict[str, Any]]:
    status, headers, body = proxy.get("/status.json")
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    return body.decode(), json.loads(body)


def manifest_gets(proxy: Proxy, repository: str) -> int:
    """The pulls of test.local/`repository` that the cache answered."""
    return sum(
        1
        for entry in proxy.access_log()
        if entry["method"] == "GET"
        and entry["status"] == 200
        and entry["path"].startswith(f"/v2/test.local/{repository}/manifests/")
    )


@pytest.fixture
def pulled(tmp_path: Path, start_proxy: StartProxy) -> Iterator[Pulled]:
    with Registry(tmp_path / "hub", extra_config={"http": {"headers": RATE_LIMIT_HEADERS}}) as hub:
        app = write_layout(tmp_path / "app", "v1", None, [400_000, 90_000], seed=81)
        tool = write_layout(tmp_path / "tool", "v1", None, [30_000], seed=82)
        push(app, hub.host, "team/app")
        push(tool, hub.host, "team/tool")
        auth = base64.b64encode(f"robot:{PULL_SECRET_PASSWORD}".encode()).decode()
        pull_secret = tmp_path / "pull-secret.json"
        pull_secret.write_text(json.dumps({"auths": {"secret.example": {"auth": auth}}}))
        proxy = start_proxy(
            {
                "upstreams": [
                    {"name": "test.local", "url": hub.url, "username": "ci", "password": PASSWORD},
                    {"name": "down.local", "url": f"http://127.0.0.1:{free_port()}"},
                ],
                "default_upstream": "test.local",
                "cleaner": {"maxsize": MAX_SIZE, "threshold_percentage": 25},
            },
            env={"PULL_SECRET": str(pull_secret)},
        )
        for n, repository in enumerate(["app", "app", "tool"]):
            ref = f"docker://{proxy.host}/test.local/team/{repository}:v1"
            skopeo.copy(ref, f"dir:{tmp_path / f'copy{n}'}")
            proxy.settled()  # the second pull of app is served from the cache
        failed = skopeo.copy(
            f"docker://{proxy.host}/down.local/team/app:v1", f"dir:{tmp_path / 'x'}", check=False
        )
        assert failed.returncode != 0
        yield Pulled(proxy, hub, app, tool, [PASSWORD, PULL_SECRET_PASSWORD, auth])


def test_status_json_reports_what_the_pulls_did(pulled: Pulled) -> None:
    proxy, app, tool = pulled.proxy, pulled.app, pulled.tool
    text, status = fetch_json(proxy)

    cache = status["cache"]
    assert cache["size"] == app.pull_size + tool.pull_size
    assert cache["items"] == sum(len(i.blobs) + len(i.manifests) for i in (app, tool))
    assert cache["max_size"] == MAX_SIZE
    assert cache["high_water_mark"] == MAX_SIZE * 5 // 4
    assert (cache["evicted_bytes"], cache["evicted_items"]) == (0, 0)

    since_start = status["traffic"]["since_start"]
    assert since_start["bytes_from_upstream"] == app.total_blob_size + tool.total_blob_size
    assert since_start["bytes_from_cache"] == app.total_blob_size
    hits = sum(proxy.metric("cache_hits_total", f'kind="{k}"') for k in ("blob", "manifest"))
    misses = sum(proxy.metric("cache_misses_total", f'kind="{k}"') for k in ("blob", "manifest"))
    assert (since_start["hits"], since_start["misses"]) == (hits, misses)
    assert since_start["hit_ratio"] == pytest.approx(hits / (hits + misses))
    # A fresh process: the hour's baseline is the snapshot taken at start-up, all zeros.
    assert status["traffic"]["last_hour"] == since_start
    intervals = status["traffic"]["intervals"]
    assert sum(i["bytes_from_cache"] for i in intervals) == app.total_blob_size

    upstreams = {u["name"]: u for u in status["upstreams"]}
    assert set(upstreams) == {"test.local", "down.local", "secret.example"}
    hub = upstreams["test.local"]
    assert hub["url"] == pulled.upstream.url
    assert (hub["reachable"], hub["last_error"], hub["errors"]) == (True, None, 0)
    assert hub["credentials"] is True
    assert hub["requests"] >= manifest_gets(proxy, "team/app") + len(app.blobs)
    assert (hub["rate_limit"], hub["rate_limit_remaining"]) == (100, 76)
    down = upstreams["down.local"]
    assert down["reachable"] is False
    assert "Connect" in down["last_error"]
    assert down["errors"] >= 1 and down["last_success_at"] is None
    assert upstreams["secret.example"]["reachable"] is None

    top = [(r["upstream"], r["repository"], r["pulls"], r["size"]) for r in status["repositories"]]
    assert top[:2] == [
        ("test.local", "team/app", manifest_gets(proxy, "team/app"), app.pull_size),
        ("test.local", "team/tool", manifest_gets(proxy, "team/tool"), tool.pull_size),
    ]
    assert status["sync"] is None
    assert status["config"]["cleaner_max_size_bytes"] == MAX_SIZE
    assert status["version"] == importlib.metadata.version("registry-cache")
    for secret in pulled.secrets:
        assert secret not in text


def chromium(profile: Path, *args: str) -> str:
    """Headless Debian chromium, offline but for the loopback page it is given."""
    browser = shutil.which("chromium")
    assert browser is not None, "chromium is not installed (bash .ci/install)"
    done = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            f"--user-data-dir={profile}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stdout


def test_status_page_in_a_browser(tmp_path: Path, pulled: Pulled) -> None:
    proxy, app = pulled.proxy, pulled.app
    _, status = fetch_json(proxy)
    screenshot = tmp_path / "status.png"
    chromium(
        tmp_path / "profile", f"--screenshot={screenshot}", "--window-size=1280,1600", proxy.url
    )
    assert screenshot.stat().st_size > 10_000
    dom = chromium(tmp_path / "profile", "--dump-dom", f"{proxy.url}/status")

    cache = status["cache"]
    assert f"{cache['items']} items" in dom
    assert format_size(cache["size"], binary=True) in dom
    assert f"eviction starts at {format_size(MAX_SIZE * 5 // 4, binary=True)}" in dom
    ratio = status["traffic"]["since_start"]["hit_ratio"]
    assert f"{ratio:.1%}" in dom
    assert (
        f'<td>test.local/team/app</td><td class="n">{manifest_gets(proxy, "team/app")}</td>' in dom
    )
    assert f'<td class="n">{format_size(app.pull_size, binary=True)}</td>' in dom
    assert "76 of 100 left" in dom
    assert "unreachable" in dom and "reachable" in dom
    assert "no sync configured" in dom
    for secret in pulled.secrets:
        assert secret not in dom


def test_status_is_behind_client_auth(tmp_path: Path, start_proxy: StartProxy) -> None:
    hashed = bcrypt.hashpw(b"wonderland", bcrypt.gensalt(rounds=4)).decode()
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"alice:{hashed}\n")
    proxy = start_proxy({"auth": {"htpasswd": {"path": str(htpasswd)}}})
    credentials = {"Authorization": "Basic " + base64.b64encode(b"alice:wonderland").decode()}
    for path in ("/", "/status", "/status.json"):
        assert proxy.get(path)[0] == 401
        status, _, body = proxy.get(path, credentials)
        assert status == 200
        assert hashed.encode() not in body and str(htpasswd).encode() not in body
    assert proxy.get("/healthz")[0] == 200


async def test_sync_entries_come_from_the_sync_workers_hook(tmp_path: Path) -> None:
    settings = Settings(storage_root=tmp_path / "data")
    metrics = Metrics()
    now = time.time()
    entry = SyncEntryStatus(
        name="docker.io/library/alpine", last_run=now - 120, result="3 tags copied", next_run=None
    )
    async with open_cache(settings, metrics) as cache:
        collector = StatusCollector(settings, metrics, cache, PullCounter(), lambda: [entry])
        status = await collector.collect()
    assert status.sync == [entry]
    page = render(status)
    assert "<td>docker.io/library/alpine</td>" in page
    assert "<td>3 tags copied</td><td>not scheduled</td>" in page
