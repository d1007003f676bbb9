"""Faults injected into the production topology while it is under load: real ``keel serve``, ``keel worker`` and
``keel cron`` subprocesses against a Postgres and a Redis on 127.0.0.1, a few concurrent HTTP clients recording
every answer, and one fault per test:

1. Redis stopped, then restarted on the same port: reads fall back to the database, rate limiting fails open,
   idempotent POSTs fail closed (503), ``/healthz`` follows Redis down and up, and caching resumes by itself;
2. Postgres restarted: 503 problem+json while it is down (never a traceback), the pool recovers without a
   restart, and no accepted payment lacks its row or its outbox event;
3. the API SIGKILLed between a commit and the publication of its events: ``keel cron``'s outbox sweep
   publishes them (webhooks delivered, cache entries invalidated);
4. a webhook receiver that accepts connections and never answers: the attempt times out, is recorded as
   failed, its retry is scheduled, and the single worker goes on with other jobs meanwhile;
5. a worker SIGKILLed in the middle of a payment capture: the retried job completes and the charge, the
   payment's success and its event each happen once.

Three defects these faults found have a test of their own next to the fault, which reproduces the
situation deterministically: a connection refused while Postgres starts (asyncpg's CannotConnectNowError
answered 500), pooled Redis connections dead after a restart (503 with Redis back), and a webhook retry
released early in its due second (skipped). Each test has a Redis of its own, and the Postgres faults a
Postgres server of this module's own, so the session's servers are never disturbed. Every process is stopped
at teardown, whatever the test did.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import asyncpg
import httpx
import pytest
import redis
from rq.job import Job
from rq.registry import ScheduledJobRegistry
from rq.scheduler import RQScheduler
from rq.serializers import JSONSerializer

from keel.contexts.accounts.domain.caching import user_key
from keel.contexts.payments.domain.model import capture_key
from keel.contexts.webhooks.domain.services import DELIVER_JOB
from keel.main import db
from keel.platform.adapters.redis.cache import NAMESPACE
from tests.support.app import Request, burst, client_for, make_settings
from tests.support.faults import (
    Answer,
    Deployment,
    KeelProcess,
    Load,
    RequestFn,
    begin_smart_shutdown,
    connection,
    expire_scheduler_locks,
    hanging_receiver,
    keel_env,
    rq_jobs,
    sql,
    tcp_proxy,
    wait_for,
    worker_registered,
)
from tests.support.receivers import Reply, webhook_receiver
from tests.support.servers import PostgresServer, RedisServer, admin_sql, postgres_server, redis_server
from tests.support.waiting import eventually

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

PROBLEM = "application/problem+json"


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis of this test's own: the faults stop or freeze it."""
    with redis_server() as server:
        yield server


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    d = Deployment(tmp_path / "logs")
    try:
        yield d
    finally:
        d.stop_all()


@dataclass
class Tenant:
    id: str
    owner_id: str
    headers: dict[str, str]

    def keyed(self, key: str | None = None) -> dict[str, str]:
        return {**self.headers, "Idempotency-Key": key or uuid.uuid4().hex}


