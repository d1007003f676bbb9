"""Payments in the production topology, end to end: the API (in-process, on Postgres and Redis) stores
payments and puts their jobs in RQ; an RQ worker with the runtime ``keel worker`` builds (a simple
worker in burst mode, on this test's main thread) captures them with the sandbox provider, whose
ledger lives in Postgres; the payment events are delivered as signed webhooks to a real receiver on
127.0.0.1, and receipts are mailed through a real SMTP server on 127.0.0.1.

Provider outages are retried on ``PROVIDER_RETRY`` (about half an hour in production). The worker runs
in this process, so ``keel.contexts.payments.adapters.jobs.PROVIDER_RETRY`` is replaced before the
API's container and the worker's runtime are built (``job_specs`` reads it when they register the
jobs): the capture job then retries after RQ's shortest interval, one second, and the outage card
settles in about two seconds.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from email.utils import parseaddr
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from litestar import Litestar
from litestar.testing import AsyncTestClient
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.serializers import JSONSerializer
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine
from standardwebhooks.webhooks import Webhook

from keel.contexts.payments.adapters import jobs as payments_jobs
from keel.contexts.payments.adapters.sql.models import PaymentRow, SandboxOperationRow
from keel.contexts.payments.domain.model import capture_key, refund_key
from keel.contexts.payments.domain.services import CAPTURE_JOB, REFUND_JOB
from keel.contexts.payments.public import PUBLIC_EVENTS as PAYMENT_EVENTS
from keel.main.worker import make_runtime
from keel.platform.adapters.jobs.rq_queue import RqJobQueue
from keel.platform.adapters.sql.engine import create_engine
from keel.platform.domain.events import event_job_id
from keel.platform.domain.jobs import RetryPolicy
from tests.support.app import client_for, job, make_settings, signup
from tests.support.receivers import Received, Receiver, webhook_receiver
from tests.support.rq import run_rq_worker, runtime_installed, work_until
from tests.support.smtp import Delivered, SmtpSink, smtp_server

Client = AsyncTestClient[Litestar]
# RQ schedules retries in whole seconds (at least 1): every retry comes one second after the failure.
FAST_PROVIDER_RETRY = RetryPolicy(retries=6, base=0.05, factor=1.0, cap=1.0, jitter=0.0)
SUBSCRIBED = ["payment.succeeded", "payment.failed", "payment.refunded"]
CUSTOMER = "buyer@example.com"


@dataclass
class Stack:
    client: Client
    connection: redis.Redis
    db: AsyncEngine  # the API's Postgres database, read directly by the assertions
    receiver: Receiver
    smtp: SmtpSink
    headers: dict[str, str]
    secret: str  # the webhook endpoint's signing secret

    def keyed(self, key: str | None = None) -> dict[str, str]:
        return {**self.headers, "Idempotency-Key": key or f"e2e-{uuid.uuid4().hex}"}

    async def work_until(self, done: Callable[[], Awaitable[bool]], within: float = 20.0) -> None:
        await work_until(self.connection, done, within)

    async def payment(self, payment_id: str) -> dict[str, Any]:
        r = await self.client.get(f"/v1/payments/{payment_id}", headers=self.headers)
        assert r.status_code == 200, r.text
        found: dict[str, Any] = r.json()
        return found

    async def settle(self, payment_id: str) -> dict[str, Any]:
        """Run the worker until the payment is no longer pending; returns it."""

        async def decided() -> bool:
            return (await self.payment(payment_id))["status"] != "pending"

        await self.work_until(decided)
        return await self.payment(payment_id)

    async def job(self, job_id: str) -> dict[str, Any]:
        return await job(self.client, {"headers": self.headers}, job_id)

    async def count(self, stmt: Any) -> int:
        async with self.db.connect() as conn:
            return int((await conn.execute(stmt)).scalar_one())

    async def payments_count(self) -> int:
        return await self.count(select(func.count()).select_from(PaymentRow))

    async def ledger(self, kind: str) -> list[tuple[str, int, int, str | None]]:
        """The sandbox provider's operations of ``kind``: (idempotency key, amount, calls, outcome)."""
        async with self.db.connect() as conn:
            stmt = select(
                SandboxOperationRow.idempotency_key,
                SandboxOperationRow.amount,
                SandboxOperationRow.calls,
                SandboxOperationRow.outcome,
            ).where(SandboxOperationRow.kind == kind)
            return [(r[0], r[1], r[2], r[3]) for r in await conn.execute(stmt)]

    def rq_jobs(self, name: str) -> list[Job]:
        """Every Keel job named ``name`` that RQ holds, whatever its state."""
        jobs = []
        for key in self.connection.scan_iter(match="rq:job:*"):
            job_id = key.decode().removeprefix("rq:job:")
            if ":" in job_id:
                continue  # per-job auxiliary keys
            with contextlib.suppress(NoSuchJobError):
                job = Job.fetch(job_id, connection=self.connection, serializer=JSONSerializer)
                if job.meta.get("name") == name:
                    jobs.append(job)
        return jobs

    def hooks(self, event_type: str) -> list[dict[str, Any]]:
        """The verified payloads of ``event_type`` the receiver got (every request must verify)."""
        return [p for p in (verify(self.secret, r) for r in self.receiver.received) if p["type"] == event_type]

    def mails_to(self, address: str) -> list[Delivered]:
        return [d for d in self.smtp.delivered if d.rcpt_tos == (address,)]


