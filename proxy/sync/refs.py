"""Image references as regsync writes them, and our `cache/<upstream>/<repo>` targets.

`alpine` is `docker.io/library/alpine`, a first component with a dot, a port or `localhost` is a
registry, `:tag` and `@sha256:...` are optional; all as Docker and regclient parse them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Final

from proxy.reference import looks_like_host
from proxy.settings import DOCKER_HUB

__all__ = ["CacheRef", "Ref", "parse_ref", "parse_target"]

_DOCKER_HUB_ALIASES: Final = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
_TAG: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_REPOSITORY: Final = re.compile(
    r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*"
)
_DIGEST: Final = re.compile(r"sha(?:256:[a-f0-9]{64}|512:[a-f0-9]{128})")
CACHE_PREFIX: Final = "cache/"


@dataclass(frozen=True, slots=True)
class Ref:
    """A registry, a repository and perhaps a tag or digest."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    def with_tag(self, tag: str) -> Ref:
        return replace(self, tag=tag, digest=None)

    def __str__(self) -> str:
        if self.digest:
            return f"{self.name}@{self.digest}"
        return f"{self.name}:{self.tag}" if self.tag else self.name


@dataclass(frozen=True, slots=True)
class CacheRef:
    """A repository of one of the cache's upstreams: the sync target is the cache itself."""

    upstream: str
    repository: str
    tag: str | None = None

    def with_tag(self, tag: str) -> CacheRef:
        return replace(self, tag=tag)

    def __str__(self) -> str:
        name = f"{CACHE_PREFIX}{self.upstream}/{self.repository}"
        return f"{name}:{self.tag}" if self.tag else name


def _split(text: str, key: str) -> tuple[str, str, str | None, str | None]:
    rest, _, digest = text.partition("@")
    if digest and not _DIGEST.fullmatch(digest):
        raise ValueError(f"{key}: invalid digest in {text!r}")
    tag = None
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise ValueError(f"{key}: invalid tag in {text!r}")
    first, sep, remainder = rest.partition("/")
    if sep and looks_like_host(first):
        registry, repository = first, remainder
    else:
        registry, repository = DOCKER_HUB, rest
    return registry, repository, tag, digest or None


def _repository(registry: str, repository: str, text: str, key: str) -> str:
    if registry == DOCKER_HUB and "/" not in repository:
        repository = f"library/{repository}"
    if not _REPOSITORY.fullmatch(repository):
        raise ValueError(f"{key}: invalid repository name in {text!r}")
    return repository


def parse_ref(text: str, key: str) -> Ref:
    """`alpine:3`, `quay.io/podman/hello`, `localhost:5000/x@sha256:...`."""
    registry, repository, tag, digest = _split(text.strip(), key)
    if registry in _DOCKER_HUB_ALIASES:
        registry = DOCKER_HUB
    return Ref(registry, _repository(registry, repository, text, key), tag, digest)


def parse_target(text: str, key: str) -> Ref | CacheRef:
    """A registry reference, or `cache/<upstream>/<repo>[:tag]`."""
    if not text.startswith(CACHE_PREFIX):
        return parse_ref(text, key)
    upstream, sep, rest = text[len(CACHE_PREFIX) :].partition("/")
    if not sep or not upstream or not rest:
        raise ValueError(f"{key}: expected cache/<upstream>/<repository>, got {text!r}")
    _, repository, tag, digest = _split(f"{upstream}/{rest}", key)
    if digest:
        raise ValueError(f"{key}: a target names a tag, not a digest: {text!r}")
    return CacheRef(upstream, _repository(upstream, repository, text, key), tag)
