"""``GET /v1/jobs/{id}``: the tenant that started a job follows it; nobody else can tell it exists.

Run on the embedded default (jobs run inside the API process) and on Redis (jobs wait in RQ until a
``keel worker`` runs them: here a simple worker in burst mode on the runtime ``keel worker`` builds).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from keel.main.container import Container
from keel.main.settings import Settings
from keel.main.worker import make_runtime
from keel.platform.adapters.jobs.execution import UNEXPECTED
from keel.platform.adapters.jobs.in_process import InProcessJobQueue
from keel.platform.adapters.jobs.rq_queue import WorkerRuntime
from keel.platform.adapters.sql.outbox import SWEEP_JOB
from keel.platform.domain.jobs import JobInfo, JobStatus
from tests.support.app import client_for, make_settings, signup
from tests.support.receivers import webhook_receiver
from tests.support.rq import run_rq_worker, runtime_installed
from tests.support.waiting import eventually

Client = AsyncTestClient[Litestar]
SEND_JOB = "notifications.send_for_event"
JOB_FIELDS = {
    "id",
    "type",
    "status",
    "progress",
    "attempts",
    "result",
    "error",
    "enqueued_at",
    "started_at",
    "ended_at",
}


@pytest.fixture(params=["embedded", "redis"])
def backend(request: pytest.FixtureRequest) -> str | None:
    """None for the embedded default, else the URL of a freshly emptied Redis."""
    return None if request.param == "embedded" else str(request.getfixturevalue("redis_url"))


@dataclass
class Api:
    client: Client
    settings: Settings
    runtime: WorkerRuntime | None  # the worker side, with Redis
    a: dict[str, Any] = field(default_factory=dict)
    b: dict[str, Any] = field(default_factory=dict)

    @property
    def container(self) -> Container:
        container: Container = self.client.app.state["container"]
        return container

    @property
    def queued_until_a_worker_runs(self) -> bool:
        return self.runtime is not None

    async def enqueue(self, name: str, args: dict[str, Any], tenant: dict[str, Any] | None) -> str:
        tenant_id = uuid.UUID(tenant["tenant"]["id"]) if tenant else None
        return await self.container.jobs.enqueue(name, args, tenant_id=tenant_id)

    async def job(self, job_id: str) -> JobInfo:
        info = await self.container.jobs.get(job_id)
        assert info is not None
        return info

    async def work(self, job_id: str, until: Any = None) -> None:
        """Get jobs run until ``until(info)`` holds for ``job_id`` (default: the job is final)."""
        done = until or (lambda info: info.status.is_final)
        if self.runtime is None:

            async def probe() -> bool:
                return bool(done(await self.job(job_id)))

            await eventually(probe)
            return
        self.run_worker()
        assert done(await self.job(job_id)), await self.job(job_id)

    def run_worker(self) -> None:
        """One burst of ``keel worker --simple --burst`` (Redis only): runs everything queued, then returns."""
        connection = self.container.redis_sync
        assert connection is not None
        run_rq_worker(connection)

    async def get(self, job_id: str, who: dict[str, Any] | None) -> Any:
        return await self.client.get(f"/v1/jobs/{job_id}", headers=who["headers"] if who else {})


@pytest.fixture
async def api(backend: str | None, sqlite_url: str, tmp_path: Path) -> AsyncIterator[Api]:
    env = {"KEEL_WEBHOOKS_ALLOW_PRIVATE": "true"}
    if backend is not None:
        env["KEEL_REDIS_URL"] = backend
    settings = make_settings(sqlite_url, tmp_path, **env)
    runtime = make_runtime(settings) if backend is not None else None
    with contextlib.ExitStack() as stack:
        if runtime is not None:
            stack.enter_context(runtime_installed(runtime))  # the worker side, as `keel worker` builds it
        async with client_for(settings) as client:
            api = Api(client, settings, runtime)
            assert isinstance(api.container.jobs, InProcessJobQueue) is (backend is None)
            api.a = await signup(client, "Acme", "owner@acme.test")
            api.b = await signup(client, "Globex", "owner@globex.test")
            yield api


def stamp(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value is not None else None


def assert_not_found(r: Any) -> None:
    assert r.status_code == 404, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["type"] == "/problems/not-found"
    assert body["status"] == 404


# -- what the owner sees ---------------------------------------------------------------------------


async def test_the_owning_tenant_follows_a_job_from_queued_to_succeeded(api: Api) -> None:
    job_id = await api.enqueue(SWEEP_JOB, {}, api.a)

    if api.queued_until_a_worker_runs:
        r = await api.get(job_id, api.a)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("application/json")
        body = r.json()
        assert set(body) == JOB_FIELDS
        assert body["id"] == job_id
        assert body["type"] == SWEEP_JOB
        assert body["status"] == "queued"
        assert (body["progress"], body["attempts"], body["result"], body["error"]) == (0, 0, None, None)
        assert body["enqueued_at"] is not None
        assert body["started_at"] is None
        assert body["ended_at"] is None

    await api.work(job_id)
    r = await api.get(job_id, api.a)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == JOB_FIELDS
    assert body["id"] == job_id
    assert body["type"] == SWEEP_JOB
    assert body["status"] == "succeeded"
    assert body["progress"] == 100
    assert body["attempts"] == 1
    assert body["error"] is None
    assert set(body["result"]) == {"published"}
    assert isinstance(body["result"]["published"], int)
    enqueued, started, ended = (stamp(body[k]) for k in ("enqueued_at", "started_at", "ended_at"))
    assert enqueued is not None
    assert started is not None
    assert ended is not None
    assert all(t.utcoffset() is not None for t in (enqueued, started, ended))
    assert enqueued <= started <= ended


async def test_a_failed_attempt_shows_a_generic_error_and_the_pending_retry(api: Api) -> None:
    # Arguments the job cannot read (no such event shape): it raises, which the tenant must not see.
    job_id = await api.enqueue(SEND_JOB, {"event": {"unexpected": "shape"}}, api.a)
    await api.work(job_id, until=lambda info: info.attempts == 1 and info.status is JobStatus.SCHEDULED)

    r = await api.get(job_id, api.a)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["type"] == SEND_JOB
    assert body["status"] == "scheduled"  # the mail job retries for about a day
    assert body["attempts"] == 1
    assert body["result"] is None
    assert body["error"] == {"code": "job-error", "detail": UNEXPECTED.detail}
    assert "KeyError" not in r.text
    assert "Traceback" not in r.text
    assert body["started_at"] is not None


# -- what nobody else sees --------------------------------------------------------------------------


async def test_another_tenant_gets_the_same_404_as_for_a_job_that_does_not_exist(api: Api) -> None:
    job_id = await api.enqueue(SWEEP_JOB, {}, api.a)
    await api.work(job_id)
    assert (await api.get(job_id, api.a)).status_code == 200

    theirs = await api.get(job_id, api.b)
    unknown = await api.get(str(uuid.uuid4()), api.b)
    assert_not_found(theirs)
    assert_not_found(unknown)
    assert SWEEP_JOB not in theirs.text
    assert {k: v for k, v in theirs.json().items() if k not in ("instance", "request_id")} == {
        k: v for k, v in unknown.json().items() if k not in ("instance", "request_id")
    }


async def test_jobs_of_no_tenant_are_visible_to_no_tenant(api: Api) -> None:
    job_id = await api.enqueue(SWEEP_JOB, {}, None)  # what cron enqueues
    await api.work(job_id)
    assert_not_found(await api.get(job_id, api.a))
    assert_not_found(await api.get(job_id, api.b))


async def test_unknown_and_malformed_ids_are_404(api: Api) -> None:
    assert_not_found(await api.get(str(uuid.uuid4()), api.a))
    for bad in ("not-a-uuid", "123", "cron-platform.outbox_sweep-1"):
        r = await api.get(bad, api.a)
        assert r.status_code == 404, (bad, r.text)
        assert r.headers["content-type"] == "application/problem+json"


async def test_without_a_valid_api_key_it_is_401(api: Api) -> None:
    job_id = await api.enqueue(SWEEP_JOB, {}, api.a)
    for headers in ({}, {"Authorization": "Bearer keel_not-a-real-key-at-all"}):
        r = await api.client.get(f"/v1/jobs/{job_id}", headers=headers)
        assert r.status_code == 401, r.text
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["type"] == "/problems/unauthorized"
        assert SWEEP_JOB not in r.text


# -- an endpoint that hands work to a job ------------------------------------------------------------


@pytest.fixture
def receiver() -> Iterator[Any]:
    with webhook_receiver() as r:
        yield r


async def test_a_202_answer_points_at_the_job_doing_the_work(api: Api, receiver: Any) -> None:
    h = api.a["headers"]
    r = await api.client.post(
        "/v1/webhook-endpoints", json={"url": receiver.url, "event_types": ["user.created"]}, headers=h
    )
    assert r.status_code == 201, r.text
    endpoint_id = r.json()["id"]
    r = await api.client.post("/v1/users", json={"email": "new@acme.test", "name": "New"}, headers=h)
    assert r.status_code == 201, r.text

    async def delivered() -> dict[str, Any] | None:
        if api.queued_until_a_worker_runs:
            api.run_worker()
        page = await api.client.get(f"/v1/webhook-endpoints/{endpoint_id}/deliveries", headers=h)
        items = page.json()["items"]
        return items[0] if items and items[0]["status"] == "succeeded" else None

    delivery = await eventually(delivered)

    r = await api.client.post(f"/v1/webhook-endpoints/{endpoint_id}/deliveries/{delivery['id']}/retry", headers=h)
    assert r.status_code == 202, r.text
    accepted = r.json()
    assert set(accepted) == {"job_id", "status_url"}
    assert accepted["status_url"] == f"/v1/jobs/{accepted['job_id']}"
    assert r.headers["location"] == accepted["status_url"]

    first = await api.client.get(accepted["status_url"], headers=h)
    assert first.status_code == 200, first.text
    assert first.json()["type"] == "webhooks.deliver"
    if api.queued_until_a_worker_runs:
        assert first.json()["status"] == "queued"

    await api.work(accepted["job_id"])
    done = await api.client.get(accepted["status_url"], headers=h)
    assert done.status_code == 200, done.text
    assert done.json()["status"] == "succeeded"
    assert done.json()["result"] == {"outcome": "succeeded"}
    assert len(receiver.wait_for(2)) == 2
    assert_not_found(await api.client.get(accepted["status_url"], headers=api.b["headers"]))
