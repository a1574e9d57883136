"""Faults: cut and stalled transfers, error answers, token expiry, crashes, a full disk, and
clients that leave. Nothing may be lost, nothing partial may be served as complete."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import json
import os
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.metadata import ItemRecord, Metadata
from tests.conftest import CREDS, StartProxy
from tests.support import skopeo
from tests.support.faulty import FaultyUpstream
from tests.support.images import Image, push, write_layout
from tests.support.proxy import Proxy
from tests.support.registry import Registry
from tests.support.standin import blob_files
from tests.support.tokenserver import TokenServer
from tests.support.wait import wait_for
from tests.test_pull import one_upstream

MiB = 1024 * 1024


def fetch(proxy: Proxy, path: str, timeout: float = 60) -> tuple[int, bytes]:
    """A GET that reports a cut transfer as an exception instead of a short body."""
    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def blob_path(digest: str) -> str:
    return f"/v2/test.local/faulty/app/blobs/{digest}"


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    return write_layout(tmp_path_factory.mktemp("layout"), "v1", None, [4 * MiB], seed=50)


@pytest.fixture
def faulty(image: Image) -> Iterator[FaultyUpstream]:
    stand_in = FaultyUpstream(image, "faulty/app")
    with stand_in:
        yield stand_in


def resumed_from(faulty: FaultyUpstream) -> int:
    """Where the one ranged request started: where the kept bytes end. That is at most the
    cut; a little before it when aiohttp drops what it had buffered on seeing the cut."""
    (requested,) = faulty.ranges
    start, dash, end = requested.removeprefix("bytes=").partition("-")
    assert dash and not end
    return int(start)


@pytest.mark.parametrize("restart", [False, True], ids=["same-process", "after-restart"])
def test_cut_transfer_fails_the_client_and_the_next_one_resumes(
    image: Image, faulty: FaultyUpstream, start_proxy: StartProxy, restart: bool
) -> None:
    layer = image.layers[0]
    faulty.cut_after[layer] = MiB + 123
    proxy = start_proxy(one_upstream(faulty))

    with pytest.raises(http.client.IncompleteRead):
        fetch(proxy, blob_path(layer))
    proxy.settled()
    assert layer.removeprefix("sha256:") not in blob_files(proxy.data)
    if restart:
        # The first bytes wait in partial/, under the blob's digest, for the next process.
        proxy.stop()
        assert [p.name for p in (proxy.data / "partial").iterdir()] == [layer.replace(":", "-")]
        proxy.start()

    status, body = fetch(proxy, blob_path(layer))
    assert status == 200
    assert hashlib.sha256(body).hexdigest() == layer.removeprefix("sha256:")
    assert 0 < resumed_from(faulty) <= MiB + 123
    # The store commit follows the last byte sent to the client.
    wait_for(lambda: layer.removeprefix("sha256:") in blob_files(proxy.data), "the blob to land")
    assert list((proxy.data / "tmp").iterdir()) == []
    assert list((proxy.data / "partial").iterdir()) == []


def open_descriptors(proxy: Proxy) -> int:
    assert proxy.pid is not None
    return len(os.listdir(f"/proc/{proxy.pid}/fd"))


def test_stalled_upstream_fails_waiting_clients_and_leaves_nothing_behind(
    image: Image, faulty: FaultyUpstream, start_proxy: StartProxy
) -> None:
    layer = image.layers[0]
    faulty.stall_after[layer] = 0
    proxy = start_proxy({**one_upstream(faulty), "upstream_timeouts": {"read": "1s"}})
    fetch(proxy, "/v2/")
    baseline = open_descriptors(proxy)

    for _ in range(2):
        # The read timeout is 1 s (plus retries); a client that waits 30 s would see a hang.
        with pytest.raises((http.client.IncompleteRead, ConnectionError)):
            fetch(proxy, blob_path(layer), timeout=30)

    wait_for(lambda: proxy.metric("inflight_downloads") == 0, "the download to be dropped")
    assert list((proxy.data / "tmp").iterdir()) == []
    # The server closes a finished connection's socket a moment after the client has gone.
    wait_for(lambda: open_descriptors(proxy) <= baseline, "descriptors back to the baseline")


@pytest.mark.parametrize(
    ("statuses", "client_status", "upstream_calls"),
    [
        ([503], 200, 2),  # retried, then served
        ([502, 504], 200, 3),
        ([503, 503, 503], 503, 3),  # retries exhausted
        ([500], 503, 1),  # not retried: a 500 is no passing fault
        ([429], 429, 1),
    ],
)
def test_upstream_error_statuses(
    image: Image,
    faulty: FaultyUpstream,
    start_proxy: StartProxy,
    statuses: list[int],
    client_status: int,
    upstream_calls: int,
) -> None:
    proxy = start_proxy(one_upstream(faulty))
    faulty.statuses.extend(statuses)
    path = f"/v2/test.local/faulty/app/manifests/{image.digest}"

    status, headers, body = proxy.get(path)

    assert status == client_status
    assert faulty.requests[("GET", f"/v2/faulty/app/manifests/{image.digest}")] == upstream_calls
    if status == 429:
        assert headers["Retry-After"] == "7"
        assert json.loads(body)["errors"][0]["code"] == "TOOMANYREQUESTS"
    elif status == 503:
        assert json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"


@pytest.mark.parametrize(
    ("upstream_status", "refusal"),
    [
        (503, None),
        (500, None),
        (429, None),
        (401, "DENIED"),
        (403, "DENIED"),
        (404, "MANIFEST_UNKNOWN"),
    ],
)
def test_a_stale_tag_stands_in_only_while_the_upstream_errs(
    image: Image,
    faulty: FaultyUpstream,
    start_proxy: StartProxy,
    upstream_status: int,
    refusal: str | None,
) -> None:
    """Served while the upstream is down or rate-limiting; not once it refuses the tag (the
    repository turned private, or was deleted)."""
    proxy = start_proxy(one_upstream(faulty, manifest_ttl=0))
    path = "/v2/test.local/faulty/app/manifests/v1"
    assert proxy.get(path)[0] == 200
    faulty.statuses.extend([upstream_status] * 8)

    for _ in range(2):
        status, headers, body = proxy.get(path)
        if refusal is None:
            assert (status, headers["Docker-Content-Digest"], body) == (
                200,
                image.digest,
                image.raw,
            )
        else:
            assert (status, json.loads(body)["errors"][0]["code"]) == (
                404 if refusal == "MANIFEST_UNKNOWN" else 403,
                refusal,
            )
    assert ("serving cached content" in proxy.log()) == (refusal is None)


def test_a_repository_its_upstream_refuses_loses_what_it_was_granted(
    image: Image, faulty: FaultyUpstream, start_proxy: StartProxy
) -> None:
    """A repository turned private is not served by digest either: what it pulled is asked
    about again."""
    proxy = start_proxy(one_upstream(faulty, manifest_ttl=0))
    layer = image.layers[0]
    assert proxy.get("/v2/test.local/faulty/app/manifests/v1")[0] == 200
    assert proxy.get(blob_path(layer))[0] == 200
    wait_for(lambda: layer.removeprefix("sha256:") in blob_files(proxy.data), "the layer stored")

    faulty.statuses.extend([403] * 8)
    assert proxy.get("/v2/test.local/faulty/app/manifests/v1")[0] == 403
    status, _, body = proxy.get(blob_path(layer))
    assert (status, json.loads(body)["errors"][0]["code"]) == (403, "DENIED")


async def test_a_refusal_outranks_a_confirmation_already_under_way(
    tmp_path: Path, metadata: Metadata
) -> None:
    """A grant (a HEAD's confirmation) whose database work was queued just before a revoke
    must not add itself back after the revoke: the repository stays refused."""
    digest = f"sha256:{'d' * 64}"
    await metadata.add_item(ItemRecord(digest, "blob", 10, None), None)
    await asyncio.gather(
        metadata.hold("test.local", "app", digest), metadata.revoke("test.local", "app")
    )
    assert not metadata.granted("test.local", "app", digest)
    await metadata.close()
    reopened = Metadata(metadata.path)
    await reopened.open()
    try:
        assert not reopened.granted("test.local", "app", digest)
    finally:
        await reopened.close()


def test_redirect_to_a_failing_blob_store(
    image: Image, faulty: FaultyUpstream, start_proxy: StartProxy
) -> None:
    storage = FaultyUpstream(image, "faulty/app")
    with storage:
        storage.statuses.extend([500])
        faulty.blob_redirect = storage.url
        proxy = start_proxy(one_upstream(faulty))
        status, _, body = proxy.get(blob_path(image.layers[0]))
    assert status == 503
    assert json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"
    assert storage.requests[("GET", f"/v2/faulty/app/blobs/{image.layers[0]}")] == 1


def test_token_refused_after_expiry_is_fetched_again(
    tmp_path: Path,
    token_server: TokenServer,
    token_upstream: Registry,
    start_proxy: StartProxy,
) -> None:
    first = write_layout(tmp_path / "a", "v1", None, [10_000], seed=51)
    second = write_layout(tmp_path / "b", "v2", None, [10_000], seed=52)
    push(first, token_upstream.host, "private/app", creds=CREDS)
    push(second, token_upstream.host, "private/app", creds=CREDS)
    # Tokens claim 300 s but really expire at once; distribution allows 60 s of clock skew,
    # so they are honoured for 5 s (time enough for a retry on a loaded machine). The cache
    # will hold one past its expiry.
    token_server.expires_in = -55
    token_server.claimed_expires_in = 300
    proxy = start_proxy(one_upstream(token_upstream, username="alice", password="wonderland"))
    base = "/v2/test.local/private/app/manifests"
    assert proxy.get(f"{base}/v1")[0] == 200
    issued = token_server.issued

    token = token_server.issue("alice", ["repository:private/app:pull"])

    def refused() -> bool:
        request = urllib.request.Request(
            f"{token_upstream.url}/v2/private/app/tags/list",
            headers={"Authorization": f"Bearer {token}"},
        )
        try:
            urllib.request.urlopen(request, timeout=5).close()
        except urllib.error.HTTPError as error:
            error.close()
            return error.code == 401
        return False

    wait_for(refused, "a token of this age to be refused")
    status, headers, _ = proxy.get(f"{base}/v2")
    assert (status, headers["Docker-Content-Digest"]) == (200, second.digest)
    assert token_server.issued > issued


def test_kill_9_during_downloads_then_restart(
    tmp_path: Path, upstream: Registry, start_proxy: StartProxy
) -> None:
    image = write_layout(tmp_path / "big", "v1", None, [8 * MiB] * 10, seed=53)
    push(image, upstream.host, "many/layers")
    proxy = start_proxy(one_upstream(upstream))
    connections = []
    for layer in image.layers:
        connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=60)
        connection.request("GET", f"/v2/test.local/many/layers/blobs/{layer}")
        response = connection.getresponse()
        assert response.status == 200
        response.read(64 * 1024)  # the download is under way
        connections.append((connection, response))

    proxy.kill()
    for connection, response in connections:
        with pytest.raises((http.client.IncompleteRead, ConnectionError)):
            response.read()
        connection.close()

    proxy.start()
    assert list((proxy.data / "tmp").iterdir()) == []
    for path in (proxy.data / "blobs").rglob("*"):
        if path.is_file():
            assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name
    skopeo.copy(f"docker://{proxy.host}/test.local/many/layers:v1", f"dir:{tmp_path / 'out'}")
    assert skopeo.read_dir_copy(tmp_path / "out").blobs == image.blobs
    proxy.stop()
    verified = proxy.admin("verify")
    assert verified.returncode == 0 and "0 corrupt" in verified.stdout


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs: a disk that really fills up."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_streams_without_caching_and_the_cleaner_makes_room(
    tmp_path: Path, upstream: Registry, start_proxy: StartProxy, small_disk: Path
) -> None:
    image = write_layout(tmp_path / "big", "v1", None, [9 * MiB, 9 * MiB, 9 * MiB], seed=54)
    push(image, upstream.host, "big/app")
    proxy = start_proxy({**one_upstream(upstream), "storage": {"root": str(small_disk)}})
    ref = f"docker://{proxy.host}/test.local/big/app:v1"

    first = skopeo.copy(ref, f"dir:{tmp_path / 'first'}", check=False)
    # The third layer does not fit: that transfer is cut, never completed with bad bytes.
    assert first.returncode != 0
    status, _, body = proxy.get("/readyz")
    assert status == 503 and b"disk is full" in body

    skopeo.copy(ref, f"dir:{tmp_path / 'second'}")
    assert skopeo.read_dir_copy(tmp_path / "second").blobs == image.blobs
    wait_for(lambda: proxy.metric("evicted_items_total") > 0, "the cleaner to make room")
    proxy.stop()
    verified = proxy.admin("verify")
    assert verified.returncode == 0 and "0 corrupt" in verified.stdout


def fill_leaving(disk: Path, free: int) -> None:
    """Take all the room on `disk` but `free` bytes, with one file."""
    filler = disk / "filler"
    with open(filler, "wb") as file, contextlib.suppress(OSError):
        while True:
            file.write(bytes(64 * 1024))
            file.flush()
    os.truncate(filler, filler.stat().st_size - free)


def test_a_full_disk_serves_manifests_without_caching_them(
    tmp_path: Path, upstream: Registry, start_proxy: StartProxy, small_disk: Path
) -> None:
    cached = write_layout(tmp_path / "cached", "v1", None, [1000], seed=57)
    new = write_layout(tmp_path / "new", "v1", None, [1000], seed=58)
    push(cached, upstream.host, "cached/app")
    push(new, upstream.host, "new/app")
    proxy = start_proxy(
        {**one_upstream(upstream, manifest_ttl=0), "storage": {"root": str(small_disk)}}
    )
    assert proxy.get("/v2/test.local/cached/app/manifests/v1")[0] == 200
    fill_leaving(small_disk, 0)

    # A new manifest (the store is full) and a cached tag revalidated (the database is full).
    for repository, image in (("new", new), ("cached", cached)):
        status, headers, body = proxy.get(f"/v2/test.local/{repository}/app/manifests/v1")
        assert (status, headers["Docker-Content-Digest"], body) == (200, image.digest, image.raw)
    assert f"serving manifest {new.digest} without caching it" in proxy.log()
    # As for a blob that does not fit: the cleaner makes room (here it can only take the one
    # manifest stored), and the cache tells its readiness probe.
    wait_for(lambda: proxy.metric("evicted_items_total") == 1, "the cleaner to make room")
    status, _, body = proxy.get("/readyz")
    assert status == 503 and b"disk is full" in body
    # It keeps looking for room (the filler is not the cache's to take), but what it evicted
    # once, file gone and record kept by the full database, is not counted again.
    wait_for(lambda: proxy.metric("cleaner_runs_total") >= 3, "the cleaner to try again")
    assert proxy.metric("evicted_items_total") == 1


def test_a_full_disk_takes_back_parked_partial_downloads_first(
    tmp_path: Path, upstream: Registry, start_proxy: StartProxy, small_disk: Path
) -> None:
    image = write_layout(tmp_path / "two", "v1", None, [9 * MiB, 9 * MiB], seed=56)
    push(image, upstream.host, "parked/app")
    parked = small_disk / "partial" / f"sha256-{'7' * 64}"
    parked.parent.mkdir()
    parked.write_bytes(os.urandom(8 * MiB))
    proxy = start_proxy({**one_upstream(upstream), "storage": {"root": str(small_disk)}})
    ref = f"docker://{proxy.host}/test.local/parked/app:v1"

    # 8 MiB parked and 18 MiB of layers do not fit in 24 MiB.
    skopeo.copy(ref, f"dir:{tmp_path / 'first'}", check=False)
    wait_for(lambda: not parked.exists(), "the parked partial to be given back")
    skopeo.copy(ref, f"dir:{tmp_path / 'second'}")
    assert skopeo.read_dir_copy(tmp_path / "second").blobs == image.blobs


def test_a_blob_the_full_database_cannot_record_is_not_kept(
    image: Image, faulty: FaultyUpstream, start_proxy: StartProxy, small_disk: Path
) -> None:
    layer = image.layers[0]
    size = image.blobs[layer]
    proxy = start_proxy({**one_upstream(faulty), "storage": {"root": str(small_disk)}})
    # Room for the blob and one page more: the file fits, SQLite's record of it does not.
    page = 4096
    fill_leaving(small_disk, -(-size // page) * page + page)

    status, body = fetch(proxy, blob_path(layer))
    assert status == 200 and hashlib.sha256(body).hexdigest() == layer.removeprefix("sha256:")
    wait_for(lambda: proxy.metric("inflight_downloads") == 0, "the download to end")
    # Not stored, since nothing would account for it; and the cleaner is told to make room.
    assert blob_files(small_disk) == set()
    status, _, body = proxy.get("/readyz")
    assert status == 503 and b"disk is full" in body
    assert "never retrieved" not in proxy.log()
    proxy.stop()
    du = proxy.admin("du")
    assert du.returncode == 0 and "total: 0 bytes in 0 items" in du.stdout


def test_client_leaving_halfway_does_not_stop_the_download(
    tmp_path: Path, upstream: Registry, start_proxy: StartProxy
) -> None:
    image = write_layout(tmp_path / "big", "v1", None, [24 * MiB], seed=55)
    push(image, upstream.host, "left/app")
    proxy = start_proxy(one_upstream(upstream))
    layer = image.layers[0]
    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=60)
    connection.request("GET", f"/v2/test.local/left/app/blobs/{layer}")
    response = connection.getresponse()
    response.read(MiB)
    connection.close()

    wait_for(lambda: layer.removeprefix("sha256:") in blob_files(proxy.data), "the blob to land")
    assert upstream.blob_gets(layer) == 1
    # Leaving a stored blob's transfer is as unremarkable: no error, a 499 in the access log.
    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=60)
    connection.request("GET", f"/v2/test.local/left/app/blobs/{layer}")
    connection.getresponse().read(MiB)
    connection.close()
    status, body = fetch(proxy, f"/v2/test.local/left/app/blobs/{layer}")
    assert status == 200 and hashlib.sha256(body).hexdigest() == layer.removeprefix("sha256:")
    wait_for(
        lambda: (
            [e["status"] for e in proxy.access_log() if e["path"].endswith(layer)]
            == [499, 499, 200]
        ),
        "both departures in the access log",
    )
    assert "Traceback" not in proxy.log() and " ERROR " not in proxy.log()
