"""The production topology on one machine: against one Postgres and one Redis, ``keel migrate`` once, then
two API processes (``keel serve``) on their own ports, two forking workers (``keel worker``) and one
``keel cron``, all subprocesses on 127.0.0.1 started and stopped through the load benchmark's ``Servers``."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis
from rq import Worker
from rq.scheduler import SCHEDULER_KEY_TEMPLATE, RQScheduler
from rq.serializers import JSONSerializer
from rq.worker import BaseWorker

from tests.benchmarks.analytics import wait_ready
from tests.benchmarks.load import ROOT, Servers, keel_env
from tests.cluster.processes import descendants, kill_tree, stop_all
from tests.support.servers import free_port

APIS = 2
WORKERS = 2
# Short intervals so an abandoned job is noticed within seconds rather than minutes: a heartbeat every
# 1 s, abandoned 2 s after a missed one, registries cleaned every 1 s, an idle worker wakes every 5 s.
FAST_WORKER = [
    "--monitoring-interval",
    "1",
    "--heartbeat-grace",
    "2",
    "--maintenance-interval",
    "1",
    "--worker-ttl",
    "20",
]
WORKER_PREFIX = "cluster-worker-"


@dataclass
class Cluster:
    database_url: str
    redis_url: str
    servers: Servers  # every process; their logs are in servers.logs
    api_urls: list[str]
    redis: redis.Redis
    workers: dict[str, str] = field(default_factory=dict)  # RQ worker name -> process name in servers
    spawned: int = 0

    def spawn_worker(self) -> str:
        """Start one more ``keel worker`` (forking, with the scheduler); returns its RQ name. A name is never
        reused: a dead worker's registration outlives it (its TTL)."""
        self.spawned += 1
        name = f"{WORKER_PREFIX}{self.spawned}"
        self.servers.spawn(f"worker-{self.spawned}", "worker", "--name", name, *FAST_WORKER)
        self.workers[name] = f"worker-{self.spawned}"
        return name

    def worker_proc(self, name: str) -> subprocess.Popen[bytes]:
        return self.servers.procs[self.workers[name]]

    def kill_worker(self, name: str) -> list[int]:
        """SIGKILL the worker, its work horse and its scheduler process; it is forgotten afterwards."""
        pids = kill_tree(self.worker_proc(name))
        self.servers.procs.pop(self.workers.pop(name))
        return pids

    def registered_workers(self) -> dict[str, BaseWorker]:
        found = Worker.all(connection=self.redis, serializer=JSONSerializer)
        return {w.name: w for w in found if w.name in self.workers}

    def scheduler_holder(self, queue: str = "default") -> str | None:
        """The worker whose scheduler holds RQ's scheduler lock for ``queue`` (it alone moves that queue's
        retries and delayed jobs onto it), if one of ours does."""
        lock = self.redis.get(RQScheduler.get_locking_key(queue))
        if lock is None:
            return None
        scheduler = lock.decode() if isinstance(lock, bytes) else str(lock)
        pid = self.redis.hget(SCHEDULER_KEY_TEMPLATE % scheduler, "pid")
        if pid is None:
            return None
        for name in self.workers:
            proc = self.worker_proc(name)
            if proc.poll() is None and int(pid) in descendants(proc.pid):
                return name
        return None

    def tail(self) -> str:
        return self.servers.tail()


async def _until(what: str, probe: Callable[[], bool], cluster: Cluster, within: float) -> None:
    deadline = time.monotonic() + within
    while not probe():
        cluster.servers.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} within {within:.0f} s:\n{cluster.tail()}")
        await asyncio.sleep(0.1)


def migrate(env: dict[str, str], logs: Path) -> None:
    with (logs / "migrate.log").open("wb") as log:
        done = subprocess.run(
            [sys.executable, "-m", "keel.main.cli", "migrate"],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=180,
            check=False,
        )
    if done.returncode != 0:
        raise RuntimeError(f"keel migrate exited with {done.returncode}:\n{(logs / 'migrate.log').read_text()}")


@contextlib.asynccontextmanager
async def cluster(
    database_url: str, redis_url: str, base: Path, *, sandbox_latency: float, log_level: str = "WARNING"
) -> AsyncIterator[Cluster]:
    """Migrate, start every process, wait until all are ready; stop them all (process trees included)
    however the block ends."""
    ports = [free_port() for _ in range(APIS)]
    env = keel_env(
        database_url,
        redis_url,
        base / "data",
        ports[0],
        KEEL_PAYMENTS_SANDBOX_LATENCY=str(sandbox_latency),
        KEEL_LOG_LEVEL=log_level,
    )
    servers = Servers(env, base, f"http://127.0.0.1:{ports[0]}")
    connection = redis.Redis.from_url(redis_url)
    c = Cluster(database_url, redis_url, servers, [f"http://127.0.0.1:{p}" for p in ports], connection)
    try:
        await asyncio.to_thread(migrate, env, base)
        for i, port in enumerate(ports, 1):
            servers.spawn(f"api-{i}", "serve", "--port", str(port))
        for _ in range(WORKERS):
            c.spawn_worker()
        servers.spawn("cron", "cron")
        for url in c.api_urls:
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                await wait_ready(client, servers, within=120)
        await _until("the workers did not register", lambda: len(c.registered_workers()) == WORKERS, c, 60)
        # The retries of abandoned jobs need a live scheduler: wait until one of ours holds the lock.
        await _until("no worker took the scheduler lock", lambda: c.scheduler_holder() is not None, c, 60)
        yield c
    finally:
        stop_all([servers])
        connection.close()
