"""HTTP load benchmark: Keel under ``wrk`` against the framework ceiling.

Everything runs on 127.0.0.1 against throwaway servers, and every process started here is ended in
``finally`` blocks, on errors and on the time limit too:

- a Postgres and a Redis (tests/support/servers.py); the database is migrated, ten tenants sign up through
  the API (each signup returns the tenant's API key), then 10,000 users per tenant and 100,000 payments
  over the tenants (with their refunds) are bulk-inserted with SQLAlchemy Core through the SQL models, as
  the analytics benchmark does, and ANALYZEd;
- the API in the production server configuration, ``keel serve --workers N`` (granian), with the log level
  at WARNING and the rate limits out of the way, and ``keel worker --simple`` for the payments' jobs;
- the ceiling (tests/benchmarks/ceiling.py): a bare Litestar handler on the profile route returning a
  constant body exactly as long as a real ``GET /v1/users/{id}`` response, under the same granian options;
- ``wrk`` (scripts in tests/benchmarks/wrk/) as the load generator, in its own process.

Scenarios, each driven for ``--duration`` seconds after a ``--warmup``, ``--runs`` times (medians reported):

  a. the ceiling, over the same paths and headers as b;
  b. ``GET /v1/users/{id}`` with each id's tenant key, at random over ``--ids-per-tenant`` ids per tenant,
     every one of which was read once beforehand (so the API key, tenant and user come from the cache);
  c. the same with ``KEEL_CACHE_ENABLED=false`` (the API restarted; every lookup goes to Postgres);
  d. ``POST /v1/payments``, a unique ``Idempotency-Key`` per request, rotating over the tenants; its runs come
     after the reads' (a, b, e), while ``keel worker`` runs the payments' jobs, and what the worker has not run
     by the end is discarded before the next scenario (it would compete with it);
  e. ``GET /healthz`` (probes Postgres and Redis);
  f. no-op job throughput in a child process against the same Redis (another database number, away from
     the running worker): Keel's job platform (``RqJobQueue.enqueue``, the async call the application
     makes, then ``KeelSimpleWorker`` in burst mode) against plain RQ (``Queue.enqueue`` of a plain no-op
     function, then ``rq.SimpleWorker`` in burst mode); both with RQ's JSON serializer, which Keel uses.
     Throughput is jobs / (first enqueue .. last job's ``ended_at``): the workers' start-up counts for both,
     their shutdown for neither.

Errors are responses with another status than the scenario's (200, or 202 for payments; counted by the
wrk script, so 3xx and unexpected 2xx count too) plus socket errors. RSS is ``VmRSS`` of each granian
worker process (the children of ``keel serve``), after the warm-up and at the end of each run. ``--soak S``
also drives the cached read for S seconds in 10 s slices and reports RSS per slice and its growth over the
second half. Figures against Keel's performance targets are printed as PASS/MISS; they are figures, not
assertions: the script exits 0 whatever they are.

The report (Markdown) is printed and written to ``$KEEL_DATA_DIR/bench/load-<UTC time>.md`` (``./var`` by
default).

    uv run --no-sync python -m tests.benchmarks.load [--runs 3] [--duration 10] [--workers 1]
        [--threads 2] [--connections 32] [--soak 300] [--max-seconds 900] [--only abcdef] [--profile]

``--profile`` also writes a py-spy flame graph (SVG, GIL samples) of each API worker process, and of the
job worker in scenario d, for every measured run, under ``$KEEL_DATA_DIR/bench/profiles-<UTC time>/``.
Sampling costs the sampled processes some throughput: compare figures of profiled runs with each other only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any, TypeVar

import httpx
from redis import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from keel.main import db
from keel.main.logging import configure_logging
from keel.platform.domain.jobs import QUEUES
from tests.benchmarks.analytics import (
    Keel,
    OutOfTime,
    Seeded,
    engine_for,
    generate,
    signup,
    store_and_analyze,
    wait_ready,
)
from tests.support.app import UNLIMITED
from tests.support.processes import children
from tests.support.servers import PostgresServer, admin_sql, free_port, postgres_server, redis_server

ROOT = Path(__file__).resolve().parents[2]
WRK_DIR = Path(__file__).resolve().parent / "wrk"
DATABASE = "keel_load"
TENANTS = 10
DAYS = 90  # closed days the seeded users and payments are spread over
JOBS_DB = 15  # the job benchmark's Redis database: the running `keel worker` listens on 0
WRK_INSTALL = "apt-get install -y wrk (Debian/Ubuntu), brew install wrk (macOS), or build github.com/wg/wrk"
MB = 1024 * 1024


# -- processes ----------------------------------------------------------------------------------


class Servers(Keel):
    """Keel's process handling (process groups, logs, stop) for any module, not only ``keel.main.cli``."""

    def spawn_module(self, name: str, module: str, *args: str) -> None:
        log = (self.logs / f"{name}.log").open("wb")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            env=self.env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def pid(self, name: str) -> int:
        return self.procs[name].pid


@contextlib.contextmanager
def started(servers: Servers) -> Iterator[Servers]:
    """Whatever ``servers`` starts inside the block is stopped when it ends, however it ends."""
    try:
        yield servers
    finally:
        servers.stop()


