"""Copying an image between registries through the OCI distribution API.

Children first, so a registry that checks references accepts every manifest it is given: each
blob is skipped if the target has it (HEAD), mounted from another repository of the target
registry when we know one that holds it, else uploaded; then the platform manifests by digest,
then the top manifest under the tag.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from proxy.manifest import Manifest

from .progress import SILENT, Progress, short
from .remote import Remote

__all__ = [
    "CopyStats",
    "ImageCopier",
    "MountHints",
    "children",
    "is_index",
    "normalized_platform",
    "platform_of",
]

log = logging.getLogger(__name__)

# Blobs up to this size go in one PUT; larger ones in PATCHes of this size.
CHUNK_SIZE: Final = 16 * 1024 * 1024
# Layers a registry must not redistribute (Windows base layers); regsync skips them too.
_FOREIGN: Final = ("foreign", "nondistributable")


@dataclass(slots=True)
class CopyStats:
    bytes: int = 0


@dataclass(slots=True)
class MountHints:
    """Which repository of a registry we last saw holding a blob: the `from` of a mount."""

    seen: dict[tuple[str, str], str] = field(default_factory=dict)

    def note(self, registry: str, digest: str, repository: str) -> None:
        self.seen[(registry, digest)] = repository

    def source(self, registry: str, digest: str, repository: str) -> str | None:
        found = self.seen.get((registry, digest))
        return found if found != repository else None


def _document(manifest: Manifest) -> dict[str, object]:
    document = json.loads(manifest.data)
    return document if isinstance(document, dict) else {}


def is_index(manifest: Manifest) -> bool:
    """Whether `manifest` is an index (a manifest list): a document listing `manifests`."""
    return "manifests" in _document(manifest)


# Variants an architecture has when none is named (as containerd and regclient compare them).
_DEFAULT_VARIANTS: Final = {"arm64": "v8", "arm": "v7"}


def normalized_platform(platform: str) -> str:
    """`os/arch/variant` with the architecture's default variant filled in: `linux/arm64` and
    `linux/arm64/v8` (as Docker Hub's indexes list it) are one platform."""
    os_name, _, rest = platform.lower().partition("/")
    architecture, _, variant = rest.partition("/")
    variant = variant or _DEFAULT_VARIANTS.get(architecture, "")
    return "/".join(part for part in (os_name, architecture, variant) if part)


def platform_of(descriptor: dict[str, object]) -> str | None:
    """`os/arch[/variant]` of an index entry, normalized."""
    platform = descriptor.get("platform")
    if not isinstance(platform, dict):
        return None
    parts = [platform.get("os"), platform.get("architecture"), platform.get("variant")]
    return normalized_platform("/".join(str(part) for part in parts if part))


def children(manifest: Manifest, platforms: Iterable[str] = ()) -> list[dict[str, object]]:
    """The descriptors an index lists (only the wanted platforms), or a manifest's config and
    layers."""
    document = _document(manifest)
    wanted = {normalized_platform(platform) for platform in platforms}
    listed = document.get("manifests")
    if isinstance(listed, list):
        return [
            d for d in listed if isinstance(d, dict) and (not wanted or platform_of(d) in wanted)
        ]
    layers = document.get("layers")
    blobs = [document.get("config"), *(layers if isinstance(layers, list) else [])]
    return [d for d in blobs if isinstance(d, dict)]


class ImageCopier:
    """Copies images from one repository to another, possibly on another registry."""

    def __init__(
        self,
        source: Remote,
        source_repository: str,
        target: Remote,
        target_repository: str,
        hints: MountHints,
        progress: Progress = SILENT,
    ) -> None:
        self.source = source
        self.source_repository = source_repository
        self.target = target
        self.target_repository = target_repository
        self.hints = hints
        self.progress = progress
        self.stats = CopyStats()

    async def copy(self, digest: str, tag: str | None, platforms: Iterable[str] = ()) -> CopyStats:
        """Copy the manifest `digest` (and all it refers to) and point `tag` at it; without a
        tag (a referrer), by digest only, and not at all if the target has it."""
        if tag is None:
            await self._copy_manifest(digest)
            return self.stats
        async with self.target.writing(self.target_repository, digest):
            manifest = await self.source.manifest(self.source_repository, digest)
            await self._copy_children(manifest, tuple(platforms))
            await self.target.put_manifest(self.target_repository, tag or digest, manifest)
        return self.stats

    async def _copy_children(self, manifest: Manifest, platforms: tuple[str, ...]) -> None:
        index = is_index(manifest)
        for descriptor in children(manifest, platforms):
            digest = descriptor.get("digest")
            if not isinstance(digest, str):
                continue
            if index:
                await self._copy_manifest(digest)
            elif not any(word in str(descriptor.get("mediaType", "")) for word in _FOREIGN):
                size = descriptor.get("size")
                await self._copy_blob(digest, size if isinstance(size, int) else None)

    async def _copy_manifest(self, digest: str) -> None:
        async with self.target.writing(self.target_repository, digest):
            if await self.target.head_manifest(self.target_repository, digest) is not None:
                return
            manifest = await self.source.manifest(self.source_repository, digest)
            await self._copy_children(manifest, ())
            await self.target.put_manifest(self.target_repository, digest, manifest)

    async def _copy_blob(self, digest: str, size: int | None) -> None:
        registry = self.target.name
        async with self.target.writing(self.target_repository, digest):
            present = await self.target.has_blob(self.target_repository, digest)
            if not present and not await self._mount(digest):
                async with self.source.blob_stream(self.source_repository, digest) as chunks:
                    tracked = self.progress.track(short(digest), size, chunks)
                    self.stats.bytes += await self.target.upload(
                        self.target_repository, digest, tracked, CHUNK_SIZE
                    )
                log.debug("copied blob %s to %s/%s", digest, registry, self.target_repository)
        self.hints.note(registry, digest, self.target_repository)

    async def _mount(self, digest: str) -> bool:
        registry = self.target.name
        origin = self.hints.source(registry, digest, self.target_repository)
        if origin is None and self.source.client.base == self.target.client.base:
            origin = self.source_repository
        if origin is None or origin == self.target_repository:
            return False
        return await self.target.mount(self.target_repository, digest, origin)
