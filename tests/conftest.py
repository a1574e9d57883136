"""Shared fixtures: real upstream registries (plain, htpasswd, token auth)."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.metadata import Metadata
from tests.support.proxy import Proxy
from tests.support.registry import Registry
from tests.support.tokenserver import TokenServer

USERS = {"alice": "wonderland"}
"""The one account every authenticated upstream knows."""
CREDS = "alice:wonderland"


@pytest.fixture
async def metadata(tmp_path: Path) -> AsyncIterator[Metadata]:
    """The cache's database, empty, opened in the test's directory and closed after it."""
    opened = Metadata(tmp_path / "metadata.db")
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[Registry]:
    """An anonymous-access registry, fresh per test."""
    with Registry(tmp_path / "upstream") as registry:
        yield registry


@pytest.fixture
def basic_upstream(tmp_path: Path) -> Iterator[Registry]:
    """A registry behind HTTP Basic auth (htpasswd) for alice."""
    with Registry(tmp_path / "basic-upstream", auth="htpasswd", users=USERS) as registry:
        yield registry


@pytest.fixture(scope="session")
def _token_server_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenServer]:
    # Key generation and the listener are shared; per-test state is reset below.
    with TokenServer(tmp_path_factory.mktemp("token-server"), USERS) as server:
        yield server


@pytest.fixture
def token_server(_token_server_session: TokenServer) -> Iterator[TokenServer]:
    """The shared token server, with its request log and options reset for this test."""
    server = _token_server_session
    server.clear_requests()
    yield server
    server.allow_anonymous = False
    server.expires_in = 300
    server.claimed_expires_in = None
    server.policy = None
    server.users = dict(USERS)
    if not server.running:  # a test stopped it (e.g. to simulate an auth outage)
        server.start()


@pytest.fixture
def token_upstream(tmp_path: Path, token_server: TokenServer) -> Iterator[Registry]:
    """A registry using bearer-token auth issued by `token_server`."""
    with Registry(tmp_path / "token-upstream", auth="token", token_server=token_server) as registry:
        yield registry


StartProxy = Callable[..., Proxy]


@pytest.fixture
def start_proxy(tmp_path: Path) -> Iterator[StartProxy]:
    """Start registry-cache servers: `(config, env=None, tls=None)`; all are stopped at the end.

    `tls` is the client context of a cache configured for HTTPS.
    """
    started: list[Proxy] = []

    def start(
        config: dict[str, Any],
        env: dict[str, str] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> Proxy:
        proxy = Proxy(tmp_path / f"cache{len(started)}", config, env, tls)
        started.append(proxy)
        return proxy.start()

    yield start
    for proxy in started:
        proxy.stop()


def refused_start(workdir: Path, config: dict[str, Any], env: dict[str, str] | None = None) -> str:
    """Start a cache whose configuration must stop it; what it said, after checking it exited 2."""
    proxy = Proxy(workdir, config, env)
    with pytest.raises(RuntimeError, match="exited at start"):
        proxy.start()
    assert proxy.stop() == 2
    return proxy.log()
