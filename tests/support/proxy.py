"""Run registry-cache itself as a real server process, as an operator would."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from tests.support.lifecycle import StartStop
from tests.support.ports import free_port
from tests.support.wait import wait_for

_READY_TIMEOUT = 20.0


class Proxy(StartStop):
    """`registry-cache serve` on a free loopback port, with a config file written for it."""

    def __init__(
        self,
        workdir: Path,
        config: dict[str, Any],
        env: dict[str, str] | None = None,
        tls: ssl.SSLContext | None = None,
        launcher: Sequence[str] = (),
        ready_timeout: float = _READY_TIMEOUT,
    ) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.data = workdir / "data"
        self.config = {"listen": f"127.0.0.1:{self.port}", "storage": {"root": str(self.data)}}
        self.config.update(config)
        self.config_path = workdir / "registry-cache.yml"
        self.log_path = workdir / "proxy.log"
        self.env = env or {}
        self._process: subprocess.Popen[bytes] | None = None
        self.tls = tls
        """The client context for a proxy that serves HTTPS (it must be configured to)."""
        self.launcher = list(launcher)
        """A command the server runs under (a profiler, valgrind), or nothing."""
        self.ready_timeout = ready_timeout

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def _environment(self) -> dict[str, str]:
        """Ours, without the machine's own registry-cache settings, plus the test's."""
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("REGISTRY_", "CLEANER_", "PULL_SECRET", "IGNOREREGISTRYLIST"))
        }
        env.update(self.env)
        return env

    def start(self) -> Proxy:
        self.config_path.write_text(yaml.safe_dump(self.config))
        env = self._environment()
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                [
                    *self.launcher,
                    sys.executable,
                    "-m",
                    "proxy.cli",
                    "--config",
                    str(self.config_path),
                    "serve",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.workdir,
            )
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"registry-cache exited at start:\n{self.log()}")
            try:
                with urllib.request.urlopen(
                    f"{self.url}/healthz", timeout=1, context=self.tls
                ) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)  # polling for readiness, bounded by the deadline
        self.stop()
        raise RuntimeError(f"registry-cache did not become ready:\n{self.log()}")

    def stop(self) -> int | None:
        process, self._process = self._process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                return process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        return process.returncode

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        process, self._process = self._process, None
        if process is not None:
            process.kill()
            process.wait(timeout=10)

    def admin(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run an admin sub-command (du, ls, clean, verify) on this cache's data directory."""
        env = self._environment()
        return subprocess.run(
            [sys.executable, "-m", "proxy.cli", "--config", str(self.config_path), *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )

    def metric(self, name: str, labels: str = "") -> float:
        """One sample from /metrics (0 when absent): metric("cache_hits_total", 'kind="blob"')."""
        status, _, body = self.get("/metrics")
        assert status == 200, f"/metrics answered {status}"
        wanted = f"registry_cache_{name}{{{labels}}}" if labels else f"registry_cache_{name}"
        for line in body.decode().splitlines():
            key, _, value = line.rpartition(" ")
            if key == wanted:
                return float(value)
        return 0.0

    def settled(self) -> None:
        """Wait until every download is stored: a client has a blob's last byte a moment
        before the cache has committed it, so what a test reads of the store must wait."""
        wait_for(lambda: self.metric("inflight_downloads") == 0, "the downloads to be stored")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def access_log(self) -> list[dict[str, Any]]:
        """The structured per-request lines the server logged."""
        entries = []
        for line in self.log().splitlines():
            _, marker, payload = line.partition("registry_cache.access ")
            if marker:
                entries.append(json.loads(payload))
        return entries

    def get(
        self, path: str, headers: dict[str, str] | None = None, method: str = "GET"
    ) -> tuple[int, dict[str, str], bytes]:
        """One plain HTTP request to the proxy; any status is returned, not raised."""
        request = urllib.request.Request(self.url + path, headers=headers or {}, method=method)
        try:
            with urllib.request.urlopen(request, timeout=60, context=self.tls) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as error:
            with error:
                return error.code, dict(error.headers), error.read()
