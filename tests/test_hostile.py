"""Hostile input: fuzzed requests and upstream answers, slow clients, smuggling attempts.

Every answer must be a proper status (never a 500 with a traceback) in the OCI error format,
and nothing may be written outside the data directory.
"""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import StartProxy
from tests.support.faulty import FaultyUpstream
from tests.support.images import Image, push, write_layout
from tests.support.proxy import Proxy
from tests.support.registry import Registry

FUZZ_EXAMPLES = 300


def raw_request(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send bytes as they are (no client library tidies them) and read the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(data)
        chunks = []
        while chunk := connection.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def status_and_body(answer: bytes) -> tuple[int, bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    return write_layout(tmp_path_factory.mktemp("layout"), "v1", None, [50_000], seed=60)


@pytest.fixture
def faulty(image: Image) -> Iterator[FaultyUpstream]:
    stand_in = FaultyUpstream(image, "fuzz/app")
    with stand_in:
        yield stand_in


@pytest.fixture
def proxy(faulty: FaultyUpstream, start_proxy: StartProxy) -> Proxy:
    config: dict[str, Any] = {
        "upstreams": [{"name": "test.local", "url": faulty.url, "manifest_ttl": 0}],
        "default_upstream": "test.local",
        "upstream_timeouts": {"read": "2s"},
    }
    return start_proxy(config)


def files_outside(root: Path, data: Path) -> set[Path]:
    return {path for path in root.rglob("*") if data not in path.parents and path != data}


_COMPONENTS = st.sampled_from(
    [
        "test.local", "docker.io", "evil.example", "localhost", "127.0.0.1:1", "fuzz", "app",
        "..", ".", "%2e%2e", "%2F", "%00", "UPPER", "a--b", "a__b", "_catalog", "manifests",
        "blobs", "tags", "list", "referrers", "uploads", "v1", "sha256:" + "a" * 64,
        "sha256:zz", "sha512:" + "b" * 128, "md5:abc", "x" * 300,
    ]
)  # fmt: skip
_PATH_TEXT = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="?#"),
    max_size=40,
)
_HEADER_VALUE = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80)
_QUERY = st.dictionaries(
    st.sampled_from(["ns", "n", "last", "artifactType"]), _PATH_TEXT.filter(lambda t: "&" not in t)
)


@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    method=st.sampled_from(["GET", "HEAD", "GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
    components=st.lists(_COMPONENTS | _PATH_TEXT, max_size=8),
    query=_QUERY,
    range_header=st.none() | _HEADER_VALUE | st.sampled_from(["bytes=0-", "bytes=5-2", "bytes=-0"]),
    accept=st.none() | _HEADER_VALUE,
    authorization=st.none() | _HEADER_VALUE,
)
def test_fuzzed_requests_get_proper_answers(
    tmp_path: Path,
    proxy: Proxy,
    method: str,
    components: list[str],
    query: dict[str, str],
    range_header: str | None,
    accept: str | None,
    authorization: str | None,
) -> None:
    path = "/v2/" + "/".join(components)
    if query:
        path += "?" + "&".join(f"{key}={value}" for key, value in query.items())
    headers = {"Range": range_header, "Accept": accept, "Authorization": authorization}
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items() if value is not None]
    before = files_outside(tmp_path, proxy.data)
    answer = raw_request(proxy.port, ("\r\n".join(lines) + "\r\n\r\n").encode())

    status, body = status_and_body(answer)
    assert status != 500 and status < 600, answer[:500]
    if status >= 400 and method != "HEAD" and body:
        assert json.loads(body)["errors"][0]["code"]
    assert files_outside(tmp_path, proxy.data) == before
    assert not (proxy.data.parent / "etc").exists()


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize(
    ("body", "headers", "lie"),
    [
        (b"this is not json", {}, 0),
        (b'"a json string"', {}, 0),
        (_nested(100_000), {}, 0),
        (b'{"layers": ' + _nested(50_000) + b"}", {}, 0),
        (b"x" * (5 * 1024 * 1024), {}, 0),
        (b'{"schemaVersion": 2}', {"Docker-Content-Digest": "sha256:" + "0" * 64}, 0),
        (b'{"schemaVersion": 2}', {"Docker-Content-Digest": "not a digest"}, 0),
        (b'{"schemaVersion": 2}', {}, 1000),
        (b'{"schemaVersion": 2, "mediaType": 7, "config": "x", "layers": [1, null]}', {}, 0),
    ],
)
def test_hostile_upstream_manifests(
    faulty: FaultyUpstream, proxy: Proxy, body: bytes, headers: dict[str, str], lie: int
) -> None:
    faulty.manifest_body = body
    faulty.manifest_headers = headers
    faulty.manifest_length_lie = lie
    status, _, answer = proxy.get("/v2/test.local/fuzz/app/manifests/v1")
    assert status in (200, 400, 502, 503), answer[:300]
    if status != 200:
        assert json.loads(answer)["errors"][0]["code"]
    else:
        # Served as it came, only when nothing contradicts it: then its digest is its own.
        assert not headers and not lie


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=st.binary(max_size=2000))
def test_fuzzed_upstream_manifest_bodies(faulty: FaultyUpstream, proxy: Proxy, body: bytes) -> None:
    faulty.manifest_body = body
    status, _, answer = proxy.get("/v2/test.local/fuzz/app/manifests/v1")
    assert status in (200, 400, 502, 503)
    if status != 200:
        assert json.loads(answer)["errors"][0]["code"]


