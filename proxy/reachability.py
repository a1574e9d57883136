"""Whether an upstream answers, as its last requests told: what the status page shows.

Counters say how often an upstream failed; an operator looking at an outage also needs to know
whether it is failing now, since when, and why.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

__all__ = ["Reachability"]


@dataclass(slots=True)
class Reachability:
    """The last answer and the last failure (wall-clock times, for display)."""

    last_success_at: float | None = None
    last_error_at: float | None = None
    last_error: str | None = None

    def succeeded(self) -> None:
        self.last_success_at = time.time()

    def failed(self, error: str) -> None:
        self.last_error_at = time.time()
        self.last_error = error

    @property
    def reachable(self) -> bool | None:
        """None until the upstream was first asked; then whether its latest outcome was good."""
        if self.last_error_at is None:
            return None if self.last_success_at is None else True
        return self.last_success_at is not None and self.last_success_at > self.last_error_at
