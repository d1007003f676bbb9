"""Webhooks over HTTP, end to end: endpoints managed through the API, events of the accounts context
delivered by the embedded job runner to a real HTTP receiver on 127.0.0.1, and every delivery verified
with the official ``standardwebhooks`` package, the way a customer's receiver would.

The embedded default (SQLite, no Redis) runs everything; the main flows run on Postgres too. The
sender itself is exercised directly for what needs no app: the SSRF guard, timeouts, redirects and
``Retry-After``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from keel.contexts.accounts.public import PUBLIC_EVENTS as ACCOUNT_EVENTS
from keel.contexts.payments.public import PUBLIC_EVENTS as PAYMENT_EVENTS
from keel.contexts.webhooks.adapters.httpx_sender import HttpxWebhookSender, parse_retry_after
from keel.contexts.webhooks.domain.model import new_secret
from keel.main.container import PUBLIC_EVENTS
from tests.support.app import client_for, make_settings, signup
from tests.support.receivers import Received, Receiver, Reply, webhook_receiver
from tests.support.waiting import eventually

Client = AsyncTestClient[Litestar]
PROBLEM = "application/problem+json"
# Receivers run on 127.0.0.1 over plain http, so these apps allow private targets; retries come fast.
FAST = {"KEEL_WEBHOOKS_ALLOW_PRIVATE": "true", "KEEL_WEBHOOKS_RETRY_SCHEDULE": "0.2,0.2,0.2"}
MAX_ATTEMPTS = 4  # 1 + the three delays above


@pytest.fixture
async def client(sqlite_url: str, tmp_path: Path) -> AsyncIterator[Client]:
    """The embedded default: SQLite, jobs run in-process."""
    async with client_for(make_settings(sqlite_url, tmp_path, **FAST)) as c:
        yield c


@pytest.fixture
async def any_client(database_url: str, tmp_path: Path) -> AsyncIterator[Client]:
    """The same app on SQLite and on Postgres."""
    async with client_for(make_settings(database_url, tmp_path, **FAST)) as c:
        yield c


@pytest.fixture
async def strict_client(sqlite_url: str, tmp_path: Path) -> AsyncIterator[Client]:
    """Production defaults: private targets refused."""
    async with client_for(make_settings(sqlite_url, tmp_path)) as c:
        yield c


# -- helpers ----------------------------------------------------------------------------------------


async def create_endpoint(
    client: Client, headers: dict[str, str], url: str, types: Sequence[str] = ("user.created",), **extra: Any
) -> dict[str, Any]:
    r = await client.post(
        "/v1/webhook-endpoints", headers=headers, json={"url": url, "event_types": list(types), **extra}
    )
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


async def history(client: Client, headers: dict[str, str], endpoint_id: str) -> list[dict[str, Any]]:
    r = await client.get(f"/v1/webhook-endpoints/{endpoint_id}/deliveries", headers=headers)
    assert r.status_code == 200, r.text
    items: list[dict[str, Any]] = r.json()["items"]
    return items


async def settled(
    client: Client,
    headers: dict[str, str],
    endpoint_id: str,
    count: int = 1,
    done: Sequence[str] = ("succeeded", "failed"),
    attempts: int = 1,
) -> list[dict[str, Any]]:
    """The endpoint's deliveries once there are ``count`` of them, each in a ``done`` status with at least
    ``attempts`` attempts recorded."""

    async def probe() -> list[dict[str, Any]] | None:
        items = await history(client, headers, endpoint_id)
        ready = len(items) >= count and all(i["status"] in done and len(i["attempts"]) >= attempts for i in items)
        return items if ready else None

    found: list[dict[str, Any]] = await eventually(probe)
    return found


async def received(receiver: Receiver, count: int) -> list[Received]:
    return await asyncio.to_thread(receiver.wait_for, count)


async def create_user(client: Client, headers: dict[str, str], n: int = 0) -> dict[str, Any]:
    r = await client.post("/v1/users", headers=headers, json={"email": f"zoe{n}@acme.test", "name": f"Zo\u00eb {n}"})
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


def verify(secret: str, request: Received) -> dict[str, Any]:
    """What a receiver does: check the signature (and timestamp) and parse the payload."""
    payload: dict[str, Any] = Webhook(secret).verify(request.body, request.headers)
    return payload


def signatures(request: Received) -> list[str]:
    return request.headers["webhook-signature"].split(" ")


def assert_problem(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    body: dict[str, Any] = r.json()
    assert body["status"] == status
    return body


# -- endpoints: CRUD and validation -----------------------------------------------------------------


async def test_endpoint_lifecycle_shows_the_secret_only_on_create_and_rotate(client: Client) -> None:
    t = await signup(client)
    h = t["headers"]
    r = await client.post(
        "/v1/webhook-endpoints",
        headers=h,
        json={
            "url": "https://example.com/hooks",
            "event_types": ["user.deleted", "user.created", "user.deleted"],
            "description": "CRM sync",
        },
    )
    assert r.status_code == 201, r.text
    created = r.json()
    eid = created["id"]
    secret = created["secret"]
    assert r.headers["location"] == f"/v1/webhook-endpoints/{eid}"
    assert secret.startswith("whsec_")
    assert created["event_types"] == ["user.created", "user.deleted"]
    assert (created["url"], created["description"], created["enabled"]) == (
        "https://example.com/hooks",
        "CRM sync",
        True,
    )
    assert created["disabled_reason"] is None
    assert created["previous_secret_expires_at"] is None

    texts: list[str] = []
    got = await client.get(f"/v1/webhook-endpoints/{eid}", headers=h)
    assert got.status_code == 200, got.text
    assert "secret" not in got.json()
    assert {k: v for k, v in created.items() if k != "secret"} == got.json()
    texts.append(got.text)

    listed = await client.get("/v1/webhook-endpoints", headers=h)
    assert listed.status_code == 200, listed.text
    assert [e["id"] for e in listed.json()["items"]] == [eid]
    assert listed.json()["next_cursor"] is None
    texts.append(listed.text)

    patched = await client.patch(
        f"/v1/webhook-endpoints/{eid}",
        headers=h,
        json={"description": "", "event_types": ["api_key.created"], "url": "https://example.org/v2"},
    )
    assert patched.status_code == 200, patched.text
    p = patched.json()
    assert (p["url"], p["description"], p["event_types"]) == ("https://example.org/v2", "", ["api_key.created"])
    assert p["updated_at"] >= created["updated_at"]
    texts.append(patched.text)

    off = await client.patch(f"/v1/webhook-endpoints/{eid}", headers=h, json={"enabled": False})
    assert (off.json()["enabled"], off.json()["disabled_reason"]) == (False, "Disabled by the tenant.")
    on = await client.patch(f"/v1/webhook-endpoints/{eid}", headers=h, json={"enabled": True})
    assert (on.json()["enabled"], on.json()["disabled_reason"]) == (True, None)
    texts += [off.text, on.text]

    rotated = await client.post(f"/v1/webhook-endpoints/{eid}/rotate-secret", headers=h)
    assert rotated.status_code == 200, rotated.text
    new = rotated.json()["secret"]
    assert new.startswith("whsec_")
    assert new != secret
    expires = datetime.fromisoformat(rotated.json()["previous_secret_expires_at"].replace("Z", "+00:00"))
    after = await client.get(f"/v1/webhook-endpoints/{eid}", headers=h)
    assert datetime.fromisoformat(after.json()["previous_secret_expires_at"].replace("Z", "+00:00")) == expires
    updated = datetime.fromisoformat(after.json()["updated_at"].replace("Z", "+00:00"))
    assert expires - updated == timedelta(hours=24)
    texts += [after.text, (await client.get("/v1/webhook-endpoints", headers=h)).text]
    texts.append((await client.get(f"/v1/webhook-endpoints/{eid}/deliveries", headers=h)).text)

    for text in texts:
        assert secret not in text
        assert new not in text
        assert "whsec_" not in text

    gone = await client.delete(f"/v1/webhook-endpoints/{eid}", headers=h)
    assert gone.status_code == 204
    assert_problem(await client.get(f"/v1/webhook-endpoints/{eid}", headers=h), 404)
    assert_problem(await client.delete(f"/v1/webhook-endpoints/{eid}", headers=h), 404)
    assert_problem(await client.post(f"/v1/webhook-endpoints/{eid}/rotate-secret", headers=h), 404)
    assert_problem(await client.get(f"/v1/webhook-endpoints/{eid}/deliveries", headers=h), 404)


async def test_event_types_are_the_public_catalogue(client: Client) -> None:
    t = await signup(client)
    r = await client.get("/v1/webhook-event-types", headers=t["headers"])
    assert r.status_code == 200, r.text
    assert r.json() == {"items": sorted(PUBLIC_EVENTS)}
    # The catalogue is every context's public events, and nothing internal.
    assert set(PUBLIC_EVENTS) == set(ACCOUNT_EVENTS) | set(PAYMENT_EVENTS)
    assert {
        "user.created",
        "payment.created",
        "payment.succeeded",
        "payment.failed",
        "payment.refunded",
        "payment.refund_failed",
    } <= set(r.json()["items"])
    assert not {"tenant.created", "refund.created", "*"} & set(r.json()["items"])
    assert_problem(await client.get("/v1/webhook-event-types"), 401)


GOOD = {"url": "https://example.com/hooks", "event_types": ["user.created"]}
INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("ftp-url", {**GOOD, "url": "ftp://example.com/hooks"}, "#/url"),
    ("relative-url", {**GOOD, "url": "/hooks/keel"}, "#/url"),
    ("url-with-credentials", {**GOOD, "url": "https://user:pw@example.com/hooks"}, "#/url"),
    ("url-bad-port", {**GOOD, "url": "https://example.com:99999/hooks"}, "#/url"),
    ("url-with-space", {**GOOD, "url": "https://example.com/a b"}, "#/url"),
    ("url-not-a-string", {**GOOD, "url": 42}, "#/url"),
    ("url-too-long", {**GOOD, "url": "https://example.com/" + "a" * 2100}, "#/url"),
    ("unknown-event-type", {**GOOD, "event_types": ["user.created", "user.exploded"]}, "#/event_types/1"),
    ("wildcard-event-type", {**GOOD, "event_types": ["*"]}, "#/event_types/0"),
    ("empty-event-types", {**GOOD, "event_types": []}, "#/event_types"),
    ("event-types-not-a-list", {**GOOD, "event_types": "user.created"}, "#/event_types"),
    ("description-control-char", {**GOOD, "description": "a\x1bb"}, "#/description"),
    ("description-too-long", {**GOOD, "description": "x" * 501}, "#/description"),
    ("enabled-not-a-bool", {**GOOD, "enabled": "maybe"}, "#/enabled"),
]


async def test_invalid_endpoints_are_422_with_a_pointer_and_change_nothing(client: Client) -> None:
    t = await signup(client)
    h = t["headers"]
    existing = await create_endpoint(client, h, "https://example.com/ok")
    failures: list[str] = []
    for name, body, pointer in INVALID:
        created = await client.post("/v1/webhook-endpoints", headers=h, json=body)
        # The same change on an existing endpoint is refused the same way.
        change = {k: v for k, v in body.items() if k not in GOOD or v != GOOD[k]}
        changed = await client.patch(f"/v1/webhook-endpoints/{existing['id']}", headers=h, json=change)
        for verb, r in (("POST", created), ("PATCH", changed)):
            if r.status_code != 422 or not r.headers["content-type"].startswith(PROBLEM):
                failures.append(f"{name}: {verb} -> {r.status_code} {r.text[:200]}")
            elif pointer not in [e.get("pointer") for e in r.json()["errors"]]:
                failures.append(f"{name}: {verb} errors {r.json()['errors']} lack pointer {pointer}")
    assert not failures, "\n".join(failures)
    after = await client.get(f"/v1/webhook-endpoints/{existing['id']}", headers=h)
    assert after.json() == {k: v for k, v in existing.items() if k != "secret"}
    listed = await client.get("/v1/webhook-endpoints", headers=h)
    assert [x["id"] for x in listed.json()["items"]] == [existing["id"]]


async def test_unknown_and_missing_fields_are_422(client: Client) -> None:
    t = await signup(client)
    h = t["headers"]
    problem = assert_problem(await client.post("/v1/webhook-endpoints", headers=h, json={**GOOD, "secret": "x"}), 422)
    assert "secret" in json.dumps(problem["errors"])
    assert all(e["pointer"].startswith("#") for e in problem["errors"])
    problem = assert_problem(await client.post("/v1/webhook-endpoints", headers=h, json={"url": GOOD["url"]}), 422)
    assert "event_types" in json.dumps(problem["errors"])
    assert all(e["pointer"].startswith("#") for e in problem["errors"])
    e = await create_endpoint(client, h, "https://example.com/ok")
    patch = await client.patch(f"/v1/webhook-endpoints/{e['id']}", headers=h, json={"tenant_id": t["tenant"]["id"]})
    assert_problem(patch, 422)
    assert (await client.get("/v1/webhook-endpoints", headers=h)).json()["items"][0]["id"] == e["id"]


async def test_a_url_the_parser_rejects_is_a_validation_error_not_a_crash(client: Client) -> None:
    t = await signup(client)
    failures = []
    for url in ("https://[::1/hooks", "https://[not-an-ip]/hooks", "https://exa]mple.com/hooks"):
        r = await client.post("/v1/webhook-endpoints", headers=t["headers"], json={**GOOD, "url": url})
        if r.status_code != 422 or "#/url" not in [e.get("pointer") for e in r.json().get("errors", [])]:
            failures.append(f"{url} -> {r.status_code} {r.text[:200]}")
    assert not failures, "\n".join(failures)


# -- deliveries -------------------------------------------------------------------------------------


async def test_events_are_delivered_signed_with_the_standard_payload(any_client: Client) -> None:
    client = any_client
    t = await signup(client)
    h = t["headers"]
    with webhook_receiver() as receiver:
        e = await create_endpoint(client, h, receiver.url, ["user.created", "user.updated", "api_key.created"])
        secret = e["secret"]
        # A second endpoint of the tenant that subscribes to nothing that happens here.
        quiet = await create_endpoint(client, h, receiver.url + "/quiet", ["tenant.updated"])

        user = await create_user(client, h)
        [first] = await settled(client, h, e["id"], 1)
        r = await client.patch(f"/v1/users/{user['id']}", headers=h, json={"name": "Zo\u00eb Renamed"})
        assert r.status_code == 200, r.text
        await settled(client, h, e["id"], 2)
        key = await client.post("/v1/api-keys", headers=h, json={"name": "CI"})
        assert key.status_code == 201, key.text
        deliveries = await settled(client, h, e["id"], 3)
        requests = await received(receiver, 3)

    # Every request verifies with the endpoint's secret, and only with it.
    payloads = [verify(secret, req) for req in requests]
    for req in requests:
        with pytest.raises(WebhookVerificationError):
            Webhook(new_secret()).verify(req.body, req.headers)
        assert req.path == "/hooks"
        assert req.headers["content-type"] == "application/json"
        assert len(signatures(req)) == 1
        assert req.headers["webhook-signature"].startswith("v1,")

    by_type = {p["type"]: p for p in payloads}
    assert set(by_type) == {"user.created", "user.updated", "api_key.created"}
    for p in payloads:
        assert set(p) == {"type", "timestamp", "data"}
        assert datetime.fromisoformat(p["timestamp"]).tzinfo is not None
    assert by_type["user.created"]["data"] == {"user_id": user["id"], "email": "zoe0@acme.test", "name": "Zo\u00eb 0"}
    assert by_type["user.updated"]["data"]["user_id"] == user["id"]
    assert set(by_type["api_key.created"]["data"]) == {"api_key_id", "name"}
    assert by_type["api_key.created"]["data"] == {"api_key_id": key.json()["id"], "name": "CI"}
    # Internal fields of events never leave: the key's token, prefix or hash.
    for req in requests:
        assert key.json()["token"].encode() not in req.body
        assert b"secret_hash" not in req.body
        assert b"display_prefix" not in req.body

    # The history: newest first, one successful attempt each, and webhook-id is the delivery id.
    assert [d["event_type"] for d in deliveries] == ["api_key.created", "user.updated", "user.created"]
    assert first["id"] == deliveries[-1]["id"]
    assert {d["id"] for d in deliveries} == {req.headers["webhook-id"] for req in requests}
    for d in deliveries:
        assert (d["status"], d["attempt_count"], d["last_status_code"], d["next_attempt_at"]) == (
            "succeeded",
            1,
            200,
            None,
        )
        [a] = d["attempts"]
        assert (a["number"], a["status_code"], a["error"]) == (1, 200, None)
        assert isinstance(a["latency_ms"], int)
        assert a["latency_ms"] >= 0
    one = await client.get(f"/v1/webhook-endpoints/{e['id']}/deliveries/{first['id']}", headers=h)
    assert one.status_code == 200, one.text
    assert one.json() == first
    assert await history(client, h, quiet["id"]) == []


async def test_a_failing_receiver_gets_the_same_message_until_it_succeeds(any_client: Client) -> None:
    client = any_client
    t = await signup(client)
    h = t["headers"]
    with webhook_receiver([Reply(500), Reply(500)], then=Reply(200)) as receiver:
        e = await create_endpoint(client, h, receiver.url)
        await create_user(client, h)
        [d] = await settled(client, h, e["id"], 1, done=("succeeded",))
        requests = await received(receiver, 3)
    assert len(requests) == 3
    assert len({req.headers["webhook-id"] for req in requests}) == 1
    assert requests[0].headers["webhook-id"] == d["id"]
    assert len({req.body for req in requests}) == 1
    for req in requests:
        assert verify(e["secret"], req)["type"] == "user.created"
    assert (d["status"], d["attempt_count"], d["last_status_code"], d["last_error"]) == ("succeeded", 3, 200, None)
    assert [a["number"] for a in d["attempts"]] == [1, 2, 3]
    assert [a["status_code"] for a in d["attempts"]] == [500, 500, 200]
    assert [a["error"] for a in d["attempts"]] == ["HTTP 500", "HTTP 500", None]
    assert all(isinstance(a["latency_ms"], int) and a["latency_ms"] >= 0 for a in d["attempts"])
    started = [a["started_at"] for a in d["attempts"]]
    assert started == sorted(started)


async def test_410_gone_disables_the_endpoint(client: Client) -> None:
    t = await signup(client)
    h = t["headers"]
    with webhook_receiver(then=Reply(410)) as gone_receiver, webhook_receiver() as sentinel_receiver:
        e = await create_endpoint(client, h, gone_receiver.url)
        sentinel = await create_endpoint(client, h, sentinel_receiver.url)
        await create_user(client, h, 1)
        [d] = await settled(client, h, e["id"], 1)
        assert (d["status"], d["attempt_count"], d["last_status_code"]) == ("failed", 1, 410)

        r = await client.get(f"/v1/webhook-endpoints/{e['id']}", headers=h)
        assert r.json()["enabled"] is False
        assert "410" in r.json()["disabled_reason"]

        # The next event reaches the sentinel (so its fan-out has run) but not the disabled endpoint.
        await create_user(client, h, 2)
        await settled(client, h, sentinel["id"], 2)
        assert len(await history(client, h, e["id"])) == 1
        assert len(gone_receiver.received) == 1

        # Re-enabling it brings deliveries back.
        on = await client.patch(f"/v1/webhook-endpoints/{e['id']}", headers=h, json={"enabled": True})
        assert (on.json()["enabled"], on.json()["disabled_reason"]) == (True, None)
        await create_user(client, h, 3)
        await settled(client, h, e["id"], 2)


async def test_429_retry_after_is_honoured_and_a_pending_delivery_cannot_be_retried(client: Client) -> None:
    t = await signup(client)
    h = t["headers"]
    with webhook_receiver(then=Reply(429, {"Retry-After": "120"})) as receiver:
        e = await create_endpoint(client, h, receiver.url)
        await create_user(client, h)
        [d] = await settled(client, h, e["id"], 1, done=("pending",))
        assert (d["attempt_count"], d["last_status_code"]) == (1, 429)
        started = datetime.fromisoformat(d["attempts"][0]["started_at"].replace("Z", "+00:00"))
        next_at = datetime.fromisoformat(d["next_attempt_at"].replace("Z", "+00:00"))
        # The schedule says 0.2 s; the receiver asked for 120 s, and gets them.
        assert timedelta(seconds=120) <= next_at - started < timedelta(seconds=180)

        r = await client.post(f"/v1/webhook-endpoints/{e['id']}/deliveries/{d['id']}/retry", headers=h)
        assert_problem(r, 409)
        assert len(receiver.received) == 1


async def test_after_rotation_deliveries_verify_with_the_old_and_the_new_secret(client: Client) -> None:
    t = await signup(client)
    h = t["headers"]
    with webhook_receiver() as receiver:
        e = await create_endpoint(client, h, receiver.url)
        old = e["secret"]
        r = await client.post(f"/v1/webhook-endpoints/{e['id']}/rotate-secret", headers=h)
        assert r.status_code == 200, r.text
        new = r.json()["secret"]
        await create_user(client, h)
        await settled(client, h, e["id"], 1)
        [req] = await received(receiver, 1)
    assert len(signatures(req)) == 2
    assert verify(new, req)["type"] == "user.created"
    assert verify(old, req)["type"] == "user.created"
    # One signature per secret: the new one first.
    first_only = {**req.headers, "webhook-signature": signatures(req)[0]}
    second_only = {**req.headers, "webhook-signature": signatures(req)[1]}
    Webhook(new).verify(req.body, first_only)
    Webhook(old).verify(req.body, second_only)
    with pytest.raises(WebhookVerificationError):
        Webhook(old).verify(req.body, first_only)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(req.body, req.headers)


async def test_manual_retry_makes_one_more_attempt_as_a_job(client: Client) -> None:
    t = await signup(client)
    h = t["headers"]
    with webhook_receiver([Reply(503)] * MAX_ATTEMPTS, then=Reply(200)) as receiver:
        e = await create_endpoint(client, h, receiver.url)
        await create_user(client, h)
        [d] = await settled(client, h, e["id"], 1, done=("failed",))
        assert (d["attempt_count"], d["last_status_code"], d["next_attempt_at"]) == (MAX_ATTEMPTS, 503, None)
        assert len(receiver.received) == MAX_ATTEMPTS

        path = f"/v1/webhook-endpoints/{e['id']}/deliveries/{d['id']}/retry"
        r = await client.post(path, headers=h)
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        assert r.headers["location"] == f"/v1/jobs/{job_id}" == r.json()["status_url"]

        [after] = await settled(client, h, e["id"], 1, done=("succeeded",), attempts=MAX_ATTEMPTS + 1)
        requests = await received(receiver, MAX_ATTEMPTS + 1)
    assert after["attempt_count"] == MAX_ATTEMPTS + 1
    assert [a["status_code"] for a in after["attempts"]] == [503] * MAX_ATTEMPTS + [200]
    assert {req.headers["webhook-id"] for req in requests} == {d["id"]}
    for req in requests:
        verify(e["secret"], req)

    # The job that made the attempt can be followed at the Location given.
    job = await client.get(r.headers["location"], headers=h)
    assert job.status_code == 200, job.text
    assert (job.json()["id"], job.json()["type"], job.json()["status"]) == (job_id, "webhooks.deliver", "succeeded")
    assert job.json()["result"] == {"outcome": "succeeded"}

    # A retry through another endpoint's path, or of an unknown delivery, is not found.
    other = await create_endpoint(client, h, receiver.url, ["user.deleted"])
    assert_problem(await client.post(f"/v1/webhook-endpoints/{other['id']}/deliveries/{d['id']}/retry", headers=h), 404)
    assert_problem(await client.get(f"/v1/webhook-endpoints/{other['id']}/deliveries/{d['id']}", headers=h), 404)
    assert_problem(await client.post(f"/v1/webhook-endpoints/{e['id']}/deliveries/{e['id']}/retry", headers=h), 404)


async def test_another_tenants_deliveries_and_jobs_are_not_found(client: Client) -> None:
    a = await signup(client, "Acme", "owner@acme.test")
    b = await signup(client, "Globex", "owner@globex.test")
    with webhook_receiver() as receiver:
        ea = await create_endpoint(client, a["headers"], receiver.url)
        eb = await create_endpoint(client, b["headers"], receiver.url)
        await create_user(client, a["headers"])
        [da] = await settled(client, a["headers"], ea["id"], 1)
        retry = await client.post(f"/v1/webhook-endpoints/{ea['id']}/deliveries/{da['id']}/retry", headers=a["headers"])
        assert retry.status_code == 202, retry.text
        await settled(client, a["headers"], ea["id"], 1, attempts=2)

    hb = b["headers"]
    paths = [
        ("GET", f"/v1/webhook-endpoints/{ea['id']}/deliveries"),
        ("GET", f"/v1/webhook-endpoints/{ea['id']}/deliveries/{da['id']}"),
        ("GET", f"/v1/webhook-endpoints/{eb['id']}/deliveries/{da['id']}"),
        ("POST", f"/v1/webhook-endpoints/{ea['id']}/deliveries/{da['id']}/retry"),
        ("POST", f"/v1/webhook-endpoints/{eb['id']}/deliveries/{da['id']}/retry"),
    ]
    for method, path in paths:
        r = await client.request(method, path, headers=hb)
        problem = assert_problem(r, 404)
        assert da["id"] not in json.dumps({k: v for k, v in problem.items() if k != "instance"})
    assert await history(client, hb, eb["id"]) == []
    # A's delivery is unchanged by B's attempts.
    [again] = await history(client, a["headers"], ea["id"])
    assert again["attempt_count"] == 2
    # Nor can B follow A's job.
    job_path = f"/v1/jobs/{retry.json()['job_id']}"
    assert (await client.get(job_path, headers=a["headers"])).status_code == 200
    assert_problem(await client.get(job_path, headers=hb), 404)


# -- SSRF -------------------------------------------------------------------------------------------


PRIVATE_TARGETS = [
    "http://127.0.0.1:8080/hooks",
    "https://127.0.0.1/hooks",
    "https://10.0.0.1/hooks",
    "https://192.168.0.10/hooks",
    "https://169.254.169.254/latest/meta-data/",
    "https://[::1]/hooks",
    "https://[::ffff:127.0.0.1]/hooks",
    "https://localhost/hooks",
    "http://example.com/hooks",
]


async def test_private_targets_are_refused_at_creation_by_default(strict_client: Client) -> None:
    client = strict_client
    t = await signup(client)
    h = t["headers"]
    e = await create_endpoint(client, h, "https://example.com/hooks")
    for url in PRIVATE_TARGETS:
        created = await client.post(
            "/v1/webhook-endpoints", headers=h, json={"url": url, "event_types": ["user.created"]}
        )
        problem = assert_problem(created, 422)
        assert problem["errors"][0]["pointer"] == "#/url", (url, problem)
        assert_problem(await client.patch(f"/v1/webhook-endpoints/{e['id']}", headers=h, json={"url": url}), 422)
    listed = (await client.get("/v1/webhook-endpoints", headers=h)).json()["items"]
    assert [(x["id"], x["url"]) for x in listed] == [(e["id"], e["url"])]


async def test_an_ipv4_address_in_another_notation_is_refused_at_creation(strict_client: Client) -> None:
    """``127.1`` resolves to 127.0.0.1: URL parsers read a host ending in a number as an IPv4 address, so
    only dotted decimal is accepted, and then checked like any literal. (Names that resolve to private
    addresses are refused by the connection-time guard: test_security.py.)"""
    client = strict_client
    t = await signup(client)
    h = t["headers"]
    with webhook_receiver() as receiver:
        port = receiver.url.split(":")[2].split("/")[0]
        r = await client.post(
            "/v1/webhook-endpoints",
            headers=h,
            json={"url": f"https://127.1:{port}/hooks", "event_types": ["user.created"]},
        )
        assert_problem(r, 422)
        await create_user(client, h)
        assert receiver.received == []


async def test_an_unresolvable_host_is_a_failed_attempt_that_is_retried(strict_client: Client) -> None:
    """A host name that does not resolve is a network failure like any other: the attempt is recorded
    with its error and the delivery waits for its retry (it must not be left stuck in "sending")."""
    client = strict_client
    t = await signup(client)
    h = t["headers"]
    e = await create_endpoint(client, h, "https://keel-webhook-test.invalid/hooks")
    await create_user(client, h)

    async def attempted() -> list[dict[str, Any]] | None:
        items = await history(client, h, e["id"])
        return items if items and items[0]["attempts"] else None

    try:
        [d] = await eventually(attempted, within=3)
    except AssertionError:
        raise AssertionError(f"no attempt recorded: {await history(client, h, e['id'])}") from None
    assert (d["status"], d["attempt_count"], d["last_status_code"]) == ("pending", 1, None)
    assert d["last_error"]
    assert d["next_attempt_at"] is not None


# -- the sender on its own --------------------------------------------------------------------------


@pytest.fixture
async def guarded() -> AsyncIterator[HttpxWebhookSender]:
    s = HttpxWebhookSender(allow_private=False)
    yield s
    await s.aclose()


@pytest.fixture
async def lax() -> AsyncIterator[HttpxWebhookSender]:
    s = HttpxWebhookSender(allow_private=True, timeout=0.5)
    yield s
    await s.aclose()


async def send(sender: HttpxWebhookSender, url: str, secrets: Sequence[str] | None = None) -> Any:
    return await sender.send(
        url, message_id="msg_2Zs1", body='{"type":"user.created"}', secrets=list(secrets or [new_secret()])
    )


async def test_the_guard_refuses_private_addresses_without_connecting(guarded: HttpxWebhookSender) -> None:
    with webhook_receiver() as receiver:
        port = receiver.url.split(":")[2].split("/")[0]
        for host in ("localhost", "127.0.0.1", "127.1", "[::ffff:127.0.0.1]"):
            result = await send(guarded, f"http://{host}:{port}/hooks")
            assert result.refused, (host, result)
            assert result.status_code is None
            assert not result.ok
            assert "refused" in (result.error or "").lower()
        assert receiver.received == []
        assert not receiver.started.is_set()


async def test_an_unresolvable_name_is_a_failed_attempt_not_an_exception(guarded: HttpxWebhookSender) -> None:
    """The sender "never raises for what the receiver or the network does": a DNS failure must come
    back as an error result (to be retried), like any other connection failure."""
    result = await send(guarded, "https://keel-webhook-test.invalid/hooks")
    assert result.status_code is None
    assert result.error
    assert not result.refused


async def test_a_slow_receiver_times_out(lax: HttpxWebhookSender) -> None:
    with webhook_receiver(then=Reply(200, delay=2.0)) as receiver:
        result = await send(lax, receiver.url)
    assert result.status_code is None
    assert not result.ok
    assert not result.refused
    assert result.error == "No response within 0.5s."


async def test_redirects_are_failures_and_not_followed(lax: HttpxWebhookSender) -> None:
    with webhook_receiver([Reply(302, {"Location": "/elsewhere"}), Reply(307, {"Location": "/again"})]) as receiver:
        first = await send(lax, receiver.url)
        second = await send(lax, receiver.url)
        assert [r.path for r in receiver.received] == ["/hooks", "/hooks"]
    assert (first.status_code, first.ok, first.error) == (302, False, "HTTP 302")
    assert (second.status_code, second.ok, second.error) == (307, False, "HTTP 307")


async def test_the_request_is_a_signed_standard_webhook(lax: HttpxWebhookSender) -> None:
    old, new = new_secret(), new_secret()
    with webhook_receiver() as receiver:
        result = await lax.send(receiver.url, message_id="msg_abc", body='{"a":"\u00e9"}', secrets=[new, old])
        [req] = receiver.received
    assert (result.status_code, result.ok, result.error, result.refused) == (200, True, None, False)
    assert req.body == '{"a":"\u00e9"}'.encode()
    assert req.headers["webhook-id"] == "msg_abc"
    assert req.headers["content-type"] == "application/json"
    assert Webhook(new).verify(req.body, req.headers) == {"a": "\u00e9"}
    assert Webhook(old).verify(req.body, req.headers) == {"a": "\u00e9"}
    assert len(signatures(req)) == 2


async def test_connection_refused_is_an_error_result(lax: HttpxWebhookSender) -> None:
    with webhook_receiver() as receiver:
        url = receiver.url
    # The receiver is gone: nothing listens on that port any more.
    result = await send(lax, url)
    assert result.status_code is None
    assert result.error
    assert not result.refused


RETRY_AFTER = [("7", 7.0), ("0", 0.0), ("  30 ", 30.0), ("soon", None), ("-5", None), ("1.5", None)]


async def test_retry_after_values_are_read(lax: HttpxWebhookSender) -> None:
    when = datetime.now(UTC) + timedelta(minutes=10)
    script = [Reply(503, {"Retry-After": header}) for header, _ in RETRY_AFTER]
    script.append(Reply(429, {"Retry-After": format_datetime(when, usegmt=True)}))
    with webhook_receiver(script) as receiver:
        results = [await send(lax, receiver.url) for _ in script]
    assert [(r.status_code, r.retry_after) for r in results[:-1]] == [(503, expected) for _, expected in RETRY_AFTER]
    by_date = results[-1].retry_after
    assert by_date is not None
    assert 500 < by_date <= 600
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


async def test_a_non_ascii_digit_retry_after_does_not_break_the_sender(lax: HttpxWebhookSender) -> None:
    """'²'.isdigit() is True but float('²') raises: whatever a receiver puts in Retry-After, the
    attempt must come back as a result."""
    assert parse_retry_after("\u00b2") is None
    with webhook_receiver(then=Reply(503, {"Retry-After": "\u00b2"})) as receiver:
        result = await send(lax, receiver.url)
    assert result.status_code == 503
