"""Who was busy during a workload: the clients (this process's children) and the servers.

CPU seconds over wall seconds is the number of cores a side kept busy on average: a client at
about one core while the server idles is a client-bound workload, whatever the server does.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CoresBusy", "cores_busy"]

_TICK = os.sysconf("SC_CLK_TCK")


@dataclass(slots=True)
class CoresBusy:
    clients: float = 0.0
    servers: float = 0.0


def _children_seconds() -> float:
    """CPU of every finished child process (the clients have finished when this is read)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _process_seconds(pids: Iterable[int]) -> float:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _TICK


@contextmanager
def cores_busy(server_pids: list[int]) -> Iterator[CoresBusy]:
    """Filled in when the block ends: average cores busy in clients and in the servers."""
    busy = CoresBusy()
    clients, servers = _children_seconds(), _process_seconds(server_pids)
    started = time.perf_counter()
    yield busy
    wall = time.perf_counter() - started
    busy.clients = (_children_seconds() - clients) / wall
    busy.servers = (_process_seconds(server_pids) - servers) / wall