def expect(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, f"{r.request.method} {r.request.url.path}: {r.status_code} {r.text[:500]}"
    body: dict[str, Any] = r.json() if r.content else {}
    return body


@contextlib.asynccontextmanager
async def api_client(api: KeelProcess) -> AsyncIterator[httpx.AsyncClient]:
    assert api.url is not None
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as http:
        yield http


async def signup(http: httpx.AsyncClient) -> Tenant:
    tag = uuid.uuid4().hex[:8]
    body = expect(
        await http.post(
            "/v1/signup",
            json={"organization": f"Acme {tag}", "owner_email": f"owner-{tag}@acme.test", "owner_name": "Owner"},
        ),
        201,
    )
    return Tenant(body["tenant"]["id"], body["user"]["id"], {"Authorization": f"Bearer {body['api_key']['token']}"})


async def create_user(http: httpx.AsyncClient, tenant: Tenant, name: str) -> str:
    email = f"{name.lower().replace(' ', '-')}-{uuid.uuid4().hex[:6]}@acme.test"
    body = expect(await http.post("/v1/users", json={"email": email, "name": name}, headers=tenant.headers), 201)
    return str(body["id"])


async def endpoint(http: httpx.AsyncClient, tenant: Tenant, url: str, event_types: list[str]) -> str:
    body = expect(
        await http.post("/v1/webhook-endpoints", json={"url": url, "event_types": event_types}, headers=tenant.headers),
        201,
    )
    return str(body["id"])


async def deliveries(http: httpx.AsyncClient, tenant: Tenant, endpoint_id: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        params = {"limit": "100", **({"cursor": cursor} if cursor else {})}
        page = expect(
            await http.get(f"/v1/webhook-endpoints/{endpoint_id}/deliveries", params=params, headers=tenant.headers),
            200,
        )
        found.extend(page["items"])
        cursor = page["next_cursor"]
        if not cursor:
            return found


def assert_problem(answer: Answer, status: int) -> dict[str, Any]:
    """A deliberate error: RFC 9457 problem+json with the status, a type and the request id; no traceback."""
    assert answer.status == status, answer
    assert answer.content_type.startswith(PROBLEM), answer
    assert "Traceback" not in answer.body, answer.body
    assert 'File "' not in answer.body, answer.body
    body = answer.json()
    assert body["status"] == status, body
    assert body["type"], body
    assert body["request_id"] == answer.headers.get("x-request-id"), body
    return body


def errors_logged(process: KeelProcess) -> list[dict[str, Any]]:
    return [line for line in process.lines() if line.get("level") in ("ERROR", "CRITICAL")]


def between(answers: list[Answer], start: float, end: float) -> list[Answer]:
    """Answers to requests sent and answered entirely within [start, end]."""
    return [a for a in answers if a.started >= start and a.ended <= end]


def since(answers: list[Answer], start: float) -> list[Answer]:
    return [a for a in answers if a.started >= start]


def last_failure(answers: list[Answer], ok: int, default: float) -> float:
    """When the last answer other than ``ok`` ended (``default`` if there was none)."""
    return max((a.ended for a in answers if a.status != ok), default=default)


# -- 1. Redis stopped, then restarted on the same port ----------------------------------------------------------


async def test_redis_stopped_under_load_degrades_as_promised_and_everything_recovers_without_a_restart(
    pg_url: str, own_redis: RedisServer, deployment: Deployment, tmp_path: Path
) -> None:
    env = keel_env(pg_url, own_redis.url, tmp_path / "data")
    api = await deployment.api("api", env)
    assert api.url is not None
    async with api_client(api) as http:
        tenant = await signup(http)
        users = {tenant.owner_id: "Owner"}
        for name in ("Ada", "Grace"):
            users[await create_user(http, tenant, name)] = name
        for user_id in users:
            expect(await http.get(f"/v1/users/{user_id}", headers=tenant.headers), 200)
    ids = list(users)
    processes = sorted(api.tree())

    def reader(user_id: str) -> RequestFn:
        def read(c: httpx.AsyncClient, n: int) -> Awaitable[httpx.Response]:
            return c.get(f"/v1/users/{user_id}", headers=tenant.headers)

        return read

    load = Load(api.url, within=60)
    for i, user_id in enumerate(ids):
        load.add(f"read-{i}", reader(user_id))
    load.add("health", lambda c, n: c.get("/healthz"), pause=0.05)

    def idempotent_post(c: httpx.AsyncClient, n: int) -> Any:
        body = {"email": f"idem-{n}@acme.test", "name": f"Idem {n}"}
        return c.post("/v1/users", json=body, headers=tenant.keyed(f"idem-{n}"))

    load.add("idem", idempotent_post, pause=0.1)

    def count(client: str, start: float, status: int | None = None) -> int:
        return sum(1 for a in since(load.of(client), start) if status is None or a.status == status)

    def limiter_failed_open() -> bool:
        return any("rate limiter unavailable" in line.get("msg", "") for line in api.lines())

    load.start()
    try:
        begun = time.monotonic()
        await load.until(lambda: count("idem", begun) >= 3 and count("read", begun) >= 30, "load before the outage")

        stopping = time.monotonic()
        await asyncio.to_thread(own_redis.stop)
        stopped = time.monotonic()  # the server process has exited
        # Down until the limiter has had to ask Redis: a process spends hits it took ahead for up to a second.
        await load.until(
            lambda: (
                count("health", stopped, 503) >= 3
                and count("idem", stopped) >= 5
                and count("read", stopped) >= 60
                and limiter_failed_open()
            ),
            "load while Redis is down",
        )

        restarting = time.monotonic()
        await asyncio.to_thread(own_redis.start)
        back = time.monotonic()  # Redis answers PING on the same port again
        await load.until(
            lambda: count("health", back, 200) >= 3 and count("idem", back, 201) >= 3 and count("read", back) >= 60,
            "load after Redis came back",
        )
    finally:
        answers = await load.stop()

    # Reads never failed: served from the cache, then from the database, then from the cache again.
    reads = load.of("read")
    assert reads
    assert all(a.status == 200 for a in reads), [a for a in reads if a.status != 200][:3]
    assert all(a.json()["name"] == users[ids[int(a.client.split("-")[1])]] for a in reads)
    assert len(between(reads, stopped, restarting)) >= 60
    # The limiter failed open: nothing was refused, and the API says it admitted requests without it.
    assert not [a for a in answers if a.status == 429]
    assert limiter_failed_open()

    # Idempotent POSTs: stored before, refused (fail closed) while the store is unreachable, stored again after.
    idem = load.of("idem")
    assert all(a.status == 201 for a in idem if a.ended < stopping), [a for a in idem if a.ended < stopping]
    refused = between(idem, stopped, restarting)
    assert refused
    for a in refused:
        assert assert_problem(a, 503)["type"].endswith("/problems/idempotency-unavailable")
        assert a.headers.get("retry-after")
    # Back to normal within 5 s of Redis's return, and stays so (connections the pool kept through the
    # outage are retried once: test_nothing_fails_once_redis_is_back_from_a_restart).
    assert 201 in {a.status for a in since(idem, back)}
    assert last_failure(since(idem, back), 201, back) - back <= 5.0, since(idem, back)

    # /healthz: 503 within 2 s of the stop, 200 within 5 s of Redis's return (the documented promises).
    health = load.of("health")
    down = between(health, stopped, restarting)
    assert down
    assert all(a.status == 503 for a in down), [(a.status, a.body) for a in down if a.status != 503]
    failing = min(a.ended for a in down)
    checks = down[0].json()["checks"]
    assert checks["redis:responseTime"][0]["status"] == "fail"
    assert checks["postgres:responseTime"][0]["status"] == "pass"
    assert failing - stopped <= 2.0, f"/healthz answered 503 {failing - stopped:.2f} s after Redis stopped"
    assert 200 in {a.status for a in since(health, back)}
    recovered = last_failure(since(health, back), 200, back)
    assert recovered - back <= 5.0, f"/healthz answered 503 until {recovered - back:.2f} s after Redis returned"

    # Nothing restarted: the same server and worker processes answered throughout.
    assert api.alive
    assert sorted(api.tree()) == processes
    assert not [a for a in answers if a.status is None or (a.status >= 500 and a.client not in ("idem", "health"))]
    assert not errors_logged(api), errors_logged(api)[:3]

    async with api_client(api) as http:
        # A key refused during the outage stored nothing: the client's retry with it is served now.
        retried = refused[0]
        n = retried.n
        body = {"email": f"idem-{n}@acme.test", "name": f"Idem {n}"}
        expect(await http.post("/v1/users", json=body, headers=tenant.keyed(f"idem-{n}")), 201)
        replay = await http.post("/v1/users", json=body, headers=tenant.keyed(f"idem-{n}"))
        assert replay.status_code == 201
        assert replay.headers.get("idempotent-replayed") == "true"

        # Caching works again: a read fills the shared cache, a change invalidates it, and the next read
        # (through the same long-lived process) is the new profile.
        path = f"/v1/users/{ids[1]}"
        key = NAMESPACE + user_key(uuid.UUID(tenant.id), uuid.UUID(ids[1]))
        conn = redis.Redis.from_url(own_redis.url)
        try:

            async def cached() -> bool:
                expect(await http.get(path, headers=tenant.headers), 200)
                return bool(conn.exists(key))

            await eventually(cached, within=5)
            expect(await http.patch(path, json={"name": "Ada after the outage"}, headers=tenant.headers), 200)
            assert not conn.exists(key)
            for _ in range(3):
                assert expect(await http.get(path, headers=tenant.headers), 200)["name"] == "Ada after the outage"
            assert conn.exists(key)
        finally:
            conn.close()


async def test_nothing_fails_once_redis_is_back_from_a_restart(
    pg_url: str, own_redis: RedisServer, tmp_path: Path
) -> None:
    """In process, where concurrency is certain: concurrent readiness probes open several pooled connections,
    one probe fails while Redis is down, and once Redis answers PING again, every probe must pass."""
    settings = make_settings(pg_url, tmp_path, KEEL_REDIS_URL=own_redis.url, KEEL_REDIS_TIMEOUT="0.3")
    probes: list[Request] = [("GET", "/healthz", {})] * 8
    async with client_for(settings) as client:
        assert {r.status_code for r in await burst(client, probes)} == {200}
        own_redis.stop()
        assert (await client.get("/healthz")).status_code == 503
        own_redis.start()
        after = await burst(client, probes)
    failed = [r.json()["checks"]["redis:responseTime"][0].get("output") for r in after if r.status_code != 200]
    assert not failed, f"{len(failed)} of {len(after)} probes failed after Redis was back: {failed}"


# -- 2. Postgres restarted -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def own_pg() -> Iterator[PostgresServer]:
    """A Postgres of this module's own: the faults stop and restart it (each test leaves it running)."""
    with postgres_server() as server:
        yield server


@pytest.fixture
async def own_pg_url(own_pg: PostgresServer) -> str:
    """A fresh, migrated database on ``own_pg``."""
    name = f"faults_{uuid.uuid4().hex[:12]}"
    await admin_sql(own_pg, f'CREATE DATABASE "{name}"')
    db.upgrade(own_pg.url(name))
    return own_pg.url(name)


def cause(process: KeelProcess, request_id: str) -> str:
    """The last line of the exception logged for ``request_id``."""
    for line in process.lines():
        if line.get("request_id") == request_id and line.get("exception"):
            return str(line["exception"]).strip().splitlines()[-1]
    return ""


async def test_postgres_restart_under_load_answers_503_then_recovers_with_no_partial_writes(
    own_pg: PostgresServer, own_pg_url: str, own_redis: RedisServer, deployment: Deployment, tmp_path: Path
) -> None:
    database_url = own_pg_url
    env = keel_env(database_url, own_redis.url, tmp_path / "data", KEEL_DB_POOL_TIMEOUT="2")
    api = await deployment.api("api", env)
    assert api.url is not None
    async with api_client(api) as http:
        tenant = await signup(http)
        expect(await http.get(f"/v1/users/{tenant.owner_id}", headers=tenant.headers), 200)
    processes = sorted(api.tree())

    def pay(c: httpx.AsyncClient, n: int) -> Any:
        body = {"amount": 1000 + n, "currency": "EUR", "payment_method": "pm_card_visa"}
        return c.post("/v1/payments", json=body, headers=tenant.keyed())

    load = Load(api.url, within=60)
    load.add("pay-0", pay, pause=0.02)
    load.add("pay-1", pay, pause=0.02)
    load.add("read", lambda c, n: c.get(f"/v1/users/{tenant.owner_id}", headers=tenant.headers), pause=0.02)
    load.add("health", lambda c, n: c.get("/healthz"), pause=0.05)

    def count(client: str, start: float, status: int | None = None) -> int:
        return sum(1 for a in since(load.of(client), start) if status is None or a.status == status)

    load.start()
    try:
        begun = time.monotonic()
        await load.until(lambda: count("pay", begun, 202) >= 6, "payments before the restart")

        stopping = time.monotonic()
        await asyncio.to_thread(own_pg.stop, "fast")
        stopped = time.monotonic()  # pg_ctl -w: the server has exited
        await load.until(lambda: count("pay", stopped, 503) >= 3, "payments while Postgres is down")
        # Postgres stays down about two seconds: a restart, not a blip.
        await asyncio.sleep(max(0.0, stopped + 2.0 - time.monotonic()))

        restarting = time.monotonic()
        await asyncio.to_thread(own_pg.start)
        back = time.monotonic()  # pg_ctl -w: accepting connections again
        await load.until(lambda: count("pay", back, 202) >= 6 and count("read", back, 200) >= 6, "recovery", 30)
    finally:
        answers = await load.stop()

    # Never a dropped connection, never a traceback: every failure is problem+json.
    assert not [a for a in answers if a.status is None], [a for a in answers if a.status is None][:3]
    payments = load.of("pay")
    assert all(a.status == 202 for a in payments if a.ended < stopping)
    down = [a for a in answers if a.client != "health" and a.started >= stopped and a.ended <= restarting]
    transitions = [
        a
        for a in answers
        if a.client != "health" and a.started < back and not (a.started >= stopped and a.ended <= restarting)
    ]
    # While Postgres is down (connections refused): 503 for everything that needs it; cached reads may still be 200.
    assert [a for a in down if a.client.startswith("pay")], "no payment was attempted while Postgres was down"
    for a in down:
        if a.status != 200 or a.client.startswith("pay"):
            assert_problem(a, 503)
            assert a.headers.get("retry-after"), a
    # While it shuts down and starts up (asyncpg's CannotConnectNowError, SQLSTATE 57P03): the same.
    for a in transitions:
        if a.status not in (200, 201, 202):
            assert_problem(a, 503)
    health = load.of("health")
    assert all(a.status == 503 for a in between(health, stopped, restarting))

    # The pool recovered by itself, within a bound, and stayed recovered.
    recovered = min(a.ended for a in since(payments, back) if a.status == 202)
    assert recovered - back <= 10.0, f"the first payment was accepted {recovered - back:.2f} s after the restart"
    for a in since(answers, back):
        if a.status not in (200, 201, 202):
            assert a.started < recovered, a
            assert a.client != "health", a
            assert_problem(a, 503)
    assert all(a.status == 200 for a in since(health, recovered))
    assert api.alive
    assert sorted(api.tree()) == processes
    assert not errors_logged(api), [cause(api, line["request_id"]) for line in errors_logged(api)][:3]

    # No partial writes: every accepted payment exists, and every stored payment has its payment.created event.
    accepted = {a.json()["payment"]["id"] for a in payments if a.status == 202}
    rows = await sql(database_url, "SELECT id::text AS id FROM payments WHERE tenant_id = $1::uuid", tenant.id)
    stored = {r["id"] for r in rows}
    assert accepted <= stored, accepted - stored
    events = await sql(
        database_url,
        "SELECT id::text AS id, data->>'payment_id' AS payment_id FROM outbox WHERE type = 'payment.created'",
    )
    assert {e["payment_id"] for e in events} == stored
    assert all(e["id"] == e["payment_id"] for e in events)
    assert len(events) == len(stored)


async def test_connections_refused_while_postgres_shuts_down_answer_503_not_500(
    own_pg: PostgresServer, own_pg_url: str, own_redis: RedisServer, deployment: Deployment, tmp_path: Path
) -> None:
    """The shutdown window of a restart, held open: a smart shutdown waits for the test's own session to end,
    and refuses new connections meanwhile ("the database system is shutting down"); the API's pooled sessions
    are terminated, as a fast shutdown does, so every request has to connect anew."""
    env = keel_env(own_pg_url, own_redis.url, tmp_path / "data", KEEL_DB_POOL_TIMEOUT="2")
    api = await deployment.api("api", env)
    async with api_client(api) as http:
        tenant = await signup(http)
        async with connection(own_pg_url) as held:
            try:
                begin_smart_shutdown(own_pg)

                async def refusing() -> bool:
                    try:
                        await (await asyncpg.connect(own_pg_url.replace("+asyncpg", ""))).close()
                    except asyncpg.CannotConnectNowError:
                        return True
                    return False

                await eventually(refusing, within=10)
                await held.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'"
                )
                answers = [
                    await http.post(
                        "/v1/payments",
                        json={"amount": 1000 + i, "currency": "EUR", "payment_method": "pm_card_visa"},
                        headers=tenant.keyed(),
                    )
                    for i in range(4)
                ]
            finally:
                await held.close()
                await asyncio.to_thread(own_pg.stop, "fast")  # waits for the smart shutdown to finish
                await asyncio.to_thread(own_pg.start)
    for r in answers:
        assert "Traceback" not in r.text
    assert [r.status_code for r in answers] == [503] * len(answers), [(r.status_code, r.text) for r in answers]


# -- 3. the API SIGKILLed between commit and publish ----------------------------------------------------------


async def test_events_committed_by_an_api_killed_before_publishing_are_published_by_the_cron_sweep(
    pg_url: str, own_redis: RedisServer, deployment: Deployment, tmp_path: Path
) -> None:
    """The API reaches Redis through a proxy. While PATCHes are in flight the proxy starts swallowing the API's
    traffic, so each PATCH commits and then waits on Redis in the relay; the API is SIGKILLed as soon as every
    one has committed. None of their events was published: the profiles cached in Redis are stale and no
    webhook job exists. ``keel cron`` (through a worker) then sweeps the outbox."""
    data = tmp_path / "data"
    env = keel_env(pg_url, own_redis.url, data)
    with webhook_receiver() as receiver, tcp_proxy(own_redis.port) as proxy:
        # A Redis timeout long enough that the relay still waits when the API is killed.
        api = deployment.spawn_api("api", keel_env(pg_url, proxy.url(), data, KEEL_REDIS_TIMEOUT="3"))
        deployment.worker("worker-1", env)
        await deployment.ready(api)
        assert api.url is not None
        async with api_client(api) as http:
            tenant = await signup(http)
            endpoint_id = await endpoint(http, tenant, receiver.url, ["user.updated"])
            ids = [await create_user(http, tenant, f"User {i}") for i in range(4)]
        await worker_registered(own_redis.url, "worker-1")

        def renamer(user_id: str, i: int) -> RequestFn:
            """PATCH the user's name, then read the profile back (the answer recorded)."""

            async def rename(c: httpx.AsyncClient, n: int) -> httpx.Response:
                r = await c.patch(f"/v1/users/{user_id}", json={"name": f"User {i} v{n}"}, headers=tenant.headers)
                if r.status_code != 200:
                    return r
                return await c.get(f"/v1/users/{user_id}", headers=tenant.headers)

            return rename

        load = Load(api.url, within=30)
        for i, user_id in enumerate(ids):
            load.add(f"rename-{i}", renamer(user_id, i))
        load.start()
        try:
            await load.until(lambda: all(len(load.of(f"rename-{i}")) >= 5 for i in range(4)), "renames")
        finally:
            answers = await load.stop()
        for a in answers:
            assert a.status == 200, a
            assert a.json()["name"] == f"User {a.client.split('-')[1]} v{a.n}", a

        conn = redis.Redis.from_url(own_redis.url)
        keys = [NAMESPACE + user_key(uuid.UUID(tenant.id), uuid.UUID(u)) for u in ids]
        try:
            async with api_client(api) as http:
                # Every profile cached in Redis, as the last read left it.
                for user_id, key in zip(ids, keys, strict=True):
                    expect(await http.get(f"/v1/users/{user_id}", headers=tenant.headers), 200)
                    assert conn.exists(key)
                before = await sql(pg_url, "SELECT count(*) AS n FROM outbox WHERE published_at IS NULL")
                assert before[0]["n"] == 0

                proxy.blackholed.set()
                writes = [
                    asyncio.create_task(
                        http.patch(f"/v1/users/{u}", json={"name": f"Crash {i}"}, headers=tenant.headers)
                    )
                    for i, u in enumerate(ids)
                ]

                async def all_committed() -> list[Any]:
                    rows = await sql(
                        pg_url,
                        "SELECT id::text AS id, data->>'user_id' AS user_id FROM outbox "
                        "WHERE type = 'user.updated' AND published_at IS NULL",
                    )
                    return rows if len(rows) == len(ids) else []

                try:
                    pending = await eventually(all_committed, within=30, interval=0.02)
                finally:
                    killed = api.kill()
                results = await asyncio.gather(*writes, return_exceptions=True)
            assert len(killed) >= 2  # granian's server process and its worker
            # The last write to commit was still publishing when the process died.
            assert any(isinstance(r, httpx.TransportError) for r in results), results

            # The crash left committed data and unpublished events; nothing invalidated the cached profiles.
            assert {r["user_id"] for r in pending} == set(ids)
            names = await sql(pg_url, "SELECT id::text AS id, name FROM users WHERE id = ANY($1::uuid[])", ids)
            assert {r["id"]: r["name"] for r in names} == {u: f"Crash {i}" for i, u in enumerate(ids)}
            assert all(conn.exists(key) for key in keys)

            deployment.spawn("cron", env, "cron")
            fresh = deployment.spawn_api("api-2", env)  # starts meanwhile; read only after the sweep

            async def swept() -> bool:
                rows = await sql(pg_url, "SELECT count(*) AS n FROM outbox WHERE published_at IS NULL")
                return bool(rows[0]["n"] == 0)

            await eventually(swept, within=40, interval=0.2)
            # The sweep ran the invalidations the dead process owed.
            assert not any(conn.exists(key) for key in keys)
        finally:
            conn.close()

        await deployment.ready(fresh)
        async with api_client(fresh) as http:
            for i, user_id in enumerate(ids):
                profile = expect(await http.get(f"/v1/users/{user_id}", headers=tenant.headers), 200)
                assert profile["name"] == f"Crash {i}"

            # Every committed change's webhook was delivered: one succeeded delivery per user.updated event.
            events = await sql(pg_url, "SELECT id::text AS id FROM outbox WHERE type = 'user.updated'")
            event_ids = {e["id"] for e in events}
            crashed = {r["id"] for r in pending}
            assert crashed <= event_ids

            async def all_delivered() -> list[dict[str, Any]]:
                found = await deliveries(http, tenant, endpoint_id)
                done = {d["event_id"] for d in found if d["status"] == "succeeded"}
                return found if done == event_ids else []

            delivered = await eventually(all_delivered, within=40, interval=0.25)
        assert len(delivered) == len(event_ids)
        received = await asyncio.to_thread(receiver.wait_for, len(event_ids), 10)
        by_delivery = {d["id"]: d for d in delivered}
        renamed_by_crashed = set()
        for request in received:
            delivery = by_delivery[request.headers["webhook-id"]]
            payload = json.loads(request.body)
            assert payload["type"] == "user.updated"
            if delivery["event_id"] in crashed:
                renamed_by_crashed.add(payload["data"]["user_id"])
        assert renamed_by_crashed == set(ids)
        unpublished = await sql(pg_url, "SELECT count(*) AS n FROM outbox WHERE published_at IS NULL")
        assert unpublished[0]["n"] == 0


# -- 4. a webhook receiver that never answers ------------------------------------------------------------------


def scheduled_attempts(redis_url: str, delivery_id: str) -> list[tuple[Job, int]]:
    """The delivery's attempts waiting in RQ's scheduled registry of the ``high`` queue, with their scores (the
    whole second from which RQ's scheduler may move them onto the queue)."""
    conn = redis.Redis.from_url(redis_url)
    try:
        registry = ScheduledJobRegistry("high", connection=conn, serializer=JSONSerializer)
        found = []
        members = cast(list[tuple[bytes, float]], conn.zrange(registry.key, 0, -1, withscores=True))
        for job_id, score in members:
            job = Job.fetch(job_id.decode(), connection=conn, serializer=JSONSerializer)
            if job.meta.get("name") == DELIVER_JOB and job.args[1]["delivery_id"] == delivery_id:
                found.append((job, int(score)))
        return found
    finally:
        conn.close()


async def test_a_hanging_receiver_times_out_is_retried_and_the_worker_goes_on_with_other_jobs(
    pg_url: str, own_redis: RedisServer, deployment: Deployment, tmp_path: Path
) -> None:
    # A retry far enough away that it is still waiting in RQ when the test looks at it.
    env = keel_env(pg_url, own_redis.url, tmp_path / "data", KEEL_WEBHOOKS_RETRY_SCHEDULE="30")
    with hanging_receiver() as hanging, webhook_receiver() as healthy:
        api = deployment.spawn_api("api", env)
        worker = deployment.worker("worker-1", env)
        await deployment.ready(api)
        assert api.url is not None
        async with api_client(api) as http:
            tenant = await signup(http)
            stuck = await endpoint(http, tenant, hanging.url, ["user.created"])
            fine = await endpoint(http, tenant, healthy.url, ["user.updated"])
            await worker_registered(own_redis.url, "worker-1")

            load = Load(api.url, within=60)
            load.add("read", lambda c, n: c.get(f"/v1/users/{tenant.owner_id}", headers=tenant.headers), pause=0.1)
            load.add("endpoints", lambda c, n: c.get("/v1/webhook-endpoints", headers=tenant.headers), pause=0.1)
            load.start()
            try:
                user_id = await create_user(http, tenant, "Ada")
                await wait_for(lambda: hanging.count() >= 1, "the first attempt reaching the hanging receiver", 30)
                # A second event for the healthy endpoint, queued behind the attempt that hangs.
                expect(await http.patch(f"/v1/users/{user_id}", json={"name": "Ada L."}, headers=tenant.headers), 200)

                await asyncio.to_thread(healthy.wait_for, 1, 45)

                async def delivered() -> dict[str, Any]:
                    [d] = await deliveries(http, tenant, fine)
                    return d if d["status"] != "sending" else {}

                ok = await eventually(delivered, within=10)
                [hung] = await deliveries(http, tenant, stuck)
            finally:
                answers = await load.stop()

    # The healthy delivery went through as soon as the hanging attempt gave up, on the same single worker.
    assert (ok["status"], ok["attempt_count"], ok["last_status_code"]) == ("succeeded", 1, 200)
    assert hanging.header(0, "webhook-id") == hung["id"]
    # The hanging attempt timed out (the sender's 15 s, not an earlier failure), was recorded as failed ...
    assert (hung["status"], hung["attempt_count"], hung["last_status_code"]) == ("pending", 1, None), hung
    [first] = hung["attempts"]
    assert first["status_code"] is None
    assert first["error"] == "No response within 15s."
    assert first["latency_ms"] >= 14_900
    # ... and its retry is scheduled: the next attempt's job waits in RQ for the delivery's next_attempt_at.
    [(retry, score)] = scheduled_attempts(own_redis.url, hung["id"])
    next_attempt = datetime.fromisoformat(hung["next_attempt_at"])
    assert 20 <= (next_attempt - datetime.fromisoformat(hung["updated_at"])).total_seconds() <= 40
    assert abs(score - next_attempt.timestamp()) < 2
    assert retry.meta["tenant_id"] == tenant.id
    # The worker stayed healthy throughout, and the API answered every request of the load.
    assert worker.alive
    assert not errors_logged(worker), errors_logged(worker)[:3]
    assert answers
    assert all(a.status == 200 for a in answers), [a for a in answers if a.status != 200][:3]


async def test_a_webhook_retry_released_at_the_start_of_its_due_second_is_attempted(
    pg_url: str, own_redis: RedisServer, deployment: Deployment, tmp_path: Path
) -> None:
    """The test is the scheduler of the ``high`` queue: RQ's own ``RQScheduler``, holding that queue's lock, polled
    every 50 ms instead of every second. It moves a retry exactly when RQ's scheduler may, at the start of the
    second the retry is due in, which RQ's 1 s poll does whenever its phase falls before the fraction of that
    second. The receiver answers 500, so each attempt schedules the next one."""
    env = keel_env(pg_url, own_redis.url, tmp_path / "data", KEEL_WEBHOOKS_RETRY_SCHEDULE="1,1,1,1,1")
    conn = redis.Redis.from_url(own_redis.url)
    scheduler = RQScheduler(["high"], connection=conn, serializer=JSONSerializer)
    assert scheduler.acquire_locks() == {"high"}
    try:
        with webhook_receiver(then=Reply(500)) as receiver:
            api = deployment.spawn_api("api", env)
            deployment.worker("worker-1", env)
            await deployment.ready(api)
            async with api_client(api) as http:
                tenant = await signup(http)
                endpoint_id = await endpoint(http, tenant, receiver.url, ["user.created"])
                await create_user(http, tenant, "Ada")

                async def attempted_or_dropped() -> tuple[int, list[str]]:
                    scheduler.enqueue_scheduled_jobs()
                    skipped = [
                        f"job started {j.started_at:%H:%M:%S.%f}"
                        for j in rq_jobs(own_redis.url, DELIVER_JOB)
                        if j.get_status() == "finished" and j.return_value() == {"outcome": "skipped"}
                    ]
                    return len(receiver.received), skipped

                deadline = time.monotonic() + 30
                while True:
                    attempts, skipped = await attempted_or_dropped()
                    if attempts >= 5 or skipped or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.05)
                [delivery] = await deliveries(http, tenant, endpoint_id)
        assert not skipped, f"retries dropped ({skipped}); the delivery: {delivery}"
        assert attempts >= 5, delivery
    finally:
        scheduler.release_locks()
        conn.close()


