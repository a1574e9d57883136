"""Smoke tests for the test infrastructure itself.

If these fail, proxy test failures mean nothing: they prove the upstreams,
auth, image generator, clients and request accounting behave as the proxy
tests assume.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import socket
import tarfile
from pathlib import Path

import aiohttp
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from tests.conftest import CREDS
from tests.support import skopeo
from tests.support.images import OCI_INDEX, OCI_MANIFEST, Image, push, write_layout
from tests.support.podman import Podman
from tests.support.ports import free_port
from tests.support.registry import PROBE_MARKER, Registry, parse_access_log
from tests.support.tokenserver import TokenServer, libtrust_key_id, parse_scope

TWO_PLATFORMS = [("linux", "amd64"), ("linux", "arm64")]


def _pull_dir(ref: str, dest: Path, creds: str | None = None) -> skopeo.DirCopy:
    skopeo.copy(ref, f"dir:{dest}", all=True, src_creds=creds)
    return skopeo.read_dir_copy(dest)


def _assert_same(copied: skopeo.DirCopy, image: Image) -> None:
    assert copied.digest == image.digest
    assert copied.manifests == image.manifests
    assert copied.blobs == image.blobs


# -- image generation ----------------------------------------------------------


def test_write_layout_is_deterministic_and_valid(tmp_path: Path) -> None:
    a = write_layout(tmp_path / "a", "v1", TWO_PLATFORMS, [3000, 70_000], seed=5)
    b = write_layout(tmp_path / "b", "v1", TWO_PLATFORMS, [3000, 70_000], seed=5)
    c = write_layout(tmp_path / "c", "v1", TWO_PLATFORMS, [3000, 70_000], seed=6)
    assert a.digest == b.digest and a.blobs == b.blobs
    assert not set(a.blobs) & set(c.blobs)

    assert a.media_type == OCI_INDEX
    assert len(a.manifests) == 3  # index + one per platform
    assert set(a.platform_manifests) == {"linux/amd64", "linux/arm64"}
    assert len(a.layers) == 4 and len(a.configs) == 2  # distinct per platform

    layout_index = json.loads((a.layout / "index.json").read_text())
    (entry,) = layout_index["manifests"]
    assert entry["digest"] == a.digest
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == "v1"

    # Every layer is a real tar whose uncompressed digest is the config's diff_id.
    index = json.loads(a.raw)
    for desc in index["manifests"]:
        manifest = json.loads(a.manifests[desc["digest"]])
        config = json.loads(a.blob_bytes(manifest["config"]["digest"]))
        assert config["os"] == desc["platform"]["os"]
        assert config["architecture"] == desc["platform"]["architecture"]
        for layer, diff_id, size in zip(
            manifest["layers"], config["rootfs"]["diff_ids"], [3000, 70_000], strict=True
        ):
            assert a.blobs[layer["digest"]] == layer["size"]
            raw_tar = gzip.decompress(a.blob_bytes(layer["digest"]))
            assert "sha256:" + hashlib.sha256(raw_tar).hexdigest() == diff_id
            with tarfile.open(fileobj=io.BytesIO(raw_tar)) as tar:
                (member,) = tar.getmembers()
                assert member.isfile() and member.size == size


def test_layout_holds_several_tags(tmp_path: Path) -> None:
    single = write_layout(tmp_path, "one", None, [100], seed=1)
    raw = write_layout(tmp_path, "two", None, [100], seed=2, compression="none")
    assert single.media_type == raw.media_type == OCI_MANIFEST
    tags = {
        m["annotations"]["org.opencontainers.image.ref.name"]: m["digest"]
        for m in json.loads((tmp_path / "index.json").read_text())["manifests"]
    }
    assert tags == {"one": single.digest, "two": raw.digest}


# -- plain upstream ------------------------------------------------------------


def test_push_and_copy_back_all_platforms(upstream: Registry, tmp_path: Path) -> None:
    image = write_layout(tmp_path / "layout", "v1", TWO_PLATFORMS, [1024, 300_000], seed=1)
    push(image, upstream.host, "library/multi")
    ref = f"docker://{upstream.host}/library/multi:v1"
    assert skopeo.inspect_raw(ref) == image.raw
    _assert_same(_pull_dir(ref, tmp_path / "copy"), image)


def test_blob_get_counted_exactly_once(upstream: Registry, tmp_path: Path) -> None:
    # One 64 MiB layer: big enough that the response streams well past any buffer.
    image = write_layout(tmp_path / "layout", "big", None, [64 << 20, 10], seed=2)
    push(image, upstream.host, "big/image")
    upstream.clear_requests()
    assert upstream.requests() == []

    _pull_dir(f"docker://{upstream.host}/big/image:big", tmp_path / "copy")

    for digest in image.blobs:
        assert upstream.count("GET", f"/v2/big/image/blobs/{digest}") == 1
        assert upstream.blob_gets(digest) == 1
    assert upstream.count("HEAD", "/blobs/") == 0
    assert upstream.manifest_requests("GET", "big") == 1
    # Filesystem storage serves blobs directly (200 with the full body), no redirect.
    blob_entries = [e for e in upstream.entries() if "/blobs/" in e.path]
    assert {(e.status, e.size) for e in blob_entries} == {(200, s) for s in image.blobs.values()}
    # Our own readiness/sync probes never show up.
    assert all(PROBE_MARKER not in e.query for e in upstream.entries())

    upstream.clear_requests()
    skopeo.inspect_raw(f"docker://{upstream.host}/big/image:big")
    assert upstream.requests() == [("GET", "/v2/"), ("GET", "/v2/big/image/manifests/big")]


def test_restart_keeps_port_and_content(upstream: Registry, tmp_path: Path) -> None:
    image = write_layout(tmp_path / "layout", "v1", None, [1000], seed=3)
    push(image, upstream.host, "keep/me")
    ref = f"docker://{upstream.host}/keep/me:v1"
    host = upstream.host

    upstream.stop()
    assert not upstream.running
    with pytest.raises(skopeo.CommandError):
        skopeo.inspect_raw(ref, timeout=30)
    upstream.stop()  # idempotent

    upstream.start()
    assert upstream.host == host
    assert skopeo.inspect_raw(ref) == image.raw
    # The log spans restarts.
    assert upstream.count("PUT", "/v2/keep/me/manifests/v1") == 1


def test_podman_pulls_generated_images(upstream: Registry, tmp_path: Path) -> None:
    multi = write_layout(tmp_path / "layout", "multi", TWO_PLATFORMS, [2048], seed=4)
    plain = write_layout(tmp_path / "layout", "plain", None, [4096], seed=5, compression="none")
    push(multi, upstream.host, "pm/multi")
    push(plain, upstream.host, "pm/plain")
    with Podman(tmp_path / "podman") as podman:
        podman.pull(f"{upstream.host}/pm/multi:multi", platform="linux/arm64")
        podman.pull(f"{upstream.host}/pm/plain:plain")
        assert podman.image_digest(f"{upstream.host}/pm/multi:multi") == multi.digest
        assert podman.image_digest(f"{upstream.host}/pm/plain:plain") == plain.digest
        root = podman.mount(f"{upstream.host}/pm/plain:plain")
        try:
            assert (root / "data" / "layer-0.bin").stat().st_size == 4096
        finally:
            podman.unmount(f"{upstream.host}/pm/plain:plain")


def test_podman_and_skopeo_honour_registries_conf(upstream: Registry, tmp_path: Path) -> None:
    image = write_layout(tmp_path / "layout", "latest", None, [1000], seed=10)
    push(image, upstream.host, "library/busybox")
    # The mirrored registry is a closed loopback port: only the mirror can answer,
    # and nothing is looked up in DNS.
    conf = tmp_path / "registries.conf"
    conf.write_text(
        '[[registry]]\nlocation = "127.0.0.1:1"\ninsecure = true\n'
        f'[[registry.mirror]]\nlocation = "{upstream.host}"\ninsecure = true\n'
    )
    ref = "127.0.0.1:1/library/busybox:latest"
    assert skopeo.inspect_raw(f"docker://{ref}", registries_conf=conf) == image.raw
    skopeo.copy(f"docker://{ref}", f"dir:{tmp_path / 'copy'}", registries_conf=conf)
    assert skopeo.read_dir_copy(tmp_path / "copy").digest == image.digest
    with Podman(tmp_path / "podman") as podman:
        podman.pull(ref, registries_conf=conf)
        assert podman.image_digest(ref) == image.digest


def test_parse_access_log() -> None:
    text = (
        '127.0.0.1 - - [23/Nov/2026:14:59:38 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "skopeo/1.9.3"\n'
        '127.0.0.1 - - [23/Nov/2026:14:59:38 +0000] "GET /v2/?'
        + PROBE_MARKER
        + '=1 HTTP/1.1" 401 87 "" "Python-urllib/3.11"\n'
        '127.0.0.1 - - [23/Nov/2026:14:59:38 +0000] "PUT /v2/a/blobs/uploads/u?digest=x '
        'HTTP/1.1" 201 0 "" ""\n'
        "not a log line\n"
    )
    entries = parse_access_log(text)
    assert [(e.method, e.path, e.query, e.status) for e in entries] == [
        ("GET", "/v2/", "", 200),
        ("PUT", "/v2/a/blobs/uploads/u", "digest=x", 201),
    ]


# -- htpasswd upstream ---------------------------------------------------------


def test_basic_auth_upstream(basic_upstream: Registry, tmp_path: Path) -> None:
    image = write_layout(tmp_path / "layout", "v1", TWO_PLATFORMS, [512], seed=6)
    push(image, basic_upstream.host, "private/img", creds=CREDS)
    ref = f"docker://{basic_upstream.host}/private/img:v1"
    _assert_same(_pull_dir(ref, tmp_path / "ok", creds=CREDS), image)

    for creds in (None, "alice:wrong", "mallory:wonderland"):
        with pytest.raises(skopeo.CommandError) as err:
            skopeo.copy(ref, f"dir:{tmp_path / 'denied'}", src_creds=creds, timeout=30)
        assert "unauthorized" in err.value.stderr.lower()
    with pytest.raises(skopeo.CommandError):
        push(image, basic_upstream.host, "private/img", tag="other", creds="alice:wrong")
    assert basic_upstream.count("GET", "/v2/") >= 3
    assert any(e.status == 401 for e in basic_upstream.entries())


# -- token upstream ------------------------------------------------------------


def test_token_auth_upstream(
    token_upstream: Registry, token_server: TokenServer, tmp_path: Path
) -> None:
    image = write_layout(tmp_path / "layout", "v1", TWO_PLATFORMS, [512], seed=7)
    push(image, token_upstream.host, "team/app", creds=CREDS)
    assert ("alice", "repository:team/app:pull,push") in token_server.requests
    assert token_server.issued >= 1

    token_server.clear_requests()
    ref = f"docker://{token_upstream.host}/team/app:v1"
    _assert_same(_pull_dir(ref, tmp_path / "ok", creds=CREDS), image)
    assert token_server.requests == [("alice", "repository:team/app:pull")]

    token_server.clear_requests()
    for creds in ("alice:wrong", None):
        with pytest.raises(skopeo.CommandError):
            skopeo.copy(ref, f"dir:{tmp_path / 'denied'}", src_creds=creds, timeout=30)
    entries = token_server.entries
    assert entries and all(e.status == 401 for e in entries)
    assert {e.user for e in entries} == {"alice", None}


def test_token_anonymous_pull_only(
    token_upstream: Registry, token_server: TokenServer, tmp_path: Path
) -> None:
    image = write_layout(tmp_path / "layout", "v1", None, [512], seed=8)
    push(image, token_upstream.host, "public/app", creds=CREDS)
    token_server.allow_anonymous = True
    ref = f"docker://{token_upstream.host}/public/app:v1"
    assert skopeo.inspect_raw(ref) == image.raw
    assert token_server.requests[-1] == (None, "repository:public/app:pull")
    with pytest.raises(skopeo.CommandError):
        push(image, token_upstream.host, "public/app", tag="v2")


def test_token_contents(token_server: TokenServer) -> None:
    token = token_server.issue("alice", ["repository:a/b:pull,push,delete", "registry:catalog:*"])
    public_key = x509.load_pem_x509_certificate(token_server.cert_path.read_bytes()).public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "ES256"
    assert header["kid"] == token_server.key_id == libtrust_key_id(public_key)
    assert len(header["kid"]) == 59 and header["kid"].count(":") == 11
    claims = jwt.decode(token, public_key, algorithms=["ES256"], audience="registry-test")
    assert claims["iss"] == "test-issuer" and claims["sub"] == "alice"
    assert claims["access"] == [
        {"type": "repository", "name": "a/b", "actions": ["pull", "push"]},
        {"type": "registry", "name": "catalog", "actions": []},
    ]
    assert claims["exp"] - claims["iat"] == 300
    assert parse_scope("repository:localhost:5000/x:pull") == (
        "repository",
        "localhost:5000/x",
        ["pull"],
    )


async def test_bearer_flow_from_async_code(
    token_upstream: Registry, token_server: TokenServer, tmp_path: Path
) -> None:
    """What the proxy will do: follow the challenge, fetch a token, retry."""
    image = write_layout(tmp_path / "layout", "v1", None, [100], seed=9)
    push(image, token_upstream.host, "x/y", creds=CREDS)
    token_server.clear_requests()
    url = f"{token_upstream.url}/v2/x/y/manifests/v1"
    accept = {"Accept": OCI_MANIFEST}
    async with aiohttp.ClientSession() as session:
        async with session.get(url, headers=accept) as resp:
            assert resp.status == 401
            challenge = resp.headers["WWW-Authenticate"]
        assert challenge.startswith("Bearer ")
        params = dict(part.split("=", 1) for part in challenge.removeprefix("Bearer ").split(","))
        params = {k: v.strip('"') for k, v in params.items()}
        assert params["realm"] == token_server.realm
        async with session.get(
            params["realm"],
            params={"service": params["service"], "scope": "repository:x/y:pull"},
            headers={"Authorization": aiohttp.encode_basic_auth("alice", "wonderland")},
        ) as resp:
            assert resp.status == 200
            body = await resp.json()
        assert set(body) == {"token", "access_token", "expires_in", "issued_at"}
        headers = {**accept, "Authorization": f"Bearer {body['token']}"}
        async with session.get(url, headers=headers) as resp:
            assert resp.status == 200
            assert await resp.read() == image.raw
    assert token_server.requests == [("alice", "repository:x/y:pull")]


def test_token_server_restart_keeps_url_and_key(tmp_path: Path) -> None:
    server = TokenServer(tmp_path / "ts", {"bob": "pw"})
    url, kid = server.url, server.key_id
    with server:
        pass
    with server:
        assert server.url == url and server.key_id == kid
    assert not server.running


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
