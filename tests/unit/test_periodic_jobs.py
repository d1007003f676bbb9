"""Periodic jobs: an interval or a cron expression (exactly one), one job id per time slot, the embedded
scheduler of the in-process queue, and the cron jobs ``keel cron`` hands to RQ's scheduler.

The in-process scheduler is driven step by step: its ``asyncio.sleep`` is replaced by one that moves a
manual clock, so each fire time is exact and no test waits for real time. Cron expressions are read in
the machine's local time, so those tests pin the local time zone (to one east of UTC, where local and
UTC days differ).
"""

from __future__ import annotations

import asyncio
import os
import time
import types
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from keel.contexts.analytics.adapters import jobs as analytics_jobs
from keel.contexts.analytics.domain.services import FLUSH_JOB, NIGHTLY_JOB
from keel.platform.adapters.jobs import in_process, rq_cron
from keel.platform.adapters.jobs.execution import JobRegistry
from keel.platform.adapters.jobs.in_process import InProcessJobQueue
from keel.platform.adapters.jobs.rq_cron import KeelCronScheduler
from keel.platform.adapters.jobs.rq_queue import PERFORM, RqJobQueue
from keel.platform.domain.jobs import DEFAULT, LOW, JobStatus
from keel.platform.ports.jobs import JobArgs, JobContext, JobSpec, PeriodicJob
from tests.fakes.clock import ManualClock

NIGHTLY = "15 0 * * *"


async def _nothing(ctx: JobContext, args: JobArgs) -> None:
    return None


def registry(*names: str, queue: str = LOW) -> JobRegistry:
    return JobRegistry(JobSpec(name=n, handler=_nothing, queue=queue) for n in names)


@pytest.fixture
def local_time_india() -> Iterator[None]:
    """The machine's local time is UTC+05:30 (no DST) for the test."""
    saved = os.environ.get("TZ")
    os.environ["TZ"] = "IST-05:30"
    time.tzset()
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = saved
        time.tzset()


