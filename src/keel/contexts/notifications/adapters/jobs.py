from __future__ import annotations

from keel.contexts.notifications.domain.services import SEND_JOB, NotificationsService
from keel.platform.domain.events import event_from_args
from keel.platform.domain.jobs import HIGH, RetryPolicy
from keel.platform.ports.jobs import JobArgs, JobContext, JobSpec

# A mail server that is down for a while is normal: retry for about a day.
_MAIL_RETRY = RetryPolicy(retries=8, base=10, factor=3, cap=4 * 3600)


def job_specs(service: NotificationsService) -> list[JobSpec]:
    async def send_for_event(ctx: JobContext, args: JobArgs) -> dict[str, str]:
        return {"outcome": await service.send_for_event(event_from_args(args["event"]))}

    return [JobSpec(name=SEND_JOB, handler=send_for_event, queue=HIGH, retry=_MAIL_RETRY, timeout=120)]
