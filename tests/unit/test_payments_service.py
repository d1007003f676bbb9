"""The payments use cases, driven through the in-memory fakes, a fake provider with a ledger and a
manual clock.

Jobs are recorded, not run: a test "runs" a capture or refund job by calling ``capture``/``refund``
itself, which makes retries, races and the safety net deterministic.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from keel.contexts.payments.domain.commands import CreatePayment, CreateRefund
from keel.contexts.payments.domain.errors import (
    ConcurrentChange,
    IllegalTransition,
    PaymentNotFound,
    RefundExceedsPayment,
    RefundNotFound,
    UnknownCurrency,
)
from keel.contexts.payments.domain.model import (
    FailureReason,
    Payment,
    PaymentStatus,
    ProviderUnavailable,
    Refund,
    RefundOrder,
    RefundReason,
    RefundStatus,
    capture_key,
    refund_key,
)
from keel.contexts.payments.domain.services import (
    CAPTURE_JOB,
    REFUND_JOB,
    STALE_AFTER,
    TRIGGERS,
    Accepted,
    PaymentsService,
)
from keel.contexts.payments.ports.repositories import PaymentFilter
from keel.contexts.payments.public import PUBLIC_EVENTS
from keel.platform.adapters.memory.cache import InMemoryCache
from keel.platform.cache import ReadThroughCache
from keel.platform.domain.errors import Conflict, InvalidInput
from keel.platform.domain.events import Event, event_job_id
from keel.platform.domain.ids import new_id
from keel.platform.domain.jobs import JobInfo, JobStatus
from keel.platform.domain.paging import PageRequest
from keel.platform.domain.tenancy import Principal
from tests.fakes.clock import ManualClock
from tests.fakes.payments import (
    DECLINED,
    INSUFFICIENT_FUNDS,
    SUCCEEDS,
    UNAVAILABLE_TWICE,
    FakePaymentProvider,
    InMemoryPaymentRepository,
    InMemoryPaymentsUnitOfWork,
    PaymentsState,
    payments_service,
)
from tests.fakes.webhooks import Enqueued, RecordingJobQueue

START = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def state() -> PaymentsState:
    return PaymentsState()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
def provider() -> FakePaymentProvider:
    return FakePaymentProvider()


@pytest.fixture
def jobs() -> RecordingJobQueue:
    return RecordingJobQueue()


@pytest.fixture
def service(
    state: PaymentsState, provider: FakePaymentProvider, jobs: RecordingJobQueue, clock: ManualClock
) -> PaymentsService:
    return payments_service(state, provider, jobs, clock)


def who(tenant_id: uuid.UUID | None = None) -> Principal:
    return Principal(tenant_id=tenant_id or new_id(), api_key_id=new_id())


ACME = who()
GLOBEX = who()


async def pay(
    service: PaymentsService,
    method: str = SUCCEEDS,
    *,
    amount: int = 100,
    currency: str = "EUR",
    principal: Principal = ACME,
    **extra: Any,
) -> Payment:
    accepted = await service.create_payment(
        principal, CreatePayment(amount=amount, currency=currency, payment_method=method, **extra)
    )
    return accepted.value


async def captured(service: PaymentsService, state: PaymentsState, *, amount: int = 100) -> Payment:
    p = await pay(service, amount=amount)
    assert await service.capture(p.tenant_id, p.id) == "succeeded"
    return stored(state, p.id)


def stored(state: PaymentsState, payment_id: uuid.UUID) -> Payment:
    return state.payments[payment_id]


def events(state: PaymentsState, *types: str) -> list[Event]:
    return [e for e in state.outbox if not types or e.type in types]


def only_event(state: PaymentsState, kind: str) -> Event:
    found = events(state, kind)
    assert len(found) == 1, found
    return found[0]


async def refund(
    service: PaymentsService, p: Payment, amount: int | None = None, principal: Principal = ACME, **extra: Any
) -> Accepted[Refund]:
    return await service.request_refund(principal, p.id, CreateRefund(amount=amount, **extra))


def assert_public_fields(event: Event, payment: Payment) -> None:
    """The event carries every field its public schema promises, with the payment's values."""
    assert set(PUBLIC_EVENTS[event.type]) <= set(event.data)
    assert event.data["payment_id"] == str(payment.id)
    assert event.data["amount"] == payment.amount
    assert event.data["currency"] == payment.currency
    assert event.data["status"] == payment.status.value
    assert event.data["amount_refunded"] == payment.amount_refunded
    assert event.data["description"] == payment.description
    assert event.data["customer_email"] == payment.customer_email
    assert event.data["metadata"] == dict(payment.metadata)


# -- creating payments ------------------------------------------------------------------------------