def keel_env(database_url: str, redis_url: str, data_dir: Path, port: int, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "KEEL_DATABASE_URL": database_url,
        "KEEL_REDIS_URL": redis_url,
        "KEEL_DATA_DIR": str(data_dir),
        "KEEL_HOST": "127.0.0.1",
        "KEEL_PORT": str(port),
        "KEEL_LOG_LEVEL": "WARNING",
        "KEEL_LOG_JSON": "true",
        "KEEL_MIGRATE_ON_START": "false",
        **UNLIMITED,  # the limiter would answer 429 long before the server's limit
        **extra,
    }


def server_workers(pid: int) -> list[int]:
    """Granian's worker processes: the server process's children, multiprocessing's resource tracker left
    out; the server process itself when it has none (yet)."""
    workers = []
    for child in children(pid):
        with contextlib.suppress(OSError):
            if b"resource_tracker" not in Path(f"/proc/{child}/cmdline").read_bytes():
                workers.append(child)
    return workers or [pid]


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / MB
    except OSError:
        pass
    return float("nan")


def rss_of(pid: int) -> list[float]:
    return [rss_mb(w) for w in server_workers(pid)]


# -- seeding ------------------------------------------------------------------------------------


@dataclass
class Tenant:
    id: uuid.UUID
    token: str
    user_ids: list[uuid.UUID]


async def seed(
    engine: AsyncEngine,
    signed_up: list[tuple[uuid.UUID, dict[str, str]]],
    users: int,
    payments: int,
    ids_per_tenant: int,
) -> list[Tenant]:
    rng = random.Random(20261207)
    now = datetime.now(UTC)
    all_payments, all_refunds, all_users = [], [], []
    tenants = []
    per_tenant = [payments // len(signed_up) + (i < payments % len(signed_up)) for i in range(len(signed_up))]
    for (tenant_id, headers), n in zip(signed_up, per_tenant, strict=True):
        # generate() adds 1% more payments today on top of the closed days: ask for 1% less.
        p, r, u = generate(rng, tenant_id, round(n / 1.01), users, DAYS, now, Seeded())
        all_payments += p
        all_refunds += r
        all_users += u
        token = headers["Authorization"].removeprefix("Bearer ")
        tenants.append(Tenant(tenant_id, token, [row["id"] for row in rng.sample(u, min(ids_per_tenant, len(u)))]))
    await store_and_analyze(engine, all_users, all_payments, all_refunds)
    print(
        f"Seeded {len(all_users):,} users, {len(all_payments):,} payments and {len(all_refunds):,} refunds over "
        f"{len(tenants)} tenants.",
        flush=True,
    )
    return tenants


async def read_every_profile(base_url: str, tenants: list[Tenant], concurrency: int = 32) -> list[int]:
    """GET every id once with its tenant's key (all must answer 200): fills the cache for scenario b and
    returns the body lengths, whose median sizes the ceiling's body."""
    todo = [(t.token, user_id) for t in tenants for user_id in t.user_ids]
    random.Random(1).shuffle(todo)
    lengths: list[int] = []
    failures: list[str] = []

    async def reader(client: httpx.AsyncClient, mine: list[tuple[str, uuid.UUID]]) -> None:
        for token, user_id in mine:
            r = await client.get(f"/v1/users/{user_id}", headers={"Authorization": f"Bearer {token}"})
            if r.status_code == 200:
                lengths.append(len(r.content))
            elif len(failures) < 5:
                failures.append(f"{r.status_code} {r.text[:200]}")

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=30, limits=limits) as client:
        await asyncio.gather(*(reader(client, todo[i::concurrency]) for i in range(concurrency)))
    if failures or len(lengths) != len(todo):
        raise RuntimeError(f"{len(todo) - len(lengths)} of {len(todo)} profile reads failed, e.g. {failures}")
    return lengths


# -- load ---------------------------------------------------------------------------------------


@dataclass
class WrkResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    status_errors: int  # wrk's own count: statuses above 399
    unexpected: int  # the script's count: any status but the scenario's
    socket_errors: int
    samples: list[str]

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    @property
    def errors(self) -> int:
        return self.unexpected + self.socket_errors


_RESULT = re.compile(r"^KEEL_RESULT (.*)$", re.MULTILINE)


def parse_wrk(output: str) -> WrkResult:
    found = _RESULT.search(output)
    if found is None:
        raise RuntimeError(f"wrk printed no KEEL_RESULT line:\n{output[-2000:]}")
    v = {k: int(n) for k, n in (pair.split("=") for pair in found.group(1).split())}
    return WrkResult(
        requests=v["requests"],
        seconds=v["duration_us"] / 1e6,
        p50_ms=v["p50_us"] / 1000,
        p99_ms=v["p99_us"] / 1000,
        status_errors=v["status"],
        unexpected=v["unexpected"],
        socket_errors=v["connect"] + v["read"] + v["write"] + v["timeout"],
        samples=[line.removeprefix("KEEL_SAMPLE ") for line in output.splitlines() if line.startswith("KEEL_SAMPLE")],
    )


