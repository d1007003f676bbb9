from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from keel.contexts.analytics.ports.repositories import RequestCounts


@dataclass(frozen=True, slots=True)
class TallyBatch:
    id: str
    counts: RequestCounts


class RequestTally(Protocol):
    """Request counts shared by the API processes that count them and the job that stores them.
    Adapters: Redis (production) and in-memory (the embedded default, one process)."""

    async def add(self, counts: RequestCounts) -> None:
        """Add to the running counts (atomically per entry; API processes add concurrently)."""
        ...

    async def take(self) -> TallyBatch | None:
        """Claim everything counted so far as a batch, or return the batch an earlier ``take`` claimed
        and did not see ``done`` (its job died); None when there is nothing to store."""
        ...

    async def done(self, batch_id: str) -> None:
        """The batch is stored: forget it."""
        ...