async def test_create_payment_stores_a_pending_payment_with_its_event(
    service: PaymentsService, state: PaymentsState, provider: FakePaymentProvider, jobs: RecordingJobQueue
) -> None:
    accepted = await service.create_payment(
        ACME,
        CreatePayment(
            amount=1234,
            currency="eur",
            payment_method=SUCCEEDS,
            description="Order #1",
            customer_email="Zoe@ACME.Test",
            metadata={"order": "1"},
        ),
    )
    p = accepted.value
    assert p.status is PaymentStatus.PENDING
    assert (p.amount, p.currency, p.payment_method) == (1234, "EUR", SUCCEEDS)
    assert p.customer_email == "zoe@acme.test"
    assert (p.description, dict(p.metadata)) == ("Order #1", {"order": "1"})
    assert (p.tenant_id, p.provider) == (ACME.tenant_id, "sandbox")
    assert (p.created_at, p.updated_at, p.version) == (START, START, 1)
    assert (p.amount_refunded, p.amount_refunding, p.provider_reference, p.failure_reason) == (0, 0, None, None)
    assert state.payments == {p.id: p}

    created = only_event(state, "payment.created")
    assert state.outbox == [created]
    assert created.id == p.id
    assert (created.tenant_id, created.occurred_at) == (ACME.tenant_id, START)
    assert_public_fields(created, p)
    assert created.data["status"] == "pending"

    # The job is the one the event triggers; the request path neither enqueues nor calls the provider.
    assert TRIGGERS["payment.created"] == CAPTURE_JOB
    assert accepted.job_id == event_job_id(p.id, CAPTURE_JOB) == event_job_id(created.id, TRIGGERS[created.type])
    assert jobs.jobs == []
    assert provider.calls == []


async def test_a_payment_without_customer_email_keeps_none(service: PaymentsService) -> None:
    p = await pay(service)
    assert p.customer_email is None


@pytest.mark.parametrize("currency", ["XAU", "XDR", "ABC", "euro", ""])
async def test_an_unknown_currency_is_refused_and_nothing_is_stored(
    service: PaymentsService, state: PaymentsState, currency: str
) -> None:
    with pytest.raises(UnknownCurrency) as caught:
        await pay(service, currency=currency)
    assert caught.value.pointer == "#/currency"
    assert isinstance(caught.value, InvalidInput)
    assert state.payments == {}
    assert state.outbox == []


# -- capture ----------------------------------------------------------------------------------------


async def test_capture_charges_the_payment_and_records_it_succeeded(
    service: PaymentsService, state: PaymentsState, provider: FakePaymentProvider, clock: ManualClock
) -> None:
    p = await pay(service, amount=2500, description="Order #2", customer_email="zoe@acme.test", metadata={"k": "v"})
    clock.advance(seconds=5)
    assert await service.capture(ACME.tenant_id, p.id) == "succeeded"

    charge = provider.ledger[capture_key(p.id)]
    assert (charge.kind, charge.amount, charge.currency) == ("charge", 2500, "EUR")
    done = stored(state, p.id)
    assert done.status is PaymentStatus.SUCCEEDED
    assert done.provider_reference == charge.result.reference is not None
    assert (done.updated_at, done.version) == (START + timedelta(seconds=5), 2)

    ok = only_event(state, "payment.succeeded")
    assert (ok.tenant_id, ok.occurred_at) == (ACME.tenant_id, START + timedelta(seconds=5))
    assert ok.id != p.id
    assert_public_fields(ok, done)
    assert ok.data["status"] == "succeeded"
    assert ok.data["provider_reference"] == done.provider_reference
    assert [e.type for e in state.outbox] == ["payment.created", "payment.succeeded"]


@pytest.mark.parametrize(
    ("method", "reason", "message"),
    [
        (DECLINED, FailureReason.CARD_DECLINED, "Your card was declined."),
        (INSUFFICIENT_FUNDS, FailureReason.INSUFFICIENT_FUNDS, "Your card has insufficient funds."),
        ("card_4242", FailureReason.INVALID_PAYMENT_METHOD, "No such payment method."),
    ],
)
async def test_a_refused_charge_fails_the_payment_with_the_reason(
    service: PaymentsService,
    state: PaymentsState,
    provider: FakePaymentProvider,
    method: str,
    reason: FailureReason,
    message: str,
) -> None:
    p = await pay(service, method)
    assert await service.capture(ACME.tenant_id, p.id) == "failed"
    failed = stored(state, p.id)
    assert failed.status is PaymentStatus.FAILED
    assert (failed.failure_reason, failed.failure_message) == (reason, message)
    assert failed.provider_reference is None
    assert provider.charges() == []

    event = only_event(state, "payment.failed")
    assert_public_fields(event, failed)
    assert (event.data["failure_reason"], event.data["failure_message"]) == (reason.value, message)
    assert events(state, "payment.succeeded") == []


async def test_an_outage_is_raised_for_the_job_to_retry_and_changes_nothing(
    service: PaymentsService, state: PaymentsState, provider: FakePaymentProvider
) -> None:
    p = await pay(service)
    provider.outages = 1
    with pytest.raises(ProviderUnavailable):
        await service.capture(ACME.tenant_id, p.id)
    assert stored(state, p.id) == p
    assert [e.type for e in state.outbox] == ["payment.created"]
    # The retry succeeds.
    assert await service.capture(ACME.tenant_id, p.id) == "succeeded"
    assert len(provider.charges()) == 1


