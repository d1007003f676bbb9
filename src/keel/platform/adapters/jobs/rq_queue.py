"""RQ as the production job queue: one RQ function (``perform``) runs every Keel job by name, with
JSON-serialised arguments, RQ's ``Retry`` (scheduled by the worker's scheduler) and job meta for
progress, attempts, error summary and the originating request's context."""

from __future__ import annotations

import asyncio
import math
import os
import threading
import uuid
from collections.abc import Coroutine
from concurrent.futures import Future
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from opentelemetry.trace import TracerProvider
from rq import Queue, Retry, SimpleWorker, Worker, get_current_job
from rq.exceptions import DuplicateJobError, NoSuchJobError
from rq.job import Job
from rq.job import JobStatus as RqStatus
from rq.scripts import UNIQUE_ENQUEUE_SCRIPT
from rq.serializers import JSONSerializer
from rq.timeouts import JobTimeoutException

from keel.platform.adapters.batching import BatchAbandoned, NextBatch
from keel.platform.adapters.jobs import execution
from keel.platform.adapters.jobs.execution import JobRegistry
from keel.platform.domain.errors import Unavailable
from keel.platform.domain.ids import new_id
from keel.platform.domain.jobs import QUEUES, JobError, JobInfo, JobStatus
from keel.platform.ports.jobs import JobArgs

RESULT_TTL = 24 * 3600  # how long GET /v1/jobs/{id} can still see a finished job
FAILURE_TTL = 7 * 24 * 3600  # failed jobs stay in RQ's failed registry for inspection and requeue

_STATUS = {
    RqStatus.CREATED: JobStatus.QUEUED,
    RqStatus.QUEUED: JobStatus.QUEUED,
    RqStatus.DEFERRED: JobStatus.QUEUED,
    RqStatus.SCHEDULED: JobStatus.SCHEDULED,
    RqStatus.STARTED: JobStatus.RUNNING,
    RqStatus.FINISHED: JobStatus.SUCCEEDED,
    RqStatus.FAILED: JobStatus.FAILED,
    RqStatus.STOPPED: JobStatus.CANCELED,
    RqStatus.CANCELED: JobStatus.CANCELED,
}

PERFORM = "keel.platform.adapters.jobs.rq_queue.perform"


def rq_retry(delays: list[float]) -> Retry | None:
    """RQ repeats the *first* interval when ``max`` exceeds the list, so the list is exactly ``max`` long."""
    if not delays:
        return None
    return Retry(max=len(delays), interval=[max(1, math.ceil(d)) for d in delays])


_Request = tuple[str, dict[str, Any], dict[str, Any], float, str | None]  # name, args, meta, delay, job id


