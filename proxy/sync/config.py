"""The sync configuration: regsync's file format (`version`, `creds`, `defaults`, `sync`).

An existing regsync.yml must load unchanged: `x-` keys are ignored (YAML anchors live there),
every entry inherits what `defaults` sets, values go through regsync's templates, durations are
Go's (`15m`, `1h30m`). Keys regsync knows that this worker does not implement are accepted with a
warning; a misspelt key is a warning too, as regsync ignores it. Our additions are `pin`,
`retention` and `name`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

import yaml

from proxy.manifest import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST
from proxy.settings import ConfigError, parse_duration, require_bool, require_string

from .attached import ReferrerFilter
from .filters import SemverRange, TagFilter, anchored
from .refs import CacheRef, Ref, parse_ref, parse_target
from .schedule import Schedule, parse_schedule
from .template import Template, TemplateError

__all__ = [
    "DEFAULT_MEDIA_TYPES",
    "PIN_OWNER_PREFIX",
    "Cred",
    "Entry",
    "RateLimitPolicy",
    "Retention",
    "SyncConfig",
    "load_sync_config",
]

# The prefix of the pin owners the sync worker manages (`sync:` and the entry's name).
PIN_OWNER_PREFIX = "sync:"

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_MEDIA_TYPES: Final = (DOCKER_MANIFEST, DOCKER_LIST, OCI_MANIFEST, OCI_INDEX)
# regsync's floor for `ratelimit.retry`: re-checking Docker Hub more often gains nothing.
RATE_LIMIT_RETRY_MIN: Final = 300.0

_CRED_KEYS: Final = {
    "registry",
    "hostname",
    "user",
    "pass",
    "tls",
    "regcert",
    "reqPerSec",
    "reqConcurrent",
}
_CRED_IGNORED: Final = {
    "token",
    "credHelper",
    "credExpire",
    "credHost",
    "scheme",
    "clientCert",
    "clientKey",
    "pathPrefix",
    "mirrors",
    "priority",
    "repoAuth",
    "api",
    "apiOpts",
    "blobChunk",
    "blobMax",
}
_STEP_KEYS: Final = {
    "interval",
    "schedule",
    "ratelimit",
    "backup",
    "mediaTypes",
    "platform",
    "platforms",
    "pin",
    "retention",
    "digestTags",
    "referrers",
    "referrerFilters",
}
_STEP_IGNORED: Final = {
    "referrerSource",
    "referrerTarget",
    "referrerSlow",
    "fastCheck",
    "forceRecursive",
    "includeExternal",
    "hooks",
}
_DEFAULT_KEYS: Final = _STEP_KEYS | {"parallel"}
_DEFAULT_IGNORED: Final = _STEP_IGNORED | {
    "blobLimit",
    "cacheCount",
    "cacheTime",
    "skipDockerConfig",
    "userAgent",
}
_ENTRY_KEYS: Final = _STEP_KEYS | {"source", "target", "type", "tags", "tagSets", "name"}
_ENTRY_IGNORED: Final = _STEP_IGNORED | {"repos", "targetTag"}
# regsync's ConfigSync fields whose Go names are not their YAML keys with a capital.
_GO_NAMES: Final = {
    "ratelimit": "RateLimit",
    "referrerSource": "ReferrerSrc",
    "referrerTarget": "ReferrerTgt",
}


@dataclass(frozen=True, slots=True)
class Cred:
    """A `creds[]` entry: how to reach and log in to one registry name."""

    registry: str
    hostname: str
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: Literal["enabled", "insecure", "disabled"] = "enabled"
    regcert: str | None = field(default=None, repr=False)
    req_per_sec: float = 0.0
    req_concurrent: int = 3


@dataclass(frozen=True, slots=True)
class RateLimitPolicy:
    """Do not start a copy while the source has fewer than `min` pulls left; re-check every
    `retry` seconds."""

    min: int = 0
    retry: float = RATE_LIMIT_RETRY_MIN


@dataclass(frozen=True, slots=True)
class Retention:
    """Keep the newest `keep` target tags of an entry (by `sort`), never those `deny` names."""

    keep: int
    sort: Literal["semver", "date", "name"] = "semver"
    deny: tuple[re.Pattern[str], ...] = ()


@dataclass(frozen=True, slots=True)
class Entry:
    """One `sync[]` entry with the defaults applied."""

    name: str
    source: Ref
    target: Ref | CacheRef
    type: Literal["image", "repository"]
    tags: tuple[TagFilter, ...] = ()
    platform: str | None = None
    platforms: tuple[str, ...] = ()
    schedule: Schedule | None = None
    backup: Template | None = None
    ratelimit: RateLimitPolicy = RateLimitPolicy()
    media_types: tuple[str, ...] = DEFAULT_MEDIA_TYPES
    pin: bool = False
    retention: Retention | None = None
    digest_tags: bool = False
    referrers: bool = False
    referrer_filters: tuple[ReferrerFilter, ...] = ()
    # What templates see as `.Sync`: the entry with its defaults, under regsync's Go names.
    template_view: Mapping[str, object] = field(default_factory=dict, compare=False, repr=False)

    @property
    def to_cache(self) -> bool:
        return isinstance(self.target, CacheRef)

    @property
    def pin_owner(self) -> str:
        """Who the entry's pins belong to in the cache's database."""
        return PIN_OWNER_PREFIX + self.name


@dataclass(frozen=True, slots=True)
class SyncConfig:
    creds: tuple[Cred, ...]
    parallel: int
    entries: tuple[Entry, ...]
    warnings: tuple[str, ...] = ()

    def cred(self, registry: str) -> Cred | None:
        return next((cred for cred in self.creds if cred.registry == registry), None)


def load_sync_config(path: Path, env: Mapping[str, str] | None = None) -> SyncConfig:
    """Read and validate a regsync-format file; `ConfigError` names the key at fault."""
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read sync config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"sync config {path} is not valid YAML: {exc}") from None
    config = _Loader(os.environ if env is None else env).load(_mapping(loaded, "sync config"))
    for warning in config.warnings:
        log.warning("sync config %s: %s", path, warning)
    return config


def _mapping(value: object, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
    return {k: v for k, v in value.items() if not str(k).startswith("x-")}


def _list(value: object, key: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
    return value


def _template_view(
    section: Mapping[str, Any], defaults: Mapping[str, Any], kind: str, ratelimit: RateLimitPolicy
) -> dict[str, object]:
    """An entry as regsync's templates see `.Sync`: its ConfigSync after the defaults, under
    Go's field names (`.Sync.Source`, `.Sync.Type`, `.Sync.RateLimit.Min`, ...)."""
    inherited = {k: v for k, v in defaults.items() if k in _STEP_KEYS | _STEP_IGNORED}
    view = _go_fields({**inherited, **section})
    view["Type"] = kind
    view["RateLimit"] = {"Min": ratelimit.min, "Retry": ratelimit.retry}
    view.setdefault("MediaTypes", list(DEFAULT_MEDIA_TYPES))
    return view