class Profiler:
    """``--profile``: py-spy samples the processes serving a scenario for the whole of each measured run
    (the API's worker processes, and the job worker in scenario d) and writes one flame graph (SVG) per
    process and run. Only time spent holding the GIL is sampled (``--gil``): where Python burns CPU, not
    where it waits. py-spy attaches with ptrace: it needs root or CAP_SYS_PTRACE."""

    def __init__(self, py_spy: str, out_dir: Path, rate: int = 200) -> None:
        self.py_spy = py_spy
        self.out_dir = out_dir
        self.rate = rate
        self.written: list[Path] = []
        self.failures: list[str] = []

    def start(self, label: str, pids: dict[str, int], seconds: float) -> list[tuple[Path, subprocess.Popen[bytes]]]:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        started = []
        for name, pid in pids.items():
            out = self.out_dir / f"{label}-{name}.svg"
            cmd = [self.py_spy, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds)))]
            cmd += ["--rate", str(self.rate), "--gil", "--nonblocking", "--format", "flamegraph", "--output", str(out)]
            started.append((out, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))
        return started

    def finish(self, started: list[tuple[Path, subprocess.Popen[bytes]]]) -> None:
        for out, proc in started:
            try:
                _, err = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            if proc.returncode == 0 and out.exists():
                self.written.append(out)
            else:
                self.failures.append(f"{out.name}: {err.decode(errors='replace').strip()[-300:]}")


@dataclass
class Load:
    """How wrk is driven: the same threads, connections and durations for every scenario."""

    wrk: str
    threads: int
    connections: int
    duration: float
    warmup: float
    profiler: Profiler | None = None

    def run(self, url: str, script: str, args: list[str], seconds: float) -> WrkResult:
        cmd = [
            self.wrk,
            "-t",
            str(self.threads),
            "-c",
            str(self.connections),
            "-d",
            f"{max(1, round(seconds))}s",
            "--latency",
            "-s",
            str(WRK_DIR / script),
            url,
            "--",
            *args,
        ]
        # run() kills wrk on any exception, the time limit's included.
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"wrk exited with {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        return parse_wrk(done.stdout)


@dataclass
class Sample:
    """One measured run of a scenario."""

    result: WrkResult
    rss_start: list[float]
    rss_end: list[float]
    redis_commands: int
    redis_misses: int
    pg_transactions: int


@dataclass
class Scenario:
    key: str
    title: str
    script: str
    path: str
    samples: list[Sample] = field(default_factory=list)

    def median(self, attr: str) -> float:
        return statistics.median(getattr(s.result, attr) for s in self.samples)

    @property
    def errors(self) -> int:
        return sum(s.result.errors for s in self.samples)

    def per_request(self, attr: str) -> float:
        return statistics.median(getattr(s, attr) / max(1, s.result.requests) for s in self.samples)

    def errors_cell(self) -> str:
        """All runs' errors; when there are any, split as wrk reports them ("Non-2xx or 3xx responses",
        socket errors) plus the 2xx/3xx statuses other than the scenario's, which only the script sees."""
        if not self.errors:
            return "0"
        status = sum(s.result.status_errors for s in self.samples)
        other = sum(s.result.unexpected for s in self.samples) - status
        socket = sum(s.result.socket_errors for s in self.samples)
        return f"{self.errors} ({status} non-2xx/3xx, {other} other 2xx/3xx, {socket} socket)"


class Counters:
    """Whole-system work per request: Redis commands and cache misses, Postgres transactions (Postgres
    flushes its statistics about once a second, so that figure is approximate)."""

    def __init__(self, redis_url: str, engine: AsyncEngine) -> None:
        self.redis = Redis.from_url(redis_url)
        self.engine = engine

    async def read(self) -> tuple[int, int, int]:
        stats = self.redis.info("stats")
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT pg_stat_clear_snapshot()"))
            xacts = (
                await conn.execute(
                    text("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = :d"),
                    {"d": DATABASE},
                )
            ).scalar_one()
        return int(stats["total_commands_processed"]), int(stats["keyspace_misses"]), int(xacts)


async def measure(
    load: Load,
    scenario: Scenario,
    base_url: str,
    args: list[str],
    server_pid: int,
    counters: Counters,
    job_worker_pid: int | None = None,
) -> Sample:
    load.run(base_url + scenario.path, scenario.script, args, load.warmup)
    rss_start = rss_of(server_pid)
    before = await counters.read()
    profiling = []
    if load.profiler is not None:
        pids = {f"api{i}": pid for i, pid in enumerate(server_workers(server_pid), 1)}
        if job_worker_pid is not None:
            pids["worker"] = job_worker_pid
        profiling = load.profiler.start(f"{scenario.key}-run{len(scenario.samples) + 1}", pids, load.duration)
    try:
        result = load.run(base_url + scenario.path, scenario.script, args, load.duration)
    finally:
        if load.profiler is not None:
            load.profiler.finish(profiling)
    after = await counters.read()
    sample = Sample(
        result=result,
        rss_start=rss_start,
        rss_end=rss_of(server_pid),
        redis_commands=after[0] - before[0],
        redis_misses=after[1] - before[1],
        pg_transactions=after[2] - before[2],
    )
    scenario.samples.append(sample)
    r = result
    print(
        f"  ({scenario.key}) {r.rate:8.0f} req/s  p50 {r.p50_ms:6.2f} ms  p99 {r.p99_ms:7.2f} ms  errors {r.errors}"
        f"  RSS {_mb(sample.rss_start)} -> {_mb(sample.rss_end)} MB",
        flush=True,
    )
    for s in r.samples[:3]:
        print(f"      unexpected response: {s[:300]}")
    return sample


