"""In-process event dispatch: who runs in which order, what a failure does, and the job ids events derive.

Subscribers to every event (cache invalidation) run before the subscribers of the event's type (the jobs
it owes), so that work an event triggers never reads what the event made stale.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from keel.contexts.notifications.domain.services import SEND_JOB
from keel.contexts.payments.domain import caching as payments_caching
from keel.contexts.payments.domain.services import CAPTURE_JOB, REFUND_JOB
from keel.contexts.webhooks.domain.services import FAN_OUT_JOB
from keel.main.container import subscribe_cache_invalidation, subscribe_jobs
from keel.platform.adapters.memory.cache import InMemoryCache
from keel.platform.cache import ReadThroughCache
from keel.platform.domain.events import (
    ANY_EVENT,
    Event,
    EventDispatcher,
    event_from_args,
    event_job_id,
    event_to_args,
)
from keel.platform.ports.jobs import JobArgs
from tests.fakes.clock import ManualClock
from tests.fakes.webhooks import RecordingJobQueue

TENANT = uuid.UUID("00000000-0000-4000-8000-000000000001")


def event(event_type: str = "user.created", **data: Any) -> Event:
    return Event(type=event_type, tenant_id=TENANT, occurred_at=datetime(2026, 1, 1, tzinfo=UTC), data=data)


class Log:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def handler(self, name: str, fail: bool = False) -> Any:
        async def handle(e: Event) -> None:
            self.calls.append(f"{name}:{e.type}")
            if fail:
                raise ConnectionError(f"{name} failed")

        return handle


async def test_subscribers_to_every_event_run_before_those_of_the_type() -> None:
    log, dispatcher = Log(), EventDispatcher()
    # Registered type-first: the order of registration must not matter.
    dispatcher.subscribe("user.created", log.handler("typed"))
    dispatcher.subscribe(ANY_EVENT, log.handler("any"))

    await dispatcher.dispatch(event("user.created"))
    assert log.calls == ["any:user.created", "typed:user.created"]

    handlers = dispatcher.handlers_for("user.created")
    assert len(handlers) == 2
    assert handlers[0] is dispatcher.handlers_for("user.deleted")[0]  # the any-event one, first


async def test_within_each_kind_subscribers_run_in_the_order_they_subscribed() -> None:
    log, dispatcher = Log(), EventDispatcher()
    dispatcher.subscribe("payment.succeeded", log.handler("typed-1"))
    dispatcher.subscribe(ANY_EVENT, log.handler("any-1"))
    dispatcher.subscribe("payment.succeeded", log.handler("typed-2"))
    dispatcher.subscribe(ANY_EVENT, log.handler("any-2"))
    dispatcher.subscribe("payment.failed", log.handler("other"))

    await dispatcher.dispatch(event("payment.succeeded"))
    assert log.calls == [
        "any-1:payment.succeeded",
        "any-2:payment.succeeded",
        "typed-1:payment.succeeded",
        "typed-2:payment.succeeded",
    ]


async def test_an_event_nobody_subscribed_to_reaches_only_the_any_event_subscribers() -> None:
    log, dispatcher = Log(), EventDispatcher()
    dispatcher.subscribe("user.created", log.handler("typed"))
    assert dispatcher.handlers_for("tenant.updated") == []
    dispatcher.subscribe(ANY_EVENT, log.handler("any"))
    await dispatcher.dispatch(event("tenant.updated"))
    assert log.calls == ["any:tenant.updated"]


async def test_the_first_failure_stops_the_dispatch_and_propagates() -> None:
    """The outbox keeps the event for a retry: a failed invalidation must not let the jobs run on stale
    data meanwhile."""
    log, dispatcher = Log(), EventDispatcher()
    dispatcher.subscribe("user.created", log.handler("typed"))
    dispatcher.subscribe(ANY_EVENT, log.handler("any", fail=True))
    with pytest.raises(ConnectionError, match="any failed"):
        await dispatcher.dispatch(event("user.created"))
    assert log.calls == ["any:user.created"]


async def test_the_subscribers_of_a_type_run_together_and_a_failure_among_them_still_propagates() -> None:
    """Each typed subscriber waits for the other's start: run in turn, this dispatch would never end."""
    dispatcher = EventDispatcher()
    started = {"a": asyncio.Event(), "b": asyncio.Event()}
    finished: list[str] = []

    def meets(me: str, other: str, fail: bool = False) -> Any:
        async def handle(e: Event) -> None:
            started[me].set()
            await started[other].wait()
            finished.append(me)
            if fail:
                raise ConnectionError(f"{me} failed")

        return handle

    dispatcher.subscribe("payment.created", meets("a", "b", fail=True))
    dispatcher.subscribe("payment.created", meets("b", "a"))
    with pytest.raises(ConnectionError, match="a failed"):
        await asyncio.wait_for(dispatcher.dispatch(event("payment.created")), timeout=5)
    assert sorted(finished) == ["a", "b"]  # the failure did not cut the other one short


