"""End to end: real clients (skopeo, podman) pull through registry-cache from real registries."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CREDS, StartProxy
from tests.support import skopeo
from tests.support.images import Image, push, write_layout
from tests.support.proxy import Proxy
from tests.support.registry import Registry
from tests.support.standin import StandIn, blob_files
from tests.support.wait import wait_for

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
ACCEPT_ALL = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST])


# A cosign signature as the referrers API lists it.
SIGNATURE: dict[str, object] = {
    "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "digest": "sha256:" + "5" * 64,
    "size": 123,
    "artifactType": "application/vnd.dev.cosign.signature",
}


def one_upstream(
    registry: Registry | StandIn, name: str = "test.local", **extra: Any
) -> dict[str, Any]:
    return {"upstreams": [{"name": name, "url": registry.url, **extra}], "default_upstream": name}


def assert_same_image(copied: skopeo.DirCopy, image: Image) -> None:
    assert copied.digest == image.digest
    assert copied.manifests == image.manifests
    assert copied.blobs == image.blobs


def test_multi_platform_copy_is_identical_and_served_offline(
    tmp_path: Path, upstream: Registry, start_proxy: StartProxy
) -> None:
    image = write_layout(
        tmp_path / "layout",
        "v1",
        [("linux", "amd64"), ("linux", "arm64")],
        [300_000, 2_000_000],
        seed=1,
    )
    push(image, upstream.host, "podman/hello")
    proxy = start_proxy(one_upstream(upstream))
    ref = f"docker://{proxy.host}/test.local/podman/hello:v1"

    skopeo.copy(ref, f"dir:{tmp_path / 'first'}")
    assert_same_image(skopeo.read_dir_copy(tmp_path / "first"), image)

    upstream.stop()
    skopeo.copy(ref, f"dir:{tmp_path / 'offline'}")
    assert_same_image(skopeo.read_dir_copy(tmp_path / "offline"), image)
    assert {entry["cache"] for entry in proxy.access_log() if "/blobs/" in entry["path"]} <= {
        "hit",
        "miss",
    }


def test_what_the_cache_holds_is_for_its_own_user_only(
    tmp_path: Path, upstream: Registry, start_proxy: StartProxy
) -> None:
    image = write_layout(tmp_path / "layout", "v1", None, [100_000], seed=9)
    push(image, upstream.host, "private/app")
    previous = os.umask(0o022)  # the usual one, which leaves new files world-readable
    try:
        proxy = start_proxy(one_upstream(upstream))
    finally:
        os.umask(previous)

    skopeo.copy(f"docker://{proxy.host}/test.local/private/app:v1", f"dir:{tmp_path / 'copy'}")
    stored = {digest.removeprefix("sha256:") for digest in image.blobs}
    wait_for(lambda: stored <= blob_files(proxy.data), "the pulled image to be stored")

    paths = [proxy.data, *proxy.data.rglob("*")]
    assert proxy.data / "metadata.db" in paths
    assert {path: stat.S_IMODE(path.stat().st_mode) & 0o077 for path in paths} == dict.fromkeys(
        paths, 0
    )


def test_concurrent_cold_pulls_fetch_each_blob_once(
    tmp_path: Path, upstream: Registry, start_proxy: StartProxy
) -> None:
    image = write_layout(tmp_path / "layout", "big", None, [64 * 1024 * 1024, 100_000], seed=2)
    push(image, upstream.host, "big/image")
    upstream.clear_requests()
    proxy = start_proxy(one_upstream(upstream))

    clients = [
        subprocess.Popen(
            [
                "skopeo",
                "--insecure-policy",
                "copy",
                "--src-tls-verify=false",
                f"docker://{proxy.host}/test.local/big/image:big",
                f"dir:{tmp_path / f'copy{i}'}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=skopeo.env(),
        )
        for i in range(8)
    ]
    for client in clients:
        _, stderr = client.communicate(timeout=180)
        assert client.returncode == 0, stderr.decode()
    for i in range(8):
        assert_same_image(skopeo.read_dir_copy(tmp_path / f"copy{i}"), image)
    for blob in image.blobs:
        assert upstream.blob_gets(blob) == 1, blob
    assert upstream.manifest_requests("GET", "big") == 1


def test_moved_tag_follows_ttl_and_revalidates_with_head(
    tmp_path: Path, upstream: Registry, start_proxy: StartProxy
) -> None:
    old = write_layout(tmp_path / "old", "t", None, [10_000], seed=3)
    new = write_layout(tmp_path / "new", "t", None, [10_000], seed=4)
    push(old, upstream.host, "moving/repo")
    proxy = start_proxy(
        {
            "upstreams": [
                {"name": "fresh.local", "url": upstream.url, "manifest_ttl": 0},
                {"name": "sticky.local", "url": upstream.url, "manifest_ttl": "1h"},
            ],
            "default_upstream": "fresh.local",
        }
    )

    def pulled(upstream_name: str) -> str:
        ref = f"docker://{proxy.host}/{upstream_name}/moving/repo:t"
        skopeo.copy(ref, f"dir:{tmp_path / 'x'}", all=False)
        return skopeo.read_dir_copy(tmp_path / "x").digest

    assert pulled("fresh.local") == old.digest
    assert pulled("sticky.local") == old.digest
    upstream.clear_requests()
    assert pulled("fresh.local") == old.digest
    assert upstream.manifest_requests("HEAD", "t") == 1
    assert upstream.manifest_requests("GET", "t") == 0

    push(new, upstream.host, "moving/repo")
    upstream.clear_requests()
    assert pulled("fresh.local") == new.digest
    assert upstream.manifest_requests("HEAD", "t") == 1
    assert upstream.manifest_requests("GET", new.digest) == 1
    assert pulled("sticky.local") == old.digest


@pytest.mark.parametrize("kind", ["basic", "token"])
def test_authenticated_upstreams(
    tmp_path: Path,
    kind: str,
    request: pytest.FixtureRequest,
    start_proxy: StartProxy,
) -> None:
    registry: Registry = request.getfixturevalue(f"{kind}_upstream")
    image = write_layout(tmp_path / "layout", "v1", None, [50_000, 60_000], seed=5)
    push(image, registry.host, "private/app", creds=CREDS)
    if kind == "token":
        # skopeo's push fetches tokens of its own, one or several as its uploads race.
        request.getfixturevalue("token_server").clear_requests()
    good = start_proxy(one_upstream(registry, username="alice", password="wonderland"))
    bad = start_proxy(one_upstream(registry, username="alice", password="wrong-password"))

    skopeo.copy(f"docker://{good.host}/test.local/private/app:v1", f"dir:{tmp_path / 'good'}")
    assert_same_image(skopeo.read_dir_copy(tmp_path / "good"), image)
    if kind == "token":
        token_requests = request.getfixturevalue("token_server").requests
        scopes = [
            scope
            for user, scope in token_requests
            if user == "alice" and "private/app" in str(scope)
        ]
        # One token for the repository, reused for the manifest and every blob.
        assert scopes == ["repository:private/app:pull"]

    failed = skopeo.copy(
        f"docker://{bad.host}/test.local/private/app:v1",
        f"dir:{tmp_path / 'bad'}",
        check=False,
        timeout=60,
    )
    assert failed.returncode != 0
    assert "unauthorized" in failed.stderr.lower() or "denied" in failed.stderr.lower()
    assert "wrong-password" not in bad.log()
    assert "wonderland" not in good.log()


def test_corrupt_upstream_bytes_never_enter_the_cache(
    tmp_path: Path, start_proxy: StartProxy
) -> None:
    image = write_layout(tmp_path / "layout", "v1", None, [3_000_000], seed=6)
    layer = image.layers[0]
    with StandIn(image, "corrupt/app") as standin:
        standin.corrupt.add(layer)
        proxy = start_proxy(one_upstream(standin))
        ref = f"docker://{proxy.host}/test.local/corrupt/app:v1"

        failed = skopeo.copy(ref, f"dir:{tmp_path / 'bad'}", check=False, timeout=60)
        assert failed.returncode != 0
        proxy.settled()
        assert layer.removeprefix("sha256:") not in blob_files(proxy.data)
        assert list((proxy.data / "tmp").iterdir()) == []

        standin.corrupt.clear()
        skopeo.copy(ref, f"dir:{tmp_path / 'good'}")
        assert_same_image(skopeo.read_dir_copy(tmp_path / "good"), image)
        proxy.settled()
        assert layer.removeprefix("sha256:") in blob_files(proxy.data)


def test_an_upstream_that_compresses_what_it_may_is_asked_for_the_bytes_themselves(
    tmp_path: Path, start_proxy: StartProxy
) -> None:
    """Token services and CDNs gzip for clients that accept it; the cache stores blobs byte
    for byte and decompresses nothing, so it accepts only the identity encoding."""
    image = write_layout(tmp_path / "layout", "v1", None, [200_000], seed=7)
    with StandIn(image, "app") as standin:
        standin.compressing = True
        standin.challenge = f'Bearer realm="{standin.url}/token",service="standin"'
        proxy = start_proxy(one_upstream(standin))

        skopeo.copy(f"docker://{proxy.host}/test.local/app:v1", f"dir:{tmp_path / 'copy'}")

        assert_same_image(skopeo.read_dir_copy(tmp_path / "copy"), image)


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/v2/test.local/../../etc/passwd", 400, "NAME_INVALID"),
        ("GET", "/v2/test.local/%2e%2e/%2e%2e/etc/passwd/manifests/latest", 400, "NAME_INVALID"),
        ("GET", "/v2/test.local/UPPER/manifests/latest", 400, "NAME_INVALID"),
        ("GET", "/v2/test.local/app/blobs/sha256:abc", 400, "DIGEST_INVALID"),
        ("GET", "/v2/test.local/app/blobs/sha256:" + "A" * 64, 400, "DIGEST_INVALID"),
        ("GET", "/v2/test.local/app/blobs/md5:" + "a" * 32, 400, "DIGEST_INVALID"),
        ("GET", "/v2/test.local/app/manifests/sha256:totallywrong", 400, "DIGEST_INVALID"),
        ("GET", "/v2/test.local/app/manifests/bad%20tag", 400, "TAG_INVALID"),
        ("GET", "/v2/evil.example/x/manifests/latest", 404, "NAME_UNKNOWN"),
        ("GET", "/v2/localhost/x/manifests/latest", 404, "NAME_UNKNOWN"),
        ("GET", "/v2/x/manifests/latest?ns=evil.example", 404, "NAME_UNKNOWN"),
        ("GET", "/v2/test.local/app/tags/list?n=-1", 400, "PAGINATION_NUMBER_INVALID"),
        ("PUT", "/v2/test.local/app/manifests/latest", 405, "UNSUPPORTED"),
        ("POST", "/v2/test.local/app/blobs/uploads/", 405, "UNSUPPORTED"),
        ("PATCH", "/v2/test.local/app/blobs/uploads/abc", 405, "UNSUPPORTED"),
        ("DELETE", "/v2/test.local/app/manifests/sha256:" + "a" * 64, 405, "UNSUPPORTED"),
        ("GET", "/v1/search", 404, "NAME_UNKNOWN"),
        ("POST", "/healthz", 405, "UNSUPPORTED"),
        ("OPTIONS", "/v2/test.local/app/manifests/latest", 405, "UNSUPPORTED"),
    ],
)
def test_bad_input_gets_oci_errors_and_goes_nowhere(
    tmp_path: Path,
    upstream: Registry,
    start_proxy: StartProxy,
    method: str,
    path: str,
    status: int,
    code: str,
) -> None:
    proxy = start_proxy(one_upstream(upstream))
    upstream.clear_requests()
    before = sorted(str(p) for p in tmp_path.rglob("*"))

    got, headers, body = proxy.get(path, method=method)

    assert (got, json.loads(body)["errors"][0]["code"]) == (status, code)
    assert headers["Content-Type"].startswith("application/json")
    assert upstream.requests() == []
    after = sorted(
        str(p) for p in tmp_path.rglob("*") if not str(p).endswith(("proxy.log", "-wal", "-shm"))
    )
    assert set(after) <= set(before)


def docker_hub_and_quay(
    tmp_path: Path, upstream: Registry, basic_upstream: Registry, start_proxy: StartProxy
) -> tuple[Proxy, Image, Image]:
    """A cache for docker.io (anonymous) and quay.io (basic auth), each holding one image:
    library/alpine and podman/hello."""
    alpine = write_layout(tmp_path / "alpine", "latest", None, [20_000], seed=7)
    hello = write_layout(tmp_path / "hello", "latest", None, [20_000], seed=8)
    push(alpine, upstream.host, "library/alpine")
    push(hello, basic_upstream.host, "podman/hello", creds=CREDS)
    proxy = start_proxy(
        {
            "upstreams": [
                {"name": "docker.io", "url": upstream.url},
                {
                    "name": "quay.io",
                    "url": basic_upstream.url,
                    "username": "alice",
                    "password": "wonderland",
                },
            ]
        }
    )
    return proxy, alpine, hello


def test_docker_hub_mirror_mode_and_containerd_ns(
    tmp_path: Path, upstream: Registry, basic_upstream: Registry, start_proxy: StartProxy
) -> None:
    proxy, alpine, hello = docker_hub_and_quay(tmp_path, upstream, basic_upstream, start_proxy)
    accept = {"Accept": ACCEPT_ALL}
    for path in (
        "/v2/library/alpine/manifests/latest",
        "/v2/alpine/manifests/latest",
        "/v2/docker.io/alpine/manifests/latest",
        "/v2/docker.io/library/alpine/manifests/latest",
        "/v2/library/alpine/manifests/latest?ns=docker.io",
    ):
        status, headers, body = proxy.get(path, accept)
        assert (status, headers["Docker-Content-Digest"]) == (200, alpine.digest), path
        assert body == alpine.raw

    status, headers, _ = proxy.get("/v2/podman/hello/manifests/latest?ns=quay.io", accept)
    assert (status, headers["Docker-Content-Digest"]) == (200, hello.digest)
    served = [
        e
        for e in basic_upstream.entries()
        if e.path.endswith("/manifests/latest") and e.status == 200
    ]
    assert len(served) == 1

    status, headers, body = proxy.get("/v2/podman/hello/manifests/latest", accept)
    assert status == 404, "without ns the name goes to Docker Hub, which lacks it"


def test_manifest_head_and_blob_range_and_listings(
    tmp_path: Path, upstream: Registry, start_proxy: StartProxy
) -> None:
    image = write_layout(tmp_path / "layout", "v1", None, [1_000_000], seed=9)
    push(image, upstream.host, "lists/app")
    for tag in ("v2", "v3"):
        push(image, upstream.host, "lists/app", tag=tag)
    proxy = start_proxy(one_upstream(upstream))
    base = "/v2/test.local/lists/app"

    status, head, body = proxy.get(f"{base}/manifests/v1", {"Accept": ACCEPT_ALL}, method="HEAD")
    assert (status, body) == (200, b"")
    assert head["Content-Length"] == str(len(image.raw))
    assert head["Docker-Content-Digest"] == image.digest
    assert head["Content-Type"] == image.media_type

    layer = image.layers[0]
    size = image.blobs[layer]
    upstream.clear_requests()
    status, head, _ = proxy.get(f"{base}/blobs/{layer}", method="HEAD")
    assert (status, head["Content-Length"], head["ETag"]) == (200, str(size), f'"{layer}"')
    assert upstream.blob_gets(layer) == 0, "a HEAD on an uncached blob is not a download"

    content = image.blob_bytes(layer)
    status, head, body = proxy.get(f"{base}/blobs/{layer}", {"Range": "bytes=10-99"})
    assert (status, body, head["Content-Range"]) == (206, content[10:100], f"bytes 10-99/{size}")
    # The download a ranged request started goes on; once the blob is stored, it is a hit.
    wait_for(lambda: layer.removeprefix("sha256:") in blob_files(proxy.data), "the blob stored")
    status, head, body = proxy.get(f"{base}/blobs/{layer}", {"Range": "bytes=10-99"})
    assert (status, body) == (206, content[10:100])
    assert (head["Docker-Content-Digest"], head["ETag"]) == (layer, f'"{layer}"')
    for listed in (head["ETag"], f'"other", W/{head["ETag"]}'):
        status, _, body = proxy.get(f"{base}/blobs/{layer}", {"If-None-Match": listed})
        assert (status, body) == (304, b""), listed
    for malformed in ("bytes=5-x", "bytes=x-5", "bytes=-"):
        status, _, body = proxy.get(f"{base}/blobs/{layer}", {"Range": malformed})
        assert (status, body) == (200, content), "a Range we cannot read is ignored"
    moved = {"Range": "bytes=10-99", "If-Range": '"an-older-etag"'}
    status, _, body = proxy.get(f"{base}/blobs/{layer}", moved)
    assert (status, body) == (200, content), "an If-Range that does not match asks for it all"
    status, _, body = proxy.get(f"{base}/blobs/{layer}", {"Range": f"bytes={size}-"})
    assert (status, json.loads(body)["errors"][0]["code"]) == (416, "RANGE_INVALID")

    status, head, body = proxy.get(f"{base}/tags/list?n=2")
    assert json.loads(body) == {"name": "test.local/lists/app", "tags": ["v1", "v2"]}
    assert head["Link"] == f'<{base}/tags/list?last=v2&n=2>; rel="next"'
    status, head, body = proxy.get(f"{base}/tags/list?n=2&last=v2")
    assert json.loads(body)["tags"] == ["v3"]
    status, head, body = proxy.get("/v2/lists/app/tags/list?n=2&ns=test.local")
    assert json.loads(body)["tags"] == ["v1", "v2"]
    assert head["Link"] == '</v2/lists/app/tags/list?last=v2&n=2&ns=test.local>; rel="next"'

    status, head, body = proxy.get("/v2/_catalog?n=10")
    assert json.loads(body) == {"repositories": ["test.local/lists/app"]}


def upstream_digest(registry: Registry, repository: str, tag: str, accept: str) -> str:
    """The digest the upstream itself answers a client that sends `accept` with."""
    url = f"{registry.url}/v2/{repository}/manifests/{tag}"
    request = urllib.request.Request(url, headers={"Accept": accept}, method="HEAD")
    with urllib.request.urlopen(request, timeout=30) as response:
        return str(response.headers["Docker-Content-Digest"])


def test_manifest_types_follow_the_clients_accept_without_moving_the_tag(
    tmp_path: Path, upstream: Registry, start_proxy: StartProxy
) -> None:
    multi = write_layout(
        tmp_path / "multi", "m", [("linux", "amd64"), ("linux", "arm64")], [900], seed=21
    )
    push(multi, upstream.host, "accept/index", tag="i")
    skopeo.copy(
        f"oci:{multi.layout}:m",
        f"docker://{upstream.host}/accept/list:l",
        extra=["--format", "v2s2"],
    )
    single = write_layout(tmp_path / "single", "s", None, [900], seed=22)
    push(single, upstream.host, "accept/oci", tag="s")
    skopeo.copy(
        f"oci:{single.layout}:s",
        f"docker://{upstream.host}/accept/v2s2:s",
        extra=["--format", "v2s2"],
    )
    docker_list = upstream_digest(upstream, "accept/list", "l", DOCKER_LIST)
    docker_amd64 = upstream_digest(upstream, "accept/list", "l", DOCKER_MANIFEST)
    docker_single = upstream_digest(upstream, "accept/v2s2", "s", DOCKER_MANIFEST)
    assert docker_amd64 != docker_list
    proxy = start_proxy(one_upstream(upstream))
    base = "/v2/test.local/accept"

    # A client without lists comes first and gets the platform the upstream picks for it...
    status, head, _ = proxy.get(f"{base}/list/manifests/l", {"Accept": DOCKER_MANIFEST})
    assert (status, head["Docker-Content-Digest"]) == (200, docker_amd64)
    assert head["Content-Type"] == DOCKER_MANIFEST
    # ...and the tag still names the list for every client that takes lists.
    for accept in (ACCEPT_ALL, "*/*", None):
        status, head, _ = proxy.get(
            f"{base}/list/manifests/l", {"Accept": accept} if accept else {}
        )
        assert (status, head["Docker-Content-Digest"]) == (200, docker_list), accept

    # A wildcard takes the tag as it is, cold or cached (the upstream is asked for every type).
    for tag, digest in (
        ("index/manifests/i", multi.digest),
        ("oci/manifests/s", single.digest),
        ("v2s2/manifests/s", docker_single),
    ):
        for _ in range(2):
            status, head, _ = proxy.get(f"{base}/{tag}", {"Accept": "*/*"})
            assert (status, head["Docker-Content-Digest"]) == (200, digest), tag

    # A type the client does not take, which the upstream can only convert to schema 1 or
    # refuse: MANIFEST_UNKNOWN, never a converted manifest. A q=0 refuses a type.
    for tag, accept in (
        ("v2s2/manifests/s", OCI_MANIFEST),
        ("index/manifests/i", f"{OCI_INDEX};q=0, {OCI_MANIFEST}"),
    ):
        status, _, body = proxy.get(f"{base}/{tag}", {"Accept": accept})
        assert (status, json.loads(body)["errors"][0]["code"]) == (404, "MANIFEST_UNKNOWN"), tag
    status, head, _ = proxy.get(f"{base}/index/manifests/i", {"Accept": ACCEPT_ALL})
    assert (status, head["Docker-Content-Digest"]) == (200, multi.digest)

    # What the upstream picked for the narrow client is kept for the tag's TTL: asked again,
    # with the upstream gone, it is the same answer.
    upstream.stop()
    status, head, _ = proxy.get(f"{base}/list/manifests/l", {"Accept": DOCKER_MANIFEST})
    assert (status, head["Docker-Content-Digest"]) == (200, docker_amd64)


def test_containerds_ns_takes_repositories_whose_first_part_looks_like_a_host(
    tmp_path: Path, upstream: Registry, start_proxy: StartProxy
) -> None:
    """GCR's domain-scoped projects (gcr.io/google.com/...), GitLab groups with dots."""
    image = write_layout(tmp_path / "layout", "v1", None, [900], seed=23)
    push(image, upstream.host, "example.com/proj/app")
    proxy = start_proxy(one_upstream(upstream))
    for path in (
        "/v2/example.com/proj/app/manifests/v1?ns=test.local",
        "/v2/test.local/example.com/proj/app/manifests/v1?ns=test.local",  # a mirror path
        "/v2/test.local/example.com/proj/app/manifests/v1",
    ):
        status, headers, _ = proxy.get(path, {"Accept": ACCEPT_ALL})
        assert (status, headers["Docker-Content-Digest"]) == (200, image.digest), path
    status, _, body = proxy.get("/v2/example.com/proj/app/manifests/v1", {"Accept": ACCEPT_ALL})
    assert (status, json.loads(body)["errors"][0]["code"]) == (404, "NAME_UNKNOWN")


