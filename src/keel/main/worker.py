"""The worker side of the composition root: ``keel worker`` (RQ workers with the scheduler) and
``keel cron`` (periodic jobs). Both need Redis; the embedded default runs jobs inside ``keel serve``."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Sequence

from loguru import logger
from redis import Redis
from rq.serializers import JSONSerializer

from keel.main.container import build_container
from keel.main.logging import configure_logging
from keel.main.settings import Settings
from keel.main.telemetry import build_tracer_provider, instrument
from keel.platform.adapters.jobs.rq_cron import KeelCronScheduler
from keel.platform.adapters.jobs.rq_queue import (
    KeelSimpleWorker,
    KeelWorker,
    RqJobQueue,
    WorkerRuntime,
    install_runtime,
)
from keel.platform.domain.jobs import QUEUES


def make_runtime(settings: Settings) -> WorkerRuntime:
    """The async world in which jobs run. The object graph is built once, here, before any fork and
    before anything connects (engines and clients connect lazily), so a forking worker's horses
    inherit it ready-made and only open their own connections."""
    provider = build_tracer_provider(settings)
    container = build_container(settings)
    if provider is not None:
        instrument(provider, container.engine)

    return WorkerRuntime(container.job_registry, tracer_provider=provider)


def _connection(settings: Settings) -> Redis:
    assert settings.redis_url is not None
    return Redis.from_url(settings.redis_url, socket_connect_timeout=5, health_check_interval=15)


def run_worker(
    settings: Settings,
    *,
    queues: Sequence[str] = QUEUES,
    burst: bool = False,
    simple: bool = False,
    name: str | None = None,
    maintenance_interval: int = 600,
    monitoring_interval: int = 30,
    heartbeat_grace: int = 60,
    worker_ttl: int = 420,
) -> bool:
    configure_logging(settings.log_level, settings.log_json)
    install_runtime(make_runtime(settings))
    worker_class = KeelSimpleWorker if simple else KeelWorker
    worker = worker_class(
        list(queues),
        connection=_connection(settings),
        serializer=JSONSerializer,
        name=name or f"keel-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}",
        maintenance_interval=maintenance_interval,
        job_monitoring_interval=monitoring_interval,
        worker_ttl=worker_ttl,
    )
    worker.heartbeat_grace = heartbeat_grace
    logger.info(
        "worker {} listening on {} ({}, {})",
        worker.name,
        ",".join(queues),
        "burst" if burst else "continuous",
        "in-process" if simple else "fork per job",
    )
    # The scheduler moves due retries and delayed jobs onto their queues; one worker holds its lock at a time.
    return bool(worker.work(burst=burst, with_scheduler=True, logging_level=settings.log_level))


def run_cron(settings: Settings) -> None:
    """Enqueue periodic jobs on schedule. Run one per deployment (job ids per time slot make a second
    one harmless, not useful)."""
    configure_logging(settings.log_level, settings.log_json)
    connection = _connection(settings)
    # Only the registry (job name -> queue) and the schedule are needed: nothing here connects.
    container = build_container(settings)
    registry = container.job_registry
    scheduler = KeelCronScheduler(connection, RqJobQueue(connection, registry), registry, container.periodic)
    logger.info("cron: {}", ", ".join(f"{p.name} every {p.every}s" for p in container.periodic))
    scheduler.start()  # type: ignore[no-untyped-call]
