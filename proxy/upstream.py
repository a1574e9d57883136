"""The registry client: one connection pool per upstream, auth, redirects, error mapping.

A request goes through four short steps: `request` maps the outcome to our error tree,
`_send_with_retries` retries what may pass on a second try, `_send_with_auth` answers one 401
challenge (Basic, or Bearer with a token fetched and cached per scope), and
`_send_following_redirects` follows redirects to blob storage without the upstream's
Authorization (distribution-spec: clients "MUST NOT forward Authorization headers
across host boundaries") and only to hosts the upstream is known to use.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import re
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Final

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from .errors import (
    UpstreamAnswerTooLarge,
    UpstreamError,
    UpstreamNotFound,
    UpstreamRateLimited,
    UpstreamStatusError,
    UpstreamUnauthorized,
    UpstreamUnavailable,
)
from .flight import SingleFlight
from .memo import LRU
from .metrics import Metrics
from .reachability import Reachability
from .settings import UpstreamSettings, host_allowed, receives_credentials

__all__ = ["RateLimit", "UpstreamClient", "next_page_query", "read_body", "token_lifetime"]

log = logging.getLogger(__name__)

_MAX_REDIRECTS: Final = 5
_RETRY_PAUSES: Final = (0.2, 1.0)
_RETRY_STATUSES: Final = frozenset({502, 503, 504})
_USER_AGENT: Final = "registry-cache/0.1"
_CHALLENGE_PARAM: Final = re.compile(r'(\w+)\s*=\s*(?:"([^"]*)"|([^\s,]+))')
# A token is reused until this many seconds before it expires.
_TOKEN_MARGIN: Final = 10.0
# Tokens kept per upstream: one per repository pulled lately.
_TOKENS_KEPT: Final = 1000


@dataclass(frozen=True, slots=True)
class RateLimit:
    """Docker Hub's `RateLimit-Limit`/`RateLimit-Remaining`, as last seen."""

    limit: int | None
    remaining: int | None

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> RateLimit | None:
        """The limits a response announced, if it announced any."""
        if "RateLimit-Limit" not in headers and "RateLimit-Remaining" not in headers:
            return None
        return cls(
            _rate_limit_value(headers.get("RateLimit-Limit")),
            _rate_limit_value(headers.get("RateLimit-Remaining")),
        )


@dataclass(slots=True)
class _Token:
    value: str
    expires_at: float


class TokenCache:
    """Tokens by scope, the least recently used and the expired dropped first: a token is
    fetched per repository, so keeping them all would grow with every name clients try."""

    def __init__(self, limit: int = _TOKENS_KEPT) -> None:
        self._by_scope: LRU[str, _Token] = LRU(limit)

    def get(self, scope: str) -> _Token | None:
        """The token for `scope` if it is still good."""
        token = self._by_scope.get(scope)
        if token is not None and token.expires_at <= time.monotonic():
            self._by_scope.discard(scope)
            return None
        return token

    def put(self, scope: str, token: _Token) -> None:
        """Kept; when full, the expired leave before any good one."""
        if len(self._by_scope) >= self._by_scope.limit:
            now = time.monotonic()
            for expired, held in self._by_scope.items():
                if held.expires_at <= now:
                    self._by_scope.discard(expired)
        self._by_scope.put(scope, token)

    def discard(self, scope: str, sent: str | None) -> None:
        """Forget the token for `scope` if it is the one `sent` (an Authorization header): one a
        concurrent request has just fetched instead is left alone."""
        token = self._by_scope.get(scope)
        if token is not None and sent == f"Bearer {token.value}":
            self._by_scope.discard(scope)


def next_page_query(link: str) -> str | None:
    """The query of a next-page `Link: <...>; rel="next"`, still encoded, if it has one: opaque,
    whether it says `last=` (distribution) or carries a token (Quay's `next_page=`)."""
    return URL(link.split(";", 1)[0].strip().strip("<>")).raw_query_string or None