def test_podman_pulls_by_name_and_as_docker_hub_mirror(
    tmp_path: Path, upstream: Registry, start_proxy: StartProxy
) -> None:
    from tests.support.podman import Podman

    image = write_layout(tmp_path / "layout", "latest", None, [200_000], seed=10)
    push(image, upstream.host, "podman/hello")
    push(image, upstream.host, "library/busybox")
    proxy = start_proxy(
        {
            "upstreams": [
                {"name": "docker.io", "url": upstream.url},
                {"name": "quay.io", "url": upstream.url},
            ]
        }
    )
    with Podman(tmp_path / "podman") as podman:
        podman.pull(f"{proxy.host}/quay.io/podman/hello:latest")
        assert podman.image_digest(f"{proxy.host}/quay.io/podman/hello:latest") == image.digest
        registries = tmp_path / "registries.conf"
        registries.write_text(
            'unqualified-search-registries = ["docker.io"]\n'
            '[[registry]]\nlocation = "docker.io"\n'
            f'[[registry.mirror]]\nlocation = "{proxy.host}"\ninsecure = true\n'
        )
        podman.pull("docker.io/library/busybox:latest", registries_conf=registries)
        assert podman.image_digest("docker.io/library/busybox:latest") == image.digest
    mirrored = [
        e for e in proxy.access_log() if e["path"] == "/v2/library/busybox/manifests/latest"
    ]
    assert mirrored and mirrored[0]["status"] == 200


