"""OpenTelemetry wiring: off unless an OTLP endpoint is configured (or a test hands in a provider)."""

from __future__ import annotations

from opentelemetry.context import Context
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.instrumentation.redis import RedisInstrumentor
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind
from sqlalchemy.ext.asyncio import AsyncEngine

from keel.main.settings import Settings


def build_tracer_provider(settings: Settings) -> TracerProvider | None:
    if not settings.otel_endpoint:
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: settings.service_name}))
    # The exporter reads the standard OTEL_EXPORTER_OTLP_* variables (endpoint, headers, timeout).
    provider.add_span_processor(WithoutOrphanClientSpans(BatchSpanProcessor(OTLPSpanExporter())))
    return provider


class WithoutOrphanClientSpans(SpanProcessor):
    """Drops client spans that belong to no trace: a worker polling its queues and beating its heart
    through Redis, a pool ping. Hundreds of one-span traces a minute per worker that bury the
    requests' and jobs' traces; every client call made on behalf of a request or a job has a parent."""

    def __init__(self, inner: SpanProcessor) -> None:
        self._inner = inner

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        self._inner.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        if span.parent is None and span.kind is SpanKind.CLIENT:
            return
        self._inner.on_end(span)

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


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
