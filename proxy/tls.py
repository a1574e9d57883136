"""HTTPS: a TLS 1.2+ server context whose certificate follows its files.

The listening socket keeps one context for its whole life; a server-name callback, which
OpenSSL calls on every handshake (with or without SNI), hands each new connection the context
of the current certificate. Rotating the files therefore changes what new connections see and
leaves open connections alone.
"""

from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path
from typing import Final

from .settings import ConfigError, TlsSettings
from .watch import WatchedFiles

__all__ = ["server_context"]

# TLS 1.3 suites are all modern; for 1.2, forward secrecy with AEAD only.
_TLS12_CIPHERS: Final = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"
_CERT_KEY: Final = "tls.cert (REGISTRY_HTTP_TLS_CERTIFICATE)"
_KEY_KEY: Final = "tls.key (REGISTRY_HTTP_TLS_KEY)"


def _read(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from None


def _check_validity(pem: bytes, path: Path) -> None:
    """Refuse a certificate that every client would refuse: expired or not yet valid."""
    # Imported here: the parser is 14 MiB of resident memory that a cache without TLS never uses.
    from cryptography import x509

    try:
        leaf = x509.load_pem_x509_certificates(pem)[0]
    except ValueError:
        raise ConfigError(f"{_CERT_KEY}: {path} holds no PEM certificate") from None
    now = dt.datetime.now(dt.UTC)
    if leaf.not_valid_after_utc <= now:
        raise ConfigError(
            f"{_CERT_KEY}: the certificate in {path} expired on {leaf.not_valid_after_utc:%Y-%m-%d}"
        )
    if leaf.not_valid_before_utc > now:
        raise ConfigError(
            f"{_CERT_KEY}: the certificate in {path} is not valid before "
            f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
        )


def load_context(tls: TlsSettings) -> ssl.SSLContext:
    """A server context for the certificate (and key) as the files hold them now."""
    pem = _read(tls.cert, _CERT_KEY)
    _check_validity(pem, tls.cert)
    if tls.key is None and b"PRIVATE KEY-----" not in pem:
        raise ConfigError(
            f"{_CERT_KEY}: {tls.cert} holds no private key; append it to the file or set tls.key"
        )
    if tls.key is not None:
        _read(tls.key, _KEY_KEY)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(_TLS12_CIPHERS)
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    where, key_path = (_KEY_KEY, tls.key) if tls.key else (_CERT_KEY, tls.cert)

    def no_pass_phrase() -> bytes:
        """Called for an encrypted key: without it, OpenSSL asks the terminal for the pass
        phrase (or fails with a bare OSError when there is none)."""
        raise ConfigError(
            f"{where}: the private key in {key_path} is encrypted; give it without a pass "
            "phrase (openssl pkey -in KEY -out PLAIN)"
        )

    try:
        context.load_cert_chain(tls.cert, tls.key, password=no_pass_phrase)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise ConfigError(
                f"{where}: the private key does not match the certificate in {tls.cert}"
            ) from None
        raise ConfigError(f"{_CERT_KEY}: cannot use {tls.cert}: {exc.reason}") from None
    except OSError as exc:  # a file gone since it was read
        gone = exc.filename or f"{tls.cert} or {key_path}"
        raise ConfigError(f"{where}: cannot use {gone}: {exc.strerror}") from None
    return context


def server_context(tls: TlsSettings) -> ssl.SSLContext:
    """The listening socket's context; raises `ConfigError` for files that cannot serve."""
    paths = [tls.cert] if tls.key is None else [tls.cert, tls.key]
    current = WatchedFiles(paths, lambda: load_context(tls), f"TLS certificate {tls.cert}")
    context = current.current()

    def use_current(connection: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        connection.context = current.current()

    context.sni_callback = use_current
    return context
