"""Thin wrappers around the skopeo CLI, the reference client the tests pull with.

Every call runs with --insecure-policy (no dependence on /etc/containers/policy.json)
and with REGISTRY_AUTH_FILE pointing at an empty auth file, so credentials stored
on the developer's machine never leak into a test: a test is anonymous unless it
says so.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SKOPEO = "skopeo"
DEFAULT_TIMEOUT = 120.0


class CommandError(AssertionError):
    """A client (skopeo, podman) exited non-zero; carries stderr so the failure says why."""

    def __init__(self, args: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        self.cmd = list(args)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(
            f"{' '.join(self.cmd)} exited {returncode}\n--- stderr ---\n{stderr.strip()}"
        )


SkopeoError = CommandError


def empty_auth_file() -> Path:
    """An auth.json with no credentials (podman insists the file exists)."""
    path = Path(tempfile.gettempdir()) / f"registry-cache-tests-{os.getuid()}-noauth.json"
    content = '{"auths": {}}\n'
    try:
        current = path.read_text()
    except OSError:
        current = None
    if current != content:
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(content)
        os.replace(tmp, path)  # atomic: concurrent test runs never see a partial file
    return path


def env(registries_conf: Path | None = None) -> dict[str, str]:
    """Environment for skopeo/podman: ours, minus any ambient credentials.

    `registries_conf` replaces the system registries.conf (mirrors, search
    registries) for podman; skopeo 1.9 ignores the variable and needs its
    --registries-conf flag instead (see `_global_args`).
    """
    result = dict(os.environ)
    result["REGISTRY_AUTH_FILE"] = str(empty_auth_file())
    if registries_conf is not None:
        result["CONTAINERS_REGISTRIES_CONF"] = str(registries_conf)
    return result


def _global_args(registries_conf: Path | None) -> list[str]:
    args = [SKOPEO, "--insecure-policy"]
    if registries_conf is not None:
        args += ["--registries-conf", str(registries_conf)]
    return args


def run(
    args: Sequence[str],
    *,
    check: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
    registries_conf: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `skopeo --insecure-policy <args>`, capturing text output."""
    cmd = [*_global_args(registries_conf), *args]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env(),
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if check and proc.returncode != 0:
        raise CommandError(cmd, proc.returncode, proc.stdout, proc.stderr)
    return proc


def copy(
    src: str,
    dest: str,
    *,
    all: bool = True,
    src_creds: str | None = None,
    dest_creds: str | None = None,
    src_cert_dir: Path | None = None,
    preserve_digests: bool = False,
    extra: Sequence[str] = (),
    check: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
    registries_conf: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """`skopeo copy` between full transport references (docker://, oci:, dir:).

    TLS verification is off on both sides: test registries and the proxy speak
    plain HTTP on loopback (skopeo then falls back from https to http); unless
    `src_cert_dir` holds a `ca.crt` the source must be verified against.
    """
    src_tls = ["--src-tls-verify=false"]
    if src_cert_dir is not None:
        src_tls = [f"--src-cert-dir={src_cert_dir}", "--src-tls-verify=true"]
    args = ["copy", *src_tls, "--dest-tls-verify=false"]
    if all:
        args.append("--all")
    if preserve_digests:
        args.append("--preserve-digests")
    if src_creds is not None:
        args += ["--src-creds", src_creds]
    if dest_creds is not None:
        args += ["--dest-creds", dest_creds]
    args += [*extra, src, dest]
    return run(args, check=check, timeout=timeout, registries_conf=registries_conf)


def inspect_raw(
    ref: str,
    creds: str | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    registries_conf: Path | None = None,
) -> bytes:
    """The manifest (or index) at `ref` (e.g. "docker://host/repo:tag"), byte-exact."""
    cmd = [*_global_args(registries_conf), "inspect", "--raw", "--tls-verify=false"]
    if creds is not None:
        cmd += ["--creds", creds]
    cmd.append(ref)
    proc = subprocess.run(
        cmd,
        capture_output=True,
        timeout=timeout,
        env=env(),
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if proc.returncode != 0:
        raise CommandError(
            cmd,
            proc.returncode,
            proc.stdout.decode(errors="replace"),
            proc.stderr.decode(errors="replace"),
        )
    return proc.stdout


@dataclass(frozen=True)
class DirCopy:
    """What `skopeo copy ... dir:<path>` wrote, keyed like `images.Image`.

    skopeo's dir: layout: `manifest.json` is the top-level manifest (the index
    with --all), each per-platform manifest of an index is `<hex>.manifest.json`,
    and every config/layer blob is a file named by its bare hex digest.
    """

    path: Path
    manifest: bytes
    """Top-level manifest as written by skopeo."""
    manifests: dict[str, bytes]
    """digest -> raw bytes, for the top-level and every per-instance manifest."""
    blobs: dict[str, int]
    """digest -> size of every config and layer blob."""

    @property
    def digest(self) -> str:
        """Digest of the top-level manifest."""
        return "sha256:" + hashlib.sha256(self.manifest).hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def read_dir_copy(dir: Path, *, verify: bool = True) -> DirCopy:
    """Index a dir: destination; with `verify`, re-hash every file against its name.

    skopeo already verifies digests while pulling, so `verify` is a second,
    independent check that the bytes on disk are the ones named.
    """
    manifest = (dir / "manifest.json").read_bytes()
    manifests = {"sha256:" + hashlib.sha256(manifest).hexdigest(): manifest}
    blobs: dict[str, int] = {}
    for entry in sorted(dir.iterdir()):
        name = entry.name
        if name.endswith(".manifest.json"):
            raw = entry.read_bytes()
            digest = "sha256:" + name.removesuffix(".manifest.json")
            if verify and "sha256:" + hashlib.sha256(raw).hexdigest() != digest:
                raise AssertionError(f"{entry}: content does not match its name")
            manifests[digest] = raw
            continue
        if len(name) != 64:
            continue  # "manifest.json", "version", "signature-N", ...
        digest = "sha256:" + name
        if verify and _sha256_file(entry) != digest:
            raise AssertionError(f"{entry}: content does not match its name")
        blobs[digest] = entry.stat().st_size
    return DirCopy(path=dir, manifest=manifest, manifests=manifests, blobs=blobs)
