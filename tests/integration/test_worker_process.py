"""The production topology with real processes: the API (here in-process, with Redis) puts jobs in RQ,
and ``keel worker`` subprocesses run them against the same Postgres: webhook fan-out and delivery to a
real receiver, emails, the request id carried into the worker's logs; a worker SIGKILLed in the middle
of a delivery, whose job is found abandoned and retried by another worker; a run still in flight when its
job is retried; and the one-line refusals to start."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from litestar import Litestar
from litestar.testing import AsyncTestClient
from rq.job import JobStatus as RqStatus
from rq.queue import Queue
from rq.serializers import JSONSerializer
from standardwebhooks.webhooks import Webhook

from keel.contexts.notifications.domain.services import SEND_JOB
from keel.contexts.webhooks.domain.services import DELIVER_JOB, FAN_OUT_JOB
from keel.main.container import Container
from keel.main.settings import Settings
from keel.platform.adapters.jobs.rq_queue import RqJobQueue
from tests.support.app import client_for, make_settings
from tests.support.faults import expire_scheduler_locks, rq_jobs
from tests.support.processes import descendants
from tests.support.receivers import Receiver, Reply, webhook_receiver
from tests.support.waiting import eventually

KEEL = str(Path(sys.executable).parent / "keel")
# Short intervals so an abandoned job is noticed within seconds: heartbeat every 1 s, abandoned 2 s
# after a missed one, registries cleaned every 1 s, and an idle worker wakes every 20 - 15 = 5 s.
FAST = ["--monitoring-interval", "1", "--heartbeat-grace", "2", "--maintenance-interval", "1", "--worker-ttl", "20"]

Client = AsyncTestClient[Litestar]


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEEL_", "OTEL_"))}
    return env | extra


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pgid(self) -> int:
        return self.proc.pid  # started with start_new_session: its own process group

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def tree(self) -> list[int]:
        """The worker and its descendants. RQ's work horse calls ``setpgrp()``, so it is not in the
        worker's process group: a signal to the group does not reach it."""
        return [self.proc.pid, *descendants(self.proc.pid)]

    def kill(self) -> None:
        """Kill the worker, its work horse and its scheduler at once (as a lost machine or an OOM-killed
        container does): frozen first, so none of them sees another die and reacts."""
        pids = self.tree()
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM (warm shutdown), then SIGKILL for anything of it still there."""
        pids = self.tree() if self.proc.poll() is None else []
        if pids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pgid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGKILL)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    """Start ``keel worker`` subprocesses; every one is stopped at teardown, whatever the test did."""
    started: list[Worker] = []

    def start(env: dict[str, str], *args: str) -> Worker:
        log = tmp_path / f"worker-{len(started)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [KEEL, "worker", *args],
                env=env,
                cwd=tmp_path,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        worker = Worker(proc, log)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


@dataclass
class Scene:
    """A tenant with a webhook endpoint on the receiver, and a user created with a known request id."""

    headers: dict[str, str]
    endpoint_id: str
    secret: str
    user_id: str
    request_id: str
    signup_request_id: str


async def build_scene(client: Client, receiver: Receiver) -> Scene:
    r = await client.post(
        "/v1/signup",
        json={"organization": "Acme", "owner_email": "owner@acme.test", "owner_name": "Owner"},
        headers={"X-Request-ID": "signup-req-1"},
    )
    assert r.status_code == 201, r.text
    headers = {"Authorization": f"Bearer {r.json()['api_key']['token']}"}
    r = await client.post(
        "/v1/webhook-endpoints", json={"url": receiver.url, "event_types": ["user.created"]}, headers=headers
    )
    assert r.status_code == 201, r.text
    endpoint = r.json()
    request_id = f"users-req-{uuid.uuid4().hex[:8]}"
    r = await client.post(
        "/v1/users",
        json={"email": "ada@acme.test", "name": "Ada"},
        headers={**headers, "X-Request-ID": request_id},
    )
    assert r.status_code == 201, r.text
    assert r.headers["x-request-id"] == request_id
    return Scene(headers, endpoint["id"], endpoint["secret"], r.json()["id"], request_id, "signup-req-1")


def queued(redis_url: str, queue: str = "high") -> list[tuple[str, str | None]]:
    conn = redis.Redis.from_url(redis_url)
    try:
        q = Queue(queue, connection=conn, serializer=JSONSerializer)
        return [(j.meta["name"], j.meta.get("request_id")) for j in q.get_jobs()]
    finally:
        conn.close()


def container_of(client: Client) -> Container:
    return cast(Container, client.app.state["container"])


async def deliveries(client: Client, scene: Scene) -> list[dict[str, Any]]:
    r = await client.get(f"/v1/webhook-endpoints/{scene.endpoint_id}/deliveries", headers=scene.headers)
    assert r.status_code == 200, r.text
    return cast(list[dict[str, Any]], r.json()["items"])


def assert_signed(received: Any, secret: str) -> dict[str, Any]:
    payload = Webhook(secret).verify(received.body, received.headers)
    return cast(dict[str, Any], payload)


def running(pid: int) -> bool:
    """Alive and not a zombie (a killed worker's children are reparented and may wait to be reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"worker still running after {timeout}s") from None


@pytest.fixture
def settings_env(pg_url: str, redis_url: str, tmp_path: Path) -> tuple[Settings, dict[str, str]]:
    """The API's settings and the worker's environment: the same Postgres, Redis and data directory."""
    data_dir = tmp_path / "data"
    settings = make_settings(pg_url, data_dir, KEEL_REDIS_URL=redis_url, KEEL_WEBHOOKS_ALLOW_PRIVATE="true")
    env = base_env(
        KEEL_DATABASE_URL=pg_url,
        KEEL_REDIS_URL=redis_url,
        KEEL_WEBHOOKS_ALLOW_PRIVATE="true",
        KEEL_DATA_DIR=str(data_dir),
        KEEL_LOG_JSON="true",
    )
    return settings, env


# -- (a) a burst worker runs what the API queued ---------------------------------------------------------


async def test_a_burst_worker_fans_out_delivers_and_mails_with_the_request_id_in_its_logs(
    settings_env: tuple[Settings, dict[str, str]], redis_url: str, tmp_path: Path, start_worker: Callable[..., Worker]
) -> None:
    settings, env = settings_env
    with webhook_receiver() as receiver:
        async with client_for(settings) as client:
            scene = await build_scene(client, receiver)

            # With Redis nothing runs in the API process: the jobs wait in RQ.
            assert sorted(queued(redis_url)) == sorted(
                [
                    (SEND_JOB, scene.signup_request_id),
                    (FAN_OUT_JOB, scene.request_id),
                    (SEND_JOB, scene.request_id),
                ]
            )
            assert receiver.received == []
            assert [d["status"] for d in await deliveries(client, scene)] == []

            worker = start_worker(env, "--burst")
            assert wait_exit(worker.proc, 90) == 0, worker.log.read_text()

            [request] = receiver.received
            payload = assert_signed(request, scene.secret)
            assert payload["type"] == "user.created"
            assert payload["data"]["user_id"] == scene.user_id
            assert request.headers["x-request-id"] == scene.request_id
            [delivery] = await deliveries(client, scene)
            assert request.headers["webhook-id"] == delivery["id"]
            assert (delivery["status"], delivery["attempt_count"], delivery["last_status_code"]) == (
                "succeeded",
                1,
                200,
            )
            assert [a["status_code"] for a in delivery["attempts"]] == [200]
            assert queued(redis_url) == []

            # The emails went to the data directory (no SMTP configured).
            mails = sorted((tmp_path / "data" / "mail").glob("*.eml"))
            assert len(mails) == 2

            # Each job's log lines carry the request that caused it, across the queue and the fork.
            lines = worker.lines()
            by_job: dict[tuple[str, str], set[str | None]] = {}
            for line in lines:
                if "job" in line and line.get("msg") in ("job started", "job succeeded"):
                    by_job.setdefault((line["job"], line["msg"]), set()).add(line.get("request_id"))
            for name in (FAN_OUT_JOB, DELIVER_JOB):
                for msg in ("job started", "job succeeded"):
                    assert by_job.get((name, msg)) == {scene.request_id}, (name, msg, by_job)
            assert by_job.get((SEND_JOB, "job succeeded")) == {scene.request_id, scene.signup_request_id}
            assert not [line for line in lines if line.get("level") in ("ERROR", "CRITICAL")], lines

            # The finished jobs stay visible to their tenant.
            [deliver_job] = [j for j in rq_jobs(redis_url) if j.meta["name"] == DELIVER_JOB]
            r = await client.get(f"/v1/jobs/{deliver_job.id}", headers=scene.headers)
            assert r.status_code == 200, r.text
            assert (r.json()["type"], r.json()["status"], r.json()["result"]) == (
                DELIVER_JOB,
                "succeeded",
                {"outcome": "succeeded"},
            )


# -- (b) a worker killed mid-delivery --------------------------------------------------------------------


async def test_a_delivery_abandoned_by_a_killed_worker_is_retried_by_another(
    settings_env: tuple[Settings, dict[str, str]], redis_url: str, start_worker: Callable[..., Worker]
) -> None:
    settings, env = settings_env
    # The first request hangs (the worker dies while waiting for it); later ones are answered at once.
    with webhook_receiver(script=[Reply(delay=30)], then=Reply(200)) as receiver:
        async with client_for(settings) as client:
            scene = await build_scene(client, receiver)
            first = start_worker(env, *FAST)

            started = await asyncio.to_thread(receiver.started.wait, 60)
            assert started, "the delivery never reached the receiver:\n" + first.log.read_text()
            [deliver_job] = [j for j in rq_jobs(redis_url) if j.meta["name"] == DELIVER_JOB]
            assert deliver_job.get_status() == RqStatus.STARTED
            [delivery] = await deliveries(client, scene)
            assert delivery["status"] == "sending"

            assert len(first.tree()) >= 2  # the worker and the horse making the request (and its scheduler)
            first.kill()  # worker, work horse and scheduler: nothing gets to clean up

            expire_scheduler_locks(redis_url)

            second = start_worker(env, *FAST)

            async def succeeded() -> dict[str, Any]:
                [d] = await deliveries(client, scene)
                return d if d["status"] == "succeeded" else {}

            try:
                delivery = await eventually(succeeded, within=45, interval=0.25)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n--- second worker log:\n{second.log.read_text()}") from None

            # One attempt recorded (the killed one never finished), answered 200 by the retried job.
            assert (delivery["attempt_count"], delivery["last_status_code"]) == (1, 200)
            assert [a["status_code"] for a in delivery["attempts"]] == [200]

            # The receiver saw the same message twice: the hung request and the retry. Same webhook-id,
            # both validly signed, so it can tell the second is a duplicate of the first.
            both = await asyncio.to_thread(receiver.wait_for, 2, 45)
            assert len(both) == 2
            assert {received.headers["webhook-id"] for received in both} == {delivery["id"]}
            for received in both:
                assert assert_signed(received, scene.secret)["data"]["user_id"] == scene.user_id

            # It was the same RQ job, run a second time.
            [job] = [j for j in rq_jobs(redis_url) if j.id == deliver_job.id]
            assert job.get_status(refresh=False) == RqStatus.FINISHED
            assert job.meta["attempts"] == 2
            assert isinstance(container_of(client).jobs, RqJobQueue)
            r = await client.get(f"/v1/jobs/{deliver_job.id}", headers=scene.headers)
            assert r.status_code == 200, r.text
            assert (r.json()["status"], r.json()["attempts"], r.json()["result"]) == (
                "succeeded",
                2,
                {"outcome": "succeeded"},
            )
            assert second.proc.poll() is None  # still serving


async def test_a_run_still_in_flight_when_its_job_is_retried_does_not_undo_the_delivery(
    settings_env: tuple[Settings, dict[str, str]], redis_url: str, start_worker: Callable[..., Worker]
) -> None:
    """The worker process dies but its work horse does not: RQ's horse calls ``setpgrp()``, so killing
    the worker (or its process group) leaves it running, mid-request. RQ sees the job abandoned and runs
    it again on another worker; that run re-claims the delivery (same job id) and delivers it. When the
    old run finally returns, it must not put the delivered delivery back to "pending" (nor number a
    second attempt 1): its claim was taken over. The old run is frozen (SIGSTOP) until the retry has
    delivered, so the order is certain, as after a long pause or a network partition."""
    settings, env = settings_env
    with webhook_receiver(script=[Reply(delay=30)], then=Reply(200)) as receiver:
        async with client_for(settings) as client:
            scene = await build_scene(client, receiver)
            first = start_worker(env, *FAST)
            assert await asyncio.to_thread(receiver.started.wait, 60), first.log.read_text()
            [horse] = [pid for pid in descendants(first.proc.pid) if os.getpgid(pid) == pid]
            try:
                os.killpg(first.pgid, signal.SIGKILL)  # the worker and its scheduler; not the horse
                first.proc.wait(10)
                # Frozen only now: a stopped member of a group orphaned by the worker's death would be
                # sent SIGHUP by the kernel.
                os.kill(horse, signal.SIGSTOP)
                assert running(horse)
                expire_scheduler_locks(redis_url)
                start_worker(env, *FAST)

                async def succeeded() -> dict[str, Any]:
                    [d] = await deliveries(client, scene)
                    return d if d["status"] == "succeeded" else {}

                delivered = await eventually(succeeded, within=45, interval=0.25)
                assert [(a["number"], a["status_code"]) for a in delivered["attempts"]] == [(1, 200)]

                os.kill(horse, signal.SIGCONT)  # the old run resumes, times out, and reports

                async def horse_gone() -> bool:
                    return not running(horse)

                await eventually(horse_gone, within=45, interval=0.25)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(horse, signal.SIGKILL)

            [after] = await deliveries(client, scene)
            attempts = [(a["number"], a["status_code"], a["error"]) for a in after["attempts"]]
            assert (after["status"], after["attempt_count"]) == ("succeeded", 1), attempts
            numbers = [a["number"] for a in after["attempts"]]
            assert len(numbers) == len(set(numbers)), attempts


# -- (c) refusing to start ------------------------------------------------------------------------------


def test_worker_without_redis_exits_2_with_one_line(tmp_path: Path) -> None:
    env = base_env(KEEL_DATA_DIR=str(tmp_path / "data"))
    for command in ("worker", "cron"):
        result = subprocess.run([KEEL, command], env=env, cwd=tmp_path, capture_output=True, timeout=60)
        assert result.returncode == 2, result
        lines = result.stderr.decode().strip().splitlines()
        assert len(lines) == 1, lines
        assert "KEEL_REDIS_URL" in lines[0]
        assert f"keel {command}" in lines[0]
        assert result.stdout == b""


@pytest.mark.parametrize("queues", ["nope", "high,nope"])
def test_worker_with_unknown_queues_exits_2_with_one_line(queues: str, redis_url: str, tmp_path: Path) -> None:
    env = base_env(KEEL_DATA_DIR=str(tmp_path / "data"), KEEL_REDIS_URL=redis_url)
    result = subprocess.run(
        [KEEL, "worker", "--queues", queues], env=env, cwd=tmp_path, capture_output=True, timeout=60
    )
    assert result.returncode == 2, result
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert "--queues" in lines[0]
    assert "high, default, low" in lines[0]
