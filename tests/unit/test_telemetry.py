"""What Keel exports: client spans without a parent (a worker's queue polling) are dropped."""

from __future__ import annotations

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from keel.main.telemetry import WithoutOrphanClientSpans


def test_orphan_client_spans_are_dropped_and_everything_else_kept() -> None:
    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(WithoutOrphanClientSpans(SimpleSpanProcessor(exported)))
    tracer = provider.get_tracer("test")

    with tracer.start_as_current_span("BRPOP", kind=SpanKind.CLIENT):
        pass  # a worker polling its queues: no trace of its own
    with (
        tracer.start_as_current_span("POST /v1/payments", kind=SpanKind.SERVER),
        tracer.start_as_current_span("INSERT", kind=SpanKind.CLIENT),
    ):
        pass
    with (
        tracer.start_as_current_span("payments.capture", kind=SpanKind.CONSUMER),
        tracer.start_as_current_span("POST", kind=SpanKind.CLIENT),
    ):
        pass
    with tracer.start_as_current_span("platform.outbox_sweep", kind=SpanKind.INTERNAL):
        pass

    names = sorted(span.name for span in exported.get_finished_spans())
    assert names == ["INSERT", "POST", "POST /v1/payments", "payments.capture", "platform.outbox_sweep"]
    assert provider.force_flush()
    provider.shutdown()