class RqJobQueue:
    """Jobs go to RQ through its own Lua script for unique enqueues (check, save and push in one step).

    ``enqueue`` is called from request handlers on the event loop while RQ's client is synchronous, so
    the Redis work runs on a thread. Calls that arrive while one batch is on its way are sent together
    as the next batch: one thread hop and one pipelined round trip for all of them, instead of a hop
    and two round trips each (measured: ~0.7 ms of CPU per job under load, most of a payment's enqueue
    cost). Every caller still gets its own job id or its own error.
    """

    def __init__(self, connection: redis.Redis, registry: JobRegistry) -> None:
        self._redis = connection
        self._registry = registry
        self._queues = {name: Queue(name, connection=connection, serializer=JSONSerializer) for name in QUEUES}
        self._unique_enqueue = connection.register_script(UNIQUE_ENQUEUE_SCRIPT)
        self._batches: NextBatch[_Request, str] = NextBatch(
            lambda requests: asyncio.to_thread(self.enqueue_many_sync, requests)
        )

    def queue(self, name: str) -> Queue:
        q = self._queues.get(name)
        if q is None:
            q = self._queues[name] = Queue(name, connection=self._redis, serializer=JSONSerializer)
        return q

    async def enqueue(
        self,
        name: str,
        args: JobArgs,
        *,
        tenant_id: uuid.UUID | None = None,
        delay: float = 0.0,
        job_id: str | None = None,
    ) -> str:
        self._registry.spec(name)  # an unknown job fails here, on the caller's side
        meta = execution.enqueue_meta(name, tenant_id)  # read the request context on the caller's task
        try:
            return await self._batches.submit((name, dict(args), meta, delay, job_id))
        except (redis.RedisError, BatchAbandoned) as exc:
            raise Unavailable("The job queue is unavailable; try again shortly.") from exc

    def enqueue_many_sync(self, requests: list[_Request]) -> list[str | BaseException]:
        """Enqueue each request; one pipelined round trip for all immediate jobs. Returns a job id or the
        error, per request, in order."""
        outcomes: list[str | BaseException] = []
        ready: list[tuple[Job, Queue, list[Any]]] = []
        for name, args, meta, delay, job_id in requests:
            try:
                if delay > 0:
                    outcomes.append(self.enqueue_sync(name, args, meta, delay, job_id))
                else:
                    job, q = self._job(name, args, meta, job_id)
                    q._prepare_for_queue(job)  # what RQ's own enqueue sets: status, origin, enqueued_at
                    ready.append((job, q, _hset_args(job)))  # serialises the arguments: may raise
                    outcomes.append(str(job.id))
            except Exception as exc:  # noqa: BLE001 - this caller's error (arguments that are not JSON, say)
                outcomes.append(exc)
        if ready:
            pipe = self._redis.pipeline(transaction=False)
            pipe.sadd(Queue.redis_queues_keys, *{q.key for _, q, _ in ready})  # what RQ adds on every enqueue
            for job, q, fields in ready:
                ttl = job.ttl if job.ttl is not None else -1
                self._unique_enqueue(keys=[job.key, q.key], args=[job.id, "R", ttl, *fields], client=pipe)
            results = pipe.execute(raise_on_error=False)
            if isinstance(results[0], BaseException):
                raise results[0]
            failed = {
                str(job.id): r
                for (job, _, _), r in zip(ready, results[1:], strict=True)
                if isinstance(r, BaseException)
            }
            # Anything else is 1, or 0 for a duplicate: the same event published twice, the job already exists.
            outcomes = [failed.get(o, o) if isinstance(o, str) else o for o in outcomes]
        return outcomes

    def _job(self, name: str, args: dict[str, Any], meta: dict[str, Any], job_id: str | None) -> tuple[Job, Queue]:
        spec = self._registry.spec(name)
        q = self.queue(spec.queue)
        job = q.create_job(
            PERFORM,
            args=(name, args),
            timeout=spec.timeout,
            result_ttl=RESULT_TTL,
            failure_ttl=FAILURE_TTL,
            description=name,
            job_id=job_id or str(new_id()),
            meta=meta,
            retry=rq_retry(spec.retry.delays()),
        )
        return job, q

    def enqueue_sync(
        self, name: str, args: dict[str, Any], meta: dict[str, Any], delay: float, job_id: str | None
    ) -> str:
        job, q = self._job(name, args, meta, job_id)
        try:
            if delay > 0:
                # RQ keeps whole seconds (it truncates): round up, so a job never starts before it is due
                # (a webhook retry released early found its delivery not yet due, and skipped it).
                due = datetime.now(UTC) + timedelta(seconds=delay)
                due = (due + timedelta(microseconds=999_999)).replace(microsecond=0)
                q.schedule_job(job, due, unique=job_id is not None)
            else:
                q.enqueue_job(job, unique=job_id is not None)
        except DuplicateJobError:
            pass  # the same event published twice: the job already exists
        return str(job.id)

    async def get(self, job_id: str) -> JobInfo | None:
        try:
            return await asyncio.to_thread(self._get, job_id)
        except redis.RedisError as exc:
            raise Unavailable("The job queue is unavailable; try again shortly.") from exc

    def _get(self, job_id: str) -> JobInfo | None:
        try:
            job = Job.fetch(job_id, connection=self._redis, serializer=JSONSerializer)
        except NoSuchJobError:
            return None
        meta = job.meta or {}
        if "name" not in meta:
            return None  # not a Keel job
        status = _STATUS.get(job.get_status(refresh=False) or RqStatus.QUEUED, JobStatus.QUEUED)
        error = meta.get("error")
        tenant = meta.get("tenant_id")
        return JobInfo(
            id=job.id,
            name=meta["name"],
            queue=job.origin,
            status=status,
            tenant_id=uuid.UUID(tenant) if tenant else None,
            progress=100 if status is JobStatus.SUCCEEDED else int(meta.get("progress", 0)),
            attempts=int(meta.get("attempts", 0)),
            result=job.return_value() if status is JobStatus.SUCCEEDED else None,
            error=JobError(**error) if error and status is not JobStatus.SUCCEEDED else None,
            enqueued_at=_utc(job.enqueued_at),
            started_at=_utc(job.started_at),
            ended_at=_utc(job.ended_at),
            meta=meta,
        )