def job_counts(redis: Redis) -> tuple[int, int]:
    """Over Keel's queues: jobs waiting or running, jobs ended (finished or failed)."""
    from rq import Queue
    from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry

    waiting = ended = 0
    for name in QUEUES:
        q = Queue(name, connection=redis)
        waiting += q.count + StartedJobRegistry(queue=q).count
        ended += FinishedJobRegistry(queue=q).count + FailedJobRegistry(queue=q).count
    return waiting, ended


def discard_backlog(redis: Redis) -> int:
    """Delete the jobs still queued (their payments stay pending in a database thrown away afterwards)."""
    from rq import Queue

    return sum(int(Queue(name, connection=redis).empty()) for name in QUEUES)


# -- job throughput (f) -------------------------------------------------------------------------


def plain_noop() -> None:
    """Plain RQ's job: what ``bench.noop`` is to Keel's platform."""
    return None


PLAIN_NOOP = "tests.benchmarks.load.plain_noop"


def _job_round(conn: Any, ids: list[str], began: float, enqueued: float, serializer: Any) -> dict[str, float]:
    from rq.job import Job

    jobs = Job.fetch_many(ids, connection=conn, serializer=serializer)
    ended = [j.ended_at.timestamp() for j in jobs if j is not None and j.ended_at is not None]
    finished = sum(1 for j in jobs if j is not None and j.get_status(refresh=False) == "finished")
    last = max(ended) if ended else float("nan")
    return {"jobs": len(ids), "finished": finished, "enqueue_s": enqueued - began, "total_s": last - began}


def keel_jobs(conn: Any, n: int) -> dict[str, float]:
    from rq.serializers import JSONSerializer

    from keel.platform.adapters.jobs.rq_queue import KeelSimpleWorker, RqJobQueue
    from keel.platform.domain.jobs import HIGH
    from tests.benchmarks.jobs import NOOP, registry

    conn.flushdb()
    queue = RqJobQueue(conn, registry())

    async def enqueue_all() -> list[str]:
        return [await queue.enqueue(NOOP, {}) for _ in range(n)]

    began = time.time()
    ids = asyncio.run(enqueue_all())
    enqueued = time.time()
    KeelSimpleWorker([HIGH], connection=conn, serializer=JSONSerializer).work(burst=True, logging_level="WARNING")
    return _job_round(conn, ids, began, enqueued, JSONSerializer)


def plain_jobs(conn: Any, n: int) -> dict[str, float]:
    from rq import Queue, SimpleWorker
    from rq.serializers import JSONSerializer

    conn.flushdb()
    queue = Queue("plain", connection=conn, serializer=JSONSerializer)
    began = time.time()
    ids = [queue.enqueue(PLAIN_NOOP).id for _ in range(n)]
    enqueued = time.time()
    SimpleWorker([queue], connection=conn, serializer=JSONSerializer).work(burst=True, logging_level="WARNING")
    return _job_round(conn, ids, began, enqueued, JSONSerializer)


def jobs_child(redis_url: str, n: int, runs: int) -> None:
    """Scenario f, in its own process: RQ's workers install signal handlers (SIGALRM for job timeouts)
    that would replace this benchmark's time limit."""
    from keel.platform.adapters.jobs.rq_queue import WorkerRuntime, install_runtime
    from tests.benchmarks.jobs import registry

    configure_logging("WARNING", json=True)
    conn = Redis.from_url(redis_url)
    install_runtime(WorkerRuntime(registry()))
    # Imports and the job runtime's loop thread happen once, in a round not counted, for both sides alike.
    importlib.import_module(PLAIN_NOOP.rsplit(".", 1)[0])
    keel_jobs(conn, 20)
    plain_jobs(conn, 20)
    out: dict[str, list[dict[str, float]]] = {"keel": [], "plain": []}
    for _ in range(runs):
        out["keel"].append(keel_jobs(conn, n))
        out["plain"].append(plain_jobs(conn, n))
    conn.flushdb()
    print("KEEL_JOBS " + json.dumps(out), flush=True)


