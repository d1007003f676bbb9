"""``GET /v1/jobs/{id}`` and the ``202 Accepted`` answer of every endpoint that hands work to a job."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, TypeVar

import msgspec
from litestar import Controller, Response, get
from litestar.di import NamedDependency
from litestar.params import FromPath
from litestar.status_codes import HTTP_202_ACCEPTED

from keel.platform.adapters.http.auth import BEARER_AUTH, Authenticated
from keel.platform.adapters.http.problems import problem_responses
from keel.platform.domain.errors import NotFound
from keel.platform.domain.jobs import JobInfo, JobStatus
from keel.platform.ports.jobs import JobQueue

B = TypeVar("B")


class JobErrorOut(msgspec.Struct, frozen=True):
    code: str
    detail: str


class JobOut(msgspec.Struct, frozen=True):
    id: str
    type: str
    status: JobStatus
    progress: int
    attempts: int
    result: Any | None
    error: JobErrorOut | None
    enqueued_at: datetime | None
    started_at: datetime | None
    ended_at: datetime | None

    @classmethod
    def of(cls, job: JobInfo) -> JobOut:
        return cls(
            id=job.id,
            type=job.name,
            status=job.status,
            progress=job.progress,
            attempts=job.attempts,
            result=job.result,
            error=JobErrorOut(code=job.error.code, detail=job.error.detail) if job.error else None,
            enqueued_at=job.enqueued_at,
            started_at=job.started_at,
            ended_at=job.ended_at,
        )


class JobAccepted(msgspec.Struct, frozen=True):
    job_id: str
    status_url: str


def job_status_url(job_id: str) -> str:
    return f"/v1/jobs/{job_id}"


def accepted_as(body: B, job_id: str) -> Response[B]:
    """``202 Accepted`` with ``Location`` pointing at the job's status."""
    return Response(body, status_code=HTTP_202_ACCEPTED, headers={"Location": job_status_url(job_id)})


def accepted(job_id: str) -> Response[JobAccepted]:
    return accepted_as(JobAccepted(job_id=job_id, status_url=job_status_url(job_id)), job_id)


class JobController(Controller):
    path = "/v1/jobs"
    tags = ["jobs"]
    security = BEARER_AUTH

    @get(
        "/{job_id:uuid}",
        summary="Status, progress and outcome of a background job",
        description="Jobs are visible to the tenant that started them for 24 hours after they end.",
        responses=problem_responses(401, 404, 429, 503),
    )
    async def get_job(
        self, job_id: FromPath[uuid.UUID], jobs: NamedDependency[JobQueue], request: Authenticated
    ) -> JobOut:
        job = await jobs.get(str(job_id))
        if job is None or job.tenant_id != request.user.tenant_id:
            raise NotFound("No such job.")
        return JobOut.of(job)
