"""The ``JobQueue`` port's contract, run against both adapters: the in-process queue (the embedded
default, running on the test's loop) and RQ on a real Redis, run by a ``KeelSimpleWorker``.

Both must agree on statuses, results, progress, attempts, retries, tenant-safe errors, delays,
job-id deduplication, JSON arguments and queue priority. Handlers keep real state (lists of what they
saw); nothing is mocked.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from rq import Queue
from rq.serializers import JSONSerializer

from keel.platform.adapters.clock import SystemClock
from keel.platform.adapters.jobs.execution import UNEXPECTED, JobRegistry, UnknownJob
from keel.platform.adapters.jobs.in_process import InProcessJobQueue
from keel.platform.adapters.jobs.rq_queue import RqJobQueue, WorkerRuntime, install_runtime
from keel.platform.domain.jobs import DEFAULT, HIGH, LOW, NO_RETRY, JobFailed, JobInfo, JobStatus, RetryPolicy
from keel.platform.ports.jobs import JobArgs, JobContext, JobQueue, JobSpec
from tests.support.rq import run_rq_worker, runtime_installed


@dataclass
class Harness:
    """One adapter plus what it takes to get its jobs run."""

    kind: str
    registry: JobRegistry
    queue: JobQueue
    unit: float  # the smallest delay worth asking for: RQ schedules in whole seconds
    connection: redis.Redis | None = None
    started: bool = field(default=False, init=False)

    def register(self, name: str, handler: Any, **spec: Any) -> str:
        self.registry.register(JobSpec(name=name, handler=handler, **spec))
        return name

    def start(self) -> None:
        """Let the in-process runners go (RQ jobs only ever run inside ``run_until_settled``)."""
        if isinstance(self.queue, InProcessJobQueue) and not self.started:
            self.queue.start()
            self.started = True

    async def info(self, job_id: str) -> JobInfo:
        job = await self.queue.get(job_id)
        assert job is not None, job_id
        return job

    async def run_ready(self) -> None:
        """Run what is runnable now, once (no waiting for scheduled jobs)."""
        if self.connection is not None:
            run_rq_worker(self.connection)
            return
        self.start()
        assert isinstance(self.queue, InProcessJobQueue)
        queue = self.queue
        deadline = time.monotonic() + 10
        while not queue.idle:
            assert time.monotonic() < deadline, "in-process jobs did not finish"
            await asyncio.sleep(0.01)

    async def run_until_settled(self, *job_ids: str, within: float = 15.0) -> list[JobInfo]:
        """Run jobs (moving due retries and delayed jobs onto their queues) until every one of
        ``job_ids`` is final; returns their final state in order."""
        self.start()
        deadline = time.monotonic() + within
        while True:
            if self.connection is not None:
                run_rq_worker(self.connection)
            infos = [await self.info(job_id) for job_id in job_ids]
            if all(info.status.is_final for info in infos):
                return infos
            if time.monotonic() > deadline:
                raise AssertionError(f"jobs not final within {within}s: {[(i.id, i.status) for i in infos]}")
            await asyncio.sleep(0.05)


@pytest.fixture(params=["in-process", "rq"])
def backend(request: pytest.FixtureRequest) -> str | None:
    """None for the in-process adapter, else the URL of a freshly emptied Redis."""
    return None if request.param == "in-process" else str(request.getfixturevalue("redis_url"))


@pytest.fixture
async def h(backend: str | None) -> AsyncIterator[Harness]:
    registry = JobRegistry()
    if backend is None:
        # One runner: "with one worker" is what the priority case is about.
        queue = InProcessJobQueue(registry, SystemClock(), concurrency=1)
        try:
            yield Harness("in-process", registry, queue, unit=0.05)
        finally:
            await queue.stop()
        return

    connection = redis.Redis.from_url(backend)

    try:
        with runtime_installed(WorkerRuntime(registry)):
            yield Harness("rq", registry, RqJobQueue(connection, registry), unit=1.0, connection=connection)
    finally:
        connection.close()


# -- handlers with real state ----------------------------------------------------------------------


@dataclass
class Calls:
    """What a handler saw, one entry per run."""

    args: list[dict[str, Any]] = field(default_factory=list)
    attempts: list[int] = field(default_factory=list)
    job_ids: list[str] = field(default_factory=list)

    def record(self, ctx: JobContext, args: JobArgs) -> None:
        self.args.append(dict(args))
        self.attempts.append(ctx.attempt)
        self.job_ids.append(ctx.job_id)


def echo(calls: Calls) -> Any:
    async def handler(ctx: JobContext, args: JobArgs) -> Any:
        calls.record(ctx, args)
        return {"echo": dict(args), "attempt": ctx.attempt}

    return handler


def failing(calls: Calls, times: int, exc: BaseException) -> Any:
    """Fails its first ``times`` runs with ``exc``, then succeeds."""

    async def handler(ctx: JobContext, args: JobArgs) -> Any:
        calls.record(ctx, args)
        if len(calls.attempts) <= times:
            raise exc
        return "finally"

    return handler


def retry(h: Harness, retries: int) -> RetryPolicy:
    return RetryPolicy(retries=retries, base=h.unit, factor=1, cap=h.unit, jitter=0)


# -- success ---------------------------------------------------------------------------------------


async def test_a_successful_job_reports_its_result(h: Harness) -> None:
    calls = Calls()
    name = h.register("test.echo", echo(calls), queue=DEFAULT, retry=NO_RETRY)
    job_id = await h.queue.enqueue(name, {"n": 1})
    queued = await h.info(job_id)
    assert queued.status in (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.SUCCEEDED)
    assert queued.enqueued_at is not None

    (job,) = await h.run_until_settled(job_id)
    assert job.id == job_id
    assert job.name == name
    assert job.queue == DEFAULT
    assert job.status is JobStatus.SUCCEEDED
    assert job.result == {"echo": {"n": 1}, "attempt": 1}
    assert job.progress == 100
    assert job.attempts == 1
    assert job.error is None
    assert job.enqueued_at is not None
    assert job.started_at is not None
    assert job.ended_at is not None
    for stamp in (job.enqueued_at, job.started_at, job.ended_at):
        assert stamp.utcoffset() == timedelta(0)  # aware, in UTC
    assert job.enqueued_at <= job.started_at <= job.ended_at
    assert calls.job_ids == [job_id]
    assert calls.attempts == [1]


async def test_progress_reported_by_a_running_job_is_visible(h: Harness) -> None:
    seen: list[JobInfo | None] = []

    async def handler(ctx: JobContext, args: JobArgs) -> str:
        await ctx.set_progress(40)
        seen.append(await h.queue.get(ctx.job_id))  # what a status request sees meanwhile
        await ctx.set_progress(250)  # clamped
        seen.append(await h.queue.get(ctx.job_id))
        await ctx.set_progress(-3)
        seen.append(await h.queue.get(ctx.job_id))
        return "done"

    name = h.register("test.progress", handler, retry=NO_RETRY)
    job_id = await h.queue.enqueue(name, {})
    (job,) = await h.run_until_settled(job_id)

    assert [(s.status, s.progress) if s else None for s in seen] == [
        (JobStatus.RUNNING, 40),
        (JobStatus.RUNNING, 100),
        (JobStatus.RUNNING, 0),
    ]
    assert all(s is not None and s.attempts == 1 and s.started_at is not None for s in seen)
    assert job.status is JobStatus.SUCCEEDED
    assert job.progress == 100


# -- failures and retries --------------------------------------------------------------------------


async def test_a_job_failing_twice_then_succeeding_ends_succeeded_after_three_attempts(h: Harness) -> None:
    calls = Calls()
    name = h.register("test.flaky", failing(calls, 2, RuntimeError("database went away")), retry=retry(h, 3))
    job_id = await h.queue.enqueue(name, {"k": "v"})
    (job,) = await h.run_until_settled(job_id)

    assert job.status is JobStatus.SUCCEEDED
    assert job.attempts == 3
    assert job.result == "finally"
    assert job.error is None  # the earlier failures are not the outcome
    assert job.progress == 100
    assert calls.attempts == [1, 2, 3]
    assert calls.args == [{"k": "v"}] * 3
    assert calls.job_ids == [job_id] * 3


async def test_between_attempts_a_job_is_scheduled_and_shows_the_last_error(h: Harness) -> None:
    calls = Calls()
    slow_retry = RetryPolicy(retries=2, base=3600, factor=1, jitter=0)  # the retry never comes in this test
    name = h.register(
        "test.broken", failing(calls, 99, RuntimeError("secret: dsn=postgres://u:pw@db")), retry=slow_retry
    )
    job_id = await h.queue.enqueue(name, {})
    await h.run_ready()

    job = await h.info(job_id)
    assert calls.attempts == [1]
    assert job.status is JobStatus.SCHEDULED
    assert job.attempts == 1
    assert job.error == UNEXPECTED
    assert job.result is None


async def test_a_job_that_always_fails_ends_failed_after_every_retry_with_a_generic_error(h: Harness) -> None:
    calls = Calls()
    boom = ValueError("internal detail: tenant 42 row locked by pid 777")
    name = h.register("test.always_fails", failing(calls, 99, boom), retry=retry(h, 2))
    job_id = await h.queue.enqueue(name, {})
    (job,) = await h.run_until_settled(job_id)

    assert job.status is JobStatus.FAILED
    assert job.attempts == 3  # retries + 1
    assert calls.attempts == [1, 2, 3]
    assert job.error is not None
    assert job.error.code == "job-error"
    assert job.error.detail == UNEXPECTED.detail
    assert "internal detail" not in job.error.detail
    assert "ValueError" not in job.error.detail
    assert job.result is None
    assert job.ended_at is not None


async def test_job_failed_without_retry_fails_at_once_with_its_own_detail(h: Harness) -> None:
    calls = Calls()
    name = h.register("test.refuses", failing(calls, 99, JobFailed("nope", retry=False)), retry=retry(h, 3))
    job_id = await h.queue.enqueue(name, {})
    (job,) = await h.run_until_settled(job_id)

    assert job.status is JobStatus.FAILED
    assert job.attempts == 1
    assert calls.attempts == [1]
    assert job.error is not None
    assert (job.error.code, job.error.detail) == ("job-failed", "nope")


async def test_job_failed_with_a_code_shows_it_and_is_retried(h: Harness) -> None:
    calls = Calls()
    exc = JobFailed("The upstream refused the file.", code="upstream-refused")
    slow_retry = RetryPolicy(retries=1, base=3600, factor=1, jitter=0)
    name = h.register("test.refused", failing(calls, 99, exc), retry=slow_retry)
    job_id = await h.queue.enqueue(name, {})
    await h.run_ready()

    job = await h.info(job_id)
    assert calls.attempts == [1]
    assert job.status is JobStatus.SCHEDULED  # retryable: JobFailed retries unless told not to
    assert job.error is not None
    assert (job.error.code, job.error.detail) == ("upstream-refused", "The upstream refused the file.")


async def test_a_job_running_past_its_timeout_fails_as_a_timeout(h: Harness) -> None:
    cancelled: list[bool] = []

    async def handler(ctx: JobContext, args: JobArgs) -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    name = h.register("test.too_slow", handler, retry=NO_RETRY, timeout=1)
    job_id = await h.queue.enqueue(name, {})
    (job,) = await h.run_until_settled(job_id)

    assert job.status is JobStatus.FAILED
    assert job.attempts == 1
    assert job.error is not None
    assert (job.error.code, job.error.detail) == ("job-timeout", "The job ran out of time.")


# -- scheduling, identity, validation --------------------------------------------------------------


async def test_a_delayed_job_is_scheduled_first_and_runs_later(h: Harness) -> None:
    calls = Calls()
    name = h.register("test.later", echo(calls), retry=NO_RETRY)
    job_id = await h.queue.enqueue(name, {"when": "later"}, delay=h.unit)

    job = await h.info(job_id)
    assert job.status is JobStatus.SCHEDULED
    assert job.attempts == 0
    assert calls.attempts == []

    (job,) = await h.run_until_settled(job_id)
    assert job.status is JobStatus.SUCCEEDED
    assert calls.args == [{"when": "later"}]


async def test_the_same_job_id_enqueued_twice_runs_once(h: Harness) -> None:
    calls = Calls()
    name = h.register("test.once", echo(calls), retry=NO_RETRY)
    job_id = str(uuid.uuid4())
    assert await h.queue.enqueue(name, {"copy": 1}, job_id=job_id) == job_id
    assert await h.queue.enqueue(name, {"copy": 2}, job_id=job_id) == job_id
    (job,) = await h.run_until_settled(job_id)
    assert job.status is JobStatus.SUCCEEDED
    assert calls.args == [{"copy": 1}]

    # Still the same job once it has finished (an event re-published later by the outbox).
    assert await h.queue.enqueue(name, {"copy": 3}, job_id=job_id) == job_id
    await h.run_ready()
    assert calls.args == [{"copy": 1}]
    assert (await h.info(job_id)).result == {"echo": {"copy": 1}, "attempt": 1}


async def test_the_same_job_id_for_a_delayed_job_is_also_one_job(h: Harness) -> None:
    calls = Calls()
    name = h.register("test.once_later", echo(calls), retry=NO_RETRY)
    job_id = str(uuid.uuid4())
    await h.queue.enqueue(name, {"copy": 1}, job_id=job_id, delay=h.unit)
    await h.queue.enqueue(name, {"copy": 2}, job_id=job_id, delay=h.unit)
    await h.run_until_settled(job_id)
    assert calls.args == [{"copy": 1}]


async def test_distinct_enqueues_get_distinct_ids(h: Harness) -> None:
    name = h.register("test.many", echo(Calls()), retry=NO_RETRY)
    ids = [await h.queue.enqueue(name, {"i": i}) for i in range(5)]
    assert len(set(ids)) == 5
    infos = await h.run_until_settled(*ids)
    assert [i.result["echo"] for i in infos] == [{"i": i} for i in range(5)]


async def test_enqueues_made_at_once_each_get_their_own_answer(h: Harness) -> None:
    """Concurrent callers (RQ sends them together, in one round trip): each gets its own job id or its own
    error, a repeated id is still one job, and one caller's bad arguments fail nobody else."""
    calls = Calls()
    name = h.register("test.together", echo(calls), retry=NO_RETRY)
    shared = str(uuid.uuid4())
    outcomes = await asyncio.gather(
        *(h.queue.enqueue(name, {"i": i}) for i in range(6)),
        h.queue.enqueue(name, {"i": "bad", "value": uuid.uuid4()}),
        h.queue.enqueue(name, {"i": "first"}, job_id=shared),
        h.queue.enqueue(name, {"i": "second"}, job_id=shared),
        h.queue.enqueue(name, {"i": "later"}, delay=h.unit),
        return_exceptions=True,
    )
    *plain, bad, first, second, later = outcomes
    assert isinstance(bad, TypeError | ValueError)
    assert first == second == shared
    assert all(isinstance(o, str) for o in [*plain, later])
    assert len({*plain, later, shared}) == 8
    infos = await h.run_until_settled(*plain, shared, later)  # type: ignore[arg-type]
    assert [i.status for i in infos] == [JobStatus.SUCCEEDED] * 8
    assert sorted(map(str, (a["i"] for a in calls.args))) == sorted([*map(str, range(6)), "first", "later"])