def test_referrers_pass_through_with_the_artifact_type_filter(
    tmp_path: Path, start_proxy: StartProxy
) -> None:
    image = write_layout(tmp_path / "layout", "v1", None, [1000], seed=12)
    sbom = {**SIGNATURE, "digest": "sha256:" + "6" * 64, "artifactType": "application/spdx+json"}
    with StandIn(image, "signed/app") as standin:
        standin.referrers = [SIGNATURE, sbom]
        proxy = start_proxy(one_upstream(standin))
        base = f"/v2/test.local/signed/app/referrers/{image.digest}"

        status, headers, body = proxy.get(base)
        assert status == 200
        assert headers["Content-Type"] == "application/vnd.oci.image.index.v1+json"
        assert json.loads(body)["manifests"] == [SIGNATURE, sbom]

        status, headers, body = proxy.get(f"{base}?artifactType=application/spdx%2Bjson")
        assert json.loads(body)["manifests"] == [sbom]
        assert headers["OCI-Filters-Applied"] == "artifactType"

        status, _, body = proxy.get("/v2/test.local/signed/app/referrers/sha256:nothex")
        assert (status, json.loads(body)["errors"][0]["code"]) == (400, "DIGEST_INVALID")


@pytest.mark.parametrize("listing", ["referrers", "tags"])
def test_listing_pages_follow_the_upstreams_own_links_through_the_cache(
    tmp_path: Path, start_proxy: StartProxy, listing: str
) -> None:
    image = write_layout(tmp_path / "layout", "v1", None, [1000], seed=13)
    attachments: list[dict[str, object]] = [
        {
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": f"sha256:{n:064x}",
            "size": 100 + n,
            "artifactType": "application/vnd.example.note",
        }
        for n in range(5)
    ]
    tags = [f"v{n}" for n in range(5)]
    if listing == "referrers":
        endpoint, key, expected = (
            f"referrers/{image.digest}",
            "manifests",
            list[object](attachments),
        )
    else:
        endpoint, key, expected = "tags/list", "tags", list[object](tags)
    with StandIn(image, "noted/app") as standin:
        standin.referrers = attachments
        standin.tags = tags
        standin.page_size = 2
        proxy = start_proxy(one_upstream(standin))
        # By upstream name, and in mirror mode with containerd's `?ns=`, which the links keep.
        for first, suffix in (
            (f"/v2/test.local/noted/app/{endpoint}", ""),
            (f"/v2/noted/app/{endpoint}?ns=test.local", "ns=test.local"),
        ):
            path: str | None = first
            listed = []
            for _ in range(len(expected)):
                assert path is not None
                status, headers, body = proxy.get(path)
                assert status == 200
                listed += json.loads(body)[key]
                link = headers.get("Link")
                path = None
                if link is None:
                    break
                target, _, rel = link.partition(";")
                assert rel.strip() == 'rel="next"'
                path = target.strip().strip("<>")
                assert path.startswith(first.partition("?")[0] + "?")
                assert path.endswith(suffix)
            assert path is None
            assert listed == expected