def _hset_args(job: Job) -> list[Any]:
    """The job hash as RQ's unique-enqueue script takes it (field, value, ...; as ``rq.scripts`` builds it)."""
    fields: list[Any] = []
    for key, value in job.to_dict().items():
        if value is not None:
            fields += [key, value if isinstance(value, bytes | str) else str(value)]
    return fields


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


# -- the worker side ---------------------------------------------------------------------------


class WorkerRuntime:
    """The async side of a worker process: the job registry (bound to the composition root's object
    graph, built before any fork) and one event loop on its own thread, on which jobs run.

    The loop is started lazily, once per process: a forking worker starts one in each work horse, so
    the parent never holds a thread or a connection across ``fork()``; a simple worker starts one.
    """

    def __init__(self, registry: JobRegistry, *, tracer_provider: TracerProvider | None = None) -> None:
        self.registry = registry
        self.tracer_provider = tracer_provider
        self._pid: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._pid != os.getpid() or self._loop is None or not self._loop.is_running():
                loop = asyncio.new_event_loop()
                started = threading.Event()
                loop.call_soon(started.set)
                threading.Thread(target=loop.run_forever, name="keel-jobs-loop", daemon=True).start()
                started.wait()
                self._loop, self._pid = loop, os.getpid()
            return self._loop

    def call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._running_loop())
        try:
            return future.result()
        except BaseException:
            # RQ's timeout (SIGALRM) or a stop request lands here, on the main thread: stop the coroutine too.
            future.cancel()
            raise


_runtime: WorkerRuntime | None = None


def install_runtime(runtime: WorkerRuntime | None) -> None:
    global _runtime
    _runtime = runtime


class _RqContext:
    def __init__(self, job: Job, attempt: int) -> None:
        self._job = job
        self._attempt = attempt

    @property
    def job_id(self) -> str:
        return str(self._job.id)

    @property
    def attempt(self) -> int:
        return self._attempt

    async def set_progress(self, percent: int) -> None:
        self._job.meta["progress"] = max(0, min(100, int(percent)))
        await asyncio.to_thread(self._job.save_meta)


def perform(name: str, args: dict[str, Any]) -> Any:
    """The one function RQ runs: look up the Keel job by name and run one attempt of it."""
    if _runtime is None:
        raise RuntimeError("no Keel worker runtime installed in this process (start workers with `keel worker`)")
    job = get_current_job()
    assert job is not None
    spec = _runtime.registry.spec(name)
    attempt = int(job.meta.get("attempts", 0)) + 1
    job.meta["attempts"] = attempt
    job.meta.pop("error", None)
    job.save_meta()  # type: ignore[no-untyped-call]
    ctx = _RqContext(job, attempt)
    try:
        result = _runtime.call(
            execution.run(spec, args, ctx, job.meta, system="rq", tracer_provider=_runtime.tracer_provider)
        )
    except BaseException as exc:
        # RQ's own timeout is not a TimeoutError; report it like the in-process runner does.
        err = execution.error_of(TimeoutError() if isinstance(exc, JobTimeoutException) else exc)
        job.meta["error"] = {"code": err.code, "detail": err.detail}
        if not execution.is_retryable(exc):
            job.retries_left = 0  # RQ decides on the same job object right after this raises
        job.save_meta()  # type: ignore[no-untyped-call]
        raise
    return result  # progress reads as 100 once the job succeeded: no extra round trip here


class _Heartbeats:
    """RQ gives every running job a registry entry that expires ``monitoring interval + 60 s`` after its
    last heartbeat; only then is a killed worker's job seen as abandoned. ``heartbeat_grace``
    replaces the fixed 60 s so deployments (and tests) can choose how soon that happens."""

    heartbeat_grace: int = 60

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        interval: int = self.job_monitoring_interval  # type: ignore[attr-defined]
        if job.timeout and job.timeout > 0:
            return int(min(job.timeout - working_time, interval)) + self.heartbeat_grace
        return interval + self.heartbeat_grace


class KeelWorker(_Heartbeats, Worker):
    """Forks a work horse per job: a crash or leak in one job cannot take the worker down."""

    def perform_job(self, *args: Any, **kwargs: Any) -> bool:
        try:
            return bool(super().perform_job(*args, **kwargs))
        finally:
            # The work horse ends with os._exit(), which skips the batch span processor's shutdown:
            # without this, the job's own spans (always the last to end) would never be exported.
            flush = getattr(_runtime.tracer_provider if _runtime else None, "force_flush", None)
            if flush is not None:
                flush(2000)


class KeelSimpleWorker(_Heartbeats, SimpleWorker):
    """Runs jobs in the worker process itself: no fork per job, one warm runtime (higher throughput)."""
