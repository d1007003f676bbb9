"""Payments over HTTP on the embedded default (SQLite, jobs run in-process, emails as ``.eml`` files):
payments accepted as ``pending`` and captured by their job with the sandbox provider, idempotent
creation, validation, declines and provider outages retried by the job, refunds in part and in full,
listing and filters, tenant isolation, the read-through cache, receipts and the webhook catalogue.

Provider outages are retried on ``PROVIDER_RETRY`` (about half an hour in production). The app here
is built after ``keel.contexts.payments.adapters.jobs.PROVIDER_RETRY`` is replaced by a policy whose
first retry comes after 1 s (long enough to watch the job wait for it) and the next ones after 0.1 s:
``job_specs`` reads the policy when the container registers the jobs, so the app's capture and refund
jobs really retry on it, and decide their last attempt from it.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta, timezone
from email import message_from_bytes, policy
from email.message import EmailMessage
from email.utils import parseaddr
from pathlib import Path
from typing import Any, TypeVar, cast

import httpx
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy import event, select

from keel.contexts.notifications.domain.services import SEND_JOB
from keel.contexts.payments.adapters import jobs as payments_jobs
from keel.contexts.payments.adapters.sql.models import SandboxOperationRow
from keel.contexts.payments.domain.model import MAX_AMOUNT, capture_key, refund_key
from keel.contexts.payments.domain.services import CAPTURE_JOB, REFUND_JOB
from keel.contexts.payments.public import PUBLIC_EVENTS as PAYMENT_EVENTS
from keel.main.container import Container
from keel.platform.adapters.sql.outbox import OutboxRow
from keel.platform.domain.events import event_job_id
from keel.platform.domain.jobs import RetryPolicy
from tests.support.app import client_for, finished_job, job, make_settings, signup
from tests.support.waiting import eventually

Client = AsyncTestClient[Litestar]
PROBLEM = "application/problem+json"
T = TypeVar("T")

# 1 s before the first retry, then 0.1 s, 0.01 s...; six retries, as in production.
SHORT_PROVIDER_RETRY = RetryPolicy(retries=6, base=1.0, factor=0.1, cap=1.0, jitter=0.0)
PAYMENT_EVENT_TYPES = ["payment.created", "payment.succeeded", "payment.failed", "payment.refunded"]


@pytest.fixture
async def client(sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Client]:
    """The embedded default (SQLite, in-process jobs, FileMailer under ``tmp_path / "mail"``), with the
    provider retry policy shortened before the container registers the payment jobs."""
    monkeypatch.setattr(payments_jobs, "PROVIDER_RETRY", SHORT_PROVIDER_RETRY)
    async with client_for(make_settings(sqlite_url, tmp_path)) as c:
        yield c


@pytest.fixture
async def any_client(database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Client]:
    """The same app on SQLite and on Postgres (for what the SQL decides: filters and ordering)."""
    monkeypatch.setattr(payments_jobs, "PROVIDER_RETRY", SHORT_PROVIDER_RETRY)
    async with client_for(make_settings(database_url, tmp_path)) as c:
        yield c


# -- helpers ----------------------------------------------------------------------------------------


def container_of(client: Client) -> Container:
    return cast(Container, client.app.state["container"])


async def on_app(client: Client, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run ``fn(*args)`` on the app's own event loop, where its engine lives."""
    return await asyncio.to_thread(client.blocking_portal.call, fn, *args)


def keyed(tenant: dict[str, Any], key: str | None = None) -> dict[str, str]:
    return {**tenant["headers"], "Idempotency-Key": key or f"test-{uuid.uuid4().hex}"}


def body_of(**fields: Any) -> dict[str, Any]:
    return {"amount": 2500, "currency": "eur", "payment_method": "pm_card_visa", **fields}


async def create(client: Client, tenant: dict[str, Any], key: str | None = None, **fields: Any) -> httpx.Response:
    return await client.post("/v1/payments", json=body_of(**fields), headers=keyed(tenant, key))


