"""One payment, one trace, across processes, as an OpenTelemetry Collector would receive it.

The real ``keel serve`` and ``keel worker`` run as subprocesses against Postgres and Redis and export over
OTLP/HTTP (protobuf) to a receiver on 127.0.0.1 (tests/support/otlp.py). Only the standard variables are
set: ``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_SERVICE_NAME`` (one per kind of process),
``OTEL_BSP_SCHEDULE_DELAY`` (export every 100 ms) and ``OTEL_EXPERIMENTAL_RESOURCE_DETECTORS`` (adds
``process.pid``). A tenant subscribes a webhook endpoint on a local receiver to ``payment.created`` and
``payment.succeeded``, then sends ``POST /v1/payments``. The trace of that request must hold:

- the API's server span ``POST /v1/payments``, with database (SQLAlchemy) and Redis spans under it;
- in the worker process (another service name and pid): the capture job's consumer span and its database
  spans, and the jobs the two events caused (webhook fan-out, then delivery);
- each delivery's outgoing HTTP client span (httpx), whose ``traceparent`` reached the receiver;

and be one tree rooted at the server span.

The test uses this receiver rather than an OpenTelemetry Collector binary. No official Collector build is
packaged on PyPI, npm or Debian: there are only third-party wrappers that download it at run time, and
other collectors. The receiver decodes the same ``ExportTraceServiceRequest`` messages that the Collector's
OTLP/HTTP receiver decodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind
from opentelemetry.util.types import Attributes

from tests.benchmarks.analytics import wait_ready
from tests.benchmarks.load import Servers, keel_env
from tests.cluster.processes import stop_all
from tests.conftest import TEMPLATE_DB
from tests.support.otlp import OtlpReceiver, Span, dump, otlp_receiver
from tests.support.receivers import Received, Receiver, webhook_receiver
from tests.support.servers import PostgresServer, RedisServer, admin_sql, free_port

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

API_SERVICE = "keel-api"
WORKER_SERVICE = "keel-worker"
SQL_SCOPE = "opentelemetry.instrumentation.sqlalchemy"
REDIS_SCOPE = "opentelemetry.instrumentation.redis"
HTTPX_SCOPE = "opentelemetry.instrumentation.httpx"
PAYMENT_SPAN = "POST /v1/payments"
SUBSCRIBED = ["payment.created", "payment.succeeded"]


@dataclass
class Payment:
    """What one traced payment left behind: every span received, the webhook requests, the ids."""

    spans: list[Span]
    deliveries: list[Received]
    payment_id: str
    job_id: str
    logs: str

    @property
    def trace(self) -> list[Span]:
        servers = [s for s in self.spans if s.kind == "SERVER" and s.name == PAYMENT_SPAN]
        assert len(servers) == 1, dump(self.spans)
        return [s for s in self.spans if s.trace_id == servers[0].trace_id]


@contextmanager
def traced_keel(
    database_url: str, redis_url: str, base: Path, *worker_args: str
) -> Iterator[tuple[Servers, Servers, OtlpReceiver, Receiver]]:
    """``keel serve`` and ``keel worker`` exporting traces to a local OTLP receiver, and a webhook receiver."""
    with otlp_receiver() as otlp, webhook_receiver() as hooks:
        port = free_port()

        def env(service: str) -> dict[str, str]:
            return keel_env(database_url, redis_url, base / "data", port) | {
                "KEEL_WEBHOOKS_ALLOW_PRIVATE": "true",
                "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.url,
                "OTEL_SERVICE_NAME": service,
                "OTEL_BSP_SCHEDULE_DELAY": "100",
                "OTEL_EXPERIMENTAL_RESOURCE_DETECTORS": "otel,process",
            }

        api = Servers(env(API_SERVICE), base, f"http://127.0.0.1:{port}")
        worker = Servers(env(WORKER_SERVICE), base, api.base_url)
        try:
            api.spawn("serve", "serve")
            worker.spawn("worker", "worker", *worker_args)
            yield api, worker, otlp, hooks
        finally:
            stop_all([api, worker])


async def _pay(api: Servers, worker: Servers, hooks: Receiver) -> tuple[str, str]:
    # This process may have httpx instrumented by an app another test built: the payment's trace must
    # start at the API, not under a span of the test's that no receiver ever sees.
    with suppress_instrumentation():
        return await _pay_untraced(api, worker, hooks)


async def _pay_untraced(api: Servers, worker: Servers, hooks: Receiver) -> tuple[str, str]:
    async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as client:
        await wait_ready(client, api)
        worker.check_alive()
        r = await client.post(
            "/v1/signup", json={"organization": "Acme", "owner_email": "owner@acme.test", "owner_name": "Owner"}
        )
        assert r.status_code == 201, r.text
        headers = {"Authorization": f"Bearer {r.json()['api_key']['token']}"}
        r = await client.post(
            "/v1/webhook-endpoints", headers=headers, json={"url": hooks.url, "event_types": SUBSCRIBED}
        )
        assert r.status_code == 201, r.text
        r = await client.post(
            "/v1/payments",
            headers={**headers, "Idempotency-Key": uuid.uuid4().hex},
            json={"amount": 2500, "currency": "eur", "payment_method": "pm_card_visa"},
        )
        assert r.status_code == 202, r.text
        return str(r.json()["payment"]["id"]), str(r.json()["job_id"])


def expected_in(trace: list[Span]) -> dict[str, bool]:
    """Each part of the payment's journey the trace must hold, and whether it does."""

    def has(**want: Any) -> bool:
        return any(all(getattr(s, k) == v for k, v in want.items()) for s in trace)

    api_pids = {s.resource.get("process.pid") for s in trace if s.service_name == API_SERVICE}
    worker_pids = {s.resource.get("process.pid") for s in trace if s.service_name == WORKER_SERVICE}
    return {
        f"API server span {PAYMENT_SPAN}": has(kind="SERVER", name=PAYMENT_SPAN, service_name=API_SERVICE),
        "API database spans": has(scope=SQL_SCOPE, service_name=API_SERVICE),
        "API Redis spans": has(scope=REDIS_SCOPE, service_name=API_SERVICE),
        "worker job span payments.capture": has(
            kind="CONSUMER", name="job payments.capture", service_name=WORKER_SERVICE
        ),
        "worker database spans": has(scope=SQL_SCOPE, service_name=WORKER_SERVICE),
        "worker job span webhooks.fan_out": has(
            kind="CONSUMER", name="job webhooks.fan_out", service_name=WORKER_SERVICE
        ),
        "worker job span webhooks.deliver": has(
            kind="CONSUMER", name="job webhooks.deliver", service_name=WORKER_SERVICE
        ),
        "two webhook HTTP client spans (httpx)": sum(
            1 for s in trace if s.kind == "CLIENT" and s.scope == HTTPX_SCOPE and s.service_name == WORKER_SERVICE
        )
        >= len(SUBSCRIBED),
        "API and worker in different processes": bool(api_pids) and bool(worker_pids) and not (api_pids & worker_pids),
    }


