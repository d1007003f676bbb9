"""The notifications service through in-memory fakes: which event owes which email, to whom, with what,
and that each email is sent once per event however often the job runs (and sent again only when an
earlier run may have died around the send). Payment receipts and refund emails go to the payment's
customer, drafted from the payment as the payments context reports it when the job runs."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Self

import pytest

from keel.contexts.accounts.public import TenantSummary, UserSummary
from keel.contexts.notifications.adapters.templates import JinjaTemplateRenderer
from keel.contexts.notifications.domain.model import EmailKind, EmailRecord, EmailStatus, OutgoingEmail
from keel.contexts.notifications.domain.services import TRIGGERS, NotificationsService
from keel.contexts.payments.domain.model import Payment
from keel.platform.domain.events import Event
from tests.fakes.clock import ManualClock
from tests.fakes.notifications import (
    DatabaseDown,
    FakeDirectory,
    FakePayments,
    InMemoryNotificationsUnitOfWork,
    MailerDown,
    NotificationsState,
    RecordingMailer,
    notifications_service,
)


@dataclass
class World:
    state: NotificationsState
    mailer: RecordingMailer
    directory: FakeDirectory
    payments: FakePayments
    clock: ManualClock
    service: NotificationsService
    tenant: TenantSummary
    user: UserSummary


SKIPPED = "skipped: no recipient (it no longer exists, or none was given)"


@pytest.fixture
def world() -> World:
    state, mailer, directory, clock = NotificationsState(), RecordingMailer(), FakeDirectory(), ManualClock()
    payments = FakePayments(clock)
    tenant = directory.add_tenant("Acme Rockets")
    user = directory.add_user(tenant, "ada@acme.test", "Ada Lovelace")
    service = notifications_service(state, mailer, directory, clock, payments)
    return World(state, mailer, directory, payments, clock, service, tenant, user)


def tenant_created(w: World) -> Event:
    return Event(
        type="tenant.created",
        tenant_id=w.tenant.id,
        occurred_at=w.clock.now(),
        data={
            "name": w.tenant.name,
            "owner_user_id": str(uuid.uuid4()),
            "owner_email": "owner@acme.test",
            "owner_name": "Olive Owner",
        },
    )


def user_created(w: World, user: UserSummary | None = None) -> Event:
    u = user or w.user
    return Event(
        type="user.created",
        tenant_id=u.tenant_id,
        occurred_at=w.clock.now(),
        data={"user_id": str(u.id), "email": u.email, "name": u.name},
    )


async def test_tenant_created_sends_a_welcome_to_the_owner(world: World) -> None:
    event = tenant_created(world)
    assert await world.service.send_for_event(event) == "sent"

    [email] = world.mailer.sent
    assert email.to == "owner@acme.test"
    assert email.subject == "Welcome to Keel, Acme Rockets"
    assert "Hello Olive Owner," in email.text
    assert "<strong>Acme Rockets</strong>" in email.html
    assert email.message_id == f"<{event.id}.welcome@keel.localhost>"
    assert email.headers["X-Keel-Event-Id"] == str(event.id)


async def test_user_created_sends_an_invite_naming_the_tenant_from_the_directory(world: World) -> None:
    event = user_created(world)
    assert await world.service.send_for_event(event) == "sent"

    [email] = world.mailer.sent
    assert email.to == "ada@acme.test"
    assert email.subject == "You have been added to Acme Rockets"
    assert "Hello Ada Lovelace," in email.text
    assert "<strong>Acme Rockets</strong>" in email.html
    assert email.message_id == f"<{event.id}.user_invite@keel.localhost>"


async def test_the_invite_uses_current_directory_state_not_the_event_snapshot(world: World) -> None:
    """The job runs after the fact: a renamed user or tenant is addressed as they are now."""
    event = user_created(world)
    world.directory.users[world.user.id] = UserSummary(
        id=world.user.id, tenant_id=world.tenant.id, email="ada.l@acme.test", name="Ada L."
    )
    world.directory.tenants[world.tenant.id] = TenantSummary(id=world.tenant.id, name="Acme Space", locale="en")
    await world.service.send_for_event(event)

    [email] = world.mailer.sent
    assert email.to == "ada.l@acme.test"
    assert email.subject == "You have been added to Acme Space"
    assert "Hello Ada L.," in email.text


@pytest.mark.parametrize("event_type", ["user.updated", "user.deleted", "tenant.updated", "api_key.created"])
async def test_other_events_owe_no_email(world: World, event_type: str) -> None:
    event = Event(
        type=event_type, tenant_id=world.tenant.id, occurred_at=world.clock.now(), data={"user_id": str(world.user.id)}
    )
    assert await world.service.send_for_event(event) == "no email for this event"
    assert world.mailer.attempts == 0
    assert world.state.emails == {}


async def test_the_same_event_handled_twice_sends_one_email(world: World) -> None:
    for event in (tenant_created(world), user_created(world)):
        assert await world.service.send_for_event(event) == "sent"
        world.clock.advance(seconds=30)
        assert await world.service.send_for_event(event) == "already sent"
        assert await world.service.send_for_event(event) == "already sent"

    assert [e.to for e in world.mailer.sent] == ["owner@acme.test", "ada@acme.test"]
    assert world.mailer.attempts == 2
    records = sorted(world.state.emails.values(), key=lambda r: r.created_at)
    assert [(r.kind, r.recipient, r.status) for r in records] == [
        (EmailKind.WELCOME, "owner@acme.test", EmailStatus.SENT),
        (EmailKind.USER_INVITE, "ada@acme.test", EmailStatus.SENT),
    ]
    # Sent times are the first (only) send, not a later no-op run.
    assert records[0].sent_at == records[0].created_at


async def test_different_events_of_the_same_kind_each_get_their_email(world: World) -> None:
    first, second = user_created(world), user_created(world)
    await world.service.send_for_event(first)
    await world.service.send_for_event(second)
    assert len(world.mailer.sent) == 2
    assert world.mailer.sent[0].message_id != world.mailer.sent[1].message_id


async def test_a_mailer_failure_raises_and_the_next_run_sends_exactly_once(world: World) -> None:
    world.mailer.fail = 1
    event = user_created(world)
    with pytest.raises(MailerDown):
        await world.service.send_for_event(event)
    assert world.mailer.sent == []
    [pending] = world.state.emails.values()
    assert pending.status is EmailStatus.SENDING

    world.clock.advance(seconds=10)
    assert await world.service.send_for_event(event) == "sent"
    assert await world.service.send_for_event(event) == "already sent"

    [email] = world.mailer.sent
    assert email.message_id == pending.message_id
    [done] = world.state.emails.values()
    assert done.id == pending.id
    assert done.status is EmailStatus.SENT
    assert done.sent_at == world.clock.now()


async def test_a_crash_after_the_send_sends_again_with_the_same_message_id(world: World) -> None:
    """At least once: the mail left but "sent" was not recorded, so the retry sends again, and the
    unchanged Message-ID lets mail systems fold the duplicate."""
    state = world.state

    class DatabaseFailsAfterFirstSend(RecordingMailer):
        async def send(self, email: OutgoingEmail) -> None:
            await super().send(email)
            if len(self.sent) == 1:
                state.fail_commits = 1  # the commit recording "sent" fails

    mailer = DatabaseFailsAfterFirstSend()
    service = notifications_service(state, mailer, world.directory, world.clock, world.payments)
    event = tenant_created(world)
    with pytest.raises(DatabaseDown):
        await service.send_for_event(event)
    [record] = state.emails.values()
    assert record.status is EmailStatus.SENDING

    assert await service.send_for_event(event) == "sent"
    assert await service.send_for_event(event) == "already sent"

    assert len(mailer.sent) == 2
    assert mailer.sent[0].message_id == mailer.sent[1].message_id == record.message_id
    [record] = state.emails.values()
    assert record.status is EmailStatus.SENT


async def test_a_user_deleted_before_the_job_runs_is_skipped(world: World) -> None:
    event = user_created(world)
    world.directory.remove_user(world.user.id)
    assert await world.service.send_for_event(event) == SKIPPED
    assert world.mailer.attempts == 0
    assert world.state.emails == {}


async def test_a_tenant_gone_before_the_job_runs_is_skipped(world: World) -> None:
    event = user_created(world)
    del world.directory.tenants[world.tenant.id]
    assert await world.service.send_for_event(event) == SKIPPED
    assert world.mailer.attempts == 0


async def test_a_user_of_another_tenant_is_not_found(world: World) -> None:
    """The directory lookup is tenant-scoped: an event cannot address another tenant's user."""
    other = world.directory.add_tenant("Globex")
    event = Event(
        type="user.created",
        tenant_id=other.id,
        occurred_at=world.clock.now(),
        data={"user_id": str(world.user.id), "email": world.user.email, "name": world.user.name},
    )
    assert await world.service.send_for_event(event) == SKIPPED
    assert world.mailer.sent == []


