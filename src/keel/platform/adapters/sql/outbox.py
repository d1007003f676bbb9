"""The transactional outbox: events are rows written in the same transaction as the data, then
relayed to subscribers at least once (right after commit, and by a sweep for anything left over)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, cast

from advanced_alchemy.types import GUID, DateTimeUTC, JsonB
from loguru import logger
from sqlalchemy import Index, Integer, String, Table, func, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Mapped, mapped_column

from keel.platform.adapters.batching import NextBatch
from keel.platform.adapters.sql.base import Base
from keel.platform.context import request_id_var
from keel.platform.domain.events import Event, EventDispatcher
from keel.platform.domain.jobs import HIGH, NO_RETRY
from keel.platform.ports.clock import Clock
from keel.platform.ports.jobs import JobArgs, JobContext, JobSpec, PeriodicJob

# After this many failed sweeps an event is parked: it stays in the table, unpublished, with its
# last error, for an operator to inspect and replay (UPDATE outbox SET attempts = 0 …).
MAX_ATTEMPTS = 25


class OutboxRow(Base):
    __tablename__ = "outbox"
    __table_args__ = (
        Index(
            "ix_outbox_unpublished",
            "occurred_at",
            postgresql_where=text("published_at IS NULL"),
            sqlite_where=text("published_at IS NULL"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(GUID, primary_key=True)
    type: Mapped[str] = mapped_column(String(100))
    tenant_id: Mapped[uuid.UUID] = mapped_column(GUID)
    data: Mapped[dict[str, Any]] = mapped_column(JsonB)
    occurred_at: Mapped[datetime] = mapped_column(DateTimeUTC(timezone=True))
    request_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    published_at: Mapped[datetime | None] = mapped_column(DateTimeUTC(timezone=True), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(String(500), nullable=True)


def outbox_values(event: Event) -> dict[str, Any]:
    return {
        "id": event.id,
        "type": event.type,
        "tenant_id": event.tenant_id,
        "data": dict(event.data),
        "occurred_at": event.occurred_at,
        "request_id": request_id_var.get(),
        "attempts": 0,
    }


def _event(row: OutboxRow) -> Event:
    return Event(id=row.id, type=row.type, tenant_id=row.tenant_id, occurred_at=row.occurred_at, data=row.data)


class SqlOutboxRelay:
    """Publishes committed outbox rows to the dispatcher and marks them done.

    ``publish_committed`` is the fast path, called by the unit of work right after commit so that
    effects such as cache invalidation are complete before the response leaves. ``sweep`` is the
    safety net for a process that died between commit and publish: it claims old unpublished rows
    with ``FOR UPDATE SKIP LOCKED`` so many processes can sweep at once without double work.
    """

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        dispatcher: EventDispatcher,
        clock: Clock,
        *,
        grace: timedelta = timedelta(seconds=5),
    ) -> None:
        self._sessions = sessions
        self._dispatcher = dispatcher
        self._clock = clock
        self._grace = grace
        # The "published" marks of concurrent requests share one UPDATE (group commit).
        self._marks: NextBatch[list[uuid.UUID], None] = NextBatch(self._mark_published)

    async def publish_committed(self, events: Sequence[Event]) -> None:
        done: list[uuid.UUID] = []
        for event in events:
            try:
                await self._dispatcher.dispatch(event)
                done.append(event.id)
            except Exception as exc:  # noqa: BLE001 - the sweep retries; the request already committed
                logger.warning("event {} ({}) left for the outbox sweep: {!r}", event.id, event.type, exc)
        if done:
            await self._marked(done)

    async def _marked(self, ids: list[uuid.UUID]) -> None:
        """Returns once ``ids`` are marked published, or the attempt failed: then the rows stay pending,
        the sweep publishes them again, and consumers are idempotent."""
        try:
            await self._marks.submit(ids)
        except Exception as exc:  # noqa: BLE001 - the request already committed
            logger.warning("could not mark {} event(s) published: {!r}", len(ids), exc)

    async def _mark_published(self, batches: list[list[uuid.UUID]]) -> list[None]:
        ids = [event_id for batch in batches for event_id in batch]
        async with self._sessions() as session, session.begin():
            # The Core table, not the mapped class: no ORM bookkeeping for rows never loaded.
            table = cast(Table, OutboxRow.__table__)
            await session.execute(update(table).where(table.c.id.in_(ids)).values(published_at=self._clock.now()))
        return [None] * len(batches)

    async def sweep(self, batch: int = 100) -> int:
        """Publish up to ``batch`` events older than the grace period; returns how many were published."""
        cutoff = self._clock.now() - self._grace
        published = 0
        async with self._sessions() as session, session.begin():
            stmt = (
                select(OutboxRow)
                .where(
                    OutboxRow.published_at.is_(None),
                    OutboxRow.occurred_at <= cutoff,
                    OutboxRow.attempts < MAX_ATTEMPTS,
                )
                # Fewest attempts first: events that keep failing cannot starve newer ones.
                .order_by(OutboxRow.attempts, OutboxRow.occurred_at)
                .limit(batch)
                .with_for_update(skip_locked=True)
            )
            for row in (await session.execute(stmt)).scalars():
                token = request_id_var.set(row.request_id)
                try:
                    await self._dispatcher.dispatch(_event(row))
                    row.published_at = self._clock.now()
                    published += 1
                except Exception as exc:  # noqa: BLE001 - keep it for the next sweep, remember why
                    row.attempts += 1
                    row.last_error = repr(exc)[:500]
                    logger.warning("outbox event {} ({}) failed again: {!r}", row.id, row.type, exc)
                finally:
                    request_id_var.reset(token)
        return published

    async def pending(self) -> int:
        async with self._sessions() as session:
            stmt = select(func.count()).select_from(OutboxRow).where(OutboxRow.published_at.is_(None))
            return int((await session.execute(stmt)).scalar_one())


SWEEP_JOB = "platform.outbox_sweep"
SWEEP_EVERY = 5  # seconds; events normally publish right after commit, the sweep is the safety net


def outbox_jobs(relay: SqlOutboxRelay) -> tuple[list[JobSpec], list[PeriodicJob]]:
    async def sweep(ctx: JobContext, args: JobArgs) -> dict[str, int]:
        total = 0
        while (n := await relay.sweep()) > 0:
            total += n
        return {"published": total}

    # No retries: the next tick is the retry.
    spec = JobSpec(name=SWEEP_JOB, handler=sweep, queue=HIGH, retry=NO_RETRY, timeout=60)
    return [spec], [PeriodicJob(name=SWEEP_JOB, every=SWEEP_EVERY)]
