"""What the analytics core needs from storage: its own tables of daily figures, tenant-scoped."""

from __future__ import annotations

import builtins
import uuid
from collections.abc import Mapping, Sequence
from datetime import date, datetime
from typing import Protocol

from keel.contexts.analytics.domain.model import Figure
from keel.platform.ports.uow import UnitOfWork

# (tenant, UTC day) -> API requests served
RequestCounts = Mapping[tuple[uuid.UUID, date], int]


class RollupRepository(Protocol):
    async def replace_day(self, tenant_id: uuid.UUID, day: date, figures: Sequence[Figure], at: datetime) -> None:
        """The day's recomputed figures (``RECOMPUTED`` metrics) become exactly ``figures``, and the
        day counts as rolled up. API request counts are left as they are."""
        ...

    async def figures(self, tenant_id: uuid.UUID, start: date, end: date) -> builtins.list[Figure]:
        """Every stored figure of the days ``start`` to ``end`` (inclusive), API requests included."""
        ...

    async def rolled_up(self, tenant_id: uuid.UUID, start: date, end: date) -> builtins.set[date]:
        """The days of ``start`` to ``end`` (inclusive) a rollup has covered."""
        ...

    async def add_requests(self, batch_id: str, counts: RequestCounts, at: datetime) -> bool:
        """Add a batch of request counts, once: False (nothing added) when the batch was added before."""
        ...

    async def forget_batches(self, before: datetime) -> int:
        """Drop the record of batches added before ``before`` (a batch is retried within minutes)."""
        ...


class AnalyticsUnitOfWork(UnitOfWork, Protocol):
    @property
    def rollups(self) -> RollupRepository: ...
