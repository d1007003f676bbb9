"""An OTLP/HTTP trace receiver on 127.0.0.1, built on the official protobuf definitions
(``opentelemetry-proto``): what an OpenTelemetry Collector's ``otlphttp`` receiver accepts, kept in memory.

``POST /v1/traces`` takes an ``ExportTraceServiceRequest`` as ``application/x-protobuf`` (what Keel's
exporter sends) or as ``application/json`` (OTLP/JSON), optionally gzip-compressed
(``Content-Encoding: gzip``, which the exporter uses when ``OTEL_EXPORTER_OTLP_COMPRESSION=gzip``), and
answers with an empty ``ExportTraceServiceResponse`` in the same encoding. Every span is stored flat,
with its resource's ``service.name`` and attributes.
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanPb

from tests.support.receivers import serving

PROTOBUF = "application/x-protobuf"
JSON = "application/json"

_KINDS = {
    SpanPb.SPAN_KIND_UNSPECIFIED: "UNSPECIFIED",
    SpanPb.SPAN_KIND_INTERNAL: "INTERNAL",
    SpanPb.SPAN_KIND_SERVER: "SERVER",
    SpanPb.SPAN_KIND_CLIENT: "CLIENT",
    SpanPb.SPAN_KIND_PRODUCER: "PRODUCER",
    SpanPb.SPAN_KIND_CONSUMER: "CONSUMER",
}


@dataclass(frozen=True)
class Span:
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_span_id: str | None
    name: str
    kind: str  # SERVER, CLIENT, CONSUMER, ...
    service_name: str | None
    attributes: dict[str, Any]
    resource: dict[str, Any]
    scope: str  # the instrumentation scope (e.g. opentelemetry.instrumentation.httpx)
    start_ns: int
    end_ns: int
    status_code: int  # 0 unset, 1 ok, 2 error

    def __str__(self) -> str:
        parent = self.parent_span_id or "-"
        return f"{self.kind:<8} {self.name!r} [{self.service_name} {self.scope}] {self.span_id} <- {parent}"


def _value(v: AnyValue) -> Any:
    which = v.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return _attributes(v.kvlist_value.values)
    return getattr(v, which)


def _attributes(kvs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    kv: KeyValue
    for kv in kvs:
        out[kv.key] = _value(kv.value)
    return out


def spans_of(request: ExportTraceServiceRequest) -> list[Span]:
    out = []
    for rs in request.resource_spans:
        resource = _attributes(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(
                    Span(
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex() or None,
                        name=s.name,
                        kind=_KINDS.get(s.kind, str(s.kind)),
                        service_name=resource.get("service.name"),
                        attributes=_attributes(s.attributes),
                        resource=resource,
                        scope=ss.scope.name,
                        start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano,
                        status_code=s.status.code,
                    )
                )
    return out


def decode(body: bytes, content_type: str, content_encoding: str) -> ExportTraceServiceRequest:
    """The request in ``body``; ValueError when it cannot be read."""
    if content_encoding == "gzip":
        try:
            body = gzip.decompress(body)
        except (OSError, EOFError) as exc:
            raise ValueError(f"bad gzip body: {exc}") from None
    elif content_encoding not in ("", "identity"):
        raise ValueError(f"unsupported Content-Encoding {content_encoding!r}")
    request = ExportTraceServiceRequest()
    try:
        if content_type == PROTOBUF:
            request.ParseFromString(body)
        elif content_type == JSON:
            json_format.Parse(body, request)
        else:
            raise ValueError(f"unsupported Content-Type {content_type!r}")
    except (DecodeError, json_format.ParseError) as exc:
        raise ValueError(f"not an ExportTraceServiceRequest: {exc}") from None
    return request


@dataclass
class OtlpReceiver:
    """What the exporters sent, in arrival order."""

    url: str = ""  # the OTLP endpoint (OTEL_EXPORTER_OTLP_ENDPOINT): the exporter appends /v1/traces
    exports: int = 0
    rejected: list[str] = field(default_factory=list)
    _spans: list[Span] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, spans: list[Span]) -> None:
        with self._lock:
            self._spans.extend(spans)
            self.exports += 1

    def spans(self) -> list[Span]:
        with self._lock:
            return list(self._spans)

    def traces(self) -> dict[str, list[Span]]:
        out: dict[str, list[Span]] = {}
        for span in self.spans():
            out.setdefault(span.trace_id, []).append(span)
        return out

    def trace(self, trace_id: str) -> list[Span]:
        return [s for s in self.spans() if s.trace_id == trace_id]

    def wait_for(self, condition: Callable[[list[Span]], bool], timeout: float = 20.0) -> list[Span]:
        """Poll (bounded) until ``condition(all spans so far)`` holds; AssertionError with a dump otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            spans = self.spans()
            if condition(spans):
                return spans
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {timeout}s; spans received:\n{dump(spans)}")
            time.sleep(0.05)


def dump(spans: list[Span]) -> str:
    """Spans by trace, each trace as a tree (orphans, whose parent never arrived, at the root)."""
    lines: list[str] = []
    by_trace: dict[str, list[Span]] = {}
    for s in spans:
        by_trace.setdefault(s.trace_id, []).append(s)
    for trace_id, members in by_trace.items():
        lines.append(f"trace {trace_id}:")
        ids = {s.span_id for s in members}
        children: dict[str | None, list[Span]] = {}
        for s in sorted(members, key=lambda s: s.start_ns):
            children.setdefault(s.parent_span_id if s.parent_span_id in ids else None, []).append(s)
        _walk(children, None, 1, lines)
    return "\n".join(lines)


def _walk(children: dict[str | None, list[Span]], parent: str | None, depth: int, lines: list[str]) -> None:
    for child in children.get(parent, []):
        lines.append("  " * depth + str(child))
        _walk(children, child.span_id, depth + 1, lines)


@contextmanager
def otlp_receiver() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            if self.path.split("?", 1)[0] != "/v1/traces":
                self._reply(404, b"", "text/plain")
                return
            content_type = (self.headers.get("content-type") or "").split(";", 1)[0].strip().lower()
            encoding = (self.headers.get("content-encoding") or "").strip().lower()
            try:
                request = decode(body, content_type, encoding)
            except ValueError as exc:
                receiver.rejected.append(str(exc))
                status = 415 if "unsupported" in str(exc) else 400
                self._reply(status, str(exc).encode(), "text/plain")
                return
            receiver.add(spans_of(request))
            response = ExportTraceServiceResponse()
            if content_type == JSON:
                self._reply(200, json_format.MessageToJson(response).encode(), JSON)
            else:
                self._reply(200, response.SerializeToString(), PROTOBUF)

        def _reply(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    with serving(Handler) as base:
        receiver.url = base
        yield receiver
