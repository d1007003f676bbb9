"""Analytics in the production topology, end to end: the API (in-process, on Postgres and Redis) answers
summaries from the Redis cache and puts rollups in RQ's ``low`` queue; an RQ worker with the runtime
``keel worker`` builds (a simple worker in burst mode, on this test's main thread) rolls the days up
into Postgres, invalidates the cached summaries, stores the request counts the API tallied in Redis,
and runs the nightly rollup of every tenant. The embedded default (SQLite, jobs in-process) runs the
same seeded rollup.

The payments, refunds and users are seeded as rows, with chosen creation times, so that every total is
known exactly: several currencies and statuses, on three closed days, the day before them, and today,
with rows on the first and the last microsecond of a day. The Postgres database runs in UTC+14, so a
day taken in the session's time zone instead of UTC would move the late rows to the next day.

Days are UTC days of the real clock (the worker builds its own container, on the system clock). A test
that starts within two minutes of midnight waits for it, so its days cannot move while it runs.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
import redis
from litestar import Litestar
from litestar.testing import AsyncTestClient
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer
from sqlalchemy import select
from sqlalchemy.engine import make_url

from keel.contexts.accounts.adapters.sql.models import UserRow
from keel.contexts.analytics.adapters.sql.models import DailyFigureRow, RolledUpDayRow
from keel.contexts.analytics.adapters.sql.repositories import SqlAnalyticsUnitOfWork
from keel.contexts.analytics.domain.model import Figure, Metric
from keel.contexts.analytics.domain.services import FLUSH_JOB, NIGHTLY_JOB, ROLLUP_JOB, rollup_job_id
from keel.contexts.payments.adapters.sql.models import PaymentRow, RefundRow
from keel.main.container import Container
from keel.main.worker import make_runtime
from keel.platform.adapters.jobs.in_process import InProcessJobQueue
from keel.platform.adapters.jobs.rq_queue import RqJobQueue
from keel.platform.adapters.sql.engine import create_engine, session_factory
from keel.platform.domain.jobs import LOW
from tests.support.app import client_for, finished_job, job, make_settings, signup
from tests.support.rq import run_rq_worker, runtime_installed, work_until
from tests.support.servers import PostgresServer, admin_sql
from tests.support.waiting import eventually

Client = AsyncTestClient[Litestar]
T = TypeVar("T")
FAR_EAST = "Pacific/Kiritimati"  # UTC+14: a session time zone as far from UTC as there is

# What is seeded, by days before today: (days ago, UTC time, currency, status, amount).
PAYMENTS = [
    (4, time(12), "EUR", "succeeded", 9999),  # the day before the rolled-up range
    (3, time(0), "EUR", "succeeded", 1000),  # the first microsecond of the day
    (3, time(8, 15), "EUR", "partially_refunded", 2500),
    (3, time(13), "EUR", "failed", 700),
    (3, time(23, 59, 59, 999_999), "USD", "succeeded", 1999),  # the last microsecond of the day
    (2, time(10), "JPY", "succeeded", 500),
    (2, time(11), "EUR", "refunded", 4000),
    (2, time(12), "EUR", "pending", 1500),
    (2, time(12, 30), "JPY", "succeeded", 250),
    (1, time(9), "GBP", "partially_refunded", 1234),
    (1, time(9, 30), "EUR", "succeeded", 6),
    (1, time(23), "EUR", "succeeded", 94),
    (0, time(0), "EUR", "succeeded", 3000),  # today: always live
]
REFUNDS = [
    (3, time(20), "EUR", "succeeded", 300),
    (2, time(11, 30), "EUR", "succeeded", 4000),
    (2, time(14), "USD", "failed", 100),
    (1, time(10), "GBP", "succeeded", 234),
    (1, time(23, 59, 59, 999_999), "EUR", "pending", 1),
    (0, time(0), "EUR", "succeeded", 50),
]
USERS = [(4, time(12)), (3, time(7)), (3, time(23, 30)), (2, time(0)), (0, time(0))]  # besides the owner

# The figures a rollup of the three closed days stores, worked out by hand from the rows above:
# (days ago, metric, currency, status, count, amount).
ROLLED_UP = {
    (3, "payments", "EUR", "succeeded", 1, 1000),
    (3, "payments", "EUR", "partially_refunded", 1, 2500),
    (3, "payments", "EUR", "failed", 1, 700),
    (3, "payments", "USD", "succeeded", 1, 1999),
    (3, "refunds", "EUR", "succeeded", 1, 300),
    (3, "new_users", "", "", 2, 0),
    (2, "payments", "JPY", "succeeded", 2, 750),
    (2, "payments", "EUR", "refunded", 1, 4000),
    (2, "payments", "EUR", "pending", 1, 1500),
    (2, "refunds", "EUR", "succeeded", 1, 4000),
    (2, "refunds", "USD", "failed", 1, 100),
    (2, "new_users", "", "", 1, 0),
    (1, "payments", "GBP", "partially_refunded", 1, 1234),
    (1, "payments", "EUR", "succeeded", 2, 100),
    (1, "refunds", "GBP", "succeeded", 1, 234),
    (1, "refunds", "EUR", "pending", 1, 1),
}
# What is computed live (never stored): the day before the range, and today with the owner of the signup.
LIVE = {
    (4, "payments", "EUR", "succeeded", 1, 9999),
    (4, "new_users", "", "", 1, 0),
    (0, "payments", "EUR", "succeeded", 1, 3000),
    (0, "refunds", "EUR", "succeeded", 1, 50),
    (0, "new_users", "", "", 2, 0),
}
# Another tenant's rows on the same days, which no figure of the first may include.
OTHER_PAYMENTS = [(3, time(12), "EUR", "succeeded", 77_777), (1, time(12), "EUR", "succeeded", 88_888)]
OTHER_USERS = [(2, time(12))]


# -- the clock, the rows, the figures ---------------------------------------------------------------


@pytest.fixture
async def today() -> date:
    """Today (UTC), waiting first for midnight if it is less than two minutes away."""
    now = datetime.now(UTC)
    left = (datetime.combine(now.date() + timedelta(days=1), time(0), UTC) - now).total_seconds()
    if left < 120:
        await asyncio.sleep(left + 1)
    return datetime.now(UTC).date()


def at(today: date, days_ago: int, moment: time) -> datetime:
    return datetime.combine(today - timedelta(days=days_ago), moment, UTC)


def iso(today: date, days_ago: int) -> str:
    return (today - timedelta(days=days_ago)).isoformat()


async def seed(
    url: str,
    tenant_id: str,
    today: date,
    payments: Iterable[tuple[int, time, str, str, int]] = PAYMENTS,
    refunds: Iterable[tuple[int, time, str, str, int]] = REFUNDS,
    users: Iterable[tuple[int, time]] = USERS,
) -> None:
    """Insert the rows as the payments and accounts contexts store them, created when the tables say."""
    tid = uuid.UUID(tenant_id)
    rows: list[Any] = []
    payment_ids = []
    for days_ago, moment, currency, status, amount in payments:
        created = at(today, days_ago, moment)
        payment_ids.append(uuid.uuid4())
        rows.append(
            PaymentRow(
                id=payment_ids[-1],
                tenant_id=tid,
                amount=amount,
                currency=currency,
                payment_method="pm_card_visa",
                description="seeded",
                customer_email=None,
                metadata_={},
                status=status,
                provider="sandbox",
                provider_reference=None,
                amount_refunded=0,
                amount_refunding=0,
                failure_reason=None,
                failure_message=None,
                version=1,
                created_at=created,
                updated_at=created,
            )
        )
    for i, (days_ago, moment, currency, status, amount) in enumerate(refunds):
        created = at(today, days_ago, moment)
        rows.append(
            RefundRow(
                id=uuid.uuid4(),
                tenant_id=tid,
                payment_id=payment_ids[i % len(payment_ids)],
                amount=amount,
                currency=currency,
                reason=None,
                status=status,
                provider_reference=None,
                failure_reason=None,
                failure_message=None,
                created_at=created,
                updated_at=created,
            )
        )
    for i, (days_ago, moment) in enumerate(users):
        created = at(today, days_ago, moment)
        rows.append(
            UserRow(
                id=uuid.uuid4(),
                tenant_id=tid,
                email=f"seeded{i}@{tenant_id}.test",
                name=f"Seeded {i}",
                role="member",
                avatar_url=None,
                created_at=created,
                updated_at=created,
            )
        )
    engine = create_engine(url)
    try:
        async with session_factory(engine)() as s:
            s.add_all(rows)
            await s.commit()
    finally:
        await engine.dispose()


async def stored(url: str, tenant_id: str, today: date) -> tuple[set[tuple[Any, ...]], set[int]]:
    """A tenant's stored figures (days ago, metric, currency, status, count, amount) and rolled-up days
    (days ago), read straight from the database."""
    tid = uuid.UUID(tenant_id)
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                select(
                    DailyFigureRow.day,
                    DailyFigureRow.metric,
                    DailyFigureRow.currency,
                    DailyFigureRow.status,
                    DailyFigureRow.count,
                    DailyFigureRow.amount,
                ).where(DailyFigureRow.tenant_id == tid)
            )
            figures = {((today - r[0]).days, r[1], r[2], r[3], r[4], r[5]) for r in rows}
            days = await conn.execute(select(RolledUpDayRow.day).where(RolledUpDayRow.tenant_id == tid))
            return figures, {(today - d).days for (d,) in days}
    finally:
        await engine.dispose()


def summary_days(figures: Iterable[tuple[Any, ...]], rolled: set[int], today: date, oldest: int) -> list[Any]:
    """What the summary lists for ``oldest`` days ago to today, given the figures: money entries as
    (currency, status, count, amount), sorted as the API sorts them."""
    by_day: dict[int, list[tuple[Any, ...]]] = defaultdict(list)
    for f in figures:
        by_day[f[0]].append(f)
    out = []
    for ago in range(oldest, -1, -1):
        fs = by_day[ago]
        out.append(
            {
                "date": iso(today, ago),
                "rolled_up": ago in rolled,
                "payments": sorted((c, s, n, a) for _, m, c, s, n, a in fs if m == "payments"),
                "refunds": sorted((c, s, n, a) for _, m, c, s, n, a in fs if m == "refunds"),
                "new_users": sum(n for _, m, _, _, n, _ in fs if m == "new_users"),
            }
        )
    return out


def shown(summary: dict[str, Any]) -> list[Any]:
    """The summary's days in the shape of ``summary_days`` (request counts aside: tested on their own)."""
    return [
        {
            "date": d["date"],
            "rolled_up": d["rolled_up"],
            "payments": [(m["currency"], m["status"], m["count"], m["amount"]) for m in d["payments"]],
            "refunds": [(m["currency"], m["status"], m["count"], m["amount"]) for m in d["refunds"]],
            "new_users": d["new_users"],
        }
        for d in summary["days"]
    ]


