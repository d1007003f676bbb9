"""One contract for the webhooks storage ports, run against the fake, SQLite and Postgres."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from keel.contexts.webhooks.adapters.sql.repositories import SqlWebhooksUnitOfWork
from keel.contexts.webhooks.domain.model import Attempt, Delivery, DeliveryStatus, Endpoint, new_secret
from keel.contexts.webhooks.ports.repositories import WebhooksUnitOfWork
from keel.platform.domain.ids import new_id
from keel.platform.domain.paging import PageRequest
from tests.fakes.webhooks import InMemoryWebhooksUnitOfWork, WebhooksState
from tests.support.storage import BACKENDS, backend_of, uow_factory

NOW = datetime(2026, 3, 1, 9, 30, tzinfo=UTC)
LEASE = timedelta(seconds=60)

UowFactory = Callable[[], WebhooksUnitOfWork]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return backend_of(request)


@pytest.fixture
async def uow(backend: str) -> AsyncIterator[UowFactory]:
    state = WebhooksState()
    async with uow_factory(backend, lambda: InMemoryWebhooksUnitOfWork(state), SqlWebhooksUnitOfWork) as factory:
        yield factory


def endpoint(tenant_id: uuid.UUID, *types: str, enabled: bool = True, url: str = "https://example.com/h") -> Endpoint:
    return Endpoint(
        id=new_id(),
        tenant_id=tenant_id,
        url=url,
        description="CRM sync",
        event_types=types or ("user.created",),
        enabled=enabled,
        secret=new_secret(),
        created_at=NOW,
        updated_at=NOW,
    )


def delivery(
    e: Endpoint,
    event_id: uuid.UUID | None = None,
    *,
    status: DeliveryStatus = DeliveryStatus.PENDING,
    due: datetime | None = NOW,
    attempts: int = 0,
) -> Delivery:
    return Delivery(
        id=new_id(),
        tenant_id=e.tenant_id,
        endpoint_id=e.id,
        event_id=event_id or new_id(),
        event_type="user.created",
        payload='{"type":"user.created","timestamp":"2026-03-01T09:30:00+00:00","data":{"name":"Zo\u00eb \U0001f980"}}',
        status=status,
        attempts=attempts,
        created_at=NOW,
        updated_at=NOW,
        next_attempt_at=due,
    )


def attempt(d: Delivery, number: int, status_code: int | None = 500) -> Attempt:
    return Attempt(
        id=new_id(),
        delivery_id=d.id,
        tenant_id=d.tenant_id,
        number=number,
        started_at=NOW + timedelta(seconds=number),
        latency_ms=40 + number,
        status_code=status_code,
        error=None
        if status_code == 200
        else "No response within 15s."
        if status_code is None
        else f"HTTP {status_code}",
    )


async def store(uow: UowFactory, *items: Endpoint | Delivery | Attempt) -> None:
    async with uow() as u:
        for item in items:
            if isinstance(item, Endpoint):
                await u.endpoints.add(item)
            elif isinstance(item, Delivery):
                assert await u.deliveries.add(item) is True
            else:
                await u.attempts.add(item)
        await u.commit()


# -- endpoints --------------------------------------------------------------------------------------


async def test_endpoint_round_trip_keeps_every_field(uow: UowFactory) -> None:
    tenant, other = new_id(), new_id()
    e = endpoint(tenant, "user.updated", "user.created")
    await store(uow, e)
    async with uow() as u:
        assert await u.endpoints.get(tenant, e.id) == e
        assert await u.endpoints.get(other, e.id) is None
        assert await u.endpoints.get(tenant, new_id()) is None
    later = NOW + timedelta(hours=3)
    changed = replace(
        e.rotated(later).disabled("The receiver answered 410 Gone.", later),
        url="https://example.org/new?x=1",
        description="",
        event_types=("api_key.created",),
        failing_since=NOW + timedelta(minutes=1),
    )
    async with uow() as u:
        await u.endpoints.update(changed)
        await u.commit()
    async with uow() as u:
        got = await u.endpoints.get(tenant, e.id)
    assert got == changed
    assert got is not None
    assert got.previous_secret == e.secret
    assert got.previous_secret_expires_at == later + timedelta(hours=24)


async def test_leaving_without_commit_discards_everything(uow: UowFactory) -> None:
    tenant = new_id()
    e = endpoint(tenant)
    async with uow() as u:
        await u.endpoints.add(e)
        await u.deliveries.add(delivery(e))
    async with uow() as u:
        assert await u.endpoints.get(tenant, e.id) is None
        assert (await u.endpoints.list(tenant, PageRequest())).items == []


async def test_endpoints_are_scoped_to_their_tenant(uow: UowFactory) -> None:
    a, b = new_id(), new_id()
    ea = endpoint(a)
    await store(uow, ea, endpoint(b))
    async with uow() as u:
        # Another tenant can neither see, change nor delete it.
        assert ea.id not in [e.id for e in (await u.endpoints.list(b, PageRequest())).items]
        assert await u.endpoints.subscribed(b, "user.created") != []
        assert ea.id not in [e.id for e in await u.endpoints.subscribed(b, "user.created")]
        await u.endpoints.update(replace(ea, tenant_id=b, url="https://evil.test/"))
        assert await u.endpoints.delete(b, ea.id) is False
        await u.commit()
    async with uow() as u:
        assert await u.endpoints.get(a, ea.id) == ea
        assert await u.endpoints.get(b, ea.id) is None


async def test_endpoint_pages_follow_creation_order_without_gaps_or_repeats(uow: UowFactory) -> None:
    a, b = new_id(), new_id()
    created = [endpoint(a) for _ in range(7)]
    await store(uow, *created, endpoint(b))
    seen: list[Endpoint] = []
    after = None
    pages = 0
    while True:
        async with uow() as u:
            page = await u.endpoints.list(a, PageRequest(limit=3, after=after))
        seen.extend(page.items)
        pages += 1
        if page.next_after is None:
            break
        after = page.next_after
    assert [e.id for e in seen] == [e.id for e in created]
    assert pages == 3
    async with uow() as u:
        exact = await u.endpoints.list(a, PageRequest(limit=7))
    assert len(exact.items) == 7
    assert exact.next_after is None


async def test_subscribed_lists_enabled_endpoints_of_the_tenant_for_the_type(uow: UowFactory) -> None:
    a, b = new_id(), new_id()
    both = endpoint(a, "user.created", "user.deleted")
    deleted_only = endpoint(a, "user.deleted")
    disabled = endpoint(a, "user.created", enabled=False)
    foreign = endpoint(b, "user.created")
    await store(uow, both, deleted_only, disabled, foreign)
    async with uow() as u:
        assert {e.id for e in await u.endpoints.subscribed(a, "user.created")} == {both.id}
        assert {e.id for e in await u.endpoints.subscribed(a, "user.deleted")} == {both.id, deleted_only.id}
        assert await u.endpoints.subscribed(a, "api_key.created") == []
        # A type that is a prefix or a pattern of a subscribed one is not a match.
        assert await u.endpoints.subscribed(a, "user") == []
        assert await u.endpoints.subscribed(a, "*") == []
        assert {e.id for e in await u.endpoints.subscribed(b, "user.created")} == {foreign.id}


async def test_deleting_an_endpoint_takes_its_deliveries_and_attempts(uow: UowFactory) -> None:
    tenant = new_id()
    doomed, kept = endpoint(tenant), endpoint(tenant)
    d1, d2, k1 = delivery(doomed), delivery(doomed), delivery(kept)
    await store(uow, doomed, kept, d1, d2, k1, attempt(d1, 1), attempt(d1, 2), attempt(d2, 1), attempt(k1, 1))
    async with uow() as u:
        assert await u.endpoints.delete(tenant, doomed.id) is True
        await u.commit()
    async with uow() as u:
        assert await u.endpoints.get(tenant, doomed.id) is None
        assert await u.deliveries.get(tenant, d1.id) is None
        assert await u.deliveries.get(tenant, d2.id) is None
        assert await u.attempts.for_deliveries(tenant, [d1.id, d2.id]) == []
        assert (await u.deliveries.list(tenant, doomed.id, PageRequest())).items == []
        # The other endpoint's history is untouched.
        assert await u.deliveries.get(tenant, k1.id) == k1
        assert [a.number for a in await u.attempts.for_deliveries(tenant, [k1.id])] == [1]
        assert await u.endpoints.delete(tenant, doomed.id) is False
    # The same event can be delivered again to a new endpoint (no stale uniqueness rows survive).
    again = endpoint(tenant)
    async with uow() as u:
        await u.endpoints.add(again)
        assert await u.deliveries.add(replace(delivery(again), event_id=d1.event_id)) is True
        await u.commit()


# -- deliveries -------------------------------------------------------------------------------------


async def test_delivery_round_trip_and_update(uow: UowFactory) -> None:
    tenant = new_id()
    e = endpoint(tenant)
    d = delivery(e)
    await store(uow, e, d)
    async with uow() as u:
        assert await u.deliveries.get(tenant, d.id) == d
        assert await u.deliveries.get(new_id(), d.id) is None
        assert await u.deliveries.for_event(tenant, d.event_id) == [d]
        assert await u.deliveries.for_event(new_id(), d.event_id) == []
    changed = replace(
        d,
        status=DeliveryStatus.FAILED,
        attempts=3,
        attempt_budget=4,
        next_attempt_at=None,
        last_status_code=503,
        last_error="HTTP 503",
        updated_at=NOW + timedelta(minutes=9),
    )
    async with uow() as u:
        await u.deliveries.update(changed)
        # An update naming another tenant changes nothing.
        await u.deliveries.update(replace(changed, tenant_id=new_id(), status=DeliveryStatus.SUCCEEDED))
        await u.commit()
    async with uow() as u:
        assert await u.deliveries.get(tenant, d.id) == changed


async def test_one_delivery_per_endpoint_and_event(uow: UowFactory) -> None:
    tenant = new_id()
    e, other = endpoint(tenant), endpoint(tenant)
    event = new_id()
    first = delivery(e, event)
    await store(uow, e, other, first)
    async with uow() as u:
        duplicate = delivery(e, event)
        assert await u.deliveries.add(duplicate) is False
        # The refused insert leaves the transaction usable: the same event for another endpoint goes in.
        assert await u.deliveries.add(delivery(other, event)) is True
        await u.commit()
    async with uow() as u:
        assert await u.deliveries.get(tenant, duplicate.id) is None
        found = await u.deliveries.for_event(tenant, event)
    assert sorted(d.endpoint_id for d in found) == sorted([e.id, other.id])
    assert next(d for d in found if d.endpoint_id == e.id) == first


async def test_delivery_pages_are_newest_first_per_endpoint(uow: UowFactory) -> None:
    a, b = new_id(), new_id()
    e, sibling, foreign = endpoint(a), endpoint(a), endpoint(b)
    created = [delivery(e) for _ in range(5)]
    await store(uow, e, sibling, foreign, *created, delivery(sibling), delivery(foreign))
    seen: list[Delivery] = []
    after = None
    pages = 0
    while True:
        async with uow() as u:
            page = await u.deliveries.list(a, e.id, PageRequest(limit=2, after=after))
        seen.extend(page.items)
        pages += 1
        if page.next_after is None:
            break
        after = page.next_after
    assert [d.id for d in seen] == [d.id for d in reversed(created)]
    assert pages == 3
    async with uow() as u:
        assert (await u.deliveries.list(b, e.id, PageRequest())).items == []
        assert len((await u.deliveries.list(b, foreign.id, PageRequest())).items) == 1


async def test_attempts_come_back_by_delivery_then_number_within_the_tenant(uow: UowFactory) -> None:
    tenant = new_id()
    e = endpoint(tenant)
    d1, d2 = delivery(e), delivery(e)
    # Stored out of order on purpose.
    stored = [attempt(d2, 2, 200), attempt(d1, 3, None), attempt(d2, 1), attempt(d1, 1), attempt(d1, 2, 429)]
    await store(uow, e, d1, d2, *stored)
    async with uow() as u:
        got = await u.attempts.for_deliveries(tenant, [d2.id, d1.id])
        assert await u.attempts.for_deliveries(new_id(), [d1.id, d2.id]) == []
        assert await u.attempts.for_deliveries(tenant, []) == []
        only = await u.attempts.for_deliveries(tenant, [d2.id])
    assert [(a.delivery_id, a.number) for a in got] == [(d1.id, 1), (d1.id, 2), (d1.id, 3), (d2.id, 1), (d2.id, 2)]
    assert {a.id: a for a in got} == {a.id: a for a in stored}
    assert [a.number for a in only] == [1, 2]


# -- claims -----------------------------------------------------------------------------------------


async def claim(
    uow: UowFactory, d: Delivery, claimer: str, now: datetime, tenant: uuid.UUID | None = None
) -> Delivery | None:
    async with uow() as u:
        got = await u.deliveries.claim(tenant or d.tenant_id, d.id, claimer, now, now - LEASE)
        await u.commit()
    return got


async def test_a_due_pending_delivery_is_claimed_once(uow: UowFactory) -> None:
    tenant = new_id()
    e = endpoint(tenant)
    d = delivery(e, due=NOW)
    await store(uow, e, d)
    got = await claim(uow, d, "job-1", NOW)
    assert got is not None
    assert got.claim_token
    assert got == replace(d, status=DeliveryStatus.SENDING, claim_token=got.claim_token)
    # Fresh, and someone else's: nobody else gets it.
    assert await claim(uow, d, "job-2", NOW + timedelta(seconds=30)) is None
    # The claimer itself gets it back (its job was retried after the worker died), with a new fence.
    again = await claim(uow, d, "job-1", NOW + timedelta(seconds=30))
    assert again is not None
    assert again.status is DeliveryStatus.SENDING
    assert again.claim_token not in (None, got.claim_token)


async def test_only_the_current_claim_can_record_the_outcome(uow: UowFactory) -> None:
    tenant = new_id()
    e = endpoint(tenant)
    d = delivery(e, due=NOW)
    await store(uow, e, d)
    old = await claim(uow, d, "job-1", NOW)
    new = await claim(uow, d, "job-1", NOW + timedelta(seconds=30))
    assert old is not None
    assert new is not None
    async with uow() as u:
        # The run that lost its claim (its worker was presumed dead) writes nothing.
        assert not await u.deliveries.finish(replace(old, status=DeliveryStatus.FAILED, attempts=1))
        assert await u.deliveries.finish(replace(new, status=DeliveryStatus.SUCCEEDED, attempts=1))
        await u.commit()
    async with uow() as u:
        stored = await u.deliveries.get(tenant, d.id)
        # Finished: the fence is gone, and no late writer can change the outcome.
        assert not await u.deliveries.finish(replace(new, status=DeliveryStatus.FAILED))
    assert stored is not None
    assert stored.status is DeliveryStatus.SUCCEEDED
    assert stored.claim_token is None


async def test_not_yet_due_deliveries_and_other_tenants_are_not_claimed(uow: UowFactory) -> None:
    tenant = new_id()
    e = endpoint(tenant)
    later = delivery(e, due=NOW + timedelta(seconds=5))
    due = delivery(e, due=NOW)
    await store(uow, e, later, due)
    assert await claim(uow, later, "job-1", NOW) is None
    assert await claim(uow, due, "job-1", NOW, tenant=new_id()) is None
    async with uow() as u:
        assert await u.deliveries.claim(tenant, new_id(), "job-1", NOW, NOW - LEASE) is None
        assert await u.deliveries.get(tenant, later.id) == later
        assert await u.deliveries.get(tenant, due.id) == due
    # Exactly due is due.
    assert await claim(uow, later, "job-1", NOW + timedelta(seconds=5)) is not None


@pytest.mark.parametrize("status", [DeliveryStatus.SUCCEEDED, DeliveryStatus.FAILED])
async def test_finished_deliveries_are_never_claimed(uow: UowFactory, status: DeliveryStatus) -> None:
    tenant = new_id()
    e = endpoint(tenant)
    d = delivery(e, status=status, due=None, attempts=1)
    await store(uow, e, d)
    assert await claim(uow, d, "job-1", NOW + timedelta(days=1)) is None


async def test_a_stale_claim_is_taken_over(uow: UowFactory) -> None:
    tenant = new_id()
    e = endpoint(tenant)
    d = delivery(e)
    await store(uow, e, d)
    assert await claim(uow, d, "job-1", NOW) is not None
    # Still within the lease: refused; past it: the new claimer takes over.
    assert await claim(uow, d, "job-2", NOW + LEASE - timedelta(seconds=1)) is None
    taken = await claim(uow, d, "job-2", NOW + LEASE + timedelta(seconds=1))
    assert taken is not None
    assert taken.status is DeliveryStatus.SENDING
    # The claim is now job-2's and fresh: job-1 coming back late does not get it.
    assert await claim(uow, d, "job-1", NOW + LEASE + timedelta(seconds=2)) is None


async def test_updating_a_sending_delivery_keeps_its_claim_and_finishing_releases_it(uow: UowFactory) -> None:
    tenant = new_id()
    e = endpoint(tenant)
    d = delivery(e)
    await store(uow, e, d)
    claimed = await claim(uow, d, "job-1", NOW)
    assert claimed is not None
    async with uow() as u:
        await u.deliveries.update(replace(claimed, last_error="in flight", updated_at=NOW + timedelta(seconds=1)))
        await u.commit()
    assert await claim(uow, d, "job-2", NOW + timedelta(seconds=2)) is None
    assert await claim(uow, d, "job-1", NOW + timedelta(seconds=2)) is not None
    # Back to pending for a retry: the next job claims it when it is due, whoever it is.
    retry_at = NOW + timedelta(seconds=10)
    async with uow() as u:
        await u.deliveries.update(replace(claimed, status=DeliveryStatus.PENDING, attempts=1, next_attempt_at=retry_at))
        await u.commit()
    assert await claim(uow, d, "job-1", NOW + timedelta(seconds=3)) is None
    assert await claim(uow, d, "job-3", retry_at) is not None


# -- overdue ----------------------------------------------------------------------------------------


async def test_overdue_finds_lost_attempts_across_tenants(uow: UowFactory) -> None:
    a, b = new_id(), new_id()
    ea, eb = endpoint(a), endpoint(b)
    late_a = delivery(ea, due=NOW - timedelta(minutes=10))
    late_b = delivery(eb, due=NOW - timedelta(minutes=5))
    on_time = delivery(ea, due=NOW + timedelta(minutes=1))
    stuck = delivery(ea, due=NOW - timedelta(minutes=30))
    in_flight = delivery(eb, due=NOW - timedelta(minutes=20))
    done = delivery(ea, status=DeliveryStatus.SUCCEEDED, due=None, attempts=1)
    failed = delivery(eb, status=DeliveryStatus.FAILED, due=None, attempts=8)
    await store(uow, ea, eb, late_a, late_b, on_time, stuck, in_flight, done, failed)
    # `stuck` was claimed long ago by a worker that vanished; `in_flight` was claimed just now.
    assert await claim(uow, stuck, "dead-worker", NOW - timedelta(minutes=29)) is not None
    assert await claim(uow, in_flight, "live-worker", NOW) is not None

    due_before, stale_before = NOW, NOW - LEASE
    async with uow() as u:
        found = await u.deliveries.overdue(due_before, stale_before, 100)
        assert {d.id for d in found} == {late_a.id, late_b.id, stuck.id}
        by_id = {d.id: d for d in found}
        assert by_id[stuck.id].status is DeliveryStatus.SENDING
        assert by_id[late_b.id].tenant_id == b
        assert len(await u.deliveries.overdue(due_before, stale_before, 2)) == 2
        # The boundary is strict: due exactly at due_before is not overdue yet.
        boundary = NOW - timedelta(minutes=5)
        assert late_b.id not in {d.id for d in await u.deliveries.overdue(boundary, stale_before, 100)}
