"""End to end: the disk budget, eviction, reconciliation, metrics and the admin commands."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from cleaner.service import Cleaner
from proxy.metadata import Candidate, ItemRecord, Metadata
from proxy.metrics import Metrics
from proxy.settings import CleanerSettings, ConfigError, load_settings
from proxy.store import BlobStore
from tests.conftest import StartProxy
from tests.support import skopeo
from tests.support.faulty import FaultyUpstream
from tests.support.images import Image, push, write_layout
from tests.support.proxy import Proxy
from tests.support.registry import Registry
from tests.support.standin import blob_files
from tests.support.wait import wait_for
from tests.test_pull import one_upstream

MiB = 1024 * 1024


def cache_for(start_proxy: StartProxy, registry: Registry, env: dict[str, str]) -> Proxy:
    config: dict[str, Any] = {
        "upstreams": [{"name": "test.local", "url": registry.url}],
        "default_upstream": "test.local",
    }
    return start_proxy(config, env)


def images(tmp_path: Path, registry: Registry, count: int, layer: int) -> list[Image]:
    made = []
    for index in range(count):
        image = write_layout(tmp_path / f"img{index}", "v1", None, [layer], seed=100 + index)
        push(image, registry.host, f"app{index}")
        made.append(image)
    return made


def pull(proxy: Proxy, index: int, dest: Path, check: bool = True) -> bool:
    """Pull an image, and wait until the cache has stored what it fetched (the order in which
    images were stored and used is what the cleaner goes by)."""
    ref = f"docker://{proxy.host}/test.local/app{index}:v1"
    pulled = skopeo.copy(ref, f"dir:{dest}", check=check, timeout=60).returncode == 0
    proxy.settled()
    return pulled


def held(image: Image, data: Path) -> bool:
    return {d.removeprefix("sha256:") for d in image.blobs} <= blob_files(data)


def test_lru_eviction_keeps_the_recently_used_image(
    tmp_path: Path, upstream: Registry, start_proxy: StartProxy
) -> None:
    a, b, c = images(tmp_path, upstream, 3, MiB)
    env = {"CLEANER_MAXSIZE": "2.5M", "CLEANER_THRESHOLD_PERCENTAGE": "20"}
    proxy = cache_for(start_proxy, upstream, env)
    pull(proxy, 0, tmp_path / "a1")
    pull(proxy, 1, tmp_path / "b1")
    pull(proxy, 0, tmp_path / "a2")  # A is used again: B is now the least recently used
    pull(proxy, 2, tmp_path / "c1")  # past the high-water mark: the cleaner runs at once

    wait_for(lambda: proxy.metric("evicted_items_total") > 0, "an eviction", timeout=20.0)
    wait_for(
        lambda: proxy.metric("cache_size_bytes") <= 2.5 * MiB, "the cache to shrink", timeout=20.0
    )
    assert held(a, proxy.data) and held(c, proxy.data)
    assert not held(b, proxy.data)

    upstream.stop()
    assert pull(proxy, 0, tmp_path / "a3")
    assert pull(proxy, 2, tmp_path / "c3")
    assert not pull(proxy, 1, tmp_path / "b3", check=False)
    proxy.stop()
    du = proxy.admin("du")
    assert du.returncode == 0, du.stderr
    sizes = {line.split()[0]: line.split()[1:3] for line in du.stdout.splitlines() if line}
    assert sizes["test.local/app0"] == ["1.01", "MiB"]
    assert sizes.get("test.local/app1", ["0", "bytes"])[1] == "bytes"


def test_threshold_and_clean_command(
    tmp_path: Path, upstream: Registry, start_proxy: StartProxy
) -> None:
    images(tmp_path, upstream, 3, MiB)
    proxy = cache_for(
        start_proxy, upstream, {"CLEANER_MAXSIZE": "2M", "CLEANER_THRESHOLD_PERCENTAGE": "100"}
    )
    for index in range(3):
        pull(proxy, index, tmp_path / f"p{index}")
    proxy.stop()
    before = blob_files(proxy.data)

    below = proxy.admin("clean")
    assert below.returncode == 0 and "nothing to do" in below.stdout
    dry = proxy.admin("clean", "--dry-run", "--max-size", "1M")
    assert dry.returncode == 0 and "would evict" in dry.stdout
    assert blob_files(proxy.data) == before

    proxy.env["CLEANER_THRESHOLD_PERCENTAGE"] = "20"
    cleaned = proxy.admin("clean")
    assert cleaned.returncode == 0 and "evicted" in cleaned.stdout
    assert blob_files(proxy.data) < before
    total = sum(p.stat().st_size for p in (proxy.data / "blobs").rglob("*") if p.is_file())
    assert total <= 2 * MiB


def test_parked_partial_downloads_count_against_the_budget_and_go_first(
    tmp_path: Path, upstream: Registry, start_proxy: StartProxy
) -> None:
    (image,) = images(tmp_path, upstream, 1, MiB)
    env = {"CLEANER_MAXSIZE": "4M", "CLEANER_THRESHOLD_PERCENTAGE": "20"}
    proxy = cache_for(start_proxy, upstream, env)
    # What a cut download leaves behind: the start of a blob, parked under its digest.
    parked = proxy.data / "partial" / f"sha256-{'7' * 64}"
    parked.write_bytes(os.urandom(8 * MiB))

    # 1 MiB of image and 8 MiB parked pass the 4.8 MiB high-water mark: the parked bytes go,
    # and the verified image, within the budget on its own, stays.
    pull(proxy, 0, tmp_path / "first")
    wait_for(lambda: not parked.exists(), "the cleaner to drop the parked partial download")
    # A blob is committed to the store just after its last byte went to the client.
    wait_for(lambda: held(image, proxy.data), "the pulled image to be stored")
    assert proxy.metric("evicted_items_total") == 0


def test_the_clean_command_leaves_the_servers_working_files_alone(
    tmp_path: Path, start_proxy: StartProxy
) -> None:
    image = write_layout(tmp_path / "layout", "v1", None, [4 * MiB], seed=111)
    (layer,) = image.layers
    path = f"/v2/test.local/app/blobs/{layer}"
    faulty = FaultyUpstream(image, "app")
    with faulty:
        proxy = start_proxy(one_upstream(faulty))
        faulty.cut_after[layer] = MiB
        connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=60)
        connection.request("GET", path)
        with pytest.raises(http.client.IncompleteRead):
            connection.getresponse().read()
        connection.close()
        parked = proxy.data / "partial" / layer.replace(":", "-")
        wait_for(parked.exists, "the cut download to be parked")

        # The next request resumes into the parked file, and stalls there.
        faulty.stall_after[layer] = MiB
        connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=60)
        connection.request("GET", path)
        assert connection.getresponse().status == 200
        cleaned = proxy.admin("clean", "--max-size", "1")
        assert cleaned.returncode == 0, cleaned.stderr
        assert parked.exists() and "partial" not in cleaned.stdout
        connection.close()


def test_a_download_in_flight_makes_room_before_it_lands(
    tmp_path: Path, start_proxy: StartProxy
) -> None:
    image = write_layout(tmp_path / "layout", "v1", None, [4 * MiB], seed=110)
    (config,) = image.configs
    (layer,) = image.layers
    env = {
        "CLEANER_MAXSIZE": "3M",
        "CLEANER_THRESHOLD_PERCENTAGE": "20",
        "CLEANER_RUNEVERY_TIME": "1h",
    }
    faulty = FaultyUpstream(image, "app")
    with faulty:
        proxy = start_proxy(one_upstream(faulty), env)
        assert proxy.get("/v2/test.local/app/manifests/v1")[0] == 200
        assert proxy.get(f"/v2/test.local/app/blobs/{config}")[0] == 200
        wait_for(lambda: config.removeprefix("sha256:") in blob_files(proxy.data), "the config")
        assert proxy.metric("evicted_items_total") == 0

        # The layer's 4 MiB pass the 3.6 MiB high-water mark as soon as its size is known:
        # the cleaner makes room then, not once the layer is in (it never is: it stalls).
        faulty.stall_after[layer] = MiB
        connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=60)
        connection.request("GET", f"/v2/test.local/app/blobs/{layer}")
        assert connection.getresponse().status == 200
        wait_for(lambda: proxy.metric("evicted_items_total") == 2, "the manifest and config to go")
        assert proxy.metric("inflight_downloads") == 1
        assert blob_files(proxy.data) == set()
        connection.close()


async def test_the_cleaner_outlives_a_failed_database_read(
    tmp_path: Path, metadata: Metadata, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = CleanerSettings(max_size=1000, run_every=3600)
    cleaner = Cleaner(settings, BlobStore(tmp_path), metadata)
    read_totals = metadata.totals
    reads = 0
    recovered = asyncio.Event()

    async def locked_once() -> tuple[int, int]:
        nonlocal reads
        reads += 1
        if reads == 1:
            raise sqlite3.OperationalError("database is locked")
        recovered.set()
        return await read_totals()

    monkeypatch.setattr(metadata, "totals", locked_once)
    serving = asyncio.create_task(cleaner.serve())
    waiting = asyncio.ensure_future(recovered.wait())
    try:
        cleaner.make_room(10)  # the disk needs room: retried every second until it is made
        await asyncio.wait({serving, waiting}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        assert not serving.done(), serving.exception()
        assert recovered.is_set()
    finally:
        serving.cancel()
        waiting.cancel()


async def test_a_download_landing_during_a_pass_counts_once(
    tmp_path: Path, metadata: Metadata, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass started for a download in flight must not count it twice when it lands during
    the pass (as the items' total, and in the room kept for it): that evicted a used image."""
    older, newer, landing = (f"sha256:{hex_digit * 64}" for hex_digit in "abc")
    for digest in (older, newer):
        await metadata.add_item(ItemRecord(digest, "blob", 1050, None), None)
    in_flight = {landing: 1050}
    metrics = Metrics()
    settings = CleanerSettings(max_size=2500, threshold_percentage=20, run_every=3600)
    cleaner = Cleaner(
        settings,
        BlobStore(tmp_path / "store"),
        metadata,
        incoming=lambda: sum(in_flight.values()),
        metrics=metrics,
    )
    flush = metadata.flush_access_times

    async def land_then_flush() -> int:
        if landing in in_flight:  # the first flush is the pass's
            size = in_flight.pop(landing)
            await metadata.add_item(ItemRecord(landing, "blob", size, None), None)
        return await flush()

    monkeypatch.setattr(metadata, "flush_access_times", land_then_flush)
    serving = asyncio.create_task(cleaner.serve())
    try:
        cleaner.nudge()  # 2,100 stored and 1,050 incoming pass the 3,000-byte mark
        for _ in range(1000):
            if metrics.registry.get_sample_value("registry_cache_cleaner_runs_total"):
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("no cleaner pass")
        remaining = {item.digest for item in await metadata.items()}
        assert remaining == {newer, landing}
    finally:
        serving.cancel()


