"""Client auth: htpasswd (bcrypt) users, with real clients; probes open; brute force slowed."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import bcrypt
import pytest

from proxy import auth
from proxy.auth import Authenticator
from proxy.errors import RegistryError
from proxy.settings import AuthSettings
from tests.conftest import USERS, StartProxy, refused_start
from tests.support import skopeo
from tests.support.certs import CertificateAuthority
from tests.support.images import push, write_layout
from tests.support.podman import Podman
from tests.support.proxy import Proxy
from tests.support.registry import Registry, htpasswd_line
from tests.test_pull import assert_same_image, one_upstream

REALM = "registry-cache tests"
CHALLENGE = f'Basic realm="{REALM}"'


def write_users(path: Path, users: dict[str, str]) -> Path:
    """Replace the file in one rename, as an operator's tooling would."""
    staged = path.with_name(path.name + ".new")
    staged.write_text("".join(htpasswd_line(u, p) + "\n" for u, p in users.items()))
    os.replace(staged, path)
    return path


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def auth_config(htpasswd: Path, **extra: Any) -> dict[str, Any]:
    return {"auth": {"htpasswd": {"path": str(htpasswd), "realm": REALM}, **extra}}


def assert_refused(proxy: Proxy, path: str, headers: dict[str, str] | None = None) -> bytes:
    status, got, body = proxy.get(path, headers)
    assert status == 401, (path, status, body)
    assert got["WWW-Authenticate"] == CHALLENGE
    assert json.loads(body)["errors"][0]["code"] == "UNAUTHORIZED"
    return body


def test_htpasswd_users_pull_and_nobody_else(
    tmp_path: Path, upstream: Registry, start_proxy: StartProxy
) -> None:
    image = write_layout(tmp_path / "layout", "v1", None, [200_000, 50_000], seed=31)
    push(image, upstream.host, "team/app")
    users = write_users(tmp_path / "htpasswd", {"alice": "wonderland", "bob": "builder"})
    proxy = start_proxy({**one_upstream(upstream), **auth_config(users)})
    manifest = "/v2/test.local/team/app/manifests/v1"
    upstream.clear_requests()

    for path in (
        "/v2/",
        manifest,
        f"/v2/test.local/team/app/blobs/{image.layers[0]}",
        "/status.json",
        "/metrics",
        "/no/such/route",
    ):
        assert_refused(proxy, path)
    wrong = assert_refused(proxy, manifest, basic("alice", "not-her-password"))
    unknown = assert_refused(proxy, manifest, basic("mallory", "not-her-password"))
    assert wrong == unknown, "the answer must not tell whether a user exists"
    assert_refused(proxy, manifest, {"Authorization": "Bearer alice"})
    assert upstream.requests() == [], "nothing unauthenticated reaches the upstream"

    for path in ("/healthz", "/readyz"):
        assert proxy.get(path)[0] == 200, path
    assert proxy.get("/v2/", basic("bob", "builder"))[0] == 200
    assert proxy.get("/metrics", basic("bob", "builder"))[0] == 200

    ref = f"docker://{proxy.host}/test.local/team/app:v1"
    anonymous = skopeo.copy(ref, f"dir:{tmp_path / 'anon'}", check=False, timeout=60)
    assert anonymous.returncode != 0 and "unauthorized" in anonymous.stderr.lower()
    bad = skopeo.run(
        ["inspect", "--tls-verify=false", "--creds", "alice:wrong", ref], check=False, timeout=60
    )
    assert bad.returncode != 0 and "unauthorized" in bad.stderr.lower()
    skopeo.copy(ref, f"dir:{tmp_path / 'copy'}", src_creds="alice:wonderland")
    assert_same_image(skopeo.read_dir_copy(tmp_path / "copy"), image)

    pulled = [e for e in proxy.access_log() if e["path"] == manifest and e["status"] == 200]
    assert pulled and {e["user"] for e in pulled} == {"alice"}
    assert "wonderland" not in proxy.log() and "not-her-password" not in proxy.log()


