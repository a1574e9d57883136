"""The content-addressed files: `blobs/<algorithm>/<2 hex>/<hex>`, written only by rename.

Manifests and blobs share the store (both are addressed by digest). A file is created in
`tmp/` and renamed into place after its digest was verified, so a file under `blobs/` is
always complete and correct. Paths are built from validated `Digest`s only. What the cache
holds may come from private repositories: its files and folders are for its own user only.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from .errors import RegistryError
from .memo import LRU
from .reference import Digest

__all__ = ["FILE_MODE", "BlobStore", "Parked"]

FILE_MODE: Final = 0o600
_FOLDER_MODE: Final = 0o700

# Memory for the small files read again and again (manifests): enough for thousands of them.
_READ_CACHE_BYTES = 16 * 1024 * 1024
_LARGEST_KEPT = _READ_CACHE_BYTES // 4


@dataclass(frozen=True, slots=True)
class Parked:
    """The parked start of a cut download."""

    digest: Digest
    path: Path
    size: int


def _make_folders(folder: Path) -> None:
    """`mkdir -p` that makes every folder it creates private (`Path.mkdir` gives the parents
    it creates the default mode)."""
    try:
        folder.mkdir(_FOLDER_MODE)
    except FileExistsError:
        return
    except FileNotFoundError:
        _make_folders(folder.parent)
        folder.mkdir(_FOLDER_MODE, exist_ok=True)


def _create_private(path: str, flags: int) -> int:
    return os.open(path, flags, FILE_MODE)


class BlobStore:
    """Local files, addressed by digest. All methods are synchronous and cheap, or say so."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.blobs = self.root / "blobs"
        self.tmp = self.root / "tmp"
        self.partial = self.root / "partial"
        for folder in (self.blobs, self.tmp, self.partial):
            _make_folders(folder)
        self._recent: LRU[Digest, bytes] = LRU(_READ_CACHE_BYTES, weigh=len)

    def path(self, digest: Digest) -> Path:
        return self.blobs / digest.algorithm / digest.encoded[:2] / digest.encoded

    def size(self, digest: Digest) -> int | None:
        """The stored size, or None when the blob is not in the store."""
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            return None

    def temp_path(self) -> Path:
        """A fresh name in `tmp/` for a file being written."""
        return self.tmp / f"{uuid.uuid4().hex}.part"

    def keep_partial(self, temp: Path, digest: Digest) -> Path:
        """Park the unverified start of a cut download under `partial/`, by digest, for a
        later download (in this process or the next) to continue from."""
        kept = self.partial / f"{digest.algorithm}-{digest.encoded}"
        os.replace(temp, kept)
        return kept

    def partials(self) -> list[Parked]:
        """The parked partial downloads, newest first; a file whose name is not a digest is
        removed. Blocking."""
        found = []
        for path in self.partial.iterdir():
            try:
                digest = Digest.parse(path.name.replace("-", ":", 1))
            except RegistryError:
                path.unlink(missing_ok=True)
                continue
            try:
                stat = path.stat()
            except FileNotFoundError:  # resumed or dropped meanwhile
                continue
            found.append((stat.st_mtime, Parked(digest, path, stat.st_size)))
        found.sort(key=lambda entry: entry[0], reverse=True)
        return [parked for _, parked in found]

    def commit(self, temp: Path, digest: Digest) -> None:
        """Move a verified temporary file into place, atomically."""
        target = self.path(digest)
        _make_folders(target.parent)
        os.replace(temp, target)

    def write(self, digest: Digest, data: bytes) -> None:
        """Store small verified content (a manifest) through a temporary file and a rename,
        flushed to disk first as a download is: after a power loss the renamed file could
        otherwise hold the right number of zeros, which start-up's size check lets through."""
        temp = self.temp_path()
        try:
            with open(temp, "xb", opener=_create_private) as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            self.commit(temp, digest)
        finally:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()

    def read(self, digest: Digest) -> bytes | None:
        """Small content (a manifest), from memory when it was read recently."""
        data = self._recent.get(digest)
        if data is not None:
            return data
        try:
            data = self.path(digest).read_bytes()
        except FileNotFoundError:
            return None
        if len(data) <= _LARGEST_KEPT:
            self._recent.put(digest, data)
        return data

    def delete(self, digest: Digest) -> bool:
        """Remove a blob; whether there was one to remove."""
        self._recent.discard(digest)
        try:
            self.path(digest).unlink()
        except FileNotFoundError:
            return False
        return True

    def scan(self) -> tuple[dict[Digest, Path], list[Path]]:
        """Every file under `blobs/`: those at their digest's path, and strays. Walks the disk."""
        found: dict[Digest, Path] = {}
        strays: list[Path] = []
        for path in self.blobs.rglob("*"):
            if path.is_dir():
                continue
            relative = path.relative_to(self.blobs).parts
            try:
                digest = Digest.parse(f"{relative[0]}:{path.name}") if len(relative) == 3 else None
            except RegistryError:
                digest = None
            if digest is not None and self.path(digest) == path:
                found[digest] = path
            else:
                strays.append(path)
        return found, strays

    def intact(self, digest: Digest) -> bool:
        """Whether the stored file hashes to `digest`; blocking, slow."""
        with open(self.path(digest), "rb") as file:
            return hashlib.file_digest(file, digest.algorithm).hexdigest() == digest.encoded

    def writable(self) -> bool:
        """Whether a file can be created in the store; blocking."""
        probe = self.tmp / f".probe-{uuid.uuid4().hex}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError:
            return False
        return True

    def temp_files(self) -> list[Path]:
        return list(self.tmp.iterdir())