async def test_get_of_an_unknown_job_is_none(h: Harness) -> None:
    assert await h.queue.get(str(uuid.uuid4())) is None
    assert await h.queue.get("not-even-a-uuid") is None


async def test_enqueue_of_an_unregistered_name_raises_unknown_job(h: Harness) -> None:
    with pytest.raises(UnknownJob):
        await h.queue.enqueue("test.nobody_registered_me", {})
    h.register("test.registered", echo(Calls()))
    with pytest.raises(UnknownJob):
        await h.queue.enqueue("test.Registered", {})


async def test_tenant_id_round_trips(h: Harness) -> None:
    name = h.register("test.tenanted", echo(Calls()), retry=NO_RETRY)
    tenant = uuid.uuid4()
    owned = await h.queue.enqueue(name, {}, tenant_id=tenant)
    system = await h.queue.enqueue(name, {})

    assert (await h.info(owned)).tenant_id == tenant
    assert (await h.info(system)).tenant_id is None
    done_owned, done_system = await h.run_until_settled(owned, system)
    assert done_owned.tenant_id == tenant
    assert isinstance(done_owned.tenant_id, uuid.UUID)
    assert done_system.tenant_id is None


# -- arguments -------------------------------------------------------------------------------------

JSON_ARGS: dict[str, Any] = {
    "id": "0198f7a2-6c1e-7bbd-8a3e-1f1f1f1f1f1f",
    "count": 3,
    "ratio": 0.25,
    "big": 2**53,
    "flag": True,
    "off": False,
    "nothing": None,
    "text": 'héllo, wörld ✓ "quoted" \n newline',
    "list": [1, "two", None, [3.5, {"deep": True}]],
    "nested": {"a": {"b": {"c": []}}, "empty": {}},
}