def test_every_method_on_every_path_needs_credentials_but_the_probes(
    tmp_path: Path, upstream: Registry, start_proxy: StartProxy
) -> None:
    users = write_users(tmp_path / "htpasswd", {"alice": "wonderland"})
    proxy = start_proxy({**one_upstream(upstream), **auth_config(users)})
    blob = "/v2/test.local/team/app/blobs/sha256:" + "0" * 64
    paths = ["/", "/status", "/status.json", "/metrics", "/v2", "/v2/", "/v2/_catalog", blob]
    paths += ["/v2/test.local/team/app/manifests/v1", "/no/such/route", "/healthz", "/readyz"]
    methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "PROPFIND"]
    answers = {}
    for path in paths:
        for method in methods:
            status, headers, _ = proxy.get(path, method=method)
            answers[method, path] = status
            if status == 401:
                assert headers["WWW-Authenticate"] == CHALLENGE, (method, path)
    open_ones = {(m, p) for m in ("GET", "HEAD") for p in ("/healthz", "/readyz")}
    assert {key for key, status in answers.items() if status != 401} == open_ones
    assert all(answers[key] == 200 for key in open_ones)

    # A method the API does not use is counted under a name of ours: clients cannot add
    # series at will.
    status, _, metrics = proxy.get("/metrics", basic("alice", "wonderland"))
    assert status == 200 and b'method="other"' in metrics and b"PROPFIND" not in metrics


def test_podman_login_then_pull_over_tls(
    tmp_path: Path, upstream: Registry, start_proxy: StartProxy
) -> None:
    ca = CertificateAuthority(tmp_path / "ca")
    image = write_layout(tmp_path / "layout", "latest", None, [150_000], seed=32)
    push(image, upstream.host, "podman/hello")
    users = write_users(tmp_path / "htpasswd", {"alice": "wonderland"})
    config = {
        **one_upstream(upstream),
        **auth_config(users),
        "tls": {"cert": str(ca.issue().write_combined(tmp_path / "certs.pem"))},
    }
    proxy = start_proxy(config, tls=ca.client_context())
    authfile = tmp_path / "auth.json"
    trust = ["--authfile", str(authfile), "--cert-dir", str(ca.cert_dir)]
    ref = f"{proxy.host}/test.local/podman/hello:latest"

    with Podman(tmp_path / "podman") as podman:
        refused = podman.run(
            ["login", *trust, "-u", "alice", "-p", "guess", proxy.host], check=False
        )
        assert refused.returncode != 0 and not authfile.exists()
        assert podman.run(["pull", *trust, ref], check=False).returncode != 0

        podman.run(["login", *trust, "-u", "alice", "-p", "wonderland", proxy.host])
        podman.run(["pull", *trust, ref])
        assert podman.image_digest(ref) == image.digest

        # deploy/README.md's registries.conf: the cache as the mirror of a registry, over TLS,
        # with the login above.
        registries = tmp_path / "registries.conf"
        registries.write_text(
            '[[registry]]\nlocation = "test.local"\n'
            f'[[registry.mirror]]\nlocation = "{proxy.host}/test.local"\n'
        )
        podman.run(["pull", *trust, "test.local/podman/hello:latest"], registries_conf=registries)
        assert podman.image_digest("test.local/podman/hello:latest") == image.digest
    assert proxy.host in json.loads(authfile.read_text())["auths"]


@pytest.mark.parametrize(
    ("kind", "named"),
    [("-m", "MD5"), ("-s", "SHA-1"), ("-d", "crypt"), ("-p", "plain text")],
)
def test_only_bcrypt_entries_are_accepted(tmp_path: Path, kind: str, named: str) -> None:
    users = tmp_path / "htpasswd"
    users.write_text(
        htpasswd_line("alice", "wonderland") + "\n" + htpasswd_line("bob", "pw", kind) + "\n"
    )
    said = refused_start(tmp_path / "cache", auth_config(users))
    assert "auth.htpasswd.path (REGISTRY_AUTH_HTPASSWD_PATH)" in said
    assert "line 2: only bcrypt entries (htpasswd -B) are supported" in said
    assert named in said


def test_environment_turns_auth_on_as_distribution_reads_it(
    tmp_path: Path, upstream: Registry, start_proxy: StartProxy
) -> None:
    users = write_users(tmp_path / "htpasswd", {"alice": "wonderland"})
    proxy = start_proxy(
        one_upstream(upstream),
        {
            "REGISTRY_AUTH": "htpasswd",
            "REGISTRY_AUTH_HTPASSWD_PATH": str(users),
            "REGISTRY_AUTH_HTPASSWD_REALM": REALM,
        },
    )
    assert_refused(proxy, "/v2/")
    assert proxy.get("/v2/", basic("alice", "wonderland"))[0] == 200
    said = refused_start(tmp_path / "other", {}, {"REGISTRY_AUTH": "token"})
    assert "REGISTRY_AUTH: only htpasswd is supported" in said


