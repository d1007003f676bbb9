"""The analytics context's job functions and schedule."""

from __future__ import annotations

import uuid
from datetime import date

from keel.contexts.analytics.domain.services import FLUSH_JOB, NIGHTLY_JOB, ROLLUP_JOB, AnalyticsService
from keel.platform.domain.jobs import DEFAULT, LOW, NO_RETRY, RetryPolicy
from keel.platform.ports.jobs import JobArgs, JobContext, JobSpec, PeriodicJob

# Rollups only read and replace: a retry after a crash or an outage is always safe.
_RETRY = RetryPolicy(retries=3, base=10, factor=3, cap=600)
FLUSH_EVERY = 60  # seconds: how stale today's API request count may be


def job_specs(service: AnalyticsService) -> list[JobSpec]:
    async def rollup(ctx: JobContext, args: JobArgs) -> dict[str, int]:
        days = await service.rollup(
            uuid.UUID(args["tenant_id"]),
            date.fromisoformat(args["from"]),
            date.fromisoformat(args["to"]),
            progress=ctx.set_progress,
        )
        return {"days": days}

    async def nightly(ctx: JobContext, args: JobArgs) -> dict[str, int]:
        return {"tenants": await service.nightly()}

    async def flush(ctx: JobContext, args: JobArgs) -> dict[str, int]:
        return {"requests": await service.flush_requests()}

    return [
        JobSpec(name=ROLLUP_JOB, handler=rollup, queue=LOW, retry=_RETRY, timeout=600),
        JobSpec(name=NIGHTLY_JOB, handler=nightly, queue=LOW, retry=_RETRY, timeout=600),
        # The next run picks up an unfinished batch, so a failed flush needs no retry of its own.
        JobSpec(name=FLUSH_JOB, handler=flush, queue=DEFAULT, retry=NO_RETRY, timeout=120),
    ]


PERIODIC = [
    PeriodicJob(name=NIGHTLY_JOB, cron="15 0 * * *"),  # 00:15 every night
    PeriodicJob(name=FLUSH_JOB, every=FLUSH_EVERY),
]
