"""Periodic jobs on RQ's cron scheduler (``keel cron``), enqueued like every other Keel job."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from redis import Redis
from rq.cron import CronJob, CronScheduler

from keel.platform.adapters.jobs import execution
from keel.platform.adapters.jobs.rq_queue import PERFORM, RqJobQueue
from keel.platform.ports.jobs import PeriodicJob


class _KeelCronJob(CronJob):
    """RQ's CronJob enqueues with the default (pickle) serializer; Keel's queues are JSON, so the
    enqueue goes through ``RqJobQueue``, with one job id per time slot."""

    def __init__(self, jobs: RqJobQueue, periodic: PeriodicJob, queue_name: str) -> None:
        super().__init__(
            queue_name=queue_name,
            func_name=PERFORM,
            interval=periodic.every or None,
            cron=periodic.cron,
            name=periodic.name,
        )
        self._jobs = jobs
        self._periodic = periodic

    def enqueue(self, connection: Redis) -> Any:
        name = self._periodic.name
        meta = execution.enqueue_meta(name, None)
        return self._jobs.enqueue_sync(name, {}, meta, 0.0, self._periodic.job_id_at(time.time()))


class KeelCronScheduler(CronScheduler):
    def __init__(
        self, connection: Redis, jobs: RqJobQueue, registry: execution.JobRegistry, periodic: Sequence[PeriodicJob]
    ) -> None:
        super().__init__(connection=connection, name="")
        for p in periodic:
            self._cron_jobs.append(_KeelCronJob(jobs, p, registry.spec(p.name).queue))