async def test_an_outage_on_the_final_attempt_fails_the_payment(
    service: PaymentsService, state: PaymentsState, provider: FakePaymentProvider
) -> None:
    p = await pay(service)
    provider.outages = 1
    assert await service.capture(ACME.tenant_id, p.id, final_attempt=True) == "failed"
    failed = stored(state, p.id)
    assert failed.status is PaymentStatus.FAILED
    assert failed.failure_reason is FailureReason.PROVIDER_UNAVAILABLE
    assert failed.failure_message == "The payment provider stayed unavailable: scripted outage"
    event = only_event(state, "payment.failed")
    assert event.data["failure_reason"] == "provider_unavailable"
    assert provider.charges() == []


async def test_final_attempt_changes_nothing_when_the_provider_answers(
    service: PaymentsService, state: PaymentsState
) -> None:
    p = await pay(service)
    assert await service.capture(ACME.tenant_id, p.id, final_attempt=True) == "succeeded"
    assert stored(state, p.id).status is PaymentStatus.SUCCEEDED


async def test_retried_captures_use_one_idempotency_key_and_charge_once(
    service: PaymentsService, state: PaymentsState, provider: FakePaymentProvider
) -> None:
    p = await pay(service, UNAVAILABLE_TWICE)
    for _ in range(2):
        with pytest.raises(ProviderUnavailable):
            await service.capture(ACME.tenant_id, p.id)
    assert stored(state, p.id).status is PaymentStatus.PENDING
    assert await service.capture(ACME.tenant_id, p.id) == "succeeded"
    assert provider.calls == [capture_key(p.id)] * 3
    assert len(provider.charges()) == 1
    assert len(events(state, "payment.succeeded")) == 1


async def test_capturing_twice_charges_once_and_records_one_event(
    service: PaymentsService, state: PaymentsState, provider: FakePaymentProvider
) -> None:
    p = await pay(service)
    assert await service.capture(ACME.tenant_id, p.id) == "succeeded"
    after_first = stored(state, p.id)
    assert await service.capture(ACME.tenant_id, p.id) == "already succeeded"
    assert stored(state, p.id) == after_first
    assert provider.calls == [capture_key(p.id)]
    assert len(provider.charges()) == 1
    assert len(events(state, "payment.succeeded")) == 1

    failed = await pay(service, DECLINED)
    await service.capture(ACME.tenant_id, failed.id)
    assert await service.capture(ACME.tenant_id, failed.id) == "already failed"
    assert len(events(state, "payment.failed")) == 1


async def test_capture_of_an_unknown_or_foreign_payment_is_skipped(
    service: PaymentsService, provider: FakePaymentProvider, state: PaymentsState
) -> None:
    p = await pay(service)
    assert await service.capture(GLOBEX.tenant_id, p.id) == "skipped: no such payment"
    assert await service.capture(ACME.tenant_id, new_id()) == "skipped: no such payment"
    assert provider.calls == []
    assert stored(state, p.id).status is PaymentStatus.PENDING


async def test_a_payment_created_for_another_provider_fails_without_calling_this_one(
    service: PaymentsService, state: PaymentsState, jobs: RecordingJobQueue, clock: ManualClock
) -> None:
    p = await pay(service)
    assert p.provider == "sandbox"
    stripe = FakePaymentProvider("stripe")
    switched = payments_service(state, stripe, jobs, clock)
    assert await switched.capture(ACME.tenant_id, p.id) == "failed"
    failed = stored(state, p.id)
    assert failed.failure_reason is FailureReason.PROVIDER_ERROR
    assert "'sandbox'" in (failed.failure_message or "")
    assert stripe.calls == []
    assert only_event(state, "payment.failed").data["failure_reason"] == "provider_error"


# -- reading payments -------------------------------------------------------------------------------


async def test_get_payment_is_tenant_scoped(service: PaymentsService) -> None:
    p = await pay(service)
    assert await service.get_payment(ACME, p.id) == p
    with pytest.raises(PaymentNotFound):
        await service.get_payment(GLOBEX, p.id)
    with pytest.raises(PaymentNotFound):
        await service.get_payment(ACME, new_id())


async def test_get_payment_is_served_from_the_cache_after_the_first_read(
    service: PaymentsService, state: PaymentsState
) -> None:
    p = await pay(service)
    # Nothing is cached before the first read: it sees the stored row.
    first_version = replace(p, description="first")
    state.payments[p.id] = first_version
    assert await service.get_payment(ACME, p.id) == first_version
    # A change behind the service's back (no event, so no invalidation) is not seen: the read is cached.
    state.payments[p.id] = replace(p, description="second")
    assert await service.get_payment(ACME, p.id) == first_version
    # A miss is not cached: a payment that appears later is found.
    missing = await pay(service, principal=GLOBEX)
    del state.payments[missing.id]
    with pytest.raises(PaymentNotFound):
        await service.get_payment(GLOBEX, missing.id)
    state.payments[missing.id] = missing
    assert await service.get_payment(GLOBEX, missing.id) == missing


