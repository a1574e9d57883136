"""Configuration: one YAML file, overridden by environment variables, into frozen dataclasses.

Everything is validated and finished here (defaults, upstreams from the pull secret, ignored
registries), so the rest of the service never sees an unvalidated value or a raw string. A bad value
stops start-up with a `ConfigError` that names the key or variable.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import ipaddress
import json
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import humanfriendly
import yaml

__all__ = [
    "AuthSettings",
    "CleanerSettings",
    "ConfigError",
    "RepositoryLogin",
    "Settings",
    "TlsSettings",
    "UpstreamSettings",
    "format_bytes",
    "host_allowed",
    "load_settings",
    "parse_duration",
    "parse_size",
    "receives_credentials",
    "registry_upstream",
    "require_bool",
    "require_string",
]

log = logging.getLogger(__name__)

DOCKER_HUB: Final = "docker.io"

# What clients write as the first path component: a lowercase host name or address, with an
# optional port. Upstreams are matched by this exact text, so anything else is unreachable.
_REGISTRY_HOST: Final = re.compile(
    r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*(?::\d{1,5})?"
)

# The registries a cache with no configuration knows, anonymously. Each maps the name clients
# write to where the registry's API is.
_PUBLIC_REGISTRIES: Final[Mapping[str, str]] = {
    DOCKER_HUB: "https://registry-1.docker.io",
    "quay.io": "https://quay.io",
    "ghcr.io": "https://ghcr.io",
    "gcr.io": "https://gcr.io",
    "registry.k8s.io": "https://registry.k8s.io",
    "public.ecr.aws": "https://public.ecr.aws",
    "mcr.microsoft.com": "https://mcr.microsoft.com",
    "registry.redhat.io": "https://registry.redhat.io",
    "registry.access.redhat.com": "https://registry.access.redhat.com",
}

# Domains (with their subdomains) besides an upstream's own host that it is known to send us
# to for tokens or blob storage. Nothing else is ever contacted on an upstream's behalf.
_KNOWN_EXTRA_HOSTS: Final[Mapping[str, tuple[str, ...]]] = {
    DOCKER_HUB: ("docker.io", "docker.com"),
    "quay.io": ("quay.io", "amazonaws.com", "cloudfront.net"),
    "ghcr.io": ("ghcr.io", "githubusercontent.com", "github.com"),
    "gcr.io": ("gcr.io", "googleapis.com", "pkg.dev"),
    "registry.k8s.io": ("k8s.io", "pkg.dev", "googleapis.com", "amazonaws.com"),
    "public.ecr.aws": ("ecr.aws", "amazonaws.com", "cloudfront.net"),
    "mcr.microsoft.com": ("azureedge.net", "microsoft.com", "azurefd.net"),
    "registry.redhat.io": ("redhat.io", "redhat.com", "akamaized.net"),
    "registry.access.redhat.com": ("redhat.com", "akamaized.net"),
}

# Token services on another host than the registry's API: the only hosts besides it that get
# an upstream's credentials.
_KNOWN_AUTH_HOSTS: Final[Mapping[str, tuple[str, ...]]] = {
    DOCKER_HUB: ("auth.docker.io",),
    "registry.redhat.io": ("sso.redhat.com",),
}

# Docker's own config files name Docker Hub in several ways.
_DOCKER_HUB_ALIASES: Final = frozenset(
    {"docker.io", "index.docker.io", "registry-1.docker.io", "https://index.docker.io/v1/"}
)


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the key and the problem."""


