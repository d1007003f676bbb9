"""Readiness and liveness probes (draft-inadarei-api-health-check)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from litestar import Response, get
from litestar.di import NamedDependency
from loguru import logger

from keel.platform.ports.health import HealthCheck

HEALTH_MEDIA_TYPE = "application/health+json"


async def _run(check: HealthCheck, limit: float) -> dict[str, Any]:
    started = time.perf_counter()
    entry: dict[str, Any] = {"componentType": check.component_type, "observedUnit": "ms"}
    try:
        async with asyncio.timeout(limit):
            await check.check()
        entry["status"] = "pass"
    except TimeoutError:
        entry["status"] = "fail"
        entry["output"] = f"no answer within {limit:g}s"
    except Exception as exc:  # noqa: BLE001 - any failure of a dependency is a failed check
        entry["status"] = "fail"
        entry["output"] = type(exc).__name__
        logger.warning("health check {} failed: {}", check.name, type(exc).__name__)
    entry["observedValue"] = round((time.perf_counter() - started) * 1000, 2)
    entry["time"] = datetime.now(UTC).isoformat()
    return entry


class HealthProbe:
    """Runs every check concurrently, each under its own timeout, so one hung dependency cannot hang the probe."""

    def __init__(self, checks: Sequence[HealthCheck], timeout: float) -> None:
        self._checks = list(checks)
        self._timeout = timeout

    async def report(self) -> tuple[bool, dict[str, Any]]:
        results = await asyncio.gather(*(_run(c, self._timeout) for c in self._checks))
        checks = {f"{c.name}:responseTime": [r] for c, r in zip(self._checks, results, strict=True)}
        ok = all(r["status"] == "pass" for r in results)
        return ok, {"status": "pass" if ok else "fail", "checks": checks}


@get(
    "/healthz",
    exclude_from_auth=True,
    tags=["operations"],
    summary="Readiness: checks every dependency",
    description="`application/health+json`; 503 when any dependency fails.",
    media_type=HEALTH_MEDIA_TYPE,
)
async def healthz(health: NamedDependency[HealthProbe]) -> Response[dict[str, Any]]:
    ok, body = await health.report()
    return Response(
        body, status_code=200 if ok else 503, media_type=HEALTH_MEDIA_TYPE, headers={"Cache-Control": "no-store"}
    )


@get(
    "/livez",
    exclude_from_auth=True,
    tags=["operations"],
    summary="Liveness: the process answers (touches no dependency)",
    media_type=HEALTH_MEDIA_TYPE,
)
async def livez() -> Response[dict[str, str]]:
    return Response({"status": "pass"}, media_type=HEALTH_MEDIA_TYPE, headers={"Cache-Control": "no-store"})