def _complete(spans: list[Span]) -> bool:
    """Every part is there and every span's parent has arrived: a job's own span is exported after its
    children (it ends last), so the parts alone can be there a moment before the tree is whole."""
    servers = [s for s in spans if s.kind == "SERVER" and s.name == PAYMENT_SPAN]
    if len(servers) != 1:
        return False
    trace = [s for s in spans if s.trace_id == servers[0].trace_id]
    ids = {s.span_id for s in trace}
    whole = all(s.parent_span_id is None or s.parent_span_id in ids for s in trace)
    return whole and all(expected_in(trace).values())


def pay_and_collect(database_url: str, redis_url: str, base: Path, *worker_args: str) -> Payment:
    """One payment through the real processes; returns once the trace is complete, or when it has had
    ample time to be (the webhook requests arrived, plus 5 s: fifty export intervals)."""
    with traced_keel(database_url, redis_url, base, *worker_args) as (api, worker, otlp, hooks):
        payment_id, job_id = asyncio.run(_pay(api, worker, hooks))
        try:
            deliveries = hooks.wait_for(len(SUBSCRIBED), timeout=45)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{api.tail()}") from None
        with contextlib.suppress(AssertionError):  # the assertions say what is missing
            otlp.wait_for(_complete, timeout=5)
        return Payment(otlp.spans(), deliveries, payment_id, job_id, api.tail())


def assert_one_trace(payment: Payment) -> None:
    trace = payment.trace
    missing = [part for part, ok in expected_in(trace).items() if not ok]
    assert not missing, f"the payment's trace lacks: {missing}\n{dump(trace)}\n{payment.logs}"
    by_id = {s.span_id: s for s in trace}

    # One tree: every span but the root has its parent in the trace.
    orphans = [s for s in trace if s.parent_span_id is not None and s.parent_span_id not in by_id]
    assert not orphans, "spans whose parent never arrived:\n" + "\n".join(map(str, orphans)) + "\n" + dump(trace)
    [root] = [s for s in trace if s.parent_span_id is None]
    assert (root.kind, root.name, root.service_name) == ("SERVER", PAYMENT_SPAN, API_SERVICE)

    def ancestors(span: Span) -> list[Span]:
        out = []
        while span.parent_span_id in by_id:
            span = by_id[span.parent_span_id]
            out.append(span)
        return out

    [capture] = [s for s in trace if s.name == "job payments.capture"]
    assert capture.attributes["messaging.message.id"] == payment.job_id
    assert capture.attributes["messaging.system"] == "rq"
    assert root in ancestors(capture)
    assert any(s.scope == SQL_SCOPE for s in trace if capture in ancestors(s))  # the capture's own queries
    deliver_spans = [s for s in trace if s.name == "job webhooks.deliver"]
    assert len(deliver_spans) == len(SUBSCRIBED), dump(trace)
    # payment.succeeded is published by the capture job, in the worker: its delivery descends from it.
    assert any(capture in ancestors(d) for d in deliver_spans), dump(trace)
    for client in (s for s in trace if s.scope == HTTPX_SCOPE):
        assert any(a.name == "job webhooks.deliver" for a in ancestors(client)), dump(trace)
    assert_context_left_keel(payment)


