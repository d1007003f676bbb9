"""The payments context's job functions. A provider outage is a retryable job failure; on the job's
last attempt the service records it on the payment instead, so nothing stays pending for ever."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

from keel.contexts.payments.domain.model import ProviderUnavailable
from keel.contexts.payments.domain.services import CAPTURE_JOB, REFUND_JOB, RESUME_JOB, PaymentsService
from keel.platform.domain.events import event_from_args
from keel.platform.domain.jobs import DEFAULT, NO_RETRY, JobFailed, RetryPolicy
from keel.platform.ports.jobs import JobArgs, JobContext, JobHandler, JobSpec, PeriodicJob

# About 30 minutes of retries (5 s ... 20 min): providers' idempotency keys live for a day.
PROVIDER_RETRY = RetryPolicy(retries=6, base=5, factor=3, cap=1800)


def _target(args: JobArgs, key: str) -> tuple[uuid.UUID, uuid.UUID]:
    """(tenant, id) from the event that triggered the job, or from the safety net's plain ids."""
    if "event" in args:
        event = event_from_args(args["event"])
        return event.tenant_id, uuid.UUID(event.data[key])
    return uuid.UUID(args["tenant_id"]), uuid.UUID(args[key])


def _settling(settle: Callable[..., Awaitable[str]], key: str, retry: RetryPolicy) -> JobHandler:
    async def handler(ctx: JobContext, args: JobArgs) -> dict[str, str]:
        tenant_id, target = _target(args, key)
        try:
            outcome = await settle(tenant_id, target, final_attempt=ctx.attempt > retry.retries)
        except ProviderUnavailable as exc:
            raise JobFailed(
                f"The payment provider is unavailable ({exc}); retrying.", code="provider-unavailable"
            ) from None
        return {"outcome": outcome}

    return handler


def job_specs(service: PaymentsService) -> list[JobSpec]:
    async def resume(ctx: JobContext, args: JobArgs) -> dict[str, int]:
        return {"resumed": await service.resume_pending()}

    return [
        JobSpec(
            name=CAPTURE_JOB,
            handler=_settling(service.capture, "payment_id", PROVIDER_RETRY),
            queue=DEFAULT,
            retry=PROVIDER_RETRY,
            timeout=120,
        ),
        JobSpec(
            name=REFUND_JOB,
            handler=_settling(service.refund, "refund_id", PROVIDER_RETRY),
            queue=DEFAULT,
            retry=PROVIDER_RETRY,
            timeout=120,
        ),
        JobSpec(name=RESUME_JOB, handler=resume, queue=DEFAULT, retry=NO_RETRY, timeout=300),
    ]


PERIODIC = [PeriodicJob(name=RESUME_JOB, every=300)]
