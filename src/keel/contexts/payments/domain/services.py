"""Payment use cases: creating payments and refunds for tenants, and the jobs that settle them with
the provider.

The request path never talks to the provider: it stores the payment (or refund) with its event in
one transaction and answers with the id of the job the event triggers. The jobs are idempotent:
they settle only what is still pending, and the provider sees one idempotency key per payment and
per refund, so a retried job never moves money twice.
"""

from __future__ import annotations

import string
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar

from keel.contexts.payments.domain import caching
from keel.contexts.payments.domain.commands import CreatePayment, CreateRefund
from keel.contexts.payments.domain.currencies import normalize_currency
from keel.contexts.payments.domain.errors import (
    ConcurrentChange,
    PaymentNotFound,
    RefundNotFound,
    UnknownCurrency,
)
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
    capture_key,
    refund_key,
)
from keel.contexts.payments.ports.provider import PaymentProvider
from keel.contexts.payments.ports.repositories import PaymentFilter, PaymentsUnitOfWork
from keel.platform.cache import ReadThroughCache
from keel.platform.domain.errors import InvalidInput
from keel.platform.domain.events import Event, event_job_id
from keel.platform.domain.ids import new_id
from keel.platform.domain.paging import Page, PageRequest
from keel.platform.domain.tenancy import Principal
from keel.platform.ports.clock import Clock
from keel.platform.ports.jobs import JobQueue

CAPTURE_JOB = "payments.capture"
REFUND_JOB = "payments.refund"
RESUME_JOB = "payments.resume_pending"
# Internal events that owe a job. ``payment.created`` and ``refund.created`` carry the id of the
# payment (refund) they announce, so the job's id follows from the payment alone.
TRIGGERS = {"payment.created": CAPTURE_JOB, "refund.created": REFUND_JOB}
# A payment or refund still pending this long after its last change, with no live job, lost its job.
STALE_AFTER = timedelta(minutes=10)
_SAVE_ATTEMPTS = 5
# Lower-cases A-Z only: str.lower() can lengthen a string ("İ" becomes two characters) past the column.
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Accepted(Generic[T]):
    """A stored payment (or refund) and the job that settles it."""

    value: T
    job_id: str


def _payment_data(p: Payment) -> dict[str, Any]:
    return {
        "payment_id": str(p.id),
        "amount": p.amount,
        "currency": p.currency,
        "status": p.status.value,
        "amount_refunded": p.amount_refunded,
        "description": p.description,
        "customer_email": p.customer_email,
        "metadata": dict(p.metadata),
        "provider_reference": p.provider_reference,
        "created_at": p.created_at.isoformat(),  # internal: which day's figures the event changes (analytics)
    }


def _refund_data(r: Refund) -> dict[str, Any]:
    return {
        "refund_id": str(r.id),
        "refund_amount": r.amount,
        "refund_status": r.status.value,
        "refund_reason": r.reason.value if r.reason else None,
        "refund_created_at": r.created_at.isoformat(),  # internal, like the payment's ``created_at``
    }


def _failure_data(reason: FailureReason | None, message: str | None) -> dict[str, Any]:
    return {"failure_reason": reason.value if reason else None, "failure_message": message}


