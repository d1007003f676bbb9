from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from keel.platform.domain.jobs import DEFAULT, JobInfo, RetryPolicy

JobArgs = Mapping[str, Any]  # JSON-safe: plain ids and values; the job loads its own state


class JobContext(Protocol):
    """What a running job knows about itself."""

    @property
    def job_id(self) -> str: ...

    @property
    def attempt(self) -> int:
        """1 on the first run, 2 on the first retry, ..."""
        ...

    async def set_progress(self, percent: int) -> None:
        """0-100, shown by ``GET /v1/jobs/{id}``."""
        ...


JobHandler = Callable[[JobContext, JobArgs], Awaitable[Any]]


@dataclass(frozen=True, slots=True, kw_only=True)
class JobSpec:
    """A job function and how it runs. Handlers must be idempotent: delivery is at least once."""

    name: str  # "<context>.<verb>", e.g. "webhooks.deliver"
    handler: JobHandler
    queue: str = DEFAULT
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout: int = 300  # seconds before the worker kills the run (it then counts as a failure)


@runtime_checkable  # Litestar checks injected dependencies with isinstance
class JobQueue(Protocol):
    """Puts work on a queue and reports on it. Adapters: RQ (production) and in-process (embedded)."""

    async def enqueue(
        self,
        name: str,
        args: JobArgs,
        *,
        tenant_id: uuid.UUID | None = None,
        delay: float = 0.0,
        job_id: str | None = None,
    ) -> str:
        """Returns the job id. With ``job_id`` given and that job already known, nothing is enqueued
        (events re-published by the outbox map to the same job)."""
        ...

    async def get(self, job_id: str) -> JobInfo | None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class PeriodicJob:
    """A job (taking no arguments) enqueued by the cron process every ``every`` seconds, or at the
    times of a ``cron`` expression (five fields, the machine's local time, as RQ reads them)."""

    name: str
    every: int = 0
    cron: str | None = None

    def __post_init__(self) -> None:
        if (self.every > 0) == (self.cron is not None):
            raise ValueError(f"{self.name}: give exactly one of `every` (seconds) and `cron`")
        if self.cron is not None and len(self.cron.split()) != 5:
            raise ValueError(f"{self.name}: `cron` takes five fields (minute hour day month weekday)")

    def job_id_at(self, timestamp: float) -> str:
        """One job id per interval (per minute for cron schedules): a second scheduler, or a backlog,
        still makes one run per slot."""
        return f"cron-{self.name.replace('.', '-')}-{int(timestamp) // (self.every or 60)}"