# -- 5. a worker SIGKILLed in the middle of a capture -------------------------------------------------------------


async def test_a_capture_whose_worker_is_killed_mid_job_completes_on_retry_and_charges_once(
    pg_url: str, own_redis: RedisServer, deployment: Deployment, tmp_path: Path
) -> None:
    """The capture is caught after the provider charged and before the payment is marked: the test holds the
    payment's row lock, so the job's settling UPDATE waits on it. The worker (and its work horse) is then
    SIGKILLed; another worker retries the job, which asks the provider again under the same idempotency key."""
    env = keel_env(pg_url, own_redis.url, tmp_path / "data", KEEL_PAYMENTS_SANDBOX_LATENCY="0.5")
    api = await deployment.api("api", env)
    assert api.url is not None
    async with api_client(api) as http:
        tenant = await signup(http)
        r = await http.post(
            "/v1/payments",
            json={"amount": 4200, "currency": "EUR", "payment_method": "pm_card_visa"},
            headers=tenant.keyed(),
        )
        accepted = expect(r, 202)
        payment_id, job_id = accepted["payment"]["id"], accepted["job_id"]
        key = capture_key(uuid.UUID(payment_id))

        load = Load(api.url, within=90)
        load.add("read", lambda c, n: c.get(f"/v1/payments/{payment_id}", headers=tenant.headers), pause=0.05)
        load.add("list", lambda c, n: c.get("/v1/payments", headers=tenant.headers), pause=0.05)
        load.add("job", lambda c, n: c.get(f"/v1/jobs/{job_id}", headers=tenant.headers), pause=0.1)
        load.start()
        try:
            async with connection(pg_url) as lock:
                tx = lock.transaction()
                await tx.start()
                try:
                    await lock.execute("SELECT 1 FROM payments WHERE id = $1::uuid FOR UPDATE", payment_id)
                    first = deployment.worker("worker-1", env)

                    async def charged() -> list[Any]:
                        return await sql(
                            pg_url, "SELECT * FROM payments_sandbox_ledger WHERE idempotency_key = $1", key
                        )

                    await eventually(charged, within=60, interval=0.05)

                    async def settling_blocked() -> list[Any]:
                        return await sql(
                            pg_url,
                            "SELECT pid FROM pg_stat_activity "
                            "WHERE wait_event_type = 'Lock' AND query ILIKE 'UPDATE payments%'",
                        )

                    await eventually(settling_blocked, within=10, interval=0.05)
                    conn = redis.Redis.from_url(own_redis.url)
                    try:
                        job = Job.fetch(job_id, connection=conn, serializer=JSONSerializer)
                        assert job.get_status() == "started"
                        assert job.worker_name == "worker-1"
                    finally:
                        conn.close()
                    killed = first.kill()
                    assert len(killed) >= 2  # the worker and the work horse running the capture
                finally:
                    await tx.rollback()

            expire_scheduler_locks(own_redis.url)
            deployment.worker("worker-2", env)

            async def settled() -> dict[str, Any]:
                p = expect(await http.get(f"/v1/payments/{payment_id}", headers=tenant.headers), 200)
                j = expect(await http.get(f"/v1/jobs/{job_id}", headers=tenant.headers), 200)
                return {"payment": p, "job": j} if p["status"] != "pending" and j["status"] == "succeeded" else {}

            final = await eventually(settled, within=60, interval=0.2)
        finally:
            answers = await load.stop()

    assert final["payment"]["status"] == "succeeded", final
    assert final["job"]["attempts"] == 2, final["job"]
    assert answers
    assert all(a.status == 200 for a in answers), [a for a in answers if a.status != 200][:3]

    # One charge at the provider: one ledger row for the capture key, asked twice, with one answer.
    [charge] = await sql(pg_url, "SELECT * FROM payments_sandbox_ledger WHERE idempotency_key = $1", key)
    assert (charge["kind"], charge["outcome"], charge["amount"], charge["calls"]) == ("charge", "succeeded", 4200, 2)
    [payment] = await sql(pg_url, "SELECT status, provider_reference FROM payments WHERE id = $1::uuid", payment_id)
    assert (payment["status"], payment["provider_reference"]) == ("succeeded", charge["reference"])
    assert final["payment"]["provider_reference"] == charge["reference"]
    # One success, one event.
    events = await sql(
        pg_url,
        "SELECT type, count(*) AS n FROM outbox WHERE data->>'payment_id' = $1 GROUP BY type ORDER BY type",
        payment_id,
    )
    assert {e["type"]: e["n"] for e in events} == {"payment.created": 1, "payment.succeeded": 1}