def test_event_job_ids_are_derived_from_the_event_and_the_job() -> None:
    e = event("payment.created")
    assert event_job_id(e.id, CAPTURE_JOB) == str(uuid.uuid5(e.id, CAPTURE_JOB))
    assert event_job_id(e.id, CAPTURE_JOB) == event_job_id(e.id, CAPTURE_JOB)
    assert event_job_id(e.id, CAPTURE_JOB) != event_job_id(e.id, REFUND_JOB)
    assert event_job_id(e.id, CAPTURE_JOB) != event_job_id(uuid.uuid4(), CAPTURE_JOB)
    uuid.UUID(event_job_id(e.id, CAPTURE_JOB))  # a UUID, like every job id


def test_an_event_survives_its_job_arguments() -> None:
    e = event("payment.refunded", payment_id=str(uuid.uuid4()), refund_amount=250, metadata={"a": "b"})
    args = event_to_args(e)
    assert event_from_args(args) == e
    assert event_from_args(event_to_args(event_from_args(args))) == e


# -- the composition root's subscriptions -------------------------------------------------------------------


class OrderedCache(InMemoryCache):
    def __init__(self, log: list[str], clock: ManualClock) -> None:
        super().__init__(clock)
        self._log = log

    async def delete(self, *keys: str) -> None:
        self._log.extend(f"invalidate {k}" for k in keys)
        await super().delete(*keys)


class OrderedJobs(RecordingJobQueue):
    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self._log = log

    async def enqueue(
        self,
        name: str,
        args: JobArgs,
        *,
        tenant_id: uuid.UUID | None = None,
        delay: float = 0.0,
        job_id: str | None = None,
    ) -> str:
        self._log.append(f"enqueue {name}")
        return await super().enqueue(name, args, tenant_id=tenant_id, delay=delay, job_id=job_id)


@pytest.mark.parametrize("jobs_first", [True, False], ids=["jobs-subscribed-first", "cache-subscribed-first"])
async def test_a_payment_event_invalidates_the_cached_payment_before_its_jobs_are_enqueued(jobs_first: bool) -> None:
    """``payment.succeeded`` changes the stored payment and owes a receipt (and a webhook fan-out): the
    receipt job, run in process at once, must not read the payment from the cache as it was."""
    log: list[str] = []
    clock = ManualClock()
    cache = ReadThroughCache(OrderedCache(log, clock))
    jobs = OrderedJobs(log)
    dispatcher = EventDispatcher()
    if jobs_first:
        subscribe_jobs(dispatcher, jobs)
        subscribe_cache_invalidation(dispatcher, cache)
    else:
        subscribe_cache_invalidation(dispatcher, cache)
        subscribe_jobs(dispatcher, jobs)

    payment_id = uuid.uuid4()
    e = event("payment.succeeded", payment_id=str(payment_id))
    await dispatcher.dispatch(e)

    key = payments_caching.payment_key(TENANT, payment_id)
    assert log[0] == f"invalidate {key}"
    assert sorted(log[1:]) == sorted([f"enqueue {FAN_OUT_JOB}", f"enqueue {SEND_JOB}"])
    assert {j.id for j in jobs.jobs} == {event_job_id(e.id, FAN_OUT_JOB), event_job_id(e.id, SEND_JOB)}


async def test_payment_created_enqueues_the_capture_under_the_payments_job_id() -> None:
    """``payment.created`` carries the payment's id, so the capture job's id follows from the payment alone
    (what the 202 answer's ``job_id`` promises)."""
    jobs = RecordingJobQueue()
    dispatcher = EventDispatcher()
    subscribe_jobs(dispatcher, jobs)
    payment_id = uuid.uuid4()
    created = Event(
        id=payment_id,
        type="payment.created",
        tenant_id=TENANT,
        occurred_at=datetime(2026, 1, 1, tzinfo=UTC),
        data={"payment_id": str(payment_id)},
    )
    await dispatcher.dispatch(created)
    await dispatcher.dispatch(created)  # published twice by the outbox: still one job
    capture = [j for j in jobs.jobs if j.name == CAPTURE_JOB]
    assert [j.id for j in capture] == [event_job_id(payment_id, CAPTURE_JOB)]
    assert capture[0].tenant_id == TENANT
    assert event_from_args(capture[0].args["event"]) == created
