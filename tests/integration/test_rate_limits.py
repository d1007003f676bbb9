"""Rate limits over HTTP: per API key (platform default or the tenant's own quota) and per client IP on
signup, draft RateLimit headers, 429 problem+json, exact across API processes, fail-open without Redis.

``client_for`` apps run on their own event loop (the test client's portal thread) and the test client
sends one request at a time; real concurrency goes through ``burst``, which runs an httpx ASGI client
on the app's own loop (so the app's pools stay on one loop) and can also pick the client address.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from keel.main.container import Container
from keel.main.settings import Settings
from tests.support.app import Request, burst, client_for, make_settings, signup
from tests.support.servers import RedisServer

Client = AsyncTestClient[Litestar]
PROBLEM = "application/problem+json"
POLICY = re.compile(r'^"(?P<name>[a-z]+)";q=(?P<q>\d+);w=(?P<w>\d+)$')
STATE = re.compile(r'^"(?P<name>[a-z]+)";r=(?P<r>\d+);t=(?P<t>\d+)$')
# AsyncTestClient puts this in the ASGI scope as the client address: ("testclient", 50000).
TEST_CLIENT_HOST = "testclient"


def container(client: Client) -> Container:
    c: Container = client.app.state["container"]
    return c


def policy(r: httpx.Response) -> tuple[str, int, int]:
    m = POLICY.match(r.headers["ratelimit-policy"])
    assert m, r.headers["ratelimit-policy"]
    return m["name"], int(m["q"]), int(m["w"])


def state(r: httpx.Response) -> tuple[str, int, int]:
    m = STATE.match(r.headers["ratelimit"])
    assert m, r.headers["ratelimit"]
    return m["name"], int(m["r"]), int(m["t"])


def assert_rate_limited(r: httpx.Response, quota: int, window: int, name: str = "default") -> None:
    assert r.status_code == 429, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    body = r.json()
    assert body["type"] == "/problems/rate-limited"
    assert body["status"] == 429
    assert body["title"]
    assert body["detail"]
    retry_after = int(r.headers["retry-after"])
    assert 1 <= retry_after <= window
    assert policy(r) == (name, quota, window)
    got_name, remaining, reset = state(r)
    assert (got_name, remaining) == (name, 0)
    assert 0 < reset <= window
    assert retry_after == max(1, reset)


SettingsFor = Callable[..., Settings]


@pytest.fixture
def redis_settings(pg_url: str, redis_url: str, tmp_path: Path) -> SettingsFor:
    """Settings on Postgres and Redis with the given environment overrides (rate limits)."""

    def build(**env: str) -> Settings:
        return make_settings(pg_url, tmp_path, KEEL_REDIS_URL=redis_url, **env)

    return build


@pytest.fixture(params=["redis", "memory"])
def backend_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """Redis-backed limits, and the in-process default (no KEEL_REDIS_URL)."""
    return {"KEEL_REDIS_URL": str(request.getfixturevalue("redis_url"))} if request.param == "redis" else {}


async def test_headers_count_down_then_429(backend_env: dict[str, str], pg_url: str, tmp_path: Path) -> None:
    env = {"KEEL_RATE_LIMIT_PER_MINUTE": "5", **backend_env}
    async with client_for(make_settings(pg_url, tmp_path, **env)) as client:
        t = await signup(client)
        seen = []
        for _ in range(5):
            r = await client.get("/v1/tenant", headers=t["headers"])
            assert r.status_code == 200, r.text
            assert policy(r) == ("default", 5, 60)
            name, remaining, reset = state(r)
            assert name == "default"
            assert 0 < reset <= 60
            seen.append(remaining)
        assert seen == [4, 3, 2, 1, 0]

        # Every route of the key shares the count, whatever the method or the outcome.
        for method, path in [("GET", "/v1/users"), ("POST", "/v1/users"), ("GET", "/v1/tenant")]:
            r = await client.request(method, path, headers=t["headers"], json={"email": "x@acme.test", "name": "X"})
            assert_rate_limited(r, 5, 60)
        # The 429 did not reach the handler.
        assert container(client).rate_limit_stats.failed_open == 0


async def test_errors_from_handlers_still_carry_the_headers(redis_settings: SettingsFor) -> None:
    async with client_for(redis_settings(KEEL_RATE_LIMIT_PER_MINUTE="10")) as client:
        t = await signup(client)
        r = await client.get("/v1/users/00000000-0000-0000-0000-000000000000", headers=t["headers"])
        assert r.status_code == 404
        assert policy(r) == ("default", 10, 60)
        assert state(r)[1] == 9
        r = await client.post("/v1/users", headers=t["headers"], json={"email": "nope"})
        assert r.status_code in (400, 422)
        assert state(r)[1] == 8


async def test_keys_are_limited_separately_and_unauthenticated_are_not_counted(redis_settings: SettingsFor) -> None:
    async with client_for(redis_settings(KEEL_RATE_LIMIT_PER_MINUTE="3")) as client:
        t = await signup(client)
        r = await client.post("/v1/api-keys", headers=t["headers"], json={"name": "second"})
        assert r.status_code == 201
        second = {"Authorization": f"Bearer {r.json()['token']}"}
        other = await signup(client, "Globex", "owner@globex.test")
        for _ in range(2):
            assert (await client.get("/v1/tenant", headers=t["headers"])).status_code == 200
        assert_rate_limited(await client.get("/v1/tenant", headers=t["headers"]), 3, 60)
        # Another key of the same tenant, and another tenant's key, have their own quota.
        assert state(await client.get("/v1/tenant", headers=second))[1] == 2
        assert state(await client.get("/v1/tenant", headers=other["headers"]))[1] == 2
        # Unauthenticated requests are refused by authentication before the limiter counts anything.
        for _ in range(5):
            r = await client.get("/v1/tenant", headers={"Authorization": "Bearer keel_nope"})
            assert r.status_code == 401
            assert "ratelimit" not in r.headers
        assert state(await client.get("/v1/tenant", headers=second))[1] == 1


async def test_tenant_quota_from_config_takes_effect(redis_settings: SettingsFor) -> None:
    async with client_for(redis_settings(KEEL_RATE_LIMIT_PER_MINUTE="50")) as client:
        t = await signup(client)
        other = await signup(client, "Globex", "owner@globex.test")
        r = await client.patch("/v1/tenant/config", headers=t["headers"], json={"rate_limit_per_minute": 3})
        assert r.status_code == 200, r.text
        assert r.json()["config"]["rate_limit_per_minute"] == 3

        statuses = []
        for _ in range(4):
            r = await client.get("/v1/tenant", headers=t["headers"])
            statuses.append(r.status_code)
        assert statuses == [200, 200, 200, 429]
        assert_rate_limited(r, 3, 60)
        # The other tenant keeps the platform default.
        r = await client.get("/v1/tenant", headers=other["headers"])
        assert r.status_code == 200
        assert policy(r) == ("default", 50, 60)

        # Back to the platform default (null): admitted again under the default quota.
        r = await client.patch("/v1/tenant/config", headers=other["headers"], json={"rate_limit_per_minute": 4})
        assert r.status_code == 200
        assert policy(await client.get("/v1/tenant", headers=other["headers"])) == ("default", 4, 60)
        r = await client.patch("/v1/tenant/config", headers=other["headers"], json={"rate_limit_per_minute": None})
        assert r.status_code == 200, r.text
        assert policy(await client.get("/v1/tenant", headers=other["headers"])) == ("default", 50, 60)


async def test_tenant_quota_is_seen_by_every_api_process(redis_settings: SettingsFor) -> None:
    settings = redis_settings(KEEL_RATE_LIMIT_PER_MINUTE="50")
    async with client_for(settings) as one, client_for(settings) as two:
        t = await signup(one)
        assert policy(await two.get("/v1/tenant", headers=t["headers"])) == ("default", 50, 60)  # cached in two
        r = await one.patch("/v1/tenant/config", headers=t["headers"], json={"rate_limit_per_minute": 2})
        assert r.status_code == 200
        r = await two.get("/v1/tenant", headers=t["headers"])
        assert policy(r) == ("default", 2, 60)


async def test_signup_is_limited_per_client_ip(redis_settings: SettingsFor) -> None:
    async with client_for(
        redis_settings(KEEL_SIGNUP_RATE_LIMIT_PER_HOUR="2", KEEL_RATE_LIMIT_PER_MINUTE="2")
    ) as client:
        first = await client.post(
            "/v1/signup", json={"organization": "A", "owner_email": "a@a.test", "owner_name": "A"}
        )
        assert first.status_code == 201, first.text
        assert policy(first) == ("signup", 2, 3600)
        assert state(first)[1] == 1
        # A rejected signup (validation) counts too: the limit is about attempts from an address.
        bad = await client.post("/v1/signup", json={"organization": "B"})
        assert bad.status_code in (400, 422)
        assert state(bad)[1] == 0
        r = await client.post("/v1/signup", json={"organization": "C", "owner_email": "c@c.test", "owner_name": "C"})
        assert_rate_limited(r, 2, 3600, name="signup")
        assert int(r.headers["retry-after"]) > 3500

        # The limit is keyed by the client host (the test client's "testclient"), not by port or tenant.
        body = {"organization": "D", "owner_email": "d@d.test", "owner_name": "D"}
        same_host, elsewhere = await asyncio.gather(
            burst(client, [("POST", "/v1/signup", {"json": body})], (TEST_CLIENT_HOST, 1234)),
            burst(client, [("POST", "/v1/signup", {"json": body})], ("203.0.113.7", 1234)),
        )
        assert same_host[0].status_code == 429
        assert elsewhere[0].status_code == 201, elsewhere[0].text
        assert policy(elsewhere[0]) == ("signup", 2, 3600)
        assert state(elsewhere[0])[1] == 1

        # The signup quota and the per-key quota are separate: the new tenant's key is not limited by it.
        token = first.json()["api_key"]["token"]
        r = await client.get("/v1/tenant", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200
        assert policy(r) == ("default", 2, 60)


async def test_public_routes_are_not_limited(redis_settings: SettingsFor) -> None:
    async with client_for(
        redis_settings(KEEL_RATE_LIMIT_PER_MINUTE="1", KEEL_SIGNUP_RATE_LIMIT_PER_HOUR="1")
    ) as client:
        for path in ["/livez", "/healthz", "/openapi.json", "/problems/rate-limited"]:
            for _ in range(4):
                r = await client.get(path)
                assert r.status_code == 200, (path, r.text)
                assert "ratelimit" not in r.headers
                assert "ratelimit-policy" not in r.headers


async def test_two_api_processes_admit_exactly_the_quota(redis_settings: SettingsFor) -> None:
    settings = redis_settings(KEEL_RATE_LIMIT_PER_MINUTE="30")
    async with client_for(settings) as one, client_for(settings) as two:
        t = await signup(one)
        requests: list[Request] = [("GET", "/v1/tenant", {"headers": t["headers"]})] * 40
        a, b = await asyncio.gather(burst(one, requests), burst(two, requests))
        statuses = [r.status_code for r in a + b]
        assert statuses.count(200) == 30, statuses
        assert statuses.count(429) == 50, statuses
        for r in a + b:
            assert policy(r) == ("default", 30, 60)
            if r.status_code == 429:
                assert_rate_limited(r, 30, 60)
        assert container(one).rate_limit_stats.failed_open == 0
        assert container(two).rate_limit_stats.failed_open == 0


async def test_redis_down_fails_open_and_limiting_resumes(redis_settings: SettingsFor, redis_proc: RedisServer) -> None:
    async with client_for(redis_settings(KEEL_RATE_LIMIT_PER_MINUTE="3")) as client:
        t = await signup(client)
        h = t["headers"]
        for _ in range(3):
            assert (await client.get("/v1/tenant", headers=h)).status_code == 200
        assert (await client.get("/v1/tenant", headers=h)).status_code == 429
        stats = container(client).rate_limit_stats
        assert stats.failed_open == 0

        redis_proc.stop()
        try:
            statuses = [(await client.get("/v1/tenant", headers=h)).status_code for _ in range(6)]
            assert statuses == [200] * 6
            assert stats.failed_open >= 1
            # Writes keep working too (the rate limiter is not the only Redis user on this path).
            r = await client.post("/v1/users", headers=h, json={"email": "down@acme.test", "name": "Down"})
            assert r.status_code == 201, r.text
        finally:
            if redis_proc.process is None:
                redis_proc.start()

        # Redis is back (empty): once the circuit closes (1 s), the quota is counted again.
        deadline = time.monotonic() + 10
        seen: list[int] = []
        while time.monotonic() < deadline:
            r = await client.get("/v1/tenant", headers=h)
            seen.append(r.status_code)
            assert r.status_code < 500, r.text
            if r.status_code == 429:
                break
            if "ratelimit" not in r.headers:
                await asyncio.sleep(0.2)  # still failing open
        assert seen[-1] == 429, seen
        assert_rate_limited(r, 3, 60)
        limited = [s for s in seen if s == 200]
        assert len(limited) >= 3  # the fresh window admitted the quota (plus any failed-open requests)


async def test_fail_open_circuit_covers_the_whole_process(redis_settings: SettingsFor, redis_proc: RedisServer) -> None:
    """Litestar builds one middleware instance per route, so the 1 s fail-open circuit lives in the
    process-wide stats: after the limiter fails on one route, other routes do not ask the dead limiter
    (nor wait out a hung Redis's socket timeout) within the same second: one failure, not three."""
    async with client_for(redis_settings(KEEL_RATE_LIMIT_PER_MINUTE="100")) as client:
        t = await signup(client)
        stats = container(client).rate_limit_stats
        redis_proc.stop()
        try:
            for path in ["/v1/tenant", "/v1/users", "/v1/api-keys"]:
                assert (await client.get(path, headers=t["headers"])).status_code == 200
        finally:
            if redis_proc.process is None:
                redis_proc.start()
        assert stats.failed_open == 1