async def test_list_payments_pages_newest_first(service: PaymentsService, clock: ManualClock) -> None:
    created = []
    for _ in range(5):
        created.append(await pay(service))
        clock.advance(minutes=1)
    await pay(service, principal=GLOBEX)
    first = await service.list_payments(ACME, PaymentFilter(), PageRequest(limit=2))
    second = await service.list_payments(ACME, PaymentFilter(), PageRequest(limit=2, after=first.next_after))
    third = await service.list_payments(ACME, PaymentFilter(), PageRequest(limit=2, after=second.next_after))
    assert [p.id for p in [*first.items, *second.items, *third.items]] == [p.id for p in reversed(created)]
    assert (len(third.items), third.next_after) == (1, None)
    assert first.next_after == created[3].id


async def test_list_payments_filters_by_status_and_creation_time(service: PaymentsService, clock: ManualClock) -> None:
    ok_early = await pay(service)
    await service.capture(ACME.tenant_id, ok_early.id)
    clock.advance(minutes=1)
    declined = await pay(service, DECLINED)
    await service.capture(ACME.tenant_id, declined.id)
    clock.advance(minutes=1)
    ok_late = await pay(service)
    await service.capture(ACME.tenant_id, ok_late.id)
    clock.advance(minutes=1)
    pending = await pay(service)

    async def ids(where: PaymentFilter) -> list[uuid.UUID]:
        return [p.id for p in (await service.list_payments(ACME, where, PageRequest())).items]

    assert await ids(PaymentFilter(status=PaymentStatus.SUCCEEDED)) == [ok_late.id, ok_early.id]
    assert await ids(PaymentFilter(status=PaymentStatus.FAILED)) == [declined.id]
    assert await ids(PaymentFilter(status=PaymentStatus.PENDING)) == [pending.id]
    assert await ids(PaymentFilter(status=PaymentStatus.REFUNDED)) == []
    # created_from is inclusive, created_to exclusive.
    one = timedelta(minutes=1)
    assert await ids(PaymentFilter(created_from=START + one)) == [pending.id, ok_late.id, declined.id]
    assert await ids(PaymentFilter(created_to=START + one)) == [ok_early.id]
    assert await ids(PaymentFilter(created_from=START + one, created_to=START + 3 * one)) == [ok_late.id, declined.id]
    assert await ids(PaymentFilter(status=PaymentStatus.SUCCEEDED, created_from=START + one)) == [ok_late.id]
    assert (await service.list_payments(GLOBEX, PaymentFilter(), PageRequest())).items == []


@pytest.mark.parametrize("gap", [timedelta(0), timedelta(seconds=-1)])
async def test_list_payments_refuses_an_empty_or_reversed_range(service: PaymentsService, gap: timedelta) -> None:
    with pytest.raises(InvalidInput) as caught:
        await service.list_payments(ACME, PaymentFilter(created_from=START, created_to=START + gap), PageRequest())
    assert caught.value.pointer == "#/created_from"


# -- requesting refunds -----------------------------------------------------------------------------


async def test_a_partial_refund_is_reserved_and_stored_with_its_event(
    service: PaymentsService, state: PaymentsState, clock: ManualClock, provider: FakePaymentProvider
) -> None:
    p = await captured(service, state)
    clock.advance(minutes=1)
    accepted = await refund(service, p, 30, reason=RefundReason.DUPLICATE)
    r = accepted.value
    assert (r.amount, r.currency, r.reason, r.status) == (30, "EUR", RefundReason.DUPLICATE, RefundStatus.PENDING)
    assert (r.payment_id, r.tenant_id, r.created_at) == (p.id, ACME.tenant_id, START + timedelta(minutes=1))
    assert state.refunds == {r.id: r}
    reserved = stored(state, p.id)
    assert (reserved.amount_refunding, reserved.amount_refunded, reserved.refundable) == (30, 0, 70)
    assert reserved.status is PaymentStatus.SUCCEEDED
    assert reserved.version == p.version + 1

    created = only_event(state, "refund.created")
    assert created.id == r.id
    assert created.data["refund_id"] == str(r.id)
    assert created.data["refund_amount"] == 30
    assert created.data["refund_reason"] == "duplicate"
    assert created.data["payment_id"] == str(p.id)
    assert TRIGGERS["refund.created"] == REFUND_JOB
    assert accepted.job_id == event_job_id(r.id, REFUND_JOB)
    assert provider.calls == [capture_key(p.id)]  # the request path does not call the provider


async def test_a_refund_without_amount_takes_everything_left(service: PaymentsService, state: PaymentsState) -> None:
    p = await captured(service, state)
    await refund(service, p, 30)
    rest = (await refund(service, p)).value
    assert rest.amount == 70
    assert rest.reason is None
    assert stored(state, p.id).refundable == 0
    with pytest.raises(RefundExceedsPayment, match="Nothing is left"):
        await refund(service, p)


