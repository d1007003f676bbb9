"""Emails over the real app: events from the HTTP API become jobs that render and send mail, through the
embedded default (``.eml`` files under the data directory) or a real SMTP server (aiosmtpd on loopback),
once per event however often the event is published again."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from email import message_from_bytes, policy
from email.message import EmailMessage
from email.utils import parseaddr
from pathlib import Path
from typing import Any, TypeVar, cast

from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy import select, update

from keel.contexts.notifications.domain.services import SEND_JOB, TRIGGERS
from keel.main.container import Container
from keel.platform.adapters.jobs.in_process import InProcessJobQueue
from keel.platform.adapters.sql.outbox import OutboxRow, SqlOutboxRelay
from keel.platform.domain.events import Event, event_to_args
from keel.platform.domain.jobs import JobStatus
from tests.support.app import client_for, make_settings, signup
from tests.support.smtp import smtp_server
from tests.support.waiting import eventually

T = TypeVar("T")


def container_of(client: AsyncTestClient[Litestar]) -> Container:
    return cast(Container, client.app.state["container"])


async def on_app(client: AsyncTestClient[Litestar], fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run ``fn(*args)`` on the app's own event loop, where its engine and job runners live."""
    return await asyncio.to_thread(client.blocking_portal.call, fn, *args)


def parse(data: bytes) -> EmailMessage:
    return message_from_bytes(data, policy=policy.default)


def body(msg: EmailMessage, subtype: str) -> str:
    part = msg.get_body((subtype,))
    assert part is not None, f"no text/{subtype} part"
    return str(part.get_content()).replace("\r\n", "\n")


async def trigger_events(container: Container) -> list[Event]:
    """The committed events that owe an email, oldest first, as the outbox holds them."""
    async with container.sessions() as s:
        stmt = select(OutboxRow).where(OutboxRow.type.in_(list(TRIGGERS))).order_by(OutboxRow.occurred_at)
        rows = list((await s.execute(stmt)).scalars())
    return [Event(id=r.id, type=r.type, tenant_id=r.tenant_id, occurred_at=r.occurred_at, data=r.data) for r in rows]


async def enqueue_send(container: Container, event: Event) -> str:
    """The send job for ``event`` under a fresh job id, as a redelivered or manually replayed job is."""
    return await container.jobs.enqueue(SEND_JOB, {"event": event_to_args(event)}, tenant_id=event.tenant_id)


async def idle(container: Container) -> bool:
    jobs = container.jobs
    assert isinstance(jobs, InProcessJobQueue)
    return jobs.idle


async def test_embedded_default_writes_the_welcome_email_under_the_data_dir(sqlite_url: str, tmp_path: Path) -> None:
    mail = tmp_path / "mail"
    async with client_for(make_settings(sqlite_url, tmp_path)) as client:
        tenant = await signup(client, "Acme Rockets", "owner@acme.test")

        async def welcome_files() -> list[Path]:
            return sorted(mail.glob("*.eml")) if mail.exists() else []

        [eml] = await eventually(welcome_files)
        [event] = await on_app(client, trigger_events, container_of(client))
        assert event.tenant_id == uuid.UUID(tenant["tenant"]["id"])

    msg = parse(eml.read_bytes())
    assert parseaddr(msg["To"])[1] == "owner@acme.test"
    assert parseaddr(msg["From"])[1] == "no-reply@keel.localhost"
    assert msg["Subject"] == "Welcome to Keel, Acme Rockets"
    assert msg["Message-ID"] == f"<{event.id}.welcome@keel.localhost>"
    assert msg["X-Keel-Event-Id"] == str(event.id)
    assert "Hello Owner," in body(msg, "plain")
    assert "<strong>Acme Rockets</strong>" in body(msg, "html")
    assert not list(mail.glob("*.tmp"))


