"""Read-only and never an open proxy: no push, no unconfigured host, no credentials elsewhere.

A second stand-in on another loopback address (or under another name for the same address)
plays the foreign host: it records every request it gets, so "nothing reached it" is checked
on the wire, and a control case shows the same setup does reach it when it is allowed to.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from yarl import URL

from proxy.settings import UpstreamSettings, host_allowed, receives_credentials, registry_upstream
from tests.conftest import CREDS, StartProxy
from tests.support import skopeo
from tests.support.images import Image, push, write_layout
from tests.support.registry import Registry
from tests.support.standin import StandIn, blob_files
from tests.support.wait import wait_for
from tests.test_auth import basic, write_users
from tests.test_pull import ACCEPT_ALL, assert_same_image, one_upstream

WRITE_METHODS = ("POST", "PUT", "PATCH", "DELETE")
UPSTREAM_CREDS = ("robot", "upstream-secret")
UPSTREAM_BASIC = basic(*UPSTREAM_CREDS)["Authorization"]


@pytest.fixture
def image(tmp_path: Path) -> Image:
    return write_layout(tmp_path / "layout", "v1", None, [100_000], seed=41)


def _routes(image: Image) -> list[str]:
    base = "/v2/test.local/app"
    layer = image.layers[0]
    return [
        "/v2",
        "/v2/",
        "/v2/_catalog",
        f"{base}/manifests/v1",
        f"{base}/manifests/{image.digest}",
        f"{base}/blobs/{layer}",
        f"{base}/blobs/uploads/",
        f"{base}/blobs/uploads/?digest={layer}",
        f"{base}/blobs/uploads/?mount={layer}&from=test.local/other",
        f"{base}/blobs/uploads/0b8e5f8a-1b64-4a0e-9b7e-3c2f0e0c1a11",
        f"{base}/tags/list",
        f"{base}/referrers/{image.digest}",
        "/v2/app/manifests/v1",
        "/healthz",
        "/readyz",
        "/metrics",
    ]


def test_every_write_method_on_every_route_is_refused(
    tmp_path: Path, upstream: Registry, start_proxy: StartProxy, image: Image
) -> None:
    push(image, upstream.host, "app")
    users = write_users(tmp_path / "htpasswd", {"alice": "wonderland"})
    proxy = start_proxy(
        {**one_upstream(upstream), "auth": {"htpasswd": {"path": str(users)}}},
    )
    alice = basic("alice", "wonderland")
    # Cached first, so that a write could not fail merely for want of the content.
    skopeo.copy(
        f"docker://{proxy.host}/test.local/app:v1",
        f"dir:{tmp_path / 'copy'}",
        src_creds="alice:wonderland",
    )
    stored = {digest.removeprefix("sha256:") for digest in image.blobs}
    wait_for(lambda: stored <= blob_files(proxy.data), "the image to be stored")
    cached = blob_files(proxy.data)
    upstream.clear_requests()

    answers = {
        (method, path): proxy.get(path, alice, method=method)
        for method in WRITE_METHODS
        for path in _routes(image)
    }
    refused = {
        key: (status, json.loads(body)["errors"][0]["code"])
        for key, (status, _, body) in answers.items()
    }
    assert refused == dict.fromkeys(answers, (405, "UNSUPPORTED"))
    assert upstream.requests() == []
    assert blob_files(proxy.data) == cached

    other = write_layout(tmp_path / "other", "v2", None, [10_000], seed=42)
    pushed = skopeo.copy(
        f"oci:{other.layout}:v2",
        f"docker://{proxy.host}/test.local/app:v2",
        dest_creds="alice:wonderland",
        check=False,
        timeout=60,
    )
    assert pushed.returncode != 0
    assert [m for m, _ in upstream.requests() if m not in ("GET", "HEAD")] == []
    assert proxy.get("/v2/test.local/app/manifests/v2", alice)[0] == 404


@pytest.fixture
def foreign(image: Image) -> Iterator[StandIn]:
    """A host the cache must never contact: 127.0.0.2, on loopback like everything here."""
    with StandIn(image, "app", host="127.0.0.2") as standin:
        yield standin


def test_unconfigured_hosts_are_reached_neither_by_name_nor_by_ns(
    upstream: Registry, start_proxy: StartProxy, foreign: StandIn
) -> None:
    proxy = start_proxy(one_upstream(upstream))
    elsewhere = f"127.0.0.2:{foreign.port}"
    upstream.clear_requests()
    for path in (
        f"/v2/app/manifests/v1?ns={elsewhere}",
        f"/v2/app/manifests/v1?ns=localhost:{upstream.port}",
        f"/v2/app/blobs/sha256:{'a' * 64}?ns={elsewhere}",
        f"/v2/app/tags/list?ns={elsewhere}",
        f"/v2/{elsewhere}/app/manifests/v1",
        f"/v2/{elsewhere}/app/blobs/sha256:{'a' * 64}",
        f"/v2/localhost:{upstream.port}/app/manifests/v1",
    ):
        status, _, body = proxy.get(path, {"Accept": ACCEPT_ALL})
        assert (status, json.loads(body)["errors"][0]["code"]) == (404, "NAME_UNKNOWN"), path
    assert foreign.authorizations == []
    assert upstream.requests() == []


@pytest.mark.parametrize(
    ("realm_host", "listed", "token_requests"),
    [
        ("127.0.0.1", {}, [("/token", UPSTREAM_BASIC)]),
        ("127.0.0.2", {"auth_hosts": ["127.0.0.2"]}, [("/token", UPSTREAM_BASIC)]),
        ("127.0.0.2", {"extra_hosts": ["127.0.0.2"]}, [("/token", None)]),
        ("127.0.0.2", {}, []),
        ("localhost", {}, []),
    ],
    ids=["upstream's own host", "its auth host", "its extra host", "another address", "a name"],
)
def test_token_realm_gets_credentials_only_on_the_upstreams_host(
    start_proxy: StartProxy,
    image: Image,
    realm_host: str,
    listed: dict[str, Any],
    token_requests: list[tuple[str, str | None]],
) -> None:
    token_host = "127.0.0.2" if realm_host == "127.0.0.2" else "127.0.0.1"
    with StandIn(image, "app") as registry, StandIn(image, "app", host=token_host) as tokens:
        realm = f"http://{realm_host}:{tokens.port}/token"
        registry.challenge = f'Bearer realm="{realm}",service="standin"'
        user, password = UPSTREAM_CREDS
        proxy = start_proxy(one_upstream(registry, username=user, password=password, **listed))

        status, _, body = proxy.get("/v2/test.local/app/manifests/v1", {"Accept": ACCEPT_ALL})

        assert tokens.authorizations == token_requests
        if token_requests:
            assert (status, body) == (200, image.raw)
            assert ("/v2/app/manifests/v1", "Bearer standin-token") in registry.authorizations
        else:
            assert (status, json.loads(body)["errors"][0]["code"]) == (502, "UNAVAILABLE")
        assert password not in proxy.log()


_EXTRA = {"extra_hosts": ("example.net",)}
_AUTH = {"auth_hosts": ("auth.example.com",)}


@pytest.mark.parametrize(
    ("url", "listed", "target", "allowed", "credentials"),
    [
        ("https://registry.example.co.uk", {}, "https://evil.co.uk", False, False),
        ("https://myco.azurecr.io", {}, "https://attacker.azurecr.io", False, False),
        ("https://myco.azurecr.io", {}, "https://MyCo.AzureCR.io.", True, True),
        ("https://registry.gitlab.com", {}, "https://gitlab.com", True, True),
        ("https://registry.gitlab.com", {}, "https://com", False, False),
        ("https://gitlab.com", {}, "https://registry.gitlab.com", False, False),
        ("http://127.0.0.1:5000", {}, "http://0.0.1", False, False),
        ("https://robot:pw@registry.example.com", {}, "https://registry.example.com", True, True),
        ("http://[::1]:5000", {}, "http://[::1]:5001", True, True),
        ("https://registry.example.com", {}, "http://registry.example.com", True, False),
        ("https://r.example.com", _EXTRA, "https://s.example.net", True, False),
        ("https://r.example.com", _EXTRA, "https://xexample.net", False, False),
        ("https://r.example.com", _AUTH, "https://auth.example.com", True, True),
        ("https://r.example.com", _AUTH, "http://auth.example.com", True, False),
        ("https://r.example.com", _AUTH, "https://x.auth.example.com", False, False),
    ],
)
def test_upstream_hosts_and_who_gets_credentials(
    url: str, listed: dict[str, Any], target: str, allowed: bool, credentials: bool
) -> None:
    """The API host and the domains above it, not a guess at registrable domains; credentials
    never in clear text."""
    upstream = UpstreamSettings("r", url, "robot", "pw", **listed)
    parsed = URL(target)
    assert host_allowed(parsed.host or "", upstream) == allowed
    assert receives_credentials(parsed.scheme, parsed.host or "", upstream) == credentials


@pytest.mark.parametrize(
    ("name", "host", "allowed", "credentials"),
    [
        ("docker.io", "auth.docker.io", True, True),
        ("docker.io", "production.cloudflare.docker.com", True, False),
        ("docker.io", "docker.io.evil.example", False, False),
        ("quay.io", "cdn02.quay.io", True, False),
        ("registry.redhat.io", "sso.redhat.com", True, True),
        ("ghcr.io", "pkg-containers.githubusercontent.com", True, False),
    ],
)
def test_known_registries_hosts_and_who_gets_credentials(
    name: str, host: str, allowed: bool, credentials: bool
) -> None:
    upstream = registry_upstream(name, None, "robot", "pw")
    assert host_allowed(host, upstream) == allowed
    assert receives_credentials("https", host, upstream) == credentials


@pytest.mark.parametrize(
    ("token_host", "followed"),
    [("127.0.0.1", True), ("127.0.0.2", False)],
    ids=["upstream's own host", "another address"],
)
def test_token_service_redirects_go_only_to_the_upstreams_hosts_without_credentials(
    start_proxy: StartProxy, image: Image, token_host: str, followed: bool
) -> None:
    with StandIn(image, "app") as registry, StandIn(image, "app", host=token_host) as tokens:
        registry.challenge = f'Bearer realm="{registry.url}/token",service="standin"'
        registry.token_redirect = tokens.url
        user, password = UPSTREAM_CREDS
        proxy = start_proxy(one_upstream(registry, username=user, password=password))

        status, _, body = proxy.get("/v2/test.local/app/manifests/v1", {"Accept": ACCEPT_ALL})

        if followed:
            assert (status, body) == (200, image.raw)
            assert tokens.authorizations == [("/token", None)]
        else:
            assert status == 502
            assert tokens.authorizations == []
        assert ("/token", UPSTREAM_BASIC) in registry.authorizations


@pytest.mark.parametrize(
    ("storage_host", "followed"),
    [("127.0.0.1", True), ("127.0.0.2", False)],
    ids=["upstream's own host", "another address"],
)
def test_blob_redirects_go_only_to_the_upstreams_hosts_without_credentials(
    tmp_path: Path, start_proxy: StartProxy, image: Image, storage_host: str, followed: bool
) -> None:
    with StandIn(image, "app") as registry, StandIn(image, "app", host=storage_host) as storage:
        registry.blob_redirect = storage.url
        registry.challenge = 'Basic realm="standin"'
        proxy = start_proxy(
            one_upstream(registry, username=UPSTREAM_CREDS[0], password=UPSTREAM_CREDS[1])
        )
        result = skopeo.copy(
            f"docker://{proxy.host}/test.local/app:v1",
            f"dir:{tmp_path / 'copy'}",
            check=False,
            timeout=60,
        )

        blobs = [path for path, _ in storage.authorizations if "/blobs/" in path]
        if followed:
            assert result.returncode == 0, result.stderr
            assert_same_image(skopeo.read_dir_copy(tmp_path / "copy"), image)
            assert sorted(blobs) == sorted(f"/v2/app/blobs/{d}" for d in image.blobs)
        else:
            assert result.returncode != 0
            assert blobs == []
        # Another origin never gets the upstream's credentials, even one it may redirect to.
        assert UPSTREAM_BASIC in {auth for _, auth in registry.authorizations}
        assert {auth for _, auth in storage.authorizations} <= {None}


def test_a_digest_alone_opens_no_other_repository(
    tmp_path: Path, upstream: Registry, basic_upstream: Registry, start_proxy: StartProxy
) -> None:
    """What the cache fetched with one repository's credentials reaches a client through
    another repository (or upstream) only once that upstream says the repository has it."""
    image = write_layout(tmp_path / "layout", "v1", None, [50_000], seed=24)
    push(image, basic_upstream.host, "private/app", creds=CREDS)
    push(image, upstream.host, "public/copy")
    user, password = CREDS.split(":")
    proxy = start_proxy(
        {
            "upstreams": [
                {
                    "name": "priv.local",
                    "url": basic_upstream.url,
                    "username": user,
                    "password": password,
                },
                {"name": "pub.local", "url": upstream.url},
            ],
            "default_upstream": "pub.local",
        }
    )
    skopeo.copy(f"docker://{proxy.host}/priv.local/private/app:v1", f"dir:{tmp_path / 'pulled'}")
    layer = image.layers[0]
    wait_for(lambda: layer.removeprefix("sha256:") in blob_files(proxy.data), "the layer stored")

    for name in ("pub.local/nobody/nothing", "priv.local/private/other", "nobody/nothing"):
        for kind, digest, code in (
            ("blobs", layer, "BLOB_UNKNOWN"),
            ("manifests", image.digest, "MANIFEST_UNKNOWN"),
        ):
            for method in ("GET", "HEAD"):
                status, _, body = proxy.get(f"/v2/{name}/{kind}/{digest}", method=method)
                assert status == 404, (name, kind, method)
                if method == "GET":
                    assert json.loads(body)["errors"][0]["code"] == code

    # A repository the other upstream does have gets the cached bytes, after one HEAD.
    upstream.clear_requests()
    status, _, body = proxy.get(f"/v2/pub.local/public/copy/blobs/{layer}")
    assert (status, body) == (200, image.blob_bytes(layer))
    assert upstream.blob_gets(layer) == 0
    # Pulled whole, its manifest there names the rest: no blob is fetched or asked about.
    upstream.clear_requests()
    skopeo.copy(f"docker://{proxy.host}/pub.local/public/copy:v1", f"dir:{tmp_path / 'copy'}")
    assert [request for request in upstream.requests() if "/blobs/" in request[1]] == []


def test_an_image_two_repositories_share_is_fetched_once_and_kept_for_both(
    tmp_path: Path, upstream: Registry, start_proxy: StartProxy
) -> None:
    """The second repository's index names what the first one fetched, all the way down: no
    blob is asked about, and after a restart both are served with the upstream gone."""
    image = write_layout(
        tmp_path / "layout", "v1", [("linux", "amd64"), ("linux", "arm64")], [20_000], seed=25
    )
    push(image, upstream.host, "first/app")
    push(image, upstream.host, "second/app")
    proxy = start_proxy(one_upstream(upstream))
    skopeo.copy(f"docker://{proxy.host}/test.local/first/app:v1", f"dir:{tmp_path / 'first'}")
    stored = {digest.removeprefix("sha256:") for digest in image.blobs}
    wait_for(lambda: stored <= blob_files(proxy.data), "the first pull stored")
    upstream.clear_requests()
    skopeo.copy(f"docker://{proxy.host}/test.local/second/app:v1", f"dir:{tmp_path / 'second'}")
    assert [request for request in upstream.requests() if "/blobs/" in request[1]] == []

    proxy.stop()
    upstream.stop()
    proxy.start()
    for name in ("first", "second"):
        copied = skopeo.copy(
            f"docker://{proxy.host}/test.local/{name}/app:v1",
            f"dir:{tmp_path / (name + '-offline')}",
        )
        assert copied.returncode == 0, name
        assert_same_image(skopeo.read_dir_copy(tmp_path / (name + "-offline")), image)