async def test_a_run_that_loses_the_race_for_the_ledger_does_not_send(world: World) -> None:
    """Two runs of the same job at once: both look and find no record; the one whose add is refused
    leaves the email to the other and sends nothing."""
    event = user_created(world)
    racer_mailer, slow_mailer = RecordingMailer(), RecordingMailer()
    racer = notifications_service(world.state, racer_mailer, world.directory, world.clock, world.payments)
    raced = False

    class RacingUnitOfWork(InMemoryNotificationsUnitOfWork):
        """The other run completes between this run's ``find`` and its ``add``."""

        async def __aenter__(self) -> Self:
            await super().__aenter__()
            log = self.emails
            find = log.find

            async def find_then_race(event_id: uuid.UUID, kind: EmailKind, recipient: str) -> EmailRecord | None:
                nonlocal raced
                found = await find(event_id, kind, recipient)
                if found is None and not raced:
                    raced = True
                    assert await racer.send_for_event(event) == "sent"
                return found

            log.find = find_then_race  # type: ignore[method-assign]
            return self

    slow = NotificationsService(
        lambda: RacingUnitOfWork(world.state),
        slow_mailer,
        JinjaTemplateRenderer(),
        world.directory,
        world.payments,
        world.clock,
    )
    assert await slow.send_for_event(event) == "skipped: another run owns this email"
    assert raced
    assert slow_mailer.attempts == 0
    assert len(racer_mailer.sent) == 1
    [record] = world.state.emails.values()
    assert record.status is EmailStatus.SENT


