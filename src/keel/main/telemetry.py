"""OpenTelemetry wiring: off unless an OTLP endpoint is configured (or a test hands in a provider)."""

from __future__ import annotations

from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.instrumentation.redis import RedisInstrumentor
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from sqlalchemy.ext.asyncio import AsyncEngine

from keel.main.settings import Settings


def build_tracer_provider(settings: Settings) -> TracerProvider | None:
    if not settings.otel_endpoint:
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: settings.service_name}))
    # The exporter reads the standard OTEL_EXPORTER_OTLP_* variables (endpoint, headers, timeout).
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def instrument(provider: TracerProvider, engine: AsyncEngine) -> None:
    """One span per SQL statement (whatever the driver), per Redis command and per outgoing HTTP call
    (which also carries ``traceparent`` to webhook receivers)."""
    sqlalchemy = SQLAlchemyInstrumentor()
    if sqlalchemy.is_instrumented_by_opentelemetry:
        # The instrumentor is a per-process singleton: a second instrument() would be ignored with a
        # warning and leave this engine untraced. One app per process in production; tests build many.
        sqlalchemy.uninstrument()
    sqlalchemy.instrument(engine=engine.sync_engine, tracer_provider=provider, enable_commenter=False)
    redis = RedisInstrumentor()
    if not redis.is_instrumented_by_opentelemetry:
        redis.instrument(tracer_provider=provider)
    httpx = HTTPXClientInstrumentor()
    if not httpx.is_instrumented_by_opentelemetry:
        httpx.instrument(tracer_provider=provider)
