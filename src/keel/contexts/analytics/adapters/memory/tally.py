"""Request counts for the embedded default: the API process is the only one counting."""

from __future__ import annotations

import uuid
from collections import Counter
from datetime import date

from keel.contexts.analytics.ports.repositories import RequestCounts
from keel.contexts.analytics.ports.tally import TallyBatch


class InMemoryRequestTally:
    def __init__(self) -> None:
        self._running: Counter[tuple[uuid.UUID, date]] = Counter()
        self._claimed: TallyBatch | None = None

    async def add(self, counts: RequestCounts) -> None:
        self._running.update(counts)

    async def take(self) -> TallyBatch | None:
        if self._claimed is None and self._running:
            self._claimed = TallyBatch(uuid.uuid4().hex, dict(self._running))
            self._running = Counter()
        return self._claimed

    async def done(self, batch_id: str) -> None:
        if self._claimed is not None and self._claimed.id == batch_id:
            self._claimed = None