def container_of(client: Client) -> Container:
    return cast(Container, client.app.state["container"])


async def on_app(client: Client, fn: Callable[[], Awaitable[T]]) -> T:
    """Await ``fn()`` on the app's own event loop, where its engine, Redis client and counter live."""
    return await asyncio.to_thread(client.blocking_portal.call, fn)


async def summary(client: Client, tenant: dict[str, Any], **params: str) -> dict[str, Any]:
    r = await client.get("/v1/analytics/summary", params=params, headers=tenant["headers"])
    assert r.status_code == 200, r.text
    found: dict[str, Any] = r.json()
    return found


async def seeded_rollup_is_exact(
    client: Client, url: str, tenant: dict[str, Any], today: date, run: Callable[[str], Awaitable[dict[str, Any]]]
) -> None:
    """The flow both topologies run: a rollup of the three closed days, through ``run`` (the job's id ->
    the job once finished), stores exactly the seeded totals, and the summary reports them rolled up."""
    tenant_id = tenant["tenant"]["id"]
    span = {"from": iso(today, 4), "to": iso(today, 0)}
    live = await summary(client, tenant, **span)
    assert shown(live) == summary_days(ROLLED_UP | LIVE, set(), today, 4)

    r = await client.post(
        "/v1/analytics/rollups", json={"from": iso(today, 3), "to": iso(today, 1)}, headers=tenant["headers"]
    )
    assert r.status_code == 202, r.text
    assert r.headers["location"] == r.json()["status_url"] == f"/v1/jobs/{r.json()['job_id']}"
    done = await run(r.json()["job_id"])
    assert (done["type"], done["status"], done["result"]) == (ROLLUP_JOB, "succeeded", {"days": 3})

    assert await stored(url, tenant_id, today) == (ROLLED_UP, {1, 2, 3})
    rolled = await summary(client, tenant, **span)
    assert shown(rolled) == summary_days(ROLLED_UP | LIVE, {1, 2, 3}, today, 4)
    totals = rolled["totals"]
    assert [(m["currency"], m["status"], m["count"], m["amount"]) for m in totals["payments"]] == [
        ("EUR", "failed", 1, 700),
        ("EUR", "partially_refunded", 1, 2500),
        ("EUR", "pending", 1, 1500),
        ("EUR", "refunded", 1, 4000),
        ("EUR", "succeeded", 5, 1000 + 100 + 3000 + 9999),
        ("GBP", "partially_refunded", 1, 1234),
        ("JPY", "succeeded", 2, 750),
        ("USD", "succeeded", 1, 1999),
    ]
    assert [(m["currency"], m["status"], m["count"], m["amount"]) for m in totals["refunds"]] == [
        ("EUR", "pending", 1, 1),
        ("EUR", "succeeded", 3, 300 + 4000 + 50),
        ("GBP", "succeeded", 1, 234),
        ("USD", "failed", 1, 100),
    ]
    assert totals["new_users"] == 6
    assert {m["currency"]: m["amount_display"] for m in totals["payments"] if m["status"] == "succeeded"} == {
        "EUR": "140.99 EUR",
        "JPY": "750 JPY",
        "USD": "19.99 USD",
    }
    narrowed = await summary(client, tenant, **span, currency="jpy")
    assert [(m["currency"], m["count"], m["amount"]) for m in narrowed["totals"]["payments"]] == [("JPY", 2, 750)]
    assert (narrowed["totals"]["refunds"], narrowed["totals"]["new_users"]) == ([], 6)


