"""Tenant isolation over HTTP: tenant B can neither reach nor see anything of tenant A.

A's data includes webhook endpoints (with their secrets), their delivery history, jobs, payments
(succeeded, refunded in part, declined) with their refunds, an avatar for every user, and the analytics
that sum them up (two closed days rolled up by a job of the tenant); routes taking two
ids (an endpoint's delivery, a payment's refund) are tried with each foreign id while the other is B's own.
An avatar upload carries an image, not JSON: B sends a valid one, so that only the id can be refused.

Every route that takes an id is tried by B with each of A's ids (in several spellings) and must
answer exactly like an id that does not exist: 404 problem+json, same type/title/detail. Every
tenant-scoped read is paged through by B and must not mention any of A's ids, emails, names or key
prefixes, including when B replays cursors taken from A's listings. A's data, read back with A's
key, must be unchanged at the end. The route tables are checked against the app's own routes, so a
new id-taking or list route without an isolation case fails the suite.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import re
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar import Litestar
from litestar.routes import HTTPRoute
from litestar.testing import AsyncTestClient
from PIL import Image

from keel.main.auth import PUBLIC_PATHS
from tests.conftest import REFUSED_HOST
from tests.support.waiting import eventually

Client = AsyncTestClient[Litestar]
PROBLEM = "application/problem+json"

HOOK = "/v1/webhook-endpoints/{endpoint_id:uuid}"
DELIVERY = HOOK + "/deliveries/{delivery_id:uuid}"
PAYMENT = "/v1/payments/{payment_id:uuid}"
REFUND = PAYMENT + "/refunds/{refund_id:uuid}"
AVATAR = "/v1/users/{user_id:uuid}/avatar"


@dataclass(frozen=True)
class Raw:
    """A body sent as bytes of its own media type (an image upload), not as JSON."""

    content_type: str
    data: bytes


def image(color: tuple[int, int, int], size: tuple[int, int] = (24, 16), fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format=fmt)
    return out.getvalue()


# What B uploads as avatars on A's users (and, in the control, on its own): a valid image, so that a refusal
# can only be about the id.
B_UPLOAD = Raw("image/png", image((10, 200, 30)))
Body = dict[str, Any] | Raw | None
# Every route with a path parameter: (method, template) -> the kind of id it takes and the body to send.
ID_ROUTES: dict[tuple[str, str], tuple[str, Body]] = {
    ("GET", "/v1/users/{user_id:uuid}"): ("user", None),
    ("PATCH", "/v1/users/{user_id:uuid}"): ("user", {"name": "Pwned by B", "email": "pwned@globex.test"}),
    ("DELETE", "/v1/users/{user_id:uuid}"): ("user", None),
    ("DELETE", "/v1/api-keys/{key_id:uuid}"): ("key", None),
    ("GET", HOOK): ("endpoint", None),
    ("PATCH", HOOK): ("endpoint", {"description": "Pwned by B", "event_types": ["tenant.updated"]}),
    ("DELETE", HOOK): ("endpoint", None),
    ("POST", HOOK + "/rotate-secret"): ("endpoint", None),
    ("GET", HOOK + "/deliveries"): ("endpoint", None),
    ("GET", DELIVERY): ("delivery", None),
    ("POST", DELIVERY + "/retry"): ("delivery", None),
    ("GET", "/v1/jobs/{job_id:uuid}"): ("job", None),
    ("GET", PAYMENT): ("payment", None),
    ("GET", PAYMENT + "/refunds"): ("payment", None),
    ("POST", PAYMENT + "/refunds"): ("payment", {"amount": 100, "reason": "requested_by_customer"}),
    ("GET", REFUND): ("refund", None),
    ("GET", AVATAR): ("user", None),
    ("PUT", AVATAR): ("user", B_UPLOAD),
}
# The path parameter that carries each kind of id.
PARAM = {
    "user": "user_id",
    "key": "key_id",
    "endpoint": "endpoint_id",
    "delivery": "delivery_id",
    "job": "job_id",
    "payment": "payment_id",
    "refund": "refund_id",
}
# What the control requests on B's own resources answer, when not 200 (DELETE: 204).
CONTROL_STATUS = {("POST", DELIVERY + "/retry"): 202, ("POST", PAYMENT + "/refunds"): 202, ("PUT", AVATAR): 202}
# Routes that require an Idempotency-Key: every request gets a fresh one, so that each reaches the handler.
IDEMPOTENT = {("POST", "/v1/payments"), ("POST", PAYMENT + "/refunds")}
# Path-parameter routes that serve no tenant data (documentation); they must be public.
NOT_TENANT_SCOPED = {("GET", "/problems/{slug:str}"), ("GET", "/openapi/{path:str}")}
# Every authenticated GET without a path parameter: B reads them all, paging where they page.
READ_ROUTES: dict[tuple[str, str], bool] = {
    ("GET", "/v1/users"): True,
    ("GET", "/v1/api-keys"): True,
    ("GET", "/v1/tenant"): False,
    ("GET", "/v1/webhook-endpoints"): True,
    ("GET", "/v1/webhook-event-types"): False,
    ("GET", "/v1/payments"): True,
    ("GET", "/v1/analytics/summary"): False,
}
# Each tenant's deliveries are read through one of its endpoints (DELIVERY_LIST of its first one).
DELIVERY_LIST = "deliveries of the first endpoint"
# Likewise its refunds, through the payment they refund.
REFUND_LIST = "refunds of the first payment"
# Accepted at creation, refused by the connection-time guard (tests/conftest.py: refused_host), so
# every delivery to it fails at once and for good, without any traffic.
REFUSED_URL = f"https://{REFUSED_HOST}:9"


@pytest.fixture(autouse=True)
def _refused_host_resolves_to_loopback(refused_host: str) -> None:
    pass


# Ways of writing the same UUID that the router accepts.
SPELLINGS: dict[str, Callable[[str], str]] = {
    "canonical": str,
    "uppercase": str.upper,
    "hex": lambda i: uuid.UUID(i).hex,
    "braces": lambda i: "%7B" + i + "%7D",
    "urn": lambda i: "urn:uuid:" + i,
}


def headers_for(method: str, template: str, headers: dict[str, str]) -> dict[str, str]:
    """``headers``, plus a fresh Idempotency-Key where the route requires one."""
    if (method, template) in IDEMPOTENT:
        return {**headers, "Idempotency-Key": f"isolation-{uuid.uuid4()}"}
    return headers


async def call(
    client: Client, method: str, template: str, path: str, headers: dict[str, str], body: Body
) -> httpx.Response:
    """One request to a route of ``ID_ROUTES``: its body as JSON, or as raw bytes of their media type."""
    headers = headers_for(method, template, headers)
    if isinstance(body, Raw):
        return await client.request(
            method, path, headers={**headers, "Content-Type": body.content_type}, content=body.data
        )
    return await client.request(method, path, headers=headers, json=body)


def _is_public(route: HTTPRoute, method: str) -> bool:
    handler = route.route_handler_map[method][0]
    return bool(handler.opt.get("exclude_from_auth")) or any(re.search(p, route.path) for p in PUBLIC_PATHS)


def fill(template: str, ids: dict[str, str]) -> str:
    """A route template with its path parameters replaced by ``ids``."""
    return re.sub(r"\{(\w+):uuid\}", lambda m: ids[m.group(1)], template)


def _routes(app: Litestar) -> list[tuple[str, str, HTTPRoute]]:
    return [
        (method, route.path, route)
        for route in app.routes
        if isinstance(route, HTTPRoute)
        for method in sorted(route.methods - {"HEAD", "OPTIONS"})
    ]


@dataclass
class Tenant:
    body: dict[str, Any]
    users: dict[str, dict[str, Any]]  # id -> user
    keys: dict[str, dict[str, Any]]  # id -> key (as issued, with token)
    endpoints: dict[str, dict[str, Any]]  # id -> webhook endpoint (as created, with secret)
    deliveries: dict[str, dict[str, Any]]  # id -> delivery, with "endpoint_id" added
    jobs: list[str]  # ids of the tenant's jobs
    payments: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> payment, settled
    refunds: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> refund, settled
    avatars: dict[str, dict[int, str]] = field(default_factory=dict)  # user id -> size -> ETag, all served
    # The day (UTC) it was populated on: its analytics are read for the 30 days ending then, so that they
    # stay comparable should midnight pass during the test.
    day: date = field(default_factory=lambda: datetime.now(UTC).date())

    def ids(self, kind: str) -> list[str]:
        return list(
            {
                "user": self.users,
                "key": self.keys,
                "endpoint": self.endpoints,
                "delivery": self.deliveries,
                "job": self.jobs,
                "payment": self.payments,
                "refund": self.refunds,
            }[kind]
        )

    @property
    def first_endpoint(self) -> str:
        return next(iter(self.endpoints))

    @property
    def first_payment(self) -> str:
        """The payment with refunds (the first one created)."""
        return next(iter(self.payments))

    def own_ids(self) -> set[str]:
        return (
            set(self.users)
            | set(self.keys)
            | set(self.endpoints)
            | set(self.deliveries)
            | set(self.payments)
            | set(self.refunds)
        )

    def lists(self) -> dict[str, tuple[str, set[str]]]:
        """Every paged list of the tenant: label -> (path, the ids it must show)."""
        first = self.first_endpoint
        return {
            "/v1/users": ("/v1/users", set(self.users)),
            "/v1/api-keys": ("/v1/api-keys", set(self.keys)),
            "/v1/webhook-endpoints": ("/v1/webhook-endpoints", set(self.endpoints)),
            DELIVERY_LIST: (
                f"/v1/webhook-endpoints/{first}/deliveries",
                {i for i, d in self.deliveries.items() if d["endpoint_id"] == first},
            ),
            "/v1/payments": ("/v1/payments", set(self.payments)),
            REFUND_LIST: (
                f"/v1/payments/{self.first_payment}/refunds",
                {i for i, r in self.refunds.items() if r["payment_id"] == self.first_payment},
            ),
        }

    @property
    def headers(self) -> dict[str, str]:
        return dict(self.body["headers"])

    @property
    def id(self) -> str:
        return str(self.body["tenant"]["id"])

    def markers(self) -> set[str]:
        """Strings that identify this tenant's data and must never reach another tenant."""
        out = {self.id, self.body["tenant"]["name"]}
        for u in self.users.values():
            out |= {u["id"], u["email"]}
            if u["role"] != "owner":
                out.add(u["name"])
        for k in self.keys.values():
            out |= {k["id"], k["prefix"], k["token"]} | ({k["name"]} if k["name"] != "default" else set())
        for e in self.endpoints.values():
            out |= {e["id"], e["url"], e["description"], e["secret"]}
        for d in self.deliveries.values():
            out |= {d["id"], d["event_id"]}
        for p in self.payments.values():
            out |= {p["id"], p["description"], p["customer_email"], *p["metadata"].values()}
            out |= {p["provider_reference"]} if p["provider_reference"] else set()
        for r in self.refunds.values():
            out |= {r["id"], r["provider_reference"]}
        out |= set(self.jobs)
        out |= {m.upper() for m in out if re.fullmatch(r"[0-9a-f-]{36}", m)} | {
            uuid.UUID(m).hex for m in out if re.fullmatch(r"[0-9a-f-]{36}", m)
        }
        return out