@dataclass(frozen=True, slots=True)
class RepositoryLogin:
    """Credentials for the repositories under `prefix` (a pull-secret key with a path, such as
    `quay.io/myorg`; "" for the key of the host alone)."""

    prefix: str
    username: str
    password: str = field(repr=False)

    def covers(self, repository: str) -> bool:
        return repository == self.prefix or repository.startswith(self.prefix + "/")


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    """One registry we pull from."""

    name: str
    url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    manifest_ttl: float = 300.0
    # Domains besides the upstream's own host that may receive requests on its behalf (token
    # realms, blob redirects); never with the upstream's credentials.
    extra_hosts: tuple[str, ...] = ()
    # Logins scoped to repository paths, the most specific first; they win over `username`
    # and `password`.
    repository_logins: tuple[RepositoryLogin, ...] = ()
    # Hosts of its token service besides its own host: the only others that get credentials.
    auth_hosts: tuple[str, ...] = ()

    @property
    def has_credentials(self) -> bool:
        return (self.username is not None and self.password is not None) or bool(
            self.repository_logins
        )

    def login_for(self, repository: str) -> tuple[str, str] | None:
        """The login to use for `repository`: the most specific scoped one that covers it, else
        the upstream's own (as containers-auth.json resolves its keys)."""
        for login in self.repository_logins:
            if login.covers(repository):
                return login.username, login.password
        if self.username is not None and self.password is not None:
            return self.username, self.password
        return None


@dataclass(frozen=True, slots=True)
class CleanerSettings:
    """The disk budget and how often it is enforced."""

    max_size: int = 10 * 1024**3
    threshold_percentage: float = 20.0
    run_every: float = 1800.0

    @property
    def high_water_mark(self) -> int:
        return int(self.max_size * (1 + self.threshold_percentage / 100))


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """HTTPS: the certificate chain, and the key when it is not in the same file (certs.pem)."""

    cert: Path
    key: Path | None = None


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """Client auth: who may pull, from an htpasswd file of bcrypt entries."""

    htpasswd: Path
    realm: str = "registry-cache"
    # Client auth covers every endpoint but the probes; false opens /metrics to a scraper
    # without credentials.
    protect_metrics: bool = True


@dataclass(frozen=True, slots=True)
class Settings:
    """The whole, validated configuration."""

    host: str = "127.0.0.1"
    port: int = 8443
    storage_root: Path = Path("data")
    default_upstream: str = DOCKER_HUB
    manifest_ttl: float = 300.0
    cache_write_timeout: float = 300.0
    upstream_connect_timeout: float = 10.0
    upstream_read_timeout: float = 30.0
    upstreams: Mapping[str, UpstreamSettings] = field(default_factory=dict)
    cleaner: CleanerSettings = field(default_factory=CleanerSettings)
    log_level: str = "INFO"
    log_format: str = "text"
    access_log: bool = True
    tls: TlsSettings | None = None
    auth: AuthSettings | None = None
    drain_timeout: float = 60.0
    # A connection that sends no complete request for this long is closed (slowloris).
    idle_timeout: float = 60.0
    max_connections_per_address: int = 512
    sync_config: Path | None = None  # a regsync-format file for the sync worker


_DURATION_PART: Final = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s|d)")
_DURATION_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: object, key: str) -> float:
    """Seconds from `30m`, `1h2m3s`, `45s`, `500ms` or a plain number of seconds."""
    if isinstance(text, bool) or not isinstance(text, str | int | float):
        raise ConfigError(f"{key}: expected a duration such as 30m or 1h2m3s, got {text!r}")
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        value = text.strip()
        if re.fullmatch(r"\d+(?:\.\d+)?", value):
            seconds = float(value)
        else:
            parts = _DURATION_PART.findall(value)
            if not parts or "".join(n + u for n, u in parts) != value:
                raise ConfigError(f"{key}: expected a duration such as 30m or 1h2m3s, got {text!r}")
            seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(f"{key}: a duration must be finite and not negative, got {text!r}")
    return seconds


def format_bytes(size: float) -> str:
    """A size as people read it, in the same binary units `parse_size` takes: `1.5 GiB`."""
    return humanfriendly.format_size(int(size), binary=True)


def parse_size(text: object, key: str) -> int:
    """Bytes from `10G`, `500MiB`, `1.5T` (K, M, G, T are powers of 1024, as `du -h` shows)."""
    if isinstance(text, bool) or not isinstance(text, str | int):
        raise ConfigError(
            f"{key}: expected a size such as 10G or 500MiB, or a whole number of bytes, "
            f"got {text!r}"
        )
    if isinstance(text, int):
        size = text
    else:
        try:
            size = humanfriendly.parse_size(text.strip(), binary=True)
        except humanfriendly.InvalidSize:
            raise ConfigError(
                f"{key}: expected a size such as 10G or 500MiB, got {text!r}"
            ) from None
    if size <= 0:
        raise ConfigError(f"{key}: a size must be positive, got {text!r}")
    return size