def test_htpasswd_changes_apply_to_the_next_request(
    tmp_path: Path, upstream: Registry, start_proxy: StartProxy
) -> None:
    users = write_users(tmp_path / "htpasswd", {"alice": "wonderland"})
    proxy = start_proxy({**one_upstream(upstream), **auth_config(users)})
    assert proxy.get("/v2/", basic("alice", "wonderland"))[0] == 200
    assert_refused(proxy, "/v2/", basic("carol", "secret"))

    write_users(users, {"carol": "secret"})
    assert proxy.get("/v2/", basic("carol", "secret"))[0] == 200
    assert_refused(proxy, "/v2/", basic("alice", "wonderland"))

    # A file that cannot be used (or is gone) lets nobody in, not the last good users: the
    # edit may have been removing one.
    users.write_text(htpasswd_line("carol", "secret") + "\nbob:$apr1$broken$entry\n")
    assert_refused(proxy, "/v2/", basic("carol", "secret"))
    assert "htpasswd file changed but cannot be used, using none instead" in proxy.log()
    write_users(users, {"carol": "secret"})
    assert proxy.get("/v2/", basic("carol", "secret"))[0] == 200
    users.unlink()
    assert_refused(proxy, "/v2/", basic("carol", "secret"))


def _status_from(proxy: Proxy, source: str, headers: dict[str, str]) -> tuple[int, str | None]:
    connection = http.client.HTTPConnection(
        "127.0.0.1", proxy.port, timeout=30, source_address=(source, 0)
    )
    try:
        connection.request("GET", "/v2/", headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status, response.getheader("Retry-After")
    finally:
        connection.close()


def test_repeated_failures_from_one_address_are_slowed_down(
    tmp_path: Path, upstream: Registry, start_proxy: StartProxy
) -> None:
    users = write_users(tmp_path / "htpasswd", {"alice": "wonderland", "bob": "builder"})
    proxy = start_proxy({**one_upstream(upstream), **auth_config(users)})
    assert _status_from(proxy, "127.0.0.1", basic("alice", "wonderland")) == (200, None)

    for attempt in range(5):
        assert _status_from(proxy, "127.0.0.1", basic("alice", f"guess{attempt}"))[0] == 401
    # Now a pair not verified before is not even checked, even the right one: guessing goes
    # no faster than the wait.
    status, retry_after = _status_from(proxy, "127.0.0.1", basic("bob", "builder"))
    assert status == 429 and retry_after is not None and int(retry_after) >= 1
    # One that was still passes: a client guessing does not lock out the others behind the
    # same address.
    assert _status_from(proxy, "127.0.0.1", basic("alice", "wonderland")) == (200, None)
    assert _status_from(proxy, "127.0.0.2", basic("bob", "builder")) == (200, None)
    assert _status_from(proxy, "127.0.0.3", {})[0] == 401
    assert "slowed down" in proxy.log()


async def test_concurrent_guesses_get_no_more_bcrypt_checks_than_sequential_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    authenticator = Authenticator(AuthSettings(write_users(tmp_path / "htpasswd", USERS)))
    checked_on: set[str] = set()

    def checkpw(password: str, hashed: bytes) -> bool:
        checked_on.add(threading.current_thread().name)
        return bcrypt.checkpw(password.encode(), hashed)

    monkeypatch.setattr(auth, "_checkpw", checkpw)
    guesses = [basic("alice", f"guess{n}")["Authorization"] for n in range(60)]

    outcomes = await asyncio.gather(
        *(authenticator.authenticate(guess, "192.0.2.1") for guess in guesses),
        return_exceptions=True,
    )

    statuses = Counter(outcome.status for outcome in outcomes if isinstance(outcome, RegistryError))
    assert statuses == {401: 5, 429: 55}
    # On threads of their own, so that a flood of logins cannot hold up blob I/O.
    assert len(checked_on) <= 2 and all(name.startswith("bcrypt") for name in checked_on)


def test_metrics_can_be_opened_to_a_scraper_without_credentials(
    tmp_path: Path, upstream: Registry, start_proxy: StartProxy
) -> None:
    users = write_users(tmp_path / "htpasswd", {"alice": "wonderland"})
    proxy = start_proxy({**one_upstream(upstream), **auth_config(users, protect_metrics=False)})
    status, _, body = proxy.get("/metrics")
    assert status == 200 and b"registry_cache_" in body
    assert_refused(proxy, "/v2/")