# -- the production topology ------------------------------------------------------------------------


@dataclass
class Stack:
    client: Client
    connection: redis.Redis
    url: str  # the API's Postgres database, read and seeded directly by the tests
    tenant: dict[str, Any]

    @property
    def tenant_id(self) -> str:
        return str(self.tenant["tenant"]["id"])

    async def work_until(self, done: Callable[[], Awaitable[bool]], within: float = 20.0) -> None:
        await work_until(self.connection, done, within)

    async def finished(self, job_id: str, tenant: dict[str, Any] | None = None) -> dict[str, Any]:
        who = tenant or self.tenant

        async def ended() -> bool:
            return (await job(self.client, who, job_id))["status"] in ("succeeded", "failed", "canceled")

        await self.work_until(ended)
        return await job(self.client, who, job_id)

    def low_queue(self) -> list[str]:
        return list(Queue(LOW, connection=self.connection, serializer=JSONSerializer).job_ids)

    def summary_keys(self, tenant_id: str) -> list[bytes]:
        return list(self.connection.scan_iter(match=f"keel:cache:analytics:summary:*:{tenant_id}:*"))


@pytest.fixture
async def stack(pg: PostgresServer, pg_url: str, redis_url: str, tmp_path: Path, today: date) -> AsyncIterator[Stack]:
    """The API and the worker on one Postgres database and one Redis, with the tenant signed up (after
    ``today`` waited for midnight, if it had to)."""
    # Before anything connects, so that every session of the API and of the worker starts in it.
    await admin_sql(pg, f"ALTER DATABASE \"{make_url(pg_url).database}\" SET timezone TO '{FAR_EAST}'")
    settings = make_settings(pg_url, tmp_path, KEEL_REDIS_URL=redis_url)
    connection = redis.Redis.from_url(redis_url)
    try:
        # The worker side, as `keel worker` builds it, on the same settings.
        with runtime_installed(make_runtime(settings)):
            async with client_for(settings) as client:
                assert isinstance(container_of(client).jobs, RqJobQueue)
                tenant = await signup(client, "Acme", "owner@acme.test")
                yield Stack(client, connection, pg_url, tenant)
    finally:
        connection.close()


