"""Running RQ workers inside a test process."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager

import redis
from rq import Queue
from rq.serializers import JSONSerializer

from keel.platform.adapters.jobs.rq_queue import KeelSimpleWorker, WorkerRuntime, install_runtime
from keel.platform.domain.jobs import QUEUES


@contextmanager
def _signals_restored() -> Iterator[None]:
    """RQ's worker installs SIGINT/SIGTERM handlers on the main thread and leaves them behind."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


class BurstWorker(KeelSimpleWorker):
    """Keel's simple worker without RQ's remote-control channel (``rq`` CLI stop/kill commands): its
    pubsub thread costs a one-second join on every burst's teardown and no test sends it commands."""

    def subscribe(self) -> None:
        pass


def run_rq_worker(connection: redis.Redis, queues: Sequence[str] = QUEUES) -> bool:
    """One burst of a simple worker: move due scheduled jobs onto their queues, run everything queued
    (highest queue first), return. Blocks the calling (main) thread; handlers run on the installed
    ``WorkerRuntime``'s own loop thread, so blocking the test's loop meanwhile is fine."""
    rq_queues = [Queue(name, connection=connection, serializer=JSONSerializer) for name in queues]
    worker = BurstWorker(rq_queues, connection=connection, serializer=JSONSerializer)
    with _signals_restored():
        return worker.work(burst=True, with_scheduler=True, logging_level="WARNING")


async def work_until(connection: redis.Redis, done: Callable[[], Awaitable[bool]], within: float = 20.0) -> None:
    """Bursts of the RQ worker (each runs everything queued, after moving due retries onto their
    queues) until ``done()`` holds."""
    deadline = time.monotonic() + within
    while True:
        run_rq_worker(connection)
        if await done():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not done within {within}s of worker bursts")
        await asyncio.sleep(0.1)


@contextmanager
def runtime_installed(runtime: WorkerRuntime) -> Iterator[WorkerRuntime]:
    """Install ``runtime`` as this process's worker runtime; afterwards uninstall it and stop its loop
    thread (one per test otherwise)."""
    install_runtime(runtime)
    try:
        yield runtime
    finally:
        install_runtime(None)
        loop = runtime._loop
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
