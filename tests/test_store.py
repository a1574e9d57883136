"""The content-addressed files: what reaches `blobs/` is on disk before it is there."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from proxy.reference import Digest
from proxy.store import BlobStore


def test_a_written_manifest_is_flushed_before_its_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = BlobStore(tmp_path)
    data = b'{"schemaVersion": 2}'
    digest = Digest.of(data)
    flushed: set[int] = set()
    renamed_unflushed: list[str] = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd: int) -> None:
        flushed.add(os.fstat(fd).st_ino)
        fsync(fd)

    def checking_replace(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
        if os.stat(source).st_ino not in flushed:
            renamed_unflushed.append(os.fspath(source))
        replace(source, target)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", checking_replace)
    store.write(digest, data)

    assert store.read(digest) == data
    assert renamed_unflushed == []


def test_small_content_is_read_again_from_memory_large_content_from_disk(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    for size, kept in ((1_000, True), (5 * 1024 * 1024, False)):
        data = bytes(size)
        digest = Digest.of(data)
        store.write(digest, data)
        assert store.read(digest) == data
        store.path(digest).write_bytes(b"changed behind the store's back")
        assert (store.read(digest) == data) is kept