def job_throughput(redis_url: str, n: int, runs: int, within: float) -> dict[str, list[dict[str, float]]]:
    url = redis_url.rsplit("/", 1)[0] + f"/{JOBS_DB}"
    cmd = [sys.executable, "-m", "tests.benchmarks.load", "--jobs-child", url, "--jobs", str(n), "--runs", str(runs)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=within, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("KEEL_JOBS "):
            found: dict[str, list[dict[str, float]]] = json.loads(line.removeprefix("KEEL_JOBS "))
            return found
    raise RuntimeError(f"the job benchmark failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")


# -- report -------------------------------------------------------------------------------------


def _mb(values: list[float]) -> str:
    return "/".join(f"{v:.0f}" for v in values)


def _rss_cell(s: Scenario) -> str:
    first, last = s.samples[0].rss_start, s.samples[-1].rss_end
    if len(first) != len(last):
        return f"{_mb(first)} → {_mb(last)}"
    return ", ".join(f"{a:.0f} → {b:.0f}" for a, b in zip(first, last, strict=True))


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


@dataclass
class Report:
    args: argparse.Namespace
    scenarios: dict[str, Scenario]
    jobs: dict[str, list[dict[str, float]]]
    facts: list[str]
    notes: list[str]
    soak: list[tuple[int, float, list[float]]]
    parent_rss: float

    def job_rate(self, side: str) -> float | None:
        runs = self.jobs.get(side)
        return statistics.median(r["finished"] / r["total_s"] for r in runs) if runs else None

    def enqueue_rate(self, side: str) -> float:
        return statistics.median(r["jobs"] / r["enqueue_s"] for r in self.jobs[side])

    def rate(self, key: str) -> float | None:
        s = self.scenarios[key]
        return s.median("rate") if s.samples else None

    def markdown(self) -> str:
        a = self.args
        ran = [s for s in self.scenarios.values() if s.samples]
        lines = [
            f"# Keel HTTP load benchmark, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
            "",
            f"`keel serve --workers {a.workers}` (granian) + `keel worker --simple`, Postgres and Redis, all on "
            f"127.0.0.1; wrk `-t {a.threads} -c {a.connections}`, {a.warmup:g} s warm-up then {a.duration:g} s "
            f"per scenario, medians of {a.runs} run(s); {TENANTS} tenants x {a.users:,} users, {a.payments:,} "
            f"payments; reads over {a.ids_per_tenant:,} ids per tenant. RSS: each API worker process, "
            "start of the first run → end of the last (MB).",
            "",
            "| scenario | req/s | p50 ms | p99 ms | errors | RSS start → end MB |",
            "|---|---:|---:|---:|---:|---|",
        ]
        lines += [
            f"| ({s.key}) {s.title} | {s.median('rate'):.0f} | {s.median('p50_ms'):.2f} | "
            f"{s.median('p99_ms'):.2f} | {s.errors_cell()} | {_rss_cell(s)} |"
            for s in ran
        ]
        per_run = [f"{s.key} " + ", ".join(f"{x.result.rate:.0f}" for x in s.samples) for s in ran]
        if self.jobs:
            for side, title in (
                ("keel", "Keel jobs: no-op, `RqJobQueue.enqueue` + `KeelSimpleWorker`"),
                ("plain", "plain RQ: no-op, `Queue.enqueue` + `rq.SimpleWorker`"),
            ):
                unfinished = sum(r["jobs"] - r["finished"] for r in self.jobs[side])
                lines.append(f"| (f) {title} (jobs/s) | {self.job_rate(side):.0f} | - | - | {unfinished} | - |")
                per_run.append(f"f {side} " + ", ".join(f"{r['finished'] / r['total_s']:.0f}" for r in self.jobs[side]))
            lines += [
                "",
                f"Job throughput: {a.jobs:,} jobs per round, JSON serializer on both sides, same Redis (database "
                f"{JOBS_DB}); enqueue alone: Keel {self.enqueue_rate('keel'):.0f}/s, plain RQ "
                f"{self.enqueue_rate('plain'):.0f}/s.",
            ]
        lines += ["", "Per run (req/s, jobs/s): " + "; ".join(per_run) + "."]
        work = [
            f"{s.key} {s.per_request('redis_commands'):.2f} Redis commands ({s.per_request('redis_misses'):.2f} "
            f"misses), ≈{s.per_request('pg_transactions'):.2f} Postgres transactions"
            for s in ran
            if s.key != "a"
        ]
        if work:
            lines += [
                "",
                "Work per request (whole system, the worker's included; medians; Redis counts the commands Lua "
                "scripts run too, Postgres's figure lags by up to a second): " + "; ".join(work) + ".",
            ]
        if self.parent_rss:
            lines += ["", f"The `keel serve` parent process (granian's supervisor) held {self.parent_rss:.0f} MB."]
        lines += ["", "| target | measured | |", "|---|---:|---|"]
        lines += [f"| {name} | {got} | {_verdict(ok)} |" for name, got, ok in self.targets()]
        if self.soak:
            lines += [
                "",
                f"Soak, cached read ({a.soak:g} s in 10 s slices):",
                "",
                "| s | req/s | RSS MB |",
                "|---:|---:|---|",
            ]
            lines += [f"| {t} | {rate:.0f} | {_mb(rss)} |" for t, rate, rss in self.soak]
        if self.notes:
            lines += ["", *self.notes]
        lines += ["", "Machine: " + "; ".join(self.facts) + "."]
        return "\n".join(lines) + "\n"

    def targets(self) -> list[tuple[str, str, bool | None]]:
        """(target, measured, met); met is None when what it compares was not run."""

        def ratio(name: str, x: float | None, y: float | None, at_least: float) -> tuple[str, str, bool | None]:
            if x is None or y is None:
                return name, "not run", None
            return name, f"{x / y:.2f}", x >= at_least * y

        a, b, c, d = (self.rate(k) for k in "abcd")
        out = [
            ratio("cached read ≥ 0.80 x ceiling", b, a, 0.8),
            ratio("cached read ≥ 3 x uncached read", b, c, 3),
            ratio("Keel jobs ≥ 0.80 x plain RQ", self.job_rate("keel"), self.job_rate("plain"), 0.8),
        ]
        name, got, ok = ratio("POST /v1/payments ≥ 0.25 x cached read, 0 errors", d, b, 0.25)
        errors = self.scenarios["d"].errors
        out.insert(2, (name, got if ok is None else f"{got}, {errors} errors", ok if ok is None else ok and not errors))
        api_rss = [v for k in "bcde" for s in self.scenarios[k].samples for v in s.rss_end]
        out.append(
            (
                "API RSS ≤ 150 MB per process after the run",
                f"{max(api_rss):.0f} MB (largest)" if api_rss else "not run",
                max(api_rss) <= 150 if api_rss else None,
            )
        )
        growth = self.soak_growth()
        out.append(
            (
                "RSS growth over the second half of the soak ≤ 5 %",
                "not run (--soak 300)" if growth is None else f"{growth:+.1f} %",
                None if growth is None else growth <= 5,
            )
        )
        return out

    def soak_growth(self) -> float | None:
        if len(self.soak) < 2:
            return None
        half = self.soak[(len(self.soak) - 1) // 2][2]
        end = self.soak[-1][2]
        if len(half) != len(end):
            return None
        return max((e - h) / h * 100 for h, e in zip(half, end, strict=True))


def machine_facts(wrk: str, pg_version: str, redis_version: str) -> list[str]:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    wrk_version = subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False).stdout.split("\n")[0]
    return [
        f"{os.cpu_count()} cores ({model}, {platform.machine()}), shared by the load generator, the API, the "
        "worker, Postgres and Redis",
        f"{platform.system()} {platform.release()}",
        f"Python {platform.python_version()}",
        f"Litestar {version('litestar')}",
        f"granian {version('granian')}",
        f"PostgreSQL {pg_version} (fsync off)",
        f"Redis {redis_version}",
        wrk_version.replace(" Copyright (C) 2012 Will Glozer", ""),
    ]


# -- the run ------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def http(base_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        yield client


async def start_api(servers: Servers, workers: int) -> None:
    servers.spawn("serve", "serve", "--workers", str(workers))
    async with http(servers.base_url) as client:
        await wait_ready(client, servers)
    # Ready means one worker answered; the others may still be importing the app.
    deadline = time.monotonic() + 30
    while len(server_workers(servers.pid("serve"))) < workers and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.1)