# -- PeriodicJob ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"every": 0},
        {"every": -5},
        {"every": 60, "cron": NIGHTLY},
    ],
)
def test_a_periodic_job_takes_exactly_one_of_every_and_cron(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        PeriodicJob(name="x.y", **kwargs)


@pytest.mark.parametrize("expression", ["", "15 0 * *", "0 0 * * * *"])
def test_a_cron_expression_needs_five_fields(expression: str) -> None:
    # Caught when the schedule is declared, not at the first fire time in a cron process.
    with pytest.raises(ValueError, match="five fields"):
        PeriodicJob(name="x.y", cron=expression)


def test_a_periodic_job_with_an_interval_or_a_cron_expression() -> None:
    assert (PeriodicJob(name="x.y", every=60).every, PeriodicJob(name="x.y", every=60).cron) == (60, None)
    assert (PeriodicJob(name="x.y", cron=NIGHTLY).every, PeriodicJob(name="x.y", cron=NIGHTLY).cron) == (0, NIGHTLY)


def test_job_ids_are_one_per_interval() -> None:
    p = PeriodicJob(name="analytics.flush_requests", every=60)
    assert p.job_id_at(120.0) == "cron-analytics-flush_requests-2"
    assert p.job_id_at(179.999) == p.job_id_at(120.0)
    assert p.job_id_at(180.0) == "cron-analytics-flush_requests-3"
    five = PeriodicJob(name="outbox.relay", every=5)
    assert [five.job_id_at(t) for t in (9.9, 10.0, 14.9, 15.0)] == [
        "cron-outbox-relay-1",
        "cron-outbox-relay-2",
        "cron-outbox-relay-2",
        "cron-outbox-relay-3",
    ]


def test_cron_job_ids_are_one_per_minute() -> None:
    p = PeriodicJob(name="analytics.rollup_nightly", cron=NIGHTLY)
    at = datetime(2026, 3, 10, 18, 45, tzinfo=UTC).timestamp()
    assert p.job_id_at(at) == f"cron-analytics-rollup_nightly-{int(at) // 60}"
    assert p.job_id_at(at + 59.9) == p.job_id_at(at)
    assert p.job_id_at(at + 60) != p.job_id_at(at)
    assert p.job_id_at(at - 0.001) != p.job_id_at(at)


def test_the_analytics_schedule() -> None:
    by_name = {p.name: p for p in analytics_jobs.PERIODIC}
    assert by_name[NIGHTLY_JOB] == PeriodicJob(name=NIGHTLY_JOB, cron=NIGHTLY)
    assert by_name[FLUSH_JOB] == PeriodicJob(name=FLUSH_JOB, every=analytics_jobs.FLUSH_EVERY)


# -- the in-process scheduler -------------------------------------------------------------------------


class _Stop(Exception):
    pass


class SteppedSleep:
    """Stands in for ``asyncio.sleep`` in the in-process queue: records each sleep, moves the clock by
    it (less ``early`` on the first, a timer waking before the wall clock gets there) and stops the
    scheduler at the ``stop_at``-th sleep."""

    def __init__(self, clock: ManualClock, stop_at: int, early: timedelta = timedelta(0)) -> None:
        self.clock = clock
        self.stop_at = stop_at
        self.early = early
        self.slept: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.slept.append(seconds)
        if len(self.slept) >= self.stop_at:
            raise _Stop
        self.clock.advance(seconds=seconds)
        if len(self.slept) == 1:
            self.clock.advance(seconds=-self.early.total_seconds())


def stepped(monkeypatch: pytest.MonkeyPatch, clock: ManualClock, stop_at: int, **kw: Any) -> SteppedSleep:
    sleep = SteppedSleep(clock, stop_at, **kw)
    shim = types.SimpleNamespace(**{name: getattr(asyncio, name) for name in dir(asyncio) if not name.startswith("_")})
    shim.sleep = sleep
    monkeypatch.setattr(in_process, "asyncio", shim)
    return sleep


async def run_scheduler(queue: InProcessJobQueue, periodic: PeriodicJob) -> None:
    with pytest.raises(_Stop):
        await queue._every(periodic)


async def enqueued(queue: InProcessJobQueue, ids: list[str]) -> list[tuple[str, datetime | None, JobStatus]]:
    out = []
    for job_id in ids:
        info = await queue.get(job_id)
        assert info is not None, job_id
        out.append((info.name, info.enqueued_at, info.status))
    return out


async def test_an_interval_job_is_enqueued_at_once_then_every_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    t0 = datetime(2026, 3, 10, 12, 0, 7, tzinfo=UTC)
    clock = ManualClock(t0)
    periodic = PeriodicJob(name=FLUSH_JOB, every=60)
    queue = InProcessJobQueue(registry(FLUSH_JOB, queue=DEFAULT), clock)
    sleep = stepped(monkeypatch, clock, stop_at=3)
    await run_scheduler(queue, periodic)
    assert sleep.slept == [60, 60, 60]
    times = [t0, t0 + timedelta(seconds=60), t0 + timedelta(seconds=120)]
    ids = [periodic.job_id_at(t.timestamp()) for t in times]
    assert len(set(ids)) == 3
    assert await enqueued(queue, ids) == [(FLUSH_JOB, t, JobStatus.QUEUED) for t in times]


@pytest.mark.usefixtures("local_time_india")
async def test_a_cron_job_is_enqueued_at_its_local_fire_times(monkeypatch: pytest.MonkeyPatch) -> None:
    # 18:40 UTC is 00:10 the next day in India: the nightly job is due at 00:15 local, 18:45 UTC.
    start = datetime(2026, 3, 10, 18, 40, tzinfo=UTC)
    clock = ManualClock(start)
    periodic = PeriodicJob(name=NIGHTLY_JOB, cron=NIGHTLY)
    queue = InProcessJobQueue(registry(NIGHTLY_JOB), clock)
    sleep = stepped(monkeypatch, clock, stop_at=3)
    await run_scheduler(queue, periodic)
    # Nothing is enqueued before the first fire time; then one run a day.
    assert sleep.slept == [300, 86400, 86400]
    fires = [datetime(2026, 3, 10, 18, 45, tzinfo=UTC), datetime(2026, 3, 11, 18, 45, tzinfo=UTC)]
    ids = [periodic.job_id_at(t.timestamp()) for t in fires]
    assert await enqueued(queue, ids) == [(NIGHTLY_JOB, t, JobStatus.QUEUED) for t in fires]
    assert len(queue._jobs) == 2


@pytest.mark.usefixtures("local_time_india")
async def test_a_cron_job_due_right_now_waits_for_its_next_time(monkeypatch: pytest.MonkeyPatch) -> None:
    start = datetime(2026, 3, 10, 18, 45, tzinfo=UTC)  # 00:15 local exactly
    clock = ManualClock(start)
    periodic = PeriodicJob(name=NIGHTLY_JOB, cron=NIGHTLY)
    queue = InProcessJobQueue(registry(NIGHTLY_JOB), clock)
    sleep = stepped(monkeypatch, clock, stop_at=2)
    await run_scheduler(queue, periodic)
    # Not enqueued now: the run of 00:15 today is the one a scheduler already running made.
    assert sleep.slept == [86400, 86400]
    assert [j.enqueued_at for j in queue._jobs.values()] == [start + timedelta(days=1)]


@pytest.mark.usefixtures("local_time_india")
async def test_a_scheduler_waking_a_moment_early_still_makes_one_run_per_fire_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """asyncio's timers run on the monotonic clock; the fire time is computed on the wall clock. When
    the wall clock is a microsecond behind at wake-up (a step back, a rounding), the run must still be
    the 00:15 run, once."""
    clock = ManualClock(datetime(2026, 3, 10, 18, 40, tzinfo=UTC))
    periodic = PeriodicJob(name=NIGHTLY_JOB, cron=NIGHTLY)
    queue = InProcessJobQueue(registry(NIGHTLY_JOB), clock)
    stepped(monkeypatch, clock, stop_at=4, early=timedelta(microseconds=1))
    await run_scheduler(queue, periodic)
    first_night = [j.id for j in queue._jobs.values() if j.enqueued_at < datetime(2026, 3, 11, tzinfo=UTC)]
    assert len(first_night) == 1, first_night


async def test_the_queue_starts_one_scheduler_per_periodic_job() -> None:
    clock = ManualClock()
    queue = InProcessJobQueue(
        registry(FLUSH_JOB, NIGHTLY_JOB),
        clock,
        periodic=[PeriodicJob(name=FLUSH_JOB, every=60), PeriodicJob(name=NIGHTLY_JOB, cron=NIGHTLY)],
    )
    queue.start()
    try:
        names = {t.get_name() for t in queue._tasks}
        assert {f"periodic-{FLUSH_JOB}", f"periodic-{NIGHTLY_JOB}"} <= names
        await asyncio.sleep(0)
        # The interval job runs at once; the nightly one waits for 00:15.
        assert {j.name for j in queue._jobs.values()} == {FLUSH_JOB}
    finally:
        await queue.stop()


# -- RQ's cron scheduler (keel cron) -----------------------------------------------------------------


@pytest.fixture
def connection(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        client.close()


def scheduler(connection: redis.Redis, periodic: list[PeriodicJob]) -> KeelCronScheduler:
    reg = registry(NIGHTLY_JOB)
    reg.register(JobSpec(name=FLUSH_JOB, handler=_nothing, queue=DEFAULT))
    return KeelCronScheduler(connection, RqJobQueue(connection, reg), reg, periodic)


def test_keel_cron_builds_an_rq_cron_job_per_periodic_job(connection: redis.Redis) -> None:
    s = scheduler(connection, [PeriodicJob(name=FLUSH_JOB, every=60), PeriodicJob(name=NIGHTLY_JOB, cron=NIGHTLY)])
    flush, nightly = s._cron_jobs
    assert (flush.name, flush.func_name, flush.queue_name) == (FLUSH_JOB, PERFORM, DEFAULT)
    assert (flush.interval, flush.cron) == (60, None)
    assert flush.should_run()  # an interval job runs when the scheduler starts
    assert (nightly.name, nightly.func_name, nightly.queue_name) == (NIGHTLY_JOB, PERFORM, LOW)
    assert (nightly.interval, nightly.cron) == (None, NIGHTLY)
    assert not nightly.should_run()
    due = nightly.next_enqueue_time
    assert due is not None
    assert due > datetime.now(UTC)
    local = due.astimezone()
    assert (local.hour, local.minute, local.second) == (0, 15, 0)
    assert due - datetime.now(UTC) <= timedelta(days=1, hours=1)


@pytest.mark.usefixtures("local_time_india")
def test_keel_cron_reads_cron_expressions_in_local_time(connection: redis.Redis) -> None:
    [nightly] = scheduler(connection, [PeriodicJob(name=NIGHTLY_JOB, cron=NIGHTLY)])._cron_jobs
    due = nightly.next_enqueue_time
    assert due is not None
    assert (due.astimezone(UTC).hour, due.astimezone(UTC).minute) == (18, 45)


def test_keel_cron_enqueues_one_json_job_per_slot(connection: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    at = datetime(2026, 3, 10, 18, 45, 30, tzinfo=UTC).timestamp()
    monkeypatch.setattr(rq_cron, "time", types.SimpleNamespace(time=lambda: at))
    periodic = PeriodicJob(name=NIGHTLY_JOB, cron=NIGHTLY)
    [nightly] = scheduler(connection, [periodic])._cron_jobs
    first = str(nightly.enqueue(connection))  # Keel's cron job returns the job id
    # A second scheduler (or a second tick) in the same minute makes no second job.
    assert nightly.enqueue(connection) == first == periodic.job_id_at(at)
    queue = Queue(LOW, connection=connection, serializer=JSONSerializer)
    assert queue.job_ids == [first]
    job = Job.fetch(first, connection=connection, serializer=JSONSerializer)
    assert job.func_name == PERFORM
    assert job.args == [NIGHTLY_JOB, {}]
    assert job.meta["name"] == NIGHTLY_JOB
    assert job.meta["tenant_id"] is None
    # The next minute is another slot.
    monkeypatch.setattr(rq_cron, "time", types.SimpleNamespace(time=lambda: at + 60))
    assert nightly.enqueue(connection) != first
    assert len(queue.job_ids) == 2
