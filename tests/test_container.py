"""The image as shipped: deploy/deployment.yaml under `podman play kube`, pulled through by skopeo.

.ci/container builds the image (offline, from a wheelhouse) and runs this module with
`REGISTRY_CACHE_IMAGE` set; without it, the module is skipped. The pod runs a copy of the YAML
adjusted for the test only where it must be: the host network, so that the cache listens on
127.0.0.1 and reaches the test upstream there; the test's own files as the hostPath volumes;
a config file naming that upstream.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import skopeo
from tests.support.certs import CertificateAuthority
from tests.support.images import push, write_layout
from tests.support.ports import free_port
from tests.support.registry import Registry
from tests.test_auth import write_users
from tests.test_pull import assert_same_image

IMAGE = os.environ.get("REGISTRY_CACHE_IMAGE", "")
DEPLOYMENT = Path(__file__).parent.parent / "deploy" / "deployment.yaml"
CONTAINER_UID = 10001
_READY_DEADLINE = 90.0

pytestmark = pytest.mark.skipif(not IMAGE, reason="needs the image .ci/container builds")


def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=300, check=False
    )
    if check and result.returncode != 0:
        raise skopeo.CommandError(
            ["podman", *args], result.returncode, result.stdout, result.stderr
        )
    return result


def _adjusted(deployment: dict[str, Any], files: Path, port: int) -> dict[str, Any]:
    """The shipped YAML, on the host network and with this test's files and upstream."""
    pod = deployment["spec"]["template"]["spec"]
    pod["hostNetwork"] = True
    (container,) = pod["containers"]
    container["image"] = IMAGE
    # The host network has no port mappings: the cache listens on the host's loopback itself.
    del container["ports"]
    container["env"] += [
        {"name": "REGISTRY_HTTP_ADDR", "value": f"127.0.0.1:{port}"},
        {"name": "REGISTRY_CACHE_CONFIG", "value": "/etc/registry-cache/registry-cache.yml"},
    ]
    container["volumeMounts"].append({"name": "config", "mountPath": "/etc/registry-cache"})
    host_paths = {
        "data": files / "data",
        "certs": files / "certs",
        "auth": files / "auth",
        "pull-secret": files / "pull-secret.json",
    }
    for volume in pod["volumes"]:
        volume["hostPath"]["path"] = str(host_paths.pop(volume["name"]))
    assert host_paths == {}, f"the shipped YAML lacks volumes {sorted(host_paths)}"
    pod["volumes"].append(
        {"name": "config", "hostPath": {"path": str(files / "config"), "type": "Directory"}}
    )
    return deployment


@pytest.fixture
def pod_files(tmp_path: Path, upstream: Registry) -> Path:
    """What an operator puts on the host before the first start, for this test's upstream."""
    files = tmp_path / "host"
    for name in ("data", "certs", "auth", "config"):
        (files / name).mkdir(parents=True)
    os.chown(files / "data", CONTAINER_UID, 0)
    (files / "pull-secret.json").write_text('{"auths": {}}\n')
    write_users(files / "auth" / "htpasswd", {"alice": "wonderland"})
    (files / "config" / "registry-cache.yml").write_text(
        yaml.safe_dump(
            {
                "upstreams": [{"name": "test.local", "url": upstream.url}],
                "default_upstream": "test.local",
            }
        )
    )
    return files


@pytest.fixture
def pod(tmp_path: Path, pod_files: Path) -> Iterator[tuple[int, CertificateAuthority, str]]:
    """The running pod: its port, the CA its certificate is from, its container's name."""
    ca = CertificateAuthority(tmp_path / "ca")
    ca.issue().write_combined(pod_files / "certs" / "certs.pem")
    port = free_port()
    spec = tmp_path / "deployment.yaml"
    spec.write_text(
        yaml.safe_dump(_adjusted(yaml.safe_load(DEPLOYMENT.read_text()), pod_files, port))
    )
    try:
        podman("play", "kube", str(spec))
        names = podman("ps", "--format", "{{.Names}}", "--filter", "ancestor=" + IMAGE)
        (name,) = names.stdout.split()
        _wait_ready(port, ca, name)
        yield port, ca, name
    finally:
        podman("play", "kube", "--down", str(spec), check=False)


def _wait_ready(port: int, ca: CertificateAuthority, name: str) -> None:
    deadline = time.monotonic() + _READY_DEADLINE
    url = f"https://127.0.0.1:{port}/readyz"
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5, context=ca.client_context()) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        state = json.loads(podman("inspect", name).stdout)[0]
        if (
            state["RestartCount"] > 0
            or not state["State"]["Running"]
            or time.monotonic() > deadline
        ):
            logs = podman("logs", name, check=False)
            raise AssertionError(f"the cache did not get ready:\n{logs.stdout}{logs.stderr}")
        time.sleep(0.2)  # readiness polling, bounded by the deadline


def test_deployment_yaml_runs_the_image_and_serves_pulls(
    tmp_path: Path,
    upstream: Registry,
    pod_files: Path,
    pod: tuple[int, CertificateAuthority, str],
) -> None:
    port, ca, name = pod
    image = write_layout(tmp_path / "layout", "v1", None, [2_000_000, 30_000], seed=61)
    push(image, upstream.host, "ci/hello")
    ref = f"docker://127.0.0.1:{port}/test.local/ci/hello:v1"

    anonymous = skopeo.copy(
        ref, f"dir:{tmp_path / 'anon'}", src_cert_dir=ca.cert_dir, check=False, timeout=60
    )
    assert anonymous.returncode != 0 and "unauthorized" in anonymous.stderr.lower()
    skopeo.copy(
        ref, f"dir:{tmp_path / 'pull'}", src_cert_dir=ca.cert_dir, src_creds="alice:wonderland"
    )
    assert_same_image(skopeo.read_dir_copy(tmp_path / "pull"), image)

    upstream.stop()
    skopeo.copy(
        ref, f"dir:{tmp_path / 'cached'}", src_cert_dir=ca.cert_dir, src_creds="alice:wonderland"
    )
    assert_same_image(skopeo.read_dir_copy(tmp_path / "cached"), image)
    stored = {p.name for p in (pod_files / "data").rglob("*") if p.is_file()}
    assert {digest.removeprefix("sha256:") for digest in image.blobs} <= stored

    assert podman("exec", name, "id", "-u").stdout.strip() == str(CONTAINER_UID)
    assert podman("healthcheck", "run", name).returncode == 0
    config = json.loads(podman("image", "inspect", IMAGE).stdout)[0]["Config"]
    assert "8443/tcp" in config["ExposedPorts"]
    assert set(config["Volumes"]) == {"/var/lib/registry", "/certs", "/auth"}

    podman("stop", "--time", "90", name)
    state = json.loads(podman("inspect", name).stdout)[0]["State"]
    assert state["ExitCode"] == 0, "SIGTERM is a clean stop"
