"""Which tags an entry takes: regsync's anchored allow/deny regexes and semver ranges.

regsync anchors every expression as `^expr$` (so `3` means the tag `3`, not every tag with a 3
in it), applies `semverRange` first, then `allow`, then `deny`, and a tag must pass all three;
several `tagSets` are OR'd. Semver ranges follow Masterminds/semver (which regsync uses): tags
such as `3.13` or `v1` are versions, `>=1.2 <2` is an AND, separate strings or `||` are ORs, and
prereleases only match a range that names a prerelease.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import total_ordering
from typing import Final

__all__ = ["SemverRange", "TagFilter", "Version", "anchored", "select"]

_VERSION: Final = re.compile(
    r"v?(\d+)(?:\.(\d+))?(?:\.(\d+))?"
    r"(?:-([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?"
)
_WILD: Final = r"x|X|\*"
_CONSTRAINT: Final = re.compile(
    rf"(=>|=<|!=|>=|<=|~>|=|>|<|~|\^)?\s*v?(\d+|{_WILD})(?:\.(\d+|{_WILD}))?(?:\.(\d+|{_WILD}))?"
    r"(?:-([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?(?:\+[0-9A-Za-z-.]+)?"
)
_HYPHEN: Final = re.compile(r"(\S+)\s+-\s+(\S+)")


def anchored(expressions: Iterable[str], key: str) -> tuple[re.Pattern[str], ...]:
    """Compile as regsync does: `^expr$`."""
    compiled = []
    for expression in expressions:
        try:
            compiled.append(re.compile(f"^{expression}$"))
        except re.error as exc:
            raise ValueError(
                f"{key}: {expression!r} is not a valid regular expression: {exc}"
            ) from None
    return tuple(compiled)


@total_ordering
@dataclass(frozen=True, slots=True)
class Version:
    """A semantic version as Masterminds parses tags: `3`, `3.13`, `v1.2.3-rc.1`."""

    major: int
    minor: int
    patch: int
    prerelease: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Version | None:
        match = _VERSION.fullmatch(text)
        if match is None:
            return None
        major, minor, patch, pre = match.groups()
        return cls(
            int(major), int(minor or 0), int(patch or 0), tuple(pre.split(".")) if pre else ()
        )

    def _key(self) -> tuple[int, int, int, int, tuple[tuple[int, int, str], ...]]:
        # A release sorts after its prereleases; numeric identifiers before alphanumeric ones.
        pre = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in self.prerelease)
        return (self.major, self.minor, self.patch, 0 if self.prerelease else 1, pre)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key() < other._key()


def _bump(version: Version, part: int) -> Version:
    """The first version past `part` (0 major, 1 minor, 2 patch)."""
    if part == 0:
        return Version(version.major + 1, 0, 0)
    if part == 1:
        return Version(version.major, version.minor + 1, 0)
    return Version(version.major, version.minor, version.patch + 1)


Check = Callable[[Version], bool]


def _comparison(operator: str, parts: Sequence[str | None], pre: str | None) -> Check:
    """One `op version` with Masterminds' meaning of missing or wildcard parts."""
    given = 0
    numbers = []
    for part in parts:
        if part is None or part in ("x", "X", "*"):
            break
        given += 1
        numbers.append(int(part))
    numbers += [0] * (3 - len(numbers))
    base = Version(numbers[0], numbers[1], numbers[2], tuple(pre.split(".")) if pre else ())
    if given == 0:
        return lambda v: operator not in ("!=", "<", ">")
    exact = given == 3
    upper = base if exact else _bump(base, given - 1)
    if operator in ("", "="):
        return (lambda v: v == base) if exact else (lambda v: base <= v < upper)
    if operator == "!=":
        return (lambda v: v != base) if exact else (lambda v: not base <= v < upper)
    if operator == ">":
        return (lambda v: v > base) if exact else (lambda v: v >= upper)
    if operator in (">=", "=>"):
        return lambda v: v >= base
    if operator == "<":
        return lambda v: v < base
    if operator in ("<=", "=<"):
        return (lambda v: v <= base) if exact else (lambda v: v < upper)
    if operator in ("~", "~>"):
        tilde_upper = _bump(base, 0 if given == 1 else 1)
        return lambda v: base <= v < tilde_upper
    # ^: the left-most non-zero part may not change.
    if base.major or given == 1:
        caret_upper = _bump(base, 0)
    elif base.minor or given == 2:
        caret_upper = _bump(base, 1)
    else:
        caret_upper = _bump(base, 2)
    return lambda v: base <= v < caret_upper


@dataclass(frozen=True, slots=True)
class _Conjunction:
    checks: tuple[Check, ...]
    allows_prerelease: bool

    def __call__(self, version: Version) -> bool:
        if version.prerelease and not self.allows_prerelease:
            return False
        return all(check(version) for check in self.checks)


@dataclass(frozen=True, slots=True)
class SemverRange:
    """One `semverRange` string: `>=1.2 <2`, `~1.2.3`, `^1`, `1.2 - 1.4`, `1.x || 2.x`."""

    text: str
    alternatives: tuple[_Conjunction, ...]

    @classmethod
    def parse(cls, text: str, key: str) -> SemverRange:
        alternatives = []
        for alternative in text.split("||"):
            alternative = _HYPHEN.sub(r">=\1 <=\2", alternative.replace(",", " "))
            checks: list[Check] = []
            prerelease = False
            position = 0
            alternative = alternative.strip()
            while position < len(alternative):
                match = _CONSTRAINT.match(alternative, position)
                if match is None:
                    raise ValueError(f"{key}: cannot parse semver range {text!r}")
                operator, major, minor, patch, pre = match.groups()
                checks.append(_comparison(operator or "", (major, minor, patch), pre))
                prerelease = prerelease or pre is not None
                position = match.end()
                while position < len(alternative) and alternative[position].isspace():
                    position += 1
            if not checks:
                raise ValueError(f"{key}: empty semver range in {text!r}")
            alternatives.append(_Conjunction(tuple(checks), prerelease))
        return cls(text, tuple(alternatives))

    def matches(self, version: Version) -> bool:
        return any(alternative(version) for alternative in self.alternatives)


@dataclass(frozen=True, slots=True)
class TagFilter:
    """One `tags:` block. Empty lists do not filter."""

    allow: tuple[re.Pattern[str], ...] = ()
    deny: tuple[re.Pattern[str], ...] = ()
    semver: tuple[SemverRange, ...] = ()

    def matches(self, tag: str) -> bool:
        if self.semver:
            version = Version.parse(tag)
            if version is None or not any(r.matches(version) for r in self.semver):
                return False
        if self.allow and not any(p.search(tag) for p in self.allow):
            return False
        return not any(p.search(tag) for p in self.deny)


def select(tags: Iterable[str], filters: Sequence[TagFilter]) -> list[str]:
    """The tags that pass any of the filters (all tags when there are none), sorted."""
    return sorted(tag for tag in tags if not filters or any(f.matches(tag) for f in filters))
