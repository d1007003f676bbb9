"""Build the real app against real backends for HTTP-level tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from litestar import Litestar
from litestar.testing import AsyncTestClient

from keel.main.app import create_app
from keel.main.container import build_container
from keel.main.settings import Settings, load_settings
from keel.platform.ports.clock import Clock
from tests.support.waiting import eventually

# Suites that are not about rate limiting send hundreds of requests from one "client".
UNLIMITED = {"KEEL_RATE_LIMIT_PER_MINUTE": "1000000", "KEEL_SIGNUP_RATE_LIMIT_PER_HOUR": "1000000"}


def make_settings(database_url: str, data_dir: Path, **env: str) -> Settings:
    return load_settings({"KEEL_DATABASE_URL": database_url, "KEEL_DATA_DIR": str(data_dir), **UNLIMITED, **env})


@asynccontextmanager
async def client_for(
    settings: Settings, clock: Clock | None = None, **kwargs: Any
) -> AsyncIterator[AsyncTestClient[Litestar]]:
    """The real app (its own container: one "API process") behind an in-process HTTP client.

    Several at once on the same settings behave like several API processes sharing Postgres and Redis.
    ``client.app.state["container"]`` exposes the wiring (cache stats, relay, stores) to assertions.
    """
    if clock is not None:
        kwargs["container"] = build_container(settings, clock=clock)
    app = create_app(settings, configure_logs=False, **kwargs)
    async with AsyncTestClient(app=app, base_url="http://127.0.0.1") as client:
        yield client


async def signup(
    client: AsyncTestClient[Litestar], org: str = "Acme", email: str = "owner@acme.test"
) -> dict[str, Any]:
    """Sign up a tenant; returns the response body plus ``headers`` ready for authenticated calls."""
    r = await client.post("/v1/signup", json={"organization": org, "owner_email": email, "owner_name": "Owner"})
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    body["headers"] = {"Authorization": f"Bearer {body['api_key']['token']}"}
    return body


Request = tuple[str, str, dict[str, Any]]


async def _send_all(app: Litestar, requests: list[Request], client: tuple[str, int]) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app, client=client)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
        return list(await asyncio.gather(*(c.request(m, u, **kw) for m, u, kw in requests)))


async def burst(
    client: AsyncTestClient[Litestar], requests: list[Request], address: tuple[str, int] = ("127.0.0.1", 40000)
) -> list[httpx.Response]:
    """Send ``requests`` concurrently to the app behind ``client``, on that app's own event loop.

    AsyncTestClient serialises requests; real concurrency needs the app's loop (its blocking portal).
    """
    return await asyncio.to_thread(client.blocking_portal.call, _send_all, client.app, requests, address)


async def job(client: AsyncTestClient[Litestar], tenant: dict[str, Any], job_id: str) -> dict[str, Any]:
    """``GET /v1/jobs/{id}`` as ``tenant``; the job must be visible."""
    r = await client.get(f"/v1/jobs/{job_id}", headers=tenant["headers"])
    assert r.status_code == 200, r.text
    found: dict[str, Any] = r.json()
    return found


async def finished_job(client: AsyncTestClient[Litestar], tenant: dict[str, Any], job_id: str) -> dict[str, Any]:
    """The job once it has ended (succeeded, failed or canceled)."""

    async def probe() -> dict[str, Any] | None:
        j = await job(client, tenant, job_id)
        return j if j["status"] in ("succeeded", "failed", "canceled") else None

    found: dict[str, Any] = await eventually(probe)
    return found
