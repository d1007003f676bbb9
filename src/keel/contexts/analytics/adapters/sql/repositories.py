"""SQL storage of daily figures. Every statement carries the tenant id, except the batch ledger."""

from __future__ import annotations

import builtins
import uuid
from collections.abc import Sequence
from datetime import date, datetime

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from keel.contexts.analytics.adapters.sql.models import DailyFigureRow, RequestBatchRow, RolledUpDayRow
from keel.contexts.analytics.domain.model import RECOMPUTED, Figure, Metric
from keel.contexts.analytics.ports.repositories import RequestCounts
from keel.platform.adapters.sql.errors import insert_unless_exists
from keel.platform.adapters.sql.uow import SqlUnitOfWork

_RECOMPUTED = sorted(m.value for m in RECOMPUTED)


class SqlRollupRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._s = session

    def _insert(self, model: type[DailyFigureRow] | type[RolledUpDayRow]) -> postgresql.Insert | sqlite.Insert:
        if self._s.bind.dialect.name == "postgresql":
            return postgresql.insert(model)
        return sqlite.insert(model)

    async def replace_day(self, tenant_id: uuid.UUID, day: date, figures: Sequence[Figure], at: datetime) -> None:
        # The day's marker first: its row lock makes concurrent rollups of one day take turns, so the
        # second one's DELETE sees (and removes) what the first inserted instead of colliding with it.
        mark = self._insert(RolledUpDayRow).values(tenant_id=tenant_id, day=day, computed_at=at)
        await self._s.execute(mark.on_conflict_do_update(index_elements=["tenant_id", "day"], set_={"computed_at": at}))
        await self._s.execute(
            delete(DailyFigureRow).where(
                DailyFigureRow.tenant_id == tenant_id, DailyFigureRow.day == day, DailyFigureRow.metric.in_(_RECOMPUTED)
            )
        )
        rows = [
            {
                "tenant_id": tenant_id,
                "day": day,
                "metric": f.metric.value,
                "currency": f.currency,
                "status": f.status,
                "count": f.count,
                "amount": f.amount,
            }
            for f in figures
            if f.metric in RECOMPUTED and f.count
        ]
        if rows:
            await self._s.execute(self._insert(DailyFigureRow), rows)

    async def figures(self, tenant_id: uuid.UUID, start: date, end: date) -> builtins.list[Figure]:
        # Plain columns, not ORM objects: a year of a busy tenant is thousands of rows per summary.
        f = DailyFigureRow
        stmt = select(f.day, f.metric, f.currency, f.status, f.count, f.amount).where(
            f.tenant_id == tenant_id, f.day >= start, f.day <= end
        )
        return [
            Figure(day=d, metric=Metric(m), currency=c, status=s, count=n, amount=a)
            for d, m, c, s, n, a in (await self._s.execute(stmt)).tuples()
        ]

    async def rolled_up(self, tenant_id: uuid.UUID, start: date, end: date) -> builtins.set[date]:
        stmt = select(RolledUpDayRow.day).where(
            RolledUpDayRow.tenant_id == tenant_id, RolledUpDayRow.day >= start, RolledUpDayRow.day <= end
        )
        return set((await self._s.execute(stmt)).scalars())

    async def add_requests(self, batch_id: str, counts: RequestCounts, at: datetime) -> bool:
        if not await insert_unless_exists(self._s, RequestBatchRow, {"id": batch_id, "added_at": at}, ["id"]):
            return False
        if not counts:
            return True
        rows = [
            {
                "tenant_id": tenant_id,
                "day": day,
                "metric": Metric.API_REQUESTS.value,
                "currency": "",
                "status": "",
                "count": n,
                "amount": 0,
            }
            for (tenant_id, day), n in sorted(counts.items())  # one lock order for concurrent flushes
        ]
        stmt = self._insert(DailyFigureRow)
        upsert = stmt.on_conflict_do_update(
            index_elements=["tenant_id", "day", "metric", "currency", "status"],
            set_={"count": DailyFigureRow.count + stmt.excluded["count"]},
        )
        await self._s.execute(upsert, rows)  # executemany: no bound on how many tenants a batch names
        return True

    async def forget_batches(self, before: datetime) -> int:
        result = await self._s.execute(delete(RequestBatchRow).where(RequestBatchRow.added_at < before))
        return int(getattr(result, "rowcount", 0) or 0)


class SqlAnalyticsUnitOfWork(SqlUnitOfWork):
    rollups: SqlRollupRepository

    def _bind(self, session: AsyncSession) -> None:
        self.rollups = SqlRollupRepository(session)
