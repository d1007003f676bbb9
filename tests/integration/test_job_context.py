"""A job runs in the context of the request that enqueued it: same trace (a CONSUMER span whose
parent is the enqueuing span), same request id on every log line, wherever the job runs."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from loguru import logger
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from keel.platform.adapters.clock import SystemClock
from keel.platform.adapters.jobs.execution import JobRegistry
from keel.platform.adapters.jobs.in_process import InProcessJobQueue
from keel.platform.adapters.jobs.rq_queue import RqJobQueue, WorkerRuntime
from keel.platform.context import request_id_var
from keel.platform.domain.jobs import HIGH, NO_RETRY, JobFailed, JobStatus, RetryPolicy
from keel.platform.ports.jobs import JobArgs, JobContext, JobQueue, JobSpec
from tests.support.app import client_for, make_settings, signup
from tests.support.rq import run_rq_worker, runtime_installed
from tests.support.waiting import eventually

EXECUTION_LOGGER = "keel.platform.adapters.jobs.execution"


def hex_trace(span: ReadableSpan) -> str:
    return format(span.context.trace_id, "032x")


def hex_span(span: ReadableSpan) -> str:
    return format(span.context.span_id, "016x")


# -- (a) the embedded default: a real request, its event, its jobs --------------------------------------


async def test_jobs_started_by_a_request_continue_its_trace_and_carry_its_request_id(
    sqlite_url: str,
    tmp_path: Path,
    spans: tuple[TracerProvider, InMemorySpanExporter],
    json_logs: list[dict[str, Any]],
) -> None:
    provider, exporter = spans
    job_names = {"webhooks.fan_out", "notifications.send_for_event"}
    async with client_for(make_settings(sqlite_url, tmp_path), tracer_provider=provider) as client:
        t = await signup(client)
        r = await client.post(
            "/v1/users",
            json={"email": "new.user@acme.test", "name": "New User"},
            headers={**t["headers"], "X-Request-ID": "req-xyz"},
        )
        assert r.status_code == 201, r.text

        async def post_span() -> ReadableSpan | None:
            found = [
                s
                for s in exporter.get_finished_spans()
                if s.kind == SpanKind.SERVER and s.name.startswith("POST /v1/users")
            ]
            return found[0] if found else None

        server = await eventually(post_span)
        trace_id = server.context.trace_id

        async def jobs_of_the_request() -> list[ReadableSpan] | None:
            found = [
                s for s in exporter.get_finished_spans() if s.name.startswith("job ") and s.context.trace_id == trace_id
            ]
            return found if {s.name.removeprefix("job ") for s in found} >= job_names else None

        job_spans = await eventually(jobs_of_the_request)

        # Each span names its job: the request's tenant owns it, and it succeeded.
        container = client.app.state["container"]
        for span in job_spans:
            assert span.attributes is not None
            job = await container.jobs.get(str(span.attributes["messaging.message.id"]))
            assert job is not None
            assert job.name == span.name.removeprefix("job ")
            assert job.status is JobStatus.SUCCEEDED
            assert str(job.tenant_id) == t["tenant"]["id"]
            assert job.meta["request_id"] == "req-xyz"

    request_spans = {s.context.span_id for s in exporter.get_finished_spans() if s.context.trace_id == trace_id} - {
        s.context.span_id for s in job_spans
    }
    for span in job_spans:
        assert span.kind == SpanKind.CONSUMER
        assert span.parent is not None
        assert span.parent.is_remote  # carried through the job's meta, not a live in-process context
        assert span.parent.trace_id == trace_id
        assert span.parent.span_id in request_spans  # a span of the request that enqueued it
        assert span.attributes is not None
        assert span.attributes["messaging.system"] == "in-process"
        assert span.attributes["messaging.destination.name"] == HIGH
        assert span.attributes["keel.job.attempt"] == 1

    job_lines = [
        line
        for line in json_logs
        if line["logger"] == EXECUTION_LOGGER
        and line.get("job") in job_names
        and line["msg"] in ("job started", "job succeeded")
        and line.get("trace_id") == format(trace_id, "032x")
    ]
    for name in job_names:
        assert {line["msg"] for line in job_lines if line["job"] == name} == {"job started", "job succeeded"}
    assert {line["request_id"] for line in job_lines} == {"req-xyz"}
    by_span = {hex_span(s) for s in job_spans}
    assert {line["span_id"] for line in job_lines} == by_span  # logged inside the job's own span
    # The signup's own jobs (welcome mail, ...) belong to the signup request, not to this one.
    assert all(
        line.get("request_id") != "req-xyz"
        for line in json_logs
        if line["logger"] == EXECUTION_LOGGER and line.get("trace_id") != format(trace_id, "032x")
    )


# -- (b) either adapter, from a hand-made request context ---------------------------------------------


@dataclass
class Jobs:
    queue: JobQueue
    registry: JobRegistry
    kind: str
    connection: redis.Redis | None

    async def settle(self, job_id: str, within: float = 15.0) -> None:
        if self.connection is not None:
            # Retries come back after whole seconds: keep bursting until the job is final.
            async def final_after_a_burst() -> bool:
                run_rq_worker(self.connection)  # type: ignore[arg-type]
                job = await self.queue.get(job_id)
                return job is not None and job.status.is_final

            await eventually(final_after_a_burst, within=within, interval=0.05)
            return

        async def final() -> bool:
            job = await self.queue.get(job_id)
            return job is not None and job.status.is_final

        await eventually(final, within=within)


@pytest.fixture(params=["in-process", "rq"])
def backend(request: pytest.FixtureRequest) -> str | None:
    return None if request.param == "in-process" else str(request.getfixturevalue("redis_url"))


@pytest.fixture
async def jobs(backend: str | None, spans: tuple[TracerProvider, InMemorySpanExporter]) -> AsyncIterator[Jobs]:
    provider, _ = spans
    registry = JobRegistry()
    if backend is None:
        queue = InProcessJobQueue(registry, SystemClock(), tracer_provider=provider)
        queue.start()
        try:
            yield Jobs(queue, registry, "in-process", None)
        finally:
            await queue.stop()
        return

    connection = redis.Redis.from_url(backend)

    try:
        with runtime_installed(WorkerRuntime(registry, tracer_provider=provider)):
            yield Jobs(RqJobQueue(connection, registry), registry, "rq", connection)
    finally:
        connection.close()


@dataclass
class Seen:
    request_ids: list[str | None]
    attempts: list[int]


def traced_handler(seen: Seen, fail_first: bool = False) -> Any:
    async def handler(ctx: JobContext, args: JobArgs) -> str:
        seen.request_ids.append(request_id_var.get())
        seen.attempts.append(ctx.attempt)
        logger.info("handling thing {} (attempt {})", args["thing"], ctx.attempt)
        if fail_first and ctx.attempt == 1:
            raise JobFailed("not yet")
        return "ok"

    return handler


async def test_a_job_continues_the_trace_and_request_id_of_its_enqueuer(
    jobs: Jobs, spans: tuple[TracerProvider, InMemorySpanExporter], json_logs: list[dict[str, Any]]
) -> None:
    provider, exporter = spans
    seen = Seen([], [])
    jobs.registry.register(JobSpec(name="test.traced", handler=traced_handler(seen), queue=HIGH, retry=NO_RETRY))
    thing = uuid.uuid4().hex

    # A request: its id in the context var, its server span current.
    token = request_id_var.set("req-ctx-1")
    try:
        with provider.get_tracer("test").start_as_current_span("POST /v1/things", kind=SpanKind.SERVER) as parent:
            job_id = await jobs.queue.enqueue("test.traced", {"thing": thing})
    finally:
        request_id_var.reset(token)
    await jobs.settle(job_id)

    (span,) = [s for s in exporter.get_finished_spans() if s.name == "job test.traced"]
    assert span.kind == SpanKind.CONSUMER
    assert span.context.trace_id == parent.get_span_context().trace_id
    assert span.parent is not None
    assert span.parent.span_id == parent.get_span_context().span_id
    assert span.attributes is not None
    assert span.attributes["messaging.system"] == jobs.kind
    assert span.attributes["messaging.destination.name"] == HIGH
    assert span.attributes["messaging.message.id"] == job_id
    assert span.attributes["keel.job.attempt"] == 1

    assert seen.request_ids == ["req-ctx-1"]
    (handler_line,) = [line for line in json_logs if line["msg"].startswith(f"handling thing {thing}")]
    assert handler_line["request_id"] == "req-ctx-1"
    assert handler_line["trace_id"] == hex_trace(span)
    assert handler_line["span_id"] == hex_span(span)
    framing = [line for line in json_logs if line["logger"] == EXECUTION_LOGGER and line.get("job_id") == job_id]
    assert [line["msg"] for line in framing] == ["job started", "job succeeded"]
    for line in framing:
        assert line["request_id"] == "req-ctx-1"
        assert line["trace_id"] == hex_trace(span)
        assert line["job"] == "test.traced"
        assert line["attempt"] == 1
    assert framing[1]["duration_ms"] >= 0


async def test_every_attempt_of_a_retried_job_joins_the_enqueuing_trace(
    jobs: Jobs, spans: tuple[TracerProvider, InMemorySpanExporter], json_logs: list[dict[str, Any]]
) -> None:
    provider, exporter = spans
    seen = Seen([], [])
    unit = 1.0 if jobs.kind == "rq" else 0.05
    policy = RetryPolicy(retries=1, base=unit, factor=1, jitter=0)
    jobs.registry.register(JobSpec(name="test.retried", handler=traced_handler(seen, fail_first=True), retry=policy))

    token = request_id_var.set("req-ctx-2")
    try:
        with provider.get_tracer("test").start_as_current_span("POST /v1/things", kind=SpanKind.SERVER) as parent:
            job_id = await jobs.queue.enqueue("test.retried", {"thing": "retried"})
    finally:
        request_id_var.reset(token)
    await jobs.settle(job_id)

    job = await jobs.queue.get(job_id)
    assert job is not None
    assert (job.status, job.attempts) == (JobStatus.SUCCEEDED, 2)
    attempts = sorted(
        (s for s in exporter.get_finished_spans() if s.name == "job test.retried"),
        key=lambda s: (s.attributes or {})["keel.job.attempt"],
    )
    assert [(s.attributes or {})["keel.job.attempt"] for s in attempts] == [1, 2]
    for span in attempts:
        assert span.context.trace_id == parent.get_span_context().trace_id
        assert span.parent is not None
        assert span.parent.span_id == parent.get_span_context().span_id
    assert seen.request_ids == ["req-ctx-2", "req-ctx-2"]
    failed = [line for line in json_logs if line.get("job_id") == job_id and line["msg"] == "job failed: not yet"]
    assert [(line["request_id"], line["attempt"]) for line in failed] == [("req-ctx-2", 1)]


async def test_a_job_enqueued_outside_any_request_starts_its_own_trace(
    jobs: Jobs, spans: tuple[TracerProvider, InMemorySpanExporter], json_logs: list[dict[str, Any]]
) -> None:
    _, exporter = spans
    seen = Seen([], [])
    jobs.registry.register(JobSpec(name="test.untraced", handler=traced_handler(seen), retry=NO_RETRY))
    job_id = await jobs.queue.enqueue("test.untraced", {"thing": "cron"})
    await jobs.settle(job_id)

    (span,) = [s for s in exporter.get_finished_spans() if s.name == "job test.untraced"]
    assert span.parent is None
    assert span.kind == SpanKind.CONSUMER
    assert seen.request_ids == [None]
    framing = [line for line in json_logs if line["logger"] == EXECUTION_LOGGER and line.get("job_id") == job_id]
    assert [line["msg"] for line in framing] == ["job started", "job succeeded"]
    assert all("request_id" not in line for line in framing)
    assert all(line["trace_id"] == hex_trace(span) for line in framing)