async def start_ceiling(servers: Servers, workers: int, body_bytes: int, probe: str) -> None:
    port = servers.base_url.rsplit(":", 1)[1]
    servers.spawn_module(
        "ceiling",
        "tests.benchmarks.ceiling",
        "--port",
        port,
        "--workers",
        str(workers),
        "--body-bytes",
        str(body_bytes),
    )
    deadline = time.monotonic() + 60
    async with http(servers.base_url) as client:
        while True:
            servers.check_alive()
            with contextlib.suppress(httpx.TransportError):
                r = await client.get(probe)
                if r.status_code == 200 and len(r.content) == body_bytes:
                    return
                raise RuntimeError(f"the ceiling answered {r.status_code} with {len(r.content)} bytes")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the ceiling did not start:\n{servers.tail()}")
            await asyncio.sleep(0.1)


@dataclass
class Bench:
    args: argparse.Namespace
    load: Load
    counters: Counters
    redis: Redis
    scenarios: dict[str, Scenario]
    users_file: str
    tokens_file: str
    notes: list[str] = field(default_factory=list)
    soak: list[tuple[int, float, list[float]]] = field(default_factory=list)

    async def cached_runs(self, api: Servers, ceiling: Servers) -> None:
        only, sc, users = self.args.only, self.scenarios, [self.users_file]
        for run_no in range(1, self.args.runs + 1):
            print(f"Run {run_no}/{self.args.runs} (cache enabled):", flush=True)
            if "a" in only:
                await measure(self.load, sc["a"], ceiling.base_url, users, ceiling.pid("ceiling"), self.counters)
            if "b" in only:
                await measure(self.load, sc["b"], api.base_url, users, api.pid("serve"), self.counters)
            if "e" in only:
                await measure(self.load, sc["e"], api.base_url, [], api.pid("serve"), self.counters)
            api.check_alive()

    async def payment_runs(self, api: Servers, worker: Servers) -> None:
        """Scenario d, its runs back to back, after the reads: the worker runs the payments' jobs (several per
        payment) far slower than the API accepts payments, so it is busy from the first seconds of the first
        run to well after the last; it would compete with any scenario run after them. What it has not run
        by then is discarded rather than waited for (minutes, at the default duration)."""
        waiting, ended = job_counts(self.redis)
        began = time.monotonic()
        for run_no in range(1, self.args.runs + 1):
            print(f"Run {run_no}/{self.args.runs} (payments):", flush=True)
            nonce = f"r{run_no}-{uuid.uuid4().hex[:8]}"  # keys never repeat, across runs and benchmarks
            await measure(
                self.load,
                self.scenarios["d"],
                api.base_url,
                [self.tokens_file, nonce],
                api.pid("serve"),
                self.counters,
                job_worker_pid=worker.pid("worker"),
            )
            api.check_alive()
            worker.check_alive()
        took = time.monotonic() - began
        now_waiting, now_ended = job_counts(self.redis)
        discarded = discard_backlog(self.redis)
        accepted = sum(s.result.requests for s in self.scenarios["d"].samples)
        self.notes.append(
            f"During the payment runs ({took:.0f} s, warm-ups included) the worker (`keel worker --simple`) ended "
            f"{now_ended - ended:,} jobs ({(now_ended - ended) / took:.0f}/s) while the API accepted "
            f"{accepted:,} measured payments; {now_waiting - waiting:,} jobs were still queued afterwards and "
            f"{discarded:,} were discarded so they would not compete with the next scenarios."
        )
        print(f"      {self.notes[-1]}", flush=True)

    def soak_run(self, api: Servers) -> None:
        print(f"Soak: cached read for {self.args.soak:g} s in 10 s slices:", flush=True)
        elapsed = 0
        while elapsed < self.args.soak:
            r = self.load.run(api.base_url, "users.lua", [self.users_file], 10)
            elapsed += 10
            self.soak.append((elapsed, r.rate, rss_of(api.pid("serve"))))
            print(
                f"  {elapsed:4d} s {r.rate:8.0f} req/s  RSS {_mb(self.soak[-1][2])} MB  errors {r.errors}", flush=True
            )

    async def uncached_runs(self, api: Servers) -> None:
        for run_no in range(1, self.args.runs + 1):
            print(f"Run {run_no}/{self.args.runs} (cache disabled):", flush=True)
            await measure(
                self.load, self.scenarios["c"], api.base_url, [self.users_file], api.pid("serve"), self.counters
            )
        api.check_alive()