async def test_json_safe_arguments_and_results_round_trip(h: Harness) -> None:
    calls = Calls()
    name = h.register("test.args", echo(calls), retry=NO_RETRY)
    job_id = await h.queue.enqueue(name, JSON_ARGS)
    (job,) = await h.run_until_settled(job_id)
    assert calls.args == [JSON_ARGS]
    assert job.result == {"echo": JSON_ARGS, "attempt": 1}


async def test_arguments_reach_the_job_as_json_would_carry_them(h: Harness) -> None:
    """A tuple arrives as a list, wherever the job runs: the embedded default must not accept what
    production cannot carry."""
    calls = Calls()
    name = h.register("test.json_semantics", echo(calls), retry=NO_RETRY)
    args = {"pair": (1, 2), "nested": {"triple": ("a", "b", "c")}}
    job_id = await h.queue.enqueue(name, args)
    await h.run_until_settled(job_id)
    assert calls.args == [json.loads(json.dumps(args))]
    assert calls.args == [{"pair": [1, 2], "nested": {"triple": ["a", "b", "c"]}}]


async def test_arguments_are_captured_at_enqueue(h: Harness) -> None:
    calls = Calls()
    name = h.register("test.snapshot", echo(calls), retry=NO_RETRY)
    args: dict[str, Any] = {"ids": [1, 2], "opts": {"mode": "a"}}
    job_id = await h.queue.enqueue(name, args)
    args["ids"].append(3)  # the caller keeps using its objects after enqueueing
    args["opts"]["mode"] = "b"
    await h.run_until_settled(job_id)
    assert calls.args == [{"ids": [1, 2], "opts": {"mode": "a"}}]


