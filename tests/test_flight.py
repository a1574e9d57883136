"""How a growing download hands its bytes to readers: each span as soon as it is written, and
the last byte only after the digest was checked."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from proxy.errors import BlobVerificationError
from proxy.flight import BlobDownload, Span
from proxy.reference import Digest

_CHUNK = 100_000


def _content(span: Span, download: BlobDownload) -> bytes:
    offset, count = span
    with download.open_file() as file:
        return os.pread(file.fileno(), count, offset)


async def _settled(task: asyncio.Future[Span]) -> bool:
    """Whether a reader's next span came, once the loop has run everything ready to run."""
    for _ in range(20):
        await asyncio.sleep(0)
    return task.done()


async def test_readers_follow_the_writes_and_wait_for_the_check(tmp_path: Path) -> None:
    data = os.urandom(3 * _CHUNK)
    chunks = [data[i : i + _CHUNK] for i in range(0, len(data), _CHUNK)]
    download = BlobDownload(Digest.of(data), tmp_path / "blob")
    download.start(len(data))

    early = download.spans()
    await download.append(chunks[:1])
    assert await anext(early) == (0, _CHUNK - 1), "all but the last byte written so far"
    await download.append(chunks[1:])
    late = download.spans()
    assert await anext(late) == (0, len(data) - 1), "a late reader gets what is written at once"
    assert await anext(early) == (_CHUNK - 1, 2 * _CHUNK)

    last = {"early": asyncio.ensure_future(anext(early))}
    last["late"] = asyncio.ensure_future(anext(late))
    assert not any([await _settled(task) for task in last.values()]), "the last byte waits"
    download.verify()
    download.succeed()
    for name, reader in (("early", early), ("late", late)):
        assert await last[name] == (len(data) - 1, 1), name
        assert [span async for span in reader] == []
    assert _content((0, len(data)), download) == data
    download.release()


async def test_a_corrupt_download_never_releases_its_last_byte(tmp_path: Path) -> None:
    data = os.urandom(_CHUNK)
    download = BlobDownload(Digest.of(b"something else"), tmp_path / "blob")
    download.start(len(data))
    reader = download.spans()
    await download.append([data])
    assert _content(await anext(reader), download) == data[:-1]
    last = asyncio.ensure_future(anext(reader))
    with pytest.raises(BlobVerificationError):
        download.verify()
    download.fail(BlobVerificationError("corrupt"))
    with pytest.raises(BlobVerificationError):
        await last


async def test_a_range_waits_for_the_check_of_the_whole_blob(tmp_path: Path) -> None:
    data = os.urandom(2 * _CHUNK)
    download = BlobDownload(Digest.of(b"something else"), tmp_path / "blob")
    download.start(len(data))
    await download.append([data])
    reader = download.spans(10, 20)
    assert await anext(reader) == (10, 9), "all of the range but its last byte"
    last = asyncio.ensure_future(anext(reader))
    assert not await _settled(last), "the range's last byte waits for the whole blob's check"
    download.fail(BlobVerificationError("corrupt"))
    with pytest.raises(BlobVerificationError):
        await last