async def test_smtp_gets_one_welcome_and_one_invite_even_when_events_are_published_again(
    pg_url: str, tmp_path: Path
) -> None:
    with smtp_server() as smtp:
        settings = make_settings(pg_url, tmp_path, KEEL_SMTP_URL=smtp.url, KEEL_MAIL_FROM="Acme Ops <ops@keel.test>")
        async with client_for(settings) as client:
            container = container_of(client)
            tenant = await signup(client, "Acme Rockets", "owner@acme.test")
            r = await client.post(
                "/v1/users", json={"email": "ada@acme.test", "name": "Ada Lovelace"}, headers=tenant["headers"]
            )
            assert r.status_code == 201, r.text

            async def two_delivered() -> bool:
                return len(smtp.delivered) >= 2

            await eventually(two_delivered)
            await eventually(lambda: idle(container))
            events = await on_app(client, trigger_events, container)
            assert [e.type for e in events] == ["tenant.created", "user.created"]

            # 1. The same committed events dispatched again (a second relay of the fast path).
            for event in events:
                await on_app(client, container.events.dispatch, event)

            # 2. The outbox rows forgotten as published and swept again (a crash before marking them).
            async def forget_published() -> None:
                async with container.sessions() as s, s.begin():
                    await s.execute(update(OutboxRow).values(published_at=None))

            await on_app(client, forget_published)
            relay = SqlOutboxRelay(container.sessions, container.events, container.clock, grace=timedelta(0))
            await on_app(client, relay.sweep)

            async def all_published() -> bool:
                return await on_app(client, container.relay.pending) == 0

            await eventually(all_published)

            # 3. The send job itself run again under new job ids (a redelivered job): the ledger answers.
            again = [await on_app(client, enqueue_send, container, e) for e in events]

            async def reruns_finished() -> list[Any]:
                infos = [await on_app(client, container.jobs.get, job_id) for job_id in again]
                return infos if all(i is not None and i.status.is_final for i in infos) else []

            for info in await eventually(reruns_finished):
                assert info.status is JobStatus.SUCCEEDED
                assert info.result == {"outcome": "already sent"}
            await eventually(lambda: idle(container))

            # The jobs the events made (ids derived from the events) ran once each.
            for event in events:
                info = await on_app(client, container.jobs.get, str(uuid.uuid5(event.id, SEND_JOB)))
                assert info is not None
                assert (info.status, info.attempts, info.result) == (JobStatus.SUCCEEDED, 1, {"outcome": "sent"})

        delivered = smtp.delivered

    assert len(delivered) == 2
    by_recipient = {d.rcpt_tos: d for d in delivered}
    assert set(by_recipient) == {("owner@acme.test",), ("ada@acme.test",)}
    for d in delivered:
        assert d.mail_from == "ops@keel.test"

    welcome = by_recipient[("owner@acme.test",)].message
    invite = by_recipient[("ada@acme.test",)].message
    assert welcome["Subject"] == "Welcome to Keel, Acme Rockets"
    assert invite["Subject"] == "You have been added to Acme Rockets"
    assert welcome["Message-ID"] == f"<{events[0].id}.welcome@keel.localhost>"
    assert invite["Message-ID"] == f"<{events[1].id}.user_invite@keel.localhost>"
    assert parseaddr(invite["From"]) == ("Acme Ops", "ops@keel.test")
    for msg in (welcome, invite):
        assert msg.get_content_type() == "multipart/alternative"
        assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "text/html"]
    assert "Hello Owner," in body(welcome, "plain")
    assert "Hello Ada Lovelace," in body(invite, "plain")
    assert "<strong>Acme Rockets</strong>" in body(invite, "html")


async def test_an_invite_job_that_runs_after_its_user_was_deleted_sends_nothing(pg_url: str, tmp_path: Path) -> None:
    """The draft is made from current state when the job runs, not from the event: a user deleted by
    then gets no email (here: the invite job for that event run again after the deletion)."""
    with smtp_server() as smtp:
        async with client_for(make_settings(pg_url, tmp_path, KEEL_SMTP_URL=smtp.url)) as client:
            container = container_of(client)
            tenant = await signup(client)
            r = await client.post(
                "/v1/users", json={"email": "gone@acme.test", "name": "Gone"}, headers=tenant["headers"]
            )
            assert r.status_code == 201, r.text
            user_id = r.json()["id"]
            await eventually(lambda: idle(container))
            r = await client.delete(f"/v1/users/{user_id}", headers=tenant["headers"])
            assert r.status_code == 204, r.text
            [_, created] = await on_app(client, trigger_events, container)
            assert created.data["user_id"] == user_id

            job_id = await on_app(client, enqueue_send, container, created)

            async def finished() -> Any:
                info = await on_app(client, container.jobs.get, job_id)
                return info if info is not None and info.status.is_final else None

            info = await eventually(finished)
            assert info.status is JobStatus.SUCCEEDED
            assert info.result == {"outcome": "skipped: no recipient (it no longer exists, or none was given)"}
        # The welcome and the first invite run as concurrent jobs: their order is not fixed.
        assert sorted(d.rcpt_tos for d in smtp.delivered) == [("gone@acme.test",), ("owner@acme.test",)]


async def test_the_send_job_is_visible_to_its_tenant_with_its_outcome(sqlite_url: str, tmp_path: Path) -> None:
    """``GET /v1/jobs/{id}`` for the welcome job (its id is derived from the event)."""
    async with client_for(make_settings(sqlite_url, tmp_path)) as client:
        container = container_of(client)
        tenant = await signup(client)
        await eventually(lambda: idle(container))
        other = await signup(client, "Globex", "owner@globex.test")
        await eventually(lambda: idle(container))
        event = next(
            e
            for e in await on_app(client, trigger_events, container)
            if e.tenant_id == uuid.UUID(tenant["tenant"]["id"])
        )
        job_id = uuid.uuid5(event.id, SEND_JOB)

        r = await client.get(f"/v1/jobs/{job_id}", headers=tenant["headers"])
        assert r.status_code == 200, r.text
        job = r.json()
        assert (job["id"], job["type"], job["status"]) == (str(job_id), SEND_JOB, "succeeded")
        assert (job["attempts"], job["progress"], job["result"], job["error"]) == (1, 100, {"outcome": "sent"}, None)
        # Another tenant cannot see it, and an unknown id is a 404 as well.
        assert (await client.get(f"/v1/jobs/{job_id}", headers=other["headers"])).status_code == 404
        assert (await client.get(f"/v1/jobs/{uuid.uuid4()}", headers=tenant["headers"])).status_code == 404