async def populate(client: Client, signup: dict[str, Any], tag: str, n_users: int, n_keys: int) -> Tenant:
    t = Tenant(
        body=signup,
        users={signup["user"]["id"]: signup["user"]},
        keys={signup["api_key"]["id"]: signup["api_key"]},
        endpoints={},
        deliveries={},
        jobs=[],
    )
    # Webhook endpoints first, so that what follows makes deliveries: one per user on the first endpoint,
    # one for the revoked key on the second.
    for i, types in enumerate([["user.created"], ["api_key.revoked"]]):
        r = await client.post(
            "/v1/webhook-endpoints",
            headers=t.headers,
            json={"url": f"{REFUSED_URL}/{tag}-{i}", "event_types": types, "description": f"{tag} endpoint {i}"},
        )
        assert r.status_code == 201, r.text
        t.endpoints[r.json()["id"]] = r.json()
    for i in range(n_users):
        r = await client.post(
            "/v1/users", headers=t.headers, json={"email": f"{tag}-user{i}@{tag}.test", "name": f"{tag} member {i}"}
        )
        assert r.status_code == 201, r.text
        t.users[r.json()["id"]] = r.json()
    for i in range(n_keys):
        r = await client.post("/v1/api-keys", headers=t.headers, json={"name": f"{tag} key {i}"})
        assert r.status_code == 201, r.text
        t.keys[r.json()["id"]] = r.json()
    # One revoked key too: revoked resources must be just as invisible.
    revoked = list(t.keys)[-1]
    r = await client.delete(f"/v1/api-keys/{revoked}", headers=t.headers)
    assert r.status_code == 204, r.text
    t.keys[revoked]["revoked_at"] = "revoked"
    first, second = t.endpoints
    await settled(client, t, {first: n_users, second: 1}, attempts=n_users + 1)
    # One delivery retried by hand: a job of the tenant, and a second attempt.
    retried = next(i for i, d in t.deliveries.items() if d["endpoint_id"] == first)
    r = await client.post(f"/v1/webhook-endpoints/{first}/deliveries/{retried}/retry", headers=t.headers)
    assert r.status_code == 202, r.text
    t.jobs.append(r.json()["job_id"])
    await settled(client, t, {first: n_users, second: 1}, attempts=n_users + 2)
    await pay(client, t, tag)
    await picture(client, t, tag)
    await roll_up(client, t)
    return t


