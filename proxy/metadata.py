"""What the cache knows about its content, in one SQLite database (WAL) in the data directory.

Items (blobs and manifests) with sizes and access times, which manifest refers to which item,
which repositories of which upstream hold an item, and the tag -> digest answers with the time
they were last confirmed. This is the replacement for distribution's per-file links and the
log-tailing access recorder.

One connection, used from one dedicated thread, so SQLite never blocks the event loop and
writes never interleave. Access times are collected in memory and written in batches: the hot
path does no database write.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

from .store import FILE_MODE

__all__ = [
    "DATABASE_FILE",
    "Candidate",
    "ItemRecord",
    "Metadata",
    "ReferrersPage",
    "TagListing",
    "TagRecord",
    "Usage",
    "set_aside_if_corrupt",
    "sqlite_code",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

DATABASE_FILE: Final = "metadata.db"
"""The database's name in the data directory."""

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS items (
    digest      TEXT PRIMARY KEY,
    kind        TEXT NOT NULL CHECK (kind IN ('blob', 'manifest')),
    size        INTEGER NOT NULL,
    media_type  TEXT,
    stored_at   REAL NOT NULL,
    accessed_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS items_by_access ON items (accessed_at);
CREATE TABLE IF NOT EXISTS children (
    parent TEXT NOT NULL REFERENCES items (digest) ON DELETE CASCADE,
    child  TEXT NOT NULL,
    PRIMARY KEY (parent, child)
);
CREATE INDEX IF NOT EXISTS children_by_child ON children (child);
CREATE TABLE IF NOT EXISTS holdings (
    upstream   TEXT NOT NULL,
    repository TEXT NOT NULL,
    digest     TEXT NOT NULL REFERENCES items (digest) ON DELETE CASCADE,
    PRIMARY KEY (upstream, repository, digest)
);
CREATE INDEX IF NOT EXISTS holdings_by_digest ON holdings (digest);
CREATE TABLE IF NOT EXISTS tags (
    upstream   TEXT NOT NULL,
    repository TEXT NOT NULL,
    tag        TEXT NOT NULL,
    digest     TEXT NOT NULL REFERENCES items (digest) ON DELETE CASCADE,
    checked_at REAL NOT NULL,
    PRIMARY KEY (upstream, repository, tag)
);
CREATE TABLE IF NOT EXISTS referrers (
    upstream   TEXT NOT NULL,
    repository TEXT NOT NULL,
    subject    TEXT NOT NULL REFERENCES items (digest) ON DELETE CASCADE,
    query      TEXT NOT NULL,
    body       BLOB NOT NULL,
    headers    TEXT NOT NULL,
    next_query TEXT,
    PRIMARY KEY (upstream, repository, subject, query)
);
CREATE TABLE IF NOT EXISTS pins (
    digest TEXT NOT NULL,
    owner  TEXT NOT NULL,
    PRIMARY KEY (digest, owner)
);
"""

_TOTALS: Final = "SELECT coalesce(sum(size), 0), count(*) FROM items"

# Everything a pinned item refers to is protected with it.
_PROTECTED: Final = (
    "WITH RECURSIVE protected(digest) AS ("
    " SELECT digest FROM pins"
    " UNION SELECT child FROM children JOIN protected ON parent = protected.digest)"
)


@dataclass(frozen=True, slots=True)
class ItemRecord:
    digest: str
    kind: str
    size: int
    media_type: str | None


@dataclass(frozen=True, slots=True)
class Candidate:
    """An item the cleaner may evict, oldest use first."""

    digest: str
    kind: str
    size: int
    accessed_at: float


@dataclass(frozen=True, slots=True)
class Usage:
    """Bytes and items, in total or for one upstream or repository."""

    name: str
    size: int
    items: int


@dataclass(frozen=True, slots=True)
class TagListing:
    upstream: str
    repository: str
    tag: str
    digest: str
    size: int
    accessed_at: float


@dataclass(frozen=True, slots=True)
class TagRecord:
    digest: str
    checked_at: float


@dataclass(frozen=True, slots=True)
class ReferrersPage:
    """A page of an upstream's referrers index, as it answered."""

    body: bytes
    headers: dict[str, str]
    next_query: str | None
    """The upstream's query for the next page (its `Link`), opaque; None on the last page."""


def _per_repository(db: sqlite3.Connection) -> list[Usage]:
    rows = db.execute(
        "SELECT upstream || '/' || repository, sum(size), count(*) FROM holdings"
        " JOIN items USING (digest) GROUP BY upstream, repository ORDER BY 1"
    )
    return [Usage(*row) for row in rows]


def _like_prefix(prefix: str) -> str:
    """A LIKE pattern for names under `prefix` (whole path components)."""
    escaped = prefix.strip("/").replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"{escaped}/%" if escaped else "%"


def sqlite_code(exc: BaseException) -> int:
    """SQLite's primary result code for an error it raised (the low byte of the extended
    code); 0 for anything else, such as the errors the sqlite3 module raises itself."""
    return getattr(exc, "sqlite_errorcode", 0) & 0xFF


def _corruption(path: Path) -> str | None:
    """What SQLite finds wrong with the database at `path`, or None when it is sound."""
    try:
        with contextlib.closing(sqlite3.connect(path)) as db:
            problems = [row[0] for row in db.execute("PRAGMA quick_check")]
    except sqlite3.DatabaseError as exc:
        if sqlite_code(exc) in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
            return str(exc)
        raise
    return None if problems == ["ok"] else "; ".join(problems)


def set_aside_if_corrupt(path: Path) -> None:
    """Move a database SQLite finds corrupt, with its WAL, to `<path>.corrupt-<UTC time>`,
    for the caller to rebuild from the store. Blocking, and only for start-up: nothing else
    may have the database open."""
    problem = _corruption(path) if path.exists() else None
    if problem is None:
        return
    moment = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = path.with_name(f"{path.name}.corrupt-{moment}")
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.replace(f"{path}{suffix}", f"{aside}{suffix}")
    log.error("the metadata database is corrupt (%s): moved to %s, rebuilding", problem, aside)


def _hold(db: sqlite3.Connection, upstream: str, repository: str, digest: str) -> list[str]:
    """Record that the repository holds `digest` (once it is stored); what it may therefore
    have: `digest` and everything below it."""
    db.execute(
        "INSERT OR IGNORE INTO holdings SELECT ?, ?, ?"
        " WHERE EXISTS (SELECT 1 FROM items WHERE digest = ?)",
        (upstream, repository, digest, digest),
    )
    return _reachable(db, digest, up=False)


def _reachable(db: sqlite3.Connection, digest: str, *, up: bool) -> list[str]:
    """`digest` and, as far as the database knows, every item it names and they name (down),
    or every manifest or index that names it, directly or through another (up)."""
    step, link = ("parent", "child") if up else ("child", "parent")
    rows = db.execute(
        "WITH RECURSIVE reached (digest) AS ("
        f"  SELECT ? UNION SELECT {step} FROM children JOIN reached ON {link} = reached.digest"
        ") SELECT digest FROM reached",
        (digest,),
    )
    return [row[0] for row in rows]


class Metadata:
    """The database, with in-memory copies of what the hot path reads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metadata")
        self._db: sqlite3.Connection | None = None
        self._tags: dict[tuple[str, str, str], TagRecord] = {}
        self._items: dict[str, ItemRecord] = {}
        # By (upstream, repository), the digests the upstream let that repository have: what it
        # was pulled through, what its manifests there name, and what a HEAD there confirmed.
        self._grants: dict[tuple[str, str], set[str]] = {}
        self._pending_access: dict[str, float] = {}
        # The sum of all item sizes, kept current so the hot path can compare it to the budget.
        self.total_size = 0
        self.total_items = 0
        # SQLite's data_version at the last `follow_other_writers`.
        self._seen_version: int | None = None

    async def _run(self, function: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            assert self._db is not None, "metadata used before open()"
            with self._db:
                return function(self._db)

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    @property
    def is_open(self) -> bool:
        return self._db is not None

    async def open(self) -> None:
        def connect() -> sqlite3.Connection:
            # Created before SQLite would create it world-readable; its -wal and -shm files
            # take its mode.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE))
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA busy_timeout=5000")
            db.executescript(_SCHEMA)
            db.isolation_level = "DEFERRED"
            return db

        self._db = await asyncio.get_running_loop().run_in_executor(self._executor, connect)
        await self.refresh_totals()

        def held(db: sqlite3.Connection) -> list[tuple[str, str, str]]:
            return db.execute(
                "WITH RECURSIVE granted (upstream, repository, digest) AS ("
                "  SELECT upstream, repository, digest FROM holdings"
                "  UNION SELECT granted.upstream, granted.repository, child"
                "  FROM granted JOIN children ON parent = granted.digest"
                ") SELECT upstream, repository, digest FROM granted"
            ).fetchall()

        for upstream, repository, digest in await self._run(held):
            self._grants.setdefault((upstream, repository), set()).add(digest)

    async def close(self) -> None:
        if self._db is None:
            return
        await self.flush_access_times()
        db, self._db = self._db, None
        await asyncio.get_running_loop().run_in_executor(self._executor, db.close)
        self._executor.shutdown(wait=True)

    # -- items -------------------------------------------------------------------------------

    async def item(self, digest: str) -> ItemRecord | None:
        record = self._items.get(digest)
        if record is not None:
            return record

        def select(db: sqlite3.Connection) -> ItemRecord | None:
            row = db.execute(
                "SELECT digest, kind, size, media_type FROM items WHERE digest = ?", (digest,)
            ).fetchone()
            return ItemRecord(*row) if row else None

        record = await self._run(select)
        if record is not None:
            self._items[digest] = record
        return record

    async def add_item(
        self,
        record: ItemRecord,
        holder: tuple[str, str] | None,
        children: Iterable[str] = (),
    ) -> None:
        """Record a stored item, the (upstream, repository) it was pulled through if any, and
        what it refers to."""
        now = time.time()
        child_rows = [(record.digest, child) for child in children]

        def insert(db: sqlite3.Connection) -> tuple[bool, list[str]]:
            added = db.execute(
                "INSERT OR IGNORE INTO items"
                " (digest, kind, size, media_type, stored_at, accessed_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (record.digest, record.kind, record.size, record.media_type, now, now),
            ).rowcount
            if not added:
                # A file adopted at start-up as a plain blob may turn out to be a manifest.
                db.execute(
                    "UPDATE items SET accessed_at = ?, kind = ?,"
                    " media_type = coalesce(?, media_type) WHERE digest = ?",
                    (now, record.kind, record.media_type, record.digest),
                )
            db.executemany("INSERT OR IGNORE INTO children VALUES (?, ?)", child_rows)
            return bool(added), [] if holder is None else _hold(db, *holder, record.digest)

        added, held = await self._run(insert)
        if added:
            self.total_size += record.size
            self.total_items += 1
        self._items[record.digest] = record
        if holder is not None:
            self._grants.setdefault(holder, set()).update(held)

    # -- which repository may have what -----------------------------------------------------

    def granted(self, upstream: str, repository: str, digest: str) -> bool:
        """Whether the upstream let this repository have `digest` (two hash lookups: the hot
        path asks it for every cached blob and manifest by digest)."""
        digests = self._grants.get((upstream, repository))
        return digests is not None and digest in digests

    async def hold(self, upstream: str, repository: str, digest: str) -> None:
        """Let this repository have `digest` and everything it names, and keep that (as a
        holding, read back at start) once the item is stored."""

        held = await self._run(lambda db: _hold(db, upstream, repository, digest))
        self._grants.setdefault((upstream, repository), set()).update(held)

    async def revoke(self, upstream: str, repository: str) -> None:
        """Take back everything granted to a repository (its upstream refused it)."""
        self._grants.pop((upstream, repository), None)

        def delete(db: sqlite3.Connection) -> None:
            db.execute(
                "DELETE FROM holdings WHERE upstream = ? AND repository = ?", (upstream, repository)
            )

        await self._run(delete)
        # A grant whose database work was queued before the delete (a confirmation in flight)
        # has added itself back meanwhile: the revoke, which saw the refusal, wins.
        self._grants.pop((upstream, repository), None)

    async def remove_item(self, digest: str) -> None:
        """Forget an item whose file was deleted; its tags, holdings and links go with it."""

        def delete(db: sqlite3.Connection) -> int:
            row = db.execute(
                "DELETE FROM items WHERE digest = ? RETURNING size", (digest,)
            ).fetchone()
            return int(row[0]) if row else 0

        freed = await self._run(delete)
        self.total_size -= freed
        self.total_items -= 1 if freed else 0
        self.forget_cached(digest)
        for key in [key for key, tag in self._tags.items() if tag.digest == digest]:
            del self._tags[key]

    async def totals(self) -> tuple[int, int]:
        """Bytes and number of items the database knows."""

        def select(db: sqlite3.Connection) -> tuple[int, int]:
            size, count = db.execute(_TOTALS).fetchone()
            return int(size), int(count)

        return await self._run(select)

    async def refresh_totals(self) -> None:
        self.total_size, self.total_items = await self.totals()

    async def follow_other_writers(self) -> bool:
        """Read the totals again if another process (`sync once`, `clean` beside the server)
        has committed since the last look, and say whether it had: SQLite's data_version
        changes only with other connections' commits, so an idle look costs no scan."""

        def select(db: sqlite3.Connection) -> tuple[int, int] | None:
            (version,) = db.execute("PRAGMA data_version").fetchone()
            if version == self._seen_version:
                return None
            self._seen_version = version
            size, count = db.execute(_TOTALS).fetchone()
            return int(size), int(count)

        totals = await self._run(select)
        if totals is not None:
            self.total_size, self.total_items = totals
        return totals is not None

    async def items(self) -> list[ItemRecord]:
        def select(db: sqlite3.Connection) -> list[ItemRecord]:
            rows = db.execute("SELECT digest, kind, size, media_type FROM items")
            return [ItemRecord(*row) for row in rows]

        return await self._run(select)

    async def eviction_candidates(self) -> list[Candidate]:
        """Every unpinned item, least recently used first; manifests before their blobs."""

        def select(db: sqlite3.Connection) -> list[Candidate]:
            rows = db.execute(
                f"{_PROTECTED} SELECT digest, kind, size, accessed_at FROM items"
                " WHERE digest NOT IN (SELECT digest FROM protected)"
                " ORDER BY accessed_at, kind DESC"
            )
            return [Candidate(*row) for row in rows]

        return await self._run(select)

    async def pinned_size(self) -> int:
        def select(db: sqlite3.Connection) -> int:
            row = db.execute(
                f"{_PROTECTED} SELECT coalesce(sum(size), 0) FROM items"
                " WHERE digest IN (SELECT digest FROM protected)"
            ).fetchone()
            return int(row[0])

        return await self._run(select)

    async def set_pins(self, owner: str, digests: Iterable[str]) -> None:
        """Make `digests` (and what they refer to) the whole set `owner` protects."""
        await self._pin(owner, digests, replace=True)

    async def add_pins(self, owner: str, digests: Iterable[str]) -> None:
        """Add `digests` (and what they refer to, once recorded) to what `owner` protects."""
        await self._pin(owner, digests, replace=False)

    async def _pin(self, owner: str, digests: Iterable[str], *, replace: bool) -> None:
        rows = [(digest, owner) for digest in digests]

        def write(db: sqlite3.Connection) -> None:
            if replace:
                db.execute("DELETE FROM pins WHERE owner = ?", (owner,))
            db.executemany("INSERT OR IGNORE INTO pins VALUES (?, ?)", rows)

        await self._run(write)

    async def pin_owners(self) -> list[str]:
        """Everyone who pins something (the sync worker drops owners no longer configured)."""

        def select(db: sqlite3.Connection) -> list[str]:
            return [row[0] for row in db.execute("SELECT DISTINCT owner FROM pins ORDER BY 1")]

        return await self._run(select)

    async def usage(self) -> tuple[Usage, list[Usage], list[Usage]]:
        """Size and items in total, per upstream and per repository (a shared blob counts in
        every repository that holds it, once in the totals)."""

        def select(db: sqlite3.Connection) -> tuple[Usage, list[Usage], list[Usage]]:
            size, count = db.execute(
                "SELECT coalesce(sum(size), 0), count(*) FROM items"
            ).fetchone()
            per_upstream = db.execute(
                "SELECT upstream, sum(size), count(*) FROM"
                " (SELECT DISTINCT upstream, digest FROM holdings) JOIN items USING (digest)"
                " GROUP BY upstream ORDER BY upstream"
            )
            upstreams = [Usage(*row) for row in per_upstream]
            return Usage("total", int(size), int(count)), upstreams, _per_repository(db)

        return await self._run(select)

    async def repository_usage(self) -> list[Usage]:
        """Size and items per repository (`upstream/repository`), alone."""
        return await self._run(_per_repository)

    async def tag_listing(self, prefix: str = "") -> list[TagListing]:
        """Tags under `upstream[/repository]`, with the size of the whole image they name."""

        def select(db: sqlite3.Connection) -> list[TagListing]:
            rows = db.execute(
                "SELECT upstream, repository, tag, tags.digest, ("
                "  WITH RECURSIVE tree(digest) AS (SELECT tags.digest UNION"
                "   SELECT child FROM children JOIN tree ON parent = tree.digest)"
                "  SELECT coalesce(sum(size), 0) FROM items WHERE digest IN tree"
                " ), items.accessed_at FROM tags JOIN items USING (digest)"
                " WHERE upstream || '/' || repository || '/' LIKE ? ESCAPE '\\'"
                " ORDER BY upstream, repository, tag",
                (_like_prefix(prefix),),
            )
            return [TagListing(*row) for row in rows]

        return await self._run(select)

    def forget_cached(self, digest: str) -> None:
        """Drop the in-memory copy of an item whose file is gone."""
        self._items.pop(digest, None)

    # -- access times ------------------------------------------------------------------------

    def touch(self, digest: str) -> None:
        """Record a use; written by the next `flush_access_times`, not now."""
        self._pending_access[digest] = time.time()

    async def used_since(self, digest: str, since: float) -> bool:
        """Whether `digest`, or an image that holds it, was used after `since` (time.time()):
        as written by a flush (which refreshes whole images), or still waiting for one."""
        pending = {used for used, when in self._pending_access.items() if when >= since}

        def check(db: sqlite3.Connection) -> bool:
            row = db.execute("SELECT accessed_at FROM items WHERE digest = ?", (digest,)).fetchone()
            if row is not None and row[0] >= since:
                return True
            return bool(pending) and not pending.isdisjoint(_reachable(db, digest, up=True))

        return await self._run(check)

    async def flush_access_times(self) -> int:
        """Write the collected access times, and those of the items they refer to, in one go.

        An image in use is refreshed whole (an index its manifests, a manifest its config and
        layers), so that eviction never takes half an image that someone pulls.
        """
        if not self._pending_access:
            return 0
        pending, self._pending_access = self._pending_access, {}
        rows = [(when, digest) for digest, when in pending.items()]

        def update(db: sqlite3.Connection) -> None:
            db.executemany(
                "UPDATE items SET accessed_at = max(accessed_at, ?) WHERE digest = ?", rows
            )
            db.executemany(
                "WITH RECURSIVE tree(digest) AS ("
                "  SELECT ? UNION SELECT child FROM children JOIN tree ON parent = tree.digest"
                ") UPDATE items SET accessed_at = max(accessed_at, ?)"
                " WHERE digest IN (SELECT digest FROM tree)",
                [(digest, when) for when, digest in rows],
            )

        try:
            await self._run(update)
        except sqlite3.Error:
            # Kept for the next flush (a full disk, a busy database): newer uses win.
            self._pending_access = pending | self._pending_access
            raise
        return len(rows)

    # -- tags --------------------------------------------------------------------------------

    async def tag(self, upstream: str, repository: str, tag: str) -> TagRecord | None:
        key = (upstream, repository, tag)
        record = self._tags.get(key)
        if record is not None:
            return record

        def select(db: sqlite3.Connection) -> TagRecord | None:
            row = db.execute(
                "SELECT digest, checked_at FROM tags"
                " WHERE upstream = ? AND repository = ? AND tag = ?",
                key,
            ).fetchone()
            return TagRecord(*row) if row else None

        record = await self._run(select)
        if record is not None:
            self._tags[key] = record
        return record

    async def set_tag(self, upstream: str, repository: str, tag: str, record: TagRecord) -> None:
        key = (upstream, repository, tag)

        def upsert(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO tags VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (upstream, repository, tag)"
                " DO UPDATE SET digest = excluded.digest, checked_at = excluded.checked_at",
                (*key, record.digest, record.checked_at),
            )

        await self._run(upsert)
        self._tags[key] = record

    async def set_referrers(
        self, upstream: str, repository: str, subject: str, query: str, page: ReferrersPage
    ) -> None:
        """Keep a referrers page for when the upstream is down; only for a subject the cache
        holds, and it goes when the subject is evicted."""
        row = (upstream, repository, subject, query, page.body, json.dumps(page.headers))

        def upsert(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO referrers SELECT ?, ?, ?, ?, ?, ?, ?"
                " WHERE EXISTS (SELECT 1 FROM items WHERE digest = ?)"
                " ON CONFLICT (upstream, repository, subject, query) DO UPDATE SET"
                " body = excluded.body, headers = excluded.headers,"
                " next_query = excluded.next_query",
                (*row, page.next_query, subject),
            )

        await self._run(upsert)

    async def referrers(
        self, upstream: str, repository: str, subject: str, query: str
    ) -> ReferrersPage | None:
        def select(db: sqlite3.Connection) -> ReferrersPage | None:
            row = db.execute(
                "SELECT body, headers, next_query FROM referrers"
                " WHERE upstream = ? AND repository = ? AND subject = ? AND query = ?",
                (upstream, repository, subject, query),
            ).fetchone()
            return ReferrersPage(row[0], json.loads(row[1]), row[2]) if row else None

        return await self._run(select)

    async def tags(self, upstream: str, repository: str) -> list[str]:
        """The tags recorded for a repository, sorted: the answer when the upstream is down."""

        def select(db: sqlite3.Connection) -> list[str]:
            rows = db.execute(
                "SELECT tag FROM tags WHERE upstream = ? AND repository = ? ORDER BY tag",
                (upstream, repository),
            )
            return [row[0] for row in rows]

        return await self._run(select)

    async def repositories(self) -> list[str]:
        """Every `upstream/repository` that holds a manifest, sorted."""

        def select(db: sqlite3.Connection) -> list[str]:
            rows = db.execute(
                "SELECT DISTINCT upstream || '/' || repository AS name FROM holdings"
                " JOIN items USING (digest) WHERE kind = 'manifest' ORDER BY name"
            )
            return [row[0] for row in rows]

        return await self._run(select)
