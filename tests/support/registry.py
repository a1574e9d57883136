"""A real CNCF distribution registry as the proxy's upstream.

Testing against the real thing (not a mock) is the point: the proxy must cope
with distribution's exact headers, auth challenges and error bodies. The
registry's access log gives a ground truth of what the upstream actually
served, so tests can assert "fetched exactly once" or "revalidated with HEAD".
"""

from __future__ import annotations

import itertools
import json
import os
import re
import secrets
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tests.support.lifecycle import StartStop
from tests.support.ports import free_port

if TYPE_CHECKING:
    from tests.support.tokenserver import TokenServer

REGISTRY_BINARY = "docker-registry"
Auth = Literal["none", "htpasswd", "token"]

# Never route our own loopback probes through an ambient http_proxy.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

# Query parameter marking our own readiness/sync probes, which requests() hides.
PROBE_MARKER = "registry-cache-test-probe"

# gorilla/handlers combined log format, which distribution writes to stdout:
# 127.0.0.1 - - [23/Nov/2026:14:59:38 +0000] "GET /v2/x/blobs/sha256:... HTTP/1.1" 200 441 "" "ua"
_ACCESS_LINE = re.compile(
    r'^\S+ \S+ (?P<user>\S+) \[[^\]]*\] "(?P<method>[A-Z]+) (?P<uri>\S+) HTTP/[\d.]+" '
    r'(?P<status>\d{3}) (?P<size>\d+|-) "[^"]*" "(?P<agent>[^"]*)"$'
)


@dataclass(frozen=True)
class AccessEntry:
    """One request as the registry's access log recorded it."""

    method: str
    path: str
    query: str
    status: int
    size: int
    """Response body bytes actually written (short if the client hung up)."""
    user_agent: str


def parse_access_log(text: str) -> list[AccessEntry]:
    """Parse complete access-log lines, skipping our probes and anything unparsable."""
    entries: list[AccessEntry] = []
    for line in text.splitlines():
        m = _ACCESS_LINE.match(line)
        if m is None:
            continue
        path, _, query = m["uri"].partition("?")
        if PROBE_MARKER in query:
            continue
        size = m["size"]
        entries.append(
            AccessEntry(
                method=m["method"],
                path=path,
                query=query,
                status=int(m["status"]),
                size=0 if size == "-" else int(size),
                user_agent=m["agent"],
            )
        )
    return entries


