"""Manifest media types and the little we read from a manifest: its type and its children.

Manifests are stored and served byte for byte (converting one would change its digest); we only
parse them to learn which blobs and child manifests an image consists of, so that a use of the
image refreshes all of them.
"""

from __future__ import annotations

import functools
import json
from typing import Final, NamedTuple

from .errors import MANIFEST_INVALID, RegistryError
from .reference import Digest

__all__ = [
    "ACCEPT_ALL",
    "ACCEPT_ALL_HEADER",
    "MAX_MANIFEST_SIZE",
    "Manifest",
    "acceptable",
    "is_schema1",
    "parse_accept",
    "read_manifest",
]

OCI_MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX: Final = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST: Final = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST: Final = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_V1_SIGNED: Final = "application/vnd.docker.distribution.manifest.v1+prettyjws"
DOCKER_V1: Final = "application/vnd.docker.distribution.manifest.v1+json"

# What we ask the upstream for when the client did not say: every modern type, lists first.
ACCEPT_ALL: Final = (OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST)
ACCEPT_ALL_HEADER: Final = ", ".join(ACCEPT_ALL)
"""`ACCEPT_ALL` as an `Accept` header, for asking an upstream."""
MAX_MANIFEST_SIZE: Final = 4 * 1024 * 1024


class Manifest(NamedTuple):
    """A manifest's exact bytes, with the digest and media type to serve it under.

    A NamedTuple, built in C: one is made for every manifest request, and a frozen dataclass
    (which sets each field through `object.__setattr__`) took twice as long (540 ns, 265)."""

    digest: Digest
    media_type: str
    data: bytes
    fetched: bool = False  # True when this request's answer came from the upstream


@functools.lru_cache(maxsize=256)
def parse_accept(values: tuple[str, ...]) -> tuple[str, ...]:
    """Media types from Accept headers (repeated or comma-separated), without parameters and
    without those refused with `q=0`. Memoised: each kind of client sends the same few headers
    on every request."""
    types = []
    for value in values:
        for part in value.split(","):
            media_type, *parameters = part.split(";")
            media_type = media_type.strip().lower()
            if media_type and not any(_refuses(parameter) for parameter in parameters):
                types.append(media_type)
    return tuple(dict.fromkeys(types))


def _refuses(parameter: str) -> bool:
    """Whether an Accept parameter is a quality of zero (RFC 9110, 12.4.2: "not acceptable")."""
    name, _, value = parameter.partition("=")
    if name.strip().lower() != "q":
        return False
    try:
        return float(value) == 0
    except ValueError:
        return False


def acceptable(media_type: str, accept: tuple[str, ...]) -> bool:
    """Whether a client that sent `accept` takes a manifest of `media_type`.

    No Accept at all, or a wildcard, takes anything, as distribution does.
    """
    return not accept or media_type in accept or "*/*" in accept or "application/*" in accept


def is_schema1(content_type: str | None) -> bool:
    """Whether a Content-Type names a Docker schema 1 manifest (deprecated; never served)."""
    return _media_type(content_type) in (DOCKER_V1_SIGNED, DOCKER_V1)


def _media_type(content_type: str | None) -> str:
    """A Content-Type header's media type, without parameters, lower-case."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def read_manifest(data: bytes, content_type: str | None) -> tuple[str, list[str]]:
    """The media type and the child digests of a manifest; MANIFEST_INVALID if it is not one."""
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):
        raise RegistryError(MANIFEST_INVALID, "upstream manifest is not JSON") from None
    if not isinstance(document, dict):
        raise RegistryError(MANIFEST_INVALID, "upstream manifest is not a JSON object")
    declared = document.get("mediaType")
    header = _media_type(content_type)
    media_type = declared if isinstance(declared, str) and declared else header
    if not media_type or media_type in ("application/json", "application/octet-stream"):
        # An OCI manifest may omit mediaType; tell it apart from an index by its fields.
        media_type = OCI_INDEX if "manifests" in document else OCI_MANIFEST
    children = []
    descriptors = [document.get("config")]
    for key in ("layers", "manifests"):
        listed = document.get(key)
        if isinstance(listed, list):
            descriptors.extend(listed)
    for descriptor in descriptors:
        if isinstance(descriptor, dict) and isinstance(descriptor.get("digest"), str):
            children.append(descriptor["digest"])
    return media_type, children