async def test_an_over_refund_is_refused_and_nothing_is_stored(service: PaymentsService, state: PaymentsState) -> None:
    p = await captured(service, state)
    before = list(state.outbox)
    with pytest.raises(RefundExceedsPayment) as caught:
        await refund(service, p, 101)
    assert caught.value.detail == "A refund of 101 exceeds what is left to refund (100, in minor units)."
    assert state.refunds == {}
    assert stored(state, p.id) == p
    assert state.outbox == before


async def test_refunds_in_flight_are_reserved(service: PaymentsService, state: PaymentsState) -> None:
    p = await captured(service, state)
    await refund(service, p, 60)
    with pytest.raises(RefundExceedsPayment) as caught:
        await refund(service, p, 60)
    assert isinstance(caught.value, Conflict)
    assert caught.value.code == "refund-exceeds-payment"
    assert len(state.refunds) == 1
    assert stored(state, p.id).amount_refunding == 60
    assert (await refund(service, p, 40)).value.amount == 40


@pytest.mark.parametrize("method", [SUCCEEDS, DECLINED])
async def test_a_payment_not_captured_cannot_be_refunded(
    service: PaymentsService, state: PaymentsState, method: str
) -> None:
    p = await pay(service, method)
    if method == DECLINED:
        await service.capture(ACME.tenant_id, p.id)
    with pytest.raises(IllegalTransition) as caught:
        await refund(service, p, 10)
    assert caught.value.code == "payment-state-conflict"
    assert state.refunds == {}
    assert events(state, "refund.created") == []


async def test_refunds_are_tenant_scoped(service: PaymentsService, state: PaymentsState) -> None:
    p = await captured(service, state)
    with pytest.raises(PaymentNotFound):
        await refund(service, p, 10, principal=GLOBEX)
    with pytest.raises(PaymentNotFound):
        await service.request_refund(ACME, new_id(), CreateRefund(amount=10))
    assert state.refunds == {}
    r = (await refund(service, p, 10)).value
    with pytest.raises(RefundNotFound):
        await service.get_refund(GLOBEX, p.id, r.id)
    with pytest.raises(RefundNotFound):
        await service.get_refund(ACME, new_id(), r.id)
    with pytest.raises(PaymentNotFound):
        await service.list_refunds(GLOBEX, p.id, PageRequest())
    assert await service.get_refund(ACME, p.id, r.id) == r


async def test_list_refunds_is_newest_first(service: PaymentsService, state: PaymentsState) -> None:
    p = await captured(service, state)
    made = [(await refund(service, p, 10)).value for _ in range(3)]
    page = await service.list_refunds(ACME, p.id, PageRequest(limit=2))
    rest = await service.list_refunds(ACME, p.id, PageRequest(limit=2, after=page.next_after))
    assert [r.id for r in [*page.items, *rest.items]] == [r.id for r in reversed(made)]
    assert rest.next_after is None


# -- the refund job ---------------------------------------------------------------------------------


async def test_the_refund_job_settles_partial_then_full_refunds(
    service: PaymentsService, state: PaymentsState, provider: FakePaymentProvider, clock: ManualClock
) -> None:
    p = await captured(service, state)
    first = (await refund(service, p, 40, reason=RefundReason.REQUESTED_BY_CUSTOMER)).value
    clock.advance(minutes=2)
    assert await service.refund(ACME.tenant_id, first.id) == "succeeded"

    settled = state.refunds[first.id]
    assert settled.status is RefundStatus.SUCCEEDED
    assert settled.provider_reference == provider.ledger[refund_key(first.id)].result.reference is not None
    assert settled.updated_at == START + timedelta(minutes=2)
    assert provider.ledger[refund_key(first.id)].charge_reference == p.provider_reference
    partly = stored(state, p.id)
    assert partly.status is PaymentStatus.PARTIALLY_REFUNDED
    assert (partly.amount_refunded, partly.amount_refunding, partly.refundable) == (40, 0, 60)

    event = only_event(state, "payment.refunded")
    assert_public_fields(event, partly)
    assert event.data["status"] == "partially_refunded"
    assert event.data["refund_id"] == str(first.id)
    assert event.data["refund_amount"] == 40
    assert event.data["amount_refunded"] == 40
    assert event.data["refund_status"] == "succeeded"
    assert event.data["refund_reason"] == "requested_by_customer"

    rest = (await refund(service, p)).value
    assert await service.refund(ACME.tenant_id, rest.id) == "succeeded"
    full = stored(state, p.id)
    assert full.status is PaymentStatus.REFUNDED
    assert (full.amount_refunded, full.amount_refunding, full.refundable) == (100, 0, 0)
    last = events(state, "payment.refunded")[-1]
    assert (last.data["refund_id"], last.data["refund_amount"], last.data["amount_refunded"]) == (str(rest.id), 60, 100)
    assert last.data["status"] == "refunded"
    with pytest.raises(IllegalTransition):
        await refund(service, p, 1)