def htpasswd_line(user: str, password: str, kind: str = "-B") -> str:
    """An entry as Apache's htpasswd writes it (-B bcrypt, -m MD5, -s SHA-1, -d crypt, -p plain).

    The default, bcrypt, is the only kind distribution (and the proxy) accepts.
    """
    proc = subprocess.run(
        ["htpasswd", kind, "-b", "-n", user, password],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    return proc.stdout.strip()


class Registry(StartStop):
    """A `docker-registry serve` subprocess on 127.0.0.1, storage under `workdir`.

    The port is chosen once, so stop() + start() brings the same registry,
    with the same content, back at the same address (tests stop the upstream
    to prove the proxy serves from cache, then may restart it).
    """

    _probe_ids = itertools.count()

    def __init__(
        self,
        workdir: Path,
        auth: Auth = "none",
        users: dict[str, str] | None = None,
        token_server: TokenServer | None = None,
        *,
        port: int | None = None,
        startup_timeout: float = 10.0,
        stop_timeout: float = 10.0,
        extra_config: dict[str, Any] | None = None,
    ) -> None:
        if auth == "token" and token_server is None:
            raise ValueError("token auth needs a token_server")
        if auth == "htpasswd" and not users:
            raise ValueError("htpasswd auth needs users")
        self.workdir = workdir
        self.auth: Auth = auth
        self.users = dict(users or {})
        self.token_server = token_server
        self.port = port or free_port()
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.extra_config = extra_config or {}
        self.storage_dir = workdir / "storage"
        self.config_path = workdir / "config.yml"
        self.access_log = workdir / "access.log"
        """gorilla combined-format access log: exactly one line per request."""
        self.app_log = workdir / "registry.log"
        """distribution's own JSON log (stderr); for diagnostics only."""
        self.htpasswd_path = workdir / "htpasswd"
        self._secret = secrets.token_hex(16)
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    # -- addresses -------------------------------------------------------

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def creds(self) -> str | None:
        """The first configured user as "user:password", for skopeo."""
        for user, password in self.users.items():
            return f"{user}:{password}"
        return None

    # -- configuration ---------------------------------------------------

    def config(self) -> dict[str, Any]:
        """distribution configuration (written as JSON, which is valid YAML)."""
        cfg: dict[str, Any] = {
            "version": 0.1,
            "log": {
                "level": "info",
                "formatter": "json",
                "accesslog": {"disabled": False},
            },
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage_dir)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": self.host, "secret": self._secret},
        }
        if self.auth == "htpasswd":
            cfg["auth"] = {"htpasswd": {"realm": "registry-test", "path": str(self.htpasswd_path)}}
        elif self.auth == "token":
            ts = self.token_server
            assert ts is not None
            cfg["auth"] = {
                "token": {
                    "realm": ts.realm,
                    "service": ts.service,
                    "issuer": ts.issuer,
                    "rootcertbundle": str(ts.cert_path),
                }
            }
        for key, value in self.extra_config.items():
            if isinstance(value, dict) and isinstance(cfg.get(key), dict):
                cfg[key] = {**cfg[key], **value}
            else:
                cfg[key] = value
        return cfg

    def _write_files(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage_dir.mkdir(exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        if self.auth == "htpasswd":
            lines = [htpasswd_line(u, p) for u, p in self.users.items()]
            self.htpasswd_path.write_text("\n".join(lines) + "\n")

    # -- lifecycle -------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> Registry:
        """Start and wait until GET /v2/ answers (200, or 401 with auth)."""
        if self._proc is not None:
            raise RuntimeError("registry already started")
        self._write_files()
        # distribution overrides its config from REGISTRY_* variables; an
        # ambient one (e.g. REGISTRY_AUTH_FILE for podman) would corrupt it.
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        with self.access_log.open("ab") as out, self.app_log.open("ab") as err:
            self._proc = subprocess.Popen(
                [REGISTRY_BINARY, "serve", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
                cwd=self.workdir,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _probe(self, timeout: float = 1.0) -> bool:
        """One marked GET /v2/ (hidden from requests()); True if it answered."""
        url = f"{self.url}/v2/?{PROBE_MARKER}={next(self._probe_ids)}"
        try:
            with _OPENER.open(url, timeout=timeout) as resp:
                resp.read()
                return True
        except urllib.error.HTTPError as e:
            e.close()
            return e.code == 401
        except OSError:
            return False

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"registry exited with {self._proc.returncode}:\n{self.tail_app_log()}"
                )
            if self._probe(timeout=0.5):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"registry on {self.host} not ready in {self.startup_timeout}s:\n"
                    f"{self.tail_app_log()}"
                )
            time.sleep(0.02)  # readiness polling interval, not synchronisation

    def stop(self) -> None:
        """SIGTERM, wait up to `stop_timeout`, then SIGKILL. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=self.stop_timeout)

    def restart(self) -> Registry:
        self.stop()
        return self.start()

    def tail_app_log(self, lines: int = 20) -> str:
        try:
            text = self.app_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- request accounting ----------------------------------------------

    def _sync_log(self) -> None:
        """Make sure lines of already-answered requests are in the log.

        distribution writes the access-log line after its handler returns,
        which can be just after the client has read the whole response. A
        marked probe request, waited for until its own line shows up, closes
        that window: by then every earlier response's line has been written.
        """
        if not self.running:
            return  # an exited process has written everything it ever will
        probe_id = next(self._probe_ids)
        marker = f"{PROBE_MARKER}={probe_id}"
        url = f"{self.url}/v2/?{marker}"
        try:
            with _OPENER.open(url, timeout=5) as resp:
                resp.read()
        except urllib.error.HTTPError as e:
            e.close()
        except OSError:
            return  # went away meanwhile; nothing more will be logged
        deadline = time.monotonic() + 5
        needle = f"{marker} HTTP/".encode()  # exact: "probe=1" must not match "probe=12"
        while needle not in self._read_log_bytes(self._log_offset):
            if time.monotonic() > deadline:
                raise TimeoutError(f"registry access log never recorded {marker}")
            time.sleep(0.005)

    def _read_log_bytes(self, offset: int) -> bytes:
        try:
            with self.access_log.open("rb") as f:
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return b""
        # Only whole lines: a line being written has no newline yet.
        end = data.rfind(b"\n")
        return data[: end + 1]

    def entries(self) -> list[AccessEntry]:
        """Every request served since construction or the last clear_requests()."""
        self._sync_log()
        data = self._read_log_bytes(self._log_offset)
        return parse_access_log(data.decode(errors="replace"))

    def requests(self) -> list[tuple[str, str]]:
        """(method, path without query) of every request, in log order."""
        return [(e.method, e.path) for e in self.entries()]

    def count(self, method: str, path_contains: str) -> int:
        """How many `method` requests had `path_contains` in their path."""
        method = method.upper()
        return sum(1 for m, p in self.requests() if m == method and path_contains in p)

    def clear_requests(self) -> None:
        """Forget everything logged so far (remembers a file offset)."""
        self._sync_log()
        self._log_offset = len(self._read_log_bytes(0))

    # -- convenience -----------------------------------------------------

    def blob_gets(self, digest: str) -> int:
        """GETs of a blob by digest, in any repository."""
        return sum(
            1
            for e in self.entries()
            if e.method == "GET" and "/blobs/" in e.path and e.path.endswith("/" + digest)
        )

    def manifest_requests(self, method: str, reference: str) -> int:
        """`method` requests for a manifest by tag or digest, in any repository."""
        method = method.upper()
        return sum(
            1
            for e in self.entries()
            if e.method == method
            and "/manifests/" in e.path
            and e.path.endswith("/manifests/" + reference)
        )

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<Registry {self.url} auth={self.auth} {state}>"
