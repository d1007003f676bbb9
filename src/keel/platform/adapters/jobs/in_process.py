"""The embedded default's job queue: the same job functions, statuses and retries as RQ, run by a
few asyncio tasks in the API process. Jobs live in memory: a restart forgets them, which is why
event-driven work is re-derived from the outbox and webhook deliveries from their table."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from croniter import croniter
from opentelemetry.trace import TracerProvider

from keel.platform.adapters.jobs import execution
from keel.platform.adapters.jobs.execution import JobRegistry
from keel.platform.domain.ids import new_id
from keel.platform.domain.jobs import QUEUES, JobError, JobInfo, JobStatus
from keel.platform.ports.clock import Clock
from keel.platform.ports.jobs import JobArgs, PeriodicJob

_PRIORITY = {name: rank for rank, name in enumerate(QUEUES)}


@dataclass(slots=True)
class _Job:
    id: str
    name: str
    queue: str
    args: dict[str, Any]
    meta: dict[str, Any]
    tenant_id: uuid.UUID | None
    delays: list[float]
    enqueued_at: datetime
    status: JobStatus = JobStatus.QUEUED
    attempts: int = 0
    result: Any = None
    error: JobError | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    handle: asyncio.TimerHandle | None = field(default=None, repr=False)


class _Context:
    def __init__(self, job: _Job) -> None:
        self._job = job

    @property
    def job_id(self) -> str:
        return self._job.id

    @property
    def attempt(self) -> int:
        return self._job.attempts

    async def set_progress(self, percent: int) -> None:
        self._job.meta["progress"] = max(0, min(100, int(percent)))


class InProcessJobQueue:
    def __init__(
        self,
        registry: JobRegistry,
        clock: Clock,
        *,
        concurrency: int = 4,
        max_kept: int = 10_000,
        tracer_provider: TracerProvider | None = None,
        periodic: Sequence[PeriodicJob] = (),
    ) -> None:
        self._registry = registry
        self._periodic = list(periodic)
        self._clock = clock
        self._concurrency = concurrency
        self._max_kept = max_kept
        self.tracer_provider = tracer_provider
        self._jobs: dict[str, _Job] = {}
        self._ready: list[tuple[int, int, str]] = []  # (queue priority, sequence, job id)
        self._seq = itertools.count()
        self._available: asyncio.Semaphore | None = None  # one permit per ready job
        self._tasks: list[asyncio.Task[None]] = []
        self._idle = 0

    # -- the port -----------------------------------------------------------------------------

    async def enqueue(
        self,
        name: str,
        args: JobArgs,
        *,
        tenant_id: uuid.UUID | None = None,
        delay: float = 0.0,
        job_id: str | None = None,
    ) -> str:
        spec = self._registry.spec(name)
        if job_id is not None and job_id in self._jobs:
            return job_id
        job = _Job(
            id=job_id or str(new_id()),
            name=name,
            queue=spec.queue,
            # The same contract as RQ's JSON serializer: JSON-safe values only, copied at enqueue.
            args=json.loads(json.dumps(dict(args))),
            meta=execution.enqueue_meta(name, tenant_id),
            tenant_id=tenant_id,
            delays=spec.retry.delays(),
            enqueued_at=self._clock.now(),
        )
        self._jobs[job.id] = job
        self._prune()
        if delay > 0:
            self._schedule(job, delay)
        else:
            self._push(job)
        return job.id

    async def get(self, job_id: str) -> JobInfo | None:
        job = self._jobs.get(job_id)
        if job is None:
            return None
        return JobInfo(
            id=job.id,
            name=job.name,
            queue=job.queue,
            status=job.status,
            tenant_id=job.tenant_id,
            progress=int(job.meta.get("progress", 0)),
            attempts=job.attempts,
            result=job.result,
            error=job.error,
            enqueued_at=job.enqueued_at,
            started_at=job.started_at,
            ended_at=job.ended_at,
            meta=dict(job.meta),
        )

    # -- running ------------------------------------------------------------------------------

    def set_periodic(self, periodic: Sequence[PeriodicJob]) -> None:
        self._periodic = list(periodic)

    def start(self) -> None:
        if self._tasks:
            return
        # Jobs enqueued before the runners existed were only recorded.
        self._available = asyncio.Semaphore(len(self._ready))
        self._tasks = [
            asyncio.create_task(self._work(), name=f"in-process-job-runner-{i}") for i in range(self._concurrency)
        ]
        self._tasks += [asyncio.create_task(self._every(p), name=f"periodic-{p.name}") for p in self._periodic]

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for job in self._jobs.values():
            if job.handle is not None:
                job.handle.cancel()

    @property
    def idle(self) -> bool:
        """Nothing ready and no runner busy (jobs scheduled for later do not count)."""
        return not self._ready and self._idle == self._concurrency

    async def _every(self, periodic: PeriodicJob) -> None:
        """The embedded stand-in for ``keel cron``: one run per interval (or per cron time), never two at once."""
        if periodic.cron is None:
            while True:
                await self.enqueue(periodic.name, {}, job_id=periodic.job_id_at(self._clock.now().timestamp()))
                await asyncio.sleep(periodic.every)
        last: datetime | None = None
        while True:
            # Local time, as RQ's cron scheduler reads the expression. Counting from the last fire time
            # too: a timer that woke a moment early must not find the same fire time still ahead.
            now = self._clock.now().astimezone()
            due: datetime = croniter(periodic.cron, max(now, last) if last else now).get_next(datetime)
            await asyncio.sleep(max(0.0, (due - now).total_seconds()))
            # Named by the fire time, not by the clock on waking, for the same reason.
            await self.enqueue(periodic.name, {}, job_id=periodic.job_id_at(due.timestamp()))
            last = due

    def _schedule(self, job: _Job, delay: float) -> None:
        job.status = JobStatus.SCHEDULED
        loop = asyncio.get_running_loop()

        def due() -> None:
            job.handle = None
            self._push(job)

        job.handle = loop.call_later(delay, due)

    def _push(self, job: _Job) -> None:
        job.status = JobStatus.QUEUED
        heapq.heappush(self._ready, (_PRIORITY.get(job.queue, len(QUEUES)), next(self._seq), job.id))
        if self._available is not None:
            self._available.release()

    async def _work(self) -> None:
        assert self._available is not None
        while True:
            self._idle += 1
            try:
                await self._available.acquire()
            finally:
                self._idle -= 1
            if not self._ready:
                continue
            _, _, job_id = heapq.heappop(self._ready)
            job = self._jobs.get(job_id)
            if job is not None and job.status is JobStatus.QUEUED:
                await self._run(job)

    async def _run(self, job: _Job) -> None:
        spec = self._registry.spec(job.name)
        job.status = JobStatus.RUNNING
        job.attempts += 1
        job.meta["attempts"] = job.attempts
        job.started_at = self._clock.now()
        job.ended_at = None
        try:
            async with asyncio.timeout(spec.timeout):
                result = await execution.run(
                    spec, job.args, _Context(job), job.meta, system="in-process", tracer_provider=self.tracer_provider
                )
        except asyncio.CancelledError:
            job.status = JobStatus.QUEUED  # shutting down mid-run: at-least-once allows running it again
            raise
        except Exception as exc:  # noqa: BLE001 - a job's failure is recorded, never propagated
            job.ended_at = self._clock.now()
            job.error = execution.error_of(exc)
            retry_no = job.attempts - 1
            if execution.is_retryable(exc) and retry_no < len(job.delays):
                self._schedule(job, job.delays[retry_no])
            else:
                job.status = JobStatus.FAILED
        else:
            job.ended_at = self._clock.now()
            job.status = JobStatus.SUCCEEDED
            job.result = result
            job.error = None
            job.meta["progress"] = 100

    def _prune(self) -> None:
        """Forget finished jobs, oldest first, down to 90 % of ``max_kept``: the sort runs once per
        tenth of the capacity, not on every enqueue once the queue is full."""
        if len(self._jobs) <= self._max_kept:
            return
        finished = sorted(
            (j for j in self._jobs.values() if j.status.is_final and j.ended_at is not None),
            key=lambda j: j.ended_at or self._clock.now(),
        )
        for j in finished[: len(self._jobs) - int(self._max_kept * 0.9)]:
            del self._jobs[j.id]
