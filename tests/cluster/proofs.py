"""What the cluster must prove, one check each, all over HTTP through the two API processes (plus RQ's
own records in Redis, to see which worker ran what):

1. an update through one API is never read stale through the other (reads cached first);
2. a tenant's per-minute rate limit holds across both APIs: exactly the quota is admitted;
3. jobs are spread over both workers;
4. a worker SIGKILLed (with its work horse) mid-job loses no job;
5. ``/healthz`` of each API answers 200 with every check passing.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from rq import Worker
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from tests.cluster.topology import Cluster

ENDED = ("succeeded", "failed", "canceled")
T = TypeVar("T")


@dataclass(frozen=True)
class Options:
    rounds: int = 20  # proof 1: update-then-read rounds
    rate_limit: int = 10  # proof 2: the tenant's requests per minute
    payments: int = 8  # proof 3: payments whose capture jobs are counted per worker
    kill_payments: int = 6  # proof 4: payments in flight when a worker is killed
    sandbox_latency: float = 1.0  # seconds each capture takes (KEEL_PAYMENTS_SANDBOX_LATENCY)


@dataclass(frozen=True)
class Proof:
    number: int
    title: str
    passed: bool
    detail: str
    seconds: float


class Failed(Exception):
    """A proof that does not hold; the message says what was seen."""


@dataclass(frozen=True)
class Tenant:
    id: uuid.UUID
    headers: dict[str, str]


def expect(response: httpx.Response, status: int) -> dict[str, Any]:
    if response.status_code != status:
        raise Failed(
            f"{response.request.method} {response.request.url.path} answered {response.status_code}, "
            f"not {status}: {response.text[:300]}"
        )
    body: dict[str, Any] = response.json() if response.content else {}
    return body


async def signup(api: httpx.AsyncClient, label: str) -> Tenant:
    tag = uuid.uuid4().hex[:8]
    body = expect(
        await api.post(
            "/v1/signup",
            json={
                "organization": f"Cluster {label}",
                "owner_email": f"{label}-{tag}@cluster.test",
                "owner_name": "Owner",
            },
        ),
        201,
    )
    return Tenant(uuid.UUID(body["tenant"]["id"]), {"Authorization": f"Bearer {body['api_key']['token']}"})


async def poll(probe: Callable[[], Awaitable[T | None]], within: float, what: str) -> T:
    """``probe()`` until it returns something other than None, for at most ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        found = await probe()
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise Failed(f"{what}: not within {within:.0f} s")
        await asyncio.sleep(0.1)


def worker_of(cluster: Cluster, job_id: str) -> str | None:
    try:
        return Job.fetch(job_id, connection=cluster.redis, serializer=JSONSerializer).worker_name
    except NoSuchJobError:
        return None


async def pay(apis: list[httpx.AsyncClient], tenant: Tenant, count: int) -> list[tuple[str, str]]:
    """``count`` payments, alternately through each API: [(payment id, capture job id)]."""
    made = []
    for i in range(count):
        body = expect(
            await apis[i % len(apis)].post(
                "/v1/payments",
                headers={**tenant.headers, "Idempotency-Key": uuid.uuid4().hex},
                json={"amount": 1000 + i, "currency": "eur", "payment_method": "pm_card_visa"},
            ),
            202,
        )
        made.append((str(body["payment"]["id"]), str(body["job_id"])))
    return made


async def all_ended(
    apis: list[httpx.AsyncClient], tenant: Tenant, made: list[tuple[str, str]], within: float
) -> dict[str, dict[str, Any]]:
    """Wait until every payment has left ``pending`` and every capture job has ended (read through the
    APIs, alternately); returns the jobs by id."""

    async def probe() -> dict[str, dict[str, Any]] | None:
        jobs = {}
        for i, (payment_id, job_id) in enumerate(made):
            api = apis[i % len(apis)]
            payment = expect(await api.get(f"/v1/payments/{payment_id}", headers=tenant.headers), 200)
            job = expect(await api.get(f"/v1/jobs/{job_id}", headers=tenant.headers), 200)
            if payment["status"] == "pending" or job["status"] not in ENDED:
                return None
            jobs[job_id] = job
        return jobs

    return await poll(probe, within, f"{len(made)} payments settled and their jobs ended")


# -- the proofs -----------------------------------------------------------------------------------------