async def test_a_rejected_refund_fails_and_releases_its_reservation(
    service: PaymentsService, state: PaymentsState, provider: FakePaymentProvider
) -> None:
    p = await captured(service, state)
    # 80 was refunded at the provider directly (its dashboard, say): a refund of 50 more is rejected.
    assert p.provider_reference is not None
    outside = RefundOrder(
        idempotency_key="dashboard-1", charge_reference=p.provider_reference, amount=80, currency="EUR"
    )
    assert (await provider.refund(outside)).reference is not None
    r = (await refund(service, p, 50)).value
    assert stored(state, p.id).refundable == 50
    assert await service.refund(ACME.tenant_id, r.id) == "failed"

    failed = state.refunds[r.id]
    assert failed.status is RefundStatus.FAILED
    assert failed.failure_reason is FailureReason.REFUND_REJECTED
    assert failed.failure_message == "The refund exceeds the charge."
    released = stored(state, p.id)
    assert released.status is PaymentStatus.SUCCEEDED
    assert (released.amount_refunded, released.amount_refunding, released.refundable) == (0, 0, 100)

    event = only_event(state, "payment.refund_failed")
    assert set(PUBLIC_EVENTS["payment.refund_failed"]) <= set(event.data)
    assert (event.data["refund_id"], event.data["refund_amount"], event.data["refund_status"]) == (
        str(r.id),
        50,
        "failed",
    )
    assert event.data["failure_reason"] == "refund_rejected"
    assert event.data["amount_refunded"] == 0
    assert events(state, "payment.refunded") == []
    assert await service.refund(ACME.tenant_id, r.id) == "already failed"


async def test_an_outage_during_a_refund_is_retried_then_recorded_on_the_final_attempt(
    service: PaymentsService, state: PaymentsState, provider: FakePaymentProvider
) -> None:
    p = await captured(service, state)
    r = (await refund(service, p, 30)).value
    provider.outages = 1
    with pytest.raises(ProviderUnavailable):
        await service.refund(ACME.tenant_id, r.id)
    assert state.refunds[r.id] == r
    assert stored(state, p.id).amount_refunding == 30
    provider.outages = 1
    assert await service.refund(ACME.tenant_id, r.id, final_attempt=True) == "failed"
    assert state.refunds[r.id].failure_reason is FailureReason.PROVIDER_UNAVAILABLE
    assert stored(state, p.id).refundable == 100
    assert only_event(state, "payment.refund_failed").data["failure_reason"] == "provider_unavailable"


async def test_the_refund_job_is_idempotent(
    service: PaymentsService, state: PaymentsState, provider: FakePaymentProvider
) -> None:
    p = await captured(service, state)
    r = (await refund(service, p, 30)).value
    assert await service.refund(ACME.tenant_id, r.id) == "succeeded"
    assert await service.refund(ACME.tenant_id, r.id) == "already succeeded"
    refunds_at_provider = [e for e in provider.ledger.values() if e.kind == "refund"]
    assert len(refunds_at_provider) == 1
    assert provider.calls.count(refund_key(r.id)) == 1
    assert stored(state, p.id).amount_refunded == 30
    assert len(events(state, "payment.refunded")) == 1


async def test_the_refund_job_skips_unknown_and_foreign_refunds(
    service: PaymentsService, state: PaymentsState, provider: FakePaymentProvider
) -> None:
    p = await captured(service, state)
    r = (await refund(service, p, 30)).value
    assert await service.refund(GLOBEX.tenant_id, r.id) == "skipped: no such refund"
    assert await service.refund(ACME.tenant_id, new_id()) == "skipped: no such refund"
    assert provider.calls == [capture_key(p.id)]


# -- races: the version-fenced write is retried -----------------------------------------------------


@dataclass
class Race:
    """The next ``conflicts`` saves find that another writer changed the payment first."""

    conflicts: int
    interfere: Callable[[Payment], Payment] = lambda p: replace(p, version=p.version + 1)
    saves: int = 0


class RacingPayments:
    """The staged payment repository, with another writer slipping in before the next saves: it
    changes the committed row (as a concurrent transaction would), and this save loses."""

    def __init__(self, inner: InMemoryPaymentRepository, committed: PaymentsState, race: Race) -> None:
        self._inner = inner
        self._committed = committed
        self._race = race

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def save(self, payment: Payment) -> bool:
        self._race.saves += 1
        if self._race.conflicts > 0:
            self._race.conflicts -= 1
            self._committed.payments[payment.id] = self._race.interfere(self._committed.payments[payment.id])
            return False
        return await self._inner.save(payment)


class RacingUnitOfWork(InMemoryPaymentsUnitOfWork):
    def __init__(self, state: PaymentsState, race: Race) -> None:
        super().__init__(state)
        self._race = race

    def _bind(self, staged: PaymentsState) -> None:
        super()._bind(staged)
        self.payments = RacingPayments(self.payments, self._committed, self._race)  # type: ignore[assignment]