# -- payments -----------------------------------------------------------------------------------------------


def payment_event(w: World, event_type: str, payment: Payment, **refund: Any) -> Event:
    """A payment event with its data as the payments context records it (``refund``: the refund's fields)."""
    return Event(
        type=event_type,
        tenant_id=payment.tenant_id,
        occurred_at=w.clock.now(),
        data={
            "payment_id": str(payment.id),
            "amount": payment.amount,
            "currency": payment.currency,
            "status": payment.status.value,
            "amount_refunded": payment.amount_refunded,
            "description": payment.description,
            "customer_email": payment.customer_email,
            "metadata": dict(payment.metadata),
            "provider_reference": payment.provider_reference,
            **refund,
        },
    )


def refunded(w: World, payment: Payment, amount: int) -> Event:
    """Settle a refund of ``amount`` on ``payment`` and return its ``payment.refunded`` event."""
    after = w.payments.refund(payment.id, amount)
    return payment_event(
        w,
        "payment.refunded",
        after,
        refund_id=str(uuid.uuid4()),
        refund_amount=amount,
        refund_status="succeeded",
        refund_reason=None,
    )


def owed(w: World, event_type: str, payment: Payment) -> Event:
    """The event of ``event_type`` for ``payment`` (``payment.refunded``: after a refund of 5.00)."""
    return refunded(w, payment, 500) if event_type == "payment.refunded" else payment_event(w, event_type, payment)