async def session_time_zone(url: str) -> str:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return str((await conn.exec_driver_sql("SHOW timezone")).scalar_one())
    finally:
        await engine.dispose()


async def test_a_rollup_on_the_worker_stores_exactly_the_seeded_totals(stack: Stack, today: date) -> None:
    assert await session_time_zone(stack.url) == FAR_EAST
    other = await signup(stack.client, "Globex", "owner@globex.test")
    await seed(stack.url, stack.tenant_id, today)
    await seed(stack.url, other["tenant"]["id"], today, OTHER_PAYMENTS, [], OTHER_USERS)

    async def on_the_worker(job_id: str) -> dict[str, Any]:
        # Nothing runs in the API process: the rollup waits in RQ's low queue.
        assert job_id in stack.low_queue()
        assert (await job(stack.client, stack.tenant, job_id))["status"] == "queued"
        return await stack.finished(job_id)

    await seeded_rollup_is_exact(stack.client, stack.url, stack.tenant, today, on_the_worker)
    # The other tenant's rows are in no figure of this one (checked above), and nothing of its own was rolled up.
    assert await stored(stack.url, other["tenant"]["id"], today) == (set(), set())

    # A closed day is read from its rollup: a row that appears without any event (a correction made in
    # the database, say) shows once the day is rolled up again, and the stored day is replaced, not added to.
    await seed(stack.url, stack.tenant_id, today, [(2, time(18), "JPY", "succeeded", 1)], [], [])
    before = await summary(stack.client, stack.tenant, **{"from": iso(today, 2), "to": iso(today, 2)})
    [jpy] = [m for m in before["days"][0]["payments"] if m["currency"] == "JPY"]
    assert jpy == {"currency": "JPY", "status": "succeeded", "count": 2, "amount": 750, "amount_display": "750 JPY"}
    r = await stack.client.post(
        "/v1/analytics/rollups", json={"from": iso(today, 2), "to": iso(today, 2)}, headers=stack.tenant["headers"]
    )
    assert r.status_code == 202, r.text
    assert (await stack.finished(r.json()["job_id"]))["result"] == {"days": 1}
    after = await summary(stack.client, stack.tenant, **{"from": iso(today, 2), "to": iso(today, 2)})
    [jpy] = [m for m in after["days"][0]["payments"] if m["currency"] == "JPY"]
    assert (jpy["count"], jpy["amount"]) == (3, 751)
    corrected = (ROLLED_UP - {(2, "payments", "JPY", "succeeded", 2, 750)}) | {
        (2, "payments", "JPY", "succeeded", 3, 751)
    }
    assert await stored(stack.url, stack.tenant_id, today) == (corrected, {1, 2, 3})