@pytest.mark.parametrize("bad", [uuid.uuid4(), datetime.now(UTC)], ids=["uuid", "datetime"])
async def test_arguments_that_are_not_json_are_refused_at_enqueue(h: Harness, bad: Any) -> None:
    calls = Calls()
    name = h.register("test.not_json", echo(calls), retry=NO_RETRY)
    with pytest.raises((TypeError, ValueError)):
        await h.queue.enqueue(name, {"value": bad})
    await h.run_ready()
    assert calls.args == []


# -- priority --------------------------------------------------------------------------------------


async def test_with_one_worker_higher_queues_run_first(h: Harness) -> None:
    order: list[str] = []

    def note(label: str) -> Any:
        async def handler(ctx: JobContext, args: JobArgs) -> None:
            order.append(f"{label}{args['i']}")

        return handler

    h.register("test.low", note("low"), queue=LOW, retry=NO_RETRY)
    h.register("test.default", note("default"), queue=DEFAULT, retry=NO_RETRY)
    h.register("test.high", note("high"), queue=HIGH, retry=NO_RETRY)
    # Everything is waiting before the (single) worker starts; the bulk work was enqueued first.
    ids = [await h.queue.enqueue("test.low", {"i": i}) for i in range(3)]
    ids += [await h.queue.enqueue("test.default", {"i": i}) for i in range(2)]
    ids += [await h.queue.enqueue("test.high", {"i": i}) for i in range(3)]
    await h.run_until_settled(*ids)
    # Highest queue first, and first in, first out within a queue.
    assert order == ["high0", "high1", "high2", "default0", "default1", "low0", "low1", "low2"]
    infos = [await h.info(i) for i in ids]
    assert [i.queue for i in infos] == [LOW] * 3 + [DEFAULT] * 2 + [HIGH] * 3


