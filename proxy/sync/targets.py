"""Where an entry's images go: another registry, or the cache itself.

Both answer the same questions (which digest does a tag name, which tags are there, when was an
image made) and take the same orders (copy, back up, retire a tag), so the worker does not care
which one it fills.
"""

from __future__ import annotations

import datetime
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Final, Protocol

from proxy.blobfetch import DirectTransfer, disk_full_error
from proxy.cache import Cache, LocalBlob
from proxy.errors import UpstreamError, UpstreamNotFound
from proxy.manifest import ACCEPT_ALL, OCI_INDEX, OCI_MANIFEST, Manifest
from proxy.metadata import TagRecord
from proxy.reference import Digest, Target
from proxy.store import BlobStore

from .attached import fallback_tag
from .copy import ImageCopier, MountHints, children, is_index
from .progress import SILENT, Progress, short
from .refs import Ref, parse_ref
from .remote import Remote

__all__ = ["CacheDestination", "Destination", "RegistryDestination", "image_created"]

# The empty JSON object, as the config of the placeholder manifest that retires a tag.
_EMPTY_CONFIG: Final = b"{}"
_FRACTION: Final = re.compile(r"(\.\d{6})\d+")


class Destination(Protocol):
    description: str

    async def digest(self, tag: str) -> str | None: ...

    async def tags(self) -> list[str]: ...

    async def manifest(self, digest: str) -> Manifest: ...

    async def copy(
        self,
        source: Remote,
        repository: str,
        digest: str,
        tag: str | None,
        platforms: Iterable[str],
        progress: Progress = SILENT,
    ) -> int: ...

    async def publish_referrers(
        self,
        subject: str,
        descriptors: list[dict[str, object]],
        fallback: tuple[str, str] | None,
    ) -> None: ...

    async def backup(self, tag: str, digest: str, name: str) -> str: ...

    async def retire(self, tag: str) -> None: ...

    async def created(self, tag: str) -> datetime.datetime | None: ...


def _created(config: bytes) -> datetime.datetime | None:
    try:
        value = json.loads(config).get("created")
        parsed = datetime.datetime.fromisoformat(_FRACTION.sub(r"\1", str(value)))
    except (ValueError, AttributeError):
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.UTC)


async def image_created(
    manifest: Manifest,
    child: Callable[[str], Awaitable[Manifest]],
    config: Callable[[str], Awaitable[bytes]],
) -> datetime.datetime | None:
    """The `created` of an image's config (an index's first image's)."""
    descriptors = children(manifest)
    if is_index(manifest):
        if not descriptors:
            return None
        manifest = await child(str(descriptors[0]["digest"]))
        descriptors = children(manifest)
    if not descriptors:
        return None
    data = await config(str(descriptors[0]["digest"]))
    return _created(data)


class RegistryDestination:
    """A repository of an OCI registry, written through the push API."""

    def __init__(
        self,
        remote: Remote,
        repository: str,
        hints: MountHints,
        remote_for: Callable[[str], Remote],
    ) -> None:
        self.remote = remote
        self.repository = repository
        self.hints = hints
        self.remote_for = remote_for
        self.description = f"{remote.name}/{repository}"

    async def digest(self, tag: str) -> str | None:
        head = await self.remote.head_manifest(self.repository, tag)
        return None if head is None else head.digest

    async def tags(self) -> list[str]:
        try:
            return await self.remote.tags(self.repository)
        except UpstreamNotFound:
            return []

    async def manifest(self, digest: str) -> Manifest:
        return await self.remote.manifest(self.repository, digest)

    async def copy(
        self,
        source: Remote,
        repository: str,
        digest: str,
        tag: str | None,
        platforms: Iterable[str],
        progress: Progress = SILENT,
    ) -> int:
        copier = ImageCopier(source, repository, self.remote, self.repository, self.hints, progress)
        return (await copier.copy(digest, tag, platforms)).bytes

    async def publish_referrers(
        self,
        subject: str,
        descriptors: list[dict[str, object]],
        fallback: tuple[str, str] | None,
    ) -> None:
        """A target with the referrers API lists them by itself; on one without (distribution
        2.8) clients look at the fallback tag `<alg>-<hex>`, so merge them into that index."""
        if await self.remote.referrers(self.repository, subject) is not None:
            return
        tag = fallback_tag(subject)
        listed: list[dict[str, object]] = []
        try:
            document = json.loads((await self.remote.manifest(self.repository, tag)).data)
            found = document.get("manifests") if isinstance(document, dict) else None
            listed = [d for d in found or [] if isinstance(d, dict)]
        except UpstreamNotFound:
            pass
        known = {d.get("digest") for d in listed}
        added = [d for d in descriptors if d.get("digest") not in known]
        if not added:
            return
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": listed + added}
        data = json.dumps(index, separators=(",", ":")).encode()
        await self.remote.put_manifest(
            self.repository, tag, Manifest(Digest.of(data), OCI_INDEX, data)
        )

    async def backup(self, tag: str, digest: str, name: str) -> str:
        """Copy what `tag` names to `name`: a tag of this repository, or a full reference."""
        if ":" in name or "/" in name:
            ref = parse_ref(name, "backup")
        else:
            ref = Ref(self.remote.name, self.repository, name)
        target = RegistryDestination(
            self.remote_for(ref.registry), ref.repository, self.hints, self.remote_for
        )
        await target.copy(self.remote, self.repository, digest, ref.tag or tag, ())
        return str(ref if ref.tag else ref.with_tag(tag))

    async def retire(self, tag: str) -> None:
        """Delete a tag, and only the tag: other tags on the same image stay.

        Registries without tag deletion (distribution 2.x) get regclient's way: point the tag at
        a unique placeholder manifest and delete that by digest.
        """
        try:
            await self.remote.delete_manifest(self.repository, tag)
            return
        except UpstreamNotFound:
            return
        except UpstreamError:
            pass
        config = str(Digest.of(_EMPTY_CONFIG))
        if not await self.remote.has_blob(self.repository, config):
            await self.remote.upload(
                self.repository, config, _once(_EMPTY_CONFIG), len(_EMPTY_CONFIG)
            )
        document = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config,
                "size": len(_EMPTY_CONFIG),
            },
            "layers": [],
            "annotations": {"io.registry-cache.retired": f"{tag} {time.time()}"},
        }
        data = json.dumps(document).encode()
        placeholder = Manifest(Digest.of(data), OCI_MANIFEST, data)
        await self.remote.put_manifest(self.repository, tag, placeholder)
        await self.remote.delete_manifest(self.repository, str(placeholder.digest))

    async def created(self, tag: str) -> datetime.datetime | None:
        manifest = await self.remote.manifest(self.repository, tag)
        return await image_created(
            manifest,
            lambda digest: self.remote.manifest(self.repository, digest),
            lambda digest: self.remote.blob(self.repository, digest),
        )


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


