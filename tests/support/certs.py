"""Real certificates made by the tests: a CA, and server certificates for 127.0.0.1 it signs."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

_DAY = dt.timedelta(days=1)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass(frozen=True)
class ServerCert:
    """A server certificate: its chain (leaf first, then the CA) and its key, as PEM."""

    chain: bytes
    key: bytes
    serial: int

    def write_combined(self, path: Path) -> Path:
        """The `certs.pem` convention: chain and key in one file."""
        path.write_bytes(self.chain + self.key)
        return path

    def write_apart(self, cert: Path, key: Path) -> tuple[Path, Path]:
        cert.write_bytes(self.chain)
        key.write_bytes(self.key)
        return cert, key


class CertificateAuthority:
    """A test CA; clients trust it through `ca_file`, `cert_dir` or `client_context()`."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(_name("registry-cache test CA"))
            .issuer_name(_name("registry-cache test CA"))
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY)
            .not_valid_after(now + 30 * _DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.pem = self._cert.public_bytes(serialization.Encoding.PEM)
        self.cert_dir = workdir / "certs.d"
        """A directory with `ca.crt`, as skopeo's and podman's --cert-dir want it."""
        self.cert_dir.mkdir(exist_ok=True)
        self.ca_file = self.cert_dir / "ca.crt"
        self.ca_file.write_bytes(self.pem)

    def issue(
        self,
        host: str = "127.0.0.1",
        *,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> ServerCert:
        """A server certificate for an IP address, valid now unless told otherwise."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(host))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(not_before or now - _DAY)
            .not_valid_after(not_after or now + 7 * _DAY)
            .add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        chain = cert.public_bytes(serialization.Encoding.PEM) + self.pem
        return ServerCert(chain, _key_pem(key), serial)

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts this CA only."""
        return ssl.create_default_context(cafile=str(self.ca_file))


def peer_serial(der: bytes | None) -> int:
    """The serial number of the certificate a server presented (from `getpeercert(True)`)."""
    assert der is not None, "no peer certificate"
    return x509.load_der_x509_certificate(der).serial_number
