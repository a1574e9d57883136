"""The generated images the upstream is seeded with (tests/support/images does the work)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench.plan import Plan
from tests.support.images import Image, push, write_layout
from tests.support.registry import Registry

__all__ = ["Images", "seed"]

# Paths without an upstream prefix: the baseline proxies any name, ours maps it to its default.
BIG = "bench/big"
MANY = "bench/many"
SMALL = "bench/small"
TAG = "latest"


@dataclass(frozen=True, slots=True)
class Images:
    big: Image
    many: Image
    small: Image

    @staticmethod
    def size(image: Image) -> int:
        """Every byte a full pull transfers: blobs and manifests."""
        return image.pull_size


def seed(workdir: Path, upstream: Registry, plan: Plan) -> Images:
    images = Images(
        big=write_layout(workdir / "big", TAG, None, list(plan.big_layers), seed=61),
        many=write_layout(workdir / "many", TAG, None, list(plan.many_layers), seed=62),
        small=write_layout(
            workdir / "small",
            TAG,
            [("linux", "amd64"), ("linux", "arm64")],
            list(plan.small_layers),
            seed=63,
        ),
    )
    for repository, image in ((BIG, images.big), (MANY, images.many), (SMALL, images.small)):
        push(image, upstream.host, repository)
    return images
