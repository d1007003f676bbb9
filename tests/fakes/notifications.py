"""In-memory notifications storage (stage, then commit), a recording mailer, a fake directory and a fake
payments reader."""

from __future__ import annotations

import copy
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime
from types import TracebackType
from typing import Self

from keel.contexts.accounts.public import TenantSummary, UserSummary
from keel.contexts.notifications.adapters.templates import JinjaTemplateRenderer
from keel.contexts.notifications.domain.model import EmailKind, EmailRecord, EmailStatus, OutgoingEmail
from keel.contexts.notifications.domain.services import NotificationsService
from keel.contexts.payments.domain.model import Payment, PaymentStatus
from keel.contexts.payments.public import PaymentSummary
from keel.platform.domain.events import Event
from keel.platform.ports.clock import Clock


class DatabaseDown(ConnectionError):
    """What the fake raises for a commit it was told to fail."""


@dataclass
class NotificationsState:
    emails: dict[uuid.UUID, EmailRecord] = field(default_factory=dict)
    outbox: list[Event] = field(default_factory=list)
    # The next this many commits fail, as if the database went away at that moment (nothing is written).
    fail_commits: int = 0
    commits: int = 0


def _same_email(a: EmailRecord, b: EmailRecord) -> bool:
    return (a.event_id, a.kind, a.recipient) == (b.event_id, b.kind, b.recipient)


class InMemoryEmailLog:
    """Reads see the committed state as of the start of the unit of work plus its own writes; ``add``
    also checks what other units of work committed since, as a unique constraint does."""

    def __init__(self, snapshot: dict[uuid.UUID, EmailRecord], committed: NotificationsState) -> None:
        self._snapshot = snapshot
        self._committed = committed
        self.changes: dict[uuid.UUID, EmailRecord] = {}

    def _visible(self) -> dict[uuid.UUID, EmailRecord]:
        return {**self._snapshot, **self.changes}

    async def find(self, event_id: uuid.UUID, kind: EmailKind, recipient: str) -> EmailRecord | None:
        for r in self._visible().values():
            if (r.event_id, r.kind, r.recipient) == (event_id, kind, recipient):
                return copy.deepcopy(r)
        return None

    async def add(self, record: EmailRecord) -> bool:
        existing = [*self._visible().values(), *self._committed.emails.values()]
        if any(_same_email(r, record) for r in existing):
            return False
        if record.id in self._visible() or record.id in self._committed.emails:
            raise ValueError("duplicate primary key")
        self.changes[record.id] = copy.deepcopy(record)
        return True

    async def mark_sent(self, record_id: uuid.UUID, at: datetime) -> None:
        current = self._visible().get(record_id) or self._committed.emails.get(record_id)
        if current is not None:
            self.changes[record_id] = replace(current, status=EmailStatus.SENT, sent_at=at)


class InMemoryNotificationsUnitOfWork:
    """Writes are staged; ``commit`` applies them to the shared state, leaving without it discards them."""

    def __init__(self, committed: NotificationsState) -> None:
        self._committed = committed
        self._events: list[Event] = []

    def record(self, event: Event) -> None:
        self._events.append(event)

    @property
    def emails(self) -> InMemoryEmailLog:
        return self._emails

    async def __aenter__(self) -> Self:
        self._events = []
        self._emails = InMemoryEmailLog(copy.deepcopy(self._committed.emails), self._committed)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._emails.changes = {}
        self._events = []

    async def commit(self) -> None:
        if self._committed.fail_commits > 0:
            self._committed.fail_commits -= 1
            raise DatabaseDown("the database went away during commit")
        self._committed.emails.update(copy.deepcopy(self._emails.changes))
        self._emails.changes = {}
        self._committed.outbox.extend(self._events)
        self._events = []
        self._committed.commits += 1


class MailerDown(ConnectionError):
    """What the recording mailer raises for a send it was told to fail."""