def token_lifetime(expires_in: object) -> float:
    """Seconds a token lives: what the service says, but at least the 60 the distribution spec
    assumes when it says nothing; JSON as Python reads it takes NaN and Infinity, and a token
    must still expire."""
    if isinstance(expires_in, int | float) and math.isfinite(expires_in):
        return max(float(expires_in), 60.0)
    return 60.0


def _parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    params = {
        m.group(1).lower(): m.group(2) or m.group(3) or "" for m in _CHALLENGE_PARAM.finditer(rest)
    }
    return scheme.lower(), params


async def read_body(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body, up to `limit` bytes: `UpstreamError` if it is longer, or shorter than
    its Content-Length (a cut connection must not pass for a small document)."""
    declared = response.content_length
    if declared is not None and declared > limit:
        raise UpstreamAnswerTooLarge(f"upstream answer of {declared} bytes exceeds {limit}")
    body = bytearray()
    while chunk := await response.content.readany():
        body += chunk
        if len(body) > limit:
            raise UpstreamAnswerTooLarge(f"upstream answer exceeds {limit} bytes")
    if declared is not None and len(body) != declared:
        raise UpstreamUnavailable(f"upstream answer cut at {len(body)} of {declared} bytes")
    return bytes(body)


def _basic(username: str, password: str) -> str:
    """An RFC 7617 Basic credential (aiohttp 3.14 deprecates its BasicAuth helper)."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def _rate_limit_value(header: str | None) -> int | None:
    """`100;w=21600` -> 100; Docker Hub sometimes sends the header empty."""
    if not header:
        return None
    head = header.split(";", 1)[0].strip()
    return int(head) if head.isdigit() else None


class UpstreamClient:
    """Talks to one upstream registry on behalf of the cache."""

    def __init__(
        self,
        settings: UpstreamSettings,
        *,
        connect_timeout: float,
        read_timeout: float,
        metrics: Metrics,
        tls: ssl.SSLContext | bool = True,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.base = URL(settings.url)
        self._session = aiohttp.ClientSession(
            # `tls` is False only for a registry configured as insecure (sync `tls: insecure`).
            connector=aiohttp.TCPConnector(limit=64, keepalive_timeout=60, ssl=tls),
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=connect_timeout, sock_read=read_timeout
            ),
            # Blobs are stored byte for byte; a transparent gunzip would corrupt them. So ask
            # for the bytes themselves: aiohttp offers gzip and deflate by default, which token
            # services and CDNs take up.
            auto_decompress=False,
            # Let a megabyte arrive while the last one is hashed, instead of pausing the socket.
            read_bufsize=1024 * 1024,
            headers={"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"},
        )
        self._tokens = TokenCache()
        self._token_fetches: SingleFlight[str, _Token] = SingleFlight()
        self._basic_auth = False
        self.rate_limit: RateLimit | None = None
        self.reachability = Reachability()

    async def close(self) -> None:
        await self._session.close()

    @asynccontextmanager
    async def open(
        self,
        method: str,
        path: str,
        *,
        repository: str,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        data: bytes | None = None,
        actions: str = "pull",
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """Send a request for `path` (under /v2/) and yield a successful (2xx) response.

        Errors become `UpstreamError`s; the response is released on exit. `actions` is the
        token scope's (`pull`, or `pull,push` for the sync worker's writes to a registry).
        """
        url = self.base.joinpath("v2", path.lstrip("/"), encoded=True)
        if params:
            url = url.with_query(params)
        async with self.request(
            method, url, repository=repository, headers=headers, data=data, actions=actions
        ) as response:
            yield response

    def resolve(self, location: str) -> URL:
        """An upload `Location` as an absolute URL, refused if it leaves the upstream's hosts."""
        url = self.base.join(URL(location))
        if url.scheme not in ("http", "https") or not host_allowed(url.host or "", self.settings):
            raise UpstreamError(
                f"{self.settings.name} sent a Location on {url.host!r}; not followed"
            )
        return url

    @asynccontextmanager
    async def request(
        self,
        method: str,
        url: URL,
        *,
        repository: str,
        headers: Mapping[str, str] | None = None,
        data: bytes | None = None,
        actions: str = "pull",
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """`open` for an absolute URL from `resolve`."""
        scope = f"repository:{repository}:{actions}"
        login = self.settings.login_for(repository)
        response = await self._send_with_retries(method, url, scope, login, headers or {}, data)
        try:
            self._note_rate_limit(response)
            self._raise_for_status(response)
            yield response
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamUnavailable(
                f"{self.settings.name}: {type(exc).__name__}: {exc}"
            ) from None
        finally:
            response.release()

    async def _send_with_retries(
        self,
        method: str,
        url: URL,
        scope: str,
        login: tuple[str, str] | None,
        headers: Mapping[str, str],
        data: bytes | None,
    ) -> aiohttp.ClientResponse:
        """Retry what a second try can fix: a refused or cut connection, a timeout, a 502,
        503 or 504; only for reads, which are safe to repeat, and with a growing pause."""
        retryable = method in ("GET", "HEAD")
        for pause in (*_RETRY_PAUSES, None):
            try:
                response = await self._send_with_auth(method, url, scope, login, headers, data)
            except (aiohttp.ClientError, TimeoutError) as exc:
                if not retryable or pause is None:
                    raise UpstreamUnavailable(
                        f"{self.settings.name}: {type(exc).__name__}: {exc}"
                    ) from None
            else:
                if not retryable or pause is None or response.status not in _RETRY_STATUSES:
                    return response
                response.release()
            log.info("retrying %s %s in %.2fs", method, url.path, pause)
            await asyncio.sleep(pause)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _raise_for_status(self, response: aiohttp.ClientResponse) -> None:
        status = response.status
        if 200 <= status < 300:
            return
        what = f"{self.settings.name} answered {response.method} {response.url.path}"
        if status == 404:
            raise UpstreamNotFound(status, what)
        if status in (401, 403):
            raise UpstreamUnauthorized(status, what)
        if status == 429:
            raise UpstreamRateLimited(status, what, response.headers.get("Retry-After"))
        if status >= 500:
            raise UpstreamUnavailable(f"{what} [http {status}]")
        raise UpstreamStatusError(status, what)

    def _note_rate_limit(self, response: aiohttp.ClientResponse) -> None:
        rate_limit = RateLimit.from_headers(response.headers)
        if rate_limit is not None:
            self.rate_limit = rate_limit

    async def _send_with_auth(
        self,
        method: str,
        url: URL,
        scope: str,
        login: tuple[str, str] | None,
        headers: Mapping[str, str],
        data: bytes | None = None,
    ) -> aiohttp.ClientResponse:
        """Send, and answer one 401 challenge with `login` (the repository's credentials)."""
        authorization = self._authorization(url, scope, login)
        response = await self._send_following_redirects(method, url, headers, authorization, data)
        if response.status != 401:
            return response
        challenge = response.headers.get("WWW-Authenticate", "")
        response.release()
        scheme, params = _parse_challenge(challenge)
        challenged = params.get("scope") or scope
        if scheme == "basic" and login is not None:
            self._basic_auth = True
        elif scheme == "bearer" and "realm" in params:
            # The token we sent was refused, perhaps expired early: never reuse it.
            self._tokens.discard(challenged, sent=authorization)
            await self._refresh_token(params, challenged, login)
        else:
            raise UpstreamUnauthorized(401, f"{self.settings.name} requires credentials we lack")
        authorization = self._authorization(url, challenged, login)
        return await self._send_following_redirects(method, url, headers, authorization, data)

    def _authorization(self, url: URL, scope: str, login: tuple[str, str] | None) -> str | None:
        """The token or credentials for `url`; none for an upload `Location` on another host."""
        if not receives_credentials(url.scheme, url.host or "", self.settings):
            return None
        token = self._tokens.get(scope)
        if token is not None:
            return f"Bearer {token.value}"
        if self._basic_auth and login is not None:
            return _basic(*login)
        return None

    async def _send_following_redirects(
        self,
        method: str,
        url: URL,
        headers: Mapping[str, str],
        authorization: str | None,
        data: bytes | None = None,
    ) -> aiohttp.ClientResponse:
        request_headers = CIMultiDict(headers)
        if authorization:
            request_headers["Authorization"] = authorization
        for _ in range(_MAX_REDIRECTS + 1):
            response = await self._send_single(method, url, request_headers, data)
            if response.status not in (301, 302, 303, 307, 308):
                return response
            location = response.headers.get("Location")
            response.release()
            if not location:
                raise UpstreamError(f"{self.settings.name} sent a redirect without a Location")
            target = url.join(URL(location))
            if target.scheme not in ("http", "https") or not host_allowed(
                target.host or "", self.settings
            ):
                raise UpstreamError(
                    f"{self.settings.name} redirected to {target.host!r}, which is not one of "
                    "its hosts; not followed"
                )
            if target.origin() != url.origin():
                request_headers.pop("Authorization", None)
            if response.status == 303:
                method = "GET"
            url = target
        raise UpstreamError(f"{self.settings.name}: too many redirects")

    async def _send_single(
        self, method: str, url: URL, headers: CIMultiDict[str], data: bytes | None = None
    ) -> aiohttp.ClientResponse:
        name = self.settings.name
        started = time.monotonic()
        try:
            response = await self._session.request(
                method, url, headers=headers, data=data, allow_redirects=False
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.metrics.upstream_requests.labels(name, "error").inc()
            self.reachability.failed(f"{type(exc).__name__}: {exc}")
            raise
        self.metrics.upstream_latency.labels(name).observe(time.monotonic() - started)
        self.metrics.upstream_requests.labels(name, str(response.status)).inc()
        if response.status >= 500:
            self.reachability.failed(f"{method} {url.path} answered {response.status}")
        else:
            self.reachability.succeeded()
        return response

    async def _refresh_token(
        self, challenge: Mapping[str, str], scope: str, login: tuple[str, str] | None
    ) -> None:
        """Fetch a token for `scope` from the challenge's realm: one fetch for all the requests
        that need it at once (the scope names the repository, and so its login)."""
        token = await self._token_fetches.do(
            scope, lambda: self._fetch_token(challenge, scope, login)
        )
        self._tokens.put(scope, token)

    async def _fetch_token(
        self, challenge: Mapping[str, str], scope: str, login: tuple[str, str] | None
    ) -> _Token:
        realm = URL(challenge["realm"])
        if realm.scheme not in ("http", "https") or not host_allowed(
            realm.host or "", self.settings
        ):
            # Not a refusal (which would stop stale tags from standing in), a broken upstream:
            # a 502, naming the setting that would let the realm in.
            raise UpstreamError(
                f"{self.settings.name} named a token realm on {realm.host!r}, which is not one of "
                "its hosts (add it to the upstream's auth_hosts if it is its token service)"
            )
        query = {"scope": scope}
        if "service" in challenge:
            query["service"] = challenge["service"]
        authorization = None
        # A realm on another host (a CDN's, an extra domain's) is asked anonymously.
        if login is not None and receives_credentials(
            realm.scheme, realm.host or "", self.settings
        ):
            authorization = _basic(*login)
        started = time.monotonic()
        try:
            # Through the redirect loop: a token service may only send us to the upstream's
            # hosts, and its credentials stay with the realm's origin.
            response = await self._send_following_redirects(
                "GET", realm.with_query(query), {}, authorization
            )
            try:
                if response.status in (401, 403):
                    raise UpstreamUnauthorized(
                        response.status, f"{self.settings.name}'s token service refused us"
                    )
                if response.status != 200:
                    raise UpstreamUnavailable(
                        f"{self.settings.name}'s token service answered {response.status}"
                    )
                document = await response.json(content_type=None)
            finally:
                response.release()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise UpstreamUnavailable(
                f"{self.settings.name}'s token service failed: {type(exc).__name__}"
            ) from None
        value = (
            document.get("token") or document.get("access_token")
            if isinstance(document, dict)
            else None
        )
        if not isinstance(value, str):
            raise UpstreamUnavailable(f"{self.settings.name}'s token service sent no token")
        return _Token(value, started + token_lifetime(document.get("expires_in")) - _TOKEN_MARGIN)
