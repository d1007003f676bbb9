"""Analytics summary benchmark: ``GET /v1/analytics/summary`` over 90 days of a tenant with 100,000 payments.

Everything runs on 127.0.0.1 against throwaway servers: a Postgres and a Redis (tests/support/servers.py),
the real API in production configuration (``keel serve``: granian, Postgres, Redis, log level WARNING) and
``keel worker --simple`` as subprocesses. The rollup goes through the API as a client would: ``POST
/v1/analytics/rollups`` hands it to the worker, and the benchmark polls ``GET /v1/jobs/{id}``. ``keel cron``
is not started, so no periodic request-count flush replaces the tenant's live generation mid-run: warm figures
are pure cache hits (in production a flush every 60 s makes ranges that include today miss once a minute).

Ten tenants are signed up through the API; their payments, refunds and users are then written in bulk with
SQLAlchemy Core through the SQL models (no events: the figures are what the summary must find), and the
tables are ANALYZEd. Requests are sequential, from this process, with httpx:

- cold: before each request the tenant's cache generations (``caching.generation_key``) are deleted from
  Redis, so the summary is recomputed (from rollups where they exist, live from payments and users otherwise);
- warm: identical repeated requests after one priming request (cache hits).

Each response's ``generated_at`` shows whether it was recomputed: every cold one must be new, every warm
one the primed one; the totals are checked once per data state against what was seeded. With one client
sending one request at a time, req/s is 1000 / mean latency (the client's own JSON parsing left out).
``--explain`` prints the plan of the payments ``daily_totals`` query, as the repository sends it.

    uv run --no-sync python -m tests.benchmarks.analytics [--payments 100000] [--days 90] [--cold 30] [--warm 300]
        [--explain] [--max-seconds 300]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from redis.asyncio import Redis
from sqlalchemy import event, insert, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from keel.contexts.accounts.adapters.sql.models import UserRow
from keel.contexts.analytics.domain.caching import generation_key
from keel.contexts.analytics.domain.model import day_start
from keel.contexts.payments.adapters.sql.models import PaymentRow, RefundRow
from keel.contexts.payments.adapters.sql.repositories import SqlPaymentRepository
from keel.main import db
from keel.main.logging import configure_logging
from tests.support.servers import PostgresServer, admin_sql, free_port, postgres_server, redis_server

DATABASE = "keel_bench"
OTHER_TENANTS = 9
CURRENCIES = [("USD", 50), ("EUR", 30), ("GBP", 15), ("JPY", 5)]
STATUSES = [("succeeded", 70), ("failed", 10), ("pending", 5), ("partially_refunded", 5), ("refunded", 10)]
BATCH = 5000  # rows per executemany: large enough to amortise round trips, small enough for asyncpg's limits
RANGE_DAYS = 90  # the measured range: today-89 .. today


class OutOfTime(RuntimeError):
    pass


# -- processes ----------------------------------------------------------------------------------


@dataclass
class Keel:
    """The API and a worker as subprocesses, each in its own process group (granian forks its workers)."""

    env: dict[str, str]
    logs: Path
    base_url: str
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def spawn(self, name: str, *args: str) -> None:
        log = (self.logs / f"{name}.log").open("wb")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "keel.main.cli", *args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def check_alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"keel {name} exited with {p.returncode}; its log:\n{self.tail()}")

    def tail(self) -> str:
        out = []
        for log in sorted(self.logs.glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-20:]
            out.append(f"--- {log.name} ---\n" + "\n".join(lines))
        return "\n".join(out)

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        # Granian's workers are in the server's group; one that outlived its parent is ended here.
        for p in self.procs.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
        self.procs.clear()


@contextlib.contextmanager
def keel(database_url: str, redis_url: str) -> Iterator[Keel]:
    base = Path(tempfile.mkdtemp(prefix="keel-bench-"))
    port = free_port()
    env = {
        **os.environ,
        "KEEL_DATABASE_URL": database_url,
        "KEEL_REDIS_URL": redis_url,
        "KEEL_DATA_DIR": str(base / "data"),
        "KEEL_HOST": "127.0.0.1",
        "KEEL_PORT": str(port),
        "KEEL_LOG_LEVEL": "WARNING",
        "KEEL_LOG_JSON": "true",
        "KEEL_MIGRATE_ON_START": "false",
        # One client sends hundreds of requests a minute; the limiter is not what is measured.
        "KEEL_RATE_LIMIT_PER_MINUTE": "1000000",
        "KEEL_SIGNUP_RATE_LIMIT_PER_HOUR": "1000000",
    }
    procs = Keel(env=env, logs=base, base_url=f"http://127.0.0.1:{port}")
    try:
        procs.spawn("serve", "serve")
        procs.spawn("worker", "worker", "--simple")
        yield procs
    finally:
        procs.stop()
        shutil.rmtree(base, ignore_errors=True)


async def wait_ready(client: httpx.AsyncClient, procs: Keel, within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    while True:
        procs.check_alive()
        with contextlib.suppress(httpx.TransportError):
            if (await client.get("/healthz")).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the API did not become ready within {within:.0f} s:\n{procs.tail()}")
        await asyncio.sleep(0.1)


# -- seeding ------------------------------------------------------------------------------------


@dataclass
class Seeded:
    """What was written for one tenant, per UTC day: the figures a correct summary must report."""

    payments: Counter[date] = field(default_factory=Counter)
    refunds: Counter[date] = field(default_factory=Counter)
    users: Counter[date] = field(default_factory=Counter)

    def total(self, counter: Counter[date], start: date, end: date) -> int:
        return sum(n for d, n in counter.items() if start <= d <= end)


def _weighted(rng: random.Random, choices: list[tuple[str, int]]) -> str:
    return rng.choices([c for c, _ in choices], weights=[w for _, w in choices])[0]


def _instant(rng: random.Random, day: date, now: datetime) -> datetime:
    """A random instant of ``day`` (UTC), never after ``now``."""
    start = datetime.combine(day, datetime.min.time(), tzinfo=UTC)
    span = min(86400.0, (now - start).total_seconds())
    return start + timedelta(seconds=rng.uniform(0, max(span - 1e-3, 0.0)))


def generate(
    rng: random.Random, tenant_id: uuid.UUID, payments: int, users: int, days: int, now: datetime, seeded: Seeded
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """``payments`` over the ``days`` closed days before today plus 1% more today; refunds for the
    refunded ones and a few pending or failed; ``users`` over the same days."""
    today = now.date()
    closed = [today - timedelta(days=i) for i in range(1, days + 1)]
    payment_rows, refund_rows, user_rows = [], [], []
    days_of_payments = [rng.choice(closed) for _ in range(payments)] + [today] * max(1, payments // 100)
    for day in days_of_payments:
        created = _instant(rng, day, now)
        currency = _weighted(rng, CURRENCIES)
        status = _weighted(rng, STATUSES)
        amount = rng.randint(100, 50_000)
        refunded = {"refunded": amount, "partially_refunded": amount // 3}.get(status, 0)
        refund_status = "succeeded" if refunded else None
        if status == "succeeded" and rng.random() < 0.03:
            refund_status, refunded = rng.choice(["pending", "failed"]), amount // 2
        payment_id = uuid.uuid4()
        payment_rows.append(
            {
                "id": payment_id,
                "tenant_id": tenant_id,
                "amount": amount,
                "currency": currency,
                "payment_method": "pm_card_visa",
                "description": "Benchmark order",
                "customer_email": None,
                "metadata_": {},
                "status": status,
                "provider": "sandbox",
                "provider_reference": None if status == "pending" else f"sb_{payment_id.hex[:24]}",
                "amount_refunded": refunded if refund_status == "succeeded" else 0,
                "amount_refunding": refunded if refund_status == "pending" else 0,
                "failure_reason": "card_declined" if status == "failed" else None,
                "failure_message": "Declined" if status == "failed" else None,
                "version": 1,
                "created_at": created,
                "updated_at": created,
            }
        )
        seeded.payments[day] += 1
        if refund_status is not None:
            refund_at = min(created + timedelta(hours=rng.uniform(0, 72)), now - timedelta(milliseconds=1))
            refund_at = max(refund_at, created)
            refund_rows.append(
                {
                    "id": uuid.uuid4(),
                    "tenant_id": tenant_id,
                    "payment_id": payment_id,
                    "amount": refunded,
                    "currency": currency,
                    "reason": "requested_by_customer",
                    "status": refund_status,
                    "provider_reference": None,
                    "failure_reason": None,
                    "failure_message": None,
                    "created_at": refund_at,
                    "updated_at": refund_at,
                }
            )
            seeded.refunds[refund_at.date()] += 1
    for i in range(users):
        day = rng.choice(closed)
        created = _instant(rng, day, now)
        user_rows.append(
            {
                "id": uuid.uuid4(),
                "tenant_id": tenant_id,
                "email": f"user{i}@bench.test",
                "name": f"User {i}",
                "role": "member",
                "avatar_url": None,
                "created_at": created,
                "updated_at": created,
            }
        )
        seeded.users[day] += 1
    return payment_rows, refund_rows, user_rows


DbRow = dict[str, Any]


async def bulk_insert(engine: AsyncEngine, model: Any, rows: list[dict[str, Any]]) -> None:
    table = model.__table__
    # Core executemany takes column names, not attribute names (``metadata_`` is column ``metadata``).
    renames = {attr.key: attr.columns[0].name for attr in model.__mapper__.column_attrs}
    async with engine.begin() as conn:
        for i in range(0, len(rows), BATCH):
            batch = [{renames[k]: v for k, v in r.items()} for r in rows[i : i + BATCH]]
            await conn.execute(insert(table), batch)


async def store_and_analyze(
    engine: AsyncEngine, users: list[DbRow], payments: list[DbRow], refunds: list[DbRow]
) -> None:
    """Bulk-insert seeded rows, then ANALYZE so the planner sees the seeded sizes."""
    await bulk_insert(engine, UserRow, users)
    await bulk_insert(engine, PaymentRow, payments)
    await bulk_insert(engine, RefundRow, refunds)
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.execute(text("ANALYZE"))


async def seed(
    engine: AsyncEngine, tenants: list[uuid.UUID], payments: int, other_payments: int, days: int, now: datetime
) -> Seeded:
    rng = random.Random(20261124)
    target = Seeded()
    all_payments, all_refunds, all_users = [], [], []
    for i, tenant_id in enumerate(tenants):
        p, r, u = generate(
            rng,
            tenant_id,
            payments if i == 0 else other_payments,
            2000 if i == 0 else 100,
            days,
            now,
            target if i == 0 else Seeded(),
        )
        all_payments += p
        all_refunds += r
        all_users += u
    await store_and_analyze(engine, all_users, all_payments, all_refunds)
    print(
        f"Seeded {len(all_payments):,} payments, {len(all_refunds):,} refunds, {len(all_users):,} users over "
        f"{len(tenants)} tenants; the measured tenant has {sum(target.payments.values()):,} payments "
        f"({target.payments[now.date()]:,} today), {sum(target.refunds.values()):,} refunds, "
        f"{sum(target.users.values()):,} seeded users."
    )
    return target


# -- measuring ----------------------------------------------------------------------------------


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


@dataclass
class Row:
    scenario: str
    kind: str
    latencies_ms: list[float]
    recomputed: int

    def markdown(self) -> str:
        ms = self.latencies_ms
        # One client, one request at a time: what the server sustains is the inverse of the mean latency.
        rate = f"{1000 * len(ms) / sum(ms):.0f}" if self.kind == "warm" else "-"
        return (
            f"| {self.scenario} | {self.kind} | {len(ms)} | {_pct(ms, 50):.1f} | {_pct(ms, 90):.1f} | "
            f"{_pct(ms, 99):.1f} | {max(ms):.1f} | {rate} | {self.recomputed}/{len(ms)} |"
        )


@dataclass
class Bench:
    client: httpx.AsyncClient
    redis: Redis
    headers: dict[str, str]
    tenant_id: uuid.UUID
    deadline: float
    rows: list[Row] = field(default_factory=list)

    def _check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise OutOfTime("the benchmark's time budget ran out; lower --cold/--warm or --payments")

    async def summary(self, start: date, end: date) -> tuple[float, dict[str, Any]]:
        params = {"from": start.isoformat(), "to": end.isoformat()}
        began = time.perf_counter()
        r = await self.client.get("/v1/analytics/summary", params=params, headers=self.headers)
        elapsed_ms = (time.perf_counter() - began) * 1000
        if r.status_code != 200:
            raise RuntimeError(f"GET /v1/analytics/summary answered {r.status_code}: {r.text[:500]}")
        body: dict[str, Any] = r.json()
        return elapsed_ms, body

    async def forget(self) -> None:
        await self.redis.delete(*(generation_key(self.tenant_id, s) for s in ("live", "history")))

    async def cold(self, scenario: str, start: date, end: date, n: int) -> dict[str, Any]:
        latencies, seen = [], set()
        body: dict[str, Any] = {}
        for _ in range(n):
            self._check_time()
            await self.forget()
            ms, body = await self.summary(start, end)
            latencies.append(ms)
            seen.add(body["generated_at"])
        self.rows.append(Row(scenario, "cold", latencies, len(seen)))
        if len(seen) != n:
            raise RuntimeError(f"{scenario}: {n - len(seen)} cold requests were served from the cache")
        return body

    async def warm(self, scenario: str, start: date, end: date, n: int) -> None:
        _, primed = await self.summary(start, end)
        latencies, recomputed = [], 0
        for _ in range(n):
            self._check_time()
            ms, body = await self.summary(start, end)
            latencies.append(ms)
            recomputed += body["generated_at"] != primed["generated_at"]
        self.rows.append(Row(scenario, "warm", latencies, recomputed))

    async def rollup(self, start: date, end: date) -> dict[str, Any]:
        r = await self.client.post(
            "/v1/analytics/rollups", json={"from": start.isoformat(), "to": end.isoformat()}, headers=self.headers
        )
        if r.status_code != 202:
            raise RuntimeError(f"POST /v1/analytics/rollups answered {r.status_code}: {r.text[:500]}")
        status_url = r.json()["status_url"]
        while True:
            self._check_time()
            job: dict[str, Any] = (await self.client.get(status_url, headers=self.headers)).json()
            if job["status"] in ("succeeded", "failed", "canceled"):
                if job["status"] != "succeeded":
                    raise RuntimeError(f"the rollup job ended {job['status']}: {job.get('error')}")
                return job
            await asyncio.sleep(0.05)


def verify(label: str, body: dict[str, Any], seeded: Seeded, start: date, end: date, owner_day: date) -> None:
    totals = body["totals"]
    got = (
        sum(m["count"] for m in totals["payments"]),
        sum(m["count"] for m in totals["refunds"]),
        totals["new_users"],
    )
    owner = 1 if start <= owner_day <= end else 0  # the owner signed up through the API
    want = (
        seeded.total(seeded.payments, start, end),
        seeded.total(seeded.refunds, start, end),
        seeded.total(seeded.users, start, end) + owner,
    )
    rolled = sum(d["rolled_up"] for d in body["days"])
    verdict = "OK" if got == want else "MISMATCH"
    print(
        f"  {label} {start}..{end}: payments {got[0]:,} (seeded {want[0]:,}), refunds {got[1]:,} "
        f"(seeded {want[1]:,}), new users {got[2]:,} (seeded {want[2]:,}); {rolled} of {len(body['days'])} "
        f"days rolled up: {verdict}"
    )
    if got != want:
        raise RuntimeError(f"{label}: the summary's totals {got} differ from the seeded {want}")


async def explain(engine: AsyncEngine, tenant_id: uuid.UUID, start: date, end: date) -> None:
    """EXPLAIN ANALYZE of the statement the payments repository's ``daily_totals`` sends (captured, not
    copied, so the plan is that of the code under measurement)."""
    sent: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        sent.append((statement, parameters))

    event.listen(engine.sync_engine, "before_cursor_execute", capture)
    try:
        async with AsyncSession(engine) as session:
            await SqlPaymentRepository(session).daily_totals(tenant_id, day_start(start), day_start(end))
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", capture)
    statement, parameters = sent[-1]
    async with engine.connect() as conn:
        plan = await conn.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS) " + statement, parameters)
        print(f"EXPLAIN ANALYZE of payments daily_totals, {start}..{end} (exclusive), measured tenant:")
        print("\n".join(f"    {line}" for (line,) in plan))


# -- the run ------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def engine_for(url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(url)
    try:
        yield engine
    finally:
        await engine.dispose()


async def signup(client: httpx.AsyncClient, i: int) -> tuple[uuid.UUID, dict[str, str]]:
    r = await client.post(
        "/v1/signup",
        json={"organization": f"Bench {i}", "owner_email": f"owner{i}@bench.test", "owner_name": "Owner"},
    )
    if r.status_code != 201:
        raise RuntimeError(f"signup answered {r.status_code}: {r.text[:500]}")
    body = r.json()
    return uuid.UUID(body["tenant"]["id"]), {"Authorization": f"Bearer {body['api_key']['token']}"}


async def facts(engine: AsyncEngine, redis: Redis) -> None:
    async with engine.connect() as conn:
        pg_version = (await conn.execute(text("SHOW server_version"))).scalar_one()
    redis_version = (await redis.info("server"))["redis_version"]
    from importlib.metadata import version

    print(
        f"Machine: {os.cpu_count()} cores, {platform.machine()}, {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}; PostgreSQL {pg_version} (fsync off); Redis {redis_version}; "
        f"granian {version('granian')} (1 worker); all on 127.0.0.1"
    )


async def run(args: argparse.Namespace, pg: PostgresServer, redis_url: str, started: float) -> None:
    deadline = started + args.max_seconds
    await admin_sql(pg, f'CREATE DATABASE "{DATABASE}"')
    url = pg.url(DATABASE)
    db.upgrade(url)
    with keel(url, redis_url) as procs:
        async with (
            engine_for(url) as engine,
            httpx.AsyncClient(base_url=procs.base_url, timeout=60) as client,
        ):
            redis = Redis.from_url(redis_url)
            try:
                await facts(engine, redis)
                await wait_ready(client, procs)
                tenants = [await signup(client, i) for i in range(1 + OTHER_TENANTS)]
                now = datetime.now(UTC)
                today = now.date()
                t0 = time.perf_counter()
                seeded = await seed(engine, [t for t, _ in tenants], args.payments, args.other, args.days, now)
                print(f"  seeding and ANALYZE took {time.perf_counter() - t0:.1f} s")
                tenant_id, headers = tenants[0]
                bench = Bench(client, redis, headers, tenant_id, deadline)
                start, yesterday = today - timedelta(days=RANGE_DAYS - 1), today - timedelta(days=1)
                if args.explain:
                    await explain(engine, tenant_id, start, today + timedelta(days=1))

                body = await bench.cold("90 days to today, no rollups", start, today, args.cold)
                verify("no rollups:", body, seeded, start, today, today)
                await bench.warm("90 days to today, no rollups", start, today, args.warm)

                t0 = time.perf_counter()
                job = await bench.rollup(start, yesterday)
                print(f"  rollup of {start}..{yesterday}: {job['result']} in {time.perf_counter() - t0:.1f} s")

                body = await bench.cold("90 days to today, rolled up", start, today, args.cold)
                verify("rolled up: ", body, seeded, start, today, today)
                await bench.warm("90 days to today, rolled up", start, today, args.warm)
                body = await bench.cold("89 days to yesterday, rolled up", start, yesterday, args.cold)
                verify("rolled up: ", body, seeded, start, yesterday, today)
                await bench.warm("89 days to yesterday, rolled up", start, yesterday, args.warm)
                procs.check_alive()
                if datetime.now(UTC).date() != today:
                    print("  warning: the UTC day changed during the run; figures span midnight")
            finally:
                await redis.aclose()
    print()
    print(
        "| scenario | cache | requests | p50 ms | p90 ms | p99 ms | max ms | req/s (1 client) | recomputed |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    for row in bench.rows:
        print(row.markdown())
    print()
    print(f"Total run time {time.monotonic() - started:.0f} s.")


def main(argv: Any = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--payments", type=int, default=100_000, help="payments of the measured tenant (closed days)")
    parser.add_argument("--other", type=int, default=3000, help="payments of each of the 9 other tenants")
    parser.add_argument("--days", type=int, default=90, help="closed days the payments are spread over")
    parser.add_argument("--cold", type=int, default=30, help="cache-miss requests per scenario")
    parser.add_argument("--warm", type=int, default=300, help="cache-hit requests per scenario")
    parser.add_argument("--explain", action="store_true", help="print the plan of the payments daily_totals query")
    parser.add_argument("--max-seconds", type=float, default=300, help="give up after this long")
    args = parser.parse_args(argv)
    configure_logging("WARNING", json=True)
    started = time.monotonic()

    def out_of_time(signum: int, frame: Any) -> None:
        raise OutOfTime(f"no result after {args.max_seconds + 30:.0f} s")

    # A hung request or server start stops the run too; the finally blocks still end every process.
    signal.signal(signal.SIGALRM, out_of_time)
    signal.alarm(int(args.max_seconds) + 30)
    try:
        print(
            f"Analytics summary, GET /v1/analytics/summary over {RANGE_DAYS} days: {args.payments:,} payments over "
            f"{args.days} closed days (+1% today) for one tenant, {OTHER_TENANTS} other tenants with "
            f"{args.other:,} each; sequential requests from one client."
        )
        with postgres_server() as pg, redis_server() as redis:
            asyncio.run(run(args, pg, redis.url, started))
    finally:
        signal.alarm(0)


if __name__ == "__main__":
    main()