# -- adapter specifics -----------------------------------------------------------------------------


async def test_rq_get_ignores_jobs_that_are_not_keel_jobs(redis_url: str) -> None:
    connection = redis.Redis.from_url(redis_url)
    try:
        foreign = Queue("default", connection=connection, serializer=JSONSerializer).enqueue("builtins.print", "hi")
        assert await RqJobQueue(connection, JobRegistry()).get(str(foreign.id)) is None
    finally:
        connection.close()


async def test_rq_refuses_to_run_without_a_worker_runtime(redis_url: str) -> None:
    connection = redis.Redis.from_url(redis_url)
    registry = JobRegistry([JobSpec(name="test.orphan", handler=echo(Calls()), retry=NO_RETRY)])
    queue = RqJobQueue(connection, registry)
    install_runtime(None)
    try:
        job_id = await queue.enqueue("test.orphan", {})
        run_rq_worker(connection)
        job = await queue.get(job_id)
        assert job is not None
        assert job.status is JobStatus.FAILED
    finally:
        connection.close()


async def test_in_process_jobs_enqueued_before_start_wait_for_it() -> None:
    calls = Calls()
    registry = JobRegistry([JobSpec(name="test.early", handler=echo(calls), retry=NO_RETRY)])
    queue = InProcessJobQueue(registry, SystemClock(), concurrency=2)
    try:
        ids = [await queue.enqueue("test.early", {"i": i}) for i in range(3)]
        await asyncio.sleep(0.05)
        assert calls.args == []
        assert [(await queue.get(i)).status for i in ids] == [JobStatus.QUEUED] * 3  # type: ignore[union-attr]
        queue.start()
        queue.start()  # idempotent
        h = Harness("in-process", registry, queue, unit=0.05)
        h.started = True
        await h.run_until_settled(*ids)
        assert sorted(a["i"] for a in calls.args) == [0, 1, 2]
    finally:
        await queue.stop()