def verify(secret: str, request: Received) -> dict[str, Any]:
    payload: dict[str, Any] = Webhook(secret).verify(request.body, request.headers)
    return payload


def text_of(delivered: Delivered) -> str:
    part = delivered.message.get_body(("plain",))
    assert part is not None
    return str(part.get_content()).replace("\r\n", "\n")


@pytest.fixture
async def stack(pg_url: str, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Stack]:
    monkeypatch.setattr(payments_jobs, "PROVIDER_RETRY", FAST_PROVIDER_RETRY)
    with webhook_receiver() as receiver, smtp_server() as smtp:
        settings = make_settings(
            pg_url, tmp_path, KEEL_REDIS_URL=redis_url, KEEL_WEBHOOKS_ALLOW_PRIVATE="true", KEEL_SMTP_URL=smtp.url
        )
        connection = redis.Redis.from_url(redis_url)
        db = create_engine(pg_url)
        try:
            # The worker side, as `keel worker` builds it, on the same settings.
            with runtime_installed(make_runtime(settings)):
                async with client_for(settings) as client:
                    assert isinstance(client.app.state["container"].jobs, RqJobQueue)
                    tenant = await signup(client, "Acme", "owner@acme.test")
                    r = await client.post(
                        "/v1/webhook-endpoints",
                        headers=tenant["headers"],
                        json={"url": receiver.url, "event_types": SUBSCRIBED},
                    )
                    assert r.status_code == 201, r.text
                    yield Stack(client, connection, db, receiver, smtp, tenant["headers"], r.json()["secret"])
        finally:
            connection.close()
            await db.dispose()


async def create(stack: Stack, key: str | None = None, **fields: Any) -> httpx.Response:
    body = {"amount": 2500, "currency": "eur", "payment_method": "pm_card_visa", **fields}
    return await stack.client.post("/v1/payments", json=body, headers=stack.keyed(key))


# -- the whole payment flow ----------------------------------------------------------------------


async def test_a_card_payment_is_captured_announced_and_receipted_once_then_refunded(stack: Stack) -> None:
    r = await create(stack, key="order-1042", customer_email=CUSTOMER, description="Order #1042")
    assert r.status_code == 202, r.text
    accepted = r.json()
    pid, job_id = accepted["payment"]["id"], accepted["job_id"]
    assert accepted["payment"]["status"] == "pending"
    assert job_id == event_job_id(uuid.UUID(pid), CAPTURE_JOB)
    assert r.headers["location"] == f"/v1/jobs/{job_id}"
    # Nothing runs in the API process: the capture waits in RQ for a worker.
    assert (await stack.job(job_id))["status"] == "queued"
    assert (await stack.payment(pid))["status"] == "pending"
    # Not captured yet: nothing to refund.
    early = await stack.client.post(f"/v1/payments/{pid}/refunds", headers=stack.keyed())
    assert early.status_code == 409, early.text
    assert early.json()["type"] == "/problems/payment-state-conflict"

    p = await stack.settle(pid)
    assert p["status"] == "succeeded"
    assert p["provider_reference"].startswith("ch_sandbox_")
    assert (p["amount"], p["currency"], p["amount_refundable"]) == (2500, "EUR", 2500)
    job = await stack.job(job_id)
    assert (job["type"], job["status"], job["attempts"], job["result"]) == (
        CAPTURE_JOB,
        "succeeded",
        1,
        {"outcome": "succeeded"},
    )

    # A signed payment.succeeded webhook with the payment in its data.
    [hook] = stack.hooks("payment.succeeded")
    assert set(hook["data"]) == set(PAYMENT_EVENTS["payment.succeeded"])
    assert (hook["data"]["payment_id"], hook["data"]["amount"], hook["data"]["currency"]) == (pid, 2500, "EUR")
    assert (hook["data"]["status"], hook["data"]["provider_reference"]) == ("succeeded", p["provider_reference"])
    assert hook["data"]["customer_email"] == CUSTOMER

    # The receipt, to the customer, with the amount.
    [receipt] = stack.mails_to(CUSTOMER)
    assert receipt.message["Subject"] == "Your receipt from Acme: 25.00 EUR"
    assert parseaddr(receipt.message["To"])[1] == CUSTOMER
    text = text_of(receipt)
    assert "Amount paid: 25.00 EUR" in text
    assert f"Payment reference: {pid}" in text

    # The same request again: the first answer, and nothing else happens, however long the worker runs.
    before = (await stack.payments_count(), len(stack.receiver.received), len(stack.smtp.delivered))
    again = await create(stack, key="order-1042", customer_email=CUSTOMER, description="Order #1042")
    assert (again.status_code, again.headers.get("idempotent-replayed")) == (202, "true")
    assert again.content == r.content
    run_rq_worker(stack.connection)
    assert (await stack.payments_count(), len(stack.receiver.received), len(stack.smtp.delivered)) == before
    assert before[0] == 1
    assert [j.id for j in stack.rq_jobs(CAPTURE_JOB)] == [job_id]
    assert await stack.ledger("charge") == [(capture_key(uuid.UUID(pid)), 2500, 1, "succeeded")]

    # A refund through the worker: payment.refunded and a refund receipt.
    r = await stack.client.post(f"/v1/payments/{pid}/refunds", json={"amount": 1000}, headers=stack.keyed())
    assert r.status_code == 202, r.text
    refund = r.json()["refund"]
    assert r.json()["job_id"] == event_job_id(uuid.UUID(refund["id"]), REFUND_JOB)

    async def refunded() -> bool:
        return (await stack.payment(pid))["status"] == "partially_refunded"

    await stack.work_until(refunded)
    after = await stack.payment(pid)
    assert (after["amount_refunded"], after["amount_refundable"]) == (1000, 1500)
    [refund_hook] = stack.hooks("payment.refunded")
    assert set(refund_hook["data"]) == set(PAYMENT_EVENTS["payment.refunded"])
    assert (refund_hook["data"]["payment_id"], refund_hook["data"]["refund_id"]) == (pid, refund["id"])
    assert (refund_hook["data"]["refund_amount"], refund_hook["data"]["amount_refunded"]) == (1000, 1000)
    assert refund_hook["data"]["refund_status"] == "succeeded"
    [_, refund_mail] = stack.mails_to(CUSTOMER)
    assert refund_mail.message["Subject"] == "Acme refunded 10.00 EUR"
    assert "Acme has refunded 10.00 EUR of your payment of 25.00 EUR." in text_of(refund_mail)
    assert await stack.ledger("refund") == [(refund_key(uuid.UUID(refund["id"])), 1000, 1, "succeeded")]
    assert len(stack.hooks("payment.succeeded")) == 1


