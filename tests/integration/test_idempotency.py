"""Idempotency-Key over HTTP on real Postgres, with the Redis store and the embedded in-memory default.

``client_for`` apps run on their own event loop (the test client's portal thread) and the test client
sends one request at a time, merging repeated headers into one; concurrent requests, repeated headers
and other client addresses go through ``burst``, an httpx ASGI client run on the app's own loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar import Litestar, Response, post
from litestar.exceptions import NotFoundException
from litestar.middleware import DefineMiddleware
from litestar.params import JSONBody
from litestar.testing import AsyncTestClient

from keel.main.errors import describe_problem, handle_exception
from keel.main.idempotency import IdempotencyMiddleware, parse_key
from keel.platform.adapters.http.problems import ProblemError
from keel.platform.adapters.memory.idempotency import InMemoryIdempotencyStore
from keel.platform.adapters.redis.idempotency import RedisIdempotencyStore
from keel.platform.ports.idempotency import StoredResponse
from tests.fakes.clock import ManualClock
from tests.support.app import Request, burst, client_for, make_settings, signup
from tests.support.servers import RedisServer

Client = AsyncTestClient[Litestar]
PROBLEM = "application/problem+json"
ADA = {"email": "ada@acme.test", "name": "Ada"}


def keyed(tenant: dict[str, Any], key: str | bytes) -> dict[str, Any]:
    return {**tenant["headers"], "Idempotency-Key": key}


def assert_problem(r: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    body: dict[str, Any] = r.json()
    assert body["status"] == status
    assert body["type"] == f"/problems/{slug}"
    assert "idempotent-replayed" not in r.headers
    return body


def assert_replay_of(replay: httpx.Response, original: httpx.Response) -> None:
    assert replay.headers.get("idempotent-replayed") == "true"
    assert replay.status_code == original.status_code
    assert replay.content == original.content
    for name in ("content-type", "location"):
        assert replay.headers.get(name) == original.headers.get(name)


async def user_emails(client: Client, tenant: dict[str, Any]) -> list[str]:
    r = await client.get("/v1/users", headers=tenant["headers"], params={"limit": 100})
    assert r.status_code == 200
    return sorted(u["email"] for u in r.json()["items"])


@pytest.fixture(params=["redis", "memory"])
def backend_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """The Redis store (production), and the in-process default when no KEEL_REDIS_URL is set."""
    return {"KEEL_REDIS_URL": str(request.getfixturevalue("redis_url"))} if request.param == "redis" else {}


@pytest.fixture
async def client(pg_url: str, redis_url: str, tmp_path: Path) -> AsyncIterator[Client]:
    """The real app on Postgres and Redis (the production idempotency store)."""
    async with client_for(make_settings(pg_url, tmp_path, KEEL_REDIS_URL=redis_url)) as c:
        yield c


@pytest.fixture
async def tenant(client: Client) -> dict[str, Any]:
    return await signup(client)


# -- replay ------------------------------------------------------------------------------------


async def test_replay_returns_the_first_response_and_acts_once(
    backend_env: dict[str, str], pg_url: str, tmp_path: Path
) -> None:
    async with client_for(make_settings(pg_url, tmp_path, **backend_env)) as client:
        expected = type(client.app.state["container"].idempotency)
        assert expected is (RedisIdempotencyStore if backend_env else InMemoryIdempotencyStore)
        t = await signup(client)
        first = await client.post("/v1/users", json=ADA, headers=keyed(t, "create-ada-1"))
        assert first.status_code == 201, first.text
        assert "idempotent-replayed" not in first.headers
        assert first.headers["location"] == f"/v1/users/{first.json()['id']}"

        for _ in range(2):
            again = await client.post("/v1/users", json=ADA, headers=keyed(t, "create-ada-1"))
            assert_replay_of(again, first)
            assert again.headers["x-request-id"] != first.headers["x-request-id"]
            assert len(again.headers.get_list("x-request-id")) == 1
            assert len(again.headers.get_list("content-length")) == 1
            assert int(again.headers["content-length"]) == len(first.content)
        assert await user_emails(client, t) == ["ada@acme.test", "owner@acme.test"]

        # A client-chosen request id is echoed on the replay, as on any response.
        again = await client.post(
            "/v1/users", json=ADA, headers={**keyed(t, "create-ada-1"), "X-Request-ID": "retry-3"}
        )
        assert_replay_of(again, first)
        assert again.headers["x-request-id"] == "retry-3"

        # The key is the tenant's, not the API key's: another key of the same tenant gets the replay.
        r = await client.post("/v1/api-keys", json={"name": "second"}, headers=t["headers"])
        second = {"headers": {"Authorization": f"Bearer {r.json()['token']}"}}
        assert_replay_of(await client.post("/v1/users", json=ADA, headers=keyed(second, "create-ada-1")), first)


async def test_same_key_different_payload_is_422(backend_env: dict[str, str], pg_url: str, tmp_path: Path) -> None:
    async with client_for(make_settings(pg_url, tmp_path, **backend_env)) as client:
        t = await signup(client)
        first = await client.post("/v1/users", json=ADA, headers=keyed(t, "k1"))
        assert first.status_code == 201
        r = await client.post("/v1/users", json={**ADA, "name": "Ada L"}, headers=keyed(t, "k1"))
        assert_problem(r, 422, "idempotency-key-reused")
        # Same JSON, different bytes: the fingerprint covers the body as sent.
        r = await client.post(
            "/v1/users",
            content=b'{"name": "Ada", "email": "ada@acme.test"}',
            headers={**keyed(t, "k1"), "Content-Type": "application/json"},
        )
        assert_problem(r, 422, "idempotency-key-reused")
        # Different endpoint, same key.
        r = await client.post("/v1/api-keys", json={"name": "ci"}, headers=keyed(t, "k1"))
        assert_problem(r, 422, "idempotency-key-reused")
        keys = await client.get("/v1/api-keys", headers=t["headers"])
        assert len(keys.json()["items"]) == 1
        assert await user_emails(client, t) == ["ada@acme.test", "owner@acme.test"]
        # The original is still replayed after the rejected reuses.
        assert_replay_of(await client.post("/v1/users", json=ADA, headers=keyed(t, "k1")), first)


async def test_a_key_first_used_on_another_endpoint_is_422(client: Client, tenant: dict[str, Any]) -> None:
    r = await client.post("/v1/api-keys", json={"name": "ci"}, headers=keyed(tenant, "shared"))
    assert r.status_code == 201
    r = await client.post("/v1/users", json=ADA, headers=keyed(tenant, "shared"))
    assert_problem(r, 422, "idempotency-key-reused")
    assert await user_emails(client, tenant) == ["owner@acme.test"]


async def test_keys_are_scoped_by_tenant(backend_env: dict[str, str], pg_url: str, tmp_path: Path) -> None:
    async with client_for(make_settings(pg_url, tmp_path, **backend_env)) as client:
        acme = await signup(client)
        globex = await signup(client, "Globex", "owner@globex.test")
        a = await client.post("/v1/users", json=ADA, headers=keyed(acme, "same-key"))
        b = await client.post("/v1/users", json=ADA, headers=keyed(globex, "same-key"))
        assert a.status_code == b.status_code == 201
        assert "idempotent-replayed" not in b.headers
        assert a.json()["id"] != b.json()["id"]
        # A different payload under the same key is fine in another tenant.
        c = await client.post("/v1/users", json={"email": "x@globex.test", "name": "X"}, headers=keyed(globex, "k2"))
        d = await client.post("/v1/users", json={"email": "y@acme.test", "name": "Y"}, headers=keyed(acme, "k2"))
        assert c.status_code == d.status_code == 201
        assert await user_emails(client, acme) == ["ada@acme.test", "owner@acme.test", "y@acme.test"]
        assert await user_emails(client, globex) == ["ada@acme.test", "owner@globex.test", "x@globex.test"]


# -- key syntax --------------------------------------------------------------------------------


ACCEPTED_KEYS: list[tuple[str, str]] = [  # (sent first, sent on the retry)
    ("order-42_A.b~c:/+=", "order-42_A.b~c:/+="),
    ("x" * 255, "x" * 255),
    ('"quoted key with spaces"', '"quoted key with spaces"'),
    (r'"esc \"q\" and \\ b"', r'"esc \"q\" and \\ b"'),
    ('"' + "y" * 255 + '"', "y" * 255),  # a quoted string names the same key as the bare token
    ("plain", '"plain"'),
    ("  padded\t", "padded"),
]
REJECTED_KEYS: dict[str, str | bytes] = {
    "empty": "",
    "blank": "   ",
    "empty-quoted": '""',
    "256": "x" * 256,
    "256-quoted": '"' + "y" * 256 + '"',
    "space": "has space",
    "utf8": "clé".encode(),
    "utf8-quoted": '"clé"'.encode(),
    "latin1": b"caf\xe9",
    "ctl": "a\x01b",
}


async def test_accepted_key_formats(client: Client, tenant: dict[str, Any]) -> None:
    for i, (sent, same_as) in enumerate(ACCEPTED_KEYS):
        body = {"email": f"u{i}@acme.test", "name": "U"}
        first = await client.post("/v1/users", json=body, headers=keyed(tenant, sent))
        assert first.status_code == 201, (sent, first.text)
        assert_replay_of(await client.post("/v1/users", json=body, headers=keyed(tenant, same_as)), first)
    assert len(await user_emails(client, tenant)) == 1 + len(ACCEPTED_KEYS)


async def test_rejected_key_formats(client: Client, tenant: dict[str, Any]) -> None:
    for case, sent in REJECTED_KEYS.items():
        r = await client.post("/v1/users", json=ADA, headers=keyed(tenant, sent))
        assert r.status_code == 400, (case, r.text)
        assert_problem(r, 400, "idempotency-key-invalid")
    assert await user_emails(client, tenant) == ["owner@acme.test"]


async def test_repeated_header_is_400(client: Client, tenant: dict[str, Any]) -> None:
    # Two separate header lines; the test client would merge them into one comma-joined value.
    headers = httpx.Headers([*tenant["headers"].items(), ("Idempotency-Key", "k1"), ("Idempotency-Key", "k1")])
    (repeated,) = await burst(client, [("POST", "/v1/users", {"json": ADA, "headers": headers})])
    assert_problem(repeated, 400, "idempotency-key-invalid")
    assert await user_emails(client, tenant) == ["owner@acme.test"]
    (single,) = await burst(client, [("POST", "/v1/users", {"json": ADA, "headers": keyed(tenant, "k1")})])
    assert single.status_code == 201, single.text
    r = await client.post("/v1/users", json=ADA, headers={**tenant["headers"], "Idempotency-Key": "k1, k2"})
    assert_problem(r, 400, "idempotency-key-invalid")


async def test_non_ascii_bytes_around_a_key_are_rejected_not_trimmed(client: Client, tenant: dict[str, Any]) -> None:
    """HTTP's optional whitespace is only SP and HTAB: NBSP (0xA0), NEL (0x85) or the controls 0x1C-0x1F
    around a key make it invalid (400) instead of being trimmed into (and replaying) the key ``k1``."""
    first = await client.post("/v1/users", json=ADA, headers=keyed(tenant, "k1"))
    assert first.status_code == 201
    sent = [
        (
            "POST",
            "/v1/users",
            {"json": ADA, "headers": httpx.Headers([*tenant["headers"].items(), (b"Idempotency-Key", raw)])},
        )
        for raw in (b"k1\xa0", b"\x85k1", b"k1\x1f")
    ]
    for r in await burst(client, sent):
        assert_problem(r, 400, "idempotency-key-invalid")


async def test_get_and_delete_ignore_the_header(client: Client, tenant: dict[str, Any]) -> None:
    user = (await client.post("/v1/users", json=ADA, headers=tenant["headers"])).json()
    for key in ["not a valid key", "k-get"]:
        for _ in range(2):
            r = await client.get(f"/v1/users/{user['id']}", headers=keyed(tenant, key))
            assert r.status_code == 200
            assert "idempotent-replayed" not in r.headers
    r = await client.delete(f"/v1/users/{user['id']}", headers=keyed(tenant, "not a valid key"))
    assert r.status_code == 204
    r = await client.delete(f"/v1/users/{user['id']}", headers=keyed(tenant, "not a valid key"))
    assert r.status_code == 404  # ran again: nothing was stored for the DELETE
    assert "idempotent-replayed" not in r.headers


# -- what is not stored ------------------------------------------------------------------------


async def test_validation_failures_are_not_stored(client: Client, tenant: dict[str, Any]) -> None:
    h = keyed(tenant, "fix-and-retry")
    r = await client.post("/v1/users", json={"email": "not-an-email", "name": "Ada"}, headers=h)
    assert_problem(r, 422, "validation-error")
    r = await client.post("/v1/users", content=b"{not json", headers={**h, "Content-Type": "application/json"})
    assert r.status_code == 400
    r = await client.post("/v1/users", content=b"email=ada", headers={**h, "Content-Type": "text/plain"})
    assert r.status_code == 415
    first = await client.post("/v1/users", json=ADA, headers=h)
    assert first.status_code == 201, first.text
    assert "idempotent-replayed" not in first.headers
    assert_replay_of(await client.post("/v1/users", json=ADA, headers=h), first)


async def test_a_conflict_is_not_stored(client: Client, tenant: dict[str, Any]) -> None:
    h = keyed(tenant, "dup-email")
    taken = {"email": "owner@acme.test", "name": "Dup"}
    for _ in range(2):  # runs again each time: no replay of the 409
        assert_problem(await client.post("/v1/users", json=taken, headers=h), 409, "email-taken")
    # The client fixes the request and retries with the same key: no 422, the new request runs.
    r = await client.post("/v1/users", json=ADA, headers=h)
    assert r.status_code == 201, r.text
    assert "idempotent-replayed" not in r.headers
    assert await user_emails(client, tenant) == ["ada@acme.test", "owner@acme.test"]


async def test_oversized_body_is_413_and_not_stored(pg_url: str, redis_url: str, tmp_path: Path) -> None:
    settings = make_settings(pg_url, tmp_path, KEEL_REDIS_URL=redis_url, KEEL_MAX_BODY_BYTES="1024")
    async with client_for(settings) as client:
        t = await signup(client)
        big = {"email": "ada@acme.test", "name": "A" * 2000}
        r = await client.post("/v1/users", json=big, headers=keyed(t, "big"))
        assert r.status_code == 413
        r = await client.post("/v1/users", json=ADA, headers=keyed(t, "big"))
        assert r.status_code == 201, r.text


# -- retention ---------------------------------------------------------------------------------


async def test_keys_are_kept_24_hours(backend_env: dict[str, str], pg_url: str, tmp_path: Path) -> None:
    clock = ManualClock()
    async with client_for(make_settings(pg_url, tmp_path, **backend_env), clock=clock) as client:
        t = await signup(client)
        first = await client.post("/v1/users", json=ADA, headers=keyed(t, "daily"))
        assert first.status_code == 201
        clock.advance(hours=23, minutes=59)
        assert_replay_of(await client.post("/v1/users", json=ADA, headers=keyed(t, "daily")), first)
        r = await client.post("/v1/users", json={**ADA, "name": "Other"}, headers=keyed(t, "daily"))
        assert_problem(r, 422, "idempotency-key-reused")
        clock.advance(minutes=1, seconds=1)
        # Past 24 h the key is forgotten: the same request runs again (and meets the existing user).
        r = await client.post("/v1/users", json=ADA, headers=keyed(t, "daily"))
        assert_problem(r, 409, "email-taken")
        r = await client.post("/v1/users", json={"email": "bob@acme.test", "name": "Bob"}, headers=keyed(t, "daily"))
        assert r.status_code == 201, r.text
        assert "idempotent-replayed" not in r.headers
        assert await user_emails(client, t) == ["ada@acme.test", "bob@acme.test", "owner@acme.test"]


# -- concurrency -------------------------------------------------------------------------------


def assert_one_original(responses: list[httpx.Response]) -> httpx.Response:
    originals = [r for r in responses if r.status_code == 201 and "idempotent-replayed" not in r.headers]
    assert len(originals) == 1, [(r.status_code, r.headers.get("idempotent-replayed")) for r in responses]
    original = originals[0]
    for r in responses:
        if r is original:
            continue
        if r.status_code == 409:
            assert_problem(r, 409, "idempotency-key-in-flight")
            assert r.headers["retry-after"] == "1"
        else:
            assert_replay_of(r, original)
    return original


async def test_concurrent_requests_with_one_key_act_once(
    backend_env: dict[str, str], pg_url: str, tmp_path: Path
) -> None:
    async with client_for(make_settings(pg_url, tmp_path, **backend_env)) as client:
        t = await signup(client)
        request: Request = ("POST", "/v1/users", {"json": ADA, "headers": keyed(t, "race")})
        responses = await burst(client, [request] * 20)
        assert_one_original(responses)
        assert await user_emails(client, t) == ["ada@acme.test", "owner@acme.test"]


async def test_concurrent_requests_across_api_processes_act_once(pg_url: str, redis_url: str, tmp_path: Path) -> None:
    settings = make_settings(pg_url, tmp_path, KEEL_REDIS_URL=redis_url)
    async with client_for(settings) as one, client_for(settings) as two:
        t = await signup(one)
        request: Request = ("POST", "/v1/users", {"json": ADA, "headers": keyed(t, "race")})
        a, b = await asyncio.gather(burst(one, [request] * 10), burst(two, [request] * 10))
        assert_one_original(a + b)
        assert await user_emails(one, t) == ["ada@acme.test", "owner@acme.test"]
        # A later retry on either process is a replay.
        assert (await two.post("/v1/users", json=ADA, headers=keyed(t, "race"))).headers["idempotent-replayed"]


# -- store down --------------------------------------------------------------------------------


async def test_store_down_fails_closed_for_keyed_posts_only(
    client: Client, tenant: dict[str, Any], redis_proc: RedisServer
) -> None:
    redis_proc.stop()
    try:
        r = await client.post("/v1/users", json=ADA, headers=keyed(tenant, "while-down"))
        assert r.status_code == 503, r.text
        assert r.headers["content-type"].startswith(PROBLEM)
        assert r.json()["status"] == 503
        assert r.headers["retry-after"] == "1"
        r = await client.post("/v1/users", json={"email": "nokey@acme.test", "name": "N"}, headers=tenant["headers"])
        assert r.status_code == 201, r.text
        r = await client.get("/v1/users", headers=keyed(tenant, "while-down"))
        assert r.status_code == 200
    finally:
        if redis_proc.process is None:
            redis_proc.start()
    assert await user_emails(client, tenant) == ["nokey@acme.test", "owner@acme.test"]
    # With the store back, the same key runs the request.
    r = await client.post("/v1/users", json=ADA, headers=keyed(tenant, "while-down"))
    assert r.status_code == 201, r.text


async def test_store_down_answers_the_idempotency_unavailable_problem(
    client: Client, tenant: dict[str, Any], redis_proc: RedisServer
) -> None:
    """The middleware raises its own problem type (``idempotency-unavailable``, documented under
    /problems); the client must get it, not the generic ``service-unavailable`` without a detail."""
    redis_proc.stop()
    try:
        r = await client.post("/v1/users", json=ADA, headers=keyed(tenant, "while-down"))
    finally:
        if redis_proc.process is None:
            redis_proc.start()
    body = assert_problem(r, 503, "idempotency-unavailable")
    assert body["detail"]
    assert (await client.get("/problems/idempotency-unavailable")).status_code == 200


# -- signup (no tenant yet: scoped by client address) --------------------------------------------


async def test_signup_with_a_key_is_replayed_per_client_address(client: Client) -> None:
    body = {"organization": "Initech", "owner_email": "bill@initech.test", "owner_name": "Bill"}
    first = await client.post("/v1/signup", json=body, headers={"Idempotency-Key": "signup-1"})
    assert first.status_code == 201, first.text
    again = await client.post("/v1/signup", json=body, headers={"Idempotency-Key": "signup-1"})
    assert_replay_of(again, first)
    assert again.json()["api_key"]["token"] == first.json()["api_key"]["token"]
    r = await client.post("/v1/signup", json={**body, "organization": "Other"}, headers={"Idempotency-Key": "signup-1"})
    assert_problem(r, 422, "idempotency-key-reused")

    # Another client address does not see this address's key.
    (elsewhere,) = await burst(
        client, [("POST", "/v1/signup", {"json": body, "headers": {"Idempotency-Key": "signup-1"}})], ("192.0.2.9", 1)
    )
    assert "idempotent-replayed" not in elsewhere.headers
    assert elsewhere.status_code in (201, 409), elsewhere.text
    if elsewhere.status_code == 201:
        assert elsewhere.json()["tenant"]["id"] != first.json()["tenant"]["id"]

    # Nor does a tenant using the same key string.
    auth = {"Authorization": f"Bearer {first.json()['api_key']['token']}"}
    r = await client.post("/v1/users", json=ADA, headers={**auth, "Idempotency-Key": "signup-1"})
    assert r.status_code == 201, r.text


# -- the middleware on a minimal app: required keys, which statuses are stored --------------------
# No Keel route requires a key yet (payments will), so a small app with the real middleware stands in.


class FlakyStore(InMemoryIdempotencyStore):
    """The in-memory store whose ``complete`` and ``release`` fail while ``broken`` is set."""

    broken = False

    async def complete(self, key: str, fingerprint: str, response: StoredResponse, expires_at: datetime) -> None:
        if self.broken:
            raise ConnectionError("store went away")
        await super().complete(key, fingerprint, response, expires_at)

    async def release(self, key: str, fingerprint: str) -> None:
        if self.broken:
            raise ConnectionError("store went away")
        await super().release(key, fingerprint)


def _mini_app(
    store: InMemoryIdempotencyStore | None = None, clock: ManualClock | None = None
) -> tuple[Litestar, dict[str, int]]:
    calls = {"charge": 0, "missing": 0, "boom": 0, "busy": 0}

    @post("/charge", status_code=201, opt={"idempotency": "required"})
    async def charge(data: JSONBody[dict[str, Any]]) -> dict[str, Any]:
        calls["charge"] += 1
        return {"charged": data.get("amount"), "n": calls["charge"]}

    @post("/missing", status_code=201)
    async def missing() -> None:
        calls["missing"] += 1
        raise NotFoundException("nothing here")

    @post("/boom", status_code=201)
    async def boom() -> None:
        calls["boom"] += 1
        raise RuntimeError("handler crashed")

    @post("/busy", status_code=201)
    async def busy() -> Response[dict[str, str]]:
        calls["busy"] += 1
        return Response({"error": "busy"}, status_code=503)

    app = Litestar(
        route_handlers=[charge, missing, boom, busy, describe_problem],
        middleware=[
            DefineMiddleware(
                IdempotencyMiddleware,
                store=store or InMemoryIdempotencyStore(),
                clock=clock or ManualClock(),
                max_body=4096,
            )
        ],
        exception_handlers={Exception: handle_exception},
        logging_config=None,
    )
    return app, calls


async def test_a_required_key_is_enforced_and_documented() -> None:
    app, calls = _mini_app()
    async with AsyncTestClient(app=app) as c:
        r = await c.post("/charge", json={"amount": 5})
        body = assert_problem(r, 400, "idempotency-key-required")
        assert body["detail"]
        assert calls["charge"] == 0
        doc = await c.get(body["type"])
        assert doc.status_code == 200
        assert "Idempotency-Key" in doc.json()["description"]
        assert_problem(
            await c.post("/charge", json={"amount": 5}, headers={"Idempotency-Key": ""}), 400, "idempotency-key-invalid"
        )

        first = await c.post("/charge", json={"amount": 5}, headers={"Idempotency-Key": "pay-1"})
        assert first.status_code == 201
        assert_replay_of(await c.post("/charge", json={"amount": 5}, headers={"Idempotency-Key": "pay-1"}), first)
        assert calls["charge"] == 1


async def test_client_errors_are_stored_and_server_errors_are_not() -> None:
    app, calls = _mini_app()
    async with AsyncTestClient(app=app, raise_server_exceptions=False) as c:
        h = {"Idempotency-Key": "k"}
        first = await c.post("/missing", headers=h)
        assert first.status_code == 404
        assert_replay_of(await c.post("/missing", headers=h), first)
        assert calls["missing"] == 1

        for n in (1, 2):
            r = await c.post("/boom", headers={"Idempotency-Key": "k-boom"})
            assert r.status_code == 500
            assert "idempotent-replayed" not in r.headers
            assert calls["boom"] == n
        for n in (1, 2):
            r = await c.post("/busy", headers={"Idempotency-Key": "k-busy"})
            assert r.status_code == 503
            assert "idempotent-replayed" not in r.headers
            assert calls["busy"] == n


async def test_a_store_failing_after_the_claim_holds_the_key_until_the_claim_lapses() -> None:
    """The response is delivered anyway; the in-flight claim stays until IN_FLIGHT_HOLD (2 min) passes, so
    retries meanwhile get 409 and none runs the operation a second time."""
    store, clock = FlakyStore(), ManualClock()
    app, calls = _mini_app(store, clock)
    async with AsyncTestClient(app=app, raise_server_exceptions=False) as c:
        store.broken = True
        first = await c.post("/charge", json={"amount": 1}, headers={"Idempotency-Key": "p"})
        assert first.status_code == 201
        r = await c.post("/busy", headers={"Idempotency-Key": "b"})  # 503: release fails too
        assert r.status_code == 503
        store.broken = False
        assert_problem(
            await c.post("/charge", json={"amount": 1}, headers={"Idempotency-Key": "p"}),
            409,
            "idempotency-key-in-flight",
        )
        assert_problem(await c.post("/busy", headers={"Idempotency-Key": "b"}), 409, "idempotency-key-in-flight")
        assert calls == {"charge": 1, "missing": 0, "boom": 0, "busy": 1}
        clock.advance(minutes=2)
        again = await c.post("/charge", json={"amount": 1}, headers={"Idempotency-Key": "p"})
        assert again.status_code == 201
        assert "idempotent-replayed" not in again.headers
        assert calls["charge"] == 2


# -- secrets in stored responses --------------------------------------------------------------------


async def test_issued_tokens_are_not_kept_in_clear_by_the_idempotency_store(
    client: Client, tenant: dict[str, Any], redis_url: str
) -> None:
    """Keel stores only the SHA-256 of API keys, yet a keyed POST /v1/api-keys or /v1/signup must replay
    its response, token included. The stored body is sealed under a key derived from the client's
    Idempotency-Key, so neither the token nor the key sits in Redis in clear."""
    from redis.asyncio import Redis

    created = await client.post("/v1/api-keys", json={"name": "ci"}, headers=keyed(tenant, "issue-ci-key"))
    assert created.status_code == 201
    signed_up = await client.post(
        "/v1/signup",
        json={"organization": "Initech", "owner_email": "bill@initech.test", "owner_name": "Bill"},
        headers={"Idempotency-Key": "signup-initech"},
    )
    assert signed_up.status_code == 201
    tokens = [created.json()["token"], signed_up.json()["api_key"]["token"]]

    r = Redis.from_url(redis_url)
    try:
        names = await r.keys("keel:idem:*")
        stored = b"".join(names)
        for name in names:
            stored += b"".join((await r.hgetall(name)).values())
    finally:
        await r.aclose()
    assert stored  # the responses are stored ...
    for token in tokens:
        assert token.encode() not in stored  # ... but not the secrets in them
    # ... nor the clients' keys themselves (records are filed under a hash).
    assert b"issue-ci-key" not in stored
    assert b"signup-initech" not in stored


# -- parse_key ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ([b"abc"], "abc"),
        ([b"  abc \t"], "abc"),
        ([b'"abc"'], "abc"),
        ([b'"a b"'], "a b"),
        ([rb'"a\"b\\c"'], 'a"b\\c'),
        ([b'"\\\\"'], "\\"),
        ([b"!#$%&'*+-.^_`|~"], "!#$%&'*+-.^_`|~"),
        ([b"x" * 255], "x" * 255),
        ([b'"' + b"x" * 255 + b'"'], "x" * 255),
        ([b"x"], "x"),
    ],
)
def test_parse_key_accepts(values: list[bytes], key: str) -> None:
    assert parse_key(values) == key


@pytest.mark.parametrize(
    "raw",
    [b"abc\xa0", b"\x85abc", b"abc\x1f", b"\x1cabc", b"abc\x0b", b'"abc"\xa0'],
    ids=["nbsp", "nel", "us", "fs", "vt", "quoted-nbsp"],
)
def test_parse_key_trims_only_http_whitespace(raw: bytes) -> None:
    """parse_key trims only SP and HTAB; these bytes make the key invalid rather than disappear."""
    with pytest.raises(ProblemError) as exc:
        parse_key([raw])
    assert exc.value.status_code == 400


@pytest.mark.parametrize(
    "values",
    [
        [],
        [b"a", b"a"],
        [b"a", b"b"],
        [b""],
        [b"   "],
        [b'""'],
        [b"x" * 256],
        [b'"' + b"x" * 256 + b'"'],
        [b"a b"],
        [b"a\tb"],
        [b"a\x00b"],
        [b"a\x7fb"],
        ["clé".encode()],
        ['"clé"'.encode()],
        [b"caf\xe9"],
        [b'"tab\tinside"'],
    ],
)
def test_parse_key_rejects(values: list[bytes]) -> None:
    with pytest.raises(ProblemError) as exc:
        parse_key(values)
    assert exc.value.status_code == 400
    assert exc.value.slug == "idempotency-key-invalid"