def test_referrers_of_a_cached_image_are_served_while_the_upstream_is_down(
    tmp_path: Path, start_proxy: StartProxy
) -> None:
    image = write_layout(tmp_path / "layout", "v1", None, [1000], seed=14)
    other = write_layout(tmp_path / "other", "v1", None, [1000], seed=15)
    base = "/v2/test.local/signed/app"
    with StandIn(image, "signed/app") as standin:
        standin.referrers = [SIGNATURE]
        proxy = start_proxy(one_upstream(standin))
        assert proxy.get(f"{base}/manifests/v1", {"Accept": ACCEPT_ALL})[0] == 200
        listed = proxy.get(f"{base}/referrers/{image.digest}")
        assert listed[0] == 200
        # Not kept: the cache does not hold this subject.
        assert proxy.get(f"{base}/referrers/{other.digest}")[0] == 200

    status, headers, body = proxy.get(f"{base}/referrers/{image.digest}")
    assert status == 200
    assert json.loads(body) == json.loads(listed[2])
    assert headers["Content-Type"] == listed[1]["Content-Type"]
    for unknown in (f"referrers/{other.digest}", f"referrers/{image.digest}?artifactType=a/b"):
        status, _, body = proxy.get(f"{base}/{unknown}")
        assert (status, json.loads(body)["errors"][0]["code"]) == (503, "UNAVAILABLE")


