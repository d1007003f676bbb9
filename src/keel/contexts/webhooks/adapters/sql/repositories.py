"""SQL repositories for webhooks. Every statement carries the tenant id, except the cross-tenant
``overdue`` scan the periodic job makes."""

from __future__ import annotations

import builtins
import uuid
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime

from sqlalchemy import ColumnElement, and_, delete, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from keel.contexts.webhooks.adapters.sql.models import AttemptRow, DeliveryRow, EndpointRow
from keel.contexts.webhooks.domain.model import Attempt, Delivery, DeliveryStatus, Endpoint
from keel.platform.adapters.sql.errors import insert_unless_exists
from keel.platform.adapters.sql.paging import keyset_page
from keel.platform.adapters.sql.uow import SqlUnitOfWork
from keel.platform.domain.paging import Page, PageRequest


def _endpoint(row: EndpointRow) -> Endpoint:
    return Endpoint(
        id=row.id,
        tenant_id=row.tenant_id,
        url=row.url,
        description=row.description,
        event_types=tuple(row.event_types),
        enabled=row.enabled,
        secret=row.secret,
        created_at=row.created_at,
        updated_at=row.updated_at,
        disabled_reason=row.disabled_reason,
        previous_secret=row.previous_secret,
        previous_secret_expires_at=row.previous_secret_expires_at,
        failing_since=row.failing_since,
    )


def _endpoint_columns(e: Endpoint) -> dict[str, object]:
    return {**asdict(e), "event_types": list(e.event_types)}


def _delivery(row: DeliveryRow) -> Delivery:
    return Delivery(
        id=row.id,
        tenant_id=row.tenant_id,
        endpoint_id=row.endpoint_id,
        event_id=row.event_id,
        event_type=row.event_type,
        payload=row.payload,
        status=DeliveryStatus(row.status),
        attempts=row.attempts,
        attempt_budget=row.attempt_budget,
        created_at=row.created_at,
        updated_at=row.updated_at,
        next_attempt_at=row.next_attempt_at,
        last_status_code=row.last_status_code,
        last_error=row.last_error,
        claim_token=row.claim_token,
    )


def _delivery_columns(d: Delivery) -> dict[str, object]:
    return {**asdict(d), "status": d.status.value}


def _attempt(row: AttemptRow) -> Attempt:
    return Attempt(
        id=row.id,
        delivery_id=row.delivery_id,
        tenant_id=row.tenant_id,
        number=row.number,
        started_at=row.started_at,
        latency_ms=row.latency_ms,
        status_code=row.status_code,
        error=row.error,
    )


class SqlEndpointRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._s = session

    async def add(self, endpoint: Endpoint) -> None:
        self._s.add(EndpointRow(**_endpoint_columns(endpoint)))
        await self._s.flush()

    async def _row(self, tenant_id: uuid.UUID, endpoint_id: uuid.UUID) -> EndpointRow | None:
        stmt = select(EndpointRow).where(EndpointRow.tenant_id == tenant_id, EndpointRow.id == endpoint_id)
        return (await self._s.execute(stmt)).scalar_one_or_none()

    async def get(self, tenant_id: uuid.UUID, endpoint_id: uuid.UUID) -> Endpoint | None:
        row = await self._row(tenant_id, endpoint_id)
        return _endpoint(row) if row is not None else None

    async def list(self, tenant_id: uuid.UUID, page: PageRequest) -> Page[Endpoint]:
        stmt = select(EndpointRow).where(EndpointRow.tenant_id == tenant_id)
        return await keyset_page(self._s, stmt, EndpointRow.id, page, _endpoint)

    async def subscribed(self, tenant_id: uuid.UUID, event_type: str) -> builtins.list[Endpoint]:
        # A tenant has a handful of endpoints; filtering the JSON list here keeps the query portable.
        stmt = select(EndpointRow).where(EndpointRow.tenant_id == tenant_id, EndpointRow.enabled.is_(True))
        rows = (await self._s.execute(stmt)).scalars()
        return [e for e in map(_endpoint, rows) if e.subscribes_to(event_type)]

    async def update(self, endpoint: Endpoint) -> None:
        values = _endpoint_columns(endpoint)
        del values["id"], values["tenant_id"], values["created_at"]
        stmt = (
            update(EndpointRow)
            .where(EndpointRow.tenant_id == endpoint.tenant_id, EndpointRow.id == endpoint.id)
            .values(**values)
        )
        await self._s.execute(stmt)

    async def delete(self, tenant_id: uuid.UUID, endpoint_id: uuid.UUID) -> bool:
        # Children first and explicitly: SQLite enforces ON DELETE CASCADE only with a pragma.
        deliveries = select(DeliveryRow.id).where(
            DeliveryRow.tenant_id == tenant_id, DeliveryRow.endpoint_id == endpoint_id
        )
        await self._s.execute(delete(AttemptRow).where(AttemptRow.delivery_id.in_(deliveries)))
        await self._s.execute(
            delete(DeliveryRow).where(DeliveryRow.tenant_id == tenant_id, DeliveryRow.endpoint_id == endpoint_id)
        )
        stmt = delete(EndpointRow).where(EndpointRow.tenant_id == tenant_id, EndpointRow.id == endpoint_id)
        result = await self._s.execute(stmt)
        return bool(getattr(result, "rowcount", 0))


class SqlDeliveryRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._s = session

    async def add(self, delivery: Delivery) -> bool:
        return await insert_unless_exists(
            self._s, DeliveryRow, _delivery_columns(delivery), ("endpoint_id", "event_id")
        )

    async def get(self, tenant_id: uuid.UUID, delivery_id: uuid.UUID) -> Delivery | None:
        stmt = select(DeliveryRow).where(DeliveryRow.tenant_id == tenant_id, DeliveryRow.id == delivery_id)
        row = (await self._s.execute(stmt)).scalar_one_or_none()
        return _delivery(row) if row is not None else None

    async def for_event(self, tenant_id: uuid.UUID, event_id: uuid.UUID) -> builtins.list[Delivery]:
        stmt = select(DeliveryRow).where(DeliveryRow.tenant_id == tenant_id, DeliveryRow.event_id == event_id)
        return [_delivery(r) for r in (await self._s.execute(stmt)).scalars()]

    async def list(self, tenant_id: uuid.UUID, endpoint_id: uuid.UUID, page: PageRequest) -> Page[Delivery]:
        stmt = select(DeliveryRow).where(DeliveryRow.tenant_id == tenant_id, DeliveryRow.endpoint_id == endpoint_id)
        return await keyset_page(self._s, stmt, DeliveryRow.id, page, _delivery, newest_first=True)

    async def claim(
        self, tenant_id: uuid.UUID, delivery_id: uuid.UUID, claimer: str, now: datetime, stale_before: datetime
    ) -> Delivery | None:
        sending = DeliveryStatus.SENDING.value
        stmt = (
            update(DeliveryRow)
            .where(
                DeliveryRow.tenant_id == tenant_id,
                DeliveryRow.id == delivery_id,
                or_(
                    and_(DeliveryRow.status == DeliveryStatus.PENDING.value, DeliveryRow.next_attempt_at <= now),
                    and_(
                        DeliveryRow.status == sending,
                        or_(DeliveryRow.claimed_by == claimer, DeliveryRow.claimed_at < stale_before),
                    ),
                ),
            )
            .values(status=sending, claimed_by=claimer, claimed_at=now, claim_token=str(uuid.uuid4()))
            .execution_options(synchronize_session=False)
        )
        result = await self._s.execute(stmt)
        if not getattr(result, "rowcount", 0):
            return None
        return await self.get(tenant_id, delivery_id)

    async def _write(self, delivery: Delivery, *fence: ColumnElement[bool]) -> bool:
        values = _delivery_columns(delivery)
        del values["id"], values["tenant_id"], values["created_at"]
        if delivery.status is not DeliveryStatus.SENDING:
            values.update(claimed_by=None, claimed_at=None, claim_token=None)
        stmt = (
            update(DeliveryRow)
            .where(DeliveryRow.tenant_id == delivery.tenant_id, DeliveryRow.id == delivery.id, *fence)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        return bool(getattr(await self._s.execute(stmt), "rowcount", 0))

    async def update(self, delivery: Delivery) -> None:
        await self._write(delivery)

    async def finish(self, delivery: Delivery) -> bool:
        if delivery.claim_token is None:
            return False
        return await self._write(
            delivery,
            DeliveryRow.status == DeliveryStatus.SENDING.value,
            DeliveryRow.claim_token == delivery.claim_token,
        )

    async def overdue(self, due_before: datetime, stale_before: datetime, limit: int) -> builtins.list[Delivery]:
        stmt = (
            select(DeliveryRow)
            .where(
                or_(
                    and_(DeliveryRow.status == DeliveryStatus.PENDING.value, DeliveryRow.next_attempt_at < due_before),
                    and_(DeliveryRow.status == DeliveryStatus.SENDING.value, DeliveryRow.claimed_at < stale_before),
                )
            )
            .order_by(DeliveryRow.next_attempt_at)
            .limit(limit)
        )
        return [_delivery(r) for r in (await self._s.execute(stmt)).scalars()]


class SqlAttemptRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._s = session

    async def add(self, attempt: Attempt) -> None:
        self._s.add(AttemptRow(**asdict(attempt)))
        await self._s.flush()

    async def for_deliveries(self, tenant_id: uuid.UUID, delivery_ids: Sequence[uuid.UUID]) -> builtins.list[Attempt]:
        if not delivery_ids:
            return []
        stmt = (
            select(AttemptRow)
            .where(AttemptRow.tenant_id == tenant_id, AttemptRow.delivery_id.in_(list(delivery_ids)))
            .order_by(AttemptRow.delivery_id, AttemptRow.number)
        )
        return [_attempt(r) for r in (await self._s.execute(stmt)).scalars()]


class SqlWebhooksUnitOfWork(SqlUnitOfWork):
    endpoints: SqlEndpointRepository
    deliveries: SqlDeliveryRepository
    attempts: SqlAttemptRepository

    def _bind(self, session: AsyncSession) -> None:
        self.endpoints = SqlEndpointRepository(session)
        self.deliveries = SqlDeliveryRepository(session)
        self.attempts = SqlAttemptRepository(session)
