"""podman as a second real client, with storage private to the test.

podman's default store is machine-wide; a per-test --root/--runroot with the
vfs driver keeps tests isolated and needs no overlay support or privileges.
podman refuses a runroot path longer than 50 characters, so the runroot is a
short temporary directory of its own, removed by close().
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tests.support.lifecycle import StartStop
from tests.support.skopeo import DEFAULT_TIMEOUT, CommandError, env


class Podman(StartStop):
    """Runs podman against a private image store under `workdir`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.runroot = Path(tempfile.mkdtemp(prefix="rc-podman-"))

    def start(self) -> Podman:
        """Nothing runs between commands: each is a process of its own."""
        return self

    def stop(self) -> None:
        shutil.rmtree(self.runroot, ignore_errors=True)

    def run(
        self,
        args: Sequence[str],
        *,
        check: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
        registries_conf: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        cmd = [
            "podman",
            "--root",
            str(self.workdir / "root"),
            "--runroot",
            str(self.runroot),
            "--storage-driver",
            "vfs",
            *args,
        ]
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env(registries_conf),
            stdin=subprocess.DEVNULL,
            check=False,
        )
        if check and proc.returncode != 0:
            raise CommandError(cmd, proc.returncode, proc.stdout, proc.stderr)
        return proc

    def pull(
        self,
        ref: str,
        creds: str | None = None,
        *,
        platform: str | None = None,
        check: bool = True,
        registries_conf: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """`podman pull` over plain HTTP; `ref` is "host/repo:tag" (no transport).

        `registries_conf` swaps in another registries.conf, e.g. one that makes
        the proxy a mirror of docker.io.
        """
        args = ["pull", "--tls-verify=false"]
        if creds is not None:
            args += ["--creds", creds]
        if platform is not None:
            args += ["--platform", platform]
        return self.run([*args, ref], check=check, registries_conf=registries_conf)

    def image_digest(self, ref: str) -> str:
        """The manifest digest podman recorded for a pulled image."""
        proc = self.run(["image", "inspect", "--format", "{{.Digest}}", ref])
        return proc.stdout.strip()

    def mount(self, ref: str) -> Path:
        """Unpack the image's root filesystem and return its path."""
        return Path(self.run(["image", "mount", ref]).stdout.strip())

    def unmount(self, ref: str) -> None:
        self.run(["image", "unmount", ref])