async def test_the_summary_cached_in_redis_is_invalidated_by_a_payment_the_worker_settles(
    stack: Stack, today: date
) -> None:
    past_span = {"from": iso(today, 3), "to": iso(today, 1)}
    current = await summary(stack.client, stack.tenant)
    past = await summary(stack.client, stack.tenant, **past_span)
    assert len(stack.summary_keys(stack.tenant_id)) == 2  # both cached in Redis
    assert await summary(stack.client, stack.tenant) == current  # generated_at included: from the cache
    assert current["totals"]["payments"] == []

    r = await stack.client.post(
        "/v1/payments",
        json={"amount": 4200, "currency": "usd", "payment_method": "pm_card_visa"},
        headers={**stack.tenant["headers"], "Idempotency-Key": "analytics-e2e"},
    )
    assert r.status_code == 202, r.text
    payment_id = r.json()["payment"]["id"]
    # payment.created, published by the API as it committed, replaced today's summaries already.
    pending = await summary(stack.client, stack.tenant)
    assert [(m["status"], m["amount"]) for m in pending["totals"]["payments"]] == [("pending", 4200)]
    assert await summary(stack.client, stack.tenant) == pending

    async def captured() -> bool:
        r = await stack.client.get(f"/v1/payments/{payment_id}", headers=stack.tenant["headers"])
        return bool(r.json()["status"] == "succeeded")

    await stack.work_until(captured)
    # The worker's payment.succeeded replaced the generation in Redis: the API recomputes at once.
    settled = await summary(stack.client, stack.tenant)
    assert settled["totals"]["payments"] == [
        {"currency": "USD", "status": "succeeded", "count": 1, "amount": 4200, "amount_display": "42.00 USD"}
    ]
    assert datetime.fromisoformat(settled["generated_at"]) > datetime.fromisoformat(pending["generated_at"])
    # Past days were not touched by today's payment: still the cached summary.
    assert await summary(stack.client, stack.tenant, **past_span) == past


