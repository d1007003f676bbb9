"""Readiness really checks Postgres and Redis; liveness touches nothing."""

from __future__ import annotations

import time
from pathlib import Path

from tests.support.app import client_for, make_settings
from tests.support.servers import free_port


async def test_healthz_passes_with_postgres_and_redis(pg_url: str, redis_url: str, tmp_path: Path) -> None:
    async with client_for(make_settings(pg_url, tmp_path, KEEL_REDIS_URL=redis_url)) as client:
        r = await client.get("/healthz")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/health+json")
    assert r.headers["cache-control"] == "no-store"
    body = r.json()
    assert body["status"] == "pass"
    assert set(body["checks"]) == {"postgres:responseTime", "redis:responseTime"}
    for [entry] in body["checks"].values():
        assert entry["status"] == "pass"
        assert entry["componentType"] == "datastore"
        assert entry["observedUnit"] == "ms"
        assert 0 <= entry["observedValue"] < 1000


async def test_healthz_fails_fast_when_redis_is_down(pg_url: str, tmp_path: Path) -> None:
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    settings = make_settings(pg_url, tmp_path, KEEL_REDIS_URL=dead_redis, KEEL_HEALTH_TIMEOUT="0.5")
    async with client_for(settings) as client:
        started = time.monotonic()
        r = await client.get("/healthz")
        elapsed = time.monotonic() - started
        live = await client.get("/livez")
    assert r.status_code == 503
    body = r.json()
    assert body["status"] == "fail"
    assert body["checks"]["postgres:responseTime"][0]["status"] == "pass"
    redis = body["checks"]["redis:responseTime"][0]
    assert redis["status"] == "fail"
    assert redis["output"]
    # A dead dependency must not hang the probe beyond its own timeout (generous bound for slow CI).
    assert elapsed < 5
    assert live.status_code == 200
    assert live.json() == {"status": "pass"}


async def test_healthz_on_the_embedded_default(sqlite_url: str, tmp_path: Path) -> None:
    async with client_for(make_settings(sqlite_url, tmp_path)) as client:
        r = await client.get("/healthz")
    assert r.status_code == 200
    assert set(r.json()["checks"]) == {"sqlite:responseTime"}
