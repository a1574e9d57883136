"""The OCI grammar for repository names, tags and digests.

Every piece of a request path is validated here, once, before it is used for anything: past
this module there are only `Digest`, `Tag` and repository names that match the grammar, so no
file path can be built from raw input (distribution-spec, "Pulling manifests"; image-spec,
descriptor.md).
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from typing import Final, NamedTuple

from .errors import DIGEST_INVALID, NAME_INVALID, TAG_INVALID, RegistryError

__all__ = [
    "Digest",
    "Tag",
    "Target",
    "looks_like_host",
    "validate_repository",
]

_COMPONENT: Final = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME_RE: Final = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG_RE: Final = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
_DIGEST_RE: Final = re.compile(r"([a-z0-9]+(?:[+._-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)")
# Only the algorithms we can verify are accepted: a cache that cannot check a blob must not
# store it.
_HEX_LENGTHS: Final = {"sha256": 64, "sha512": 128}
_HEX_RE: Final = re.compile(r"[a-f0-9]+")
# Clients cap `host[:port]/name` at 255 characters; a name alone cannot be longer.
_MAX_NAME_LENGTH: Final = 255


def validate_repository(name: str) -> str:
    """Return `name` if it is a valid repository name, else raise NAME_INVALID."""
    if len(name) > _MAX_NAME_LENGTH or not _NAME_RE.fullmatch(name):
        raise RegistryError(NAME_INVALID, f"invalid repository name: {name[:300]!r}")
    return name


def looks_like_host(component: str) -> bool:
    """Whether a first path component names a registry host rather than a namespace.

    The same rule Docker uses to split `host/name`: a dot, a port, or `localhost`.
    """
    return "." in component or ":" in component or component == "localhost"


@dataclass(frozen=True, slots=True)
class Tag:
    """A validated tag."""

    value: str

    @classmethod
    def parse(cls, text: str) -> Tag:
        if not _TAG_RE.fullmatch(text):
            raise RegistryError(TAG_INVALID, f"invalid tag: {text[:200]!r}")
        return cls(text)

    def __str__(self) -> str:
        return self.value


class Digest(NamedTuple):
    """A validated content digest of an algorithm we can verify.

    A NamedTuple: it keys the memos every cached manifest request looks in, and a tuple hashes
    and compares in C where a dataclass calls Python methods."""

    algorithm: str
    encoded: str

    @staticmethod
    @functools.lru_cache(maxsize=4096)
    def parse(text: str) -> Digest:
        """The digest `text` spells, else DIGEST_INVALID. Memoised (digests are immutable, and
        the same few are parsed on every request for them); errors are not kept."""
        match = _DIGEST_RE.fullmatch(text)
        if match is None:
            raise RegistryError(DIGEST_INVALID, f"invalid digest: {text[:200]!r}")
        algorithm, encoded = match.groups()
        length = _HEX_LENGTHS.get(algorithm)
        if length is None:
            raise RegistryError(DIGEST_INVALID, f"unsupported digest algorithm: {algorithm!r}")
        if len(encoded) != length or not _HEX_RE.fullmatch(encoded):
            raise RegistryError(DIGEST_INVALID, f"invalid {algorithm} digest: {text[:200]!r}")
        return Digest(algorithm, encoded)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def hasher(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.encoded}"


@dataclass(frozen=True, slots=True)
class Target:
    """A repository of a configured upstream, as a request resolved it.

    `client_name` is the name the client used (`quay.io/podman/hello`, or `library/alpine` in
    mirror mode): the one its answers must speak of.
    """

    upstream: str
    repository: str
    client_name: str