def test_payment_events_that_owe_an_email() -> None:
    assert TRIGGERS["payment.succeeded"] is EmailKind.PAYMENT_RECEIPT
    assert TRIGGERS["payment.refunded"] is EmailKind.REFUND_RECEIPT
    for event_type in ("payment.created", "payment.failed", "payment.refund_failed", "refund.created"):
        assert event_type not in TRIGGERS


@pytest.mark.parametrize(
    ("amount", "currency", "display"),
    [(2500, "EUR", "25.00 EUR"), (1500, "JPY", "1500 JPY"), (1234, "KWD", "1.234 KWD"), (7, "USD", "0.07 USD")],
)
async def test_a_succeeded_payment_sends_a_receipt_to_its_customer(
    world: World, amount: int, currency: str, display: str
) -> None:
    payment = world.payments.add_payment(world.tenant, amount, currency, customer_email="buyer@example.test")
    world.clock.advance(minutes=3)  # the receipt is dated with the payment, not with the job
    event = payment_event(world, "payment.succeeded", payment)
    assert await world.service.send_for_event(event) == "sent"

    [email] = world.mailer.sent
    assert email.to == "buyer@example.test"
    assert email.subject == f"Your receipt from Acme Rockets: {display}"
    assert f"Thank you for your payment to Acme Rockets.\n\nAmount paid: {display}\n" in email.text
    assert "For: Order #1042\n" in email.text
    assert "Date: 2026-01-01 12:00 UTC\n" in email.text
    assert f"Payment reference: {payment.id}\n" in email.text
    assert f"<strong>{display}</strong>" in email.html
    assert f"<code>{payment.id}</code>" in email.html
    assert email.message_id == f"<{event.id}.payment_receipt@keel.localhost>"
    assert email.headers["X-Keel-Event-Id"] == str(event.id)
    assert world.payments.lookups == [(world.tenant.id, payment.id)]
    [record] = world.state.emails.values()
    assert (record.kind, record.recipient, record.status) == (
        EmailKind.PAYMENT_RECEIPT,
        "buyer@example.test",
        EmailStatus.SENT,
    )


async def test_a_receipt_without_a_description_leaves_the_line_out(world: World) -> None:
    payment = world.payments.add_payment(world.tenant, 990, description="")
    assert await world.service.send_for_event(payment_event(world, "payment.succeeded", payment)) == "sent"
    [email] = world.mailer.sent
    assert "For:" not in email.text
    assert ">For<" not in email.html
    assert "Amount paid: 9.90 EUR\nDate: 2026-01-01 12:00 UTC\n" in email.text


async def test_a_receipt_names_the_tenant_as_it_is_now(world: World) -> None:
    payment = world.payments.add_payment(world.tenant, 2500)
    event = payment_event(world, "payment.succeeded", payment)
    world.directory.tenants[world.tenant.id] = TenantSummary(id=world.tenant.id, name="Acme Space", locale="en")
    await world.service.send_for_event(event)
    [email] = world.mailer.sent
    assert email.subject == "Your receipt from Acme Space: 25.00 EUR"


async def test_a_refund_email_names_this_refund_and_what_is_refunded_by_now(world: World) -> None:
    """Two partial refunds settled before the first one's job runs: each email names its own refund (from
    the event) and the total refunded so far (from the payment as it is now)."""
    payment = world.payments.add_payment(world.tenant, 10_000, customer_email="buyer@example.test")
    first = refunded(world, payment, 3_000)
    second = refunded(world, payment, 2_000)

    assert await world.service.send_for_event(first) == "sent"
    assert await world.service.send_for_event(second) == "sent"

    one, two = world.mailer.sent
    assert one.to == two.to == "buyer@example.test"
    assert one.subject == "Acme Rockets refunded 30.00 EUR"
    assert two.subject == "Acme Rockets refunded 20.00 EUR"
    assert "Acme Rockets has refunded 30.00 EUR of your payment of 100.00 EUR.\n" in one.text
    assert "Acme Rockets has refunded 20.00 EUR of your payment of 100.00 EUR.\n" in two.text
    for email in (one, two):
        assert "For: Order #1042\n" in email.text
        assert f"Payment reference: {payment.id}\n" in email.text
        assert "Refunded so far: 50.00 EUR\n" in email.text
        assert "<td>50.00 EUR</td>" in email.html
    assert "<strong>30.00 EUR</strong>" in one.html
    assert one.message_id == f"<{first.id}.refund_receipt@keel.localhost>"
    assert two.message_id == f"<{second.id}.refund_receipt@keel.localhost>"
    assert {r.kind for r in world.state.emails.values()} == {EmailKind.REFUND_RECEIPT}