async def test_a_paid_and_refunded_payment_mails_its_customer_a_receipt_and_a_refund_email(
    sqlite_url: str, tmp_path: Path
) -> None:
    """Over the real app and the sandbox provider: the capture job's ``payment.succeeded`` becomes a
    receipt, the refund job's ``payment.refunded`` a refund email; a payment without a customer email
    makes none."""
    mail = tmp_path / "mail"
    async with client_for(make_settings(sqlite_url, tmp_path)) as client:
        container = container_of(client)
        tenant = await signup(client, "Acme Rockets", "owner@acme.test")
        await eventually(lambda: idle(container))

        def by_subject() -> dict[str, EmailMessage]:
            found = [parse(p.read_bytes()) for p in mail.glob("*.eml")] if mail.exists() else []
            return {str(m["Subject"]): m for m in found}

        async def payment_status(payment_id: str, status: str) -> bool:
            r = await client.get(f"/v1/payments/{payment_id}", headers=tenant["headers"])
            return bool(r.status_code == 200 and r.json()["status"] == status)

        anonymous = await client.post(
            "/v1/payments",
            json={"amount": 700, "currency": "eur", "payment_method": "pm_card_visa"},
            headers={**tenant["headers"], "Idempotency-Key": "anonymous-1"},
        )
        assert anonymous.status_code == 202, anonymous.text
        r = await client.post(
            "/v1/payments",
            json={
                "amount": 12_345,
                "currency": "EUR",
                "payment_method": "pm_card_visa",
                "description": "Order #1042",
                "customer_email": "buyer@example.test",
            },
            headers={**tenant["headers"], "Idempotency-Key": "order-1042"},
        )
        assert r.status_code == 202, r.text
        payment_id = r.json()["payment"]["id"]
        await eventually(lambda: payment_status(payment_id, "succeeded"))
        await eventually(lambda: payment_status(anonymous.json()["payment"]["id"], "succeeded"))
        await eventually(lambda: idle(container))

        r = await client.post(
            f"/v1/payments/{payment_id}/refunds",
            json={"amount": 2_345},
            headers={**tenant["headers"], "Idempotency-Key": "refund-1042"},
        )
        assert r.status_code == 202, r.text
        await eventually(lambda: payment_status(payment_id, "partially_refunded"))

        async def three_mails() -> bool:
            return len(by_subject()) >= 3

        await eventually(three_mails)

        async def all_settled() -> bool:
            return await idle(container) and await on_app(client, container.relay.pending) == 0

        await eventually(all_settled)
        payment_events = [e for e in await on_app(client, trigger_events, container) if e.type.startswith("payment.")]

    sent = by_subject()
    assert set(sent) == {
        "Welcome to Keel, Acme Rockets",
        "Your receipt from Acme Rockets: 123.45 EUR",
        "Acme Rockets refunded 23.45 EUR",
    }
    receipt = sent["Your receipt from Acme Rockets: 123.45 EUR"]
    refund = sent["Acme Rockets refunded 23.45 EUR"]
    for msg in (receipt, refund):
        assert parseaddr(msg["To"])[1] == "buyer@example.test"
        assert f"Payment reference: {payment_id}" in body(msg, "plain")
        assert "For: Order #1042" in body(msg, "plain")
    # Two payments succeeded, but only the one with a customer email was mailed.
    assert sorted(e.type for e in payment_events) == ["payment.refunded", "payment.succeeded", "payment.succeeded"]
    [succeeded] = [e for e in payment_events if e.type == "payment.succeeded" and e.data["payment_id"] == payment_id]
    [refunded] = [e for e in payment_events if e.type == "payment.refunded"]
    assert refunded.data["payment_id"] == payment_id
    # These Message-IDs are long enough to be folded onto a continuation line (kept as leading whitespace).
    assert receipt["Message-ID"].strip() == f"<{succeeded.id}.payment_receipt@keel.localhost>"
    assert refund["Message-ID"].strip() == f"<{refunded.id}.refund_receipt@keel.localhost>"
    assert "Amount paid: 123.45 EUR" in body(receipt, "plain")
    assert "Acme Rockets has refunded 23.45 EUR of your payment of 123.45 EUR." in body(refund, "plain")
    assert "Refunded so far: 23.45 EUR" in body(refund, "plain")