async def pay(client: Client, tenant: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """Create a payment; returns the 202 body (the payment as stored, still pending, and its job)."""
    r = await create(client, tenant, **fields)
    assert r.status_code == 202, r.text
    accepted: dict[str, Any] = r.json()
    return accepted


async def get_payment(client: Client, tenant: dict[str, Any], payment_id: str) -> dict[str, Any]:
    r = await client.get(f"/v1/payments/{payment_id}", headers=tenant["headers"])
    assert r.status_code == 200, r.text
    found: dict[str, Any] = r.json()
    return found


async def settled(client: Client, tenant: dict[str, Any], payment_id: str) -> dict[str, Any]:
    """The payment once its capture job decided it."""

    async def probe() -> dict[str, Any] | None:
        p = await get_payment(client, tenant, payment_id)
        return p if p["status"] != "pending" else None

    found: dict[str, Any] = await eventually(probe)
    return found


async def paid(client: Client, tenant: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A payment created and captured."""
    accepted = await pay(client, tenant, **fields)
    p = await settled(client, tenant, accepted["payment"]["id"])
    assert p["status"] == "succeeded", p
    return p


async def refund(
    client: Client, tenant: dict[str, Any], payment_id: str, body: dict[str, Any] | None = None, key: str | None = None
) -> httpx.Response:
    path = f"/v1/payments/{payment_id}/refunds"
    if body is None:
        return await client.post(path, headers=keyed(tenant, key))
    return await client.post(path, json=body, headers=keyed(tenant, key))


async def settled_refund(client: Client, tenant: dict[str, Any], payment_id: str, refund_id: str) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        r = await client.get(f"/v1/payments/{payment_id}/refunds/{refund_id}", headers=tenant["headers"])
        assert r.status_code == 200, r.text
        return r.json() if r.json()["status"] != "pending" else None

    found: dict[str, Any] = await eventually(probe)
    return found


async def listed(client: Client, tenant: dict[str, Any], **params: Any) -> dict[str, Any]:
    r = await client.get("/v1/payments", headers=tenant["headers"], params=params)
    assert r.status_code == 200, r.text
    found: dict[str, Any] = r.json()
    return found


async def listed_ids(client: Client, tenant: dict[str, Any], **params: Any) -> list[str]:
    return [p["id"] for p in (await listed(client, tenant, limit=100, **params))["items"]]


async def refund_ids(client: Client, tenant: dict[str, Any], payment_id: str) -> list[str]:
    r = await client.get(f"/v1/payments/{payment_id}/refunds", headers=tenant["headers"])
    assert r.status_code == 200, r.text
    return [x["id"] for x in r.json()["items"]]


def assert_problem(r: httpx.Response, status: int, slug: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM), r.headers
    body: dict[str, Any] = r.json()
    assert body["status"] == status
    if slug is not None:
        assert body["type"] == f"/problems/{slug}", body
    return body


def stamp(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


async def ledger(client: Client, key: str) -> list[SandboxOperationRow]:
    """The sandbox provider's ledger rows for one idempotency key."""

    async def read() -> list[SandboxOperationRow]:
        async with container_of(client).sessions() as s:
            stmt = select(SandboxOperationRow).where(SandboxOperationRow.idempotency_key == key)
            return list((await s.execute(stmt)).scalars())

    return await on_app(client, read)


async def event_ids(client: Client, event_type: str, payment_id: str) -> list[uuid.UUID]:
    """The ids of the outbox events of ``event_type`` about ``payment_id``."""

    async def read() -> list[uuid.UUID]:
        async with container_of(client).sessions() as s:
            rows = (await s.execute(select(OutboxRow).where(OutboxRow.type == event_type))).scalars()
            return [r.id for r in rows if r.data.get("payment_id") == payment_id]

    return await on_app(client, read)


def parse(path: Path) -> EmailMessage:
    return message_from_bytes(path.read_bytes(), policy=policy.default)


def text_of(msg: EmailMessage) -> str:
    part = msg.get_body(("plain",))
    assert part is not None
    return str(part.get_content()).replace("\r\n", "\n")


# -- creating and capturing -------------------------------------------------------------------------


async def test_a_payment_is_accepted_pending_and_captured_by_its_job(client: Client, tenant: dict[str, Any]) -> None:
    r = await create(client, tenant, description="Order #1042", metadata={"order_id": "1042", "channel": "web shop"})
    assert r.status_code == 202, r.text
    accepted = r.json()
    assert set(accepted) == {"payment", "job_id", "status_url"}
    p = accepted["payment"]
    assert p["status"] == "pending"
    assert (p["amount"], p["currency"], p["payment_method"]) == (2500, "EUR", "pm_card_visa")
    assert (p["amount_refunded"], p["amount_refundable"]) == (0, 0)  # nothing to refund before the capture
    assert (p["description"], p["metadata"]) == ("Order #1042", {"order_id": "1042", "channel": "web shop"})
    assert (p["provider"], p["provider_reference"], p["customer_email"]) == ("sandbox", None, None)
    assert (p["failure_reason"], p["failure_message"]) == (None, None)
    job_id = accepted["job_id"]
    # The job's id follows from the payment (its payment.created event shares the payment's id).
    assert job_id == event_job_id(uuid.UUID(p["id"]), CAPTURE_JOB)
    assert accepted["status_url"] == f"/v1/jobs/{job_id}" == r.headers["location"]

    done = await finished_job(client, tenant, job_id)
    assert (done["type"], done["status"], done["attempts"]) == (CAPTURE_JOB, "succeeded", 1)
    assert (done["result"], done["error"]) == ({"outcome": "succeeded"}, None)

    got = await get_payment(client, tenant, p["id"])
    assert got["status"] == "succeeded"
    assert got["provider_reference"].startswith("ch_sandbox_")
    assert (got["amount"], got["amount_refunded"], got["amount_refundable"]) == (2500, 0, 2500)
    assert (got["failure_reason"], got["failure_message"]) == (None, None)
    assert got["created_at"] == p["created_at"]
    assert stamp(got["updated_at"]) >= stamp(got["created_at"])
    unchanged = ("id", "amount", "currency", "payment_method", "description", "metadata", "provider")
    assert {k: got[k] for k in unchanged} == {k: p[k] for k in unchanged}

    # One charge for the payment in the provider's ledger, under the payment's idempotency key.
    [charge] = await ledger(client, capture_key(uuid.UUID(p["id"])))
    assert (charge.kind, charge.amount, charge.currency, charge.outcome) == ("charge", 2500, "EUR", "succeeded")
    assert charge.reference == got["provider_reference"]
    assert await listed_ids(client, tenant) == [p["id"]]


async def test_the_currency_is_stored_upper_case(client: Client, tenant: dict[str, Any]) -> None:
    for sent, stored in [("eur", "EUR"), ("Usd", "USD"), ("jpy", "JPY"), ("GBP", "GBP")]:
        accepted = await pay(client, tenant, currency=sent)
        assert accepted["payment"]["currency"] == stored
        assert (await get_payment(client, tenant, accepted["payment"]["id"]))["currency"] == stored


async def test_create_without_an_idempotency_key_is_400_and_creates_nothing(
    client: Client, tenant: dict[str, Any]
) -> None:
    r = await client.post("/v1/payments", json=body_of(), headers=tenant["headers"])
    assert_problem(r, 400, "idempotency-key-required")
    assert await listed_ids(client, tenant) == []


async def test_a_replay_answers_the_first_response_and_creates_one_payment(
    client: Client, tenant: dict[str, Any]
) -> None:
    first = await create(client, tenant, key="order-1042")
    assert first.status_code == 202, first.text
    assert "idempotent-replayed" not in first.headers
    await settled(client, tenant, first.json()["payment"]["id"])

    for _ in range(2):
        again = await create(client, tenant, key="order-1042")
        assert again.status_code == first.status_code
        assert again.headers.get("idempotent-replayed") == "true"
        assert again.content == first.content  # the first answer, the payment still pending in it
        assert again.headers["location"] == first.headers["location"]
    assert await listed_ids(client, tenant) == [first.json()["payment"]["id"]]

    # The same key for another payment is refused, and creates nothing either.
    other = await create(client, tenant, key="order-1042", amount=2600)
    assert_problem(other, 422, "idempotency-key-reused")
    assert await listed_ids(client, tenant) == [first.json()["payment"]["id"]]
    [charge] = await ledger(client, capture_key(uuid.UUID(first.json()["payment"]["id"])))
    assert charge.calls == 1


INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("amount-zero", {"amount": 0}, "#/amount"),
    ("amount-negative", {"amount": -100}, "#/amount"),
    ("amount-too-large", {"amount": MAX_AMOUNT + 1}, "#/amount"),
    ("amount-fractional", {"amount": 25.5}, "#/amount"),
    ("amount-a-word", {"amount": "lots"}, "#/amount"),
    ("amount-null", {"amount": None}, "#/amount"),
    ("currency-two-letters", {"currency": "EU"}, "#/currency"),
    ("currency-four-letters", {"currency": "EURO"}, "#/currency"),
    ("currency-unknown", {"currency": "XXX"}, "#/currency"),
    ("currency-unknown-lower", {"currency": "abc"}, "#/currency"),
    ("payment-method-space", {"payment_method": "pm card visa"}, "#/payment_method"),
    ("payment-method-punctuation", {"payment_method": "pm_card_visa!"}, "#/payment_method"),
    ("payment-method-hyphen", {"payment_method": "pm-card-visa"}, "#/payment_method"),
    ("payment-method-too-short", {"payment_method": "pm"}, "#/payment_method"),
    ("customer-email-invalid", {"customer_email": "not-an-email"}, "#/customer_email"),
    ("description-too-long", {"description": "x" * 501}, "#/description"),
    ("metadata-21-keys", {"metadata": {f"k{i}": "v" for i in range(21)}}, "#/metadata"),
    ("metadata-41-char-key", {"metadata": {"k" * 41: "v"}}, "#/metadata"),
    ("metadata-not-an-object", {"metadata": ["order_id"]}, "#/metadata"),
    ("unknown-field", {"capture": "manual"}, "#"),
]
# Refused as well; test_an_invalid_metadata_value_points_at_the_metadata checks their pointers.
INVALID_METADATA_VALUES: list[tuple[str, dict[str, Any]]] = [
    ("metadata-501-char-value", {"metadata": {"order_id": "v" * 501}}),
    ("metadata-value-not-a-string", {"metadata": {"order_id": 1042}}),
    ("metadata-value-control-char", {"metadata": {"order_id": "10\x0042"}}),
]


async def test_invalid_payments_are_422_problems_and_create_nothing(client: Client, tenant: dict[str, Any]) -> None:
    # Just within the limits is fine: the table below is about the limits, not about anything else.
    edge = {"k" * 40: "v" * 500, **{f"k{i}": "v" for i in range(19)}}
    ok = await pay(client, tenant, amount=MAX_AMOUNT, metadata=edge)
    assert (ok["payment"]["amount"], ok["payment"]["metadata"]) == (MAX_AMOUNT, edge)

    failures: list[str] = []
    for name, fields, pointer in INVALID:
        r = await create(client, tenant, **fields)
        if r.status_code != 422 or not r.headers["content-type"].startswith(PROBLEM):
            failures.append(f"{name}: {r.status_code} {r.text[:200]}")
            continue
        problem = r.json()
        pointers = [e.get("pointer") or "" for e in problem.get("errors") or []]
        if problem["type"] != "/problems/validation-error" or not problem["errors"]:
            failures.append(f"{name}: {problem}")
        elif not any(p == pointer or p.startswith(pointer + "/") for p in pointers):
            failures.append(f"{name}: errors {problem['errors']} lack pointer {pointer}")
    for name, fields in INVALID_METADATA_VALUES:
        r = await create(client, tenant, **fields)
        if r.status_code != 422 or r.json()["type"] != "/problems/validation-error":
            failures.append(f"{name}: {r.status_code} {r.text[:200]}")
    assert not failures, "\n".join(failures)

    # The unknown currency is a rule of the domain, not of the schema: still a pointer at it.
    unknown = assert_problem(await create(client, tenant, currency="XXX"), 422, "validation-error")
    assert [e["pointer"] for e in unknown["errors"]] == ["#/currency"]
    assert "XXX" in unknown["detail"]
    unknown_field = assert_problem(await create(client, tenant, capture="manual"), 422)
    assert "capture" in json.dumps(unknown_field["errors"])
    missing = assert_problem(
        await client.post("/v1/payments", json={"amount": 2500, "currency": "EUR"}, headers=keyed(tenant)), 422
    )
    assert "payment_method" in json.dumps(missing["errors"])

    assert await listed_ids(client, tenant) == [ok["payment"]["id"]]


@pytest.mark.parametrize(("name", "fields"), INVALID_METADATA_VALUES)
async def test_an_invalid_metadata_value_points_at_the_metadata(
    client: Client, tenant: dict[str, Any], name: str, fields: dict[str, Any]
) -> None:
    problem = assert_problem(await create(client, tenant, **fields), 422, "validation-error")
    pointers = [e.get("pointer") for e in problem["errors"]]
    assert pointers, problem
    for pointer in pointers:
        assert pointer == "#/metadata" or pointer == "#/metadata/order_id", problem


@pytest.mark.parametrize(
    ("token", "reason", "message"),
    [
        ("pm_card_chargeDeclined", "card_declined", "Your card was declined."),
        ("pm_card_chargeDeclinedInsufficientFunds", "insufficient_funds", "Your card has insufficient funds."),
        ("card_1042", "invalid_payment_method", "No such payment method."),
    ],
)
async def test_a_refused_charge_fails_the_payment_with_the_reason(
    client: Client, tenant: dict[str, Any], token: str, reason: str, message: str
) -> None:
    accepted = await pay(client, tenant, payment_method=token)
    p = await settled(client, tenant, accepted["payment"]["id"])
    assert p["status"] == "failed"
    assert (p["failure_reason"], p["failure_message"]) == (reason, message)
    assert (p["provider_reference"], p["amount_refunded"], p["amount_refundable"]) == (None, 0, 0)
    # The job did its work: a refusal is an outcome, not a failed job.
    done = await finished_job(client, tenant, accepted["job_id"])
    assert (done["status"], done["attempts"], done["result"]) == ("succeeded", 1, {"outcome": "failed"})
    assert await listed_ids(client, tenant, status="failed") == [p["id"]]


async def test_another_test_card_succeeds(client: Client, tenant: dict[str, Any]) -> None:
    p = await paid(client, tenant, payment_method="pm_card_mastercard")
    assert p["provider_reference"].startswith("ch_sandbox_")


async def test_a_provider_outage_is_retried_by_the_job_until_the_payment_succeeds(
    client: Client, tenant: dict[str, Any]
) -> None:
    accepted = await pay(client, tenant, payment_method="pm_card_providerUnavailable")
    payment_id, job_id = accepted["payment"]["id"], accepted["job_id"]

    async def waiting_for_retry() -> dict[str, Any] | None:
        j = await job(client, tenant, job_id)
        return j if j["status"] == "scheduled" and j["attempts"] >= 1 else None

    # The first attempt met the outage: the job waits for its retry and says why; the payment waits too.
    meanwhile = await eventually(waiting_for_retry)
    assert meanwhile["error"]["code"] == "provider-unavailable"
    assert "unavailable" in meanwhile["error"]["detail"]
    assert meanwhile["result"] is None
    assert (await get_payment(client, tenant, payment_id))["status"] == "pending"

    done = await finished_job(client, tenant, job_id)
    assert (done["status"], done["attempts"]) == ("succeeded", 3)  # two outages, then the charge
    assert (done["result"], done["error"]) == ({"outcome": "succeeded"}, None)
    p = await get_payment(client, tenant, payment_id)
    assert p["status"] == "succeeded"
    assert (p["failure_reason"], p["amount_refundable"]) == (None, 2500)

    # Three calls, one idempotency key, one charge.
    [charge] = await ledger(client, capture_key(uuid.UUID(payment_id)))
    assert (charge.calls, charge.outcome, charge.reference) == (3, "succeeded", p["provider_reference"])


# -- refunds ----------------------------------------------------------------------------------------


async def test_a_partial_refund_then_the_rest_then_nothing_left(client: Client, tenant: dict[str, Any]) -> None:
    p = await paid(client, tenant)
    pid = p["id"]

    r = await refund(client, tenant, pid, {"amount": 1000, "reason": "requested_by_customer"})
    assert r.status_code == 202, r.text
    accepted = r.json()
    assert set(accepted) == {"refund", "job_id", "status_url"}
    first = accepted["refund"]
    assert (first["payment_id"], first["amount"], first["currency"]) == (pid, 1000, "EUR")
    assert (first["status"], first["reason"], first["provider_reference"]) == (
        "pending",
        "requested_by_customer",
        None,
    )
    assert accepted["job_id"] == event_job_id(uuid.UUID(first["id"]), REFUND_JOB)
    assert accepted["status_url"] == f"/v1/jobs/{accepted['job_id']}" == r.headers["location"]

    settled_first = await settled_refund(client, tenant, pid, first["id"])
    assert settled_first["status"] == "succeeded"
    assert settled_first["provider_reference"].startswith("re_sandbox_")
    assert (settled_first["failure_reason"], settled_first["failure_message"]) == (None, None)
    done = await finished_job(client, tenant, accepted["job_id"])
    assert (done["type"], done["status"], done["result"]) == (REFUND_JOB, "succeeded", {"outcome": "succeeded"})

    after = await get_payment(client, tenant, pid)
    assert (after["status"], after["amount_refunded"], after["amount_refundable"]) == (
        "partially_refunded",
        1000,
        1500,
    )
    r = await client.get(f"/v1/payments/{pid}/refunds", headers=tenant["headers"])
    assert r.status_code == 200, r.text
    assert r.json() == {"items": [settled_first], "next_cursor": None}

    # More than what is left: refused, nothing reserved.
    too_much = await refund(client, tenant, pid, {"amount": 1501})
    problem = assert_problem(too_much, 409, "refund-exceeds-payment")
    assert "1501" in problem["detail"]
    assert await refund_ids(client, tenant, pid) == [first["id"]]
    assert (await get_payment(client, tenant, pid))["amount_refundable"] == 1500

    # No body: everything that is left.
    rest = await refund(client, tenant, pid)
    assert rest.status_code == 202, rest.text
    second = rest.json()["refund"]
    assert (second["amount"], second["reason"], second["status"]) == (1500, None, "pending")
    assert (await settled_refund(client, tenant, pid, second["id"]))["status"] == "succeeded"
    full = await get_payment(client, tenant, pid)
    assert (full["status"], full["amount_refunded"], full["amount_refundable"]) == ("refunded", 2500, 0)
    assert await refund_ids(client, tenant, pid) == [second["id"], first["id"]]

    # A refunded payment is not refundable any more, whatever the amount.
    assert_problem(await refund(client, tenant, pid), 409, "payment-state-conflict")
    assert_problem(await refund(client, tenant, pid, {"amount": 1}), 409, "payment-state-conflict")
    assert await refund_ids(client, tenant, pid) == [second["id"], first["id"]]

    # The provider refunded exactly what was captured.
    refunded = [await ledger(client, refund_key(uuid.UUID(x))) for x in (first["id"], second["id"])]
    assert [(row.kind, row.amount, row.outcome) for [row] in refunded] == [
        ("refund", 1000, "succeeded"),
        ("refund", 1500, "succeeded"),
    ]


async def test_invalid_refunds_are_422_and_reserve_nothing(client: Client, tenant: dict[str, Any]) -> None:
    p = await paid(client, tenant)
    for body in ({"amount": 0}, {"amount": -5}, {"amount": 10.5}, {"reason": "changed_my_mind"}, {"note": "x"}):
        assert_problem(await refund(client, tenant, p["id"], body), 422, "validation-error")
    assert await refund_ids(client, tenant, p["id"]) == []
    assert (await get_payment(client, tenant, p["id"]))["amount_refundable"] == 2500


async def test_a_failed_payment_cannot_be_refunded(client: Client, tenant: dict[str, Any]) -> None:
    accepted = await pay(client, tenant, payment_method="pm_card_chargeDeclined")
    p = await settled(client, tenant, accepted["payment"]["id"])
    assert p["status"] == "failed"
    assert_problem(await refund(client, tenant, p["id"]), 409, "payment-state-conflict")
    assert_problem(await refund(client, tenant, p["id"], {"amount": 100}), 409, "payment-state-conflict")
    assert await refund_ids(client, tenant, p["id"]) == []


async def test_a_refund_needs_an_idempotency_key_and_a_replay_refunds_once(
    client: Client, tenant: dict[str, Any]
) -> None:
    p = await paid(client, tenant)
    pid = p["id"]
    r = await client.post(f"/v1/payments/{pid}/refunds", json={"amount": 500}, headers=tenant["headers"])
    assert_problem(r, 400, "idempotency-key-required")
    assert await refund_ids(client, tenant, pid) == []

    first = await refund(client, tenant, pid, {"amount": 500}, key="refund-1")
    assert first.status_code == 202, first.text
    await settled_refund(client, tenant, pid, first.json()["refund"]["id"])
    again = await refund(client, tenant, pid, {"amount": 500}, key="refund-1")
    assert again.status_code == 202
    assert again.headers.get("idempotent-replayed") == "true"
    assert again.content == first.content
    assert again.json()["refund"]["id"] == first.json()["refund"]["id"]

    # A full refund replayed is the same refund too (no body, same key).
    rest = await refund(client, tenant, pid, key="refund-2")
    assert rest.status_code == 202, rest.text
    await settled_refund(client, tenant, pid, rest.json()["refund"]["id"])
    rest_again = await refund(client, tenant, pid, key="refund-2")
    assert (rest_again.headers.get("idempotent-replayed"), rest_again.content) == ("true", rest.content)

    assert await refund_ids(client, tenant, pid) == [rest.json()["refund"]["id"], first.json()["refund"]["id"]]
    after = await get_payment(client, tenant, pid)
    assert (after["status"], after["amount_refunded"]) == ("refunded", 2500)


# -- listing ----------------------------------------------------------------------------------------


async def test_payments_are_listed_newest_first_page_by_page_and_filtered(any_client: Client) -> None:
    client = any_client
    tenant = await signup(client)
    methods = ["pm_card_visa", "pm_card_chargeDeclined", "pm_card_visa", "pm_card_chargeDeclined", "pm_card_visa"]
    created = [(await pay(client, tenant, payment_method=m, amount=100 + i))["payment"] for i, m in enumerate(methods)]
    for p in created:
        await settled(client, tenant, p["id"])
    ids = [p["id"] for p in created]
    newest_first = ids[::-1]
    assert await listed_ids(client, tenant) == newest_first

    # Pages of two, following next_cursor until there is none.
    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = await listed(client, tenant, **params)
        pages.append([p["id"] for p in page["items"]])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == [newest_first[0:2], newest_first[2:4], newest_first[4:]]

    assert await listed_ids(client, tenant, status="failed") == [ids[3], ids[1]]
    assert await listed_ids(client, tenant, status="succeeded") == [ids[4], ids[2], ids[0]]
    assert await listed_ids(client, tenant, status="refunded") == []
    failed_page = await listed(client, tenant, status="failed", limit=1)
    assert [p["id"] for p in failed_page["items"]] == [ids[3]]
    rest = await listed(client, tenant, status="failed", limit=1, cursor=failed_page["next_cursor"])
    assert [p["id"] for p in rest["items"]] == [ids[1]]

    # created_from is inclusive, created_to exclusive; any UTC offset will do.
    at = [stamp(p["created_at"]) for p in created]
    assert at == sorted(at)
    assert await listed_ids(client, tenant, created_from=at[2].isoformat()) == [ids[4], ids[3], ids[2]]
    assert await listed_ids(client, tenant, created_to=at[2].isoformat()) == [ids[1], ids[0]]
    plus_two = at[1].astimezone(timezone(timedelta(hours=2))).isoformat()
    assert plus_two.endswith("+02:00")
    assert await listed_ids(client, tenant, created_from=plus_two, created_to=at[3].isoformat()) == [ids[2], ids[1]]
    z = (at[0] - timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert await listed_ids(client, tenant, created_from=z, status="failed") == [ids[3], ids[1]]
    later = (at[4] + timedelta(seconds=1)).isoformat()
    assert await listed_ids(client, tenant, created_from=later) == []


async def test_bad_list_parameters_are_422(client: Client, tenant: dict[str, Any]) -> None:
    naive = assert_problem(
        await client.get("/v1/payments", headers=tenant["headers"], params={"created_from": "2026-11-01T00:00:00"}),
        422,
    )
    assert [e.get("parameter") for e in naive["errors"]] == ["created_from"]
    naive_to = assert_problem(
        await client.get("/v1/payments", headers=tenant["headers"], params={"created_to": "2026-11-01T00:00:00"}),
        422,
    )
    assert [e.get("parameter") for e in naive_to["errors"]] == ["created_to"]
    for start, end in (("2026-11-02T00:00:00Z", "2026-11-01T00:00:00Z"), ("2026-11-01T00:00:00Z",) * 2):
        r = await client.get(
            "/v1/payments", headers=tenant["headers"], params={"created_from": start, "created_to": end}
        )
        problem = assert_problem(r, 422)
        assert "created_from" in json.dumps(problem["errors"])
    for params in ({"status": "paid"}, {"limit": 0}, {"limit": 101}, {"cursor": "not-a-cursor"}):
        assert_problem(await client.get("/v1/payments", headers=tenant["headers"], params=params), 422)


# -- tenants ----------------------------------------------------------------------------------------


async def test_another_tenants_payments_and_refunds_are_not_found(
    client: Client, tenant: dict[str, Any], other_tenant: dict[str, Any]
) -> None:
    a, b = tenant, other_tenant
    pa = await paid(client, a)
    r = await refund(client, a, pa["id"], {"amount": 100})
    assert r.status_code == 202, r.text
    ra = await settled_refund(client, a, pa["id"], r.json()["refund"]["id"])
    pb = await paid(client, b, amount=999)
    unknown = str(uuid.uuid4())

    attempts = [
        ("GET", f"/v1/payments/{pa['id']}", None),
        ("GET", f"/v1/payments/{pa['id']}/refunds", None),
        ("GET", f"/v1/payments/{pa['id']}/refunds/{ra['id']}", None),
        ("GET", f"/v1/payments/{pb['id']}/refunds/{ra['id']}", None),
        ("POST", f"/v1/payments/{pa['id']}/refunds", {"amount": 100}),
        ("POST", f"/v1/payments/{pa['id']}/refunds", None),
        ("GET", f"/v1/payments/{unknown}", None),
        ("GET", f"/v1/payments/{unknown}/refunds", None),
        ("POST", f"/v1/payments/{unknown}/refunds", None),
        ("GET", f"/v1/jobs/{event_job_id(uuid.UUID(pa['id']), CAPTURE_JOB)}", None),
    ]
    for method, path, body in attempts:
        kwargs: dict[str, Any] = {"headers": keyed(b) if method == "POST" else b["headers"]}
        if body is not None:
            kwargs["json"] = body
        problem = assert_problem(await client.request(method, path, **kwargs), 404, "not-found")
        assert pa["id"] not in json.dumps({k: v for k, v in problem.items() if k != "instance"})
    # A refund is only found under its own payment, even by its tenant.
    assert_problem(await client.get(f"/v1/payments/{unknown}/refunds/{ra['id']}", headers=a["headers"]), 404)

    assert await listed_ids(client, a) == [pa["id"]]
    assert await listed_ids(client, b) == [pb["id"]]
    assert await listed_ids(client, b, status="partially_refunded") == []
    # B's attempts changed nothing of A's.
    after = await get_payment(client, a, pa["id"])
    assert (after["status"], after["amount_refunded"], after["amount_refundable"]) == ("partially_refunded", 100, 2400)
    assert await refund_ids(client, a, pa["id"]) == [ra["id"]]


# -- the cache --------------------------------------------------------------------------------------


async def test_a_payment_is_read_from_the_cache_until_its_refund_settles(
    client: Client, tenant: dict[str, Any]
) -> None:
    container = container_of(client)
    stats = container.cache.stats
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    async def read(payment_id: str) -> tuple[dict[str, Any], list[str]]:
        """The payment, and the SQL statements on the payments table that reading it took."""
        before = len(statements)
        found = await get_payment(client, tenant, payment_id)
        return found, [x for x in statements[before:] if "payments" in x]

    p = await paid(client, tenant)
    event.listen(container.engine.sync_engine, "before_cursor_execute", record)
    try:
        await read(p["id"])  # loaded (or already cached)
        hits = stats.hits
        cached, sql = await read(p["id"])
        assert sql == []  # served from the cache
        assert stats.hits > hits
        assert cached == p

        r = await refund(client, tenant, p["id"], {"amount": 700})
        assert r.status_code == 202, r.text
        await settled_refund(client, tenant, p["id"], r.json()["refund"]["id"])
        # payment.refunded invalidated the entry: the next read loads the payment with its refund.
        after, sql = await read(p["id"])
        assert (after["status"], after["amount_refunded"], after["amount_refundable"]) == (
            "partially_refunded",
            700,
            1800,
        )
        again, sql = await read(p["id"])
        assert (again, sql) == (after, [])
    finally:
        event.remove(container.engine.sync_engine, "before_cursor_execute", record)


# -- receipts ---------------------------------------------------------------------------------------


async def test_receipts_are_mailed_to_the_customer_for_the_payment_and_each_refund(
    client: Client, tenant: dict[str, Any], tmp_path: Path
) -> None:
    mail = tmp_path / "mail"

    def files(kind: str) -> list[Path]:
        return sorted(mail.glob(f"*.{kind}@*.eml")) if mail.exists() else []

    async def mailed(kind: str, count: int) -> list[Path]:
        async def probe() -> list[Path]:
            found = files(kind)
            return found if len(found) >= count else []

        return await eventually(probe)

    p = await paid(client, tenant, customer_email="Buyer@Example.COM", description="Order #1042")
    assert p["customer_email"] == "buyer@example.com"
    [receipt_file] = await mailed("payment_receipt", 1)
    [succeeded_event] = await event_ids(client, "payment.succeeded", p["id"])
    assert receipt_file.name.startswith(str(succeeded_event))
    receipt = parse(receipt_file)
    assert parseaddr(receipt["To"])[1] == "buyer@example.com"
    assert receipt["Subject"] == "Your receipt from Acme: 25.00 EUR"
    text = text_of(receipt)
    assert "Amount paid: 25.00 EUR" in text
    assert "For: Order #1042" in text
    assert f"Payment reference: {p['id']}" in text

    r = await refund(client, tenant, p["id"], {"amount": 1000})
    assert r.status_code == 202, r.text
    await settled_refund(client, tenant, p["id"], r.json()["refund"]["id"])
    [refund_file] = await mailed("refund_receipt", 1)
    refund_mail = parse(refund_file)
    assert parseaddr(refund_mail["To"])[1] == "buyer@example.com"
    assert refund_mail["Subject"] == "Acme refunded 10.00 EUR"
    text = text_of(refund_mail)
    assert "Acme has refunded 10.00 EUR of your payment of 25.00 EUR." in text
    assert "Refunded so far: 10.00 EUR" in text
    assert len(files("payment_receipt")) == 1


async def test_no_receipt_without_a_customer_email(client: Client, tenant: dict[str, Any], tmp_path: Path) -> None:
    p = await paid(client, tenant)
    [succeeded_event] = await event_ids(client, "payment.succeeded", p["id"])
    send = await finished_job(client, tenant, event_job_id(succeeded_event, SEND_JOB))
    assert send["status"] == "succeeded"
    assert send["result"]["outcome"].startswith("skipped")

    r = await refund(client, tenant, p["id"])
    assert r.status_code == 202, r.text
    await settled_refund(client, tenant, p["id"], r.json()["refund"]["id"])
    [refunded_event] = await event_ids(client, "payment.refunded", p["id"])
    send = await finished_job(client, tenant, event_job_id(refunded_event, SEND_JOB))
    assert send["result"]["outcome"].startswith("skipped")

    assert not list((tmp_path / "mail").glob("*receipt*"))


async def test_a_declined_payment_gets_no_receipt(client: Client, tenant: dict[str, Any], tmp_path: Path) -> None:
    accepted = await pay(client, tenant, payment_method="pm_card_chargeDeclined", customer_email="buyer@example.com")
    assert (await settled(client, tenant, accepted["payment"]["id"]))["status"] == "failed"
    [failed_event] = await event_ids(client, "payment.failed", accepted["payment"]["id"])
    # payment.failed owes no email: no send job exists for it.
    assert_problem(await client.get(f"/v1/jobs/{event_job_id(failed_event, SEND_JOB)}", headers=tenant["headers"]), 404)
    assert await event_ids(client, "payment.succeeded", accepted["payment"]["id"]) == []
    assert not list((tmp_path / "mail").glob("*receipt*"))


# -- webhooks ---------------------------------------------------------------------------------------


async def test_the_webhook_catalogue_lists_the_payment_events(client: Client, tenant: dict[str, Any]) -> None:
    r = await client.get("/v1/webhook-event-types", headers=tenant["headers"])
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    for event_type in [*PAYMENT_EVENT_TYPES, "payment.refund_failed"]:
        assert event_type in items
    assert set(PAYMENT_EVENTS) <= set(items)
    assert "refund.created" not in items  # internal: it only triggers the refund job
    # An endpoint can subscribe to them.
    e = await client.post(
        "/v1/webhook-endpoints",
        headers=tenant["headers"],
        json={"url": "https://example.com/hooks", "event_types": ["payment.succeeded", "payment.refunded"]},
    )
    assert e.status_code == 201, e.text
    assert e.json()["event_types"] == ["payment.refunded", "payment.succeeded"]
