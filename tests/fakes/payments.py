"""In-memory payments storage with real state and transaction semantics, and a fake payment provider
that keeps a ledger per idempotency key (like a real provider) with scriptable outages."""

from __future__ import annotations

import builtins
import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import TypeVar

from keel.contexts.payments.adapters.sql import sandbox
from keel.contexts.payments.domain.model import (
    ChargeOrder,
    DailyTotal,
    Failure,
    FailureReason,
    Payment,
    PaymentStatus,
    ProviderResult,
    ProviderUnavailable,
    Refund,
    RefundOrder,
    RefundStatus,
)
from keel.contexts.payments.domain.services import PaymentsService
from keel.contexts.payments.ports.repositories import PaymentFilter
from keel.platform.adapters.memory.cache import InMemoryCache
from keel.platform.cache import ReadThroughCache
from keel.platform.domain.events import Event
from keel.platform.domain.paging import Page, PageRequest
from keel.platform.ports.clock import Clock
from keel.platform.ports.jobs import JobQueue
from tests.fakes.uow import InMemoryUnitOfWork


@dataclass
class PaymentsState:
    payments: dict[uuid.UUID, Payment] = field(default_factory=dict)
    refunds: dict[uuid.UUID, Refund] = field(default_factory=dict)
    outbox: list[Event] = field(default_factory=list)


R = TypeVar("R", Payment, Refund)


def _newest_first(rows: builtins.list[R], page: PageRequest) -> Page[R]:
    ordered = sorted(rows, key=lambda r: r.id, reverse=True)
    if page.after is not None:
        ordered = [r for r in ordered if r.id < page.after]
    return Page.from_overfetch(ordered[: page.fetch], page)


def _daily_totals(
    rows: Iterable[Payment | Refund], tenant_id: uuid.UUID, start: datetime, end: datetime
) -> builtins.list[DailyTotal]:
    """Like the SQL adapters: rows created in [start, end), grouped by UTC day, currency and status."""
    sums: dict[tuple[date, str, str], list[int]] = defaultdict(lambda: [0, 0])
    for r in rows:
        if r.tenant_id == tenant_id and start <= r.created_at < end:
            pair = sums[(r.created_at.astimezone(UTC).date(), r.currency, r.status.value)]
            pair[0] += 1
            pair[1] += r.amount
    return [DailyTotal(day=d, currency=c, status=s, count=n, amount=a) for (d, c, s), (n, a) in sums.items()]


class InMemoryPaymentRepository:
    def __init__(self, state: PaymentsState) -> None:
        self._s = state

    async def add(self, payment: Payment) -> None:
        if payment.id in self._s.payments:
            raise ValueError("duplicate payment id")
        self._s.payments[payment.id] = payment

    async def get(self, tenant_id: uuid.UUID, payment_id: uuid.UUID) -> Payment | None:
        p = self._s.payments.get(payment_id)
        return p if p is not None and p.tenant_id == tenant_id else None

    async def list(self, tenant_id: uuid.UUID, where: PaymentFilter, page: PageRequest) -> Page[Payment]:
        rows = [
            p
            for p in self._s.payments.values()
            if p.tenant_id == tenant_id
            and (where.status is None or p.status is where.status)
            and (where.created_from is None or p.created_at >= where.created_from)
            and (where.created_to is None or p.created_at < where.created_to)
        ]
        return _newest_first(rows, page)

    async def save(self, payment: Payment) -> bool:
        current = self._s.payments.get(payment.id)
        if current is None or current.tenant_id != payment.tenant_id or current.version != payment.version - 1:
            return False
        self._s.payments[payment.id] = payment
        return True

    async def stale_pending(self, updated_before: datetime, limit: int) -> builtins.list[Payment]:
        rows = [
            p for p in self._s.payments.values() if p.status is PaymentStatus.PENDING and p.updated_at < updated_before
        ]
        return sorted(rows, key=lambda p: p.updated_at)[:limit]

    async def daily_totals(self, tenant_id: uuid.UUID, start: datetime, end: datetime) -> builtins.list[DailyTotal]:
        return _daily_totals(self._s.payments.values(), tenant_id, start, end)


class InMemoryRefundRepository:
    def __init__(self, state: PaymentsState) -> None:
        self._s = state

    async def add(self, refund: Refund) -> None:
        if refund.id in self._s.refunds:
            raise ValueError("duplicate refund id")
        self._s.refunds[refund.id] = refund

    async def get(self, tenant_id: uuid.UUID, refund_id: uuid.UUID) -> Refund | None:
        r = self._s.refunds.get(refund_id)
        return r if r is not None and r.tenant_id == tenant_id else None

    async def list(self, tenant_id: uuid.UUID, payment_id: uuid.UUID, page: PageRequest) -> Page[Refund]:
        rows = [r for r in self._s.refunds.values() if r.tenant_id == tenant_id and r.payment_id == payment_id]
        return _newest_first(rows, page)

    async def update(self, refund: Refund) -> None:
        current = self._s.refunds.get(refund.id)
        if current is not None and current.tenant_id == refund.tenant_id:
            self._s.refunds[refund.id] = refund

    async def stale_pending(self, updated_before: datetime, limit: int) -> builtins.list[Refund]:
        rows = [
            r for r in self._s.refunds.values() if r.status is RefundStatus.PENDING and r.updated_at < updated_before
        ]
        return sorted(rows, key=lambda r: r.updated_at)[:limit]

    async def daily_totals(self, tenant_id: uuid.UUID, start: datetime, end: datetime) -> builtins.list[DailyTotal]:
        return _daily_totals(self._s.refunds.values(), tenant_id, start, end)


