"""Background jobs as the core sees them: names, statuses, retry policy. No queue technology here."""

from __future__ import annotations

import random
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

# Priority queues, highest first: workers listening on several always drain `high` before `default`.
HIGH = "high"  # user-visible side effects: webhooks, emails
DEFAULT = "default"
LOW = "low"  # bulk work: media variants, analytics rollups
QUEUES = (HIGH, DEFAULT, LOW)


class JobStatus(StrEnum):
    QUEUED = "queued"
    SCHEDULED = "scheduled"  # waiting for its start time or for its next retry
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def is_final(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """Exponential backoff with jitter: ``base * factor**n`` seconds, capped, each delay moved by up to
    ``jitter`` (a fraction) so that jobs failing together do not come back together."""

    retries: int = 5
    base: float = 10.0
    factor: float = 4.0
    cap: float = 3600.0
    jitter: float = 0.2

    def delays(self, rng: random.Random | None = None) -> list[float]:
        """One delay in seconds per retry, drawn once when the job is enqueued."""
        r = rng or random
        return [
            min(self.cap, self.base * self.factor**n) * (1 + r.uniform(-self.jitter, self.jitter))
            for n in range(self.retries)
        ]


NO_RETRY = RetryPolicy(retries=0)


@dataclass(frozen=True, slots=True, kw_only=True)
class JobError:
    """What a tenant may see of a failure: a stable code and a sentence, never a traceback."""

    code: str
    detail: str


class JobFailed(Exception):
    """Raised by a job for a failure whose message is safe to show to the tenant that owns the job."""

    def __init__(self, detail: str, *, code: str = "job-failed", retry: bool = True) -> None:
        super().__init__(detail)
        self.detail = detail
        self.code = code
        self.retry = retry


@dataclass(frozen=True, slots=True, kw_only=True)
class JobInfo:
    id: str
    name: str
    queue: str
    status: JobStatus
    tenant_id: uuid.UUID | None
    progress: int = 0
    attempts: int = 0
    result: Any = None
    error: JobError | None = None
    enqueued_at: datetime | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)
