"""What hangs off an image: regsync's `digestTags` (cosign-style `sha256-<hex>.sig` tags) and
`referrers` (OCI 1.1 manifests whose `subject` is the image).

Signatures and SBOMs are only worth mirroring if they arrive with the image, so, as regclient's
ImageCopy does, every manifest of a copied (or already up-to-date) image is visited: the top one,
its platform manifests, and recursively whatever was attached to them. Referrers come from the
source's referrers API, else from its fallback tag `<alg>-<hex>`; digest tags are the source tags
starting with `<alg>-<hex>` that the referrers did not already account for.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from proxy.errors import UpstreamNotFound

from .copy import children, is_index
from .remote import Remote

if TYPE_CHECKING:
    from .targets import Destination

__all__ = [
    "Attached",
    "Attachments",
    "ReferrerFilter",
    "Referrers",
    "fallback_tag",
    "list_referrers",
]


def fallback_tag(digest: str) -> str:
    """The referrers tag schema's tag for `digest`: `<alg>-<hex>`, truncated as the spec says."""
    algorithm, _, encoded = digest.partition(":")
    return f"{algorithm[:32]}-{encoded[:64]}"


@dataclass(frozen=True, slots=True)
class ReferrerFilter:
    """A `referrerFilters[]` item, matched as regclient does: the same `artifactType` if set,
    and every annotation present (with the same value unless the filter's is empty)."""

    artifact_type: str | None = None
    annotations: tuple[tuple[str, str], ...] = ()

    def matches(self, descriptor: dict[str, object]) -> bool:
        if self.artifact_type and descriptor.get("artifactType") != self.artifact_type:
            return False
        found = descriptor.get("annotations")
        found = found if isinstance(found, dict) else {}
        return all(k in found and (not v or found[k] == v) for k, v in self.annotations)


@dataclass(frozen=True, slots=True)
class Referrers:
    """A subject's referrer descriptors, and the source's fallback tag index if that is where
    they were found (`(tag, digest)`)."""

    descriptors: list[dict[str, object]]
    fallback: tuple[str, str] | None = None


async def list_referrers(remote: Remote, repository: str, digest: str) -> Referrers:
    """The referrers API, or the fallback tag where the registry has none."""
    listed = await remote.referrers(repository, digest)
    if listed is not None:
        return Referrers(listed)
    tag = fallback_tag(digest)
    try:
        index = await remote.manifest(repository, tag)
    except UpstreamNotFound:
        return Referrers([])
    return Referrers(children(index), (tag, str(index.digest)))


@dataclass(slots=True)
class Attached:
    """What one image's visit copied: references, and bytes uploaded or fetched."""

    refs: list[str] = field(default_factory=list)
    bytes: int = 0


class Attachments:
    """Copies what is attached to the images of one entry's pass; each manifest once."""

    def __init__(
        self,
        source: Remote,
        repository: str,
        destination: Destination,
        *,
        digest_tags: bool,
        referrers: bool,
        filters: tuple[ReferrerFilter, ...] = (),
    ) -> None:
        self.source = source
        self.repository = repository
        self.destination = destination
        self.digest_tags = digest_tags
        self.referrers = referrers
        self.filters = filters
        self._seen: set[str] = set()
        self._tags: list[str] | None = None
        self._tags_lock = asyncio.Lock()

    async def attach(self, digest: str, platforms: tuple[str, ...] = ()) -> Attached:
        """Copy what is attached to `digest` (on the target already) and to its platform
        manifests."""
        copied = Attached()
        await self._attach(digest, platforms, copied)
        return copied

    async def _attach(self, digest: str, platforms: tuple[str, ...], copied: Attached) -> None:
        if digest in self._seen:
            return
        self._seen.add(digest)
        manifest = await self.destination.manifest(digest)
        if is_index(manifest):
            for child in children(manifest, platforms):
                await self._attach(str(child.get("digest")), (), copied)
        covered: set[str] = set()
        if self.referrers:
            covered = await self._referrers(digest, copied)
        if self.digest_tags:
            await self._digest_tags(digest, covered, copied)

    async def _referrers(self, digest: str, copied: Attached) -> set[str]:
        """Copy the wanted referrers and make them findable on the target; the source tags
        that listed them (not to be copied again as digest tags)."""
        listing = await list_referrers(self.source, self.repository, digest)
        wanted = [
            d
            for d in listing.descriptors
            if isinstance(d.get("digest"), str)
            and (not self.filters or any(f.matches(d) for f in self.filters))
        ]
        for descriptor in wanted:
            referrer = str(descriptor["digest"])
            copied.bytes += await self.destination.copy(
                self.source, self.repository, referrer, None, ()
            )
            copied.refs.append(f"{self.repository}@{referrer}")
            await self._attach(referrer, (), copied)
        if wanted:
            await self.destination.publish_referrers(digest, wanted, listing.fallback)
        return {listing.fallback[0]} if listing.fallback else set()

    async def _digest_tags(self, digest: str, covered: set[str], copied: Attached) -> None:
        algorithm, _, encoded = digest.partition(":")
        prefix = f"{algorithm}-{encoded}"
        for tag in await self._source_tags():
            if not tag.startswith(prefix) or tag in covered:
                continue
            head = await self.source.head_manifest(self.repository, tag)
            if head is None:
                continue  # deleted since the listing
            if await self.destination.digest(tag) != head.digest:
                copied.bytes += await self.destination.copy(
                    self.source, self.repository, head.digest, tag, ()
                )
                copied.refs.append(f"{self.repository}:{tag}")
            await self._attach(head.digest, (), copied)

    async def _source_tags(self) -> list[str]:
        """The source's tags, listed once per pass as regclient does."""
        async with self._tags_lock:
            if self._tags is None:
                self._tags = await self.source.tags(self.repository)
            return self._tags