class InMemoryPaymentsUnitOfWork(InMemoryUnitOfWork[PaymentsState]):
    payments: InMemoryPaymentRepository
    refunds: InMemoryRefundRepository

    def _bind(self, staged: PaymentsState) -> None:
        self.payments = InMemoryPaymentRepository(staged)
        self.refunds = InMemoryRefundRepository(staged)


# -- provider ----------------------------------------------------------------------------------


# The sandbox's test tokens: the fake answers the same cards as every real provider.
SUCCEEDS = sandbox.SUCCEEDS
DECLINED = sandbox.DECLINED
INSUFFICIENT_FUNDS = sandbox.INSUFFICIENT_FUNDS
UNAVAILABLE_TWICE = sandbox.UNAVAILABLE_TWICE


@dataclass
class LedgerEntry:
    kind: str
    amount: int
    currency: str
    result: ProviderResult
    charge_reference: str | None = None


class FakePaymentProvider:
    """Answers by the same test tokens as the sandbox; ``outages`` makes the next N calls (any key)
    raise ``ProviderUnavailable`` before reaching the ledger."""

    def __init__(self, name: str = "sandbox") -> None:
        self._name = name
        self.ledger: dict[str, LedgerEntry] = {}
        self.calls: list[str] = []  # idempotency keys, one per call
        self.outages = 0
        self._unavailable: dict[str, int] = {}

    @property
    def name(self) -> str:
        return self._name

    def charges(self) -> builtins.list[LedgerEntry]:
        """Money actually taken: one entry per successful charge."""
        return [e for e in self.ledger.values() if e.kind == "charge" and e.result.reference is not None]

    def _outage(self, key: str, token: str | None) -> None:
        if self.outages:
            self.outages -= 1
            raise ProviderUnavailable("scripted outage")
        if token == UNAVAILABLE_TWICE and key not in self.ledger:
            seen = self._unavailable.get(key, 0) + 1
            self._unavailable[key] = seen
            if seen <= 2:
                raise ProviderUnavailable(f"outage {seen} of 2")

    async def capture(self, order: ChargeOrder) -> ProviderResult:
        self.calls.append(order.idempotency_key)
        self._outage(order.idempotency_key, order.payment_method)
        if order.idempotency_key in self.ledger:
            return self.ledger[order.idempotency_key].result
        if order.payment_method == DECLINED:
            result = ProviderResult(
                failure=Failure(reason=FailureReason.CARD_DECLINED, message="Your card was declined.")
            )
        elif order.payment_method == INSUFFICIENT_FUNDS:
            result = ProviderResult(
                failure=Failure(reason=FailureReason.INSUFFICIENT_FUNDS, message="Your card has insufficient funds.")
            )
        elif order.payment_method.startswith("pm_card_"):
            result = ProviderResult(reference=f"ch_fake_{len(self.ledger)}")
        else:
            result = ProviderResult(
                failure=Failure(reason=FailureReason.INVALID_PAYMENT_METHOD, message="No such payment method.")
            )
        self.ledger[order.idempotency_key] = LedgerEntry("charge", order.amount, order.currency, result)
        return result

    async def refund(self, order: RefundOrder) -> ProviderResult:
        self.calls.append(order.idempotency_key)
        self._outage(order.idempotency_key, None)
        if order.idempotency_key in self.ledger:
            return self.ledger[order.idempotency_key].result
        charge = next(
            (e for e in self.charges() if e.result.reference == order.charge_reference),
            None,
        )
        refunded = sum(
            e.amount
            for e in self.ledger.values()
            if e.kind == "refund" and e.charge_reference == order.charge_reference and e.result.reference
        )
        if charge is None or refunded + order.amount > charge.amount:
            result = ProviderResult(
                failure=Failure(reason=FailureReason.REFUND_REJECTED, message="The refund exceeds the charge.")
            )
        else:
            result = ProviderResult(reference=f"re_fake_{len(self.ledger)}")
        self.ledger[order.idempotency_key] = LedgerEntry(
            "refund", order.amount, order.currency, result, charge_reference=order.charge_reference
        )
        return result


def payments_service(
    state: PaymentsState, provider: FakePaymentProvider, jobs: JobQueue, clock: Clock
) -> PaymentsService:
    """The payments service as the composition root wires it, on in-memory adapters."""
    return PaymentsService(
        lambda: InMemoryPaymentsUnitOfWork(state),
        provider,
        jobs,
        clock,
        ReadThroughCache(InMemoryCache(clock)),
    )