def racing_service(
    state: PaymentsState, provider: FakePaymentProvider, jobs: RecordingJobQueue, clock: ManualClock, race: Race
) -> PaymentsService:
    return PaymentsService(
        lambda: RacingUnitOfWork(state, race), provider, jobs, clock, ReadThroughCache(InMemoryCache(clock))
    )


async def test_a_refund_request_that_loses_a_race_is_retried_on_the_new_state(
    service: PaymentsService,
    state: PaymentsState,
    provider: FakePaymentProvider,
    jobs: RecordingJobQueue,
    clock: ManualClock,
) -> None:
    p = await captured(service, state)
    # Another request reserves 30 between our read and our write.
    race = Race(conflicts=1, interfere=lambda q: q.reserve_refund(30, q.updated_at)[0])
    racing = racing_service(state, provider, jobs, clock, race)
    r = (await refund(racing, p, 60)).value
    assert race.saves == 2
    assert r.amount == 60
    assert list(state.refunds) == [r.id]
    now = stored(state, p.id)
    assert (now.amount_refunding, now.refundable, now.version) == (90, 10, p.version + 2)
    assert len(events(state, "refund.created")) == 1


async def test_a_retried_refund_request_sees_what_the_other_writer_reserved(
    service: PaymentsService,
    state: PaymentsState,
    provider: FakePaymentProvider,
    jobs: RecordingJobQueue,
    clock: ManualClock,
) -> None:
    p = await captured(service, state)
    race = Race(conflicts=1, interfere=lambda q: q.reserve_refund(30, q.updated_at)[0])
    racing = racing_service(state, provider, jobs, clock, race)
    with pytest.raises(RefundExceedsPayment):
        await refund(racing, p, 80)
    assert state.refunds == {}
    assert stored(state, p.id).amount_refunding == 30


async def test_four_conflicts_in_a_row_are_survived(
    service: PaymentsService,
    state: PaymentsState,
    provider: FakePaymentProvider,
    jobs: RecordingJobQueue,
    clock: ManualClock,
) -> None:
    p = await captured(service, state)
    race = Race(conflicts=4)
    r = (await refund(racing_service(state, provider, jobs, clock, race), p, 10)).value
    assert race.saves == 5
    assert state.refunds == {r.id: r}


async def test_five_conflicts_in_a_row_raise_concurrent_change_and_store_nothing(
    service: PaymentsService,
    state: PaymentsState,
    provider: FakePaymentProvider,
    jobs: RecordingJobQueue,
    clock: ManualClock,
) -> None:
    p = await captured(service, state)
    before = list(state.outbox)
    race = Race(conflicts=5)
    with pytest.raises(ConcurrentChange) as caught:
        await refund(racing_service(state, provider, jobs, clock, race), p, 10)
    assert isinstance(caught.value, Conflict)
    assert race.saves == 5
    assert state.refunds == {}
    assert state.outbox == before
    assert stored(state, p.id).amount_refunding == 0


async def test_a_capture_that_loses_a_race_is_settled_once_with_one_charge(
    state: PaymentsState, provider: FakePaymentProvider, jobs: RecordingJobQueue, clock: ManualClock
) -> None:
    race = Race(conflicts=1)
    racing = racing_service(state, provider, jobs, clock, race)
    p = await pay(racing)
    assert await racing.capture(ACME.tenant_id, p.id) == "succeeded"
    assert race.saves == 2
    assert stored(state, p.id).status is PaymentStatus.SUCCEEDED
    assert provider.calls == [capture_key(p.id)]
    assert len(events(state, "payment.succeeded")) == 1


async def test_a_capture_whose_write_is_lost_is_the_same_charge_when_retried(
    state: PaymentsState, provider: FakePaymentProvider, jobs: RecordingJobQueue, clock: ManualClock
) -> None:
    race = Race(conflicts=5)
    racing = racing_service(state, provider, jobs, clock, race)
    p = await pay(racing)
    with pytest.raises(ConcurrentChange):
        await racing.capture(ACME.tenant_id, p.id)
    assert stored(state, p.id).status is PaymentStatus.PENDING
    assert events(state, "payment.succeeded") == []
    # The job's retry asks the provider again with the same key and gets the same charge.
    assert await racing.capture(ACME.tenant_id, p.id) == "succeeded"
    assert provider.calls == [capture_key(p.id)] * 2
    assert len(provider.charges()) == 1
    assert stored(state, p.id).provider_reference == provider.charges()[0].result.reference


async def test_a_refund_job_that_loses_a_race_is_settled_once(
    service: PaymentsService,
    state: PaymentsState,
    provider: FakePaymentProvider,
    jobs: RecordingJobQueue,
    clock: ManualClock,
) -> None:
    p = await captured(service, state)
    r = (await refund(service, p, 30)).value
    race = Race(conflicts=1)
    assert await racing_service(state, provider, jobs, clock, race).refund(ACME.tenant_id, r.id) == "succeeded"
    assert race.saves == 2
    assert state.refunds[r.id].status is RefundStatus.SUCCEEDED
    assert stored(state, p.id).amount_refunded == 30
    assert provider.calls.count(refund_key(r.id)) == 1
    assert len(events(state, "payment.refunded")) == 1


