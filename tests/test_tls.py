"""HTTPS with real certificates: certs.pem or a separate key, TLS 1.2+, rotation, bad files."""

from __future__ import annotations

import datetime as dt
import http.client
import os
import socket
import ssl
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from tests.conftest import StartProxy, refused_start
from tests.support import skopeo
from tests.support.certs import CertificateAuthority, ServerCert, peer_serial
from tests.support.images import push, write_layout
from tests.support.registry import Registry
from tests.test_pull import assert_same_image, one_upstream


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority(tmp_path_factory.mktemp("ca"))


def _handshake(port: int, context: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return context.wrap_socket(raw, server_hostname="127.0.0.1")


@pytest.mark.parametrize("layout", ["certs.pem", "separate key from the environment"])
def test_skopeo_pulls_over_tls_trusting_the_test_ca(
    tmp_path: Path,
    upstream: Registry,
    start_proxy: StartProxy,
    ca: CertificateAuthority,
    layout: str,
) -> None:
    image = write_layout(tmp_path / "layout", "v1", None, [300_000], seed=21)
    push(image, upstream.host, "secure/app")
    server = ca.issue()
    config = one_upstream(upstream)
    env = {}
    if layout == "certs.pem":
        config["tls"] = {"cert": str(server.write_combined(tmp_path / "certs.pem"))}
    else:
        cert, key = server.write_apart(tmp_path / "cert.pem", tmp_path / "key.pem")
        env = {"REGISTRY_HTTP_TLS_CERTIFICATE": str(cert), "REGISTRY_HTTP_TLS_KEY": str(key)}
    proxy = start_proxy(config, env, tls=ca.client_context())

    skopeo.copy(
        f"docker://{proxy.host}/test.local/secure/app:v1",
        f"dir:{tmp_path / 'copy'}",
        src_cert_dir=ca.cert_dir,
    )
    assert_same_image(skopeo.read_dir_copy(tmp_path / "copy"), image)

    with _handshake(proxy.port, ca.client_context()) as tls:
        assert peer_serial(tls.getpeercert(binary_form=True)) == server.serial
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
    tls12 = ca.client_context()
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    with _handshake(proxy.port, tls12) as tls:
        negotiated = tls.cipher()
        assert negotiated is not None
        cipher = negotiated[0]
        assert cipher.startswith("ECDHE-") and ("GCM" in cipher or "CHACHA20" in cipher)
    old = ca.client_context()
    with warnings.catch_warnings(action="ignore", category=DeprecationWarning):
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("ALL:@SECLEVEL=0")
    with pytest.raises(ssl.SSLError, match=r"PROTOCOL_VERSION|protocol version|UNEXPECTED_EOF"):
        _handshake(proxy.port, old).close()
    plain = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    with pytest.raises((OSError, http.client.HTTPException)):
        plain.request("GET", "/healthz")
        plain.getresponse().read()
    plain.close()


def test_rotated_certificate_is_served_without_dropping_connections(
    tmp_path: Path, upstream: Registry, start_proxy: StartProxy, ca: CertificateAuthority
) -> None:
    first, second = ca.issue(), ca.issue()
    certs = first.write_combined(tmp_path / "certs.pem")
    proxy = start_proxy(
        {**one_upstream(upstream), "tls": {"cert": str(certs)}}, tls=ca.client_context()
    )
    held = http.client.HTTPSConnection("127.0.0.1", proxy.port, context=ca.client_context())
    held.request("GET", "/healthz")
    assert held.getresponse().read() == b'{"status": "ok"}'
    assert held.sock is not None
    held_socket = held.sock
    assert peer_serial(held_socket.getpeercert(binary_form=True)) == first.serial

    # As cert-manager and kubelet do: the new file replaces the old in one rename.
    second.write_combined(tmp_path / "certs.pem.new")
    os.replace(tmp_path / "certs.pem.new", certs)

    with _handshake(proxy.port, ca.client_context()) as fresh:
        assert peer_serial(fresh.getpeercert(binary_form=True)) == second.serial
    held.request("GET", "/healthz")
    assert held.getresponse().status == 200
    assert held.sock is held_socket, "the connection opened before the rotation was kept"
    held.close()

    # A broken replacement (key missing) is not taken: the last good certificate stays.
    certs.write_bytes(first.chain)
    with _handshake(proxy.port, ca.client_context()) as fresh:
        assert peer_serial(fresh.getpeercert(binary_form=True)) == second.serial
    assert "cannot be used, keeping the previous one" in proxy.log()


def _expired(ca: CertificateAuthority) -> ServerCert:
    now = dt.datetime.now(dt.UTC)
    return ca.issue(not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1))


@pytest.mark.parametrize(
    ("problem", "message"),
    [
        ("expired", "tls.cert (REGISTRY_HTTP_TLS_CERTIFICATE): the certificate in"),
        ("mismatched key", "tls.key (REGISTRY_HTTP_TLS_KEY): the private key does not match"),
        ("no key", "holds no private key"),
        ("not a certificate", "holds no PEM certificate"),
        ("encrypted key", "tls.key (REGISTRY_HTTP_TLS_KEY): the private key in"),
    ],
)
def test_unusable_certificate_stops_start_up(
    tmp_path: Path, ca: CertificateAuthority, problem: str, message: str
) -> None:
    good, other = ca.issue(), ca.issue()
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    tls = {"cert": str(cert), "key": str(key)}
    if problem == "expired":
        _expired(ca).write_apart(cert, key)
    elif problem == "mismatched key":
        cert.write_bytes(good.chain)
        key.write_bytes(other.key)
    elif problem == "no key":
        cert.write_bytes(good.chain)
        tls = {"cert": str(cert)}
    elif problem == "encrypted key":
        cert.write_bytes(good.chain)
        key.write_bytes(
            serialization.load_pem_private_key(good.key, None).private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"pass phrase"),
            )
        )
    else:
        cert.write_bytes(good.key)
        key.write_bytes(good.key)

    said = refused_start(tmp_path / "cache", {"tls": tls})
    assert message in said
    if problem == "expired":
        assert "expired on" in said
    if problem == "encrypted key":
        assert "is encrypted" in said and "pass phrase:" not in said
    assert "PRIVATE KEY" not in said and "Traceback" not in said


def test_health_command_probes_the_running_cache_over_tls(
    tmp_path: Path, upstream: Registry, start_proxy: StartProxy, ca: CertificateAuthority
) -> None:
    certs = ca.issue().write_combined(tmp_path / "certs.pem")
    proxy = start_proxy(
        {**one_upstream(upstream), "tls": {"cert": str(certs)}}, tls=ca.client_context()
    )

    def probe(*args: str) -> int:
        command = [sys.executable, "-m", "proxy.cli", "--config", str(proxy.config_path)]
        return subprocess.run([*command, "health", *args], timeout=30, check=False).returncode

    assert (probe(), probe("--ready")) == (0, 0)
    proxy.stop()
    assert probe() == 1
