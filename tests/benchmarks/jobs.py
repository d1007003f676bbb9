"""Job platform benchmark: no-op job throughput and enqueue -> completion latency.

Runs against a throwaway Redis (RQ adapter) and in-process. Figures come from each job's own
timestamps (enqueued_at, ended_at), so polling does not distort the latency.

    uv run --no-sync python -m tests.benchmarks.jobs [--jobs 2000] [--fork-jobs 200]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import signal
import statistics
import time
from typing import Any

from redis import Redis
from rq.serializers import JSONSerializer

from keel.main.logging import configure_logging
from keel.platform.adapters.clock import SystemClock
from keel.platform.adapters.jobs.execution import JobRegistry
from keel.platform.adapters.jobs.in_process import InProcessJobQueue
from keel.platform.adapters.jobs.rq_queue import (
    KeelSimpleWorker,
    KeelWorker,
    RqJobQueue,
    WorkerRuntime,
    install_runtime,
)
from keel.platform.domain.jobs import HIGH, NO_RETRY
from keel.platform.ports.jobs import JobArgs, JobContext, JobSpec
from tests.support.servers import redis_server

NOOP = "bench.noop"


async def _noop(ctx: JobContext, args: JobArgs) -> None:
    return None


def registry() -> JobRegistry:
    return JobRegistry([JobSpec(name=NOOP, handler=_noop, queue=HIGH, retry=NO_RETRY)])


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def _summary(label: str, latencies_ms: list[float]) -> None:
    print(
        f"  {label}: n={len(latencies_ms)} p50={_pct(latencies_ms, 50):.1f} ms "
        f"p90={_pct(latencies_ms, 90):.1f} ms p99={_pct(latencies_ms, 99):.1f} ms "
        f"mean={statistics.fmean(latencies_ms):.1f} ms"
    )


def _latencies(queue: RqJobQueue, ids: list[str]) -> list[float]:
    out = []
    for job_id in ids:
        info = asyncio.run(queue.get(job_id))
        if info is None or info.enqueued_at is None or info.ended_at is None:
            raise RuntimeError(f"job {job_id} has no timestamps: {info}")
        out.append((info.ended_at - info.enqueued_at).total_seconds() * 1000)
    return out


def rq_throughput(url: str, n: int, *, simple: bool) -> None:
    conn = Redis.from_url(url)
    conn.flushall()
    queue = RqJobQueue(conn, registry())
    ids = [queue.enqueue_sync(NOOP, {}, {"name": NOOP, "attempts": 0}, 0.0, None) for _ in range(n)]
    install_runtime(WorkerRuntime(registry()))
    worker_class = KeelSimpleWorker if simple else KeelWorker
    worker = worker_class([HIGH], connection=conn, serializer=JSONSerializer)
    started = time.perf_counter()
    worker.work(burst=True, logging_level="WARNING")
    elapsed = time.perf_counter() - started
    done = sum(1 for i in ids if conn.hget(f"rq:job:{i}", "status") == b"finished")
    kind = "simple (no fork)" if simple else "forking (horse per job)"
    print(f"  RQ {kind}: {n} no-op jobs in {elapsed:.2f} s = {n / elapsed:.0f} jobs/s ({done} finished)")


def _worker_process(url: str, simple: bool) -> None:
    install_runtime(WorkerRuntime(registry()))
    conn = Redis.from_url(url)
    worker_class = KeelSimpleWorker if simple else KeelWorker
    worker_class([HIGH], connection=conn, serializer=JSONSerializer).work(logging_level="WARNING")


def rq_latency(url: str, n: int, *, simple: bool) -> None:
    """One job at a time against an idle, already-running worker: the latency a request's job sees."""
    conn = Redis.from_url(url)
    conn.flushall()
    proc = multiprocessing.get_context("fork").Process(target=_worker_process, args=(url, simple), daemon=True)
    proc.start()
    time.sleep(1.0)  # let the worker register and block on the queue
    queue = RqJobQueue(conn, registry())
    ids = []
    try:
        for _ in range(n):
            job_id = queue.enqueue_sync(NOOP, {}, {"name": NOOP, "attempts": 0}, 0.0, None)
            ids.append(job_id)
            deadline = time.monotonic() + 10
            while conn.hget(f"rq:job:{job_id}", "status") != b"finished":
                if time.monotonic() > deadline:
                    raise RuntimeError(f"job {job_id} did not finish")
                time.sleep(0.0005)
        kind = "simple worker" if simple else "forking worker"
        _summary(f"RQ enqueue -> completion, {kind}", _latencies(queue, ids))
    finally:
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(5)


async def in_process(n: int) -> None:
    queue = InProcessJobQueue(registry(), SystemClock(), concurrency=4)
    queue.start()
    try:
        started = time.perf_counter()
        ids = [await queue.enqueue(NOOP, {}) for _ in range(n)]
        while not queue.idle:  # noqa: ASYNC110 - the queue exposes no completion event; a bench may poll
            await asyncio.sleep(0.001)
        elapsed = time.perf_counter() - started
        print(f"  in-process: {n} no-op jobs in {elapsed:.2f} s = {n / elapsed:.0f} jobs/s")
        latencies: list[float] = []
        for _ in range(200):
            job_id = await queue.enqueue(NOOP, {})
            while True:
                info = await queue.get(job_id)
                assert info is not None
                if info.status.is_final:
                    break
                await asyncio.sleep(0)
            if info.enqueued_at is None or info.ended_at is None:
                raise RuntimeError(f"job {job_id} has no timestamps")
            latencies.append((info.ended_at - info.enqueued_at).total_seconds() * 1000)
        _summary("in-process enqueue -> completion", latencies)
        del ids
    finally:
        await queue.stop()


def main(argv: Any = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=2000, help="no-op jobs for the no-fork throughput runs")
    parser.add_argument("--fork-jobs", type=int, default=200, help="no-op jobs for the forking worker")
    parser.add_argument("--latency-jobs", type=int, default=200)
    args = parser.parse_args(argv)
    # Per-job INFO lines (Keel's and RQ's) would measure the terminal, not the queue.
    configure_logging("WARNING", json=True)
    print("Job platform, no-op job (throwaway Redis on 127.0.0.1):")
    with redis_server() as redis:
        rq_throughput(redis.url, args.jobs, simple=True)
        rq_throughput(redis.url, args.fork_jobs, simple=False)
        rq_latency(redis.url, args.latency_jobs, simple=True)
        rq_latency(redis.url, min(args.latency_jobs, args.fork_jobs), simple=False)
    asyncio.run(in_process(args.jobs))


if __name__ == "__main__":
    main()
