"""Peak resident memory of server processes, from the kernel's own high-water mark.

`VmHWM` in /proc/<pid>/status is exact (no sampling gaps); writing 5 to clear_refs resets it
to the current RSS, so the peak can be taken over one workload rather than the process's life.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

__all__ = ["peak_rss", "reset_peak", "tree"]

_PROC = Path("/proc")


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants (worker processes included)."""
    found = [pid]
    for task in (_PROC / str(pid) / "task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            found.extend(tree(int(child)))
    return found


def reset_peak(pids: Iterable[int]) -> None:
    for pid in pids:
        (_PROC / str(pid) / "clear_refs").write_text("5")


def peak_rss(pids: Iterable[int]) -> int:
    """The sum of the processes' peak RSS since the last `reset_peak`, in bytes."""
    total = 0
    for pid in pids:
        for line in (_PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1]) * 1024
    return total