async def roll_up(client: Client, t: Tenant) -> None:
    """The tenant's last two closed days rolled up, by a job of the tenant."""
    r = await client.post(
        "/v1/analytics/rollups",
        headers=t.headers,
        json={"from": (t.day - timedelta(days=2)).isoformat(), "to": (t.day - timedelta(days=1)).isoformat()},
    )
    assert r.status_code == 202, r.text
    t.jobs.append(r.json()["job_id"])
    await reached(client, t, r.json()["status_url"], "succeeded")


async def picture(client: Client, t: Tenant, tag: str) -> None:
    """An avatar for every user (a different image each), processed and served; the users then read back
    with their avatar_url."""
    seed = int(hashlib.sha256(tag.encode()).hexdigest()[:4], 16)
    for i, user_id in enumerate(t.users):
        color = ((seed + 40 * i) % 256, (seed // 3 + 70 * i) % 256, 128)
        r = await client.put(
            f"/v1/users/{user_id}/avatar", headers={**t.headers, "Content-Type": "image/png"}, content=image(color)
        )
        assert r.status_code == 202, r.text
        t.jobs.append(r.json()["job_id"])
    for user_id in t.users:
        t.avatars[user_id] = await served(client, t, user_id)
    users, _ = await read_all(client, "/v1/users", t.headers)
    assert all(u["avatar_url"] == f"/v1/users/{u['id']}/avatar" for u in users), users
    t.users = {u["id"]: u for u in users}


async def served(client: Client, t: Tenant, user_id: str, not_etag: str | None = None) -> dict[int, str]:
    """The ETags of a user's avatar once both sizes are served (and, given ``not_etag``, once the 256 px one
    is no longer that one: a newer upload was processed)."""

    async def probe() -> dict[int, str] | None:
        etags: dict[int, str] = {}
        for size in (64, 256):
            r = await client.get(f"/v1/users/{user_id}/avatar", params={"size": size}, headers=t.headers)
            assert r.status_code in (200, 404), r.text
            if r.status_code == 404:
                return None
            assert r.headers["content-type"] == "image/webp"
            etags[size] = r.headers["etag"]
        return None if etags[256] == not_etag else etags

    return await eventually(probe)


# Each tenant's payments, oldest first: the first is refunded in part twice, the last is declined.
PAYMENTS = [
    (5_000, "pm_card_visa", "partially_refunded"),
    (1_200, "pm_card_visa", "succeeded"),
    (3_300, "tok_visa", "succeeded"),
    (990, "pm_card_chargeDeclined", "failed"),
]


async def pay(client: Client, t: Tenant, tag: str) -> None:
    """Payments (their capture jobs are jobs of the tenant) and two refunds of the first, all settled."""
    for i, (amount, method, _) in enumerate(PAYMENTS):
        r = await client.post(
            "/v1/payments",
            headers={**t.headers, "Idempotency-Key": f"order-{i}"},  # the same keys in both tenants
            json={
                "amount": amount,
                "currency": "EUR",
                "payment_method": method,
                "description": f"{tag} order {i}",
                "customer_email": f"buyer{i}@{tag}.test",
                "metadata": {"order_ref": f"{tag}-ref-{i}"},
            },
        )
        assert r.status_code == 202, r.text
        t.payments[r.json()["payment"]["id"]] = r.json()["payment"]
        t.jobs.append(r.json()["job_id"])
    for payment_id, (_, _, status) in zip(list(t.payments), PAYMENTS, strict=True):
        if status != "partially_refunded":
            t.payments[payment_id] = await reached(client, t, f"/v1/payments/{payment_id}", status)
    first = t.first_payment
    await reached(client, t, f"/v1/payments/{first}", "succeeded")
    for i, amount in enumerate([700, 300]):
        r = await client.post(
            f"/v1/payments/{first}/refunds",
            headers={**t.headers, "Idempotency-Key": f"refund-{i}"},
            json={"amount": amount},
        )
        assert r.status_code == 202, r.text
        refund = r.json()["refund"]
        t.jobs.append(r.json()["job_id"])
        t.refunds[refund["id"]] = await reached(client, t, f"/v1/payments/{first}/refunds/{refund['id']}", "succeeded")
    t.payments[first] = await reached(client, t, f"/v1/payments/{first}", "partially_refunded")
    assert t.payments[first]["amount_refunded"] == 1_000


async def reached(client: Client, t: Tenant, path: str, status: str) -> dict[str, Any]:
    """The resource at ``path`` once it has ``status`` (a payment or refund is settled by its job)."""

    async def probe() -> dict[str, Any] | None:
        r = await client.get(path, headers=t.headers)
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        assert body["status"] == status or body["status"] != "failed", body  # failed is final
        return body if body["status"] == status else None

    return await eventually(probe)


async def settled(client: Client, t: Tenant, counts: dict[str, int], attempts: int) -> None:
    """Wait until each endpoint has its deliveries, all failed, with ``attempts`` attempts in all; record them."""

    async def probe() -> dict[str, dict[str, Any]] | None:
        found: dict[str, dict[str, Any]] = {}
        for endpoint_id, count in counts.items():
            items, _ = await read_all(client, f"/v1/webhook-endpoints/{endpoint_id}/deliveries", t.headers)
            if len(items) != count or any(d["status"] != "failed" for d in items):
                return None
            found |= {d["id"]: {**d, "endpoint_id": endpoint_id} for d in items}
        return found if sum(len(d["attempts"]) for d in found.values()) == attempts else None

    t.deliveries = await eventually(probe)


async def read_all(
    client: Client, path: str, headers: dict[str, str], limit: int = 100, query: dict[str, str] | None = None
) -> tuple[list[Any], str]:
    """All items of a paged list (and the raw text of every page), filtered by ``query``."""
    items: list[Any] = []
    texts: list[str] = []
    params: dict[str, Any] = {**(query or {}), "limit": limit}
    for _ in range(1000):
        r = await client.get(path, params=params, headers=headers)
        assert r.status_code == 200, f"GET {path} {params} -> {r.status_code} {r.text}"
        texts.append(r.text)
        items += r.json()["items"]
        if not r.json()["next_cursor"]:
            return items, "\n".join(texts)
        params["cursor"] = r.json()["next_cursor"]
    raise AssertionError(f"GET {path} never ran out of pages")


async def cursors(client: Client, path: str, headers: dict[str, str]) -> list[str]:
    """Every cursor of a limit=1 walk through a list."""
    out: list[str] = []
    params: dict[str, Any] = {"limit": 1}
    while True:
        r = await client.get(path, params=params, headers=headers)
        assert r.status_code == 200, r.text
        cursor = r.json()["next_cursor"]
        if not cursor:
            return out
        out.append(cursor)
        params["cursor"] = cursor


async def state(client: Client, t: Tenant) -> dict[str, Any]:
    tenant = await client.get("/v1/tenant", headers=t.headers)
    assert tenant.status_code == 200, f"{t.body['tenant']['name']}'s own key no longer works: {tenant.text}"
    users, _ = await read_all(client, "/v1/users", t.headers)
    keys, _ = await read_all(client, "/v1/api-keys", t.headers)
    endpoints, _ = await read_all(client, "/v1/webhook-endpoints", t.headers)
    deliveries = {
        e["id"]: (await read_all(client, f"/v1/webhook-endpoints/{e['id']}/deliveries", t.headers))[0]
        for e in endpoints
    }
    payments, _ = await read_all(client, "/v1/payments", t.headers)
    refunds = {p["id"]: (await read_all(client, f"/v1/payments/{p['id']}/refunds", t.headers))[0] for p in payments}
    avatars = {u["id"]: await avatar_state(client, t.headers, u["id"]) for u in users}
    return {
        "analytics": await analytics_state(client, t),
        "tenant": tenant.json(),
        "users": users,
        "keys": keys,
        "endpoints": endpoints,
        "deliveries": deliveries,
        "payments": payments,
        "refunds": refunds,
        "avatars": avatars,
    }


async def analytics_state(client: Client, t: Tenant) -> dict[str, Any]:
    """The tenant's analytics of the 30 days ending on its day, but for what reading them changes: the
    request counts (reading is a request) and when the summary was computed."""
    params = {"from": (t.day - timedelta(days=29)).isoformat(), "to": t.day.isoformat()}
    r = await client.get("/v1/analytics/summary", params=params, headers=t.headers)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    del body["generated_at"]
    del body["totals"]["api_requests"]
    for d in body["days"]:
        del d["api_requests"]
    return body


async def avatar_state(client: Client, headers: dict[str, str], user_id: str) -> dict[int, tuple[int, str, str]]:
    """Each size of a user's avatar as (status, ETag, digest of the bytes)."""
    out = {}
    for size in (64, 256):
        r = await client.get(f"/v1/users/{user_id}/avatar", params={"size": size}, headers=headers)
        out[size] = (r.status_code, r.headers.get("etag", ""), hashlib.sha256(r.content).hexdigest())
    return out


def leaks(text: str, markers: set[str]) -> list[str]:
    return sorted(m for m in markers if m and m in text)


@pytest.fixture
async def world(client: Client, tenant: dict[str, Any], other_tenant: dict[str, Any]) -> tuple[Tenant, Tenant]:
    a = await populate(client, tenant, "acme", n_users=5, n_keys=3)
    b = await populate(client, other_tenant, "globex", n_users=3, n_keys=2)
    return a, b


# --------------------------------------------------------------------------------------------------
# The tables cover the app
# --------------------------------------------------------------------------------------------------


async def test_every_route_with_a_path_parameter_is_covered(client: Client) -> None:
    with_params = {(m, path): route for m, path, route in _routes(client.app) if "{" in path}
    uncovered = sorted(set(with_params) - set(ID_ROUTES) - NOT_TENANT_SCOPED)
    assert not uncovered, f"routes taking an id without a cross-tenant case (add them to ID_ROUTES): {uncovered}"
    stale = sorted((set(ID_ROUTES) | NOT_TENANT_SCOPED) - set(with_params))
    assert not stale, f"isolation tables list routes the app does not serve: {stale}"
    for key in NOT_TENANT_SCOPED:
        assert _is_public(with_params[key], key[0]), f"{key} is authenticated, so it is tenant-scoped: cover it"
    for key in ID_ROUTES:
        assert not _is_public(with_params[key], key[0]), f"{key} is public: it cannot be tenant-scoped"


async def test_every_tenant_scoped_read_is_covered(client: Client) -> None:
    reads = {
        (m, path)
        for m, path, route in _routes(client.app)
        if m == "GET" and "{" not in path and not _is_public(route, m)
    }
    assert reads == set(READ_ROUTES), f"authenticated reads {sorted(reads)} != READ_ROUTES {sorted(READ_ROUTES)}"


# --------------------------------------------------------------------------------------------------
# B acting on A's ids
# --------------------------------------------------------------------------------------------------


async def test_other_tenants_ids_are_not_found(client: Client, world: tuple[Tenant, Tenant]) -> None:
    a, b = world
    before = await state(client, a)
    failures: list[str] = []

    # B's own ids fill a route's other parameters, so that only the one under test is foreign.
    b_own = {PARAM["endpoint"]: b.first_endpoint, PARAM["payment"]: b.first_payment}
    b_delivery = next(i for i, d in b.deliveries.items() if d["endpoint_id"] == b.first_endpoint)
    b_refund = next(iter(b.refunds))
    markers = a.markers()
    for (method, template), (kind, body) in ID_ROUTES.items():
        param = PARAM[kind]
        # What a genuinely missing id looks like: A's ids must be indistinguishable from it.
        path = fill(template, {**b_own, param: str(uuid.uuid4())})
        missing = await call(client, method, template, path, b.headers, body)
        if missing.status_code != 404:
            failures.append(f"{method} {template} with a random id -> {missing.status_code}: {missing.text[:300]}")
            continue
        reference = {k: missing.json().get(k) for k in ("type", "title", "status", "detail")}

        # All of A's ids of the route's kind in every spelling; A's users and keys wherever they are not the
        # route's kind, in every spelling too; one id of each other kind, canonical.
        every, canonical = list(SPELLINGS), ["canonical"]
        targets: list[tuple[str, dict[str, str], list[str]]] = [(f"A's {kind}", {param: i}, every) for i in a.ids(kind)]
        for other in PARAM:
            if other != kind:
                ids, spellings = (a.ids(other), every) if other in ("user", "key") else (a.ids(other)[:1], canonical)
                targets += [(f"A's {other} as {kind} id", {param: i}, spellings) for i in ids]
        targets.append(("A's tenant id", {param: a.id}, every))
        if kind == "delivery":
            # A's deliveries at their own endpoint, and B's own delivery at A's endpoints.
            targets += [
                ("A's delivery at A's endpoint", {"endpoint_id": d["endpoint_id"], param: i}, canonical)
                for i, d in a.deliveries.items()
            ]
            targets += [
                ("B's delivery at A's endpoint", {"endpoint_id": e, param: b_delivery}, every) for e in a.endpoints
            ]
        if kind == "refund":
            # A's refunds at their own payment, and B's own refund at each of A's payments.
            targets += [
                ("A's refund at A's payment", {"payment_id": r["payment_id"], param: i}, canonical)
                for i, r in a.refunds.items()
            ]
            targets += [("B's refund at A's payment", {"payment_id": p, param: b_refund}, every) for p in a.payments]
        for what, target, spellings in targets:
            for spelling in spellings:
                spell = SPELLINGS[spelling]
                path = fill(template, {**b_own, **{k: spell(v) for k, v in target.items()}})
                r = await call(client, method, template, path, b.headers, body)
                label = f"B: {method} {path} ({what}, {spelling}) -> {r.status_code}"
                if r.status_code != 404:
                    failures.append(f"{label}: expected 404; body: {r.text[:300]}")
                    continue
                if not r.headers.get("content-type", "").startswith(PROBLEM):
                    failures.append(f"{label}: content-type {r.headers.get('content-type')!r}")
                    continue
                got = {k: r.json().get(k) for k in ("type", "title", "status", "detail")}
                if got != reference:
                    failures.append(f"{label}: differs from a missing id: {got} != {reference}")
                if r.json().get("request_id") != r.headers.get("x-request-id"):
                    failures.append(f"{label}: problem request_id does not match X-Request-ID")
                if leaks(r.text.replace(path, "").replace(r.json().get("instance", ""), ""), markers):
                    failures.append(f"{label}: response mentions A's data: {r.text[:300]}")

    after = await state(client, a)
    if after != before:
        failures.append(f"A's data changed:\nbefore={before}\nafter={after}")
    assert not failures, f"{len(failures)} isolation failures:\n" + "\n".join(failures)

    # Control: the very same requests on B's own resources work, so the 404s above were not an accident
    # of malformed requests or a broken key.
    member = next(i for i, u in b.users.items() if u["role"] != "owner")
    live_key = next(i for i, k in b.keys.items() if i != b.body["api_key"]["id"] and k.get("revoked_at") is None)
    own = {
        "user_id": member,
        "key_id": live_key,
        "endpoint_id": b.first_endpoint,
        "delivery_id": b_delivery,
        "job_id": b.jobs[0],
        "payment_id": b.first_payment,
        "refund_id": b_refund,
    }
    for (method, template), (kind, body) in ID_ROUTES.items():
        if method == "DELETE":
            continue
        r = await call(client, method, template, fill(template, own), b.headers, body)
        expected = CONTROL_STATUS.get((method, template), 200)
        assert r.status_code == expected, f"control {method} {template} on B's own {kind} -> {r.status_code} {r.text}"
        if template == PAYMENT + "/refunds" and method == "POST":
            # Let the refund settle before anything else happens.
            refund_path = fill(REFUND, {**own, "refund_id": r.json()["refund"]["id"]})
            await reached(client, b, refund_path, "succeeded")
        elif (method, template) == ("PUT", AVATAR):
            # B's own upload is processed and served in place of its earlier avatar.
            new = await served(client, b, member, not_etag=b.avatars[member][256])
            assert new != b.avatars[member]
        elif expected == 202:
            # Let the retry's attempt land before anything is deleted under it.
            attempts = len(b.deliveries[b_delivery]["attempts"]) + 1
            path = fill(DELIVERY, own)

            async def attempted(path: str = path, attempts: int = attempts) -> bool:
                d = (await client.get(path, headers=b.headers)).json()
                return bool(d["status"] == "failed" and len(d["attempts"]) == attempts)

            await eventually(attempted)
    for (method, template), (kind, _) in ID_ROUTES.items():
        if method == "DELETE":
            r = await client.request(method, fill(template, own), headers=b.headers)
            assert r.status_code == 204, f"control {method} {template} on B's own {kind} -> {r.status_code} {r.text}"
    assert await state(client, a) == before, "B's own changes touched A's data"


def blob_files(root: Path) -> dict[Path, str]:
    """Every file under ``root`` (relative path -> digest of its content)."""
    if not root.exists():
        return {}
    return {
        p.relative_to(root): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()
    }


async def test_another_tenants_avatars_are_never_served_nor_replaced(
    client: Client, world: tuple[Tenant, Tenant], tmp_path: Path
) -> None:
    """B asking for (or uploading over) the avatar of one of A's users gets exactly what a user id that
    does not exist gets, whatever B sends: a conditional request with A's real ETag is no 304, an upload is a
    404 before its image is judged (so B cannot probe A's ids with bodies). A's avatars, their blobs and
    A's users stay as they were, and B's storage holds nothing under A's user ids."""
    a, b = world
    before = await state(client, a)
    root = tmp_path / "blobs" / "avatars"  # the app's data dir is this test's tmp_path
    files_before = blob_files(root)
    assert {p.parts[1] for p in files_before if p.parts[0] == a.id} == set(a.users), "A's avatars are stored there"
    owner = a.body["user"]["id"]
    # Control: A's own conditional request with its ETag is a 304.
    r = await client.get(f"/v1/users/{owner}/avatar", headers={**a.headers, "If-None-Match": a.avatars[owner][256]})
    assert r.status_code == 304

    valid, jpeg = image((1, 2, 3)), image((200, 100, 0), fmt="JPEG")
    Request = tuple[str, dict[str, str], dict[str, Any]]

    def requests(user_id: str) -> list[tuple[str, Request]]:
        etags = a.avatars[user_id]
        return [
            ("GET default size", ("GET", {}, {})),
            ("GET 64", ("GET", {}, {"params": {"size": 64}})),
            ("GET with A's ETag", ("GET", {"If-None-Match": etags[256]}, {})),
            ("GET 64 with A's ETag", ("GET", {"If-None-Match": etags[64]}, {"params": {"size": 64}})),
            ("GET with any ETag", ("GET", {"If-None-Match": "*"}, {})),
            ("PUT valid PNG", ("PUT", {"Content-Type": "image/png"}, {"content": valid})),
            ("PUT valid JPEG", ("PUT", {"Content-Type": "image/jpeg"}, {"content": jpeg})),
            ("PUT JPEG as PNG", ("PUT", {"Content-Type": "image/png"}, {"content": jpeg})),
            ("PUT junk", ("PUT", {"Content-Type": "image/png"}, {"content": b"not an image"})),
            ("PUT empty", ("PUT", {"Content-Type": "image/webp"}, {"content": b""})),
            ("PUT GIF type", ("PUT", {"Content-Type": "image/gif"}, {"content": valid})),
        ]

    async def answer(user_id: str, request: Request) -> tuple[int, dict[str, Any], httpx.Response]:
        method, headers, kw = request
        r = await client.request(method, f"/v1/users/{user_id}/avatar", headers={**b.headers, **headers}, **kw)
        if not r.headers.get("content-type", "").startswith(PROBLEM):
            return r.status_code, {"content-type": r.headers.get("content-type")}, r
        return r.status_code, {k: r.json().get(k) for k in ("type", "title", "status", "detail")}, r

    failures: list[str] = []
    markers = a.markers()
    for user_id in a.users:
        for what, request in requests(user_id):
            expected = await answer(str(uuid.uuid4()), request)
            got = await answer(user_id, request)
            label = f"B: {what} of A's user {user_id} -> {got[0]}"
            if got[:2] != expected[:2]:
                failures.append(f"{label}: differs from a missing user ({expected[:2]}): {got[1]}")
            # Every request here reaches the handler (only the GIF type is refused before it, with a 415).
            if request[1].get("Content-Type") != "image/gif" and got[0] != 404:
                failures.append(f"{label}: expected 404")
            response = got[2]
            if "etag" in response.headers or response.headers.get("content-type", "").startswith("image/"):
                failures.append(f"{label}: served an image ({dict(response.headers)})")
            if leaks(response.text.replace(f"/v1/users/{user_id}/avatar", ""), markers):
                failures.append(f"{label}: mentions A's data: {response.text[:300]}")
    # Too large is refused before anything else, for A's user as for a missing one.
    big = {"content": b"\x89PNG" + b"\0" * (5 * 1024 * 1024)}
    too_large = [await answer(u, ("PUT", {"Content-Type": "image/png"}, big)) for u in (owner, str(uuid.uuid4()))]
    assert too_large[0][:2] == too_large[1][:2]
    assert too_large[0][0] == 413
    assert not failures, f"{len(failures)} avatar isolation failures:\n" + "\n".join(failures)

    assert await state(client, a) == before, "B's requests changed A's avatars or users"
    after = blob_files(root)
    assert {p: d for p, d in after.items() if p.parts[0] == a.id} == {
        p: d for p, d in files_before.items() if p.parts[0] == a.id
    }, "A's avatar blobs changed"
    stray = sorted(str(p) for p in after if p.parts[0] != a.id and p.parts[1] in a.users)
    assert not stray, f"blobs stored for A's users outside A: {stray}"
    # B's own avatars still work with B's key (the requests above were well-formed).
    member = next(i for i, u in b.users.items() if u["role"] != "owner")
    assert await served(client, b, member) == b.avatars[member]


async def test_tenant_scoped_writes_without_ids_stay_in_the_tenant(
    client: Client, world: tuple[Tenant, Tenant]
) -> None:
    """B's creations and configuration changes land in B only; A's emails and idempotency keys are free to
    reuse in B (a 409 or 422 there would reveal what A has sent)."""
    a, b = world
    # Idempotency keys belong to the tenant: A's key and body, sent by B, make a new payment of B's (not a
    # replay of A's response, nor a conflict that would reveal that A used the key).
    body = {
        "amount": 4_200,
        "currency": "EUR",
        "payment_method": "pm_card_visa",
        "description": "acme order shared-key",
        "customer_email": "buyer@acme.test",
    }
    r = await client.post("/v1/payments", headers={**a.headers, "Idempotency-Key": "shared-key"}, json=body)
    assert r.status_code == 202, r.text
    a_payment = r.json()["payment"]["id"]
    await reached(client, a, f"/v1/payments/{a_payment}", "succeeded")
    r = await client.post("/v1/payments", headers={**b.headers, "Idempotency-Key": "shared-key"}, json=body)
    assert r.status_code == 202, r.text
    assert "idempotent-replayed" not in r.headers
    created = r.json()["payment"]
    assert created["id"] not in a.own_ids() | b.own_ids() | {a_payment}
    assert (created["status"], created["amount_refunded"]) == ("pending", 0)
    await reached(client, b, f"/v1/payments/{created['id']}", "succeeded")
    # B refunding with a refund key A used (on A's payment): B's own refund, of everything left of B's payment.
    r = await client.post(
        f"/v1/payments/{a_payment}/refunds", headers={**a.headers, "Idempotency-Key": "shared-refund"}, json={}
    )
    assert r.status_code == 202, r.text
    await reached(client, a, f"/v1/payments/{a_payment}", "refunded")
    before = await state(client, a)
    r = await client.post(
        f"/v1/payments/{created['id']}/refunds", headers={**b.headers, "Idempotency-Key": "shared-refund"}, json={}
    )
    assert r.status_code == 202, r.text
    assert "idempotent-replayed" not in r.headers
    assert r.json()["refund"]["id"] not in a.refunds
    assert r.json()["refund"]["amount"] == 4_200
    await reached(client, b, f"/v1/payments/{created['id']}", "refunded")
    assert await state(client, a) == before, "B's payment and refund changed A's data"
    # B's rollup rolls up B's days only (before B's rate limit drops to 7 a minute below).
    span = {"from": (b.day - timedelta(days=20)).isoformat(), "to": (b.day - timedelta(days=3)).isoformat()}
    r = await client.post("/v1/analytics/rollups", headers=b.headers, json=span)
    assert r.status_code == 202, r.text
    await reached(client, b, r.json()["status_url"], "succeeded")
    r = await client.get("/v1/analytics/summary", params=span, headers=b.headers)
    assert r.status_code == 200, r.text
    assert all(d["rolled_up"] for d in r.json()["days"])
    for i, user in enumerate(u for u in a.users.values()):
        r = await client.post("/v1/users", headers=b.headers, json={"email": user["email"], "name": f"B copy {i}"})
        assert r.status_code == 201, f"B creating A's email {user['email']} -> {r.status_code} {r.text}"
    r = await client.patch(
        "/v1/tenant/config",
        headers=b.headers,
        json={"display_name": "Globex renamed", "timezone": "Asia/Tokyo", "rate_limit_per_minute": 7},
    )
    assert r.status_code == 200, r.text
    assert r.json()["id"] == b.id
    r = await client.post("/v1/api-keys", headers=b.headers, json={"name": "b extra"})
    assert r.status_code == 201, r.text
    # A's endpoint URL is free to reuse in B too.
    url = next(iter(a.endpoints.values()))["url"]
    r = await client.post(
        "/v1/webhook-endpoints", headers=b.headers, json={"url": url, "event_types": ["user.created"]}
    )
    assert r.status_code == 201, r.text
    assert await state(client, a) == before, "B's writes changed A's data"


# --------------------------------------------------------------------------------------------------
# B reading
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [1, 2, 100])
async def test_reads_show_nothing_of_the_other_tenant(client: Client, world: tuple[Tenant, Tenant], limit: int) -> None:
    a, b = world
    markers = a.markers()
    lists = b.lists()
    reads = [(path, lists.get(path)) for (_, path), paged in READ_ROUTES.items()]
    extra = [(DELIVERY_LIST, lists[DELIVERY_LIST]), (REFUND_LIST, lists[REFUND_LIST])]
    for path, listed in [*reads, *extra]:
        if listed is not None:
            path, own = listed
            items, text = await read_all(client, path, b.headers, limit=limit)
            ids = [item["id"] for item in items]
            assert sorted(ids) == sorted(own), f"B's {path} (limit={limit}) lists {ids}, B owns {sorted(own)}"
        else:
            r = await client.get(path, headers=b.headers)
            assert r.status_code == 200, r.text
            assert r.json().get("id", b.id) == b.id
            text = r.text
        assert not leaks(text, markers), f"B's GET {path} (limit={limit}) shows A's data: {leaks(text, markers)}"


PAYMENT_FILTERS: list[dict[str, str]] = [
    {"status": "succeeded"},
    {"status": "partially_refunded"},
    {"status": "failed"},
    {"status": "pending"},
    {"created_from": "2000-01-01T00:00:00Z"},
    {"created_to": "2999-01-01T00:00:00+02:00"},
    {"created_from": "2000-01-01T00:00:00Z", "created_to": "2999-01-01T00:00:00Z", "status": "succeeded"},
]


async def test_filtered_payment_lists_show_only_the_readers_payments(
    client: Client, world: tuple[Tenant, Tenant]
) -> None:
    a, b = world
    for query in PAYMENT_FILTERS:
        for reader, other in [(a, b), (b, a)]:
            items, text = await read_all(client, "/v1/payments", reader.headers, limit=2, query=query)
            expected = {i for i, p in reader.payments.items() if p["status"] == query.get("status", p["status"])}
            label = f"{reader.body['tenant']['name']}: GET /v1/payments?{query}"
            assert {p["id"] for p in items} == expected, label
            assert not leaks(text, other.markers()), f"{label} shows the other tenant's data"


async def test_cursors_do_not_cross_tenants(client: Client, world: tuple[Tenant, Tenant]) -> None:
    """A cursor taken from one tenant's listing, replayed by the other tenant (on either list), must at
    most page through the replaying tenant's own rows."""
    a, b = world
    failures: list[str] = []
    for owner, reader in [(a, b), (b, a)]:
        foreign = owner.markers() - reader.markers()
        reader_ids = reader.own_ids()
        taken = {label: await cursors(client, path, owner.headers) for label, (path, _) in owner.lists().items()}
        assert all(taken.values()), "every list should have more than one page at limit=1"
        for source, cursor_list in taken.items():
            for cursor in cursor_list:
                for path, _ in reader.lists().values():
                    for limit in (1, 100):
                        r = await client.get(path, params={"cursor": cursor, "limit": limit}, headers=reader.headers)
                        label = f"{reader.body['tenant']['name']}: GET {path}?limit={limit} with cursor from " + (
                            f"{owner.body['tenant']['name']}'s {source}"
                        )
                        if r.status_code == 422:
                            continue
                        if r.status_code != 200:
                            failures.append(f"{label} -> {r.status_code}: {r.text[:300]}")
                            continue
                        stray = [i["id"] for i in r.json()["items"] if i["id"] not in reader_ids]
                        if stray:
                            failures.append(f"{label} -> rows not the reader's: {stray}")
                        # The cursor itself is the caller's input; anything else of the owner is a leak.
                        found = leaks(r.text.replace(cursor, ""), foreign)
                        if found:
                            failures.append(f"{label} -> mentions the other tenant's data: {found}")
    assert not failures, "\n".join(failures)


def money_of(items: list[dict[str, Any]]) -> list[tuple[str, str, int, int]]:
    """Payments or refunds summed up by (currency, status) as (currency, status, count, amount), in order."""
    counts: Counter[tuple[str, str]] = Counter()
    amounts: Counter[tuple[str, str]] = Counter()
    for item in items:
        counts[(item["currency"], item["status"])] += 1
        amounts[(item["currency"], item["status"])] += item["amount"]
    return [(c, s, counts[(c, s)], amounts[(c, s)]) for c, s in sorted(counts)]


async def test_the_analytics_summary_sums_up_only_the_readers_data(
    client: Client, world: tuple[Tenant, Tenant]
) -> None:
    """Both tenants have the same payments and refunds (amounts and statuses): each summary holds them once,
    with the tenant's own users and requests, never the other's."""
    a, b = world
    container = client.app.state["container"]

    async def flush() -> None:
        await asyncio.to_thread(client.blocking_portal.call, container.request_counter.flush)
        await asyncio.to_thread(client.blocking_portal.call, container.analytics.flush_requests)

    async def today(t: Tenant) -> dict[str, Any]:
        r = await client.get("/v1/analytics/summary", params={"from": t.day.isoformat()}, headers=t.headers)
        assert r.status_code == 200, r.text
        days: list[dict[str, Any]] = r.json()["days"]
        return days[0]

    for t in (a, b):
        figures = await today(t)
        label = t.body["tenant"]["name"]
        shown = [(m["currency"], m["status"], m["count"], m["amount"]) for m in figures["payments"]]
        assert shown == money_of(list(t.payments.values())), label
        shown = [(m["currency"], m["status"], m["count"], m["amount"]) for m in figures["refunds"]]
        assert shown == money_of(list(t.refunds.values())), label
        assert figures["new_users"] == len(t.users), label
    assert len(a.users) != len(b.users)

    await flush()
    before = (await today(a))["api_requests"]
    for _ in range(7):
        assert (await client.get("/v1/users", headers=b.headers)).status_code == 200
    await flush()
    # A's count grew by A's own summary request only.
    assert (await today(a))["api_requests"] == before + 1
