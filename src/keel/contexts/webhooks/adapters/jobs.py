"""The webhooks context's job functions: arguments are ids and values; state is loaded inside."""

from __future__ import annotations

import uuid

from keel.contexts.webhooks.domain.services import DELIVER_JOB, FAN_OUT_JOB, REQUEUE_JOB, WebhooksService
from keel.platform.domain.events import event_from_args
from keel.platform.domain.jobs import HIGH, NO_RETRY, RetryPolicy
from keel.platform.ports.jobs import JobArgs, JobContext, JobSpec, PeriodicJob

# Job-level retries cover crashes and outages (database, queue); HTTP failures are not exceptions:
# the delivery schedules its own next attempt, honouring the receiver's Retry-After.
_CRASH_RETRY = RetryPolicy(retries=5, base=5, factor=3, cap=600)


def job_specs(service: WebhooksService) -> list[JobSpec]:
    async def fan_out(ctx: JobContext, args: JobArgs) -> dict[str, int]:
        return {"deliveries": await service.fan_out(event_from_args(args["event"]))}

    async def deliver(ctx: JobContext, args: JobArgs) -> dict[str, str]:
        verdict = await service.attempt(uuid.UUID(args["tenant_id"]), uuid.UUID(args["delivery_id"]), ctx.job_id)
        return {"outcome": verdict}

    async def requeue(ctx: JobContext, args: JobArgs) -> dict[str, int]:
        return {"requeued": await service.requeue_overdue()}

    return [
        JobSpec(name=FAN_OUT_JOB, handler=fan_out, queue=HIGH, retry=_CRASH_RETRY, timeout=120),
        JobSpec(name=DELIVER_JOB, handler=deliver, queue=HIGH, retry=_CRASH_RETRY, timeout=60),
        JobSpec(name=REQUEUE_JOB, handler=requeue, queue=HIGH, retry=NO_RETRY, timeout=120),
    ]


PERIODIC = [PeriodicJob(name=REQUEUE_JOB, every=60)]
