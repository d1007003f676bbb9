"""One contract for the email ledger (``EmailLog`` in its unit of work), run against the fake, SQLite and
Postgres: the ledger is what makes "one email per event" hold, so every backend must agree on it."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.exc import OperationalError

from keel.contexts.notifications.adapters.sql.repositories import SqlNotificationsUnitOfWork
from keel.contexts.notifications.domain.model import EmailKind, EmailRecord, EmailStatus, message_id
from keel.contexts.notifications.ports.repositories import NotificationsUnitOfWork
from keel.platform.domain.ids import new_id
from tests.fakes.notifications import InMemoryNotificationsUnitOfWork, NotificationsState
from tests.support.storage import BACKENDS, backend_of, uow_factory

NOW = datetime(2026, 3, 1, 9, 30, tzinfo=UTC)

UowFactory = Callable[[], NotificationsUnitOfWork]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return backend_of(request)


@pytest.fixture
async def uow(backend: str) -> AsyncIterator[UowFactory]:
    state = NotificationsState()
    async with uow_factory(
        backend, lambda: InMemoryNotificationsUnitOfWork(state), SqlNotificationsUnitOfWork
    ) as factory:
        yield factory


def record(
    event_id: uuid.UUID | None = None,
    kind: EmailKind = EmailKind.WELCOME,
    recipient: str = "owner@acme.test",
    tenant_id: uuid.UUID | None = None,
) -> EmailRecord:
    event_id = event_id or new_id()
    return EmailRecord(
        id=new_id(),
        tenant_id=tenant_id or new_id(),
        event_id=event_id,
        kind=kind,
        recipient=recipient,
        message_id=message_id(event_id, kind, "keel.localhost"),
        status=EmailStatus.SENDING,
        created_at=NOW,
    )


async def test_an_added_record_is_found_by_event_kind_and_recipient(uow: UowFactory) -> None:
    r = record()
    async with uow() as u:
        assert await u.emails.find(r.event_id, r.kind, r.recipient) is None
        assert await u.emails.add(r) is True
        await u.commit()
    async with uow() as u:
        found = await u.emails.find(r.event_id, r.kind, r.recipient)
        assert found == r
        assert found is not None
        assert found.created_at.tzinfo is not None
        assert found.sent_at is None
        # Every part of the key matters.
        assert await u.emails.find(new_id(), r.kind, r.recipient) is None
        assert await u.emails.find(r.event_id, EmailKind.USER_INVITE, r.recipient) is None
        assert await u.emails.find(r.event_id, r.kind, "someone.else@acme.test") is None


async def test_a_record_is_visible_to_its_own_unit_of_work_before_commit(uow: UowFactory) -> None:
    r = record()
    async with uow() as u:
        assert await u.emails.add(r) is True
        assert await u.emails.find(r.event_id, r.kind, r.recipient) == r


async def test_leaving_without_commit_discards_the_record(uow: UowFactory) -> None:
    r = record()
    async with uow() as u:
        assert await u.emails.add(r) is True
    async with uow() as u:
        assert await u.emails.find(r.event_id, r.kind, r.recipient) is None
        # Nothing was left behind that would block a later run.
        assert await u.emails.add(replace(r, id=new_id())) is True
        await u.commit()


async def test_a_second_record_for_the_same_email_is_refused_and_the_first_kept(uow: UowFactory) -> None:
    first = record()
    async with uow() as u:
        assert await u.emails.add(first) is True
        await u.commit()
    twin = replace(first, id=new_id(), message_id="<other@keel.localhost>", created_at=NOW + timedelta(minutes=1))
    async with uow() as u:
        assert await u.emails.add(twin) is False
        # The refusal leaves the unit of work usable: later work in it still commits.
        other = record(event_id=first.event_id, kind=EmailKind.USER_INVITE, recipient="ada@acme.test")
        assert await u.emails.add(other) is True
        await u.commit()
    async with uow() as u:
        assert await u.emails.find(first.event_id, first.kind, first.recipient) == first
        assert await u.emails.find(other.event_id, other.kind, other.recipient) == other


async def test_a_duplicate_inside_one_unit_of_work_is_refused_too(uow: UowFactory) -> None:
    first = record()
    async with uow() as u:
        assert await u.emails.add(first) is True
        assert await u.emails.add(replace(first, id=new_id())) is False
        await u.commit()
    async with uow() as u:
        assert await u.emails.find(first.event_id, first.kind, first.recipient) == first


async def test_a_duplicate_committed_by_another_unit_of_work_meanwhile_is_refused(
    uow: UowFactory, backend: str
) -> None:
    """Two runs of the same job: both looked and found nothing; the one that adds second loses."""
    mine = record()
    theirs = replace(mine, id=new_id())
    async with uow() as slow:
        assert await slow.emails.find(mine.event_id, mine.kind, mine.recipient) is None
        async with uow() as fast:
            assert await fast.emails.add(theirs) is True
            await fast.commit()
        try:
            added = await slow.emails.add(mine)
        except OperationalError:
            # SQLite has a single writer and snapshot reads: a transaction that read before another one
            # committed cannot write after it ("database is locked"). Refused all the same: the job
            # fails, and its retry finds the record.
            assert backend.startswith("sqlite")
            added = False
        assert added is False
    async with uow() as u:
        assert await u.emails.find(mine.event_id, mine.kind, mine.recipient) == theirs


async def test_the_same_event_may_owe_different_kinds_and_recipients(uow: UowFactory) -> None:
    event_id = new_id()
    records = [
        record(event_id, EmailKind.WELCOME, "owner@acme.test"),
        record(event_id, EmailKind.USER_INVITE, "owner@acme.test"),
        record(event_id, EmailKind.WELCOME, "ada@acme.test"),
    ]
    async with uow() as u:
        for r in records:
            assert await u.emails.add(r) is True
        await u.commit()
    async with uow() as u:
        for r in records:
            assert await u.emails.find(r.event_id, r.kind, r.recipient) == r


async def test_mark_sent_records_status_and_time_of_that_record_only(uow: UowFactory) -> None:
    sent, other = record(), record()
    async with uow() as u:
        await u.emails.add(sent)
        await u.emails.add(other)
        await u.commit()
    at = NOW + timedelta(seconds=3, microseconds=250_000)
    async with uow() as u:
        await u.emails.mark_sent(sent.id, at)
        await u.commit()
    async with uow() as u:
        assert await u.emails.find(sent.event_id, sent.kind, sent.recipient) == replace(
            sent, status=EmailStatus.SENT, sent_at=at
        )
        assert await u.emails.find(other.event_id, other.kind, other.recipient) == other
        # Marking an unknown record is a no-op, not an error.
        await u.emails.mark_sent(new_id(), at)
        await u.commit()


async def test_mark_sent_without_commit_leaves_the_record_sending(uow: UowFactory) -> None:
    r = record()
    async with uow() as u:
        await u.emails.add(r)
        await u.commit()
    async with uow() as u:
        await u.emails.mark_sent(r.id, NOW)
    async with uow() as u:
        found = await u.emails.find(r.event_id, r.kind, r.recipient)
        assert found is not None
        assert found.status is EmailStatus.SENDING
        assert found.sent_at is None