async def no_stale_reads(cluster: Cluster, apis: list[httpx.AsyncClient], options: Options) -> str:
    tenant = await signup(apis[0], "profiles")
    user = expect(
        await apis[0].post("/v1/users", json={"email": "ada@cluster.test", "name": "Ada"}, headers=tenant.headers),
        201,
    )
    path = f"/v1/users/{user['id']}"
    # The profile's cache entry, whatever the namespace and schema version in front of it.
    pattern = f"*:{tenant.id}:{user['id']}"
    stale: list[str] = []
    cached = 0
    for i in range(options.rounds):
        # Even rounds write through API 1 and read through API 2; odd rounds the other way round.
        writer, reader = (apis[0], apis[1]) if i % 2 == 0 else (apis[1], apis[0])
        expect(await reader.get(path, headers=tenant.headers), 200)
        cached += any(True for _ in cluster.redis.scan_iter(match=pattern, count=1000))
        name = f"Ada round {i}"
        expect(await writer.patch(path, json={"name": name}, headers=tenant.headers), 200)
        seen = expect(await reader.get(path, headers=tenant.headers), 200)["name"]
        if seen != name:
            stale.append(f"round {i}: read {seen!r} after writing {name!r}")
    detail = (
        f"{options.rounds} rounds (write on one API, read on the other, both ways): {len(stale)} stale reads; "
        f"profile cached before {cached}/{options.rounds} updates"
    )
    if stale or cached != options.rounds:
        raise Failed(f"{detail}; {'; '.join(stale[:3])}")
    return detail


async def shared_rate_limit(cluster: Cluster, apis: list[httpx.AsyncClient], options: Options) -> str:
    limit = options.rate_limit
    tenant = await signup(apis[0], "limits")
    expect(await apis[1].patch("/v1/tenant/config", json={"rate_limit_per_minute": limit}, headers=tenant.headers), 200)
    # A fresh key: its window holds none of the set-up requests above.
    token = expect(await apis[0].post("/v1/api-keys", json={"name": "cluster"}, headers=tenant.headers), 201)["token"]
    headers = {"Authorization": f"Bearer {token}"}
    total = 3 * limit
    responses = await asyncio.gather(*(apis[i % 2].get("/v1/tenant", headers=headers) for i in range(total)))
    per_api = [Counter(r.status_code for r in responses[i::2]) for i in range(2)]
    admitted = sum(c[200] for c in per_api)
    refused = sum(c[429] for c in per_api)
    bad = [
        r
        for r in responses
        if (r.status_code == 429 and not r.headers.get("retry-after"))
        or (r.status_code == 200 and f"q={limit};" not in r.headers.get("ratelimit-policy", ""))
    ]
    detail = (
        f"quota {limit}/min, {total} concurrent requests alternating over both APIs: {admitted} admitted, "
        f"{refused} refused with 429 (API 1: {per_api[0][200]} + {per_api[0][429]}, "
        f"API 2: {per_api[1][200]} + {per_api[1][429]})"
    )
    if admitted != limit or refused != total - limit or bad:
        raise Failed(f"{detail}; {len(bad)} responses without Retry-After or the tenant's RateLimit-Policy")
    return detail


async def jobs_spread(cluster: Cluster, apis: list[httpx.AsyncClient], options: Options) -> str:
    tenant = await signup(apis[1], "jobs")
    made = await pay(apis, tenant, options.payments)
    within = 30 + 2 * options.payments * options.sandbox_latency
    jobs = await all_ended(apis, tenant, made, within)
    ran = Counter(worker_of(cluster, job_id) for _, job_id in made)
    failed = [j for j in jobs.values() if j["status"] != "succeeded"]
    detail = f"{len(made)} payment captures: " + ", ".join(f"{w} ran {n}" for w, n in sorted(ran.items(), key=str))
    if failed or set(ran) != set(cluster.workers):
        raise Failed(f"{detail}; {len(failed)} did not succeed; workers: {', '.join(cluster.workers)}")
    return detail