def assert_context_left_keel(payment: Payment) -> None:
    """Each webhook request carried the payment's trace in its ``traceparent``, naming the HTTP client span
    that sent it (when that span arrived)."""
    trace = payment.trace
    by_id = {s.span_id: s for s in trace}
    assert {json.loads(d.body)["type"] for d in payment.deliveries} == set(SUBSCRIBED)
    for received in payment.deliveries:
        version, trace_id, parent_id, _flags = received.headers["traceparent"].split("-")
        assert (version, trace_id) == ("00", trace[0].trace_id)
        if parent_id in by_id:
            assert (by_id[parent_id].kind, by_id[parent_id].scope) == ("CLIENT", HTTPX_SCOPE)


# -- the receiver -------------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", [Compression.NoCompression, Compression.Gzip])
def test_the_receiver_reads_what_the_sdk_exporter_sends(compression: Compression) -> None:
    with otlp_receiver() as otlp:
        provider = TracerProvider(resource=Resource.create({"service.name": "probe"}))
        exporter = OTLPSpanExporter(endpoint=f"{otlp.url}/v1/traces", compression=compression)
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        tracer = provider.get_tracer("probe.scope")
        outer_attributes: Attributes = {"n": 7, "tags": ["a", "b"]}
        with (
            tracer.start_as_current_span("outer", kind=SpanKind.SERVER, attributes=outer_attributes),
            tracer.start_as_current_span("inner", kind=SpanKind.CLIENT) as inner,
        ):
            inner_id = f"{inner.get_span_context().span_id:016x}"
        provider.shutdown()
        outer_span, inner_span = sorted(otlp.spans(), key=lambda s: s.name != "outer")
        assert otlp.rejected == []
        assert (outer_span.kind, outer_span.parent_span_id, outer_span.attributes) == (
            "SERVER",
            None,
            {"n": 7, "tags": ["a", "b"]},
        )
        assert (inner_span.kind, inner_span.span_id, inner_span.parent_span_id) == (
            "CLIENT",
            inner_id,
            outer_span.span_id,
        )
        assert inner_span.trace_id == outer_span.trace_id
        assert (inner_span.service_name, inner_span.scope) == ("probe", "probe.scope")


def test_the_receiver_refuses_what_it_cannot_read() -> None:
    with otlp_receiver() as otlp:
        r = httpx.post(f"{otlp.url}/v1/traces", content=b"\xff\xff", headers={"content-type": "application/x-protobuf"})
        assert r.status_code == 400
        r = httpx.post(f"{otlp.url}/v1/traces", content=b"{}", headers={"content-type": "text/plain"})
        assert r.status_code == 415
        r = httpx.post(f"{otlp.url}/v1/traces", content=b"{}", headers={"content-type": "application/json"})
        assert r.status_code == 200
        assert otlp.spans() == []


# -- the payment's trace ----------------------------------------------------------------------------------


def test_a_payment_is_one_trace_from_the_request_to_the_webhook_with_the_simple_worker(
    pg_url: str, redis_url: str, tmp_path: Path
) -> None:
    assert_one_trace(pay_and_collect(pg_url, redis_url, tmp_path, "--simple"))


@pytest.fixture(scope="module")
def forked_payment(pg: PostgresServer, redis_proc: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Payment:
    """One payment whose jobs the default, forking ``keel worker`` ran (shared by the tests below)."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with ThreadPoolExecutor(1) as pool:  # module fixtures may be set up from inside a running loop
        pool.submit(asyncio.run, admin_sql(pg, f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE_DB}"')).result()
    connection = redis.Redis.from_url(redis_proc.url)
    try:
        connection.flushall()
        return pay_and_collect(pg.url(name), redis_proc.url, tmp_path_factory.mktemp("forked"))
    finally:
        connection.flushall()
        connection.close()
        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, admin_sql(pg, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')).result()


def test_the_forking_worker_continues_the_request_trace(forked_payment: Payment) -> None:
    """The context reaches the work horses: the webhook requests they send carry the payment's trace."""
    assert_context_left_keel(forked_payment)


def test_a_payment_is_one_trace_from_the_request_to_the_webhook_with_the_forking_worker(
    forked_payment: Payment,
) -> None:
    assert_one_trace(forked_payment)