async def test_a_declined_card_fails_with_a_payment_failed_webhook_and_no_receipt(stack: Stack) -> None:
    r = await create(stack, payment_method="pm_card_chargeDeclined", customer_email=CUSTOMER)
    assert r.status_code == 202, r.text
    pid = r.json()["payment"]["id"]

    p = await stack.settle(pid)
    assert (p["status"], p["failure_reason"], p["failure_message"]) == (
        "failed",
        "card_declined",
        "Your card was declined.",
    )
    [hook] = stack.hooks("payment.failed")
    assert set(hook["data"]) == set(PAYMENT_EVENTS["payment.failed"])
    assert (hook["data"]["payment_id"], hook["data"]["status"]) == (pid, "failed")
    assert (hook["data"]["failure_reason"], hook["data"]["failure_message"]) == (
        "card_declined",
        "Your card was declined.",
    )
    assert stack.hooks("payment.succeeded") == []
    assert stack.mails_to(CUSTOMER) == []
    assert await stack.ledger("charge") == [(capture_key(uuid.UUID(pid)), 2500, 1, "card_declined")]
    refused = await stack.client.post(f"/v1/payments/{pid}/refunds", headers=stack.keyed())
    assert refused.status_code == 409, refused.text
    assert refused.json()["type"] == "/problems/payment-state-conflict"


async def test_a_provider_outage_is_retried_by_the_worker_and_charges_once(stack: Stack) -> None:
    r = await create(stack, payment_method="pm_card_providerUnavailable", customer_email=CUSTOMER)
    assert r.status_code == 202, r.text
    pid, job_id = r.json()["payment"]["id"], r.json()["job_id"]

    # The first burst meets the outage: the job waits for its retry, the payment stays pending.
    run_rq_worker(stack.connection)
    waiting = await stack.job(job_id)
    assert (waiting["status"], waiting["attempts"]) == ("scheduled", 1)
    assert waiting["error"]["code"] == "provider-unavailable"
    assert (await stack.payment(pid))["status"] == "pending"

    p = await stack.settle(pid)
    assert p["status"] == "succeeded"
    done = await stack.job(job_id)
    assert (done["status"], done["attempts"], done["result"], done["error"]) == (
        "succeeded",
        3,
        {"outcome": "succeeded"},
        None,
    )
    # Three calls to the provider under one idempotency key: one charge.
    assert await stack.ledger("charge") == [(capture_key(uuid.UUID(pid)), 2500, 3, "succeeded")]
    [hook] = stack.hooks("payment.succeeded")
    assert (hook["data"]["payment_id"], hook["data"]["provider_reference"]) == (pid, p["provider_reference"])
    assert len(stack.mails_to(CUSTOMER)) == 1
    assert [j.id for j in stack.rq_jobs(CAPTURE_JOB)] == [job_id]