async def killed_worker_loses_nothing(cluster: Cluster, apis: list[httpx.AsyncClient], options: Options) -> str:
    holder = cluster.scheduler_holder()
    # RQ's scheduler lock outlives a SIGKILLed holder by up to 61 s (RQ's fixed TTL), holding back every
    # scheduled job, the abandoned job's retry included, that long: the victim is the other worker.
    victim = next(w for w in cluster.workers if w != holder)
    tenant = await signup(apis[0], "kill")
    made = await pay(apis, tenant, options.kill_payments)
    ours = {job_id for _, job_id in made}

    async def victim_busy() -> str | None:
        worker = Worker.find_by_key(
            Worker.redis_worker_namespace_prefix + victim, connection=cluster.redis, serializer=JSONSerializer
        )
        job_id = worker.get_current_job_id() if worker is not None else None
        if job_id not in ours:
            return None
        # The worker takes a job (its execution is recorded) before its horse starts it. A kill in that
        # window is recovered by RQ's intermediate-queue rule after a minute, not by the abandoned-job
        # path proven here: wait until the horse has marked the job started.
        job = Job.fetch(job_id, connection=cluster.redis, serializer=JSONSerializer)
        return job_id if job.get_status() == JobStatus.STARTED else None

    job_id = await poll(victim_busy, 30, f"{victim} running one of the captures")
    pids = cluster.kill_worker(victim)
    killed_at = time.monotonic()
    within = 60 + 2 * options.kill_payments * options.sandbox_latency
    jobs = await all_ended(apis, tenant, made, within)
    recovered = time.monotonic() - killed_at
    statuses = Counter(j["status"] for j in jobs.values())
    retried = jobs[job_id]
    rerun_by = worker_of(cluster, job_id)
    # Read without RQ's clean-up pass: recovering abandoned jobs is the workers' business, not this probe's.
    leftover = {
        job
        for registry in (StartedJobRegistry, FailedJobRegistry)
        for job in registry("default", connection=cluster.redis, serializer=JSONSerializer).get_job_ids(cleanup=False)
    } & ours
    detail = (
        f"SIGKILLed {victim} mid-capture with its children (pids {', '.join(map(str, pids))}); "
        f"{statuses['succeeded']}/{len(made)} captures succeeded within {recovered:.1f} s; the abandoned job "
        f"ended {retried['status']} on attempt {retried['attempts']}, run again by {rerun_by}"
    )
    if statuses["succeeded"] != len(made) or retried["attempts"] < 2 or rerun_by != holder or leftover:
        raise Failed(f"{detail}; left in RQ's started/failed registries: {sorted(leftover)}")
    return detail


async def healthy(cluster: Cluster, apis: list[httpx.AsyncClient], options: Options) -> str:
    seen = []
    for i, api in enumerate(apis, 1):
        r = await api.get("/healthz")
        body = r.json()
        checks = {name.split(":")[0]: entries[0]["status"] for name, entries in body.get("checks", {}).items()}
        seen.append(
            f"API {i}: {r.status_code} {body.get('status')} ({', '.join(f'{k} {v}' for k, v in checks.items())})"
        )
        if r.status_code != 200 or body.get("status") != "pass" or set(checks.values()) != {"pass"}:
            raise Failed("; ".join(seen))
        if not {"postgres", "redis"} <= set(checks):
            raise Failed(f"{'; '.join(seen)}: a Postgres and a Redis check expected")
    return "; ".join(seen)


ProofFn = Callable[[Cluster, list[httpx.AsyncClient], Options], Awaitable[str]]

PROOFS: list[tuple[str, ProofFn]] = [
    ("an update through one API is never read stale through the other", no_stale_reads),
    ("the tenant's rate limit holds across both APIs", shared_rate_limit),
    ("jobs are spread over both workers", jobs_spread),
    ("a worker SIGKILLed mid-job loses no job", killed_worker_loses_nothing),
    ("/healthz of each API is 200 with every check passing", healthy),
]


async def prove(cluster: Cluster, options: Options, *, budget: float = 180.0) -> list[Proof]:
    """Run every proof, in order, each bounded by ``budget`` seconds; a failure does not stop the others."""
    proofs = []
    async with (
        httpx.AsyncClient(base_url=cluster.api_urls[0], timeout=30) as api1,
        httpx.AsyncClient(base_url=cluster.api_urls[1], timeout=30) as api2,
    ):
        for number, (title, fn) in enumerate(PROOFS, 1):
            started = time.monotonic()
            try:
                async with asyncio.timeout(budget):
                    detail, passed = await fn(cluster, [api1, api2], options), True
            except Failed as exc:
                detail, passed = str(exc), False
            except TimeoutError:
                detail, passed = f"no answer within {budget:.0f} s", False
            except (httpx.HTTPError, ValueError, KeyError, RuntimeError) as exc:
                detail, passed = f"{type(exc).__name__}: {exc}", False
            proofs.append(Proof(number, title, passed, detail, time.monotonic() - started))
    return proofs


def table(proofs: list[Proof]) -> str:
    lines = [" #  result  proof", "--  ------  " + "-" * 72]
    for p in proofs:
        lines.append(f"{p.number:>2}  {'PASS' if p.passed else 'FAIL':<6}  {p.title} ({p.seconds:.1f} s)")
        lines.append(f"{'':>12}{p.detail}")
    passed = sum(p.passed for p in proofs)
    lines.append(f"{passed} passed, {len(proofs) - passed} failed")
    return "\n".join(lines)
