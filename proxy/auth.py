"""Client auth: HTTP Basic against an htpasswd file of bcrypt entries, as distribution does.

bcrypt is slow on purpose, so a check runs in a thread of its own small pool (a flood of
logins must not take the threads blob I/O uses) and a verified user/password pair is
remembered for a while (a pull is dozens of requests with the same credentials). The answer to
wrong credentials never tells whether the user exists: an unknown user costs a bcrypt check
like a known one and gets the same 401. An address that keeps failing is made to wait, longer
each time, before its next attempt is even checked; attempts still being checked count, so
that concurrent guesses get no more checks than sequential ones. A pair verified before still
passes while its address waits: one client guessing must not lock out the others behind the
same address.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import functools
import hmac
import logging
import math
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import bcrypt
from aiohttp import web

from . import errors
from .errors import RegistryError
from .flight import SingleFlight
from .settings import AuthSettings, ConfigError
from .typedefs import Guard, Handler
from .watch import WatchedFiles

__all__ = ["AUTH_USER", "Authenticator", "read_htpasswd", "require_user"]

log = logging.getLogger(__name__)

AUTH_USER: Final = "auth_user"
"""The request key under which the authenticated user's name is kept (for the access log)."""

_KEY: Final = "auth.htpasswd.path (REGISTRY_AUTH_HTPASSWD_PATH)"
_BCRYPT_PREFIXES: Final = (b"$2a$", b"$2b$", b"$2y$")
# How long a verified user/password pair is trusted without running bcrypt again, and let
# through while its address is slowed down (the throttle's memory, at least).
_VERIFIED_TTL: Final = 900.0
_VERIFIED_MAX: Final = 4096
# bcrypt checks at a time: each takes a core for a quarter of a second.
_BCRYPT_THREADS: Final = 2
# Failures an address may make before it must wait; the wait doubles with each further one.
_FREE_FAILURES: Final = 5
_FIRST_WAIT: Final = 1.0
_MAX_WAIT: Final = 60.0
_FORGET_AFTER: Final = 900.0
_MAX_TRACKED: Final = 10_000


def _kind(hashed: bytes) -> str:
    """A name for a non-bcrypt htpasswd hash, for the start-up message."""
    if hashed.startswith(b"$apr1$"):
        return "MD5 (htpasswd -m)"
    if hashed.startswith(b"{SHA}"):
        return "SHA-1 (htpasswd -s)"
    if hashed.startswith((b"$5$", b"$6$")):
        return "SHA-crypt"
    if len(hashed) == 13:
        return "crypt (htpasswd -d)"
    return "not a recognised hash (plain text?)"


@dataclass(frozen=True, slots=True)
class Users:
    """The htpasswd file's bcrypt hashes by user name."""

    hashes: Mapping[str, bytes]

    @property
    def decoy(self) -> bytes | None:
        """A real hash to check unknown users against, so that they cost as much as known ones."""
        return next(iter(self.hashes.values()), None)


def read_htpasswd(path: Path) -> Users:
    """Parse `user:hash` lines; anything but bcrypt is refused with the line that has it."""
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{_KEY}: cannot read {path}: {exc.strerror}") from None
    hashes: dict[str, bytes] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith(b"#"):
            continue
        user, sep, hashed = line.partition(b":")
        if not sep or not user:
            raise ConfigError(f"{_KEY}: {path} line {number} is not user:hash")
        if not hashed.startswith(_BCRYPT_PREFIXES):
            raise ConfigError(
                f"{_KEY}: {path} line {number}: only bcrypt entries (htpasswd -B) are "
                f"supported, this one is {_kind(hashed)}"
            )
        hashes[user.decode(errors="replace")] = hashed
    return Users(hashes)


def _parse_basic(header: str) -> tuple[str, str] | None:
    """User and password from `Basic base64(user:password)`; None if it is not that."""
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep and user else None


def _checkpw(password: str, hashed: bytes) -> bool:
    """bcrypt's verdict; blocking, run it in a thread. Over 72 bytes is refused, as Go does."""
    try:
        return bcrypt.checkpw(password.encode(), hashed)
    except ValueError:
        return False


@dataclass(slots=True)
class _Attempts:
    """An address's failures (forgotten `_FORGET_AFTER` after the last) and checks under way."""

    failed: int
    checking: int
    last: float
    blocked_until: float


