"""Which target tags an entry retires: all but the newest `keep`, never the `deny`-listed."""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence

from .config import Retention
from .filters import Version

__all__ = ["to_retire"]

_EPOCH = datetime.datetime.min.replace(tzinfo=datetime.UTC)


def to_retire(
    tags: Sequence[str],
    retention: Retention,
    created: Mapping[str, datetime.datetime | None] | None = None,
) -> list[str]:
    """Tags past the newest `retention.keep`, oldest first. Tags that cannot be ranked (not a
    version when sorting by semver, no date when sorting by date) are never retired."""
    candidates = [tag for tag in tags if not any(p.search(tag) for p in retention.deny)]
    if retention.sort == "semver":
        versions = {tag: v for tag in candidates if (v := Version.parse(tag)) is not None}
        ranked = sorted(versions, key=lambda t: (versions[t], t))
    elif retention.sort == "date":
        dates = created or {}
        ranked = sorted(
            (tag for tag in candidates if dates.get(tag)), key=lambda t: (dates[t] or _EPOCH, t)
        )
    else:
        ranked = sorted(candidates)
    return ranked[: max(0, len(ranked) - retention.keep)]
