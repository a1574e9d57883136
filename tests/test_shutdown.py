"""SIGTERM: stop accepting, let running transfers finish within the drain timeout, exit 0."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from proxy import app, cli
from proxy.settings import Settings
from tests.conftest import StartProxy
from tests.support.images import push, write_layout
from tests.support.ports import free_port
from tests.support.registry import Registry
from tests.support.standin import blob_files
from tests.test_pull import one_upstream

_LAYER_SIZE = 48 * 1024 * 1024  # far more than socket buffers hold: the transfer must be running
_DEADLINE = 30.0


def _refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_sigterm_during_a_large_transfer_lets_it_finish_and_exits_zero(
    tmp_path: Path, upstream: Registry, start_proxy: StartProxy
) -> None:
    image = write_layout(tmp_path / "layout", "big", None, [_LAYER_SIZE], seed=51)
    push(image, upstream.host, "big/app")
    proxy = start_proxy({**one_upstream(upstream), "http": {"draintimeout": "60s"}})
    layer = image.layers[0]

    client = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=60)
    client.request("GET", f"/v2/test.local/big/app/blobs/{layer}")
    response = client.getresponse()
    assert response.status == 200
    digest = hashlib.sha256(response.read(1024 * 1024))

    exit_codes: list[int | None] = []
    stopper = threading.Thread(target=lambda: exit_codes.append(proxy.stop()))
    stopper.start()
    deadline = time.monotonic() + _DEADLINE
    while not _refuses_connections(proxy.port):  # the cache took the signal: it stopped accepting
        assert time.monotonic() < deadline, "the cache kept accepting connections after SIGTERM"
        time.sleep(0.02)

    while chunk := response.read(1024 * 1024):
        digest.update(chunk)
    client.close()
    stopper.join(timeout=_DEADLINE)

    assert f"sha256:{digest.hexdigest()}" == layer, "the transfer completed, byte for byte"
    assert exit_codes == [0]
    assert layer.removeprefix("sha256:") in blob_files(proxy.data)


async def test_a_signal_during_start_up_ends_it_before_anything_listens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A reconciliation that never ends stands in for hashing a large store after a lost
    # database: start-up is under way, and must stop at the signal, not after it.
    reconciling = asyncio.Event()

    async def endless_reconcile(store: object, metadata: object) -> None:
        reconciling.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(app, "reconcile", endless_reconcile)
    settings = Settings(storage_root=tmp_path / "data", port=free_port())
    server = asyncio.create_task(cli._run_server(settings, None))
    await asyncio.wait_for(reconciling.wait(), _DEADLINE)

    os.kill(os.getpid(), signal.SIGTERM)

    await asyncio.wait_for(server, _DEADLINE)  # returns: stopped, not failed
    assert _refuses_connections(settings.port)