class PaymentsService:
    def __init__(
        self,
        uow: Callable[[], PaymentsUnitOfWork],
        provider: PaymentProvider,
        jobs: JobQueue,
        clock: Clock,
        cache: ReadThroughCache,
    ) -> None:
        self._uow = uow
        self._provider = provider
        self._jobs = jobs
        self._clock = clock
        self._cache = cache

    # -- payments -------------------------------------------------------------------------------

    async def create_payment(self, who: Principal, cmd: CreatePayment) -> Accepted[Payment]:
        currency = normalize_currency(cmd.currency)
        if currency is None:
            raise UnknownCurrency(cmd.currency)
        now = self._clock.now()
        payment = Payment(
            id=new_id(),
            tenant_id=who.tenant_id,
            amount=cmd.amount,
            currency=currency,
            payment_method=cmd.payment_method,
            description=cmd.description,
            customer_email=cmd.customer_email.translate(_ASCII_LOWER) if cmd.customer_email else None,
            metadata=dict(cmd.metadata),
            status=PaymentStatus.PENDING,
            provider=self._provider.name,
            created_at=now,
            updated_at=now,
        )
        async with self._uow() as uow:
            await uow.payments.add(payment)
            uow.record(
                Event(
                    id=payment.id,
                    type="payment.created",
                    tenant_id=who.tenant_id,
                    occurred_at=now,
                    data=_payment_data(payment),
                )
            )
            await uow.commit()
        return Accepted(payment, event_job_id(payment.id, CAPTURE_JOB))

    async def find_payment(self, tenant_id: uuid.UUID, payment_id: uuid.UUID) -> Payment | None:
        async def load() -> Payment | None:
            async with self._uow() as uow:
                return await uow.payments.get(tenant_id, payment_id)

        return await self._cache.get_or_load(
            caching.payment_key(tenant_id, payment_id), Payment, load, caching.PAYMENT_TTL
        )

    async def get_payment(self, who: Principal, payment_id: uuid.UUID) -> Payment:
        payment = await self.find_payment(who.tenant_id, payment_id)
        if payment is None:
            raise PaymentNotFound
        return payment

    async def list_payments(self, who: Principal, where: PaymentFilter, page: PageRequest) -> Page[Payment]:
        if where.created_from and where.created_to and where.created_from >= where.created_to:
            raise InvalidInput("`created_from` must be before `created_to`.", pointer="#/created_from")
        async with self._uow() as uow:
            return await uow.payments.list(who.tenant_id, where, page)

    async def daily_totals(
        self, tenant_id: uuid.UUID, start: datetime, end: datetime
    ) -> tuple[list[DailyTotal], list[DailyTotal]]:
        """(payments, refunds) created in [start, end), by UTC day, currency and status; one snapshot."""
        async with self._uow() as uow:
            return (
                await uow.payments.daily_totals(tenant_id, start, end),
                await uow.refunds.daily_totals(tenant_id, start, end),
            )

    # -- refunds --------------------------------------------------------------------------------

    async def request_refund(self, who: Principal, payment_id: uuid.UUID, cmd: CreateRefund) -> Accepted[Refund]:
        async def reserve(uow: PaymentsUnitOfWork) -> Accepted[Refund] | None:
            payment = await uow.payments.get(who.tenant_id, payment_id)
            if payment is None:
                raise PaymentNotFound
            now = self._clock.now()
            reserved, amount = payment.reserve_refund(cmd.amount, now)
            if not await uow.payments.save(reserved):
                return None
            refund = Refund(
                id=new_id(),
                tenant_id=who.tenant_id,
                payment_id=payment.id,
                amount=amount,
                currency=payment.currency,
                reason=cmd.reason,
                status=RefundStatus.PENDING,
                created_at=now,
                updated_at=now,
            )
            await uow.refunds.add(refund)
            data = {**_payment_data(reserved), **_refund_data(refund)}
            uow.record(Event(id=refund.id, type="refund.created", tenant_id=who.tenant_id, occurred_at=now, data=data))
            await uow.commit()
            return Accepted(refund, event_job_id(refund.id, REFUND_JOB))

        return await self._with_retries(reserve)

    async def get_refund(self, who: Principal, payment_id: uuid.UUID, refund_id: uuid.UUID) -> Refund:
        async with self._uow() as uow:
            refund = await uow.refunds.get(who.tenant_id, refund_id)
        if refund is None or refund.payment_id != payment_id:
            raise RefundNotFound
        return refund

    async def list_refunds(self, who: Principal, payment_id: uuid.UUID, page: PageRequest) -> Page[Refund]:
        async with self._uow() as uow:
            if await uow.payments.get(who.tenant_id, payment_id) is None:
                raise PaymentNotFound
            return await uow.refunds.list(who.tenant_id, payment_id, page)

    async def _with_retries(self, attempt: Callable[[PaymentsUnitOfWork], Awaitable[T | None]]) -> T:
        """Run ``attempt`` in a fresh transaction until its version-fenced write holds (None: it lost a race)."""
        for _ in range(_SAVE_ATTEMPTS):
            async with self._uow() as uow:
                result = await attempt(uow)
            if result is not None:
                return result
        raise ConcurrentChange

    # -- jobs -----------------------------------------------------------------------------------

    async def _ask_provider(self, call: Awaitable[ProviderResult], *, final_attempt: bool) -> ProviderResult:
        try:
            return await call
        except ProviderUnavailable as exc:
            if not final_attempt:
                raise
            return ProviderResult(
                failure=Failure(
                    reason=FailureReason.PROVIDER_UNAVAILABLE,
                    message=f"The payment provider stayed unavailable: {exc}"[:500],
                )
            )

    def _other_provider(self, payment: Payment) -> ProviderResult:
        """A payment made through another provider than the configured one (the setting changed)."""
        return ProviderResult(
            failure=Failure(
                reason=FailureReason.PROVIDER_ERROR,
                message=f"The payment was made with provider {payment.provider!r}, which is not configured.",
            )
        )

    async def capture(self, tenant_id: uuid.UUID, payment_id: uuid.UUID, *, final_attempt: bool = False) -> str:
        """Charge a pending payment once; raises ``ProviderUnavailable`` for the job to retry, unless this
        is its last attempt (then the payment fails with ``provider_unavailable``)."""
        async with self._uow() as uow:
            payment = await uow.payments.get(tenant_id, payment_id)
        if payment is None:
            return "skipped: no such payment"
        if payment.status is not PaymentStatus.PENDING:
            return f"already {payment.status.value}"
        if payment.provider != self._provider.name:
            result = self._other_provider(payment)
        else:
            order = ChargeOrder(
                idempotency_key=capture_key(payment.id),
                amount=payment.amount,
                currency=payment.currency,
                payment_method=payment.payment_method,
                description=payment.description,
                customer_email=payment.customer_email,
                metadata=payment.metadata,
            )
            result = await self._ask_provider(self._provider.capture(order), final_attempt=final_attempt)

        async def settle(uow: PaymentsUnitOfWork) -> str | None:
            current = await uow.payments.get(tenant_id, payment_id)
            if current is None or current.status is not PaymentStatus.PENDING:
                return "already settled"
            now = self._clock.now()
            if result.reference is not None:
                changed, kind = current.succeed(result.reference, now), "payment.succeeded"
                data = _payment_data(changed)
            else:
                assert result.failure is not None
                changed, kind = current.fail(result.failure, now), "payment.failed"
                data = {**_payment_data(changed), **_failure_data(changed.failure_reason, changed.failure_message)}
            if not await uow.payments.save(changed):
                return None
            uow.record(Event(type=kind, tenant_id=tenant_id, occurred_at=now, data=data))
            await uow.commit()
            return changed.status.value

        return await self._with_retries(settle)

    async def refund(self, tenant_id: uuid.UUID, refund_id: uuid.UUID, *, final_attempt: bool = False) -> str:
        """Settle a pending refund with the provider (same retry contract as ``capture``)."""
        async with self._uow() as uow:
            refund = await uow.refunds.get(tenant_id, refund_id)
            payment = await uow.payments.get(tenant_id, refund.payment_id) if refund else None
        if refund is None or payment is None:
            return "skipped: no such refund"
        if refund.status is not RefundStatus.PENDING:
            return f"already {refund.status.value}"
        if payment.provider != self._provider.name:
            result = self._other_provider(payment)
        else:
            order = RefundOrder(
                idempotency_key=refund_key(refund.id),
                charge_reference=payment.provider_reference or "",
                amount=refund.amount,
                currency=refund.currency,
                reason=refund.reason,
            )
            result = await self._ask_provider(self._provider.refund(order), final_attempt=final_attempt)

        async def settle(uow: PaymentsUnitOfWork) -> str | None:
            current = await uow.refunds.get(tenant_id, refund_id)
            paid = await uow.payments.get(tenant_id, refund.payment_id)
            if current is None or paid is None or current.status is not RefundStatus.PENDING:
                return "already settled"
            now = self._clock.now()
            if result.reference is not None:
                settled = current.settled(result.reference, now)
                changed, kind = paid.settle_refund(current.amount, now), "payment.refunded"
                data = {**_payment_data(changed), **_refund_data(settled)}
            else:
                assert result.failure is not None
                settled = current.failed(result.failure, now)
                changed, kind = paid.release_refund(current.amount, now), "payment.refund_failed"
                data = {
                    **_payment_data(changed),
                    **_refund_data(settled),
                    **_failure_data(settled.failure_reason, settled.failure_message),
                }
            if not await uow.payments.save(changed):
                return None
            await uow.refunds.update(settled)
            uow.record(Event(type=kind, tenant_id=tenant_id, occurred_at=now, data=data))
            await uow.commit()
            return settled.status.value

        return await self._with_retries(settle)

    async def resume_pending(self, limit: int = 500) -> int:
        """Safety net: a payment or refund pending for long whose job is gone (lost with the queue's
        data) or over (crashed on its last attempt) gets a new job. Live jobs are left alone."""
        before = self._clock.now() - STALE_AFTER
        async with self._uow() as uow:
            payments = await uow.payments.stale_pending(before, limit)
            refunds = await uow.refunds.stale_pending(before, limit)
        work = [(CAPTURE_JOB, p.tenant_id, {"payment_id": str(p.id)}, p.id) for p in payments]
        work += [(REFUND_JOB, r.tenant_id, {"refund_id": str(r.id)}, r.id) for r in refunds]
        resumed = 0
        for name, tenant_id, args, created_event_id in work:
            job_id = event_job_id(created_event_id, name)
            job = await self._jobs.get(job_id)
            if job is not None and not job.status.is_final:
                continue
            await self._jobs.enqueue(
                name, {"tenant_id": str(tenant_id), **args}, tenant_id=tenant_id, job_id=None if job else job_id
            )
            resumed += 1
        return resumed