async def test_request_counts_travel_from_the_api_through_redis_to_the_flush_job(stack: Stack, today: date) -> None:
    other = await signup(stack.client, "Globex", "owner@globex.test")
    for _ in range(6):
        assert (await stack.client.get("/v1/tenant", headers=stack.tenant["headers"])).status_code == 200
    for _ in range(4):
        assert (await stack.client.get("/v1/users", headers=other["headers"])).status_code == 200
    container = container_of(stack.client)
    await on_app(stack.client, container.request_counter.flush)
    # The API process added its counts to the tally every API process shares.
    running = stack.connection.hgetall("keel:analytics:requests")
    assert running == {
        f"{stack.tenant_id}|{today.isoformat()}".encode(): b"6",
        f"{other['tenant']['id']}|{today.isoformat()}".encode(): b"4",
    }

    # The periodic flush, as `keel cron` would enqueue it, run by the worker.
    job_id = await on_app(stack.client, lambda: container.jobs.enqueue(FLUSH_JOB, {}))
    run_rq_worker(stack.connection)
    assert stack.connection.exists("keel:analytics:requests", "keel:analytics:requests:claimed") == 0
    s = await summary(stack.client, stack.tenant)
    assert (s["days"][-1]["api_requests"], s["totals"]["api_requests"]) == (6, 6)
    assert (await summary(stack.client, other))["totals"]["api_requests"] == 4
    done = Job.fetch(job_id, connection=stack.connection, serializer=JSONSerializer)
    assert (done.get_status(), done.return_value()) == ("finished", {"requests": 10})


async def test_the_nightly_job_rolls_up_the_last_two_closed_days_of_every_tenant(stack: Stack, today: date) -> None:
    other = await signup(stack.client, "Globex", "owner@globex.test")
    idle = await signup(stack.client, "Initech", "owner@initech.test")
    await seed(stack.url, stack.tenant_id, today)
    await seed(stack.url, other["tenant"]["id"], today, OTHER_PAYMENTS, [], OTHER_USERS)
    container = container_of(stack.client)

    nightly = await on_app(stack.client, lambda: container.jobs.enqueue(NIGHTLY_JOB, {}, job_id="nightly-e2e"))
    tenants = [stack.tenant, other, idle]
    jobs = {t["tenant"]["id"]: rollup_job_id("nightly", uuid.UUID(t["tenant"]["id"]), today) for t in tenants}

    async def all_rolled_up() -> bool:
        for t in tenants:
            r = await stack.client.get(f"/v1/jobs/{jobs[t['tenant']['id']]}", headers=t["headers"])
            if r.status_code != 200 or r.json()["status"] != "succeeded":
                return False
        return True

    await stack.work_until(all_rolled_up)
    assert Job.fetch(nightly, connection=stack.connection, serializer=JSONSerializer).return_value() == {"tenants": 3}
    for t in tenants:
        done = await job(stack.client, t, jobs[t["tenant"]["id"]])
        assert (done["type"], done["result"]) == (ROLLUP_JOB, {"days": 2})

    assert await stored(stack.url, stack.tenant_id, today) == ({f for f in ROLLED_UP if f[0] <= 2}, {1, 2})
    assert await stored(stack.url, other["tenant"]["id"], today) == (
        {(2, "new_users", "", "", 1, 0), (1, "payments", "EUR", "succeeded", 1, 88_888)},
        {1, 2},
    )
    assert await stored(stack.url, idle["tenant"]["id"], today) == (set(), {1, 2})
    s = await summary(stack.client, stack.tenant, **{"from": iso(today, 4)})
    assert shown(s) == summary_days(ROLLED_UP | LIVE, {1, 2}, today, 4)


