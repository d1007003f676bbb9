"""The payments job functions, called directly as a worker would: the two argument shapes (the
triggering event, or the safety net's plain ids), and a provider outage as a retryable job failure
until the last attempt, which records it on the payment instead."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import pytest

from keel.contexts.payments.adapters.jobs import PERIODIC, PROVIDER_RETRY, job_specs
from keel.contexts.payments.domain.commands import CreatePayment, CreateRefund
from keel.contexts.payments.domain.model import FailureReason, Payment, PaymentStatus, RefundStatus
from keel.contexts.payments.domain.services import (
    CAPTURE_JOB,
    REFUND_JOB,
    RESUME_JOB,
    STALE_AFTER,
    PaymentsService,
)
from keel.platform.domain.events import Event, event_to_args
from keel.platform.domain.ids import new_id
from keel.platform.domain.jobs import JobFailed
from keel.platform.domain.tenancy import Principal
from keel.platform.ports.jobs import JobArgs, JobHandler, JobSpec
from tests.fakes.clock import ManualClock
from tests.fakes.payments import (
    DECLINED,
    SUCCEEDS,
    UNAVAILABLE_TWICE,
    FakePaymentProvider,
    PaymentsState,
    payments_service,
)
from tests.fakes.webhooks import RecordingJobQueue

ACME = Principal(tenant_id=new_id(), api_key_id=new_id())
LAST_ATTEMPT = PROVIDER_RETRY.retries + 1


@dataclass
class Ctx:
    """The smallest JobContext: who the job is and which attempt this is."""

    attempt: int = 1
    job_id: str = "job-1"
    progress: list[int] = field(default_factory=list)

    async def set_progress(self, percent: int) -> None:
        self.progress.append(percent)


@pytest.fixture
def state() -> PaymentsState:
    return PaymentsState()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


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


@pytest.fixture
def specs(service: PaymentsService) -> dict[str, JobSpec]:
    return {s.name: s for s in job_specs(service)}


def handler(specs: dict[str, JobSpec], name: str) -> JobHandler:
    return specs[name].handler


def last_event(state: PaymentsState, kind: str) -> Event:
    found = [e for e in state.outbox if e.type == kind]
    assert found, f"no {kind} event"
    return found[-1]


async def pay(service: PaymentsService, method: str = SUCCEEDS) -> Payment:
    return (await service.create_payment(ACME, CreatePayment(amount=100, currency="EUR", payment_method=method))).value


def capture_args(state: PaymentsState, p: Payment, shape: str) -> JobArgs:
    if shape == "event":
        created = next(e for e in state.outbox if e.type == "payment.created" and e.id == p.id)
        return {"event": event_to_args(created)}
    return {"tenant_id": str(p.tenant_id), "payment_id": str(p.id)}


def test_job_specs_cover_capture_refund_and_the_safety_net(specs: dict[str, JobSpec]) -> None:
    assert set(specs) == {CAPTURE_JOB, REFUND_JOB, RESUME_JOB}
    assert specs[CAPTURE_JOB].retry == PROVIDER_RETRY
    assert specs[REFUND_JOB].retry == PROVIDER_RETRY
    assert PROVIDER_RETRY.retries >= 1


def test_the_safety_net_runs_periodically_and_more_often_than_work_goes_stale() -> None:
    resume = [p for p in PERIODIC if p.name == RESUME_JOB]
    assert len(resume) == 1
    assert 0 < resume[0].every <= STALE_AFTER.total_seconds()


@pytest.mark.parametrize("shape", ["event", "ids"])
async def test_capture_job_settles_the_payment_from_either_argument_shape(
    specs: dict[str, JobSpec], service: PaymentsService, state: PaymentsState, shape: str
) -> None:
    p = await pay(service)
    result = await handler(specs, CAPTURE_JOB)(Ctx(), capture_args(state, p, shape))
    assert result == {"outcome": "succeeded"}
    assert state.payments[p.id].status is PaymentStatus.SUCCEEDED
    # A duplicate run is harmless.
    assert await handler(specs, CAPTURE_JOB)(Ctx(), capture_args(state, p, shape)) == {"outcome": "already succeeded"}


async def test_capture_job_reports_a_declined_card_as_an_outcome_not_a_failure(
    specs: dict[str, JobSpec], service: PaymentsService, state: PaymentsState
) -> None:
    p = await pay(service, DECLINED)
    assert await handler(specs, CAPTURE_JOB)(Ctx(), capture_args(state, p, "event")) == {"outcome": "failed"}
    assert state.payments[p.id].failure_reason is FailureReason.CARD_DECLINED


@pytest.mark.parametrize("shape", ["event", "ids"])
async def test_refund_job_settles_the_refund_from_either_argument_shape(
    specs: dict[str, JobSpec], service: PaymentsService, state: PaymentsState, shape: str
) -> None:
    p = await pay(service)
    await service.capture(ACME.tenant_id, p.id)
    r = (await service.request_refund(ACME, p.id, CreateRefund(amount=40))).value
    if shape == "event":
        created = last_event(state, "refund.created")
        assert created.id == r.id
        args: JobArgs = {"event": event_to_args(created)}
    else:
        args = {"tenant_id": str(ACME.tenant_id), "refund_id": str(r.id)}
    assert await handler(specs, REFUND_JOB)(Ctx(), args) == {"outcome": "succeeded"}
    assert state.refunds[r.id].status is RefundStatus.SUCCEEDED
    assert state.payments[p.id].status is PaymentStatus.PARTIALLY_REFUNDED


@pytest.mark.parametrize("attempt", range(1, LAST_ATTEMPT))
async def test_an_outage_is_a_retryable_job_failure_before_the_last_attempt(
    specs: dict[str, JobSpec],
    service: PaymentsService,
    state: PaymentsState,
    provider: FakePaymentProvider,
    attempt: int,
) -> None:
    p = await pay(service)
    provider.outages = 1
    with pytest.raises(JobFailed) as caught:
        await handler(specs, CAPTURE_JOB)(Ctx(attempt=attempt), capture_args(state, p, "ids"))
    assert caught.value.code == "provider-unavailable"
    assert caught.value.retry is True
    assert "unavailable" in caught.value.detail
    assert state.payments[p.id].status is PaymentStatus.PENDING
    assert [e.type for e in state.outbox] == ["payment.created"]


async def test_an_outage_on_the_last_attempt_fails_the_payment(
    specs: dict[str, JobSpec], service: PaymentsService, state: PaymentsState, provider: FakePaymentProvider
) -> None:
    p = await pay(service)
    provider.outages = 1
    result = await handler(specs, CAPTURE_JOB)(Ctx(attempt=LAST_ATTEMPT), capture_args(state, p, "event"))
    assert result == {"outcome": "failed"}
    failed = state.payments[p.id]
    assert failed.status is PaymentStatus.FAILED
    assert failed.failure_reason is FailureReason.PROVIDER_UNAVAILABLE
    assert last_event(state, "payment.failed").data["failure_reason"] == "provider_unavailable"


async def test_a_short_outage_is_ridden_out_by_the_retries(
    specs: dict[str, JobSpec], service: PaymentsService, state: PaymentsState, provider: FakePaymentProvider
) -> None:
    p = await pay(service, UNAVAILABLE_TWICE)
    args = capture_args(state, p, "event")
    for attempt in (1, 2):
        with pytest.raises(JobFailed):
            await handler(specs, CAPTURE_JOB)(Ctx(attempt=attempt), args)
    assert await handler(specs, CAPTURE_JOB)(Ctx(attempt=3), args) == {"outcome": "succeeded"}
    assert len(provider.charges()) == 1


async def test_a_refund_outage_is_retried_then_recorded_on_the_last_attempt(
    specs: dict[str, JobSpec], service: PaymentsService, state: PaymentsState, provider: FakePaymentProvider
) -> None:
    p = await pay(service)
    await service.capture(ACME.tenant_id, p.id)
    r = (await service.request_refund(ACME, p.id, CreateRefund())).value
    args = {"event": event_to_args(last_event(state, "refund.created"))}
    provider.outages = 1
    with pytest.raises(JobFailed) as caught:
        await handler(specs, REFUND_JOB)(Ctx(attempt=PROVIDER_RETRY.retries), args)
    assert (caught.value.code, caught.value.retry) == ("provider-unavailable", True)
    assert state.refunds[r.id].status is RefundStatus.PENDING
    provider.outages = 1
    assert await handler(specs, REFUND_JOB)(Ctx(attempt=LAST_ATTEMPT), args) == {"outcome": "failed"}
    assert state.refunds[r.id].failure_reason is FailureReason.PROVIDER_UNAVAILABLE
    assert state.payments[p.id].refundable == 100


async def test_the_resume_job_reports_how_many_it_resumed(
    specs: dict[str, JobSpec], service: PaymentsService, jobs: RecordingJobQueue, clock: ManualClock
) -> None:
    p = await pay(service)
    resume = handler(specs, RESUME_JOB)
    assert await resume(Ctx(), {}) == {"resumed": 0}
    clock.advance(seconds=STALE_AFTER.total_seconds() + 1)
    assert await resume(Ctx(), {}) == {"resumed": 1}
    assert [uuid.UUID(j.args["payment_id"]) for j in jobs.named(CAPTURE_JOB)] == [p.id]
