"""A private containerd daemon (its own root, state and socket; no CRI) for `ctr` pulls.

containerd is the client that sends `?ns=<registry>` to a mirror named in its hosts.toml, so it
is the real test of the cache serving several registries as their mirror.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support.lifecycle import StartStop

_READY_TIMEOUT = 20.0


class Containerd(StartStop):
    """`containerd` on a socket of its own, stopped (and its files removed) on exit."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        # A unix socket path must stay short: a directory of its own under /tmp.
        self.runtime = Path(tempfile.mkdtemp(prefix="rc-ctrd-"))
        self.socket = self.runtime / "containerd.sock"
        self.hosts_dir = workdir / "certs.d"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> Containerd:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "config.toml"
        config.write_text(
            "version = 2\n"
            f'root = "{self.workdir / "root"}"\n'
            f'state = "{self.runtime / "state"}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{self.socket}"\n'
            f'[ttrpc]\n  address = "{self.socket}.ttrpc"\n'
        )
        with open(self.workdir / "containerd.log", "wb") as log:
            self._process = subprocess.Popen(
                ["containerd", "--config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + _READY_TIMEOUT
        while not self.socket.exists():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("containerd did not start")
            time.sleep(0.05)  # polling for the socket, bounded by the deadline
        return self

    def mirror(self, registry: str, cache: str) -> None:
        """Make `cache` (host:port, plain HTTP) the mirror of `registry` in hosts.toml."""
        directory = self.hosts_dir / registry
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "hosts.toml").write_text(
            f'server = "https://{registry}"\n'
            f'[host."http://{cache}"]\n  capabilities = ["pull", "resolve"]\n'
        )

    def pull(self, reference: str) -> subprocess.CompletedProcess[str]:
        """`ctr images pull` through hosts.toml, unpacked by the native snapshotter (plain
        copies: no overlay mounts needed)."""
        return subprocess.run(
            [
                "ctr", "--address", str(self.socket), "images", "pull", "--snapshotter",
                "native", "--hosts-dir", str(self.hosts_dir), reference,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip

    def image_digest(self, reference: str) -> str:
        listed = subprocess.run(
            ["ctr", "--address", str(self.socket), "images", "ls"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        for line in listed.splitlines():
            fields = line.split()
            if fields and fields[0] == reference:
                return next(field for field in fields if field.startswith("sha256:"))
        raise AssertionError(f"{reference} not in:\n{listed}")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        shutil.rmtree(self.runtime, ignore_errors=True)