def _go_fields(section: Mapping[Any, Any]) -> dict[str, object]:
    return {
        _GO_NAMES.get(str(k), str(k)[:1].upper() + str(k)[1:]): _go_value(v)
        for k, v in section.items()
    }


def _go_value(value: object) -> object:
    if isinstance(value, dict):
        return _go_fields(value)
    if isinstance(value, list):
        return [_go_value(item) for item in value]
    return value


def _patterns(value: object, key: str) -> list[str]:
    """A list of tag patterns or ranges. A number is refused: YAML reads `3.10` as 3.1, which
    would then match tag 3.1 and never 3.10."""
    patterns = []
    for item in _list(value, key):
        if isinstance(item, int | float) and not isinstance(item, bool):
            raise ConfigError(
                f"{key}[]: {item!r} is a number in YAML (3.10 reads as 3.1), not a pattern: "
                "quote it"
            )
        patterns.append(require_string(item, f"{key}[]"))
    return patterns


def _int(value: object, key: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}: expected a whole number of at least {minimum}, got {value!r}")
    return value


def _attempt(key: str, parse: Callable[[], T]) -> T:
    """Turn a parser's ValueError into a ConfigError naming the key."""
    try:
        return parse()
    except ConfigError:
        raise
    except (ValueError, TemplateError) as exc:
        message = str(exc)
        raise ConfigError(message if message.startswith(key) else f"{key}: {message}") from None