# -- the safety net ---------------------------------------------------------------------------------


class FinishedJobQueue(RecordingJobQueue):
    """Reports every known job as over (it failed on its last attempt)."""

    async def get(self, job_id: str) -> JobInfo | None:
        info = await super().get(job_id)
        return replace(info, status=JobStatus.FAILED) if info is not None else None


async def test_a_stale_pending_payment_with_no_job_gets_its_job_back(
    service: PaymentsService, jobs: RecordingJobQueue, clock: ManualClock
) -> None:
    p = await pay(service)
    clock.advance(minutes=11)
    assert await service.resume_pending() == 1
    assert jobs.jobs == [
        Enqueued(
            id=event_job_id(p.id, CAPTURE_JOB),
            name=CAPTURE_JOB,
            args={"tenant_id": str(ACME.tenant_id), "payment_id": str(p.id)},
            tenant_id=ACME.tenant_id,
            delay=0.0,
        )
    ]
    # The job is now known and live: the next scan leaves it alone.
    assert await service.resume_pending() == 0
    assert len(jobs.jobs) == 1
    # The resumed job's arguments are enough to run it.
    job = jobs.jobs[0]
    assert await service.capture(uuid.UUID(job.args["tenant_id"]), uuid.UUID(job.args["payment_id"])) == "succeeded"
    assert await service.resume_pending() == 0


async def test_a_pending_payment_whose_job_is_live_is_left_alone(
    service: PaymentsService, jobs: RecordingJobQueue, clock: ManualClock
) -> None:
    accepted = await service.create_payment(ACME, CreatePayment(amount=100, currency="EUR", payment_method=SUCCEEDS))
    # What the outbox does with the payment.created event.
    await jobs.enqueue(CAPTURE_JOB, {}, tenant_id=ACME.tenant_id, job_id=accepted.job_id)
    clock.advance(hours=2)
    assert await service.resume_pending() == 0
    assert [j.id for j in jobs.jobs] == [accepted.job_id]


async def test_fresh_and_settled_payments_are_not_resumed(
    service: PaymentsService, jobs: RecordingJobQueue, clock: ManualClock
) -> None:
    p = await pay(service)
    done = await pay(service)
    await service.capture(ACME.tenant_id, done.id)
    declined = await pay(service, DECLINED)
    await service.capture(ACME.tenant_id, declined.id)
    clock.advance(seconds=STALE_AFTER.total_seconds())
    assert await service.resume_pending() == 0  # exactly STALE_AFTER old is not stale yet
    clock.advance(seconds=1)
    assert await service.resume_pending() == 1
    assert [j.args["payment_id"] for j in jobs.jobs] == [str(p.id)]


async def test_a_stale_pending_refund_gets_its_job_back(
    service: PaymentsService, state: PaymentsState, jobs: RecordingJobQueue, clock: ManualClock
) -> None:
    p = await captured(service, state)
    r = (await refund(service, p, 30)).value
    clock.advance(minutes=5)
    assert await service.resume_pending() == 0
    clock.advance(minutes=6)
    assert await service.resume_pending() == 1
    assert jobs.jobs == [
        Enqueued(
            id=event_job_id(r.id, REFUND_JOB),
            name=REFUND_JOB,
            args={"tenant_id": str(ACME.tenant_id), "refund_id": str(r.id)},
            tenant_id=ACME.tenant_id,
            delay=0.0,
        )
    ]
    assert await service.resume_pending() == 0


@pytest.mark.parametrize("kind", ["payment", "refund"])
async def test_a_pending_item_whose_job_is_over_gets_a_new_job(
    state: PaymentsState, provider: FakePaymentProvider, clock: ManualClock, kind: str
) -> None:
    jobs = FinishedJobQueue()
    service = payments_service(state, provider, jobs, clock)
    if kind == "payment":
        target = await pay(service)
        name, key, derived = CAPTURE_JOB, "payment_id", event_job_id(target.id, CAPTURE_JOB)
    else:
        target_payment = await captured(service, state)
        target = (await refund(service, target_payment, 30)).value  # type: ignore[assignment]
        name, key, derived = REFUND_JOB, "refund_id", event_job_id(target.id, REFUND_JOB)
    # The triggered job ran and crashed on its last attempt.
    await jobs.enqueue(name, {}, tenant_id=ACME.tenant_id, job_id=derived)
    clock.advance(minutes=11)
    assert await service.resume_pending() == 1
    assert len(jobs.jobs) == 2
    fresh = jobs.jobs[1]
    assert fresh.id != derived
    assert fresh.name == name
    assert fresh.args == {"tenant_id": str(ACME.tenant_id), key: str(target.id)}
    assert fresh.tenant_id == ACME.tenant_id