class RecordingMailer:
    """Keeps every email handed to it; the first ``fail`` sends raise instead (the mail server is down)."""

    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.sent: list[OutgoingEmail] = []
        self.attempts = 0

    async def send(self, email: OutgoingEmail) -> None:
        self.attempts += 1
        if self.fail > 0:
            self.fail -= 1
            raise MailerDown("mail server unreachable")
        self.sent.append(email)


class FakeDirectory:
    """The accounts context's read-only directory, as plain dictionaries the test fills and changes."""

    def __init__(self) -> None:
        self.tenants: dict[uuid.UUID, TenantSummary] = {}
        self.users: dict[uuid.UUID, UserSummary] = {}

    def add_tenant(self, name: str, locale: str = "en") -> TenantSummary:
        t = TenantSummary(id=uuid.uuid4(), name=name, locale=locale)
        self.tenants[t.id] = t
        return t

    def add_user(self, tenant: TenantSummary, email: str, name: str) -> UserSummary:
        u = UserSummary(id=uuid.uuid4(), tenant_id=tenant.id, email=email, name=name)
        self.users[u.id] = u
        return u

    def remove_user(self, user_id: uuid.UUID) -> None:
        del self.users[user_id]

    async def find_tenant(self, tenant_id: uuid.UUID) -> TenantSummary | None:
        return self.tenants.get(tenant_id)

    async def find_user(self, tenant_id: uuid.UUID, user_id: uuid.UUID) -> UserSummary | None:
        u = self.users.get(user_id)
        return u if u is not None and u.tenant_id == tenant_id else None


class FakePayments:
    """The payments context's read-only view (``PaymentsReader``) over real ``Payment`` values the test
    adds and changes through the payment model itself (captures, refunds), so the summaries it answers
    are what the payments context would report at that moment."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self.payments: dict[uuid.UUID, Payment] = {}
        self.lookups: list[tuple[uuid.UUID, uuid.UUID]] = []  # (tenant id, payment id), one per find

    def add_payment(
        self,
        tenant: TenantSummary,
        amount: int,
        currency: str = "EUR",
        *,
        customer_email: str | None = "buyer@example.test",
        description: str = "Order #1042",
        succeeded: bool = True,
    ) -> Payment:
        now = self._clock.now()
        p = Payment(
            id=uuid.uuid4(),
            tenant_id=tenant.id,
            amount=amount,
            currency=currency,
            payment_method="pm_card_visa",
            description=description,
            customer_email=customer_email,
            metadata={},
            status=PaymentStatus.PENDING,
            provider="sandbox",
            created_at=now,
            updated_at=now,
        )
        if succeeded:
            p = p.succeed(f"ch_fake_{p.id.hex[:8]}", now)
        self.payments[p.id] = p
        return p

    def refund(self, payment_id: uuid.UUID, amount: int) -> Payment:
        """Reserve and settle a refund of ``amount``, as the refund job does once the provider agreed."""
        now = self._clock.now()
        reserved, taken = self.payments[payment_id].reserve_refund(amount, now)
        self.payments[payment_id] = reserved.settle_refund(taken, now)
        return self.payments[payment_id]

    def remove(self, payment_id: uuid.UUID) -> None:
        del self.payments[payment_id]

    async def find_payment(self, tenant_id: uuid.UUID, payment_id: uuid.UUID) -> PaymentSummary | None:
        self.lookups.append((tenant_id, payment_id))
        p = self.payments.get(payment_id)
        if p is None or p.tenant_id != tenant_id:
            return None
        return PaymentSummary.of(p)


def notifications_service(
    state: NotificationsState,
    mailer: RecordingMailer,
    directory: FakeDirectory,
    clock: Clock,
    payments: FakePayments | None = None,
) -> NotificationsService:
    """The notifications service as the composition root wires it, on in-memory adapters (real templates)."""
    return NotificationsService(
        lambda: InMemoryNotificationsUnitOfWork(state),
        mailer,
        JinjaTemplateRenderer(),
        directory,
        payments if payments is not None else FakePayments(clock),
        clock,
    )
