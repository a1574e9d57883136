"""Generate OCI image layouts with known digests and push them to a registry.

Tests need images whose every digest and size is known up front, so that what
comes back through the proxy can be compared byte for byte with what was pushed.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tests.support import skopeo

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"

Compression = Literal["gzip", "none"]


@dataclass(frozen=True)
class Image:
    """Everything a test needs to know about a generated image.

    `manifests` holds every manifest (the index too, if any) by digest, raw;
    `blobs` holds every config and layer blob by digest, with its size.
    """

    digest: str
    media_type: str
    manifests: dict[str, bytes]
    blobs: dict[str, int]
    layout: Path
    tag: str
    platform_manifests: dict[str, str] = field(default_factory=dict)
    """Maps "os/arch[/variant]" to its manifest digest (multi-platform images only)."""
    layers: list[str] = field(default_factory=list)
    """Layer digests, in manifest order, across all platforms."""
    configs: list[str] = field(default_factory=list)
    """Config digests, one per platform manifest."""

    @property
    def raw(self) -> bytes:
        """The top-level manifest (or index) as pushed."""
        return self.manifests[self.digest]

    @property
    def size(self) -> int:
        """Size of the top-level manifest (or index)."""
        return len(self.raw)

    def blob_path(self, digest: str) -> Path:
        """Where the layout keeps a blob or manifest."""
        algo, _, hexpart = digest.partition(":")
        return self.layout / "blobs" / algo / hexpart

    def blob_bytes(self, digest: str) -> bytes:
        """Content of a blob or manifest, read back from the layout."""
        return self.blob_path(digest).read_bytes()

    @property
    def total_blob_size(self) -> int:
        """Sum of all config and layer sizes: what a full pull must transfer."""
        return sum(self.blobs.values())

    @property
    def pull_size(self) -> int:
        """Every byte a full pull transfers: blobs and manifests."""
        return self.total_blob_size + sum(len(raw) for raw in self.manifests.values())


def sha256_digest(data: bytes) -> str:
    """OCI digest string of `data`."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


class _LayoutWriter:
    """Writes content-addressed blobs into an OCI layout directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blob_dir = root / "blobs" / "sha256"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')

    def put(self, data: bytes) -> str:
        digest = sha256_digest(data)
        path = self.blob_dir / digest.removeprefix("sha256:")
        if not path.exists():
            path.write_bytes(data)
        return digest

    def tag(self, tag: str, media_type: str, digest: str, size: int) -> None:
        """Point `tag` at the top-level object, keeping other tags in the layout."""
        index_path = self.root / "index.json"
        entries: list[dict[str, Any]] = []
        if index_path.exists():
            entries = [
                m
                for m in json.loads(index_path.read_text())["manifests"]
                if m.get("annotations", {}).get(REF_NAME) != tag
            ]
        entries.append(
            {
                "mediaType": media_type,
                "digest": digest,
                "size": size,
                "annotations": {REF_NAME: tag},
            }
        )
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
        index_path.write_text(json.dumps(index, indent=2))


def _encode(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _layer_tar(name: str, content: bytes) -> bytes:
    """A valid tar holding one regular file; deterministic (fixed mtime/owner)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = len(content)
        info.mode = 0o644
        info.mtime = 0
        tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def _split_platform(os_name: str, arch: str) -> dict[str, str]:
    arch_name, _, variant = arch.partition("/")
    platform = {"architecture": arch_name, "os": os_name}
    if variant:
        platform["variant"] = variant
    return platform