async def test_an_image_pulled_while_a_pass_evicts_it_is_left_whole(
    tmp_path: Path, metadata: Metadata, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass chooses its victims once and evicts them one by one; a client that starts
    pulling one of those images meanwhile must find all of it, layers not yet asked for too."""
    manifest, layer = f"sha256:{'e' * 64}", f"sha256:{'f' * 64}"
    await metadata.add_item(ItemRecord(layer, "blob", 1000, None), None)
    await metadata.add_item(ItemRecord(manifest, "manifest", 100, None), None, [layer])
    cleaner = Cleaner(CleanerSettings(max_size=10_000), BlobStore(tmp_path / "store"), metadata)
    choose = metadata.eviction_candidates

    async def chosen_then_pulled() -> list[Candidate]:
        chosen = await choose()
        metadata.touch(manifest)  # a client asks for the image now
        return chosen

    monkeypatch.setattr(metadata, "eviction_candidates", chosen_then_pulled)
    report = await cleaner.clean(max_size=0)
    assert report.victims == []
    assert {item.digest for item in await metadata.items()} == {manifest, layer}


def test_eviction_racing_a_reader_never_gives_a_short_200(
    tmp_path: Path, upstream: Registry, start_proxy: StartProxy
) -> None:
    (big,) = images(tmp_path, upstream, 1, 32 * MiB)
    proxy = cache_for(start_proxy, upstream, {"CLEANER_MAXSIZE": "1G"})
    pull(proxy, 0, tmp_path / "warm")
    layer = big.layers[0]

    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=60)
    connection.request("GET", f"/v2/test.local/app0/blobs/{layer}")
    response = connection.getresponse()
    assert response.status == 200
    first = response.read(MiB)
    evicted = proxy.admin("clean", "--max-size", "1")  # another process removes every file
    assert evicted.returncode == 0, evicted.stderr
    assert layer.removeprefix("sha256:") not in blob_files(proxy.data)
    rest = response.read()
    connection.close()
    assert hashlib.sha256(first + rest).hexdigest() == layer.removeprefix("sha256:")

    upstream.stop()
    status, _, body = proxy.get(f"/v2/test.local/app0/blobs/{layer}")
    assert status == 503
    assert json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"


def test_tags_keep_working_after_a_clean_beside_the_server(
    tmp_path: Path, upstream: Registry, start_proxy: StartProxy
) -> None:
    (image,) = images(tmp_path, upstream, 1, 10_000)
    proxy = start_proxy(one_upstream(upstream, manifest_ttl=0))
    path = "/v2/test.local/app0/manifests/v1"
    for _ in range(2):  # fetched, then read back: the server keeps it in memory
        assert proxy.get(path)[0] == 200
    evicted = proxy.admin("clean", "--max-size", "1")  # another process removes every file
    assert evicted.returncode == 0, evicted.stderr

    # The server's copy in memory is stored again to point the revalidated tag at it.
    for _ in range(2):
        status, headers, body = proxy.get(path)
        assert (status, headers["Docker-Content-Digest"], body) == (200, image.digest, image.raw)
    assert image.digest.removeprefix("sha256:") in blob_files(proxy.data)


def test_restart_reconciles_disk_and_database(
    tmp_path: Path, upstream: Registry, start_proxy: StartProxy
) -> None:
    first, _ = images(tmp_path, upstream, 2, 200_000)
    proxy = cache_for(start_proxy, upstream, {})
    pull(proxy, 0, tmp_path / "p0")
    pull(proxy, 1, tmp_path / "p1")
    proxy.stop()
    blobs = proxy.data / "blobs" / "sha256"
    lost = first.layers[0].removeprefix("sha256:")
    (blobs / lost[:2] / lost).unlink()
    half = proxy.data / "tmp" / "interrupted.part"
    half.write_bytes(b"half a download")
    forged = "ab" * 32
    (blobs / "ab").mkdir(exist_ok=True)
    (blobs / "ab" / forged).write_bytes(b"not what the name says")
    stray = blobs / "zz-not-a-digest"
    stray.write_bytes(b"junk")
    adopted = hashlib.sha256(b"a verified orphan").hexdigest()
    (blobs / adopted[:2]).mkdir(exist_ok=True)
    (blobs / adopted[:2] / adopted).write_bytes(b"a verified orphan")

    proxy.start()
    assert not half.exists() and not stray.exists()
    assert forged not in blob_files(proxy.data)
    assert adopted in blob_files(proxy.data)
    # Adopted, but given to no repository the upstream does not say has it.
    status, _, body = proxy.get(f"/v2/test.local/app1/blobs/sha256:{adopted}")
    assert (status, json.loads(body)["errors"][0]["code"]) == (404, "BLOB_UNKNOWN")
    assert pull(proxy, 1, tmp_path / "again")
    proxy.stop()
    listing = proxy.admin("ls", "test.local")
    assert listing.returncode == 0
    assert "test.local/app0:v1" in listing.stdout and "test.local/app1:v1" in listing.stdout
    verify = proxy.admin("verify")
    assert verify.returncode == 0 and "0 corrupt" in verify.stdout


def damage(database: Path, how: str) -> None:
    """Garbage in place of the whole file, or only past its header page."""
    if how == "garbage":
        database.write_bytes(os.urandom(64 * 1024))
        return
    with open(database, "r+b") as file:
        file.seek(4096)
        file.write(os.urandom(database.stat().st_size - 4096))


@pytest.mark.parametrize("how", ["garbage", "damaged pages"])
def test_a_corrupt_database_is_set_aside_and_rebuilt_from_the_store(
    tmp_path: Path, upstream: Registry, start_proxy: StartProxy, how: str
) -> None:
    (image,) = images(tmp_path, upstream, 1, 200_000)
    proxy = cache_for(start_proxy, upstream, {})
    pull(proxy, 0, tmp_path / "p0")
    wait_for(lambda: held(image, proxy.data), "the image to be stored")
    proxy.stop()
    damage(proxy.data / "metadata.db", how)

    proxy.start()
    assert len(list(proxy.data.glob("metadata.db.corrupt-*"))) == 1
    assert "the metadata database is corrupt" in proxy.log()
    # Every stored file verified and was adopted: served, and counted, as before.
    files = [path for path in (proxy.data / "blobs").rglob("*") if path.is_file()]
    assert proxy.metric("cache_items") == len(files) == len(image.blobs) + 1
    assert proxy.metric("cache_size_bytes") == sum(path.stat().st_size for path in files)
    # Which repository had them went with the database: each is confirmed once with a HEAD
    # (never fetched again), then served with the upstream stopped too.
    upstream.clear_requests()
    for digest in image.blobs:
        assert proxy.get(f"/v2/test.local/app0/blobs/{digest}")[0] == 200
        assert upstream.blob_gets(digest) == 0
    upstream.stop()
    for digest in image.blobs:
        assert proxy.get(f"/v2/test.local/app0/blobs/{digest}")[0] == 200


def test_metrics_count_miss_then_hit_and_bytes(
    tmp_path: Path, upstream: Registry, start_proxy: StartProxy
) -> None:
    (image,) = images(tmp_path, upstream, 1, 300_000)
    proxy = cache_for(start_proxy, upstream, {})
    layer = image.layers[0]
    size = image.blobs[layer]

    assert proxy.get(f"/v2/test.local/app0/blobs/{layer}")[0] == 200
    assert proxy.metric("cache_misses_total", 'kind="blob"') == 1
    assert proxy.metric("served_bytes_total", 'source="upstream"') == size
    # The blob is stored just after its last byte went to the client; until then, a request
    # joins the download.
    wait_for(lambda: layer.removeprefix("sha256:") in blob_files(proxy.data), "the blob to land")
    assert proxy.get(f"/v2/test.local/app0/blobs/{layer}")[0] == 200
    assert proxy.metric("cache_hits_total", 'kind="blob"') == 1
    assert proxy.metric("served_bytes_total", 'source="cache"') == size
    assert proxy.metric("upstream_requests_total", 'status="200",upstream="test.local"') == 1
    assert proxy.metric("cache_max_bytes") == 10 * 1024**3
    assert proxy.get("/healthz")[0] == 200
    assert json.loads(proxy.get("/readyz")[2])["status"] == "ok"


def test_verify_finds_and_repairs_corruption(
    tmp_path: Path, upstream: Registry, start_proxy: StartProxy
) -> None:
    (image,) = images(tmp_path, upstream, 1, 100_000)
    proxy = cache_for(start_proxy, upstream, {})
    pull(proxy, 0, tmp_path / "p")
    proxy.stop()
    layer = image.layers[0].removeprefix("sha256:")
    (proxy.data / "blobs" / "sha256" / layer[:2] / layer).write_bytes(b"bit rot")

    found = proxy.admin("verify")
    assert found.returncode == 1 and f"corrupt: sha256:{layer}" in found.stdout
    repaired = proxy.admin("verify", "--repair")
    assert repaired.returncode == 0
    assert layer not in blob_files(proxy.data)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"CLEANER_MAXSIZE": "10G"}, ("max_size", 10 * 1024**3)),
        ({"CLEANER_MAXSIZE": "500M"}, ("max_size", 500 * 1024**2)),
        ({"CLEANER_MAXSIZE": "10GiB"}, ("max_size", 10 * 1024**3)),
        ({"CLEANER_MAXSIZE": "1.5T"}, ("max_size", int(1.5 * 1024**4))),
        ({"CLEANER_THRESHOLD_PERCENTAGE": "20"}, ("threshold_percentage", 20.0)),
        ({"CLEANER_RUNEVERY_TIME": "1h2m3s"}, ("run_every", 3723.0)),
        ({"CLEANER_RUNEVERY_TIME": "45s"}, ("run_every", 45.0)),
    ],
)
def test_cleaner_environment_in_the_old_stack_format(
    env: dict[str, str], expected: tuple[str, float]
) -> None:
    field, value = expected
    assert getattr(load_settings(None, env).cleaner, field) == value


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CLEANER_MAXSIZE", "ten"),
        ("CLEANER_THRESHOLD_PERCENTAGE", "-5"),
        ("CLEANER_RUNEVERY_TIME", "0"),
        ("CLEANER_RUNEVERY_TIME", "soon"),
    ],
)
def test_bad_cleaner_values_stop_start_up_naming_the_variable(
    tmp_path: Path, variable: str, value: str
) -> None:
    with pytest.raises(ConfigError, match=variable):
        load_settings(None, {variable: value})
    started = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "serve"],
        env={"PATH": "/usr/bin:/bin", variable: value},
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
        check=False,
    )
    assert started.returncode == 2
    assert variable in started.stderr


@pytest.mark.parametrize("command", ["du", "ls", "clean", "verify"])
def test_admin_commands_refuse_a_data_directory_that_does_not_exist(
    tmp_path: Path, command: str
) -> None:
    proxy = Proxy(tmp_path / "elsewhere", {})
    proxy.config_path.write_text(yaml.safe_dump(proxy.config))
    refused = proxy.admin(command)
    assert refused.returncode == 2
    assert f"data directory {proxy.data} does not exist" in refused.stderr
    assert not proxy.data.exists()
