"""Errors, on both sides of the proxy.

Client-facing errors carry an OCI error code and its HTTP status; one route wrapper
(`proxy.app`'s `_counted` wrapper) turns them into the `{"errors": [...]}` envelope
(distribution-spec, "Error Codes")::

    RegistryError            what a client sees: code + status + detail

Upstream errors describe what went wrong talking to a registry; the cache decides whether a
stale copy can stand in, and otherwise translates them with `upstream_failure`::

    UpstreamError
    ├── UpstreamUnavailable      refused, timed out, 5xx, cut: serve stale if we can
    ├── UpstreamAnswerTooLarge   a manifest or list over our limit
    └── UpstreamStatusError      a definite answer with a status
        ├── UpstreamNotFound         404
        ├── UpstreamUnauthorized     401/403 even with our credentials
        └── UpstreamRateLimited      429, with Retry-After
    BlobVerificationError        bytes that do not hash to their digest
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

__all__ = [
    "BLOB_UNKNOWN",
    "DENIED",
    "DIGEST_INVALID",
    "MANIFEST_INVALID",
    "MANIFEST_UNKNOWN",
    "NAME_INVALID",
    "NAME_UNKNOWN",
    "PAGINATION_NUMBER_INVALID",
    "RANGE_INVALID",
    "TAG_INVALID",
    "TOOMANYREQUESTS",
    "UNAUTHORIZED",
    "UNAVAILABLE",
    "UNSUPPORTED",
    "BlobVerificationError",
    "ErrorCode",
    "RegistryError",
    "UpstreamAnswerTooLarge",
    "UpstreamError",
    "UpstreamNotFound",
    "UpstreamRateLimited",
    "UpstreamStatusError",
    "UpstreamUnauthorized",
    "UpstreamUnavailable",
    "upstream_failure",
]


@dataclass(frozen=True, slots=True)
class ErrorCode:
    """An OCI error code with the status the spec gives it."""

    code: str
    status: int
    message: str


BLOB_UNKNOWN: Final = ErrorCode("BLOB_UNKNOWN", 404, "blob unknown to registry")
MANIFEST_UNKNOWN: Final = ErrorCode("MANIFEST_UNKNOWN", 404, "manifest unknown")
MANIFEST_INVALID: Final = ErrorCode("MANIFEST_INVALID", 400, "manifest invalid")
NAME_UNKNOWN: Final = ErrorCode("NAME_UNKNOWN", 404, "repository name not known to registry")
NAME_INVALID: Final = ErrorCode("NAME_INVALID", 400, "invalid repository name")
DIGEST_INVALID: Final = ErrorCode("DIGEST_INVALID", 400, "provided digest did not match")
TAG_INVALID: Final = ErrorCode("TAG_INVALID", 400, "manifest tag did not match URI")
UNAUTHORIZED: Final = ErrorCode("UNAUTHORIZED", 401, "authentication required")
DENIED: Final = ErrorCode("DENIED", 403, "requested access to the resource is denied")
UNSUPPORTED: Final = ErrorCode("UNSUPPORTED", 405, "the operation is unsupported")
TOOMANYREQUESTS: Final = ErrorCode("TOOMANYREQUESTS", 429, "too many requests")
PAGINATION_NUMBER_INVALID: Final = ErrorCode(
    "PAGINATION_NUMBER_INVALID", 400, "invalid number of results requested"
)
RANGE_INVALID: Final = ErrorCode("RANGE_INVALID", 416, "invalid content range")
# Not in the OCI list, but distribution uses it for a proxy whose upstream is down.
UNAVAILABLE: Final = ErrorCode("UNAVAILABLE", 503, "upstream unavailable")


class RegistryError(Exception):
    """An error a client sees: an OCI code, a status, optional extra headers."""

    def __init__(
        self,
        code: ErrorCode,
        detail: str | None = None,
        *,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail or code.message)
        self.code = code
        self.detail = detail
        self.status = status or code.status
        self.headers: Mapping[str, str] = headers or {}

    def body(self) -> bytes:
        error: dict[str, object] = {"code": self.code.code, "message": self.code.message}
        if self.detail is not None:
            error["detail"] = self.detail
        return json.dumps({"errors": [error]}).encode()


class UpstreamError(Exception):
    """Talking to an upstream registry failed."""


class UpstreamUnavailable(UpstreamError):
    """The upstream could not answer: connection refused, timeout, or a 5xx."""


class UpstreamAnswerTooLarge(UpstreamError):
    """A document (manifest, tag list) larger than we accept."""


class UpstreamStatusError(UpstreamError):
    """The upstream gave a definite error answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{message} [http {status}]")
        self.status = status


class UpstreamNotFound(UpstreamStatusError):
    """The upstream does not have it."""


class UpstreamUnauthorized(UpstreamStatusError):
    """The upstream refuses us, even with the credentials we hold for it."""


class UpstreamRateLimited(UpstreamStatusError):
    """The upstream asks us to slow down."""

    def __init__(self, status: int, message: str, retry_after: str | None) -> None:
        super().__init__(status, message)
        self.retry_after = retry_after


class BlobVerificationError(Exception):
    """Content did not hash to the digest it was fetched by."""


def upstream_failure(exc: UpstreamError, unknown: ErrorCode) -> RegistryError:
    """What a client sees when the upstream failed and nothing cached can stand in."""
    if isinstance(exc, UpstreamNotFound):
        return RegistryError(unknown)
    if isinstance(exc, UpstreamRateLimited):
        headers = {"Retry-After": exc.retry_after} if exc.retry_after else None
        return RegistryError(TOOMANYREQUESTS, str(exc), headers=headers)
    if isinstance(exc, UpstreamUnauthorized):
        # A 403, even for the upstream's 401: a 401 must carry a challenge the client could
        # answer, and the client's credentials (if any) are the cache's, which were accepted.
        return RegistryError(DENIED, f"the upstream refused the cache's credentials: {exc}")
    if isinstance(exc, UpstreamAnswerTooLarge):
        return RegistryError(MANIFEST_INVALID, str(exc))
    if isinstance(exc, UpstreamUnavailable):
        return RegistryError(UNAVAILABLE, str(exc))
    return RegistryError(UNAVAILABLE, str(exc), status=502)