def write_layout(
    dir: Path,
    tag: str,
    platforms: list[tuple[str, str]] | None,
    layer_sizes: list[int],
    seed: int,
    *,
    compression: Compression = "gzip",
    shared_layers: bool = False,
) -> Image:
    """Write an image into the OCI layout at `dir` (created or extended) under `tag`.

    Each layer is a tar with one file of `size` seeded random (incompressible)
    bytes. With "gzip" the tar is wrapped in gzip at level 0 (stored blocks):
    still valid gzip that podman unpacks, but cheap for 64 MiB+ layers, and
    already compressed so skopeo never recompresses it when pushing.
    `platforms` = None writes a single image manifest; otherwise one manifest
    per (os, arch) - arch may carry a variant as "arm/v7" - each with its own
    config and (unless `shared_layers`) its own layers, plus an image index.
    The same arguments always produce the same digests.
    """
    writer = _LayoutWriter(dir)
    manifests: dict[str, bytes] = {}
    blobs: dict[str, int] = {}
    layers: list[str] = []
    configs: list[str] = []

    def image_manifest(platform: dict[str, str], index: int) -> tuple[str, bytes]:
        layer_descs: list[dict[str, Any]] = []
        diff_ids: list[str] = []
        for n, size in enumerate(layer_sizes):
            layer_seed = f"{seed}:{0 if shared_layers else index}:{n}"
            content = random.Random(layer_seed).randbytes(size)
            tar = _layer_tar(f"data/layer-{n}.bin", content)
            del content
            diff_ids.append(sha256_digest(tar))
            if compression == "gzip":
                blob = gzip.compress(tar, compresslevel=0, mtime=0)
                media_type = OCI_LAYER_GZIP
            else:
                blob = tar
                media_type = OCI_LAYER_TAR
            del tar
            digest = writer.put(blob)
            blobs[digest] = len(blob)
            if digest not in layers:
                layers.append(digest)
            layer_descs.append({"mediaType": media_type, "digest": digest, "size": len(blob)})
        config = _encode(
            {
                **platform,
                "created": "2024-01-01T00:00:00Z",
                "config": {"Env": [f"TEST_IMAGE_SEED={seed}", f"TEST_IMAGE_TAG={tag}"]},
                "rootfs": {"type": "layers", "diff_ids": diff_ids},
                "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "tests"}]
                * len(diff_ids),
            }
        )
        config_digest = writer.put(config)
        blobs[config_digest] = len(config)
        configs.append(config_digest)
        raw = _encode(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {
                    "mediaType": OCI_CONFIG,
                    "digest": config_digest,
                    "size": len(config),
                },
                "layers": layer_descs,
            }
        )
        digest = writer.put(raw)
        manifests[digest] = raw
        return digest, raw

    by_platform: dict[str, str] = {}
    if platforms is None:
        media_type = OCI_MANIFEST
        digest, raw = image_manifest({"architecture": "amd64", "os": "linux"}, 0)
    else:
        media_type = OCI_INDEX
        entries: list[dict[str, Any]] = []
        for i, (os_name, arch) in enumerate(platforms):
            platform = _split_platform(os_name, arch)
            child, child_raw = image_manifest(platform, i)
            by_platform[f"{os_name}/{arch}"] = child
            entries.append(
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": child,
                    "size": len(child_raw),
                    "platform": platform,
                }
            )
        raw = _encode({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})
        digest = writer.put(raw)
        manifests[digest] = raw
    writer.tag(tag, media_type, digest, len(raw))
    return Image(
        digest=digest,
        media_type=media_type,
        manifests=manifests,
        blobs=blobs,
        layout=dir,
        tag=tag,
        platform_manifests=by_platform,
        layers=layers,
        configs=configs,
    )


def push(
    image: Image,
    registry_host: str,
    repo: str,
    tag: str | None = None,
    creds: str | None = None,
) -> None:
    """Push `image` to `registry_host`/`repo`:`tag` (default: the image's tag).

    --preserve-digests makes skopeo fail rather than silently convert the
    manifest or recompress layers, so what lands upstream is exactly `image`;
    the pushed digest is checked against the generated one.
    """
    ref = f"docker://{registry_host}/{repo}:{tag or image.tag}"
    with tempfile.TemporaryDirectory() as tmp:
        digest_file = Path(tmp) / "digest"
        skopeo.copy(
            f"oci:{image.layout}:{image.tag}",
            ref,
            all=True,
            dest_creds=creds,
            extra=["--preserve-digests", "--digestfile", str(digest_file)],
        )
        pushed = digest_file.read_text().strip()
    if pushed != image.digest:
        raise AssertionError(f"pushed {ref} as {pushed}, generated {image.digest}")
