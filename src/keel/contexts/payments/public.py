"""The payments context as other contexts and the composition root may see it."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from keel.contexts.payments.domain.currencies import format_amount, normalize_currency
from keel.contexts.payments.domain.model import DailyTotal, Payment
from keel.contexts.payments.domain.services import PaymentsService

__all__ = [
    "PUBLIC_EVENTS",
    "DailyTotal",
    "PaymentStatistics",
    "PaymentSummary",
    "PaymentsDirectory",
    "PaymentsReader",
    "format_amount",
    "normalize_currency",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class PaymentSummary:
    id: uuid.UUID
    tenant_id: uuid.UUID
    amount: int
    amount_refunded: int
    currency: str
    amount_display: str  # "12.34 EUR"
    amount_refunded_display: str
    status: str
    description: str
    customer_email: str | None
    provider_reference: str | None
    created_at: datetime

    @classmethod
    def of(cls, p: Payment) -> PaymentSummary:
        return cls(
            id=p.id,
            tenant_id=p.tenant_id,
            amount=p.amount,
            amount_refunded=p.amount_refunded,
            currency=p.currency,
            amount_display=format_amount(p.amount, p.currency),
            amount_refunded_display=format_amount(p.amount_refunded, p.currency),
            status=p.status.value,
            description=p.description,
            customer_email=p.customer_email,
            provider_reference=p.provider_reference,
            created_at=p.created_at,
        )


class PaymentsReader(Protocol):
    """Read-only lookups for work done on a tenant's behalf outside a request (jobs)."""

    async def find_payment(self, tenant_id: uuid.UUID, payment_id: uuid.UUID) -> PaymentSummary | None: ...


class PaymentStatistics(Protocol):
    """Aggregates for reporting (the analytics context's rollups)."""

    async def daily_totals(
        self, tenant_id: uuid.UUID, start: datetime, end: datetime
    ) -> tuple[Sequence[DailyTotal], Sequence[DailyTotal]]:
        """(payments, refunds) created in [start, end), by UTC day, currency and current status."""
        ...


class PaymentsDirectory:
    def __init__(self, service: PaymentsService) -> None:
        self._service = service

    async def find_payment(self, tenant_id: uuid.UUID, payment_id: uuid.UUID) -> PaymentSummary | None:
        p = await self._service.find_payment(tenant_id, payment_id)
        return PaymentSummary.of(p) if p is not None else None

    async def daily_totals(
        self, tenant_id: uuid.UUID, start: datetime, end: datetime
    ) -> tuple[Sequence[DailyTotal], Sequence[DailyTotal]]:
        return await self._service.daily_totals(tenant_id, start, end)


_PAYMENT = (
    "payment_id", "amount", "currency", "status", "amount_refunded", "description", "customer_email", "metadata",
)  # fmt: skip
_REFUND = ("refund_id", "refund_amount", "refund_status", "refund_reason")
_FAILURE = ("failure_reason", "failure_message")

# Events other contexts may react to, with the fields of their data that may leave Keel (webhooks).
PUBLIC_EVENTS: Mapping[str, Sequence[str]] = {
    "payment.created": _PAYMENT,
    "payment.succeeded": (*_PAYMENT, "provider_reference"),
    "payment.failed": (*_PAYMENT, *_FAILURE),
    "payment.refunded": (*_PAYMENT, *_REFUND),
    "payment.refund_failed": (*_PAYMENT, *_REFUND, *_FAILURE),
}
