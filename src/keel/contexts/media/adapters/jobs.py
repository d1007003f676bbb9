from __future__ import annotations

import uuid

from keel.contexts.media.domain.services import FORGET_JOB, PROCESS_JOB, MediaService
from keel.platform.domain.events import event_from_args
from keel.platform.domain.jobs import LOW, RetryPolicy
from keel.platform.ports.jobs import JobArgs, JobContext, JobSpec

# Failures here are crashes and outages (the image was validated at upload): retry a few times.
_RETRY = RetryPolicy(retries=3, base=5, factor=4, cap=300)


def job_specs(service: MediaService) -> list[JobSpec]:
    async def process(ctx: JobContext, args: JobArgs) -> dict[str, str]:
        event = event_from_args(args["event"])
        user_id, upload_id = uuid.UUID(event.data["user_id"]), uuid.UUID(event.data["upload_id"])
        return {"outcome": await service.process_avatar(event.tenant_id, user_id, upload_id)}

    async def forget(ctx: JobContext, args: JobArgs) -> dict[str, str]:
        event = event_from_args(args["event"])
        return {"outcome": await service.forget_user(event.tenant_id, uuid.UUID(event.data["user_id"]))}

    return [
        JobSpec(name=PROCESS_JOB, handler=process, queue=LOW, retry=_RETRY, timeout=120),
        JobSpec(name=FORGET_JOB, handler=forget, queue=LOW, retry=_RETRY, timeout=120),
    ]
