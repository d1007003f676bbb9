"""Avatars in the production topology, end to end: the API (in-process, on Postgres and Redis) stores
the original under the shared data directory and puts the processing job in RQ's ``low`` queue; an
RQ worker with the runtime ``keel worker`` builds (a simple worker in burst mode, on this test's main
thread, on the same settings and so the same data directory) makes the variants, which the API then
serves; the profile's ``avatar_url`` is set by the worker and the profile the API had cached in Redis
is invalidated. A deleted user's avatar is removed by the worker as well.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from litestar import Litestar
from litestar.testing import AsyncTestClient
from PIL import Image
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from keel.contexts.accounts.domain.caching import user_key
from keel.contexts.media.domain.services import FORGET_JOB, PROCESS_JOB
from keel.main.worker import make_runtime
from keel.platform.adapters.jobs.rq_queue import RqJobQueue
from keel.platform.adapters.redis.cache import NAMESPACE
from keel.platform.domain.jobs import LOW
from tests.support.app import client_for, job, make_settings, signup
from tests.support.rq import runtime_installed, work_until

Client = AsyncTestClient[Litestar]
RED, BLUE = (220, 20, 20), (20, 20, 220)


def png(color: tuple[int, int, int], size: tuple[int, int] = (400, 300)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def near(pixel: Any, expected: tuple[int, ...], tolerance: int = 40) -> bool:
    return all(abs(int(a) - int(b)) <= tolerance for a, b in zip(pixel, expected, strict=True))


@dataclass
class Stack:
    client: Client
    connection: redis.Redis
    data_dir: Path  # shared by the API and the worker
    tenant: dict[str, Any]

    @property
    def headers(self) -> dict[str, str]:
        headers: dict[str, str] = self.tenant["headers"]
        return headers

    @property
    def tenant_id(self) -> str:
        return str(self.tenant["tenant"]["id"])

    async def work_until(self, done: Callable[[], Awaitable[bool]], within: float = 15.0) -> None:
        await work_until(self.connection, done, within)

    async def job(self, job_id: str) -> dict[str, Any]:
        return await job(self.client, self.tenant, job_id)

    async def finished(self, job_id: str) -> dict[str, Any]:
        async def done() -> bool:
            return (await self.job(job_id))["status"] in ("succeeded", "failed", "canceled")

        await self.work_until(done)
        return await self.job(job_id)

    async def user(self, user_id: str) -> dict[str, Any]:
        r = await self.client.get(f"/v1/users/{user_id}", headers=self.headers)
        assert r.status_code == 200, r.text
        found: dict[str, Any] = r.json()
        return found

    def profile_cached(self, user_id: str) -> bool:
        return bool(self.connection.exists(NAMESPACE + user_key(uuid.UUID(self.tenant_id), uuid.UUID(user_id))))

    async def upload(self, user_id: str, data: bytes) -> httpx.Response:
        headers = {**self.headers, "Content-Type": "image/png"}
        return await self.client.put(f"/v1/users/{user_id}/avatar", content=data, headers=headers)

    async def avatar(self, user_id: str, size: int | None = None, etag: str | None = None) -> httpx.Response:
        headers = dict(self.headers)
        if etag is not None:
            headers["If-None-Match"] = etag
        params = {} if size is None else {"size": size}
        return await self.client.get(f"/v1/users/{user_id}/avatar", params=params, headers=headers)

    def user_dir(self, user_id: str) -> Path:
        return self.data_dir / "blobs" / "avatars" / self.tenant_id / user_id

    def uploads_on_disk(self, user_id: str) -> set[str]:
        root = self.user_dir(user_id)
        return {p.name for p in root.iterdir() if p.is_dir()} if root.exists() else set()

    def low_queue(self) -> list[str]:
        return list(Queue(LOW, connection=self.connection, serializer=JSONSerializer).job_ids)


@pytest.fixture
async def stack(pg_url: str, redis_url: str, tmp_path: Path) -> AsyncIterator[Stack]:
    settings = make_settings(pg_url, tmp_path, KEEL_REDIS_URL=redis_url)
    connection = redis.Redis.from_url(redis_url)
    try:
        # The worker side, as `keel worker` builds it, on the same settings (the same data directory).
        with runtime_installed(make_runtime(settings)):
            async with client_for(settings) as client:
                assert isinstance(client.app.state["container"].jobs, RqJobQueue)
                tenant = await signup(client, "Acme", "owner@acme.test")
                yield Stack(client, connection, tmp_path, tenant)
    finally:
        connection.close()


async def add_user(stack: Stack, email: str) -> str:
    r = await stack.client.post("/v1/users", json={"email": email, "name": "Ada"}, headers=stack.headers)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


async def test_an_upload_is_processed_by_the_worker_and_the_cached_profile_invalidated(stack: Stack) -> None:
    user_id = await add_user(stack, "ada@acme.test")
    before = await stack.user(user_id)
    assert before["avatar_url"] is None
    assert stack.profile_cached(user_id)  # the API cached the profile in Redis

    r = await stack.upload(user_id, png(RED))
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    assert r.headers["location"] == f"/v1/jobs/{job_id}"

    # Nothing runs in the API process: the job waits in RQ's low queue.
    assert job_id in stack.low_queue()
    rq_job = Job.fetch(job_id, connection=stack.connection, serializer=JSONSerializer)
    assert (rq_job.origin, rq_job.meta["name"]) == (LOW, PROCESS_JOB)
    assert (await stack.job(job_id))["status"] == "queued"
    assert (await stack.avatar(user_id)).status_code == 404
    assert (await stack.user(user_id))["avatar_url"] is None
    assert stack.profile_cached(user_id)
    [upload_id] = stack.uploads_on_disk(user_id)
    assert sorted(p.name for p in (stack.user_dir(user_id) / upload_id).iterdir()) == ["original", "original.type"]

    done = await stack.finished(job_id)
    assert (done["type"], done["status"], done["attempts"], done["result"]) == (
        PROCESS_JOB,
        "succeeded",
        1,
        {"outcome": "ready"},
    )
    # The worker wrote the variants into the shared data directory...
    assert {p.name for p in (stack.user_dir(user_id) / upload_id).iterdir()} >= {"original", "64.webp", "256.webp"}
    # ...and its user.updated invalidated the API's cached profile in Redis.
    assert not stack.profile_cached(user_id)
    after = await stack.user(user_id)
    assert after["avatar_url"] == f"/v1/users/{user_id}/avatar"
    assert after["updated_at"] >= before["updated_at"]

    # The API serves what the worker made.
    for size in (64, 256):
        served = await stack.avatar(user_id, size)
        assert served.status_code == 200, served.text
        assert (served.headers["content-type"], served.headers["cache-control"]) == ("image/webp", "private, no-cache")
        image = Image.open(io.BytesIO(served.content))
        assert (image.format, image.size) == ("WEBP", (size, size))
        assert near(image.convert("RGB").getpixel((size // 2, size // 2)), RED)
        again = await stack.avatar(user_id, size, etag=served.headers["etag"])
        assert (again.status_code, again.content) == (304, b"")
    default = await stack.avatar(user_id)
    assert default.content == (await stack.avatar(user_id, 256)).content


async def test_a_reupload_replaces_the_variants_and_a_deleted_users_avatar_is_removed(stack: Stack) -> None:
    user_id = await add_user(stack, "ada@acme.test")
    first = await stack.upload(user_id, png(RED))
    assert first.status_code == 202, first.text
    assert (await stack.finished(first.json()["job_id"]))["result"] == {"outcome": "ready"}
    [first_upload] = stack.uploads_on_disk(user_id)
    red = await stack.avatar(user_id)

    second = await stack.upload(user_id, png(BLUE))
    assert second.status_code == 202, second.text
    assert (await stack.finished(second.json()["job_id"]))["result"] == {"outcome": "ready"}
    blue = await stack.avatar(user_id)
    assert blue.status_code == 200, blue.text
    assert blue.headers["etag"] != red.headers["etag"]
    assert near(Image.open(io.BytesIO(blue.content)).convert("RGB").getpixel((128, 128)), BLUE)
    [second_upload] = stack.uploads_on_disk(user_id)
    assert second_upload != first_upload

    r = await stack.client.delete(f"/v1/users/{user_id}", headers=stack.headers)
    assert r.status_code == 204, r.text
    [forget] = [
        job_id
        for job_id in stack.low_queue()
        if Job.fetch(job_id, connection=stack.connection, serializer=JSONSerializer).meta["name"] == FORGET_JOB
    ]

    async def forgotten() -> bool:
        return not stack.user_dir(user_id).exists()

    await stack.work_until(forgotten)
    done = await stack.job(forget)
    assert (done["status"], done["result"]) == ("succeeded", {"outcome": "deleted 1 avatar, 3 blobs"})
    assert (await stack.avatar(user_id)).status_code == 404