@pytest.mark.parametrize(
    "request_bytes",
    [
        # Conflicting framing: both Content-Length and chunked.
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        # Two different Content-Lengths.
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        # An absurd header.
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
        # Too many headers.
        b"GET /v2/ HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(500)) + b"\r\n",
        # A request line that is not HTTP.
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40 + b"\r\n\r\n",
    ],
)
def test_smuggling_and_absurd_headers_are_refused(proxy: Proxy, request_bytes: bytes) -> None:
    answer = raw_request(proxy.port, request_bytes)
    status, _ = status_and_body(answer)
    assert 400 <= status < 500
    # The connection is closed after the refusal: nothing smuggled behind it is read.
    assert answer.count(b"HTTP/1.") == 1


def connect_from(source: str, port: int) -> socket.socket:
    """A connection to the cache from a chosen loopback address."""
    connection = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    connection.settimeout(20)
    connection.bind((source, 0))
    connection.connect(("127.0.0.1", port))
    return connection


def closed_by_server(connection: socket.socket) -> bool:
    try:
        return connection.recv(1024) == b""
    except ConnectionResetError:
        return True


def test_slow_clients_do_not_hold_the_server(
    tmp_path: Path, faulty: FaultyUpstream, start_proxy: StartProxy
) -> None:
    config: dict[str, Any] = {
        "upstreams": [{"name": "test.local", "url": faulty.url}],
        "default_upstream": "test.local",
        # Long enough that the connections below are all still open on a loaded machine.
        "http": {"idletimeout": "5s", "maxconnsperaddress": 10},
    }
    proxy = start_proxy(config)
    slowloris = [connect_from("127.0.0.1", proxy.port) for _ in range(10)]
    for connection in slowloris:
        connection.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Slow: a")

    refused = connect_from("127.0.0.1", proxy.port)
    refused.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
    status, body = status_and_body(refused.recv(65536))
    refused.close()
    assert status == 429 and json.loads(body)["errors"][0]["code"] == "TOOMANYREQUESTS"

    other = connect_from("127.0.0.2", proxy.port)
    other.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_and_body(other.recv(65536))[0] == 200
    other.close()

    # The headers never complete: each connection is closed once the idle timeout passes
    # (the socket timeout of 20 s bounds the wait).
    assert all(closed_by_server(connection) for connection in slowloris)
    for connection in slowloris:
        connection.close()
    assert (
        status_and_body(
            raw_request(proxy.port, b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        )[0]
        == 200
    )


def test_a_reader_that_stalls_does_not_slow_the_others(
    tmp_path: Path, upstream: Registry, start_proxy: StartProxy
) -> None:
    image = write_layout(tmp_path / "big", "v1", None, [16 * 1024 * 1024], seed=61)
    push(image, upstream.host, "slow/app")
    config = {
        "upstreams": [{"name": "test.local", "url": upstream.url}],
        "default_upstream": "test.local",
    }
    proxy = start_proxy(config)
    layer = image.layers[0]
    path = f"/v2/test.local/slow/app/blobs/{layer}"
    request = f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()

    stalled = connect_from("127.0.0.1", proxy.port)
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.sendall(request)  # and never reads
    for _ in range(3):
        answer = raw_request(proxy.port, request, timeout=60)
        _, body = status_and_body(answer)
        assert hashlib.sha256(body).hexdigest() == layer.removeprefix("sha256:")
    stalled.close()
