"""The servers under test, each restartable with an empty cache.

The upstream is a plain distribution registry; the baseline is what the old stack ran per
upstream (distribution 2.8 in proxy mode, HAProxy in front when installed); ours is
registry-cache. Every cache is addressed with the same paths, so one workload fits all.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from tests.support.ports import free_port
from tests.support.proxy import Proxy
from tests.support.registry import Registry

__all__ = ["BareAiohttp", "Baseline", "Direct", "HAProxy", "Ours", "Server"]


class Server(Protocol):
    name: str

    @property
    def host(self) -> str: ...

    def reset(self) -> None:
        """Stop, drop everything cached, start again."""

    def pids(self) -> list[int]: ...

    def stop(self) -> None: ...


def _pids(*pids: int | None) -> list[int]:
    return [pid for pid in pids if pid is not None]


class Direct:
    """The upstream itself: the limit a cache can approach."""

    name = "direct"

    def __init__(self, upstream: Registry) -> None:
        self.upstream = upstream

    @property
    def host(self) -> str:
        return self.upstream.host

    def reset(self) -> None:
        """Nothing to empty: the upstream holds the images."""

    def pids(self) -> list[int]:
        return _pids(self.upstream.pid)

    def stop(self) -> None:
        """The upstream outlives the run's targets; its owner stops it."""


def _wait_listening(
    port: int, process: subprocess.Popen[bytes], what: str, timeout: float = 10.0
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"{what} did not start") from None
            time.sleep(0.02)  # readiness polling, bounded by the deadline


def _terminate(process: subprocess.Popen[bytes] | None) -> None:
    if process is not None:
        process.terminate()
        process.wait(timeout=10)


class HAProxy:
    """`haproxy` in HTTP mode with keep-alive, one backend: the old stack's front."""

    def __init__(self, workdir: Path, backend: str) -> None:
        self.port = free_port()
        self.config_path = workdir / "haproxy.cfg"
        self.backend = backend
        self._process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("haproxy") is not None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        self.config_path.write_text(
            "global\n  maxconn 4096\n"
            "defaults\n  mode http\n  option http-keep-alive\n  timeout connect 5s\n"
            "  timeout client 300s\n  timeout server 300s\n"
            f"frontend front\n  bind 127.0.0.1:{self.port}\n  default_backend registry\n"
            f"backend registry\n  server registry {self.backend}\n"
        )
        self._process = subprocess.Popen(
            ["haproxy", "-db", "-f", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_listening(self.port, self._process, "haproxy")

    def stop(self) -> None:
        process, self._process = self._process, None
        _terminate(process)


class Baseline:
    """distribution in proxy mode (pull-through) for the upstream, HAProxy in front if any."""

    name = "baseline"

    def __init__(self, workdir: Path, upstream: Registry, *, haproxy: bool) -> None:
        self.registry = Registry(
            workdir / "registry", extra_config={"proxy": {"remoteurl": upstream.url}}
        )
        self.front = HAProxy(workdir, self.registry.host) if haproxy else None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.front.port}" if self.front else self.registry.host

    def reset(self) -> None:
        self.stop()
        shutil.rmtree(self.registry.storage_dir, ignore_errors=True)
        self.registry.start()
        if self.front:
            self.front.start()

    def pids(self) -> list[int]:
        return _pids(self.registry.pid, self.front.pid if self.front else None)

    def stop(self) -> None:
        if self.front:
            self.front.stop()
        self.registry.stop()


class Ours:
    """registry-cache with the upstream as its default, so paths match the baseline's."""

    name = "ours"

    def __init__(self, workdir: Path, upstream: Registry) -> None:
        self.proxy = Proxy(
            workdir,
            {
                "upstreams": [{"name": "bench.upstream", "url": upstream.url}],
                "default_upstream": "bench.upstream",
            },
        )

    @property
    def host(self) -> str:
        return self.proxy.host

    def reset(self) -> None:
        self.stop()
        shutil.rmtree(self.proxy.data, ignore_errors=True)
        self.proxy.start()

    def pids(self) -> list[int]:
        return _pids(self.proxy.pid)

    def stop(self) -> None:
        self.proxy.stop()


class BareAiohttp:
    """`bench.bare`: one fixed manifest for every request, the floor for the manifest rows."""

    name = "bare aiohttp"

    def __init__(
        self,
        workdir: Path,
        body: bytes,
        media_type: str,
        launcher: Sequence[str] = (),
        ready_timeout: float = 10.0,
    ) -> None:
        self.port = free_port()
        self.launcher = list(launcher)
        self.ready_timeout = ready_timeout
        self.body_path = workdir / "bare-manifest"
        self.body_path.write_bytes(body)
        self.media_type = media_type
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def reset(self) -> None:
        self.stop()
        command = [*self.launcher, sys.executable, "-m", "bench.bare", str(self.port)]
        command += [str(self.body_path), self.media_type]
        self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        _wait_listening(self.port, self._process, "the bare aiohttp server", self.ready_timeout)

    def pids(self) -> list[int]:
        return _pids(self._process.pid if self._process else None)

    def stop(self) -> None:
        process, self._process = self._process, None
        _terminate(process)
