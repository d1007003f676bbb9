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
    enqueue goes through ``RqJobQueue``. The id is per time slot: two cron processes, or a cron that
    ran while no worker did, still produce one job per slot."""

    def __init__(self, jobs: RqJobQueue, periodic: PeriodicJob, queue_name: str) -> None:
        super().__init__(queue_name=queue_name, func_name=PERFORM, interval=periodic.every, name=periodic.name)
        self._jobs = jobs
        self._periodic = periodic

    def enqueue(self, connection: Redis) -> Any:
        slot = int(time.time()) // self._periodic.every
        name = self._periodic.name
        return self._jobs.enqueue_sync(
            name, {}, execution.enqueue_meta(name, None), self.queue_name, 0.0, f"cron-{name.replace('.', '-')}-{slot}"
        )


class KeelCronScheduler(CronScheduler):
    def __init__(
        self, connection: Redis, jobs: RqJobQueue, registry: execution.JobRegistry, periodic: Sequence[PeriodicJob]
    ) -> None:
        super().__init__(connection=connection, name="")
        for p in periodic:
            self._cron_jobs.append(_KeelCronJob(jobs, p, registry.spec(p.name).queue))
