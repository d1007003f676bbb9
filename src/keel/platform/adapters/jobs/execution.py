"""What every adapter does around a job run: the registry of job functions, the request context
carried from enqueue to the worker (request id, W3C trace context), one consumer span and the
start/end log lines. Both adapters call ``run`` so a job behaves the same wherever it runs."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from loguru import logger
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode, TracerProvider

from keel.platform.context import request_id_var
from keel.platform.domain.jobs import JobError, JobFailed
from keel.platform.ports.jobs import JobArgs, JobContext, JobSpec

UNEXPECTED = JobError(code="job-error", detail="The job failed unexpectedly; it has been logged.")


class UnknownJob(LookupError):
    pass


class JobRegistry:
    """Job functions by name. Filled by the composition root from each context's ``adapters.jobs``."""

    def __init__(self, specs: Iterable[JobSpec] = ()) -> None:
        self._specs: dict[str, JobSpec] = {}
        self.register(*specs)

    def register(self, *specs: JobSpec) -> None:
        for spec in specs:
            if spec.name in self._specs:
                raise ValueError(f"job {spec.name!r} registered twice")
            self._specs[spec.name] = spec

    def spec(self, name: str) -> JobSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise UnknownJob(f"no job named {name!r}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._specs

    def names(self) -> list[str]:
        return sorted(self._specs)


def enqueue_meta(name: str, tenant_id: uuid.UUID | None) -> dict[str, Any]:
    """Meta stored with a new job: who it is for and where it came from (request id, traceparent)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return {
        "name": name,
        "tenant_id": str(tenant_id) if tenant_id else None,
        "request_id": request_id_var.get(),
        "trace": carrier,
        "progress": 0,
        "attempts": 0,
    }


def error_of(exc: BaseException) -> JobError:
    if isinstance(exc, JobFailed):
        return JobError(code=exc.code, detail=exc.detail)
    if isinstance(exc, TimeoutError):
        return JobError(code="job-timeout", detail="The job ran out of time.")
    return UNEXPECTED


def is_retryable(exc: BaseException) -> bool:
    return not (isinstance(exc, JobFailed) and not exc.retry)


async def run(
    spec: JobSpec,
    args: JobArgs,
    ctx: JobContext,
    meta: Mapping[str, Any],
    *,
    system: str,
    tracer_provider: TracerProvider | None = None,
) -> Any:
    """Run one attempt of a job inside the context of the request that enqueued it."""
    token = request_id_var.set(meta.get("request_id"))
    parent = propagate.extract(meta.get("trace") or {})
    tracer = trace.get_tracer("keel.jobs", tracer_provider=tracer_provider)
    log = logger.bind(job_id=ctx.job_id, job=spec.name, attempt=ctx.attempt)
    started = time.perf_counter()
    try:
        with tracer.start_as_current_span(
            f"job {spec.name}",
            context=parent,
            kind=SpanKind.CONSUMER,
            record_exception=False,
            set_status_on_exception=False,
            attributes={
                "messaging.system": system,
                "messaging.operation.type": "process",
                "messaging.destination.name": spec.queue,
                "messaging.message.id": ctx.job_id,
                "keel.job.attempt": ctx.attempt,
            },
        ) as span:
            log.info("job started")
            try:
                result = await spec.handler(ctx, args)
            except asyncio.CancelledError:
                # Shutdown or a worker timeout: not the job's fault, and it runs again (at least once).
                log.info("job interrupted")
                raise
            except BaseException as exc:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                elapsed = round((time.perf_counter() - started) * 1000, 2)
                if isinstance(exc, JobFailed):
                    log.bind(duration_ms=elapsed).warning("job failed: {}", exc.detail)
                else:
                    log.opt(exception=exc).bind(duration_ms=elapsed).error("job raised {}", type(exc).__name__)
                raise
            log.bind(duration_ms=round((time.perf_counter() - started) * 1000, 2)).info("job succeeded")
            return result
    finally:
        request_id_var.reset(token)
