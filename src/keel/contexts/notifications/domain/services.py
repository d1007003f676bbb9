"""Which event owes which email, and sending each one at most once per event."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass

from keel.contexts.accounts.public import Directory
from keel.contexts.notifications.domain.model import EmailKind, EmailRecord, EmailStatus, OutgoingEmail, message_id
from keel.contexts.notifications.ports.repositories import Mailer, NotificationsUnitOfWork, TemplateRenderer
from keel.contexts.payments.public import PaymentsReader, format_amount
from keel.platform.domain.events import Event
from keel.platform.domain.ids import new_id
from keel.platform.ports.clock import Clock

SEND_JOB = "notifications.send_for_event"
# Events that owe an email.
TRIGGERS = {
    "tenant.created": EmailKind.WELCOME,
    "user.created": EmailKind.USER_INVITE,
    "payment.succeeded": EmailKind.PAYMENT_RECEIPT,
    "payment.refunded": EmailKind.REFUND_RECEIPT,
}


@dataclass(frozen=True, slots=True)
class Draft:
    to: str
    values: dict[str, object]


class NotificationsService:
    def __init__(
        self,
        uow: Callable[[], NotificationsUnitOfWork],
        mailer: Mailer,
        renderer: TemplateRenderer,
        directory: Directory,
        payments: PaymentsReader,
        clock: Clock,
        *,
        message_id_domain: str = "keel.localhost",
    ) -> None:
        self._uow = uow
        self._mailer = mailer
        self._renderer = renderer
        self._directory = directory
        self._payments = payments
        self._clock = clock
        self._domain = message_id_domain

    async def _draft(self, kind: EmailKind, event: Event) -> Draft | None:
        """What to send, from current state; None when it no longer makes sense (user since deleted)."""
        d = event.data
        if kind is EmailKind.WELCOME:
            return Draft(to=d["owner_email"], values={"name": d["owner_name"], "organization": d["name"]})
        tenant = await self._directory.find_tenant(event.tenant_id)
        if tenant is None:
            return None
        if kind is EmailKind.USER_INVITE:
            user = await self._directory.find_user(event.tenant_id, uuid.UUID(d["user_id"]))
            if user is None:
                return None
            return Draft(to=user.email, values={"name": user.name, "organization": tenant.name})
        payment = await self._payments.find_payment(event.tenant_id, uuid.UUID(d["payment_id"]))
        if payment is None or payment.customer_email is None:
            return None  # no customer email given: the tenant sends its own receipts
        values: dict[str, object] = {
            "organization": tenant.name,
            "amount": payment.amount_display,
            "description": payment.description,
            "payment_id": str(payment.id),
            "paid_at": payment.created_at.strftime("%Y-%m-%d %H:%M UTC"),
        }
        if kind is EmailKind.REFUND_RECEIPT:
            # The event names the refund this email is for; the payment says what is refunded by now.
            values["refund_amount"] = format_amount(int(d["refund_amount"]), payment.currency)
            values["refunded_total"] = payment.amount_refunded_display
        return Draft(to=payment.customer_email, values=values)

    async def send_for_event(self, event: Event) -> str:
        kind = TRIGGERS.get(event.type)
        if kind is None:
            return "no email for this event"
        draft = await self._draft(kind, event)
        if draft is None:
            return "skipped: no recipient (it no longer exists, or none was given)"
        async with self._uow() as uow:
            record = await uow.emails.find(event.id, kind, draft.to)
            if record is None:
                record = EmailRecord(
                    id=new_id(),
                    tenant_id=event.tenant_id,
                    event_id=event.id,
                    kind=kind,
                    recipient=draft.to,
                    message_id=message_id(event.id, kind, self._domain),
                    status=EmailStatus.SENDING,
                    created_at=self._clock.now(),
                )
                if not await uow.emails.add(record):
                    return "skipped: another run owns this email"
                await uow.commit()
        if record.status is EmailStatus.SENT:
            return "already sent"
        # A record left "sending" means an earlier run died around the send: sending again is the
        # at-least-once choice, and the unchanged Message-ID lets mail systems fold a duplicate.
        rendered = self._renderer.render(kind, draft.values)
        await self._mailer.send(
            OutgoingEmail(
                to=draft.to,
                subject=rendered.subject,
                text=rendered.text,
                html=rendered.html,
                message_id=record.message_id,
                headers={"X-Keel-Event-Id": str(event.id)},
            )
        )
        async with self._uow() as uow:
            await uow.emails.mark_sent(record.id, self._clock.now())
            await uow.commit()
        return "sent"
