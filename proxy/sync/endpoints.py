"""The registries an entry talks to, resolved like regsync does but through the cache's config.

A registry name is reached at the URL of the cache upstream of that name (else a `creds`
entry's `hostname` with its `tls`, else `https://<name>`), with the `creds` entry's login if it
has one, else the upstream's. Sources of cache targets are read with the cache's own clients,
which must then be opened with `with_sync_logins`; their requests for the worker keep the
`creds` entry's throttle. Clients are made once per registry and role and closed together.
"""

from __future__ import annotations

import dataclasses
import ssl

from proxy.cache import Cache
from proxy.metrics import Metrics
from proxy.settings import Settings, UpstreamSettings, registry_upstream
from proxy.upstream import UpstreamClient

from .config import Entry, SyncConfig
from .copy import MountHints
from .refs import CacheRef, Ref
from .remote import Remote, Throttle
from .targets import CacheDestination, Destination, RegistryDestination

__all__ = ["Endpoints", "with_sync_logins"]


def with_sync_logins(settings: Settings, config: SyncConfig) -> Settings:
    """`settings` with each `creds` login put on the cache upstream of that name: entries into
    the cache fetch through the cache's own clients, which must log in as the sync file says."""
    upstreams = dict(settings.upstreams)
    for cred in config.creds:
        known = upstreams.get(cred.registry)
        if known is not None and cred.user and cred.password:
            upstreams[cred.registry] = dataclasses.replace(
                known, username=cred.user, password=cred.password
            )
    return dataclasses.replace(settings, upstreams=upstreams)


class Endpoints:
    """The sync worker's registries, reached with the sync file's logins (the cache, when there
    is one, must be opened with the same: `with_sync_logins`)."""

    def __init__(
        self, settings: Settings, config: SyncConfig, metrics: Metrics, cache: Cache | None
    ) -> None:
        self.settings = with_sync_logins(settings, config)
        self.config = config
        self.metrics = metrics
        self.cache = cache
        self.hints = MountHints()
        self._remotes: dict[tuple[str, str], Remote] = {}
        self._clients: list[UpstreamClient] = []

    def _upstream(self, registry: str) -> tuple[UpstreamSettings, ssl.SSLContext | bool]:
        cred = self.config.cred(registry)
        known = self.settings.upstreams.get(registry)
        tls: ssl.SSLContext | bool = True
        if cred is not None and cred.tls == "insecure":
            tls = False
        elif cred is not None and cred.regcert:
            tls = ssl.create_default_context(cadata=cred.regcert)
        if known is not None:
            return known, tls
        if cred is None:
            return registry_upstream(registry, None, None, None), tls
        scheme = "http" if cred.tls == "disabled" else "https"
        explicit = cred.hostname != registry or cred.tls == "disabled"
        url = f"{scheme}://{cred.hostname}" if explicit else None
        return registry_upstream(registry, url, cred.user, cred.password), tls

    def remote(self, registry: str, role: str = "source") -> Remote:
        """The registry's client; sources and targets get separate throttles so that a copy
        within one registry never waits for itself."""
        key = (registry, role)
        if key not in self._remotes:
            upstream, tls = self._upstream(registry)
            client = UpstreamClient(
                upstream,
                connect_timeout=self.settings.upstream_connect_timeout,
                read_timeout=self.settings.upstream_read_timeout,
                metrics=self.metrics,
                tls=tls,
            )
            self._clients.append(client)
            self._remotes[key] = Remote(registry, client, self._throttle(registry))
        return self._remotes[key]

    def _throttle(self, registry: str) -> Throttle:
        cred = self.config.cred(registry)
        return Throttle(cred.req_per_sec, cred.req_concurrent) if cred else Throttle()

    def source(self, entry: Entry) -> Remote:
        registry = entry.source.registry
        if entry.to_cache:
            if self.cache is None or registry not in self.cache.upstreams:
                raise ValueError(f"{registry} is not one of the cache's upstreams")
            key = (registry, "cache")
            if key not in self._remotes:
                self._remotes[key] = Remote(
                    registry, self.cache.upstreams[registry], self._throttle(registry)
                )
            return self._remotes[key]
        return self.remote(registry)

    def destination(self, entry: Entry) -> Destination:
        target = entry.target
        if isinstance(target, CacheRef):
            if self.cache is None:
                raise ValueError("a cache target needs the cache")
            pin_owner = entry.pin_owner if entry.pin else None
            return CacheDestination(self.cache, target.upstream, target.repository, pin_owner)
        assert isinstance(target, Ref)
        return RegistryDestination(
            self.remote(target.registry, "target"),
            target.repository,
            self.hints,
            lambda registry: self.remote(registry, "target"),
        )

    async def close(self) -> None:
        for client in self._clients:
            await client.close()