async def test_two_rollups_of_the_same_day_at_once_both_succeed(pg_url: str) -> None:
    """Two workers rolling up one day at once (the nightly run and a late change's re-rollup, or two
    requested rollups that overlap): the second waits for the first's transaction, then replaces its
    figures. Driven at the repository, where the order of the two transactions can be fixed: the second
    is let go only once Postgres shows it waiting on a lock the first holds."""
    engine = create_engine(pg_url)
    sessions = session_factory(engine)
    tenant_id, day, now = uuid.uuid4(), date(2026, 1, 1), datetime.now(UTC)

    def figures(n: int) -> list[Figure]:
        return [
            Figure(day=day, metric=Metric.PAYMENTS, currency="EUR", status="succeeded", count=n, amount=100 * n),
            Figure(day=day, metric=Metric.NEW_USERS, count=n),
        ]

    async def replace(n: int) -> None:
        async with SqlAnalyticsUnitOfWork(sessions) as uow:
            await uow.rollups.replace_day(tenant_id, day, figures(n), now)
            await uow.commit()

    async def waiting_on_a_lock() -> bool:
        async with engine.connect() as conn:
            stmt = (
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            return bool((await conn.exec_driver_sql(stmt)).scalar_one())

    try:
        await replace(1)  # an earlier rollup of the day
        first = SqlAnalyticsUnitOfWork(sessions)
        await first.__aenter__()
        try:
            await first.rollups.replace_day(tenant_id, day, figures(2), now)
            second = asyncio.create_task(replace(3))
            await eventually(waiting_on_a_lock)
            await first.commit()
        finally:
            await first.__aexit__(None, None, None)
        await second
        async with engine.connect() as conn:
            rows = await conn.execute(
                select(DailyFigureRow.metric, DailyFigureRow.count).where(DailyFigureRow.tenant_id == tenant_id)
            )
            assert sorted(tuple(r) for r in rows) == [("new_users", 3), ("payments", 3)]
    finally:
        await engine.dispose()


# -- the embedded default ---------------------------------------------------------------------------


async def test_the_embedded_default_runs_the_same_seeded_rollup_and_nightly_in_process(
    sqlite_url: str, tmp_path: Path, today: date
) -> None:
    async with client_for(make_settings(sqlite_url, tmp_path)) as client:
        container = container_of(client)
        assert isinstance(container.jobs, InProcessJobQueue)
        tenant = await signup(client, "Acme", "owner@acme.test")
        other = await signup(client, "Globex", "owner@globex.test")
        await seed(sqlite_url, tenant["tenant"]["id"], today)
        await seed(sqlite_url, other["tenant"]["id"], today, OTHER_PAYMENTS, [], OTHER_USERS)

        async def in_process(job_id: str) -> dict[str, Any]:
            return await finished_job(client, tenant, job_id)

        await seeded_rollup_is_exact(client, sqlite_url, tenant, today, in_process)
        assert await stored(sqlite_url, other["tenant"]["id"], today) == (set(), set())

        # The nightly run in-process: the other tenant's last two closed days.
        nightly = await on_app(client, lambda: container.jobs.enqueue(NIGHTLY_JOB, {}))

        async def nightly_done() -> Any:
            info = await on_app(client, lambda: container.jobs.get(nightly))
            return info if info is not None and info.status.is_final else None

        assert (await eventually(nightly_done)).result == {"tenants": 2}
        done = await finished_job(client, other, rollup_job_id("nightly", uuid.UUID(other["tenant"]["id"]), today))
        assert (done["status"], done["result"]) == ("succeeded", {"days": 2})
        assert await stored(sqlite_url, other["tenant"]["id"], today) == (
            {(2, "new_users", "", "", 1, 0), (1, "payments", "EUR", "succeeded", 1, 88_888)},
            {1, 2},
        )
        await finished_job(client, tenant, rollup_job_id("nightly", uuid.UUID(tenant["tenant"]["id"]), today))
        assert await stored(sqlite_url, tenant["tenant"]["id"], today) == (ROLLED_UP, {1, 2, 3})
