"""In-memory analytics storage with real state and transaction semantics (stage, then commit), holding
what the SQL tables hold: one figure per (tenant, day, metric, currency, status), the rolled-up days,
and the ledger of request batches already added."""

from __future__ import annotations

import builtins
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime

from keel.contexts.analytics.domain.model import RECOMPUTED, Figure, Metric
from keel.contexts.analytics.ports.repositories import RequestCounts
from keel.platform.domain.events import Event
from tests.fakes.uow import InMemoryUnitOfWork

# (tenant, day, metric, currency, status): the SQL table's primary key
FigureKey = tuple[uuid.UUID, date, Metric, str, str]


@dataclass
class AnalyticsState:
    figures: dict[FigureKey, tuple[int, int]] = field(default_factory=dict)  # -> (count, amount)
    rolled_up: dict[tuple[uuid.UUID, date], datetime] = field(default_factory=dict)  # -> computed_at
    batches: dict[str, datetime] = field(default_factory=dict)  # batch id -> added_at
    outbox: list[Event] = field(default_factory=list)


class InMemoryRollupRepository:
    def __init__(self, state: AnalyticsState) -> None:
        self._s = state

    async def replace_day(self, tenant_id: uuid.UUID, day: date, figures: Sequence[Figure], at: datetime) -> None:
        for key in [k for k in self._s.figures if k[0] == tenant_id and k[1] == day and k[2] in RECOMPUTED]:
            del self._s.figures[key]
        for f in figures:
            # Like the SQL adapter: stored under ``day`` (not the figure's own), API requests and
            # empty figures left out.
            if f.metric not in RECOMPUTED or not f.count:
                continue
            key = (tenant_id, day, f.metric, f.currency, f.status)
            if key in self._s.figures:
                raise ValueError(f"duplicate figure {key}")  # the primary key would refuse it too
            self._s.figures[key] = (f.count, f.amount)
        self._s.rolled_up[(tenant_id, day)] = at

    async def figures(self, tenant_id: uuid.UUID, start: date, end: date) -> builtins.list[Figure]:
        return [
            Figure(day=d, metric=m, currency=c, status=s, count=n, amount=a)
            for (t, d, m, c, s), (n, a) in self._s.figures.items()
            if t == tenant_id and start <= d <= end
        ]

    async def rolled_up(self, tenant_id: uuid.UUID, start: date, end: date) -> builtins.set[date]:
        return {d for t, d in self._s.rolled_up if t == tenant_id and start <= d <= end}

    async def add_requests(self, batch_id: str, counts: RequestCounts, at: datetime) -> bool:
        if batch_id in self._s.batches:
            return False
        self._s.batches[batch_id] = at
        for (tenant_id, day), n in counts.items():
            key = (tenant_id, day, Metric.API_REQUESTS, "", "")
            count, amount = self._s.figures.get(key, (0, 0))
            self._s.figures[key] = (count + n, amount)
        return True

    async def forget_batches(self, before: datetime) -> int:
        doomed = [b for b, added in self._s.batches.items() if added < before]
        for b in doomed:
            del self._s.batches[b]
        return len(doomed)


class InMemoryAnalyticsUnitOfWork(InMemoryUnitOfWork[AnalyticsState]):
    rollups: InMemoryRollupRepository

    def _bind(self, staged: AnalyticsState) -> None:
        self.rollups = InMemoryRollupRepository(staged)
