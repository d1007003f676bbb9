"""Request ids, structured logs without secrets, OpenTelemetry spans."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from litestar import Litestar
from litestar.testing import AsyncTestClient
from loguru import logger
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from keel.main.logging import redact
from tests.support.app import client_for, make_settings, signup
from tests.support.waiting import eventually

Client = AsyncTestClient[Litestar]


async def test_request_id_is_accepted_generated_and_echoed(client: Client, tenant: dict[str, Any]) -> None:
    h = tenant["headers"]
    r = await client.get("/v1/tenant", headers={**h, "X-Request-ID": "abc-123.def:9"})
    assert r.headers["x-request-id"] == "abc-123.def:9"

    for junk in ("has space", "x" * 200, "<script>", "\u00fc".encode("latin-1")):
        r = await client.get("/v1/tenant", headers={**h, "X-Request-ID": junk})
        assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"]), junk

    # Errors carry it too, in the header and in the problem document, routed or not.
    for method, path, headers in (
        ("GET", "/v1/tenant", {}),
        ("GET", "/no/such/route", {}),
        ("PUT", "/v1/users", h),
        ("GET", f"/v1/users/{tenant['tenant']['id']}", h),
    ):
        r = await client.request(method, path, headers={**headers, "X-Request-ID": "trace-me-1"})
        assert r.status_code >= 400
        assert r.headers["x-request-id"] == "trace-me-1"
        assert r.json()["request_id"] == "trace-me-1"


async def test_logs_are_json_with_request_id_and_no_secrets(client: Client, json_logs: list[dict[str, Any]]) -> None:
    t = await signup(client)
    token = t["api_key"]["token"]
    r = await client.get(f"/v1/users/{t['user']['id']}", headers={**t["headers"], "X-Request-ID": "req-42"})
    assert r.status_code == 200
    logger.info("client sent Authorization: Bearer {} and secret whsec_c2VjcmV0", token)

    served = [line for line in json_logs if line["msg"] == "request served" and line.get("request_id") == "req-42"]
    assert len(served) == 1
    assert served[0]["route"] == "/v1/users/{user_id}"
    assert served[0]["status"] == 200
    assert served[0]["duration_ms"] >= 0
    everything = json.dumps(json_logs)
    assert token not in everything
    assert token[5:] not in everything
    assert "c2VjcmV0" not in everything
    assert "[REDACTED]" in everything


def test_redaction_patterns() -> None:
    assert "abc" not in redact("Authorization: Bearer abc")
    assert redact("key=keel_AbCdEfGhIjKlMnOp") == "key=keel_[REDACTED]"
    assert redact("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw") == "whsec_[REDACTED]"
    assert "hunter2" not in redact('{"password": "hunter2"}')


async def test_server_span_is_named_by_route_and_shares_trace_with_sql(
    pg_url: str, tmp_path: Path, spans: tuple[TracerProvider, InMemorySpanExporter], json_logs: list[dict[str, Any]]
) -> None:
    provider, exporter = spans
    async with client_for(make_settings(pg_url, tmp_path), tracer_provider=provider) as client:
        t = await signup(client)
        jobs = client.app.state["container"].jobs

        async def jobs_idle() -> bool:
            return bool(jobs.idle)

        # The jobs signup's events started (the welcome email) would otherwise still be running, their
        # SQL traced under a job span not finished yet, when the spans are read below.
        await eventually(jobs_idle, within=30)
        exporter.clear()
        r = await client.get(f"/v1/users/{t['user']['id']}", headers={**t["headers"], "X-Request-ID": "traced-1"})
        assert r.status_code == 200
        # Read before shutdown, whose own work (storing the request counts) is not part of the request.
        finished = exporter.get_finished_spans()
    server = [s for s in finished if s.kind == SpanKind.SERVER]
    assert [s.name for s in server] == ["GET /v1/users/{user_id}"]
    assert server[0].attributes is not None
    assert server[0].attributes["http.route"] == "/v1/users/{user_id}"
    trace_id = server[0].context.trace_id
    # Background jobs (periodic sweeps, and the jobs signup's events started) trace their own SQL.
    job_traces = {s.context.trace_id for s in finished if s.name.startswith("job ")}
    sql = [
        s
        for s in finished
        if s.kind == SpanKind.CLIENT
        and s.attributes
        and "db.statement" in s.attributes
        and s.context.trace_id not in job_traces
    ]
    assert sql, [s.name for s in finished]
    assert all(s.context.trace_id == trace_id for s in sql), [
        (s.name, s.context.trace_id == trace_id, s.parent is not None) for s in sql
    ]
    # Log lines written while serving carry the trace id.
    served = [line for line in json_logs if line.get("request_id") == "traced-1" and line["msg"] == "request served"]
    assert served[0]["trace_id"] == format(trace_id, "032x")


async def test_unavailable_database_is_a_503_problem_and_an_error_span(
    tmp_path: Path, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    from tests.support.servers import free_port

    provider, exporter = spans
    dead = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/nothing"
    settings = make_settings(dead, tmp_path, KEEL_DB_POOL_TIMEOUT="1")
    async with client_for(settings, tracer_provider=provider) as client:
        r = await client.get("/v1/tenant", headers={"Authorization": "Bearer keel_whatever-token"})
        assert r.status_code == 503
        assert r.headers["content-type"] == "application/problem+json"
        assert r.headers["retry-after"] == "1"
        body = r.json()
        assert body["type"] == "/problems/service-unavailable"
        assert "Traceback" not in r.text
        assert "asyncpg" not in r.text
        r = await client.get("/healthz")
        assert r.status_code == 503
    server = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert server
    assert server[0].status.status_code == StatusCode.ERROR