class Throttle:
    """Failed attempts per client address, and how long each must wait before the next."""

    def __init__(self) -> None:
        self._by_address: dict[str, _Attempts] = {}

    def admit(self, address: str) -> float:
        """Seconds before `address` may try again; 0 when it may now, and then the attempt
        counts as checking until `settle`. Attempts being checked count as failures here:
        they may be."""
        now = time.monotonic()
        record = self._by_address.get(address)
        if record is None or (now - record.last > _FORGET_AFTER and not record.checking):
            if len(self._by_address) >= _MAX_TRACKED:
                self._forget_old(now)
            record = self._by_address[address] = _Attempts(0, 0, now, now)
        if record.blocked_until > now:
            return record.blocked_until - now
        if record.checking and record.failed + record.checking >= _FREE_FAILURES:
            return _FIRST_WAIT
        record.checking += 1
        return 0.0

    def settle(self, address: str, *, failed: bool) -> None:
        """The outcome of an attempt `admit` let through."""
        record = self._by_address[address]
        record.checking -= 1
        if not failed:
            return
        now = time.monotonic()
        record.failed += 1
        record.last = now
        beyond = record.failed - _FREE_FAILURES
        if beyond >= 0:
            record.blocked_until = now + min(_FIRST_WAIT * 2**beyond, _MAX_WAIT)
            log.warning("%d failed logins from %s: slowed down", record.failed, address)

    def _forget_old(self, now: float) -> None:
        for address, record in list(self._by_address.items()):
            if record.checking:
                continue
            if now - record.last > _FORGET_AFTER or len(self._by_address) >= _MAX_TRACKED:
                del self._by_address[address]


class Authenticator:
    """Decides whether a request's `Authorization` names a user of the htpasswd file."""

    def __init__(self, settings: AuthSettings) -> None:
        self.settings = settings
        # A file that turns unreadable or invalid lets nobody in: it may be how users went.
        self._users = WatchedFiles(
            [settings.htpasswd],
            lambda: read_htpasswd(settings.htpasswd),
            "htpasswd file",
            broken=Users({}),
        )
        self._secret = secrets.token_bytes(32)
        self._verified: dict[bytes, float] = {}
        self._checks: SingleFlight[bytes, bool] = SingleFlight()
        self._bcrypt = concurrent.futures.ThreadPoolExecutor(
            _BCRYPT_THREADS, thread_name_prefix="bcrypt"
        )
        self.throttle = Throttle()

    def close(self) -> None:
        """Stop the bcrypt threads: queued checks are dropped, and one still running ends on
        its own without holding up the event loop."""
        self._bcrypt.shutdown(wait=False, cancel_futures=True)

    def _challenge(self, detail: str | None = None) -> RegistryError:
        return RegistryError(
            errors.UNAUTHORIZED,
            detail,
            headers={"WWW-Authenticate": f'Basic realm="{self.settings.realm}"'},
        )

    async def authenticate(self, header: str | None, address: str) -> str:
        """The user the request is from; raises the 401 (or 429) the client must see."""
        credentials = None if header is None else _parse_basic(header)
        if credentials is None:
            # Nothing to check, so nothing guessed: no bcrypt, no count.
            raise self._challenge(None if header is None else "invalid username or password")
        user, password = credentials
        users = self._users.current()
        hashed = users.hashes.get(user)
        # The key binds the stored hash too: a changed or removed entry is a miss.
        key = hmac.digest(
            self._secret, b"\0".join([user.encode(), password.encode(), hashed or b""]), "sha256"
        )
        if hashed is not None and self._verified.get(key, 0.0) > time.monotonic():
            return user
        wait = self.throttle.admit(address)
        if wait > 0:
            raise RegistryError(
                errors.TOOMANYREQUESTS,
                "too many failed logins from this address",
                headers={"Retry-After": str(math.ceil(wait))},
            )
        valid = False
        try:
            valid = await self._check(key, password, hashed, users.decoy)
        finally:
            self.throttle.settle(address, failed=not valid)
        if not valid:
            raise self._challenge("invalid username or password")
        return user

    async def _check(
        self, key: bytes, password: str, hashed: bytes | None, decoy: bytes | None
    ) -> bool:
        """bcrypt's verdict on the pair `key` stands for, remembered when it is a yes; an
        unknown user is checked against another user's hash (`decoy`), to take as long."""
        against = hashed or decoy
        if against is None:
            return False
        loop = asyncio.get_running_loop()
        valid = await self._checks.do(
            key, lambda: loop.run_in_executor(self._bcrypt, _checkpw, password, against)
        )
        if not (valid and hashed is not None):
            return False
        now = time.monotonic()
        if len(self._verified) >= _VERIFIED_MAX:
            self._verified = {k: t for k, t in self._verified.items() if t > now}
            if len(self._verified) >= _VERIFIED_MAX:
                self._verified.clear()
        self._verified[key] = now + _VERIFIED_TTL
        return True


def require_user(authenticator: Authenticator) -> Guard:
    """A route wrapper that asks for credentials (the probes, and /metrics with
    `auth.protect_metrics: false`, are wrapped without it)."""

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def with_user(request: web.BaseRequest) -> web.StreamResponse:
            request[AUTH_USER] = await authenticator.authenticate(
                request.headers.get("Authorization"), request.remote or ""
            )
            return await handler(request)

        return with_user

    return wrap
