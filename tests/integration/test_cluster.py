"""``just cluster --check`` as a test: the production topology (two ``keel serve``, two forking ``keel worker``,
``keel cron``; tests/cluster) against the session's Postgres, on an empty database that ``keel migrate``
builds, and its Redis; every proof must pass."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from redis.asyncio import Redis

from tests.benchmarks.load import ROOT
from tests.cluster.proofs import PROOFS, Options, prove, table
from tests.cluster.topology import cluster
from tests.support.servers import PostgresServer, RedisServer, admin_sql

pytestmark = [pytest.mark.postgres, pytest.mark.redis]


async def flush(redis_url: str) -> None:
    client = Redis.from_url(redis_url)
    try:
        await client.flushall()
    finally:
        await client.aclose()


async def test_the_cluster_proves_every_property(pg: PostgresServer, redis_proc: RedisServer, tmp_path: Path) -> None:
    name = f"cluster_{uuid.uuid4().hex[:12]}"
    await admin_sql(pg, f'CREATE DATABASE "{name}"')
    await flush(redis_proc.url)
    options = Options()
    try:
        async with cluster(pg.url(name), redis_proc.url, tmp_path, sandbox_latency=options.sandbox_latency) as c:
            proofs = await prove(c, options)
            logs = c.tail()
    finally:
        await flush(redis_proc.url)
        await admin_sql(pg, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    report = table(proofs)
    assert [p.number for p in proofs] == list(range(1, len(PROOFS) + 1)), report
    assert all(p.passed for p in proofs), f"{report}\n{logs}"


def test_the_cluster_command_documents_its_options() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tests.cluster", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    for option in ("--check", "--seconds", "--rate-limit", "--latency"):
        assert option in done.stdout