def load_settings(path: Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Read the YAML file (if any), apply the environment, validate everything."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        raw = _mapping(loaded, "config")
    return _Loader(raw, env).settings()


def _mapping(value: object, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
    return value


def require_string(value: object, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: expected a non-empty string, got {value!r}")
    return value


def require_bool(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    return value


def _reject_unknown(section: Mapping[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(section) - known)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown configuration key {prefix}{unknown[0]} (known: {', '.join(sorted(known))})"
        )


def _split_address(text: str, key: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{key}: expected HOST:PORT such as 0.0.0.0:8443, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


class _Loader:
    """One pass over the raw YAML and the environment."""

    _TOP_KEYS: Final = {
        "listen",
        "storage",
        "default_upstream",
        "manifest_ttl",
        "cache_write_timeout",
        "upstream_timeouts",
        "pull_secret",
        "ignore_registries",
        "upstreams",
        "cleaner",
        "log_level",
        "log",
        "tls",
        "auth",
        "http",
        "sync",
    }

    def __init__(self, raw: dict[str, Any], env: Mapping[str, str]) -> None:
        _reject_unknown(raw, set(self._TOP_KEYS), "")
        self.raw = raw
        self.env = env

    def _value(self, key: str, env_name: str | None, default: Any) -> tuple[Any, str]:
        """The environment's value if set, else the file's, else the default; and its name."""
        if env_name is not None and self.env.get(env_name):
            return self.env[env_name], env_name
        return self.raw.get(key, default), key

    def settings(self) -> Settings:
        listen, listen_key = self._value("listen", "REGISTRY_HTTP_ADDR", "127.0.0.1:8443")
        host, port = _split_address(require_string(listen, listen_key), listen_key)
        storage = _mapping(self.raw.get("storage", {}), "storage")
        _reject_unknown(storage, {"root"}, "storage")
        root, root_key = (
            (self.env["REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY"], "REGISTRY_STORAGE_...")
            if self.env.get("REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY")
            else (storage.get("root", "data"), "storage.root")
        )
        manifest_ttl = parse_duration(self.raw.get("manifest_ttl", "5m"), "manifest_ttl")
        timeouts = _mapping(self.raw.get("upstream_timeouts", {}), "upstream_timeouts")
        _reject_unknown(timeouts, {"connect", "read"}, "upstream_timeouts")
        upstreams = self._upstreams(manifest_ttl)
        default_upstream = require_string(
            self.raw.get("default_upstream", DOCKER_HUB), "default_upstream"
        )
        if default_upstream not in upstreams:
            raise ConfigError(
                f"default_upstream: {default_upstream!r} is not a configured upstream "
                f"(configured: {', '.join(sorted(upstreams))})"
            )
        log_level, log_format, access_log = self._log()
        return Settings(
            host=host,
            port=port,
            storage_root=Path(require_string(root, root_key)),
            default_upstream=default_upstream,
            manifest_ttl=manifest_ttl,
            cache_write_timeout=parse_duration(
                self.raw.get("cache_write_timeout", "5m"), "cache_write_timeout"
            ),
            upstream_connect_timeout=parse_duration(
                timeouts.get("connect", "10s"), "upstream_timeouts.connect"
            ),
            upstream_read_timeout=parse_duration(
                timeouts.get("read", "30s"), "upstream_timeouts.read"
            ),
            upstreams=upstreams,
            cleaner=self._cleaner(),
            log_level=log_level,
            log_format=log_format,
            access_log=access_log,
            tls=self._tls(),
            auth=self._auth(),
            **self._http(),
            sync_config=self._sync_config(),
        )

    def _sync_config(self) -> Path | None:
        section = _mapping(self.raw.get("sync", {}), "sync")
        _reject_unknown(section, {"config"}, "sync")
        path, key = self._section_value(section, "sync", "config", "SYNC_CONFIG")
        return None if path is None else Path(require_string(path, key))

    def _log(self) -> tuple[str, str, bool]:
        """Level, format and access log; `log_level` is the older spelling of `log.level`."""
        section = _mapping(self.raw.get("log", {}), "log")
        _reject_unknown(section, {"level", "format", "access"}, "log")
        if "level" in section and "log_level" in self.raw:
            raise ConfigError("log.level and log_level: give only one")
        level_key = "log.level" if "level" in section else "log_level"
        level = require_string(
            section.get("level", self.raw.get("log_level", "INFO")), level_key
        ).upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ConfigError(f"{level_key}: expected DEBUG, INFO, WARNING or ERROR, not {level}")
        log_format, format_key = self._section_value(section, "log", "format", "LOG_FORMAT")
        log_format = require_string(log_format or "text", format_key).lower()
        if log_format not in {"text", "json"}:
            raise ConfigError(f"{format_key}: expected text or json, got {log_format!r}")
        access = require_bool(section.get("access", True), "log.access")
        return level, log_format, access

    def _tls(self) -> TlsSettings | None:
        section = _mapping(self.raw.get("tls", {}), "tls")
        _reject_unknown(section, {"cert", "key"}, "tls")
        cert, cert_key = self._section_value(
            section, "tls", "cert", "REGISTRY_HTTP_TLS_CERTIFICATE"
        )
        key, key_key = self._section_value(section, "tls", "key", "REGISTRY_HTTP_TLS_KEY")
        if cert is None:
            if key is not None:
                raise ConfigError(f"{key_key}: a key without a certificate (set tls.cert)")
            return None
        return TlsSettings(
            cert=Path(require_string(cert, cert_key)),
            key=None if key is None else Path(require_string(key, key_key)),
        )

    def _auth(self) -> AuthSettings | None:
        section = _mapping(self.raw.get("auth", {}), "auth")
        _reject_unknown(section, {"htpasswd", "protect_metrics"}, "auth")
        kind = self.env.get("REGISTRY_AUTH")
        if kind and kind != "htpasswd":
            raise ConfigError(f"REGISTRY_AUTH: only htpasswd is supported, got {kind!r}")
        htpasswd = _mapping(section.get("htpasswd", {}), "auth.htpasswd")
        _reject_unknown(htpasswd, {"path", "realm"}, "auth.htpasswd")
        path, path_key = self._section_value(
            htpasswd, "auth.htpasswd", "path", "REGISTRY_AUTH_HTPASSWD_PATH"
        )
        if path is None:
            if kind or htpasswd:
                raise ConfigError("auth.htpasswd.path (REGISTRY_AUTH_HTPASSWD_PATH) is required")
            return None
        realm, realm_key = self._section_value(
            htpasswd, "auth.htpasswd", "realm", "REGISTRY_AUTH_HTPASSWD_REALM"
        )
        realm = require_string(realm or "registry-cache", realm_key)
        if not re.fullmatch(r"[\x20-\x7e]+", realm) or '"' in realm or "\\" in realm:
            raise ConfigError(f"{realm_key}: printable ASCII without quotes, got {realm!r}")
        protect_metrics = require_bool(section.get("protect_metrics", True), "auth.protect_metrics")
        return AuthSettings(Path(require_string(path, path_key)), realm, protect_metrics)

    def _http(self) -> dict[str, Any]:
        """Limits towards clients: shutdown drain, idle connections, connections per address."""
        section = _mapping(self.raw.get("http", {}), "http")
        _reject_unknown(section, {"draintimeout", "idletimeout", "maxconnsperaddress"}, "http")
        idle = parse_duration(section.get("idletimeout", "60s"), "http.idletimeout")
        if idle <= 0:
            raise ConfigError("http.idletimeout: must be longer than zero")
        per_address = section.get("maxconnsperaddress", 512)
        if isinstance(per_address, bool) or not isinstance(per_address, int) or per_address < 1:
            raise ConfigError(
                f"http.maxconnsperaddress: expected a positive number, got {per_address!r}"
            )
        return {
            "drain_timeout": parse_duration(
                section.get("draintimeout", "60s"), "http.draintimeout"
            ),
            "idle_timeout": idle,
            "max_connections_per_address": per_address,
        }

    def _section_value(
        self,
        section: Mapping[str, Any],
        where: str,
        key: str,
        env_name: str,
        default: Any = None,
    ) -> tuple[Any, str]:
        """The environment's value if set, else the section's (else `default`); and its name."""
        if self.env.get(env_name):
            return self.env[env_name], env_name
        return section.get(key, default), f"{where}.{key}"

    def _cleaner(self) -> CleanerSettings:
        section = _mapping(self.raw.get("cleaner", {}), "cleaner")
        _reject_unknown(section, {"maxsize", "threshold_percentage", "runevery"}, "cleaner")
        size, size_key = self._section_value(
            section, "cleaner", "maxsize", "CLEANER_MAXSIZE", "10G"
        )
        threshold, threshold_key = self._section_value(
            section, "cleaner", "threshold_percentage", "CLEANER_THRESHOLD_PERCENTAGE", 20
        )
        every, every_key = self._section_value(
            section, "cleaner", "runevery", "CLEANER_RUNEVERY_TIME", "30m"
        )
        try:
            threshold_value = float(threshold)
        except (TypeError, ValueError):
            raise ConfigError(
                f"{threshold_key}: expected a percentage, got {threshold!r}"
            ) from None
        if not math.isfinite(threshold_value) or threshold_value < 0:
            raise ConfigError(
                f"{threshold_key}: expected a finite percentage, not negative, got {threshold!r}"
            )
        run_every = parse_duration(every, every_key)
        if run_every <= 0:
            raise ConfigError(f"{every_key}: must be longer than zero, got {every!r}")
        return CleanerSettings(
            max_size=parse_size(size, size_key),
            threshold_percentage=threshold_value,
            run_every=run_every,
        )

    def _ignored(self) -> frozenset[str]:
        if self.env.get("IGNOREREGISTRYLIST"):
            return frozenset(self.env["IGNOREREGISTRYLIST"].split())
        listed = self.raw.get("ignore_registries", [])
        if not isinstance(listed, list):
            raise ConfigError("ignore_registries: expected a list of registry names")
        return frozenset(require_string(item, "ignore_registries[]") for item in listed)

    def _upstreams(self, manifest_ttl: float) -> dict[str, UpstreamSettings]:
        upstreams: dict[str, UpstreamSettings] = {}
        listed = self.raw.get("upstreams")
        if listed is None:
            for name, url in _PUBLIC_REGISTRIES.items():
                upstreams[name] = _make_upstream(name, url, None, None, manifest_ttl)
        else:
            if not isinstance(listed, list):
                raise ConfigError("upstreams: expected a list of {name, url, ...} entries")
            for index, entry in enumerate(listed):
                upstream = self._upstream_entry(entry, f"upstreams[{index}]", manifest_ttl)
                if upstream.name in upstreams:
                    raise ConfigError(f"upstreams[{index}].name: {upstream.name!r} is listed twice")
                upstreams[upstream.name] = upstream
        secret, secret_key = self._value("pull_secret", "PULL_SECRET", None)
        if secret is not None:
            logins = _read_pull_secret(Path(require_string(secret, secret_key)))
            for name, host_login, scoped in _logins_by_host(logins):
                url = _default_url(name)
                known = upstreams.get(name) or _make_upstream(name, url, None, None, manifest_ttl)
                if host_login is not None:
                    known = replace(
                        known, username=host_login.username, password=host_login.password
                    )
                upstreams[name] = replace(known, repository_logins=scoped)
        for name in self._ignored():
            upstreams.pop(name, None)
        return upstreams

    def _upstream_entry(self, entry: object, key: str, manifest_ttl: float) -> UpstreamSettings:
        section = _mapping(entry, key)
        _reject_unknown(
            section,
            {"name", "url", "username", "password", "manifest_ttl", "extra_hosts", "auth_hosts"},
            key,
        )
        name = _registry_name(require_string(section.get("name"), f"{key}.name"), f"{key}.name")
        url = section.get("url") or _default_url(name)
        url = require_string(url, f"{key}.url").rstrip("/")
        if not re.fullmatch(r"https?://[^/?#\s]+(?:/[^?#\s]*)?", url):
            raise ConfigError(f"{key}.url: expected an http(s) URL, got {url!r}")
        username = section.get("username")
        password = section.get("password")
        if (username is None) != (password is None):
            raise ConfigError(f"{key}: username and password go together")
        return _make_upstream(
            name,
            url,
            None if username is None else require_string(username, f"{key}.username"),
            None if password is None else require_string(password, f"{key}.password"),
            parse_duration(section.get("manifest_ttl", manifest_ttl), f"{key}.manifest_ttl"),
            _hosts(section, "extra_hosts", key),
            _hosts(section, "auth_hosts", key),
        )


def _hosts(section: Mapping[str, Any], name: str, key: str) -> tuple[str, ...]:
    """`extra_hosts` or `auth_hosts`, in the form hosts are compared in."""
    listed = section.get(name, [])
    if not isinstance(listed, list):
        raise ConfigError(f"{key}.{name}: expected a list of host names")
    return tuple(_host_name(require_string(item, f"{key}.{name}[]")) for item in listed)


def _make_upstream(
    name: str,
    url: str,
    username: str | None,
    password: str | None,
    manifest_ttl: float,
    extra_hosts: tuple[str, ...] = (),
    auth_hosts: tuple[str, ...] = (),
) -> UpstreamSettings:
    return UpstreamSettings(
        name=name,
        url=url,
        username=username,
        password=password,
        manifest_ttl=manifest_ttl,
        extra_hosts=extra_hosts or _KNOWN_EXTRA_HOSTS.get(name, ()),
        auth_hosts=auth_hosts or _KNOWN_AUTH_HOSTS.get(name, ()),
    )


def registry_upstream(
    name: str, url: str | None, username: str | None, password: str | None
) -> UpstreamSettings:
    """Settings for a registry that is not one of the cache's upstreams (a sync `creds` entry):
    the well-known registries get their real API host and extra domains."""
    return _make_upstream(name, url or _default_url(name), username, password, 300.0)


def _default_url(name: str) -> str:
    """Where a registry named without a URL is reached: a well-known one's real API host (Docker
    Hub's is not docker.io), any other over HTTPS at its name."""
    return _PUBLIC_REGISTRIES.get(name, f"https://{name}")


def _registry_name(text: str, key: str) -> str:
    """`text` if it is what clients can write as an upstream: a lowercase host[:port]."""
    if not _REGISTRY_HOST.fullmatch(text):
        raise ConfigError(
            f"{key}: expected a registry host[:port] in lowercase, such as quay.io or "
            f"registry.local:5000, got {text!r}"
        )
    return text


def _read_pull_secret(path: Path) -> list[tuple[str, RepositoryLogin]]:
    """Logins from a `{"auths": {key: {"auth": base64(user:pass)}}}` file. Keys are read as
    podman's auth.json reads them: the scheme and trailing slashes dropped, a path after the
    host scoping the login to the repositories under it."""
    try:
        document = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"pull_secret: cannot read {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"pull_secret: {path} is not JSON ({exc.msg})") from None
    auths = _mapping(document, "pull_secret").get("auths")
    if not isinstance(auths, dict):
        raise ConfigError(f"pull_secret: {path} has no 'auths' mapping")
    logins = []
    for raw_key, entry in auths.items():
        key = f"pull_secret auths[{raw_key}]"
        try:
            host, path_under_host = _secret_key(raw_key, key)
        except ConfigError as exc:
            # A key no client could name as an upstream (a wildcard, say) cannot be used, but
            # should not keep the cache from starting with the others.
            log.warning("%s; skipped", exc)
            continue
        section = _mapping(entry, key)
        if not any(section.get(name) for name in ("auth", "username", "password")):
            # Docker writes `{}` for a login its credsStore or credHelpers hold.
            log.warning("%s: no credentials (held by a credential helper?); skipped", key)
            continue
        if "auth" in section:
            try:
                decoded = base64.b64decode(section["auth"], validate=True).decode()
            except (binascii.Error, UnicodeDecodeError, TypeError):
                raise ConfigError(f"{key}.auth: not base64") from None
            user, sep, password = decoded.partition(":")
        else:
            user, password = section.get("username", ""), section.get("password", "")
            sep = ":"
        if not sep or not user or not password:
            raise ConfigError(f"{key}: expected user:password credentials")
        logins.append((host, RepositoryLogin(path_under_host, user, password)))
    return logins


def _secret_key(raw_key: str, key: str) -> tuple[str, str]:
    """A pull-secret key as (registry host, repository path or "")."""
    bare = re.sub(r"^https?://", "", raw_key).rstrip("/")
    if bare == "index.docker.io/v1":  # Docker's own key for Docker Hub, not a repository path
        return DOCKER_HUB, ""
    host, _, repository_path = bare.partition("/")
    host = host.lower()  # as DNS compares names
    name = DOCKER_HUB if host in _DOCKER_HUB_ALIASES else host
    return _registry_name(name, key), repository_path


def _logins_by_host(
    logins: list[tuple[str, RepositoryLogin]],
) -> list[tuple[str, RepositoryLogin | None, tuple[RepositoryLogin, ...]]]:
    """Per host: its host-wide login (the one without a path) if any, and its scoped ones, the
    most specific first."""
    grouped = []
    for host in dict.fromkeys(host for host, _ in logins):
        own = [login for login_host, login in logins if login_host == host]
        host_login = next((login for login in own if not login.prefix), None)
        scoped = sorted(
            (login for login in own if login.prefix),
            key=lambda login: login.prefix.count("/"),
            reverse=True,
        )
        grouped.append((host, host_login, tuple(scoped)))
    return grouped


def _host_name(host: str) -> str:
    """A host name as URLs carry it, compared as DNS does: any case, trailing dot or not."""
    return host.lower().rstrip(".")


def _api_host(upstream: UpstreamSettings) -> str:
    """The host of the upstream's URL, whatever userinfo, port or IPv6 brackets it has."""
    return _host_name(urlsplit(upstream.url).hostname or "")


def _above_or_at_api_host(host: str, upstream: UpstreamSettings) -> bool:
    """Whether `host` is the upstream's API host or a domain above it (GitLab's registry.gitlab.com
    has its token service on gitlab.com). Whoever runs a domain above a host runs its DNS, so it
    is trusted as much; a sibling (evil.co.uk beside registry.example.co.uk) is not, nor a bare
    top-level label, nor anything about an address."""
    api = _api_host(upstream)
    if host == api:
        return True
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(api)
        return False
    return "." in host and api.endswith("." + host)


def receives_credentials(scheme: str, host: str, upstream: UpstreamSettings) -> bool:
    """Whether the upstream's credentials may go to `scheme://host`: only to its API host (or a
    domain above it) or one of its token services, and over TLS unless the upstream itself is
    plain HTTP."""
    if scheme != "https" and urlsplit(upstream.url).scheme == "https":
        return False
    return _own_host(_host_name(host), upstream)


def host_allowed(host: str, upstream: UpstreamSettings) -> bool:
    """Whether a token realm, redirect or upload target host is one of the upstream's: its API
    host (or a domain above it) and token services exactly, or within one of its extra
    domains."""
    host = _host_name(host)
    return _own_host(host, upstream) or any(
        host == domain or host.endswith("." + domain) for domain in upstream.extra_hosts
    )


def _own_host(host: str, upstream: UpstreamSettings) -> bool:
    """Whether `host` is the upstream's own: its API host, a domain above it, or one of its
    token services. Only these get its credentials."""
    return _above_or_at_api_host(host, upstream) or host in upstream.auth_hosts