class CacheDestination:
    """A repository of one of the cache's upstreams: filled as if a client had pulled."""

    def __init__(
        self, cache: Cache, upstream: str, repository: str, pin_owner: str | None = None
    ) -> None:
        """`pin_owner`: who pins what this copies (a `pin: true` entry), from before it is
        fetched, so that no cleaner pass takes an image before the entry pins its tags."""
        self.cache = cache
        self.pin_owner = pin_owner
        self.target = Target(upstream, repository, f"{upstream}/{repository}")
        self.description = f"cache/{upstream}/{repository}"

    async def digest(self, tag: str) -> str | None:
        record = await self.cache.metadata.tag(self.target.upstream, self.target.repository, tag)
        if record is None or await self.cache.metadata.item(record.digest) is None:
            return None
        return record.digest

    async def tags(self) -> list[str]:
        return await self.cache.metadata.tags(self.target.upstream, self.target.repository)

    async def manifest(self, digest: str) -> Manifest:
        return await self.cache.manifest(self.target, Digest.parse(digest), ACCEPT_ALL)

    async def copy(
        self,
        source: Remote,
        repository: str,
        digest: str,
        tag: str | None,
        platforms: Iterable[str],
        progress: Progress = SILENT,
    ) -> int:
        """Fetch the image through the cache (what it holds already is not fetched again)."""
        if self.pin_owner is not None:
            # Added to the owner's pins; the entry replaces the set with its tags' when done.
            await self.cache.metadata.add_pins(self.pin_owner, [digest])
        fetched = await self._fetch(Digest.parse(digest), tuple(platforms), progress)
        if tag is not None:
            await self._set_tag(tag, digest)
        return fetched

    async def publish_referrers(
        self,
        subject: str,
        descriptors: list[dict[str, object]],
        fallback: tuple[str, str] | None,
    ) -> None:
        """The cache passes `/referrers/` through to its upstream; what it must hold for an
        upstream without that API is the fallback tag's index."""
        if fallback is None:
            return
        tag, digest = fallback
        await self.cache.manifest(self.target, Digest.parse(digest), ACCEPT_ALL)
        await self._set_tag(tag, digest)

    async def _fetch(self, digest: Digest, platforms: tuple[str, ...], progress: Progress) -> int:
        manifest = await self.cache.manifest(self.target, digest, ACCEPT_ALL)
        fetched = len(manifest.data) if manifest.fetched else 0
        index = is_index(manifest)
        for descriptor in children(manifest, platforms):
            child = Digest.parse(str(descriptor.get("digest")))
            if index:
                fetched += await self._fetch(child, (), progress)
                continue
            blob = await self.cache.blob(self.target, child)
            if isinstance(blob, LocalBlob):
                continue
            if isinstance(blob, DirectTransfer):
                # The disk is full, and the cache hands out uncached transfers: one would
                # store nothing, and the copy must not pass for done.
                await blob.close()
                raise disk_full_error()
            size = descriptor.get("size")
            total = size if isinstance(size, int) else None
            async for chunk in progress.track(short(str(child)), total, blob.read()):
                fetched += len(chunk)
        return fetched

    async def _set_tag(self, tag: str, digest: str) -> None:
        await self.cache.metadata.set_tag(
            self.target.upstream, self.target.repository, tag, TagRecord(digest, time.time())
        )

    async def backup(self, tag: str, digest: str, name: str) -> str:
        if ":" in name or "/" in name:
            raise ValueError(f"a backup in the cache is a tag of the same repository, not {name!r}")
        await self._set_tag(name, digest)
        return f"{self.description}:{name}"

    async def retire(self, tag: str) -> None:
        """Nothing to delete: the worker stops pinning the tag and the cleaner may take it."""

    async def created(self, tag: str) -> datetime.datetime | None:
        digest = await self.digest(tag)
        if digest is None:
            return None
        store: BlobStore = self.cache.store

        async def read(digest: str) -> bytes:
            return store.read(Digest.parse(digest)) or b""

        async def manifest(digest: str) -> Manifest:
            return Manifest(Digest.parse(digest), "", await read(digest))

        return await image_created(await manifest(digest), manifest, read)