class _Loader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.warnings: list[str] = []

    def _check_keys(
        self, section: Mapping[str, Any], known: set[str], ignored: set[str], where: str
    ) -> None:
        for key in sorted(set(section) - known):
            if key in ignored:
                self.warnings.append(f"{where}.{key} is not supported by registry-cache; ignored")
            else:
                self.warnings.append(f"{where}.{key} is not a regsync key; ignored")

    def _expand(self, value: object, key: str, data: object = None) -> str:
        text = require_string(value, key)
        return _attempt(key, lambda: Template.parse(text).render(data, env=self.env))

    def load(self, raw: dict[str, Any]) -> SyncConfig:
        version = raw.get("version", 1)
        if version not in (0, 1, None):
            raise ConfigError(f"version: only version 1 is supported, got {version!r}")
        self._check_keys(raw, {"version", "creds", "defaults", "sync"}, set(), "sync config")
        creds = tuple(
            self._cred(entry, f"creds[{i}]")
            for i, entry in enumerate(_list(raw.get("creds"), "creds"))
        )
        defaults = _mapping(raw.get("defaults") or {}, "defaults")
        self._check_keys(defaults, _DEFAULT_KEYS, _DEFAULT_IGNORED, "defaults")
        parallel = defaults.get("parallel", 1)
        if isinstance(parallel, bool) or not isinstance(parallel, int):
            raise ConfigError(f"defaults.parallel: expected a whole number, got {parallel!r}")
        parallel = max(1, parallel)  # as regsync: zero or less is one copy at a time
        entries: list[Entry] = []
        names: set[str] = set()
        for i, raw_entry in enumerate(_list(raw.get("sync"), "sync")):
            entry = self._entry(raw_entry, defaults, f"sync[{i}]")
            if entry.name in names:
                raise ConfigError(f"sync[{i}].name: {entry.name!r} is used twice; set `name:`")
            names.add(entry.name)
            entries.append(entry)
        return SyncConfig(creds, parallel, tuple(entries), tuple(self.warnings))

    def _cred(self, raw: object, key: str) -> Cred:
        section = _mapping(raw, key)
        self._check_keys(section, _CRED_KEYS, _CRED_IGNORED, key)
        registry = self._expand(section.get("registry"), f"{key}.registry")
        registry = (
            "docker.io" if registry in ("index.docker.io", "registry-1.docker.io") else registry
        )
        hostname = section.get("hostname")
        user = section.get("user")
        password = section.get("pass")
        tls = section.get("tls", "enabled")
        if tls not in ("enabled", "insecure", "disabled"):
            raise ConfigError(f"{key}.tls: expected enabled, insecure or disabled, got {tls!r}")
        regcert = section.get("regcert")
        per_sec = section.get("reqPerSec", 0)
        if isinstance(per_sec, bool) or not isinstance(per_sec, int | float) or per_sec < 0:
            raise ConfigError(f"{key}.reqPerSec: expected a number, got {per_sec!r}")
        return Cred(
            registry=registry,
            hostname=self._expand(hostname, f"{key}.hostname") if hostname else registry,
            user=self._expand(user, f"{key}.user") if user else None,
            password=self._expand(password, f"{key}.pass") if password else None,
            tls=tls,
            regcert=self._expand(regcert, f"{key}.regcert") if regcert else None,
            req_per_sec=float(per_sec),
            req_concurrent=_int(section.get("reqConcurrent", 3), f"{key}.reqConcurrent", 1),
        )

    def _entry(self, raw: object, defaults: Mapping[str, Any], key: str) -> Entry:
        section = _mapping(raw, key)
        self._check_keys(section, _ENTRY_KEYS, _ENTRY_IGNORED, key)

        def setting(name: str, default: object = None) -> Any:
            return section[name] if name in section else defaults.get(name, default)

        kind = section.get("type", "image")
        if kind == "registry":
            raise ConfigError(f"{key}.type: type registry is not supported yet; list repositories")
        if kind not in ("image", "repository"):
            raise ConfigError(f"{key}.type: expected image or repository, got {kind!r}")
        ratelimit = self._ratelimit(section.get("ratelimit"), defaults.get("ratelimit"), key)
        view = _template_view(section, defaults, kind, ratelimit)
        source_text = self._expand(section.get("source"), f"{key}.source", {"Sync": view})
        source = _attempt(f"{key}.source", lambda: parse_ref(source_text, f"{key}.source"))
        view["Source"] = source_text  # expanded in regsync's order: source, then target
        target_raw = section.get("target")
        target: Ref | CacheRef
        if target_raw is None:
            target = CacheRef(source.registry, source.repository, source.tag)
        else:
            target_text = self._expand(target_raw, f"{key}.target", {"Sync": view})
            target = _attempt(f"{key}.target", lambda: parse_target(target_text, f"{key}.target"))
        view["Target"] = str(target)
        self._check_refs(kind, source, target, key)
        pin, digest_tags, referrers = (
            require_bool(setting(name, False), f"{key}.{name}")
            for name in ("pin", "digestTags", "referrers")
        )
        if pin and not isinstance(target, CacheRef):
            raise ConfigError(f"{key}.pin: only a target in the cache can be pinned")
        platform = setting("platform")
        platforms = tuple(
            require_string(p, f"{key}.platforms[]")
            for p in _list(setting("platforms"), f"{key}.platforms")
        )
        backup = setting("backup")
        retention = self._retention(section.get("retention"), f"{key}.retention")
        if retention is not None and kind != "repository":
            raise ConfigError(f"{key}.retention: only a type: repository entry has tags to retire")
        media_types = tuple(
            require_string(m, f"{key}.mediaTypes[]")
            for m in _list(setting("mediaTypes", list(DEFAULT_MEDIA_TYPES)), f"{key}.mediaTypes")
        )
        return Entry(
            name=require_string(section.get("name", f"{source} -> {target}"), f"{key}.name"),
            source=source,
            target=target,
            type=kind,
            tags=self._tag_filters(section, key),
            platform=require_string(platform, f"{key}.platform") if platform is not None else None,
            platforms=platforms,
            schedule=parse_schedule(setting("schedule"), setting("interval"), key),
            backup=_attempt(
                f"{key}.backup", lambda: Template.parse(require_string(backup, "backup"))
            )
            if backup
            else None,
            ratelimit=ratelimit,
            media_types=media_types,
            pin=pin,
            retention=retention,
            digest_tags=digest_tags,
            referrers=referrers,
            referrer_filters=self._referrer_filters(
                setting("referrerFilters"), f"{key}.referrerFilters"
            ),
            template_view=view,
        )

    @staticmethod
    def _check_refs(kind: str, source: Ref, target: Ref | CacheRef, key: str) -> None:
        if source.digest and kind == "repository":
            raise ConfigError(f"{key}.source: a repository source takes no digest")
        if kind == "repository" and (source.tag or target.tag):
            raise ConfigError(f"{key}: a type: repository source and target take no tag")
        if kind == "image" and not (source.tag or source.digest):
            raise ConfigError(
                f"{key}.source: a type: image source needs a tag, e.g. {source}:latest"
            )
        if isinstance(target, CacheRef) and (
            target.upstream != source.registry or target.repository != source.repository
        ):
            raise ConfigError(
                f"{key}.target: a cache target holds its source's own repository "
                f"(cache/{source.registry}/{source.repository}), not {target}"
            )

    def _tag_filters(self, section: Mapping[str, Any], key: str) -> tuple[TagFilter, ...]:
        blocks = [(section["tags"], f"{key}.tags")] if section.get("tags") else []
        blocks += [
            (block, f"{key}.tagSets[{i}]")
            for i, block in enumerate(_list(section.get("tagSets"), f"{key}.tagSets"))
        ]
        return tuple(self._tag_filter(block, where) for block, where in blocks)

    def _tag_filter(self, block: object, where: str) -> TagFilter:
        raw = _mapping(block, where)
        self._check_keys(raw, {"allow", "deny", "semverRange"}, set(), where)
        allow, deny, ranges = (
            _patterns(raw.get(name), f"{where}.{name}") for name in ("allow", "deny", "semverRange")
        )
        return _attempt(
            where,
            lambda: TagFilter(
                allow=anchored(allow, f"{where}.allow"),
                deny=anchored(deny, f"{where}.deny"),
                semver=tuple(SemverRange.parse(text, f"{where}.semverRange") for text in ranges),
            ),
        )

    @staticmethod
    def _ratelimit(raw: object, default_raw: object, key: str) -> RateLimitPolicy:
        """Field by field, as regsync's syncSetDefaults: what the entry leaves unset or zero
        comes from `defaults.ratelimit`."""
        section = _mapping(raw or {}, f"{key}.ratelimit")
        default = _mapping(default_raw or {}, "defaults.ratelimit")
        minimum = _int(section.get("min", 0), f"{key}.ratelimit.min") or _int(
            default.get("min", 0), "defaults.ratelimit.min"
        )
        retry = parse_duration(section.get("retry", 0), f"{key}.ratelimit.retry") or (
            parse_duration(default.get("retry", 0), "defaults.ratelimit.retry")
        )
        return RateLimitPolicy(minimum, max(retry, RATE_LIMIT_RETRY_MIN))

    def _referrer_filters(self, raw: object, key: str) -> tuple[ReferrerFilter, ...]:
        filters: list[ReferrerFilter] = []
        for i, item in enumerate(_list(raw, key)):
            where = f"{key}[{i}]"
            section = _mapping(item, where)
            self._check_keys(section, {"artifactType", "annotations"}, set(), where)
            artifact_type = section.get("artifactType")
            annotations = section.get("annotations") or {}
            if not isinstance(annotations, dict):
                raise ConfigError(f"{where}.annotations: expected a mapping of names to values")
            filters.append(
                ReferrerFilter(
                    require_string(artifact_type, f"{where}.artifactType")
                    if artifact_type
                    else None,
                    tuple((str(k), "" if v is None else str(v)) for k, v in annotations.items()),
                )
            )
        return tuple(filters)

    def _retention(self, raw: object, key: str) -> Retention | None:
        if raw is None:
            return None
        section = _mapping(raw, key)
        self._check_keys(section, {"keep", "sort", "deny"}, set(), key)
        sort = section.get("sort", "semver")
        if sort not in ("semver", "date", "name"):
            raise ConfigError(f"{key}.sort: expected semver, date or name, got {sort!r}")
        deny = _patterns(section.get("deny"), f"{key}.deny")
        return Retention(
            keep=_int(section.get("keep"), f"{key}.keep", 1),
            sort=sort,
            deny=_attempt(f"{key}.deny", lambda: anchored(deny, f"{key}.deny")),
        )
