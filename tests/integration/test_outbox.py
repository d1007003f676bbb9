"""The transactional outbox on real databases: events exist if and only if their data does, are published
right after commit, and anything left over (a crash, a failing subscriber) is published by the sweep,
exactly once even with several processes sweeping at the same time (Postgres)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event as event_api
from sqlalchemy import select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from keel.contexts.accounts.adapters.sql.repositories import SqlAccountsUnitOfWork
from keel.contexts.accounts.domain.model import Tenant, TenantConfig
from keel.platform.adapters.jobs.execution import JobRegistry
from keel.platform.adapters.jobs.in_process import InProcessJobQueue
from keel.platform.adapters.sql.engine import create_engine, session_factory
from keel.platform.adapters.sql.outbox import MAX_ATTEMPTS, SWEEP_JOB, OutboxRow, SqlOutboxRelay, outbox_jobs
from keel.platform.context import request_id_var
from keel.platform.domain.events import Event, EventDispatcher
from keel.platform.domain.ids import new_id
from keel.platform.domain.jobs import JobStatus
from keel.platform.ports.jobs import PeriodicJob
from tests.fakes.clock import ManualClock
from tests.support.app import client_for, make_settings, signup
from tests.support.waiting import eventually

GRACE = timedelta(seconds=5)


class Subscriber:
    """Records what it receives; can fail its first ``fail`` calls and take ``delay`` seconds per event."""

    def __init__(self, *, fail: int = 0, delay: float = 0.0, name: str = "") -> None:
        self.received: list[Event] = []
        self.request_ids: list[str | None] = []
        self.fail = fail
        self.delay = delay
        self.name = name

    async def __call__(self, event: Event) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail > 0:
            self.fail -= 1
            raise RuntimeError(f"subscriber broke on {event.type}")
        self.received.append(event)
        self.request_ids.append(request_id_var.get())


class Db:
    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = create_engine(url)
        self.sessions: async_sessionmaker[AsyncSession] = session_factory(self.engine)

    async def rows(self) -> list[OutboxRow]:
        async with self.sessions() as s:
            return list((await s.execute(select(OutboxRow).order_by(OutboxRow.occurred_at))).scalars())

    async def count(self, table: str) -> int:
        async with self.sessions() as s:
            return int((await s.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one())


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Db]:
    d = Db(database_url)
    yield d
    await d.engine.dispose()


@pytest.fixture
async def pg_db(pg_url: str) -> AsyncIterator[Db]:
    d = Db(pg_url)
    yield d
    await d.engine.dispose()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


def relay_with(db: Db, clock: ManualClock, *subscribers: Subscriber) -> SqlOutboxRelay:
    dispatcher = EventDispatcher()
    for sub in subscribers:
        dispatcher.subscribe("*", sub)
    return SqlOutboxRelay(db.sessions, dispatcher, clock, grace=GRACE)


def tenant_at(clock: ManualClock, name: str = "Acme") -> Tenant:
    now = clock.now()
    return Tenant(id=new_id(), name=name, config=TenantConfig(display_name=name), created_at=now, updated_at=now)


def event_for(tenant: Tenant, clock: ManualClock, type_: str = "tenant.created", **data: Any) -> Event:
    return Event(type=type_, tenant_id=tenant.id, occurred_at=clock.now(), data={"name": tenant.name, **data})


async def create_tenant(db: Db, clock: ManualClock, publisher: SqlOutboxRelay | None, name: str = "Acme") -> Event:
    """One real mutation with its event, committed through the accounts unit of work."""
    tenant = tenant_at(clock, name)
    event = event_for(tenant, clock)
    async with SqlAccountsUnitOfWork(db.sessions, publisher) as uow:
        await uow.tenants.add(tenant)
        uow.record(event)
        await uow.commit()
    return event


# -- through the HTTP API ------------------------------------------------------------------------------


async def test_a_mutation_writes_its_event_and_publishes_it_before_responding(
    database_url: str, tmp_path: Path
) -> None:
    async with client_for(make_settings(database_url, tmp_path)) as client:
        tenant = await signup(client)
        h = tenant["headers"]
        user_id = tenant["user"]["id"]
        r = await client.patch(f"/v1/users/{user_id}", json={"name": "Renamed"}, headers=h)
        assert r.status_code == 200, r.text
        request_id = r.headers["x-request-id"]

        # A rejected mutation (the data is not written) leaves no event either.
        r = await client.post("/v1/users", json={"email": "twin@acme.test", "name": "Twin"}, headers=h)
        assert r.status_code == 201
        twin = r.json()["id"]
        r = await client.patch(f"/v1/users/{twin}", json={"email": "owner@acme.test"}, headers=h)
        assert r.status_code == 409

        db = Db(database_url)
        try:
            rows = await db.rows()
        finally:
            await db.engine.dispose()

    assert [r.type for r in rows] == ["tenant.created", "user.updated", "user.created"]
    updated = rows[1]
    assert str(updated.tenant_id) == tenant["tenant"]["id"]
    assert updated.data == {"user_id": user_id, "changed": ["name"]}
    assert updated.request_id == request_id
    assert all(r.published_at is not None for r in rows)
    assert all(r.attempts == 0 and r.last_error is None for r in rows)


# -- atomicity -----------------------------------------------------------------------------------------


async def test_a_unit_of_work_left_without_commit_writes_and_dispatches_nothing(db: Db, clock: ManualClock) -> None:
    sub = Subscriber()
    relay = relay_with(db, clock, sub)
    async with SqlAccountsUnitOfWork(db.sessions, relay) as uow:
        tenant = tenant_at(clock)
        await uow.tenants.add(tenant)  # flushed: the row exists inside the transaction
        uow.record(event_for(tenant, clock))

    async def fail_midway() -> None:
        async with SqlAccountsUnitOfWork(db.sessions, relay) as uow:
            tenant = tenant_at(clock)
            await uow.tenants.add(tenant)
            uow.record(event_for(tenant, clock))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await fail_midway()

    assert await db.count("tenants") == 0
    assert await db.rows() == []
    assert sub.received == []
    assert await relay.pending() == 0
    clock.advance(minutes=1)
    assert await relay.sweep() == 0
    assert sub.received == []


async def test_a_commit_that_fails_writes_neither_data_nor_event(db: Db, clock: ManualClock) -> None:
    sub = Subscriber()
    relay = relay_with(db, clock, sub)
    tenant = tenant_at(clock)
    event = event_for(tenant, clock)

    async def commit_twice_the_same_event() -> None:
        async with SqlAccountsUnitOfWork(db.sessions, relay) as uow:
            await uow.tenants.add(tenant)
            uow.record(event)
            uow.record(event)  # same id twice: the outbox insert fails at commit
            await uow.commit()

    with pytest.raises(IntegrityError):
        await commit_twice_the_same_event()
    assert await db.count("tenants") == 0
    assert await db.rows() == []
    assert sub.received == []


async def test_a_committed_event_is_published_at_once_and_marked(db: Db, clock: ManualClock) -> None:
    sub = Subscriber()
    relay = relay_with(db, clock, sub)
    event = await create_tenant(db, clock, relay)
    assert [e.id for e in sub.received] == [event.id]
    [row] = await db.rows()
    assert row.id == event.id
    assert row.published_at == clock.now()
    assert await relay.pending() == 0
    clock.advance(minutes=1)
    assert await relay.sweep() == 0  # nothing left over: not dispatched twice
    assert len(sub.received) == 1


async def test_a_commit_without_events_writes_no_outbox_row_and_publishes_nothing(db: Db, clock: ManualClock) -> None:
    sub = Subscriber()
    relay = relay_with(db, clock, sub)
    async with SqlAccountsUnitOfWork(db.sessions, relay) as uow:
        await uow.tenants.add(tenant_at(clock))
        await uow.commit()
    assert await db.count("tenants") == 1
    assert await db.rows() == []
    assert sub.received == []


async def test_commits_made_at_once_are_all_marked_in_fewer_updates_than_commits(db: Db, clock: ManualClock) -> None:
    """Group commit: publishers that arrive while a "published" UPDATE is in flight share the next one, and
    each returns only once its own row is marked."""
    sub = Subscriber(delay=0.01)  # the requests overlap, as they do under load
    relay = relay_with(db, clock, sub)
    updates: list[str] = []

    def count_updates(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE OUTBOX"):
            updates.append(statement)

    event_api.listen(db.engine.sync_engine, "before_cursor_execute", count_updates)
    try:
        events = await asyncio.gather(*(create_tenant(db, clock, relay, name=f"Tenant {i}") for i in range(20)))
    finally:
        event_api.remove(db.engine.sync_engine, "before_cursor_execute", count_updates)
    assert sorted(e.id for e in sub.received) == sorted(e.id for e in events)
    rows = await db.rows()
    assert len(rows) == 20
    assert all(r.published_at == clock.now() for r in rows)
    assert await relay.pending() == 0
    assert 1 <= len(updates) < 20, len(updates)


async def test_the_fast_path_never_fails_the_request_even_if_it_cannot_mark_rows(
    db: Db, clock: ManualClock, tmp_path: Path
) -> None:
    """Dispatched but not marked (the database went away in between): the commit still succeeds, and the
    sweep delivers the event again later; at least once, which is why subscribers are idempotent."""
    sub = Subscriber()
    dispatcher = EventDispatcher()
    dispatcher.subscribe("*", sub)
    broken = create_engine(f"sqlite+aiosqlite:///{tmp_path}/missing-dir/none.db")
    try:
        marking_fails = SqlOutboxRelay(session_factory(broken), dispatcher, clock, grace=GRACE)
        event = await create_tenant(db, clock, marking_fails)
    finally:
        await broken.dispose()
    assert [e.id for e in sub.received] == [event.id]
    [row] = await db.rows()
    assert row.published_at is None

    clock.advance(seconds=6)
    assert await relay_with(db, clock, sub).sweep() == 1
    assert [e.id for e in sub.received] == [event.id, event.id]


# -- the sweep: crash between commit and publish, failing subscribers ---------------------------------------


async def test_killed_after_commit_before_publish_the_sweep_publishes_once(db: Db, clock: ManualClock) -> None:
    sub = Subscriber()
    relay = relay_with(db, clock, sub)
    token = request_id_var.set("req-123")
    try:
        event = await create_tenant(db, clock, publisher=None)  # the process "dies" right after commit
    finally:
        request_id_var.reset(token)
    assert await db.count("tenants") == 1
    [row] = await db.rows()
    assert row.published_at is None
    assert row.request_id == "req-123"
    assert await relay.pending() == 1

    # Within the grace period the fast path may still be running elsewhere: the sweep leaves it alone.
    clock.advance(seconds=4)
    assert await relay.sweep() == 0
    assert sub.received == []

    clock.advance(seconds=2)
    assert await relay.sweep() == 1
    assert [(e.id, e.type, e.tenant_id, dict(e.data)) for e in sub.received] == [
        (event.id, event.type, event.tenant_id, dict(event.data))
    ]
    assert sub.request_ids == ["req-123"]  # the subscriber runs under the original request id
    assert request_id_var.get() is None
    [row] = await db.rows()
    assert row.published_at == clock.now()
    assert await relay.pending() == 0

    clock.advance(minutes=5)
    assert await relay.sweep() == 0
    assert len(sub.received) == 1


async def test_a_failing_subscriber_keeps_the_event_for_a_later_sweep(db: Db, clock: ManualClock) -> None:
    sub = Subscriber(fail=2)
    relay = relay_with(db, clock, sub)
    event = await create_tenant(db, clock, relay)  # the fast path fails: the request is not affected
    [row] = await db.rows()
    assert row.published_at is None
    assert row.attempts == 0
    assert sub.received == []

    clock.advance(seconds=6)
    assert await relay.sweep() == 0
    [row] = await db.rows()
    assert row.published_at is None
    assert row.attempts == 1
    assert row.last_error is not None
    assert "subscriber broke on tenant.created" in row.last_error
    assert await relay.pending() == 1

    assert await relay.sweep() == 1
    [row] = await db.rows()
    assert row.published_at is not None
    assert row.attempts == 1
    assert [e.id for e in sub.received] == [event.id]
    assert await relay.pending() == 0


async def test_one_failing_event_does_not_hold_up_the_others(db: Db, clock: ManualClock) -> None:
    class Picky(Subscriber):
        async def __call__(self, event: Event) -> None:
            if event.data["name"] == "Bad":
                raise ValueError("cannot handle Bad")
            await super().__call__(event)

    sub = Picky()
    relay = relay_with(db, clock, sub)
    for name in ["A", "Bad", "C"]:
        await create_tenant(db, clock, publisher=None, name=name)
        clock.advance(seconds=1)
    clock.advance(seconds=10)
    assert await relay.sweep() == 2
    assert [e.data["name"] for e in sub.received] == ["A", "C"]
    assert await relay.pending() == 1
    [bad] = [r for r in await db.rows() if r.published_at is None]
    assert bad.data["name"] == "Bad"
    assert bad.attempts == 1
    assert bad.last_error is not None
    assert "cannot handle Bad" in bad.last_error


async def test_events_that_always_fail_do_not_starve_newer_ones(db: Db, clock: ManualClock) -> None:
    """A batch's worth of "poison" events (a subscriber that can never handle them) must not stop the
    relay from ever publishing anything newer (a sweep that always claimed the ``batch`` oldest rows,
    failed ones included, starved every later event, cache invalidations included)."""

    class Poisoned(Subscriber):
        async def __call__(self, event: Event) -> None:
            if str(event.data["name"]).startswith("Poison"):
                raise ValueError("can never handle this one")
            await super().__call__(event)

    sub = Poisoned()
    relay = relay_with(db, clock, sub)
    for name in ["Poison 1", "Poison 2", "Good"]:
        await create_tenant(db, clock, publisher=None, name=name)
        clock.advance(seconds=1)
    clock.advance(seconds=10)
    for _ in range(5):  # the background sweeper would keep doing this every couple of seconds
        await relay.sweep(batch=2)
        clock.advance(seconds=10)
    assert [e.data["name"] for e in sub.received] == ["Good"], "the newer event was never published"


async def test_an_event_that_keeps_failing_is_parked_and_can_be_replayed(db: Db, clock: ManualClock) -> None:
    always = 10**6
    sub = Subscriber(fail=always)
    relay = relay_with(db, clock, sub)
    event = await create_tenant(db, clock, publisher=None)
    clock.advance(seconds=10)
    for _ in range(MAX_ATTEMPTS + 3):
        assert await relay.sweep() == 0
    assert always - sub.fail == MAX_ATTEMPTS  # tried exactly MAX_ATTEMPTS times, then left alone
    [row] = await db.rows()
    assert row.attempts == MAX_ATTEMPTS
    assert row.published_at is None
    assert row.last_error is not None
    assert await relay.pending() == 1  # parked, not lost: still counted as unpublished

    sub.fail = 0
    assert await relay.sweep() == 0  # the subscriber is fixed, but parked events wait for an operator
    async with db.sessions() as s, s.begin():
        await s.execute(update(OutboxRow).where(OutboxRow.id == event.id).values(attempts=0))
    assert await relay.sweep() == 1
    assert [e.id for e in sub.received] == [event.id]
    assert await relay.pending() == 0


async def test_sweep_takes_the_oldest_first_in_batches_and_pending_counts(db: Db, clock: ManualClock) -> None:
    sub = Subscriber()
    relay = relay_with(db, clock, sub)
    assert await relay.pending() == 0
    names = [f"T{i}" for i in range(5)]
    for name in names:
        await create_tenant(db, clock, publisher=None, name=name)
        clock.advance(seconds=1)
    assert await relay.pending() == 5
    # Only events older than the grace period are swept: at "now", T0 is 5 s old, T1 4 s.
    assert await relay.sweep() == 1
    assert await relay.pending() == 4
    clock.advance(seconds=10)
    assert await relay.sweep(batch=2) == 2
    assert await relay.pending() == 2
    assert await relay.sweep(batch=2) == 2
    assert await relay.sweep(batch=2) == 0
    assert await relay.pending() == 0
    assert [e.data["name"] for e in sub.received] == names


async def test_the_periodic_sweep_job_publishes_leftovers(db: Db, clock: ManualClock) -> None:
    sub = Subscriber()
    relay = relay_with(db, clock, sub)
    for name in ["A", "B", "C"]:
        await create_tenant(db, clock, publisher=None, name=name)
    clock.advance(seconds=6)
    specs, periodic = outbox_jobs(relay)
    assert [p.name for p in periodic] == [SWEEP_JOB]
    queue = InProcessJobQueue(JobRegistry(specs), clock, periodic=[PeriodicJob(name=SWEEP_JOB, every=1)])
    queue.start()
    try:

        async def drained() -> bool:
            return await relay.pending() == 0

        await eventually(drained, within=5)
    finally:
        await queue.stop()
    assert sorted(e.data["name"] for e in sub.received) == ["A", "B", "C"]


async def test_a_failing_sweep_is_a_failed_job_and_the_next_run_recovers(clock: ManualClock) -> None:
    class FlakyRelay:
        def __init__(self) -> None:
            self.calls = 0

        async def sweep(self) -> int:
            self.calls += 1
            if self.calls == 1:
                raise ConnectionError("database blip")
            if self.calls == 2:
                return 3  # published some: sweep again at once
            return 0

    relay = FlakyRelay()
    specs, _ = outbox_jobs(relay)  # type: ignore[arg-type]
    queue = InProcessJobQueue(JobRegistry(specs), clock)
    queue.start()
    try:
        first = await queue.enqueue(SWEEP_JOB, {})

        async def first_done() -> bool:
            job = await queue.get(first)
            return job is not None and job.status.is_final

        await eventually(first_done, within=5)
        failed = await queue.get(first)
        assert failed is not None
        assert failed.status is JobStatus.FAILED  # no retry: the next tick is the retry
        assert failed.error is not None
        assert failed.error.code == "job-error"
        second = await queue.enqueue(SWEEP_JOB, {})

        async def second_done() -> bool:
            job = await queue.get(second)
            return job is not None and job.status.is_final

        await eventually(second_done, within=5)
        ok = await queue.get(second)
        assert ok is not None
        assert ok.status is JobStatus.SUCCEEDED
        assert ok.result == {"published": 3}
        assert relay.calls == 3
    finally:
        await queue.stop()
