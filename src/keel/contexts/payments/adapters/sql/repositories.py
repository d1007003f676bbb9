"""SQL repositories for payments. Every statement carries the tenant id, except the cross-tenant
``stale_pending`` scans of the periodic safety-net job."""

from __future__ import annotations

import builtins
import uuid
from datetime import datetime

from sqlalchemy import func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from keel.contexts.payments.adapters.sql.models import PaymentRow, RefundRow
from keel.contexts.payments.domain.model import (
    DailyTotal,
    FailureReason,
    Payment,
    PaymentStatus,
    Refund,
    RefundReason,
    RefundStatus,
)
from keel.contexts.payments.ports.repositories import PaymentFilter
from keel.platform.adapters.sql.dates import utc_date
from keel.platform.adapters.sql.paging import keyset_page
from keel.platform.adapters.sql.uow import SqlUnitOfWork
from keel.platform.domain.paging import Page, PageRequest


def _payment(row: PaymentRow) -> Payment:
    return Payment(
        id=row.id,
        tenant_id=row.tenant_id,
        amount=row.amount,
        currency=row.currency,
        payment_method=row.payment_method,
        description=row.description,
        customer_email=row.customer_email,
        metadata=dict(row.metadata_),
        status=PaymentStatus(row.status),
        provider=row.provider,
        created_at=row.created_at,
        updated_at=row.updated_at,
        amount_refunded=row.amount_refunded,
        amount_refunding=row.amount_refunding,
        provider_reference=row.provider_reference,
        failure_reason=FailureReason(row.failure_reason) if row.failure_reason else None,
        failure_message=row.failure_message,
        version=row.version,
    )


# Built once: a statement object memoizes its compiled-cache key, which a new ``insert()`` per call
# would compute again every time.
_INSERT_PAYMENT = insert(PaymentRow)


def _payment_columns(p: Payment) -> dict[str, object]:
    return {
        "id": p.id,
        "tenant_id": p.tenant_id,
        "amount": p.amount,
        "currency": p.currency,
        "payment_method": p.payment_method,
        "description": p.description,
        "customer_email": p.customer_email,
        "metadata_": dict(p.metadata),
        "status": p.status.value,
        "provider": p.provider,
        "provider_reference": p.provider_reference,
        "amount_refunded": p.amount_refunded,
        "amount_refunding": p.amount_refunding,
        "failure_reason": p.failure_reason.value if p.failure_reason else None,
        "failure_message": p.failure_message,
        "version": p.version,
        "created_at": p.created_at,
        "updated_at": p.updated_at,
    }


def _refund(row: RefundRow) -> Refund:
    return Refund(
        id=row.id,
        tenant_id=row.tenant_id,
        payment_id=row.payment_id,
        amount=row.amount,
        currency=row.currency,
        reason=RefundReason(row.reason) if row.reason else None,
        status=RefundStatus(row.status),
        created_at=row.created_at,
        updated_at=row.updated_at,
        provider_reference=row.provider_reference,
        failure_reason=FailureReason(row.failure_reason) if row.failure_reason else None,
        failure_message=row.failure_message,
    )


def _refund_columns(r: Refund) -> dict[str, object]:
    return {
        "id": r.id,
        "tenant_id": r.tenant_id,
        "payment_id": r.payment_id,
        "amount": r.amount,
        "currency": r.currency,
        "reason": r.reason.value if r.reason else None,
        "status": r.status.value,
        "provider_reference": r.provider_reference,
        "failure_reason": r.failure_reason.value if r.failure_reason else None,
        "failure_message": r.failure_message,
        "created_at": r.created_at,
        "updated_at": r.updated_at,
    }


async def _daily_totals(
    session: AsyncSession,
    model: type[PaymentRow] | type[RefundRow],
    tenant_id: uuid.UUID,
    start: datetime,
    end: datetime,
) -> builtins.list[DailyTotal]:
    day = utc_date(model.created_at)
    stmt = (
        select(day, model.currency, model.status, func.count(), func.coalesce(func.sum(model.amount), 0))
        .where(model.tenant_id == tenant_id, model.created_at >= start, model.created_at < end)
        .group_by(day, model.currency, model.status)
    )
    return [
        DailyTotal(day=d, currency=c, status=s, count=n, amount=int(a))
        for d, c, s, n, a in (await session.execute(stmt)).tuples()
    ]


class SqlPaymentRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._s = session

    async def add(self, payment: Payment) -> None:
        # A bulk INSERT: the hot write path, and nothing reads the row back through this session.
        await self._s.execute(_INSERT_PAYMENT, [_payment_columns(payment)])

    async def get(self, tenant_id: uuid.UUID, payment_id: uuid.UUID) -> Payment | None:
        stmt = select(PaymentRow).where(PaymentRow.tenant_id == tenant_id, PaymentRow.id == payment_id)
        row = (await self._s.execute(stmt)).scalar_one_or_none()
        return _payment(row) if row is not None else None

    async def list(self, tenant_id: uuid.UUID, where: PaymentFilter, page: PageRequest) -> Page[Payment]:
        stmt = select(PaymentRow).where(PaymentRow.tenant_id == tenant_id)
        if where.status is not None:
            stmt = stmt.where(PaymentRow.status == where.status.value)
        if where.created_from is not None:
            stmt = stmt.where(PaymentRow.created_at >= where.created_from)
        if where.created_to is not None:
            stmt = stmt.where(PaymentRow.created_at < where.created_to)
        return await keyset_page(self._s, stmt, PaymentRow.id, page, _payment, newest_first=True)

    async def save(self, payment: Payment) -> bool:
        values = _payment_columns(payment)
        del values["id"], values["tenant_id"], values["created_at"]
        stmt = (
            update(PaymentRow)
            .where(
                PaymentRow.tenant_id == payment.tenant_id,
                PaymentRow.id == payment.id,
                PaymentRow.version == payment.version - 1,
            )
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        return bool(getattr(await self._s.execute(stmt), "rowcount", 0))

    async def stale_pending(self, updated_before: datetime, limit: int) -> builtins.list[Payment]:
        stmt = (
            select(PaymentRow)
            .where(PaymentRow.status == PaymentStatus.PENDING.value, PaymentRow.updated_at < updated_before)
            .order_by(PaymentRow.updated_at)
            .limit(limit)
        )
        return [_payment(r) for r in (await self._s.execute(stmt)).scalars()]

    async def daily_totals(self, tenant_id: uuid.UUID, start: datetime, end: datetime) -> builtins.list[DailyTotal]:
        return await _daily_totals(self._s, PaymentRow, tenant_id, start, end)


class SqlRefundRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._s = session

    async def add(self, refund: Refund) -> None:
        self._s.add(RefundRow(**_refund_columns(refund)))
        await self._s.flush()

    async def get(self, tenant_id: uuid.UUID, refund_id: uuid.UUID) -> Refund | None:
        stmt = select(RefundRow).where(RefundRow.tenant_id == tenant_id, RefundRow.id == refund_id)
        row = (await self._s.execute(stmt)).scalar_one_or_none()
        return _refund(row) if row is not None else None

    async def list(self, tenant_id: uuid.UUID, payment_id: uuid.UUID, page: PageRequest) -> Page[Refund]:
        stmt = select(RefundRow).where(RefundRow.tenant_id == tenant_id, RefundRow.payment_id == payment_id)
        return await keyset_page(self._s, stmt, RefundRow.id, page, _refund, newest_first=True)

    async def update(self, refund: Refund) -> None:
        values = _refund_columns(refund)
        del values["id"], values["tenant_id"], values["payment_id"], values["created_at"]
        stmt = (
            update(RefundRow)
            .where(RefundRow.tenant_id == refund.tenant_id, RefundRow.id == refund.id)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        await self._s.execute(stmt)

    async def stale_pending(self, updated_before: datetime, limit: int) -> builtins.list[Refund]:
        stmt = (
            select(RefundRow)
            .where(RefundRow.status == RefundStatus.PENDING.value, RefundRow.updated_at < updated_before)
            .order_by(RefundRow.updated_at)
            .limit(limit)
        )
        return [_refund(r) for r in (await self._s.execute(stmt)).scalars()]

    async def daily_totals(self, tenant_id: uuid.UUID, start: datetime, end: datetime) -> builtins.list[DailyTotal]:
        return await _daily_totals(self._s, RefundRow, tenant_id, start, end)


class SqlPaymentsUnitOfWork(SqlUnitOfWork):
    payments: SqlPaymentRepository
    refunds: SqlRefundRepository

    def _bind(self, session: AsyncSession) -> None:
        self.payments = SqlPaymentRepository(session)
        self.refunds = SqlRefundRepository(session)