def log_notes(logs: Path) -> list[str]:
    notes = []
    for log in sorted(logs.glob("*.log")):
        lines = log.read_text(errors="replace").count("\n")
        if lines > 20:
            notes.append(f"{log.name} has {lines} lines at log level WARNING (their cost is in the figures).")
    return notes


def write_files(base: Path, tenants: list[Tenant]) -> tuple[str, str]:
    users_file, tokens_file = base / "users.tsv", base / "tokens.txt"
    users_file.write_text("".join(f"{t.token}\t/v1/users/{u}\n" for t in tenants for u in t.user_ids))
    tokens_file.write_text("".join(f"{t.token}\n" for t in tenants))
    return str(users_file), str(tokens_file)


async def run(args: argparse.Namespace, pg: PostgresServer, redis_url: str, wrk: str, base: Path) -> Report:
    await admin_sql(pg, f'CREATE DATABASE "{DATABASE}"')
    url = pg.url(DATABASE)
    db.upgrade(url)
    profiles = bench_dir() / f"profiles-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    profiler = Profiler(args.py_spy, profiles) if args.profile else None
    scenarios = {
        "a": Scenario("a", "ceiling: bare Litestar handler, constant body", "users.lua", ""),
        "b": Scenario("b", "`GET /v1/users/{id}`, cached", "users.lua", ""),
        "c": Scenario("c", "`GET /v1/users/{id}`, cache disabled", "users.lua", ""),
        "d": Scenario("d", "`POST /v1/payments`", "payments.lua", ""),
        "e": Scenario("e", "`GET /healthz`", "healthz.lua", "/healthz"),
    }
    redis = Redis.from_url(redis_url)

    def servers(port: int, **env: str) -> Servers:
        return Servers(keel_env(url, redis_url, base / "data", port, **env), base, f"http://127.0.0.1:{port}")

    try:
        async with engine_for(url) as engine:
            async with engine.connect() as conn:
                pg_version = (await conn.execute(text("SHOW server_version"))).scalar_one()
            facts = machine_facts(wrk, pg_version, redis.info("server")["redis_version"])
            worker, api, ceiling = servers(free_port()), servers(free_port()), servers(free_port())
            with started(worker), started(api), started(ceiling):
                worker.spawn("worker", "worker", "--simple")
                await start_api(api, args.workers)
                async with http(api.base_url) as client:
                    signed_up = [await signup(client, i) for i in range(TENANTS)]
                t0 = time.monotonic()
                tenants = await seed(engine, signed_up, args.users, args.payments, args.ids_per_tenant)
                print(f"  seeding and ANALYZE took {time.monotonic() - t0:.1f} s", flush=True)
                users_file, tokens_file = write_files(base, tenants)

                if "a" in args.only or "b" in args.only or args.soak > 0:
                    t0 = time.monotonic()
                    lengths = await read_every_profile(api.base_url, tenants)
                    body_bytes = int(statistics.median_low(lengths))
                    print(
                        f"  read all {len(lengths):,} profiles once (filling the cache) in "
                        f"{time.monotonic() - t0:.1f} s; profile bodies {min(lengths)}-{max(lengths)} bytes, "
                        f"median {body_bytes}",
                        flush=True,
                    )
                if "a" in args.only:
                    await start_ceiling(ceiling, args.workers, body_bytes, f"/v1/users/{tenants[0].user_ids[0]}")

                bench = Bench(
                    args,
                    Load(wrk, args.threads, args.connections, args.duration, args.warmup, profiler),
                    Counters(redis_url, engine),
                    redis,
                    scenarios,
                    users_file,
                    tokens_file,
                )
                if set(args.only) & set("abe"):
                    await bench.cached_runs(api, ceiling)
                if "d" in args.only:
                    await bench.payment_runs(api, worker)
                if args.soak > 0:
                    bench.soak_run(api)
                parent_rss = rss_mb(api.pid("serve"))
                api.stop()
                ceiling.stop()

                if "c" in args.only:
                    # The same API with every cache lookup going to Postgres.
                    (base / "serve.log").rename(base / "serve-cached.log")
                    uncached = servers(free_port(), KEEL_CACHE_ENABLED="false")
                    with started(uncached):
                        await start_api(uncached, args.workers)
                        await bench.uncached_runs(uncached)
                bench.notes += log_notes(base)
                if profiler is not None:
                    bench.notes.append(
                        f"Profiles (py-spy flame graphs, GIL samples, every measured run): {len(profiler.written)} "
                        f"in {profiler.out_dir}. Sampling slows the processes it samples: these figures are not "
                        "comparable with those of runs without --profile"
                        + "".join(f"; not written: {failure}" for failure in profiler.failures[:3])
                    )

                jobs: dict[str, list[dict[str, float]]] = {}
                if "f" in args.only:
                    print(f"Job throughput ({args.jobs:,} no-op jobs per round, {args.runs} round(s)):", flush=True)
                    jobs = job_throughput(redis_url, args.jobs, args.runs, within=120 + args.jobs * args.runs / 50)
    finally:
        redis.close()
    return Report(args, {k: scenarios[k] for k in "abcde"}, jobs, facts, bench.notes, bench.soak, parent_rss)