def test_pull_secret_credentials_and_ignored_registries(
    tmp_path: Path, basic_upstream: Registry, start_proxy: StartProxy
) -> None:
    image = write_layout(tmp_path / "layout", "v1", None, [20_000], seed=13)
    push(image, basic_upstream.host, "private/app", creds=CREDS)
    secret = tmp_path / "pull-secret.json"
    auth = base64.b64encode(CREDS.encode()).decode()
    secret.write_text(
        json.dumps(
            {
                "auths": {
                    "test.local": {"auth": auth},
                    "cloud.openshift.com": {"auth": auth},
                    "mirror.example": {"auth": auth},
                }
            }
        )
    )
    ignored = "cloud.openshift.com mirror.example"
    env = {"PULL_SECRET": str(secret), "IGNOREREGISTRYLIST": ignored}
    proxy = start_proxy(one_upstream(basic_upstream), env=env)

    skopeo.copy(f"docker://{proxy.host}/test.local/private/app:v1", f"dir:{tmp_path / 'out'}")
    assert_same_image(skopeo.read_dir_copy(tmp_path / "out"), image)
    for host in ignored.split():
        status, _, body = proxy.get(f"/v2/{host}/x/manifests/latest")
        assert (status, json.loads(body)["errors"][0]["code"]) == (404, "NAME_UNKNOWN")
    assert "wonderland" not in proxy.log()


