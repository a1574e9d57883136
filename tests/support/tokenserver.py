"""A minimal Docker/distribution token server (the "Bearer realm" of token auth).

It exists so the proxy can be tested against a real distribution registry in
token-auth mode, the way Docker Hub, GHCR, Quay and Harbor work. It runs an
aiohttp app on its own event loop in a background thread, so synchronous and
async tests can both start and stop it, and it records every token request so
tests can assert that tokens are fetched and cached as intended.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import hashlib
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.lifecycle import StartStop
from tests.support.ports import free_port

DEFAULT_SERVICE = "registry-test"
DEFAULT_ISSUER = "test-issuer"

Policy = Callable[[str | None, str, str, list[str]], list[str]]
"""(user or None, resource type, resource name, requested actions) -> granted actions."""


@dataclass(frozen=True)
class TokenRequest:
    """One request to /token, whatever its outcome."""

    user: str | None
    """Login presented with HTTP Basic (None when anonymous), valid or not."""
    scope: str
    """Requested scopes joined by a space ("" when none)."""
    service: str | None
    status: int


def libtrust_key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """Key ID as distribution's libtrust computes it (what the JWT `kid` must be).

    base32 of the first 240 bits of SHA-256 over the DER SubjectPublicKeyInfo,
    48 characters in 12 colon-separated groups of 4.
    """
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    encoded = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(encoded[i : i + 4] for i in range(0, len(encoded), 4))


def _self_signed_cert(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "registry-cache test token issuer")])
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .sign(key, hashes.SHA256())
    )


def _parse_basic(header: str) -> tuple[str, str] | None:
    """(login, password) from a Basic Authorization header, None if malformed.

    Parsed by hand: aiohttp 3.14 deprecates BasicAuth, and deprecation
    warnings are errors in this test suite.
    """
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    login, sep, password = decoded.partition(":")
    return (login, password) if sep else None


def parse_scope(scope: str) -> tuple[str, str, list[str]] | None:
    """Split "repository:name:pull,push" into its parts (names may contain ':')."""
    rtype, sep, rest = scope.partition(":")
    name, sep2, actions = rest.rpartition(":")
    if not sep or not sep2 or not rtype or not name:
        return None
    return rtype, name, [a for a in actions.split(",") if a]


class TokenServer(StartStop):
    """Issues ES256 JWTs that a distribution registry configured with
    `auth.token` (issuer, service, rootcertbundle=`cert_path`) accepts.

    Authenticated users (HTTP Basic against `users`) get pull and push on any
    repository; anonymous requests get 401 unless `allow_anonymous`, in which
    case they get pull only. `policy` overrides who gets what.
    The signing key is made in the constructor so `cert_path` exists before
    the registry that trusts it is configured; the port is fixed too, so a
    restart keeps the same URL.
    """

    def __init__(
        self,
        workdir: Path,
        users: dict[str, str] | None = None,
        *,
        allow_anonymous: bool = False,
        expires_in: int = 300,
        service: str = DEFAULT_SERVICE,
        issuer: str = DEFAULT_ISSUER,
        policy: Policy | None = None,
    ) -> None:
        self.workdir = workdir
        self.users = dict(users or {})
        self.allow_anonymous = allow_anonymous
        self.expires_in = expires_in
        self.claimed_expires_in: int | None = None
        """What the JSON answer says the lifetime is, when it lies (None: the truth)."""
        self.service = service
        self.issuer = issuer
        self.policy = policy
        self.port = free_port()
        self._key = ec.generate_private_key(ec.SECP256R1())
        self.key_id = libtrust_key_id(self._key.public_key())
        workdir.mkdir(parents=True, exist_ok=True)
        self.cert_path = workdir / "token-issuer.pem"
        self.cert_path.write_bytes(
            _self_signed_cert(self._key).public_bytes(serialization.Encoding.PEM)
        )
        self._entries: list[TokenRequest] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    # -- addresses -------------------------------------------------------

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def realm(self) -> str:
        """What the registry puts in its Bearer challenge."""
        return f"{self.url}/token"

    # -- request log -----------------------------------------------------

    @property
    def entries(self) -> list[TokenRequest]:
        """Every /token request since start or the last `clear_requests()`."""
        with self._lock:
            return list(self._entries)

    @property
    def requests(self) -> list[tuple[str | None, str]]:
        """(user or None, scope) of every /token request, failed ones included."""
        return [(e.user, e.scope) for e in self.entries]

    @property
    def issued(self) -> int:
        """How many tokens were actually handed out."""
        return sum(1 for e in self.entries if e.status == 200)

    def clear_requests(self) -> None:
        with self._lock:
            self._entries.clear()

    # -- tokens ----------------------------------------------------------

    def grant(self, user: str | None, rtype: str, name: str, actions: list[str]) -> list[str]:
        """Actions `user` gets on a resource (see the class docstring)."""
        if self.policy is not None:
            return self.policy(user, rtype, name, actions)
        if rtype != "repository":
            return []
        allowed = {"pull", "push"} if user is not None else {"pull"}
        return [a for a in actions if a in allowed]

    def issue(
        self,
        user: str | None,
        scopes: list[str],
        *,
        audience: str | None = None,
        expires_in: int | None = None,
        now: dt.datetime | None = None,
    ) -> str:
        """Mint a token directly (also lets tests craft expired or foreign tokens)."""
        now = now or dt.datetime.now(dt.UTC)
        lifetime = self.expires_in if expires_in is None else expires_in
        access: list[dict[str, Any]] = []
        for scope in scopes:
            parsed = parse_scope(scope)
            if parsed is None:
                continue
            rtype, name, actions = parsed
            granted = self.grant(user, rtype, name, actions)
            access.append({"type": rtype, "name": name, "actions": granted})
        iat = int(now.timestamp())
        claims = {
            "iss": self.issuer,
            "sub": user or "",
            "aud": audience or self.service,
            "exp": iat + lifetime,
            "nbf": iat - 1,
            "iat": iat,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        return jwt.encode(claims, self._key, algorithm="ES256", headers={"kid": self.key_id})

    def public_key_pem(self) -> bytes:
        return self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    async def _handle_token(self, request: web.Request) -> web.Response:
        scopes: list[str] = []
        for value in request.query.getall("scope", []):
            scopes += value.split(" ")
        scopes = [s for s in scopes if s]
        service = request.query.get("service")

        user: str | None = None
        valid = False
        header = request.headers.get("Authorization")
        if header is not None:
            basic = _parse_basic(header)
            if basic is not None:
                user, password = basic
                valid = self.users.get(user) == password

        def done(status: int) -> None:
            with self._lock:
                self._entries.append(TokenRequest(user, " ".join(scopes), service, status))

        if service is not None and service != self.service:
            done(400)
            return web.json_response(
                {"errors": [{"code": "INVALID_REQUEST", "message": "unknown service"}]},
                status=400,
            )
        if (header is not None and not valid) or (header is None and not self.allow_anonymous):
            done(401)
            return web.json_response(
                {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]},
                status=401,
                headers={"WWW-Authenticate": 'Basic realm="registry-cache test token server"'},
            )
        now = dt.datetime.now(dt.UTC)
        token = self.issue(user if valid else None, scopes, now=now)
        done(200)
        return web.json_response(
            {
                "token": token,
                "access_token": token,
                "expires_in": (
                    self.expires_in if self.claimed_expires_in is None else self.claimed_expires_in
                ),
                "issued_at": now.isoformat(timespec="seconds").replace("+00:00", "Z"),
            }
        )

    # -- lifecycle -------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> TokenServer:
        """Serve on 127.0.0.1:`port` from a fresh loop in a daemon thread."""
        if self._thread is not None:
            raise RuntimeError("token server already running")
        loop = asyncio.new_event_loop()
        thread = threading.Thread(
            target=self._serve, args=(loop,), name=f"token-server-{self.port}", daemon=True
        )
        thread.start()
        self._loop, self._thread = loop, thread
        future: Future[None] = asyncio.run_coroutine_threadsafe(self._startup(), loop)
        try:
            future.result(timeout=10)
        except BaseException:
            self.stop()
            raise
        return self

    @staticmethod
    def _serve(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()

    async def _startup(self) -> None:
        app = web.Application()
        app.router.add_get("/token", self._handle_token)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        self._runner = runner
        await web.TCPSite(runner, "127.0.0.1", self.port).start()

    def stop(self) -> None:
        """Close the listener and open connections, then end the thread."""
        loop, thread, runner = self._loop, self._thread, self._runner
        if loop is None or thread is None:
            return
        if runner is not None:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        self._loop = self._thread = self._runner = None