async def test_a_full_refund_in_a_zero_decimal_currency(world: World) -> None:
    payment = world.payments.add_payment(world.tenant, 1500, "JPY")
    event = refunded(world, payment, 1500)
    assert await world.service.send_for_event(event) == "sent"
    [email] = world.mailer.sent
    assert email.subject == "Acme Rockets refunded 1500 JPY"
    assert "of your payment of 1500 JPY." in email.text
    assert "Refunded so far: 1500 JPY\n" in email.text


@pytest.mark.parametrize("event_type", ["payment.succeeded", "payment.refunded"])
async def test_a_payment_without_a_customer_email_is_skipped(world: World, event_type: str) -> None:
    """No customer email given: the tenant sends its own receipts; nothing is sent or recorded."""
    payment = world.payments.add_payment(world.tenant, 2500, customer_email=None)
    event = owed(world, event_type, payment)
    assert await world.service.send_for_event(event) == SKIPPED
    assert world.mailer.attempts == 0
    assert world.state.emails == {}
    assert world.state.commits == 0


@pytest.mark.parametrize("event_type", ["payment.succeeded", "payment.refunded"])
async def test_a_payment_gone_before_the_job_runs_is_skipped(world: World, event_type: str) -> None:
    payment = world.payments.add_payment(world.tenant, 2500)
    event = owed(world, event_type, payment)
    world.payments.remove(payment.id)
    assert await world.service.send_for_event(event) == SKIPPED
    assert world.mailer.attempts == 0
    assert world.state.emails == {}


@pytest.mark.parametrize("event_type", ["payment.succeeded", "payment.refunded"])
async def test_a_tenant_gone_before_a_payment_job_runs_is_skipped(world: World, event_type: str) -> None:
    payment = world.payments.add_payment(world.tenant, 2500)
    event = owed(world, event_type, payment)
    del world.directory.tenants[world.tenant.id]
    assert await world.service.send_for_event(event) == SKIPPED
    assert world.mailer.attempts == 0
    assert world.state.emails == {}


async def test_a_payment_of_another_tenant_is_not_found(world: World) -> None:
    """The payment lookup is tenant-scoped: an event of one tenant cannot address another's payment."""
    other = world.directory.add_tenant("Globex")
    payment = world.payments.add_payment(world.tenant, 2500)
    event = payment_event(world, "payment.succeeded", payment)
    foreign = Event(type=event.type, tenant_id=other.id, occurred_at=event.occurred_at, data=event.data)
    assert await world.service.send_for_event(foreign) == SKIPPED
    assert world.payments.lookups == [(other.id, payment.id)]
    assert world.mailer.sent == []


@pytest.mark.parametrize("event_type", ["payment.succeeded", "payment.refunded"])
async def test_a_payment_email_is_sent_once_however_often_the_job_runs(world: World, event_type: str) -> None:
    payment = world.payments.add_payment(world.tenant, 2500)
    event = owed(world, event_type, payment)
    assert await world.service.send_for_event(event) == "sent"
    world.clock.advance(seconds=30)
    assert await world.service.send_for_event(event) == "already sent"
    assert await world.service.send_for_event(event) == "already sent"

    assert len(world.mailer.sent) == 1
    assert world.mailer.attempts == 1
    [record] = world.state.emails.values()
    assert record.status is EmailStatus.SENT
    assert record.sent_at == record.created_at