def _scenarios(raw: str) -> str:
    if not raw or set(raw) - set("abcdef"):
        raise argparse.ArgumentTypeError("letters among a, b, c, d, e and f")
    return raw


def main(argv: Any = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--workers", type=int, default=1, help="granian workers of the API and of the ceiling")
    parser.add_argument("--runs", type=int, default=3, help="runs of scenarios a-e (and f); medians are reported")
    parser.add_argument("--duration", type=float, default=10, help="seconds of load per scenario and run")
    parser.add_argument("--warmup", type=float, default=2, help="seconds of unmeasured load before each")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (over all threads)")
    parser.add_argument("--users", type=int, default=10_000, help="users per tenant")
    parser.add_argument("--payments", type=int, default=100_000, help="payments over all tenants")
    parser.add_argument("--ids-per-tenant", type=int, default=500, help="user ids per tenant the reads pick from")
    parser.add_argument("--jobs", type=int, default=2000, help="no-op jobs per round of scenario f")
    parser.add_argument(
        "--only", default="abcdef", type=_scenarios, help="the scenarios to run, e.g. bd (default abcdef)"
    )
    parser.add_argument("--soak", type=float, default=0, help="also drive the cached read this long (e.g. 300)")
    parser.add_argument("--max-seconds", type=float, default=900, help="give up after this long (plus --soak)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="flame graphs of the API (and of the job worker in d) for every measured run (py-spy; needs ptrace)",
    )
    parser.add_argument("--jobs-child", metavar="REDIS_URL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.jobs_child:
        jobs_child(args.jobs_child, args.jobs, args.runs)
        return 0
    wrk = shutil.which("wrk")
    if wrk is None:
        print(f"wrk is not installed: {WRK_INSTALL}", file=sys.stderr)
        return 2
    args.py_spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if args.profile and args.py_spy is None:
        print("--profile needs py-spy (a dev dependency: uv sync)", file=sys.stderr)
        return 2
    configure_logging("WARNING", json=True)
    report = within_deadline(
        "load",
        int(args.max_seconds + args.soak),
        "raise --max-seconds",
        lambda pg, redis_url, base: run(args, pg, redis_url, wrk, base),
    )
    publish("load", report.markdown())
    return 0


R = TypeVar("R")


def within_deadline(
    name: str, limit: int, hint: str, body: Callable[[PostgresServer, str, Path], Coroutine[Any, Any, R]]
) -> R:
    """Run ``body`` against a throwaway Postgres and Redis and a scratch directory, all gone afterwards.
    A hung server or load generator stops the run after ``limit`` seconds; the finally blocks still end
    every process."""

    def out_of_time(signum: int, frame: Any) -> None:
        raise OutOfTime(f"no result after {limit} s ({hint})")

    signal.signal(signal.SIGALRM, out_of_time)
    signal.alarm(limit)
    base = Path(tempfile.mkdtemp(prefix=f"keel-{name}-"))
    try:
        with postgres_server() as pg, redis_server() as redis:
            return asyncio.run(body(pg, redis.url, base))
    finally:
        signal.alarm(0)
        shutil.rmtree(base, ignore_errors=True)


def bench_dir() -> Path:
    return Path(os.environ.get("KEEL_DATA_DIR") or "var").resolve() / "bench"


def publish(name: str, markdown: str) -> Path:
    """Print a report and keep it under ``$KEEL_DATA_DIR/bench/<name>-<UTC time>.md``."""
    print()
    print(markdown)
    out_dir = bench_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.md"
    path.write_text(markdown)
    print(f"Written to {path}")
    return path


if __name__ == "__main__":
    sys.exit(main())
