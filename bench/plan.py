"""What a run measures and at what size: the full benchmark, or the quick CI smoke."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FULL", "QUICK", "Plan"]

MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Plan:
    runs: int
    big_layers: tuple[int, ...]
    """The large image: incompressible layers, pulled cold, warm and 8 times at once."""
    many_layers: tuple[int, ...]
    """The many-layer image: per-request overhead rather than bandwidth."""
    small_layers: tuple[int, ...]
    """Each platform of the two-platform image whose manifests take the request load."""
    concurrency: int = 8
    connections: int = 32
    load_seconds: int = 3

    def describe(self) -> str:
        return (
            f"{self.runs} runs; big image {len(self.big_layers)} x "
            f"{self.big_layers[0] // MiB} MiB; {len(self.many_layers)} x "
            f"{self.many_layers[0] // 1024} KiB layers; {self.concurrency} concurrent pulls; "
            f"{self.connections} connections for {self.load_seconds} s per manifest load"
        )


FULL = Plan(
    runs=3, big_layers=(128 * MiB,) * 4, many_layers=(256 * 1024,) * 50, small_layers=(100_000,)
)
QUICK = Plan(
    runs=1,
    big_layers=(4 * MiB,) * 4,
    many_layers=(64 * 1024,) * 10,
    small_layers=(10_000,),
    load_seconds=1,
)