def test_pull_secret_keys_with_scheme_and_path_log_in_per_repository(
    tmp_path: Path, basic_upstream: Registry, start_proxy: StartProxy
) -> None:
    image = write_layout(tmp_path / "layout", "v1", None, [20_000], seed=14)
    for repository in ("public/app", "private/app", "private/other"):
        push(image, basic_upstream.host, repository, creds=CREDS)
    secret = tmp_path / "pull-secret.json"

    def auth(login: str) -> dict[str, str]:
        return {"auth": base64.b64encode(login.encode()).decode()}

    # The most specific key wins: private/app logs in, the rest of private/ does not.
    auths = {
        "https://test.local/": auth(CREDS),
        "test.local/private": auth("alice:not-it"),
        "test.local/private/app": auth(CREDS),
    }
    secret.write_text(json.dumps({"auths": auths}))
    proxy = start_proxy(one_upstream(basic_upstream), env={"PULL_SECRET": str(secret)})

    for repository in ("public/app", "private/app"):
        out = tmp_path / repository.replace("/", "-")
        skopeo.copy(f"docker://{proxy.host}/test.local/{repository}:v1", f"dir:{out}")
        assert_same_image(skopeo.read_dir_copy(out), image)
    refused = skopeo.copy(
        f"docker://{proxy.host}/test.local/private/other:v1",
        f"dir:{tmp_path / 'other'}",
        check=False,
    )
    assert refused.returncode != 0


def test_containerd_mirrors_two_registries_through_one_cache(
    tmp_path: Path, upstream: Registry, basic_upstream: Registry, start_proxy: StartProxy
) -> None:
    from tests.support.containerd import Containerd

    proxy, alpine, hello = docker_hub_and_quay(tmp_path, upstream, basic_upstream, start_proxy)
    with Containerd(tmp_path / "containerd") as containerd:
        containerd.mirror("docker.io", proxy.host)
        containerd.mirror("quay.io", proxy.host)
        for reference, image in (
            ("docker.io/library/alpine:latest", alpine),
            ("quay.io/podman/hello:latest", hello),
        ):
            pulled = containerd.pull(reference)
            assert pulled.returncode == 0, pulled.stdout + pulled.stderr
            assert containerd.image_digest(reference) == image.digest
    asked = {(e["path"], e["status"]) for e in proxy.access_log()}
    assert ("/v2/library/alpine/manifests/latest", 200) in asked
    assert ("/v2/podman/hello/manifests/latest", 200) in asked
